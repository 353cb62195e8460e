#!/usr/bin/env python3
"""Check a `dolly train` output directory with Hugging Face transformers (issue 4, "Final model ... HF layout").

Developer tool only (CI never runs Python). From the repository root, with the pinned tools/requirements.txt:

    ../venv/bin/python tools/check_export.py OUT_DIR [--instruction TEXT] [--tol 1e-3]

Does:
- AutoTokenizer.from_pretrained(OUT_DIR): the three Dolly special tokens exist with ids `### End` 50277,
  `### Instruction:` 50278, `### Response:\\n` 50279 and are special (never split), pad is `<|endoftext|>` (id 0),
  50280 tokens in all; a Dolly generation prompt (spec section 2) encodes to the same ids as the plain
  `tokenizers` library on OUT_DIR/tokenizer.json and ends with 50279.
- AutoModelForCausalLM.from_pretrained(OUT_DIR) in float32 (bf16 files are widened), eager attention:
  config.vocab_size 50280, embed rows 50280; logits of the prompt's last position.
- Ours: `cargo run --release -p train --example dump_logits -- OUT_DIR IDS` (neox::Model::load, forward_logits,
  float32), and compares: max |diff| (must be <= --tol), same argmax, same top-5.
Prints one JSON line with the numbers; exit status 1 if any check fails.
"""

import argparse
import json
import os
import subprocess
import sys

INTRO = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
         "request.")
SPECIALS = {"### End": 50277, "### Instruction:": 50278, "### Response:\n": 50279}
VOCAB = 50280
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def generation_prompt(instruction):
    return f"{INTRO}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--instruction", default="Explain to me the difference between nuclear fission and fusion.")
    ap.add_argument("--tol", type=float, default=1e-3, help="max |logit diff| allowed (float32 compute both sides)")
    ap.add_argument("--ours", default=None, help="a built dump_logits binary instead of `cargo run`")
    a = ap.parse_args()

    import tokenizers
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    failures = []

    def check(ok, what):
        if not ok:
            failures.append(what)
            print(f"FAIL: {what}", file=sys.stderr)

    # ---- tokenizer
    tok = AutoTokenizer.from_pretrained(a.out_dir)
    for s, want in SPECIALS.items():
        got = tok.convert_tokens_to_ids(s)
        check(got == want, f"special token {s!r}: id {got}, expected {want}")
        check(s in tok.all_special_tokens, f"{s!r} is not a special token")
        check(tok.encode(f"a {s} b", add_special_tokens=False).count(want) == 1, f"{s!r} is split by the tokenizer")
    check(tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 0,
          f"pad token {tok.pad_token!r} (id {tok.pad_token_id}), expected '<|endoftext|>' (0)")
    check(len(tok) == VOCAB, f"tokenizer has {len(tok)} tokens, expected {VOCAB}")
    prompt = generation_prompt(a.instruction)
    ids = tok(prompt)["input_ids"]
    raw = tokenizers.Tokenizer.from_file(os.path.join(a.out_dir, "tokenizer.json")).encode(prompt).ids
    check(ids == raw, f"AutoTokenizer ids differ from the tokenizers library: {ids} vs {raw}")
    check(ids[-1] == SPECIALS["### Response:\n"], f"prompt does not end with 50279: {ids[-8:]}")

    # ---- model (HF)
    model = AutoModelForCausalLM.from_pretrained(a.out_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with open(os.path.join(a.out_dir, "config.json"), encoding="utf-8") as f:
        saved_cfg = json.load(f)
    check(model.config.vocab_size == VOCAB, f"config.vocab_size {model.config.vocab_size}, expected {VOCAB}")
    check(model.get_input_embeddings().weight.shape[0] == VOCAB, "embed_in rows != 50280")
    check(model.get_output_embeddings().weight.shape[0] == VOCAB, "embed_out rows != 50280")
    with torch.no_grad():
        hf = model(input_ids=torch.tensor([ids])).logits[0, -1].double()

    # ---- ours
    cmd = ([a.ours] if a.ours else
           ["cargo", "run", "--quiet", "--release", "-p", "train", "--example", "dump_logits", "--"])
    cmd += [a.out_dir, ",".join(map(str, ids))]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"dump_logits failed ({res.returncode}):\n{res.stderr}")
    ours_json = json.loads(res.stdout.strip().splitlines()[-1])
    ours = torch.tensor(ours_json["logits"], dtype=torch.float64)
    check(ours.shape == hf.shape, f"logit shapes differ: ours {tuple(ours.shape)}, HF {tuple(hf.shape)}")
    diff = (ours - hf).abs()
    max_diff = float(diff.max())
    top_hf, top_ours = hf.topk(5).indices.tolist(), ours.topk(5).indices.tolist()
    check(max_diff <= a.tol, f"max |logit diff| {max_diff:.3e} > {a.tol:.1e}")
    check(top_hf[0] == top_ours[0], f"argmax differs: HF {top_hf[0]}, ours {top_ours[0]}")
    check(top_hf == top_ours, f"top-5 differs: HF {top_hf}, ours {top_ours}")

    print(json.dumps({
        "out_dir": a.out_dir,
        "torch_dtype_in_config": saved_cfg.get("torch_dtype", saved_cfg.get("dtype")),
        "prompt_tokens": len(ids),
        "max_abs_diff": max_diff,
        "mean_abs_diff": float(diff.mean()),
        "max_abs_logit": float(hf.abs().max()),
        "argmax": top_hf[0],
        "top5_equal": top_hf == top_ours,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
        "ok": not failures,
    }))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
