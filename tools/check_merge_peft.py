#!/usr/bin/env python3
"""Compare `dolly merge` with PEFT's merge_and_unload, tensor by tensor.

Developer tool only (CI never runs Python); pinned environment of tools/requirements.txt (with peft).

    dolly merge BASE ADAPTER --output MERGED [--dtype ...]
    python tools/check_merge_peft.py BASE ADAPTER MERGED [--base-dtype float32|bfloat16|float16]

The script loads BASE with transformers in --base-dtype (default: the dtype of MERGED/model.safetensors), resizes
it to MERGED's vocabulary if they differ (only shrinking, i.e. keeping the first rows, as Dolly's resize of
Pythia's 50304 rows to 50280 does; growing is refused because transformers' mean resizing samples new rows),
applies ADAPTER with `peft.PeftModel.from_pretrained`, merges with `merge_and_unload()` and casts the merged
state dict to MERGED's dtype. Then for every tensor of MERGED/model.safetensors (names must match the merged
PEFT model's, with transformers 5's `lm_head.weight` spelled `embed_out.weight` as on disk; shapes must match) it
prints the max abs difference and:
  * float32: the max abs difference relative to the tensor's largest |value| (pass: <= 1e-6; the two merges sum
    B @ A in different orders, so bitwise equality is not expected);
  * bfloat16 / float16: how many elements differ and by how many units in the last place (the spacing at PEFT's
    value or at the base value, whichever is larger) at most (pass: <= 1 ulp; an element differs where W + dW lies within the f32 rounding of the two B @ A
    sums from a rounding tie, and, with --base-dtype float32 against a bf16 merge of an f32 base that dolly held
    in bf16, wherever rounding the base first moved it across a tie: see docs/adapter-format.md, "Merge").
Exits 1 if a tensor fails, 2 on a name/shape mismatch. The 0 of "0 elements differ" means bitwise equal.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_goldens as mg  # noqa: E402,F401  (asserts the torch/transformers/safetensors pins)
import make_lora_goldens as lg  # noqa: E402,F401  (asserts the peft pin)

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import GPTNeoXForCausalLM  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def ulps(a, b, w):
    """|a - b| in units in the last place of b's dtype at the larger of |b| and |w| (w: the base value the merge
    added to; where W + dW nearly cancels, the spacing at the tiny result would count an f32 rounding of the
    operands as thousands of ulps)."""
    info = torch.finfo(b.dtype)
    mag = torch.maximum(b.float().abs(), w.float().abs()).clamp(min=info.smallest_normal)
    spacing = torch.exp2(torch.floor(torch.log2(mag))) * info.eps
    return ((a.double() - b.double()).abs() / spacing.double()).round().long()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("adapter")
    ap.add_argument("merged")
    ap.add_argument("--base-dtype", choices=sorted(DTYPES), help="dtype to load BASE in [default: MERGED's]")
    args = ap.parse_args()
    torch.set_num_threads(min(4, os.cpu_count() or 1))

    path = os.path.join(args.merged, "model.safetensors")
    with safe_open(path, "pt") as f:
        ours = {k: f.get_tensor(k) for k in f.keys()}
    out_dtype = {t.dtype for t in ours.values()}
    if len(out_dtype) != 1:
        sys.exit(f"{path}: mixed dtypes {out_dtype}")
    out_dtype = out_dtype.pop()
    base_dtype = DTYPES[args.base_dtype] if args.base_dtype else out_dtype
    with open(os.path.join(args.merged, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]

    base = GPTNeoXForCausalLM.from_pretrained(args.base, attn_implementation="eager", dtype=base_dtype)
    rows = base.get_input_embeddings().weight.shape[0]
    if rows != vocab:
        if rows < vocab:
            sys.exit(f"the base has {rows} rows, MERGED {vocab}: growing is not reproduced here")
        base.resize_token_embeddings(vocab, mean_resizing=False)
    before = {("embed_out.weight" if k == "lm_head.weight" else k): v.detach().clone().to(out_dtype)
              for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, args.adapter).merge_and_unload()
    ref = {("embed_out.weight" if k == "lm_head.weight" else k): v.to(out_dtype)
           for k, v in model.state_dict().items()}
    print(f"base {args.base} ({base_dtype}, {rows} rows) + {args.adapter}, merged by PEFT, cast to {out_dtype}; "
          f"dolly: {path} ({len(ours)} tensors, vocab {vocab})")

    if set(ours) != set(ref):
        print("names differ: only in dolly's:", sorted(set(ours) - set(ref)), "only in PEFT's:",
              sorted(set(ref) - set(ours)))
        sys.exit(2)
    rc = 0
    worst_rel, worst_ulps, differing = 0.0, 0, 0
    for k in sorted(ours):
        a, b = ours[k], ref[k]
        if a.shape != b.shape:
            print(f"{k}: shape {tuple(a.shape)} in dolly's, {tuple(b.shape)} in PEFT's")
            sys.exit(2)
        diff = float((a.double() - b.double()).abs().max())
        if out_dtype == torch.float32:
            scale = float(b.double().abs().max()) or 1.0
            rel = diff / scale
            worst_rel = max(worst_rel, rel)
            ok = rel <= 1e-6
            print(f"{'ok  ' if ok else 'FAIL'} {k}: max abs diff {diff:.3e}, relative to max|x| {rel:.3e}")
        else:
            u = ulps(a, b, before[k])
            n = int((a != b).sum())
            worst_ulps, differing = max(worst_ulps, int(u.max())), differing + n
            ok = int(u.max()) <= 1
            print(f"{'ok  ' if ok else 'FAIL'} {k}: max abs diff {diff:.3e}, {n} of {u.numel()} elements differ, "
                  f"max {int(u.max())} ulp")
        rc = rc if ok else 1
    if out_dtype == torch.float32:
        print(f"worst relative difference {worst_rel:.3e} (limit 1e-6)")
    else:
        print(f"{differing} elements differ in all, by at most {worst_ulps} ulp")
    print("OK" if rc == 0 else "FAILED")
    sys.exit(rc)


if __name__ == "__main__":
    main()
