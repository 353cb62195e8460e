#!/usr/bin/env python3
"""Check that PEFT loads an adapter written by dolly and reproduces dolly's logits.

Developer tool only (CI never runs Python); pinned environment of tools/requirements.txt (with peft).

    python tools/check_adapter_peft.py DIR [--dtype float32|bfloat16] [--merged]

DIR holds what dolly wrote:
    DIR/base/                 a Hugging Face model directory (config.json + safetensors), the adapter's base
    DIR/adapter/              adapter_config.json + adapter_model.safetensors
    DIR/batch.safetensors     input_ids [B,T] (i64), attention_mask [B,T] (i64)
    DIR/logits.safetensors    logits [B,T,V] (f32): dolly's logits for that batch with the adapter

The script loads the base with transformers (float32 by default: a bf16 base is then held exactly), applies the
adapter with `peft.PeftModel.from_pretrained`, checks that every tensor of adapter_model.safetensors landed in the
model bit for bit and that no adapter parameter of the model was left at its initial value, runs the batch and
compares the logits at positions whose attention_mask is 1. It prints the max abs difference and exits 1 if any
element violates |dolly - peft| <= 1e-4 + 1e-4 * |peft| (2 on a load problem). `--merged` also compares the
logits of `merge_and_unload()`.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_goldens as mg  # noqa: E402  (asserts the torch/transformers/safetensors pins)
import make_lora_goldens as lg  # noqa: E402  (asserts the peft pin)

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import GPTNeoXForCausalLM  # noqa: E402

ADAPTER_NAME = "default"


def model_key(file_key, model_keys):
    """adapter_model.safetensors key -> the loaded model's state-dict key (PEFT re-inserts the adapter name)."""
    candidates = [
        file_key.replace(".lora_A.", f".lora_A.{ADAPTER_NAME}.").replace(".lora_B.", f".lora_B.{ADAPTER_NAME}."),
        f"{file_key}.{ADAPTER_NAME}",
        file_key,
    ]
    for c in candidates:
        if c in model_keys:
            return c
    return None


def check_loaded(model, adapter_file):
    """Every saved tensor is in the model bitwise; every adapter parameter of the model came from the file."""
    saved = load_file(adapter_file)
    state = model.state_dict()
    problems, used = [], set()
    for k, v in saved.items():
        mk = model_key(k, state)
        if mk is None:
            problems.append(f"{k}: no such parameter in the PEFT model (ignored by PEFT)")
            continue
        used.add(mk)
        got = state[mk]
        if tuple(got.shape) != tuple(v.shape):
            problems.append(f"{k}: shape {tuple(v.shape)} in the file, {tuple(got.shape)} in the model")
        elif not torch.equal(got, v.to(got.dtype)):
            problems.append(f"{k}: value in the model differs from the file")
        elif got.dtype != v.dtype and not torch.equal(got.to(v.dtype), v):
            problems.append(f"{k}: {v.dtype} in the file does not survive the model's {got.dtype}")
    adapter_params = [n for n, _ in model.named_parameters() if f".{ADAPTER_NAME}." in n or n.endswith(f".{ADAPTER_NAME}")]
    missing = [n for n in adapter_params if n not in used]
    problems += [f"{n}: adapter parameter of the model not in the file (left at its initial value)" for n in missing]
    return saved, problems


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="base weights dtype")
    ap.add_argument("--merged", action="store_true", help="also compare merge_and_unload() logits")
    args = ap.parse_args()
    torch.set_num_threads(min(4, os.cpu_count() or 1))

    base_dir, adapter_dir = os.path.join(args.dir, "base"), os.path.join(args.dir, "adapter")
    dtype = getattr(torch, args.dtype)
    base = GPTNeoXForCausalLM.from_pretrained(base_dir, attn_implementation="eager", dtype=dtype)
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    summary = {k: cfg.get(k) for k in ("peft_type", "r", "lora_alpha", "use_rslora", "lora_dropout", "target_modules",
                                       "trainable_token_indices", "modules_to_save", "base_model_name_or_path")}
    print("adapter_config:", json.dumps(summary))
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    saved, problems = check_loaded(model, os.path.join(adapter_dir, "adapter_model.safetensors"))
    print(f"adapter tensors in the file: {len(saved)}; load problems: {len(problems)}")
    for p in problems:
        print("  LOAD:", p)

    batch = load_file(os.path.join(args.dir, "batch.safetensors"))
    ids, mask = batch["input_ids"].long(), batch["attention_mask"].long()
    ours = load_file(os.path.join(args.dir, "logits.safetensors"))["logits"].double()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits.double()
    rc = 2 if problems else 0
    for name, r in [("adapter", ref)] + ([("merged", None)] if args.merged else []):
        if name == "merged":
            with torch.no_grad():
                r = model.merge_and_unload()(input_ids=ids, attention_mask=mask).logits.double()
        if tuple(ours.shape) != tuple(r.shape):
            print(f"{name}: dolly logits shape {tuple(ours.shape)}, PEFT logits shape {tuple(r.shape)}")
            rc = max(rc, 1)
            continue
        m = mask.bool()
        diff = (ours - r).abs()[m]
        bad = diff > 1e-4 + 1e-4 * r.abs()[m]
        worst = int(diff.argmax())
        print(f"{name}: positions {int(m.sum())} x vocab {r.shape[-1]}: max abs diff {float(diff.max()):.3e} "
              f"(where peft has {float(r[m].reshape(-1)[worst]):.6f}); "
              f"violations of 1e-4 + 1e-4|x|: {int(bad.sum())}")
        if bad.any():
            rc = max(rc, 1)
    print("OK" if rc == 0 else "FAILED")
    sys.exit(rc)


if __name__ == "__main__":
    main()
