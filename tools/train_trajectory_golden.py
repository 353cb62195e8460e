#!/usr/bin/env python3
"""Golden for the training-trajectory parity check (issue 4): a plain transformers/PyTorch loop.

Writes crates/train/tests/fixtures/trajectory.json, which crates/train/tests/trajectory.rs compares with
`train::train` (per-step loss within 1e-4 + 1e-4*|golden|). Developer tool only; CI never runs Python.
Run from the repository root with the pinned environment of tools/requirements.txt:

    ../venv/bin/python tools/train_trajectory_golden.py [--shared ../shared/data] [--out PATH]

What both sides do (keep trajectory.rs in step with this list):
- Model: GPT-NeoX, vocab 50280 (the Dolly tokenizer size), hidden 32, 2 layers, 4 heads, intermediate 128,
  rotary_pct 0.25 (base 10000), max positions 2048, parallel residual, LayerNorm eps 1e-5, untied embed_out,
  no dropout. Not stored anywhere: every parameter is a formula. For the k-th tensor (0-based) in the HF
  state-dict order of `neox::Layout` (embed_in; per layer input_layernorm.{weight,bias},
  post_attention_layernorm.{weight,bias}, attention.query_key_value.{weight,bias}, attention.dense.{weight,bias},
  mlp.dense_h_to_4h.{weight,bias}, mlp.dense_4h_to_h.{weight,bias}; final_layer_norm.{weight,bias}; embed_out),
  element j (row-major) is, computed in float64 and then rounded to float32,
      s = sin(0.7*j + 1.3*k)
      LayerNorm weight: 1 + 0.1*s;   every bias (LayerNorm and Linear): 0.1*s;   Linear/Embedding weight: 0.2*s.
  (`math.sin`, i.e. the C library's double sin, the same function Rust's f64::sin calls on Linux.)
- Data: the first 8 records (file order) of ../shared/data/databricks-dolly-15k.jsonl whose Dolly training text
  has fewer than 512 tokens (Dolly's drop rule: length >= max length is dropped). Their 1-based line numbers go
  into the fixture; the Rust test copies exactly those lines.
- Tokens: 20B_tokenizer.json + the three Dolly special tokens (`### End`, `### Instruction:`, `### Response:\\n`
  -> 50277..50279). Labels by construction, as crates/data does: prompt (up to and including `### Response:\\n`)
  -100; response + "\\n\\n" + `### End` supervised. Right padding with id 0 to the longest length rounded up to
  a multiple of 8; padding has attention mask 0 and label -100.
- One batch of all 8 records, the same batch at each of the 5 steps (the Rust loop sees 8 examples with batch
  size 8, i.e. one batch per epoch, 5 epochs; row order differs but the token-weighted mean does not depend on it).
- HF GPTNeoXForCausalLM, eager attention, float32, CPU; loss = HF's own (shift by one, mean cross-entropy over
  labels != -100); clip_grad_norm_(1.0) (the recorded grad_norm is the norm before clipping, as torch computes it;
  grad_norm_f64 is the same gradients' norm accumulated in float64, see the loop); torch AdamW(lr 1e-3,
  betas (0.9, 0.999), eps 1e-8, weight decay 0); transformers.get_linear_schedule_with_warmup(warmup 0, total 5),
  i.e. the lr of update s (0-based) is 1e-3*(5-s)/5. The recorded loss of step s+1 is computed with the parameters
  after s updates.
"""

import argparse
import hashlib
import json
import math
import os
import sys

PINNED = {"torch": "2.15.0", "transformers": "5.24.0", "tokenizers": "0.23.3"}

VOCAB, HIDDEN, LAYERS, HEADS, INTER, MAX_POS = 50280, 32, 2, 4, 128, 2048
STEPS, LR, BATCH, MAX_LENGTH, CLIP = 5, 1e-3, 8, 512, 1.0

INTRO = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
         "request.")
END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL = "### End", "### Instruction:", "### Response:\n"


def training_prompt(instruction, context):
    if context:
        return f"{INTRO}\n\n{INSTRUCTION_KEY}\n{instruction}\n\nInput:\n{context}\n\n{RESPONSE_KEY_NL}"
    return f"{INTRO}\n\n{INSTRUCTION_KEY}\n{instruction}\n\n{RESPONSE_KEY_NL}"


def training_target(response):
    return f"{response}\n\n{END_KEY}"


