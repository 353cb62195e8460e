#!/usr/bin/env python3
"""PyTorch reference for dolly's CPU benchmarks, run side by side with the dolly binary.

Developer tool only (CI never runs Python). CPU, SDPA attention, a random-init Pythia-shaped GPT-NeoX
(`--preset 70m`: vocab 50304, hidden 512, 6 layers, 8 heads, intermediate 2048; `--preset 410m`: hidden 1024,
24 layers, 16 heads, intermediate 4096; rotary 0.25, parallel residual).

    python tools/bench_torch.py                       # train + generate, PyTorch + target/release/dolly if present
    python tools/bench_torch.py --mode train --steps 3 --dolly none
    python tools/bench_torch.py --mode train --dtype autocast
    python tools/bench_torch.py --mode lora --preset 410m

train:    batch 4 x seq 256 random ids, labels = ids, AdamW lr 1e-5; one step = forward + backward +
          clip_grad_norm_(1.0) + optimizer.step + zero_grad; `--warmup` steps untimed, then `--steps` timed;
          reports median_step_s. `--dtype fp32` (default), `autocast` (fp32 weights and optimizer,
          torch.autocast("cpu", bfloat16) around forward + loss), `bf16` (model.to(bfloat16): weights, grads and
          AdamW state in bf16). dolly gets `--bf16` (bf16 operands, f32 accumulation and master weights) for both
          bf16 modes.
lora:     the same step with PEFT: LoRA r=16, alpha 32, dropout `--lora-dropout`, target "all-linear" (the four
          Linear layers of every block) on a bf16 base (model.to(bfloat16); PEFT keeps the adapter in f32), plus
          PEFT trainable_token_indices rows 50277-50279 of embed_in and lm_head (`--no-token-rows` to drop them);
          AdamW lr 1e-4 and clipping on the trainable tensors only. dolly gets DOLLY_LORA_FLAGS.
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

_COMMON = dict(vocab_size=50304, rotary_pct=0.25, max_position_embeddings=2048, use_parallel_residual=True)
PRESETS = {
    "70m": dict(_COMMON, hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048),
    "410m": dict(_COMMON, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
PRESET = PRESETS["70m"]  # replaced by --preset in main()
TOKEN_ROWS = [50277, 50278, 50279]  # Dolly's special tokens: the rows a dolly LoRA also trains

# dolly's LoRA flags for `bench train` (issue 14). Placeholder until the binary has them: a dolly build without
# them answers "unexpected argument" and the table shows PyTorch alone. Keep them equal to the PyTorch side.
# `dolly bench train --lora-r 16 --bf16`: alpha 2r, dropout 0.05, all-linear, Dolly's three token rows, bf16 base
# (the same work as the PEFT side's defaults; alpha and dropout do not change the step's cost)
DOLLY_LORA_FLAGS = ["--lora-r", "16", "--bf16"]


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


def lora_model(torch, model, args):
    """PEFT LoRA on a bf16 base: the bench's `--mode lora` model and its trainable tensors."""
    from peft import LoraConfig, get_peft_model

    model = model.to(torch.bfloat16)
    rows = {"embed_in": TOKEN_ROWS, "lm_head": TOKEN_ROWS} if args.token_rows else None
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=args.lora_dropout, target_modules="all-linear",
                     task_type="CAUSAL_LM", trainable_token_indices=rows)
    model = get_peft_model(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params)  # PEFT's autocast_adapter_dtype
    return model, params


