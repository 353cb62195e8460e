#!/usr/bin/env python3
"""Experiments behind docs/adapter-format.md: how PEFT saves and restores trained token rows of GPT-NeoX.

Developer tool only (CI never runs Python); pinned environment of tools/requirements.txt (with peft). Writes
into a temporary directory and prints one line per finding (`--json` for a JSON object):

    python tools/peft_token_rows_probe.py

Model: the lora-tiny shape (vocab 50280 or 50304, hidden 16, 2 layers), random bf16 weights. For each mechanism
(`trainable_token_indices` and `modules_to_save`) it records the module names PEFT accepts, the saved keys,
dtypes and file size, whether `PeftModel.from_pretrained` restores the logits bitwise (float32 and bf16 base),
what `save_embedding_layers="auto"` does after `resize_token_embeddings(50304 -> 50280)` (Dolly's case), and
which embedding rows one AdamW step with weight decay changes.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_goldens as mg  # noqa: E402,F401  (version pins)
import make_lora_goldens as lg  # noqa: E402  (peft pin, model shape)

import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import GPTNeoXForCausalLM  # noqa: E402

ROWS = lg.SPECIAL
TT = {"embed_in": ROWS, "lm_head": ROWS}
MTS = ["embed_in", "lm_head"]
FINDINGS = {}


def note(key, value):
    FINDINGS[key] = value
    print(f"{key}: {json.dumps(value, default=str)}", flush=True)


def write_base(d, vocab):
    torch.manual_seed(0)
    cfg = lg.make_config()
    cfg.vocab_size = vocab
    m = GPTNeoXForCausalLM(cfg)
    mg.reinit(m)
    m.to(torch.bfloat16).save_pretrained(d)


def base(d, dtype, resize=None):
    m = GPTNeoXForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=dtype)
    if resize:
        m.resize_token_embeddings(resize)
    return m


def peft(m, **kw):
    return get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=lg.TARGETS, task_type="CAUSAL_LM", **kw))


def perturb(pm):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)


def saved(d):
    with safe_open(os.path.join(d, "adapter_model.safetensors"), "pt") as f:
        keys = {k: [f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()] for k in sorted(f.keys()) if "lora_" not in k}
    return keys, os.path.getsize(os.path.join(d, "adapter_model.safetensors"))


def save(pm, d, **kw):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pm.save_pretrained(d, **kw)
    return [str(x.message)[:120] for x in w if "embedding" in str(x.message)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp()
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        run()
    finally:
        os.chdir(cwd)
        shutil.rmtree(tmp)
    if args.json:
        print(json.dumps(FINDINGS, indent=2, default=str))


def run():
    write_base("b50280", 50280)  # already Dolly-sized
    write_base("b50304", 50304)  # Pythia-sized, resized to 50280 before training (Dolly's case)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(2, 50277, (2, 12), generator=g)
    ids[0, 3], ids[1, 5], ids[1, 8] = ROWS
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0

    def logits(m):
        m.eval()
        with torch.no_grad():
            return m(input_ids=ids, attention_mask=mask).logits

    # 1. which module names are accepted
    for name, kw in [("tt embed_out", dict(trainable_token_indices={"embed_in": ROWS, "embed_out": ROWS})),
                     ("tt list", dict(trainable_token_indices=ROWS)),
                     ("mts embed_out", dict(modules_to_save=["embed_in", "embed_out"]))]:
        try:
            pm = peft(base("b50280", torch.float32), **kw)
            tr = sorted(n for n, p in pm.named_parameters() if p.requires_grad and "lora_" not in n)
            note(f"names.{name}", {"trainable_non_lora": tr})
        except ValueError as e:
            note(f"names.{name}", {"error": str(e)[:160]})

    # 2. saved format, values vs differences, bitwise restore (base vocab already 50280)
    for dtype in (torch.float32, torch.bfloat16):
        dn = str(dtype).removeprefix("torch.")
        for mech, kw in [("tt", dict(trainable_token_indices=TT)), ("mts", dict(modules_to_save=MTS))]:
            b = base("b50280", dtype)
            rows_in = b.gpt_neox.embed_in.weight[ROWS].detach().clone()
            pm = peft(b, **kw)
            if mech == "tt":
                delta = pm.base_model.model.gpt_neox.embed_in.token_adapter.trainable_tokens_delta["default"]
                note(f"tt.{dn}.initial_delta_equals_base_rows", bool(torch.equal(delta, rows_in.to(delta.dtype))))
            dtypes = sorted({str(p.dtype) for n, p in pm.named_parameters() if p.requires_grad and "lora_" not in n})
            perturb(pm)
            ref = logits(pm)
            d = f"{mech}_{dn}"
            warn = save(pm, d)
            keys, size = saved(d)
            back = logits(PeftModel.from_pretrained(base("b50280", dtype), d))
            note(f"{mech}.{dn}", {"trainable_dtypes": dtypes, "saved_non_lora": keys, "bytes": size,
                                  "warnings": warn, "reload_bitwise": bool(torch.equal(back, ref))})

    # 3. vocabulary resized 50304 -> 50280 before training, save_embedding_layers="auto" (the default) and False
    for mech, kw in [("tt", dict(trainable_token_indices=TT)), ("mts", dict(modules_to_save=MTS))]:
        for sel in ("auto", False):
            pm = peft(base("b50304", torch.float32, resize=50280), **kw)
            perturb(pm)
            ref = logits(pm)
            d = f"resized_{mech}_{sel}"
            warn = save(pm, d, save_embedding_layers=sel)
            keys, size = saved(d)
            res = {"saved_non_lora": keys, "bytes": size, "warnings": warn}
            try:
                out = logits(PeftModel.from_pretrained(base("b50304", torch.float32), d))
                res["load_into_unresized_50304"] = {"logits_shape": list(out.shape),
                                                   "first_50280_bitwise": bool(torch.equal(out[..., :50280], ref))}
            except RuntimeError as e:
                res["load_into_unresized_50304"] = {"error": str(e).splitlines()[1].strip()[:160]}
            out = logits(PeftModel.from_pretrained(base("b50304", torch.float32, resize=50280), d))
            res["load_into_resized_50280_bitwise"] = bool(torch.equal(out, ref))
            note(f"resized.{mech}.save_embedding_layers={sel}", res)

    # 4. one AdamW step with weight decay 0.1 (HF Trainer's decay set holds every trainable tensor): rows changed
    for mech, kw in [("tt", dict(trainable_token_indices=TT)), ("mts", dict(modules_to_save=MTS))]:
        pm = peft(base("b50280", torch.float32), **kw)
        before_in = pm.get_input_embeddings().weight.detach().clone()
        before_out = pm.get_output_embeddings().weight.detach().clone()
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
        pm.train()
        pm(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        opt.step()
        changed_in = (pm.get_input_embeddings().weight.detach() != before_in).any(-1).nonzero().flatten().tolist()
        changed_out = (pm.get_output_embeddings().weight.detach() != before_out).any(-1).nonzero().flatten().tolist()
        note(f"adamw_wd_step.{mech}.rows_changed", {"embed_in": len(changed_in), "embed_out": len(changed_out),
                                                   "embed_in_first": changed_in[:5]})

    # 5. a key renamed to the transformers-4 module name `embed_out`
    d = "tt_float32"
    from safetensors.torch import load_file, save_file
    sd = load_file(os.path.join(d, "adapter_model.safetensors"))
    sd = {k.replace("base_model.model.lm_head.", "base_model.model.embed_out."): v for k, v in sd.items()}
    os.makedirs("renamed")
    shutil.copy(os.path.join(d, "adapter_config.json"), "renamed")
    save_file(sd, os.path.join("renamed", "adapter_model.safetensors"), metadata={"format": "pt"})
    try:
        PeftModel.from_pretrained(base("b50280", torch.float32), "renamed")
        note("load.embed_out_key", "loaded")
    except Exception as e:  # noqa: BLE001  (record whatever PEFT raises)
        note("load.embed_out_key", {"error": f"{type(e).__name__}: {e}"[:160]})


if __name__ == "__main__":
    main()
