#!/usr/bin/env python3
"""Projected time and tokens/s of one real epoch over dolly-15k, padded vs packed, dolly vs PyTorch, in one run.

Developer tool only (CI never runs it). Needs ../venv (torch, transformers, tokenizers) and a release build of
dolly (cargo build --release). A full epoch takes about an hour on the 2-core dev machine, so this measures the
step time as a function of the batch shape on both engines and projects the epoch from the epoch's real shapes.

    ../venv/bin/python tools/bench_epoch.py                  # everything, ~15 min on 2 cores
    ../venv/bin/python tools/bench_epoch.py --sanity-steps 0 # without the real `dolly train` runs

1. Shapes. `dolly data stats --json` gives the kept records, the real tokens and the padding waste of both modes
   (batch 8, rows of --pack-length). Per-batch shapes are computed here: every record is tokenized with the Python
   `tokenizers` library and Dolly's template (ids proven identical to dolly's, tools/tokenizer_fixture.py),
   records with length >= max length are dropped (Dolly's rule), the kept examples are shuffled with a fixed seed
   (Python's random, so not dolly's order; only the distribution matters) and cut into padded batches of 8, each
   right-padded to its longest example rounded up to a multiple of 8 (Dolly's collator): shape 8 x T_b.
   Packed: examples placed whole, in order, next-fit into rows of --pack-length tokens; --pack-batch rows a step.
2. Step time vs shape, both engines, same machine, same invocation, same threads: dolly
   `bench train --preset pythia-70m --batch-size B --seq-len T` (random tokens, full causal attention, no
   gradient checkpointing) and PyTorch fp32 SDPA, random-init pythia-70m-shaped GPTNeoXForCausalLM
   (tools/bench_torch.py's builder); one step = forward + backward + clip_grad_norm_(1.0) + AdamW.step +
   zero_grad, --warmup untimed then --steps timed steps, median. Grid: B=8 at each --grid T, and B=--pack-batch at
   T=--pack-length. The PyTorch padded points pass a right-padded attention_mask (rows shorter than T, as in a
   real Dolly batch, so SDPA runs with an explicit mask as it would in Dolly); the packed point passes the
   position_ids of the epoch's first packed rows and no attention_mask, from which transformers builds the
   per-document (block-diagonal causal) mask. dolly's attention is dense (T x T) whatever the mask, so its
   random-token points cost what its padded and packed batches cost.
3. Projection: epoch time = sum over the epoch's batches of step_time(T_b), interpolated linearly in T between
   grid points (extrapolated from the last two beyond the grid); a last partial batch is scaled by its rows.
   Packed: steps x step_time(pack-batch, pack-length). tokens/s = real (unpadded) tokens / epoch time.
4. Sanity (--sanity-steps N, 0 to skip): a real `dolly train` of N steps in each mode on a fresh
   `dolly init-model --preset pythia-70m`, no eval, no gradient checkpointing; reports OUT/metrics.jsonl's
   tokens_per_s (real tokens) next to the projection. Its first step includes warm-up; short runs see few batches.

Prints a table and, last, one JSON line. Timings are indicative: do not run while anything else is heavy.
"""

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

INTRO = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
         "request.")
END_KEY = "### End"
INSTRUCTION_KEY = "### Instruction:"
RESPONSE_KEY_NL = "### Response:\n"
SPECIALS = [END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL]