def layout_names():
    """HF state-dict names in neox::Layout order."""
    names = ["gpt_neox.embed_in.weight"]
    for i in range(LAYERS):
        p = f"gpt_neox.layers.{i}."
        for m in ["input_layernorm", "post_attention_layernorm", "attention.query_key_value", "attention.dense",
                  "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]:
            names += [f"{p}{m}.weight", f"{p}{m}.bias"]
    names += ["gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias", "embed_out.weight"]
    return names


def formula_values(name, k, numel):
    """float64 values of tensor k (see the module docstring)."""
    if name.endswith(".bias"):
        scale, shift = 0.1, 0.0
    elif name.endswith("layernorm.weight") or name.endswith("final_layer_norm.weight"):
        scale, shift = 0.1, 1.0
    else:
        scale, shift = 0.2, 0.0
    ck = 1.3 * k
    return [shift + scale * math.sin(0.7 * j + ck) for j in range(numel)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default="../shared/data")
    ap.add_argument("--out", default="crates/train/tests/fixtures/trajectory.json")
    a = ap.parse_args()

    import tokenizers
    import torch
    import transformers
    from tokenizers import Tokenizer
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, get_linear_schedule_with_warmup

    found = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
             "tokenizers": tokenizers.__version__}
    bad = {k: (found[k], v) for k, v in PINNED.items() if found[k] != v}
    if bad:
        sys.exit(f"version mismatch (found, pinned): {bad}; install tools/requirements.txt")
    torch.set_num_threads(1)
    torch.manual_seed(0)  # nothing below is random; set anyway

    # ---- data
    tok_path = os.path.join(a.shared, "20B_tokenizer.json")
    data_path = os.path.join(a.shared, "databricks-dolly-15k.jsonl")
    tok = Tokenizer.from_file(tok_path)
    tok.add_special_tokens([END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL])
    resp_id, end_id = tok.token_to_id(RESPONSE_KEY_NL), tok.token_to_id(END_KEY)
    assert (tok.token_to_id(END_KEY), tok.token_to_id(INSTRUCTION_KEY), resp_id) == (50277, 50278, 50279)
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB
    lines, examples, skipped = [], [], []
    with open(data_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            r = json.loads(line)
            prompt = tok.encode(training_prompt(r["instruction"], r["context"])).ids
            target = tok.encode(training_target(r["response"])).ids
            assert prompt[-1] == resp_id and target[-1] == end_id, lineno
            ids = prompt + target
            # By construction == what the original's token search would give on the whole text.
            assert tok.encode(training_prompt(r["instruction"], r["context"]) + training_target(r["response"])).ids \
                == ids, lineno
            if len(ids) >= MAX_LENGTH:
                skipped.append(lineno)
                continue
            lines.append(lineno)
            examples.append((ids, [-100] * len(prompt) + target))
            if len(examples) == BATCH:
                break
    longest = max(len(i) for i, _ in examples)
    seq_len = -(-longest // 8) * 8
    input_ids = torch.zeros((BATCH, seq_len), dtype=torch.long)
    labels = torch.full((BATCH, seq_len), -100, dtype=torch.long)
    mask = torch.zeros((BATCH, seq_len), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    real_tokens = int(mask.sum())
    # HF shifts labels by one: the first label of each row is never a target.
    targets = int((labels[:, 1:] != -100).sum())

    # ---- model
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTER,
        rope_parameters={"rope_type": "default", "rope_theta": 10000, "partial_rotary_factor": 0.25},
        max_position_embeddings=MAX_POS,
        use_parallel_residual=True,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    model = GPTNeoXForCausalLM(config).float()
    named = dict(model.named_parameters())
    if "lm_head.weight" in named:  # newer transformers name the output matrix `lm_head`
        named["embed_out.weight"] = named.pop("lm_head.weight")
    names = layout_names()
    assert sorted(named) == sorted(names), (sorted(set(named) ^ set(names)))
    param_sum = param_sq = 0.0
    with torch.no_grad():
        for k, name in enumerate(names):
            p = named[name]
            vals = torch.tensor(formula_values(name, k, p.numel()), dtype=torch.float64).to(torch.float32)
            p.copy_(vals.view(p.shape))
            param_sum += float(vals.double().sum())
            param_sq += float((vals.double() ** 2).sum())
    model.train()

    # ---- the loop
    params = [named[n] for n in names]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=STEPS)
    steps = []
    for step in range(1, STEPS + 1):
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=input_ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        # Exact norm of the same gradients (float64 accumulation): torch's float32 reduction inside
        # clip_grad_norm_ is off by up to ~5e-4 relative here (1.6M-element embed_out gradient), so the Rust test
        # checks its grad_norm against this one. The loop itself clips with torch's own norm, as a plain loop does.
        norm64 = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))
        norm = torch.nn.utils.clip_grad_norm_(params, CLIP)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        steps.append({"step": step, "loss": out.loss.item(), "grad_norm": float(norm), "grad_norm_f64": norm64,
                      "lr": lr})
        print(f"step {step}: loss {out.loss.item():.8f}  grad_norm {float(norm):.6f}  lr {lr:.3e}", file=sys.stderr)

    with open(tok_path, "rb") as f:
        tok_sha = hashlib.sha256(f.read()).hexdigest()
    result = {
        "source": "tools/train_trajectory_golden.py (plain transformers/PyTorch loop; see its docstring)",
        "versions": {**found, "python": sys.version.split()[0]},
        "model": {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
                  "num_attention_heads": HEADS, "intermediate_size": INTER, "rotary_pct": 0.25,
                  "max_position_embeddings": MAX_POS, "use_parallel_residual": True,
                  "formula": "s = sin(0.7*j + 1.3*k) in float64; LayerNorm weight 1+0.1s, biases 0.1s, "
                             "Linear/Embedding weights 0.2s; cast to float32",
                  "param_sum": param_sum, "param_sq_sum": param_sq},
        "data": {"file": "databricks-dolly-15k.jsonl", "lines": lines, "skipped_lines": skipped,
                 "lengths": [len(i) for i, _ in examples], "seq_len": seq_len, "real_tokens": real_tokens,
                 "target_tokens": targets, "max_length": MAX_LENGTH, "tokenizer_sha256": tok_sha},
        "train": {"steps": STEPS, "batch_size": BATCH, "lr": LR, "weight_decay": 0.0, "betas": [0.9, 0.999],
                  "eps": 1e-8, "max_grad_norm": CLIP, "schedule": "linear, warmup 0"},
        "steps": steps,
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
