#!/usr/bin/env python3
"""Inference benchmark: `dolly serve` (over HTTP, streaming) vs HF transformers `generate`, same model, same run.

Developer tool only (CI never runs Python). Writes a random-init pythia-70m-shaped model with
`dolly init-model --preset pythia-70m` (fp32, vocab 50304) plus the 20B tokenizer into a temp dir; both sides
load THAT directory, so weights and prompt ids are identical. Greedy decoding, fp32, CPU, `--threads` threads.

    python tools/bench_infer.py                       # needs target/release/dolly (cargo build --release -p dolly)
    python tools/bench_infer.py --new-tokens 64 --runs 2

`--runs` rounds, each: one dolly single-stream request, HF generate (TTFT, then the full length), one dolly
concurrent burst. The ratios reported are medians of the per-round ratios, so each compares measurements taken
seconds apart (this host's speed drifts by tens of percent within minutes).
single stream: one request at a time, raw prompt (~32 tokens, no template), `max_tokens` = `--new-tokens`.
    dolly: TTFT = request sent -> first streamed token (SSE, incl. HTTP, tokenization and the prompt forward);
           tokens/s = completion tokens / whole request time.
    HF:    TTFT = generate(max_new_tokens=1) time; tokens/s = new tokens / generate(max_new_tokens=N,
           min_new_tokens=N) time (model.generate, SDPA, KV cache).
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


def hf_setup(model_dir, tok_file, args):
    """Loads the model in HF; returns gen(n) -> seconds for a greedy generate of exactly n new tokens, and info."""
    import torch
    import transformers
    from tokenizers import Tokenizer
    from transformers import GPTNeoXForCausalLM

    torch.set_num_threads(args.threads)
    ids = Tokenizer.from_file(tok_file).encode(PROMPT).ids
    model = GPTNeoXForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32,
                                               attn_implementation="sdpa").eval()
    prompt = torch.tensor([ids])
    mask = torch.ones_like(prompt)

    def gen(n):
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model.generate(input_ids=prompt, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, eos_token_id=None, pad_token_id=0)
            dt = time.perf_counter() - t0
        assert out.shape[1] == len(ids) + n
        return dt

    gen(4)
    return gen, {"prompt_tokens": len(ids), "torch": torch.__version__, "transformers": transformers.__version__,
                 "threads": torch.get_num_threads()}


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


class DollyServer:
    """`dolly serve` on a free loopback port for the duration of a `with` block."""

    def __init__(self, exe, model_dir, tok_file, args):
        self.cmd = [exe, "--threads", str(args.threads), "serve", model_dir, "--tokenizer", tok_file, "--port", "0",
                    "--max-batch", str(max(8, args.concurrency)), "--model-name", "bench"]
        self.cmd += ["--bf16"] if args.bf16 else []

    def __enter__(self):
        self.p = subprocess.Popen(self.cmd, stderr=subprocess.PIPE, text=True)
        self.addr = None
        for line in self.p.stderr:
            if "http://" in line:
                self.addr = line.strip().split("http://")[1]
                break
        if not self.addr:
            self.__exit__()
            raise RuntimeError("dolly serve did not start")
        threading.Thread(target=lambda: [None for _ in self.p.stderr], daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.p.terminate()
        self.p.wait(timeout=60)


def dolly_single(addr, args):
    body = {"prompt": PROMPT, "raw_prompt": True, "max_tokens": args.new_tokens, "temperature": 0, "stream": True}
    s = request(addr, body, True)
    assert s["finish"] == "length", s
    return {"ttft_s": s["ttft_s"], "total_s": s["total_s"], "tokens_per_s": args.new_tokens / s["total_s"]}


def dolly_burst(addr, args):
    results = [None] * args.concurrency

    def worker(i):
        body = {"prompt": PROMPT.replace("dragon", f"dragon number {i}"), "raw_prompt": True,
                "max_tokens": args.new_tokens, "temperature": 0}
        results[i] = request(addr, body, False)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    assert all(r["finish"] == "length" for r in results), results
    toks = sum(r["usage"]["completion_tokens"] for r in results)
    return {"wall_s": wall, "tokens": toks, "tokens_per_s": toks / wall}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5, help="rounds; each is one single-stream request, HF "
                    "generate (TTFT and full), and one concurrent burst, so each round's ratios compare "
                    "measurements taken close together")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--preset", default="pythia-70m")
    ap.add_argument("--dolly", default="target/release/dolly")
    ap.add_argument("--bf16", action="store_true", help="run `dolly serve --bf16` (bf16 weight copies for decoding)")
    ap.add_argument("--tokenizer", default=os.path.join(os.path.dirname(__file__), "../../shared/data/20B_tokenizer.json"))
    args = ap.parse_args()
    exe = os.path.abspath(args.dolly)
    tok = os.path.abspath(args.tokenizer)
    med = statistics.median
    rounds = []
    with tempfile.TemporaryDirectory() as d:
        model_dir = os.path.join(d, args.preset)
        subprocess.run([exe, "init-model", "--tokenizer", "none", "--preset", args.preset, "--output", model_dir], check=True,
                       stderr=subprocess.DEVNULL)
        gen, hf_info = hf_setup(model_dir, tok, args)
        with DollyServer(exe, model_dir, tok, args) as server:
            request(server.addr, {"prompt": PROMPT, "raw_prompt": True, "max_tokens": 4}, False)  # warm-up
            for r in range(args.runs):
                one = dolly_single(server.addr, args)
                hf_ttft = gen(1)
                hf_s = gen(args.new_tokens)
                burst = dolly_burst(server.addr, args)
                rnd = {"dolly_single": one, "hf_ttft_s": hf_ttft, "hf_generate_s": hf_s,
                       "hf_tokens_per_s": args.new_tokens / hf_s, "dolly_burst": burst,
                       "single_stream_speedup": one["tokens_per_s"] * hf_s / args.new_tokens,
                       "aggregate_over_single": burst["tokens_per_s"] / one["tokens_per_s"]}
                rounds.append(rnd)
                print(f"round {r + 1}: single {one['tokens_per_s']:.1f} vs HF {rnd['hf_tokens_per_s']:.1f} tok/s "
                      f"({rnd['single_stream_speedup']:.2f}x); {args.concurrency} concurrent "
                      f"{burst['tokens_per_s']:.1f} tok/s ({rnd['aggregate_over_single']:.2f}x single)",
                      file=sys.stderr)
    dolly_tps = med(r["dolly_single"]["tokens_per_s"] for r in rounds)
    dolly_ttft = med(r["dolly_single"]["ttft_s"] for r in rounds)
    hf_tps = med(r["hf_tokens_per_s"] for r in rounds)
    hf_ttft = med(r["hf_ttft_s"] for r in rounds)
    agg = med(r["dolly_burst"]["tokens_per_s"] for r in rounds)
    out = {"preset": args.preset, "new_tokens": args.new_tokens, "threads": args.threads, "bf16": args.bf16,
           "concurrency": args.concurrency, "runs": args.runs, "hf": hf_info,
           "dolly_tokens_per_s": dolly_tps, "dolly_ttft_s": dolly_ttft, "hf_tokens_per_s": hf_tps,
           "hf_ttft_s": hf_ttft, "aggregate_tokens_per_s": agg,
           # medians of the per-round ratios (each round's measurements are adjacent in time)
           "single_stream_speedup": med(r["single_stream_speedup"] for r in rounds),
           "aggregate_over_single": med(r["aggregate_over_single"] for r in rounds),
           "ttft_speedup": hf_ttft / dolly_ttft, "rounds": rounds}
    print(json.dumps(out, indent=1))
    print(f"\nmedians of {args.runs} rounds: single stream dolly {dolly_tps:.1f} tok/s vs HF {hf_tps:.1f} tok/s "
          f"(per-round ratio {out['single_stream_speedup']:.2f}x); TTFT dolly {dolly_ttft * 1000:.1f} ms vs HF "
          f"{hf_ttft * 1000:.1f} ms; {args.concurrency} concurrent: {agg:.1f} tok/s aggregate (per-round ratio "
          f"{out['aggregate_over_single']:.2f}x single stream)", file=sys.stderr)


if __name__ == "__main__":
    main()