def log(msg):
    print(f"[bench_epoch {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def training_text(instruction, context, response):
    """crates/data/src/template.rs::training_text, byte-exact."""
    if context:
        return (f"{INTRO}\n\n{INSTRUCTION_KEY}\n{instruction}\n\nInput:\n{context}\n\n"
                f"{RESPONSE_KEY_NL}{response}\n\n{END_KEY}")
    return f"{INTRO}\n\n{INSTRUCTION_KEY}\n{instruction}\n\n{RESPONSE_KEY_NL}{response}\n\n{END_KEY}"


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


def run(cmd, timeout, what):
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{what} failed (rc={p.returncode}): {' '.join(cmd)}\n{(p.stderr or p.stdout)[-3000:]}")
    return p.stdout, wall


# --------------------------------------------------------------------------------------------------- 1. shapes
def epoch_shapes(args):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(args.tokenizer)
    tok.add_special_tokens(SPECIALS)
    texts = []
    with open(args.dataset, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                texts.append(training_text(r["instruction"], r["context"], r["response"]))
    lengths = [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=True)]
    kept = [n for n in lengths if n < args.max_length]  # Dolly drops length >= max length
    random.Random(args.seed).shuffle(kept)

    bs = args.batch_size
    padded = []  # (rows, T_b, real tokens)
    for i in range(0, len(kept), bs):
        chunk = kept[i:i + bs]
        t = -(-max(chunk) // 8) * 8
        padded.append((len(chunk), t, sum(chunk)))

    rows, docs = [], []  # next-fit packing, whole examples
    cur, cur_docs = 0, []
    for n in kept:
        if n > args.pack_length:
            raise SystemExit(f"example of {n} tokens does not fit a {args.pack_length}-token row")
        if cur + n > args.pack_length:
            rows.append(cur)
            docs.append(cur_docs)
            cur, cur_docs = 0, []
        cur += n
        cur_docs.append(n)
    if cur_docs:
        rows.append(cur)
        docs.append(cur_docs)
    return {
        "records": len(lengths),
        "kept": len(kept),
        "real_tokens": sum(kept),
        "padded_batches": padded,
        "padded_total_tokens": sum(r * t for r, t, _ in padded),
        "packed_rows": len(rows),
        "packed_steps": -(-len(rows) // args.pack_batch),
        "packed_total_tokens": len(rows) * args.pack_length,
        "first_packed_docs": docs[:args.pack_batch],
    }


# ------------------------------------------------------------------------------------------ 2. PyTorch worker
def worker(args):
    """Child process: one model, every requested shape in turn, one JSON line per shape on stdout."""
    import torch
    from bench_torch import build_model

    torch.set_num_threads(args.threads)
    torch_, model = build_model(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    for spec in json.loads(args.worker_shapes):
        b, t, kind = spec["b"], spec["t"], spec["kind"]
        ids = torch.randint(0, vocab, (b, t), generator=g)
        kw = dict(use_cache=False)
        labels = ids.clone()
        if kind == "padded":
            # Right padding as in a Dolly batch: row 0 is the longest (T), the others shorter.
            lens = [max(8, t - (i * t) // (2 * b)) for i in range(b)]
            mask = torch.zeros(b, t, dtype=torch.long)
            for i, n in enumerate(lens):
                mask[i, :n] = 1
            labels[mask == 0] = -100
            kw["attention_mask"] = mask
        else:
            # Packed rows: positions restart at each document; transformers derives the block-diagonal mask.
            pos = torch.zeros(b, t, dtype=torch.long)
            for i in range(b):
                row_docs = spec["docs"][i] if i < len(spec["docs"]) else [t]
                at = 0
                for n in row_docs + ([t - sum(row_docs)] if sum(row_docs) < t else []):
                    pos[i, at:at + n] = torch.arange(n)
                    at += n
            kw["position_ids"] = pos
        times = []
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=labels, **kw).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times.append(dt)
        print(json.dumps({"kind": kind, "b": b, "t": t, "median_step_s": statistics.median(times),
                          "step_times_s": times, "loss": float(loss)}), flush=True)
    import transformers
    print(json.dumps({"done": True, "torch": torch.__version__, "transformers": transformers.__version__,
                      "threads": torch.get_num_threads()}), flush=True)


def measure_torch(args, shapes):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker-shapes", json.dumps(shapes),
           "--threads", str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    out, wall = run(cmd, args.timeout, "pytorch worker")
    res, meta = {}, {}
    for line in out.splitlines():
        if line.startswith("{"):
            o = json.loads(line)
            if o.get("done"):
                meta = o
            else:
                res[(o["kind"], o["b"], o["t"])] = o
    meta["wall_s"] = wall
    return res, meta


def measure_dolly(args, shapes):
    res = {}
    for s in shapes:
        cmd = [args.dolly, "--threads", str(args.threads), "bench", "train", "--preset", "pythia-70m",
               "--batch-size", str(s["b"]), "--seq-len", str(s["t"]), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--json"]
        out, wall = run(cmd, args.timeout, "dolly bench train")
        o = last_json(out)
        o["wall_s"] = wall
        res[(s["kind"], s["b"], s["t"])] = o
        log(f"dolly {s['kind']} {s['b']}x{s['t']}: {o['median_step_s']:.3f} s/step")
    return res


# ------------------------------------------------------------------------------------------- 3. projection
def interp(points, t):
    """Piecewise-linear in T through sorted (T, seconds) points; linear extrapolation beyond the ends."""
    if len(points) == 1:
        return points[0][1] * t / points[0][0]
    for (t0, s0), (t1, s1) in zip(points, points[1:]):
        if t <= t1:
            break
    return s0 + (s1 - s0) * (t - t0) / (t1 - t0)


def project(shapes, grid_s, pack_step_s, args):
    pts = sorted(grid_s.items())
    padded = sum(interp(pts, t) * rows / args.batch_size for rows, t, _ in shapes["padded_batches"])
    packed = None if pack_step_s is None else shapes["packed_steps"] * pack_step_s
    return padded, packed


# ----------------------------------------------------------------------------------------------- 4. sanity
def sanity(args, tmp):
    model_dir = os.path.join(tmp, "model")
    run([args.dolly, "init-model", "--tokenizer", "none", "--preset", "pythia-70m", "--output", model_dir], args.timeout, "init-model")
    out = {}
    for mode in ("padded", "packed"):
        od = os.path.join(tmp, f"out-{mode}")
        cmd = [args.dolly, "train", "--threads", str(args.threads), "--input-model", model_dir,
               "--tokenizer", args.tokenizer, "--training-dataset", args.dataset, "--local-output-dir", od,
               "--max-steps", str(args.sanity_steps), "--test-size", "0", "--logging-steps", "1",
               "--save-steps", "100000", "--no-gradient-checkpointing", "--max-length", str(args.max_length),
               "--seed", str(args.seed)]
        if mode == "packed":
            cmd += ["--packing", "--pack-length", str(args.pack_length),
                    "--per-device-train-batch-size", str(args.pack_batch)]
        else:
            cmd += ["--per-device-train-batch-size", str(args.batch_size)]
        _, wall = run(cmd, args.timeout, f"dolly train ({mode})")
        rows = []
        with open(os.path.join(od, "metrics.jsonl")) as f:
            for line in f:
                o = json.loads(line)
                if "tokens_per_s" in o:
                    rows.append(o)
        after_first = [r["tokens_per_s"] for r in rows[1:]]
        last = rows[-1]
        out[mode] = {
            "steps": len(rows),
            "tokens_per_s_rows": [round(r["tokens_per_s"], 1) for r in rows],
            "median_tokens_per_s_after_step1": statistics.median(after_first) if after_first else None,
            "overall_tokens_per_s": last["tokens"] / last["elapsed_s"],
            "tokens": last["tokens"],
            "elapsed_s": last["elapsed_s"],
            "wall_s": wall,
        }
        log(f"sanity {mode}: {out[mode]}")
    return out


# -------------------------------------------------------------------------------------------------- main
def hms(s):
    return "-" if s is None else f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m{int(s % 60):02d}s"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dolly", default="target/release/dolly")
    ap.add_argument("--dataset", default="../shared/data/databricks-dolly-15k.jsonl")
    ap.add_argument("--tokenizer", default="../shared/data/20B_tokenizer.json")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8, help="padded batch (Dolly's per-device batch)")
    ap.add_argument("--pack-length", type=int, default=2048)
    ap.add_argument("--pack-batch", type=int, default=2, help="rows per packed step")
    ap.add_argument("--grid", default="128,256,512,1024,2048", help="T values for the B=batch-size points")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per point")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--no-torch-packed", action="store_true", help="skip the PyTorch packed point")
    ap.add_argument("--sanity-steps", type=int, default=8, help="real dolly train steps per mode (0 = skip)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    ap.add_argument("--worker-shapes", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_shapes:
        worker(args)
        return

    t_start = time.perf_counter()
    grid = sorted(int(x) for x in args.grid.split(","))

    log("dolly data stats ...")
    out, _ = run([args.dolly, "data", "stats", "--training-dataset", args.dataset, "--tokenizer", args.tokenizer,
                  "--max-length", str(args.max_length), "--batch-size", str(args.batch_size), "--pack-length",
                  str(args.pack_length), "--seed", str(args.seed), "--json"], args.timeout, "dolly data stats")
    stats = json.loads(out)
    log("tokenizing in Python ...")
    sh = epoch_shapes(args)
    if sh["kept"] != stats["kept"] or sh["real_tokens"] != stats["kept_tokens"]["total"]:
        raise SystemExit(f"Python shapes disagree with dolly data stats: kept {sh['kept']} vs {stats['kept']}, "
                         f"tokens {sh['real_tokens']} vs {stats['kept_tokens']['total']}")
    tb = [t for _, t, _ in sh["padded_batches"]]
    q = sorted(tb)
    tb_dist = {"batches": len(tb), "mean": statistics.mean(tb), "p50": q[len(q) // 2], "p90": q[int(len(q) * .9)],
               "p99": q[int(len(q) * .99)], "max": q[-1],
               "share_over_1024": sum(t > 1024 for t in tb) / len(tb)}
    py_padded_waste = 1 - sh["real_tokens"] / sh["padded_total_tokens"]
    py_packed_waste = 1 - sh["real_tokens"] / sh["packed_total_tokens"]
    log(f"epoch: {sh['kept']} examples, {sh['real_tokens']} real tokens; padded T_b {tb_dist}; "
        f"packed rows {sh['packed_rows']} -> {sh['packed_steps']} steps of {args.pack_batch}x{args.pack_length}")

    shapes = [{"kind": "padded", "b": args.batch_size, "t": t} for t in grid]
    pack_shape = {"kind": "packed", "b": args.pack_batch, "t": args.pack_length, "docs": sh["first_packed_docs"]}
    log("dolly step times ...")
    dres = measure_dolly(args, shapes + [pack_shape])
    tshapes = shapes + ([] if args.no_torch_packed else [pack_shape])
    log(f"pytorch step times ({len(tshapes)} shapes, one process) ...")
    tres, tmeta = measure_torch(args, tshapes)
    for k, v in sorted(tres.items()):
        log(f"pytorch {k[0]} {k[1]}x{k[2]}: {v['median_step_s']:.3f} s/step")

    def engine(res):
        grid_s = {t: res[("padded", args.batch_size, t)]["median_step_s"] for t in grid}
        pk = res.get(("packed", args.pack_batch, args.pack_length))
        return grid_s, (pk["median_step_s"] if pk else None)

    d_grid, d_pack = engine(dres)
    t_grid, t_pack = engine(tres)
    d_pad_s, d_pack_s = project(sh, d_grid, d_pack, args)
    t_pad_s, t_pack_s = project(sh, t_grid, t_pack, args)
    real = sh["real_tokens"]

    def tps(s):
        return None if s is None else real / s

    sanity_res = None
    if args.sanity_steps > 0:
        log(f"sanity: dolly train {args.sanity_steps} steps per mode ...")
        with tempfile.TemporaryDirectory(prefix="bench_epoch_") as tmp:
            sanity_res = sanity(args, tmp)

    waste = {"padded": stats["padding_waste"]["padded"]["waste"], "packed": stats["padding_waste"]["packed"]["waste"]}
    rows = [
        ("dolly", "padded", d_pad_s, waste["padded"], len(tb)),
        ("dolly", "packed", d_pack_s, waste["packed"], sh["packed_steps"]),
        ("pytorch", "padded", t_pad_s, waste["padded"], len(tb)),
        ("pytorch", "packed", t_pack_s, waste["packed"], sh["packed_steps"]),
    ]
    print()
    print(f"epoch: dolly-15k, {sh['kept']} kept examples, {real:,} real tokens; padded = batch {args.batch_size}, "
          f"pad to longest rounded to 8 (T_b mean {tb_dist['mean']:.0f}, p50 {tb_dist['p50']}, p90 {tb_dist['p90']}, "
          f"max {tb_dist['max']}); packed = {args.pack_batch} x {args.pack_length} rows; threads {args.threads}")
    print(f"{'engine':<9}{'mode':<8}{'steps':>7}{'epoch time':>13}{'real tok/s':>12}{'padding waste':>15}")
    for eng, mode, s, w, n in rows:
        print(f"{eng:<9}{mode:<8}{n:>7}{hms(s):>13}{(format(tps(s), '.1f') if s else '-'):>12}{w * 100:>14.1f}%")

    def r(a, b):
        return None if a is None or b is None else a / b

    ratios = {
        "dolly_padded_vs_pytorch_padded": r(t_pad_s, d_pad_s),
        "dolly_packed_vs_pytorch_padded": r(t_pad_s, d_pack_s),
        "dolly_packed_vs_dolly_padded": r(d_pad_s, d_pack_s),
        "dolly_packed_vs_pytorch_packed": r(t_pack_s, d_pack_s),
        "pytorch_packed_vs_pytorch_padded": r(t_pad_s, t_pack_s),
    }
    print("speed-ups (epoch time ratio, >1 = first is faster): "
          + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items() if v is not None))
    print("step time (s) at B=%d:  T     dolly   pytorch" % args.batch_size)
    for t in grid:
        print(f"{'':>22}{t:>5}{d_grid[t]:>9.2f}{t_grid[t]:>10.2f}")
    print(f"step time (s) packed {args.pack_batch}x{args.pack_length}: dolly {d_pack:.2f}, pytorch "
          f"{'-' if t_pack is None else format(t_pack, '.2f')}")
    if sanity_res:
        for mode in ("padded", "packed"):
            s = sanity_res[mode]
            proj = tps(d_pad_s if mode == "padded" else d_pack_s)
            print(f"sanity dolly train {mode}: {s['steps']} steps, median tokens/s after step 1 "
                  f"{s['median_tokens_per_s_after_step1']:.1f}, overall {s['overall_tokens_per_s']:.1f} "
                  f"(projected epoch {proj:.1f}); rows {s['tokens_per_s_rows']}")
    summary = {
        "threads": args.threads, "kept": sh["kept"], "real_tokens": real,
        "padding_waste": waste, "python_padding_waste": {"padded": py_padded_waste, "packed": py_packed_waste},
        "padded_steps": len(tb), "packed_steps": sh["packed_steps"], "pack_batch": args.pack_batch,
        "t_b": tb_dist,
        "epoch_s": {"dolly_padded": d_pad_s, "dolly_packed": d_pack_s, "pytorch_padded": t_pad_s,
                    "pytorch_packed": t_pack_s},
        "tokens_per_s": {"dolly_padded": tps(d_pad_s), "dolly_packed": tps(d_pack_s),
                         "pytorch_padded": tps(t_pad_s), "pytorch_packed": tps(t_pack_s)},
        "ratios": ratios,
        "step_s": {"dolly": {str(t): v for t, v in d_grid.items()}, "pytorch": {str(t): v for t, v in t_grid.items()},
                   "dolly_packed": d_pack, "pytorch_packed": t_pack},
        "dolly_peak_rss_mb": {f"{k[0]}_{k[1]}x{k[2]}": v.get("peak_rss_mb") for k, v in dres.items()},
        "sanity": sanity_res,
        "torch": tmeta.get("torch"), "transformers": tmeta.get("transformers"),
        "steps": args.steps, "warmup": args.warmup, "wall_s": time.perf_counter() - t_start,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
