#!/usr/bin/env python3
"""PyTorch reference for dolly's CPU benchmarks, run side by side with the dolly binary.

Developer tool only (CI never runs Python). fp32, CPU, SDPA attention, a pythia-70m-shaped random-init
GPT-NeoX (vocab 50304, hidden 512, 6 layers, 8 heads, intermediate 2048, rotary 0.25, parallel residual).

    python tools/bench_torch.py                       # both modes, PyTorch + target/release/dolly if present
    python tools/bench_torch.py --mode train --steps 3 --dolly none

train:    batch 4 x seq 256 random ids, labels = ids, AdamW lr 1e-5; one step = forward + backward +
          clip_grad_norm_(1.0) + optimizer.step + zero_grad; `--warmup` steps untimed, then `--steps` timed;
          reports median_step_s.
generate: batch 1, 32 random prompt tokens, greedy 128 new tokens (min_new_tokens = max_new_tokens);
          tokens_per_s = new tokens / generate() time, median of `--runs`; ttft_s = median time of
          generate(max_new_tokens=1).
Each side runs in its own child process; peak_rss_mb is the child's ru_maxrss (from wait4), so PyTorch and
dolly are measured the same way (dolly's self-reported value is kept as self_peak_rss_mb). dolly gets the same
--warmup (train) and --runs (generate) when the binary accepts those flags.
Timings are indicative on a shared machine: do not run while someone else benchmarks.
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PRESET = dict(vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
              intermediate_size=2048, rotary_pct=0.25, max_position_embeddings=2048, use_parallel_residual=True)


# ----------------------------------------------------------------------------------------------------- PyTorch side
def build_model(seed):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=PRESET["vocab_size"],
        hidden_size=PRESET["hidden_size"],
        num_hidden_layers=PRESET["num_hidden_layers"],
        num_attention_heads=PRESET["num_attention_heads"],
        intermediate_size=PRESET["intermediate_size"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000,
                         "partial_rotary_factor": PRESET["rotary_pct"]},
        max_position_embeddings=PRESET["max_position_embeddings"],
        use_parallel_residual=PRESET["use_parallel_residual"],
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        bos_token_id=None,
        eos_token_id=None,  # pure greedy: no eos masking by min_new_tokens, no early stop
        pad_token_id=None,
        attn_implementation="sdpa",
    )
    model = GPTNeoXForCausalLM(cfg).float()
    return torch, model


def worker_train(args):
    torch, model = build_model(args.seed)
    model.train()
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, PRESET["vocab_size"], (args.batch_size, args.seq_len), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        losses.append(float(loss))
        if i >= args.warmup:
            times.append(dt)
    tokens = args.batch_size * args.seq_len
    med = statistics.median(times)
    return {
        "mode": "train",
        "median_step_s": med,
        "min_step_s": min(times),
        "step_times_s": times,
        "tokens_per_s": tokens / med,
        "steps": args.steps,
        "warmup": args.warmup,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "self_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def worker_generate(args):
    torch, model = build_model(args.seed)
    model.eval()
    if args.torch_dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    g = torch.Generator().manual_seed(args.seed + 2)
    prompt = torch.randint(0, PRESET["vocab_size"], (1, args.prompt_len), generator=g)
    mask = torch.ones_like(prompt)

    def gen(n):
        t0 = time.perf_counter()
        out = model.generate(input_ids=prompt, attention_mask=mask, do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, eos_token_id=None, pad_token_id=0)
        dt = time.perf_counter() - t0
        assert out.shape == (1, args.prompt_len + n), out.shape
        return dt

    with torch.inference_mode():
        gen(4)  # warm-up (allocator, first-call overheads)
        ttft = [gen(1) for _ in range(args.runs)]
        times = [gen(args.new_tokens) for _ in range(args.runs)]
    med = statistics.median(times)
    return {
        "mode": "generate",
        "tokens_per_s": args.new_tokens / med,
        "median_generate_s": med,
        "generate_times_s": times,
        "ttft_s": statistics.median(ttft),
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "runs": args.runs,
        "self_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def worker_main(args):
    import torch

    torch.set_num_threads(args.threads)
    res = worker_train(args) if args.worker == "train" else worker_generate(args)
    import transformers

    res.update(threads=torch.get_num_threads(), torch=torch.__version__, transformers=transformers.__version__)
    print(json.dumps(res))


# ------------------------------------------------------------------------------------------------- orchestration
def run_child(cmd, timeout):
    """Run cmd; return (rc, stdout, stderr, peak_rss_mb of that child via wait4, wall_s)."""
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        t0 = time.perf_counter()
        try:
            p = subprocess.Popen(cmd, stdout=fo, stderr=fe)
        except OSError as e:
            return None, "", str(e), None, 0.0
        deadline = t0 + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.05)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        fo.seek(0)
        fe.seek(0)
        return p.returncode, fo.read().decode(errors="replace"), fe.read().decode(errors="replace"), \
            ru.ru_maxrss / 1024, wall


def last_json(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


def run_torch(mode, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--threads", str(args.threads),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--runs", str(args.runs),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--seed", str(args.seed),
           "--torch-dtype", args.torch_dtype]
    rc, out, err, rss, wall = run_child(cmd, args.timeout)
    res = last_json(out)
    if rc != 0 or res is None:
        return {"error": f"pytorch {mode} failed (rc={rc}): {err.strip()[-2000:]}"}
    res["peak_rss_mb"] = rss
    res["wall_s"] = wall
    return res


def resolve_dolly(path):
    if path in ("", "none"):
        return None
    if os.sep not in path:
        found = shutil.which(path)
        if found:
            return found
    return path if os.path.isfile(path) and os.access(path, os.X_OK) else None


def run_dolly(mode, exe, args):
    if mode == "train":
        sub = ["bench", "train", "--preset", "pythia-70m", "--batch-size", str(args.batch_size),
               "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--json"]
        parity = ["--warmup", str(args.warmup)]
    else:
        sub = ["bench", "generate", "--preset", "pythia-70m", "--prompt-len", str(args.prompt_len),
               "--new-tokens", str(args.new_tokens), "--json"] + (["--bf16"] if args.dolly_bf16 else [])
        parity = ["--runs", str(args.runs)]
    # Same warmup / run count as the PyTorch side; retried without them if this dolly build lacks the flags.
    cmd = [exe, "--threads", str(args.threads)] + sub + parity
    rc, out, err, rss, wall = run_child(cmd, args.timeout)
    if rc == 2 and "unexpected argument" in err:
        cmd = cmd[: len(cmd) - len(parity)]
        rc, out, err, rss, wall = run_child(cmd, args.timeout)
    res = last_json(out)
    if rc != 0 or res is None:
        return {"error": f"dolly {mode} failed (rc={rc}): {(err or out).strip()[-2000:]}", "cmd": " ".join(cmd)}
    if "peak_rss_mb" in res:
        res["self_peak_rss_mb"] = res["peak_rss_mb"]
    res["peak_rss_mb"] = rss
    res["wall_s"] = wall
    res["cmd"] = " ".join(cmd)
    return res


def fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def ratio(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return a / b
    return None


def combine(results):
    """Per-key median over rounds for numbers; the first round's value otherwise."""
    if len(results) == 1:
        return results[0]
    out = dict(results[0])
    for k in out:
        vals = [r.get(k) for r in results]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[k] = statistics.median(vals)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["train", "generate", "all"], default="all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed train steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="generate runs (median)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dolly", default="target/release/dolly", help="dolly binary ('none' to skip)")
    ap.add_argument("--dolly-bf16", action="store_true",
                    help="dolly decodes with bf16 weight copies (`bench generate --bf16`); PyTorch stays float32")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    ap.add_argument("--torch-dtype", choices=["float32", "bfloat16"], default="float32",
                    help="HF generate weights dtype (training is always float32); bfloat16 shows what HF gets "
                         "from the dtype dolly's --dolly-bf16 uses")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate PyTorch and dolly this many times per mode and report per-metric medians "
                         "(the shared VM's speed drifts by tens of percent over minutes; alternating cancels it)")
    ap.add_argument("--worker", choices=["train", "generate"], help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        worker_main(args)
        return

    modes = ["train", "generate"] if args.mode == "all" else [args.mode]
    exe = resolve_dolly(args.dolly)
    if exe is None and args.dolly not in ("", "none"):
        print(f"note: dolly binary not found at {args.dolly!r}; showing the PyTorch side only", file=sys.stderr)

    runs = {}
    round_ratios = []
    for mode in modes:
        for rnd in range(max(1, args.rounds)):
            print(f"[bench] pytorch {mode} (round {rnd + 1}) ...", file=sys.stderr, flush=True)
            t = run_torch(mode, args)
            runs.setdefault(("torch", mode), []).append(t)
            print(f"[bench] pytorch {mode}: {json.dumps(t)}", file=sys.stderr, flush=True)
            if exe:
                print(f"[bench] dolly {mode} (round {rnd + 1}) ...", file=sys.stderr, flush=True)
                d = run_dolly(mode, exe, args)
                runs.setdefault(("dolly", mode), []).append(d)
                print(f"[bench] dolly {mode}: {json.dumps(d)}", file=sys.stderr, flush=True)
                key = "median_step_s" if mode == "train" else "tokens_per_s"
                round_ratios.append((mode, rnd + 1, ratio(d.get(key), t.get(key))))
    results = {k: combine(v) for k, v in runs.items()}

    # -------- table
    rows = []
    if "train" in modes:
        rows.append(("train median step (s)", "train", "median_step_s", ".3f", "time"))
        rows.append(("train peak RSS (MB)", "train", "peak_rss_mb", ".0f", "mem"))
    if "generate" in modes:
        rows.append(("generate tokens/s", "generate", "tokens_per_s", ".2f", "rate"))
        rows.append(("generate TTFT (s)", "generate", "ttft_s", ".3f", "time"))
        rows.append(("generate peak RSS (MB)", "generate", "peak_rss_mb", ".0f", "mem"))
    print(f"\nthreads={args.threads}  train: batch {args.batch_size} x seq {args.seq_len}, {args.warmup} warmup + "
          f"{args.steps} timed steps  generate: prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"median of {args.runs}")
    print(f"{'metric':<26}{'pytorch':>12}{'dolly':>12}{'dolly/pytorch':>15}")
    summary = {"threads": args.threads}
    for label, mode, key, spec, _kind in rows:
        t = results.get(("torch", mode), {}).get(key)
        d = results.get(("dolly", mode), {}).get(key) if exe else None
        r = ratio(d, t)
        print(f"{label:<26}{fmt(t, spec):>12}{fmt(d, spec):>12}{fmt(r, '.3f'):>15}")
        summary[f"{mode}.{key}.pytorch"] = t
        summary[f"{mode}.{key}.dolly"] = d
        summary[f"{mode}.{key}.ratio"] = r
    for (side, mode), res in results.items():
        if "error" in res:
            print(f"{side} {mode}: {res['error']}")
            summary[f"{mode}.error.{side}"] = res["error"]
    if args.rounds > 1:
        for mode, rnd, r in round_ratios:
            print(f"round {rnd} {mode}: dolly/pytorch {fmt(r, '.3f')}")
        summary["round_ratios"] = [[m, n, r] for m, n, r in round_ratios]
    summary["rounds"] = args.rounds
    tr = results.get(("torch", modes[0]), {})
    summary["torch"] = tr.get("torch")
    summary["transformers"] = tr.get("transformers")
    summary["dolly"] = exe
    summary["torch_generate_dtype"] = args.torch_dtype
    summary["dolly_generate_dtype"] = "bfloat16" if args.dolly_bf16 else "float32"
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
