#!/usr/bin/env python3
"""Compare an output dir's TensorBoard events with its metrics.jsonl, read by TensorBoard's own EventAccumulator.

Developer tool only (CI never runs it; the Rust test crates/train/tests/tensorboard_events.rs checks the format with
an independent reader). Needs a venv outside the repo with the pinned TensorBoard:

    python3 -m venv ../venv-tb && ../venv-tb/bin/pip install tensorboard==2.21.0
    ../venv-tb/bin/python tools/check_tensorboard.py OUT

Every numeric (non-null) value of every metrics.jsonl row must appear exactly once in OUT/runs/train, at the row's
step, under the tag the trainer gives it (train rows: train/<key>, lr as train/learning_rate; eval rows:
eval/<key without eval_>, no epoch), equal as float32; and there must be no other scalar. Exits 1 on a mismatch.
"""

import json
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def expected(rows):
    """(tag, step) -> value, from the jsonl rows, with the trainer's tag rule."""
    out = Counter()
    want = {}
    for r in rows:
        is_eval = any(k.startswith("eval_") for k in r)
        for k, v in r.items():
            if k == "step" or (is_eval and k == "epoch"):
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            tag = "eval/" + k[5:] if k.startswith("eval_") else "train/learning_rate" if k == "lr" else "train/" + k
            want[(tag, r["step"])] = float(v)
            out[(tag, r["step"])] += 1
    dup = [k for k, n in out.items() if n > 1]
    if dup:
        sys.exit(f"metrics.jsonl has a tag twice at one step: {dup[:5]}")
    return want


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: check_tensorboard.py OUT_DIR")
    out = Path(sys.argv[1])
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    want = expected(rows)
    run = out / "runs" / "train"
    files = sorted(p.name for p in run.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    got = Counter()
    bad = []
    tags = acc.Tags()["scalars"]
    for tag in tags:
        for ev in acc.Scalars(tag):
            key = (tag, ev.step)
            got[key] += 1
            if key not in want:
                bad.append(f"extra scalar {tag} at step {ev.step}")
            elif ev.value != np.float32(want[key]) and not (math.isnan(ev.value) and math.isnan(want[key])):
                bad.append(f"{tag} at step {ev.step}: events {ev.value!r}, jsonl {want[key]!r}")
    bad += [f"{t} at step {s} written {n} times" for (t, s), n in got.items() if n > 1]
    bad += [f"{t} at step {s} missing from the events" for (t, s) in want if (t, s) not in got]
    print(f"{out}: {len(rows)} jsonl rows, {len(want)} scalars expected; event files {files}")
    print(f"tags: {sorted(tags)}")
    print(f"scalars read back by EventAccumulator: {sum(got.values())}, mismatches: {len(bad)}")
    for b in bad[:20]:
        print("  " + b)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
