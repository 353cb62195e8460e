#!/usr/bin/env python3
"""Inference benchmark: `dolly serve` (over HTTP, streaming) vs HF transformers `generate`, same model, same run.

Developer tool only (CI never runs Python). Writes a random-init pythia-70m-shaped model with
`dolly init-model --preset pythia-70m` (fp32, vocab 50304) plus the 20B tokenizer into a temp dir; both sides
load THAT directory, so weights and prompt ids are identical. Greedy decoding, fp32, CPU, `--threads` threads.

    python tools/bench_infer.py                       # needs target/release/dolly (cargo build --release -p dolly)
    python tools/bench_infer.py --new-tokens 64 --runs 2

single stream: one request at a time, raw prompt (~32 tokens, no template), `max_tokens` = `--new-tokens`.
    dolly: TTFT = request sent -> first streamed token (SSE, incl. HTTP, tokenization and the prompt forward);
           tokens/s = completion tokens / whole request time. Median of `--runs`.
    HF:    TTFT = generate(max_new_tokens=1) time; tokens/s = new tokens / generate(max_new_tokens=N,
           min_new_tokens=N) time (model.generate, SDPA, KV cache). Median of `--runs`.
concurrent: `--concurrency` requests sent at once to the server (different prompts, same length budget);
    aggregate tokens/s = all completion tokens / wall time from first send to last answer.
The random model never emits `### End` in practice; the script checks every answer used its whole budget.
Timings are indicative on a shared machine: do not run while someone else benchmarks.
"""

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

PROMPT = "Write a long and detailed story about a dragon who learns to read books in an old library by the sea."


def hf_side(model_dir, tok_file, args):
    import torch
    from tokenizers import Tokenizer
    from transformers import GPTNeoXForCausalLM

    torch.set_num_threads(args.threads)
    ids = Tokenizer.from_file(tok_file).encode(PROMPT).ids
    model = GPTNeoXForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32,
                                               attn_implementation="sdpa").eval()
    prompt = torch.tensor([ids])
    mask = torch.ones_like(prompt)

    def gen(n):
        t0 = time.perf_counter()
        out = model.generate(input_ids=prompt, attention_mask=mask, do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, eos_token_id=None, pad_token_id=0)
        dt = time.perf_counter() - t0
        assert out.shape[1] == len(ids) + n
        return dt, out[0, len(ids):].tolist()

    with torch.inference_mode():
        gen(4)
        ttft = statistics.median(gen(1)[0] for _ in range(args.runs))
        runs = [gen(args.new_tokens) for _ in range(args.runs)]
    med = statistics.median(r[0] for r in runs)
    import transformers
    return {"prompt_tokens": len(ids), "ttft_s": ttft, "tokens_per_s": args.new_tokens / med,
            "median_generate_s": med, "tokens": runs[0][1], "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads()}


def request(addr, body, stream):
    host, port = addr.split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, (r.status, r.read())
    first = None
    text = []
    finish = None
    if stream:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            ev = json.loads(data)
            if first is None:
                first = time.perf_counter() - t0
            ch = ev["choices"][0]
            text.append(ch["text"])
            finish = ch["finish_reason"] or finish
        usage = None
    else:
        v = json.loads(r.read())
        first = None
        finish = v["choices"][0]["finish_reason"]
        usage = v["usage"]
    dt = time.perf_counter() - t0
    c.close()
    return {"ttft_s": first, "total_s": dt, "finish": finish, "usage": usage, "text": "".join(text)}


def dolly_side(exe, model_dir, tok_file, args):
    cmd = [exe, "--threads", str(args.threads), "serve", model_dir, "--tokenizer", tok_file, "--port", "0",
           "--max-batch", str(max(8, args.concurrency)), "--model-name", "bench"] + (["--bf16"] if args.bf16 else [])
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        addr = None
        for line in p.stderr:
            if "http://" in line:
                addr = line.strip().split("http://")[1]
                break
        assert addr, "dolly serve did not start"
        threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
        base = {"prompt": PROMPT, "raw_prompt": True, "max_tokens": args.new_tokens, "temperature": 0}
        request(addr, dict(base, max_tokens=4), False)  # warm-up
        singles = [request(addr, dict(base, stream=True), True) for _ in range(args.runs)]
        for s in singles:
            assert s["finish"] == "length", s
        ttft = statistics.median(s["ttft_s"] for s in singles)
        tps = statistics.median(args.new_tokens / s["total_s"] for s in singles)
        # concurrent
        results = [None] * args.concurrency

        def worker(i):
            body = dict(base, prompt=PROMPT.replace("dragon", f"dragon number {i}"))
            results[i] = request(addr, body, False)

        conc = []
        for _ in range(args.runs):
            threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.concurrency)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            toks = sum(r["usage"]["completion_tokens"] for r in results)
            assert all(r["finish"] == "length" for r in results), results
            conc.append({"wall_s": wall, "tokens": toks, "tokens_per_s": toks / wall})
        agg = statistics.median(c["tokens_per_s"] for c in conc)
        return {"ttft_s": ttft, "tokens_per_s": tps, "single_runs": [
            {k: s[k] for k in ("ttft_s", "total_s")} for s in singles],
            "concurrency": args.concurrency, "aggregate_tokens_per_s": agg, "concurrent_runs": conc,
            "cmd": " ".join(cmd)}
    finally:
        p.terminate()
        p.wait(timeout=60)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--preset", default="pythia-70m")
    ap.add_argument("--dolly", default="target/release/dolly")
    ap.add_argument("--bf16", action="store_true", help="run `dolly serve --bf16` (bf16 weight copies for decoding)")
    ap.add_argument("--tokenizer", default=os.path.join(os.path.dirname(__file__), "../../shared/data/20B_tokenizer.json"))
    args = ap.parse_args()
    exe = os.path.abspath(args.dolly)
    tok = os.path.abspath(args.tokenizer)
    with tempfile.TemporaryDirectory() as d:
        model_dir = os.path.join(d, args.preset)
        subprocess.run([exe, "init-model", "--preset", args.preset, "--output", model_dir], check=True,
                       stderr=subprocess.DEVNULL)
        dolly = dolly_side(exe, model_dir, tok, args)
        hf = hf_side(model_dir, tok, args)
    single = dolly["tokens_per_s"] / hf["tokens_per_s"]
    out = {"preset": args.preset, "new_tokens": args.new_tokens, "threads": args.threads, "dolly": dolly,
           "hf": {k: v for k, v in hf.items() if k != "tokens"},
           "single_stream_speedup": single, "ttft_speedup": hf["ttft_s"] / dolly["ttft_s"],
           "aggregate_over_single": dolly["aggregate_tokens_per_s"] / dolly["tokens_per_s"]}
    print(json.dumps(out, indent=1))
    print(f"\nsingle stream: dolly {dolly['tokens_per_s']:.1f} tok/s vs HF {hf['tokens_per_s']:.1f} tok/s "
          f"({single:.2f}x); TTFT dolly {dolly['ttft_s'] * 1000:.1f} ms vs HF {hf['ttft_s'] * 1000:.1f} ms; "
          f"{args.concurrency} concurrent: {dolly['aggregate_tokens_per_s']:.1f} tok/s aggregate "
          f"({out['aggregate_over_single']:.2f}x single stream)", file=sys.stderr)


if __name__ == "__main__":
    main()