def worker_train(args):
    import contextlib

    torch, model = build_model(args.seed)
    extra = {}
    if args.worker == "lora":
        model, params = lora_model(torch, model, args)
        lr = 1e-4
        extra = {"trainable_params": sum(p.numel() for p in params), "lora_r": 16, "lora_alpha": 32,
                 "lora_dropout": args.lora_dropout, "token_rows": args.token_rows, "base_dtype": "bfloat16"}
    else:
        if args.dtype == "bf16":
            model = model.to(torch.bfloat16)
        params, lr = list(model.parameters()), 1e-5
        extra = {"dtype": args.dtype}
    autocast = args.worker == "train" and args.dtype == "autocast"
    model.train()
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, PRESET["vocab_size"], (args.batch_size, args.seq_len), generator=g)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        losses.append(float(loss))
        if i >= args.warmup:
            times.append(dt)
    tokens = args.batch_size * args.seq_len
    med = statistics.median(times)
    return {
        "mode": args.worker,
        "preset": args.preset,
        **extra,
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
    res = worker_generate(args) if args.worker == "generate" else worker_train(args)
    import transformers

    res.update(threads=torch.get_num_threads(), torch=torch.__version__, transformers=transformers.__version__)
    if args.worker == "lora":
        import peft

        res["peft"] = peft.__version__
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
           "--torch-dtype", args.torch_dtype, "--preset", args.preset, "--dtype", args.dtype,
           "--lora-dropout", str(args.lora_dropout)] + ([] if args.token_rows else ["--no-token-rows"])
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
    preset = f"pythia-{args.preset}"
    if mode in ("train", "lora"):
        sub = ["bench", "train", "--preset", preset, "--batch-size", str(args.batch_size),
               "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--json"]
        if mode == "train" and args.dtype in ("autocast", "bf16"):
            sub.append("--bf16")
        if mode == "lora":
            sub += DOLLY_LORA_FLAGS
        parity = ["--warmup", str(args.warmup)]
    else:
        sub = ["bench", "generate", "--preset", preset, "--prompt-len", str(args.prompt_len),
               "--new-tokens", str(args.new_tokens), "--json"] + (["--bf16"] if args.dolly_bf16 else [])
        parity = ["--runs", str(args.runs)]
    # Same warmup / run count as the PyTorch side; retried without them if this dolly build lacks the flags.
    cmd = [exe, "--threads", str(args.threads)] + sub + parity
    rc, out, err, rss, wall = run_child(cmd, args.timeout)
    if rc == 2 and "unexpected argument" in err and "--warmup" in err:
        cmd = cmd[: len(cmd) - len(parity)]
        rc, out, err, rss, wall = run_child(cmd, args.timeout)
    if rc == 2 and "unexpected argument" in err:
        return {"error": f"this dolly binary lacks a flag of: {' '.join(sub)} ({err.strip()[-300:]})",
                "cmd": " ".join(cmd)}
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
    ap.add_argument("--mode", choices=["train", "generate", "lora", "all"], default="all",
                    help="all = train + generate")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="70m")
    ap.add_argument("--dtype", choices=["fp32", "autocast", "bf16"], default="fp32", help="train mode precision")
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--no-token-rows", dest="token_rows", action="store_false",
                    help="lora mode: do not train the special token rows")
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
    ap.add_argument("--worker", choices=["train", "generate", "lora"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    global PRESET
    PRESET = PRESETS[args.preset]

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
                key = "tokens_per_s" if mode == "generate" else "median_step_s"
                round_ratios.append((mode, rnd + 1, ratio(d.get(key), t.get(key))))
    results = {k: combine(v) for k, v in runs.items()}

    # -------- table
    rows = []
    for m in ("train", "lora"):
        if m in modes:
            rows.append((f"{m} median step (s)", m, "median_step_s", ".3f", "time"))
            rows.append((f"{m} peak RSS (MB)", m, "peak_rss_mb", ".0f", "mem"))
    if "generate" in modes:
        rows.append(("generate tokens/s", "generate", "tokens_per_s", ".2f", "rate"))
        rows.append(("generate TTFT (s)", "generate", "ttft_s", ".3f", "time"))
        rows.append(("generate peak RSS (MB)", "generate", "peak_rss_mb", ".0f", "mem"))
    print(f"\npreset {args.preset}  train dtype {args.dtype}  threads={args.threads}  train: batch {args.batch_size} x seq {args.seq_len}, {args.warmup} warmup + "
          f"{args.steps} timed steps  generate: prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"median of {args.runs}")
    print(f"{'metric':<26}{'pytorch':>12}{'dolly':>12}{'dolly/pytorch':>15}")
    summary = {"threads": args.threads, "preset": args.preset, "train_dtype": args.dtype}
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
