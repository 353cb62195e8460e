#!/usr/bin/env python3
"""Write the GPT-NeoX golden fixtures under crates/neox/tests/fixtures/<name>/.

Developer tool only (CI never runs Python). Run from the repository root with the
pinned environment of tools/requirements.txt:

    python tools/make_goldens.py            # writes both fixtures
    python tools/make_goldens.py --check    # regenerate into a temp dir and compare with the committed ones

Everything is float32 on CPU, single-threaded, seeded: two runs produce identical bytes.
See crates/neox/tests/fixtures/README.md for what each file holds.
"""

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile

PINNED = {
    "torch": "2.15.0",
    "transformers": "5.24.0",
    "safetensors": "0.8.0",
    "numpy": "2.4.6",
    "tokenizers": "0.23.3",
}


def check_versions():
    import numpy
    import safetensors
    import tokenizers
    import torch
    import transformers

    found = {
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
        "tokenizers": tokenizers.__version__,
    }
    bad = {k: (found[k], v) for k, v in PINNED.items() if found[k] != v}
    if bad:
        sys.exit(f"version mismatch (found, pinned): {bad}; install tools/requirements.txt")
    return found


check_versions()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: E402
from transformers.trainer_pt_utils import get_parameter_names  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "crates", "neox", "tests", "fixtures")

VOCAB = 512
T = 12  # training sequence length
PAD_RIGHT = 3  # right padding on row 1 of the training batch
N_IGNORE = 4  # first positions of each row with label -100
P_SINGLE = 7  # single-prompt generation length
P_BATCH = 9  # batched generation width (row 0 has P_BATCH - 3 real tokens, left-padded)
LEFT_PAD = 3
NEW_TOKENS = 8
PAD_ID = 0
# The brief requires every greedy step to have a top1-top2 logit margin > 1e-3; we search seeds for a
# comfortably larger margin so that an engine within the fixture tolerance always picks the same token.
MARGIN_REQUIRED = 1e-3
MARGIN_WANTED = 2e-2

LR = 1e-3
BETAS = (0.9, 0.999)
EPS = 1e-8

MODELS = {
    # 2023 Pythia-style config.json (rotary_pct / rotary_emb_base), parallel residual.
    "tiny-parallel": dict(heads=4, rotary=0.5, parallel=True, legacy_config=True, seed=1234),
    # config.json exactly as the installed transformers writes it, sequential residual.
    "tiny-sequential": dict(heads=2, rotary=0.25, parallel=False, legacy_config=False, seed=5678),
}


def make_config(spec):
    return GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=spec["heads"],
        intermediate_size=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000, "partial_rotary_factor": spec["rotary"]},
        max_position_embeddings=64,
        use_parallel_residual=spec["parallel"],
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        # No eos/bos: otherwise generate's min_new_tokens processor would mask the eos logit and the
        # goldens would not be plain greedy decoding.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        attn_implementation="eager",
    )


def reinit(model):
    """Large random init so that every parameter (biases, LayerNorm affine) visibly matters."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                mod.weight.normal_(0.0, 0.2)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.normal_(0.0, 0.1)
            elif isinstance(mod, nn.LayerNorm):
                mod.weight.copy_(1.0 + 0.1 * torch.randn_like(mod.weight))
                mod.bias.normal_(0.0, 0.1)


def legacy_config_json(cfg):
    """The config.json form of the 2023 EleutherAI/pythia-* repositories."""
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "hidden_act": cfg.hidden_act,
        "hidden_size": cfg.hidden_size,
        "initializer_range": cfg.initializer_range,
        "intermediate_size": cfg.intermediate_size,
        "layer_norm_eps": cfg.layer_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "model_type": "gpt_neox",
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "rotary_emb_base": cfg.rope_parameters["rope_theta"],
        "rotary_pct": cfg.rope_parameters["partial_rotary_factor"],
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": PINNED["transformers"],
        "use_cache": True,
        "use_parallel_residual": cfg.use_parallel_residual,
        "vocab_size": cfg.vocab_size,
    }


def file_names(model, path):
    """Map HF parameter name -> tensor name in model.safetensors (checks values and that nothing else is there)."""
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        mapping = {}
        for n, p in model.named_parameters():
            if n in keys:
                fn = n
            elif n == "lm_head.weight" and "embed_out.weight" in keys:
                fn = "embed_out.weight"
            else:
                raise AssertionError(f"parameter {n} not found in {path}")
            t = f.get_tensor(fn)
            assert t.dtype == torch.float32 and torch.equal(t, p.detach()), fn
            mapping[n] = fn
    extra = keys - set(mapping.values())
    assert not extra, f"unexpected tensors in {path}: {extra}"
    return mapping


def top2_margins(step_logits):
    """step_logits: tuple (one per generated token) of [B, V] raw logits -> [steps, B] margins."""
    out = []
    for lg in step_logits:
        top = torch.topk(lg.float(), 2, dim=-1).values
        out.append(top[:, 0] - top[:, 1])
    return torch.stack(out)


def greedy(model, ids, mask):
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        eos_token_id=None,
        pad_token_id=PAD_ID,
        output_logits=True,
        return_dict_in_generate=True,
    )
    seq = out.sequences
    assert seq.shape == (ids.shape[0], ids.shape[1] + NEW_TOKENS), seq.shape
    # raw logits chosen by argmax (plain greedy, no processor changed the choice)
    chosen = torch.stack([lg.argmax(-1) for lg in out.logits], dim=1)
    assert torch.equal(chosen, seq[:, ids.shape[1]:])
    return seq, top2_margins(out.logits)


def manual_greedy(model, ids, mask):
    """Reference greedy without KV cache, positions counted from the first real token of each row."""
    seq, m = ids.clone(), mask.clone()
    for _ in range(NEW_TOKENS):
        pos = (m.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=seq, attention_mask=m, position_ids=pos, use_cache=False).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        m = torch.cat([m, torch.ones_like(nxt)], 1)
    return seq


def generation_goldens(model, seed, report):
    """Search prompt seeds until all greedy steps (single, batch, and the batch rows alone) have a clear margin."""
    best = None
    for attempt in range(200):
        g = torch.Generator().manual_seed(seed + 1000 + attempt)
        prompt = torch.randint(2, VOCAB, (1, P_SINGLE), generator=g)
        rows = torch.randint(2, VOCAB, (2, P_BATCH), generator=g)
        rows[0, :LEFT_PAD] = PAD_ID
        bmask = torch.ones_like(rows)
        bmask[0, :LEFT_PAD] = 0

        with torch.no_grad():
            single, m1 = greedy(model, prompt, torch.ones_like(prompt))
            batch, m2 = greedy(model, rows, bmask)
            alone0, m3 = greedy(model, rows[:1, LEFT_PAD:], torch.ones_like(rows[:1, LEFT_PAD:]))
            alone1, m4 = greedy(model, rows[1:], torch.ones_like(rows[1:]))
        margin = min(float(m.min()) for m in (m1, m2, m3, m4))
        if best is None or margin > best[0]:
            best = (margin, attempt, prompt, single, rows, bmask, batch, alone0, alone1)
        if margin >= MARGIN_WANTED:
            break
    margin, attempt, prompt, single, rows, bmask, batch, alone0, alone1 = best
    assert margin > MARGIN_REQUIRED, f"no prompt seed found with greedy margin > {MARGIN_REQUIRED} (best {margin})"

    with torch.no_grad():
        # 1. generate == our own cache-free greedy with positions from the first real token
        assert torch.equal(single, manual_greedy(model, prompt, torch.ones_like(prompt)))
        assert torch.equal(batch, manual_greedy(model, rows, bmask))
        # 2. batched left-padded rows == each row generated alone without padding
        row0_matches = torch.equal(batch[0, LEFT_PAD:], alone0[0])
        row1_matches = torch.equal(batch[1], alone1[0])
        assert row0_matches and row1_matches, (batch, alone0, alone1)
        # 3. generate's prefill uses position_ids = cumsum(mask) - 1 (pads -> 0), a plain forward uses 0..T-1.
        #    Rotary attention only sees position differences and pads are masked, so both agree up to rounding:
        #    record by how much (the fixture cannot tell the two conventions apart).
        real = rows[:1, LEFT_PAD:]
        lg_alone = model(input_ids=real, use_cache=False).logits[0, -1]
        lg_pad_from_first = model(
            input_ids=rows[:1], attention_mask=bmask[:1], position_ids=(bmask[:1].cumsum(-1) - 1).clamp(min=0),
            use_cache=False,
        ).logits[0, -1]
        lg_pad_arange = model(input_ids=rows[:1], attention_mask=bmask[:1], use_cache=False).logits[0, -1]
        report["gen_seed_attempt"] = attempt
        report["left_pad_maxdiff_positions_from_first_real"] = float((lg_pad_from_first - lg_alone).abs().max())
        report["left_pad_maxdiff_positions_counting_pads"] = float((lg_pad_arange - lg_alone).abs().max())
        report["gen_min_margin"] = margin
    return {
        "gen_prompt_single": prompt,
        "gen_single": single,
        "gen_prompt_batch": rows,
        "gen_mask_batch": bmask,
        "gen_batch": batch,
        "gen_min_margin": torch.tensor(margin, dtype=torch.float32),
    }


def decay_names(model):
    """Brief's rule: weights of Linear and Embedding decay; biases and LayerNorm parameters do not."""
    names = []
    for mname, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            names.append(f"{mname}.weight" if mname else "weight")
    # Cross-check with HF Trainer.get_decay_parameter_names (same patterns, without importing Trainer).
    forbidden = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    hf = get_parameter_names(model, [nn.LayerNorm], forbidden)
    assert sorted(hf) == sorted(names), (hf, names)
    return set(names)


def train_variant(base, batch, weight_decay=0.0, clip=None):
    model = copy.deepcopy(base)
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    norm = None
    if clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if weight_decay:
        dn = decay_names(model)
        groups = [
            {"params": [p for n, p in model.named_parameters() if n in dn], "weight_decay": weight_decay},
            {"params": [p for n, p in model.named_parameters() if n not in dn], "weight_decay": 0.0},
        ]
    else:
        groups = [{"params": list(model.parameters()), "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    opt.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return loss.detach(), norm, params


def make_fixture(name, spec, out_root):
    report = {"name": name}
    torch.manual_seed(spec["seed"])
    cfg = make_config(spec)
    model = GPTNeoXForCausalLM(cfg)
    reinit(model)
    model.eval()

    d = os.path.join(out_root, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    model.save_pretrained(d, safe_serialization=True)
    report["files_written_by_save_pretrained"] = sorted(os.listdir(d))
    with open(os.path.join(d, "config.json")) as f:
        report["config_as_written"] = json.load(f)
    if spec["legacy_config"]:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(legacy_config_json(cfg), f, indent=2, sort_keys=True)
            f.write("\n")
        # The 2023 Pythia repositories had no generation_config.json either.
        os.remove(os.path.join(d, "generation_config.json"))

    # Everything below uses the model reloaded from the fixture files, so goldens and files agree.
    ref = GPTNeoXForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32)
    ref.eval()
    assert ref.config.rope_parameters["partial_rotary_factor"] == spec["rotary"]
    assert ref.config.rope_parameters["rope_theta"] == 10000
    assert ref.config.use_parallel_residual == spec["parallel"]
    assert ref.config.num_attention_heads == spec["heads"]
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), ref.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    names = file_names(ref, os.path.join(d, "model.safetensors"))
    report["lm_head_param_name"] = "lm_head.weight" if "lm_head.weight" in names else "embed_out.weight"
    report["lm_head_file_name"] = names.get("lm_head.weight", names.get("embed_out.weight"))

    # ---- training batch -------------------------------------------------------------------------------------
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    input_ids = torch.randint(2, VOCAB, (2, T), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, T - PAD_RIGHT:] = 0
    input_ids[1, T - PAD_RIGHT:] = PAD_ID
    labels = input_ids.clone()
    labels[:, :N_IGNORE] = -100
    labels[attention_mask == 0] = -100
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    with torch.no_grad():
        logits = ref(input_ids=input_ids, attention_mask=attention_mask).logits
        loss_nograd = ref(**batch).loss
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(manual, loss_nograd, rtol=1e-6, atol=1e-6), (manual, loss_nograd)
    report["loss"] = float(loss_nograd)
    report["n_loss_tokens"] = int((labels[:, 1:] != -100).sum())

    # gradients
    gm = copy.deepcopy(ref)
    gm.train()
    loss = gm(**batch).loss
    loss.backward()
    assert torch.equal(loss.detach(), loss_nograd)
    grads = {n: p.grad.detach().clone() for n, p in gm.named_parameters()}
    allg = torch.cat([x.flatten() for x in grads.values()])
    nz = allg[allg != 0].abs()
    report["grad_total_norm"] = float(allg.norm())
    report["grad_exact_zeros"] = int((allg == 0).sum())
    report["grad_nonzero_min_abs"] = float(nz.min())
    report["grad_nonzero_below_1e-6"] = int((nz < 1e-6).sum())
    # The key bias on the non-rotary (pass-through) dims shifts every score of a query by the same amount, so
    # softmax cancels it: its gradient is analytically 0 and what torch stores there is rounding noise (~1e-9).
    # AdamW's first step turns that noise into updates of up to lr * |g| / (|g| + eps); see the fixtures README.
    hd = cfg.hidden_size // cfg.num_attention_heads
    rot = int(hd * spec["rotary"])
    kpass = [h * 3 * hd + hd + j for h in range(cfg.num_attention_heads) for j in range(rot, hd)]
    noise = max(
        float(grads[f"gpt_neox.layers.{i}.attention.query_key_value.bias"][kpass].abs().max())
        for i in range(cfg.num_hidden_layers)
    )
    assert noise < 1e-6, noise
    report["key_bias_passthrough_grad_noise_max"] = noise

    # optimizer variants, each from a fresh copy of the reloaded model
    l0, _, p_wd0 = train_variant(ref, batch)
    l1, _, p_wd01 = train_variant(ref, batch, weight_decay=0.1)
    l2, norm, p_clip = train_variant(ref, batch, clip=1.0)
    for lx in (l0, l1, l2):
        assert torch.equal(lx, loss_nograd)
    assert abs(float(norm) - report["grad_total_norm"]) <= 1e-5 * report["grad_total_norm"]
    report["clip_grad_norm"] = float(norm)

    tensors = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "logits": logits,
        "loss": loss_nograd.reshape(()),
        "clip_grad_norm": norm.detach().reshape(()).float(),
    }
    for n in grads:
        fn = names[n]
        tensors[f"grad.{fn}"] = grads[n]
        tensors[f"adamw_wd0.{fn}"] = p_wd0[n]
        tensors[f"adamw_wd01.{fn}"] = p_wd01[n]
        tensors[f"adamw_clip.{fn}"] = p_clip[n]

    # ---- greedy generation ----------------------------------------------------------------------------------
    tensors.update(generation_goldens(ref, spec["seed"], report))

    for k, v in tensors.items():
        assert v.dtype in (torch.int64, torch.float32), (k, v.dtype)
    meta = {
        "script": "tools/make_goldens.py",
        "torch": PINNED["torch"],
        "transformers": PINNED["transformers"],
        "safetensors": PINNED["safetensors"],
        "names": "grad./adamw_*. suffixes are the tensor names used in this directory's model.safetensors",
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(d, "golden.safetensors"), metadata=meta)
    tolerance_selfcheck(d, spec, report)
    report["sizes_bytes"] = {f: os.path.getsize(os.path.join(d, f)) for f in sorted(os.listdir(d))}
    return report


def within_tol(a, b):
    """Elements violating |a-b| <= 1e-4 + 1e-4|b| (b = golden)."""
    a, b = a.double(), b.double()
    return (a - b).abs() > 1e-4 + 1e-4 * b.abs()


def adam_step1(w, g, wd):
    """One AdamW step from zero state, written out (what another implementation would compute)."""
    m, v = (1 - BETAS[0]) * g, (1 - BETAS[1]) * g * g
    mh, vh = m / (1 - BETAS[0]), v / (1 - BETAS[1])
    return w * (1 - LR * wd) - LR * mh / (vh.sqrt() + EPS)


def tolerance_selfcheck(d, spec, report):
    """Recompute the fixture in float64 (a stand-in for another implementation) and check the README's tolerance:
    everything matches, except AdamW on the analytically-zero key-bias entries when fed its own gradients."""
    from safetensors.torch import load_file

    gold, w = load_file(os.path.join(d, "golden.safetensors")), load_file(os.path.join(d, "model.safetensors"))
    m = GPTNeoXForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float64)
    out = m(input_ids=gold["input_ids"], attention_mask=gold["attention_mask"], labels=gold["labels"])
    mask = gold["attention_mask"].bool()
    assert not within_tol(out.logits.detach()[mask], gold["logits"][mask]).any()
    assert not within_tol(out.loss.detach(), gold["loss"]).any()
    out.loss.backward()
    g64 = {("embed_out.weight" if n == "lm_head.weight" else n): p.grad for n, p in m.named_parameters()}
    assert set(g64) == set(w)
    for k in g64:
        assert not within_tol(g64[k], gold["grad." + k]).any(), k
    norm64 = torch.sqrt(sum((g * g).sum() for g in g64.values()))
    assert not within_tol(norm64, gold["clip_grad_norm"]).any()

    hd = 32 // spec["heads"]
    rot = int(hd * spec["rotary"])
    kpass = torch.zeros(3 * 32, dtype=torch.bool)
    for h in range(spec["heads"]):
        kpass[h * 3 * hd + hd + rot:h * 3 * hd + 2 * hd] = True
    decay = {k for k in w if k.endswith(".weight") and "layernorm" not in k and "layer_norm" not in k}
    worst_noise = 0.0
    for source in ("golden", "f64"):
        grads = {k: gold["grad." + k].double() for k in g64} if source == "golden" else g64
        gnorm = float(torch.sqrt(sum((g * g).sum() for g in grads.values())))
        for var in ("wd0", "wd01", "clip"):
            coef = min(1.0, 1.0 / (gnorm + 1e-6)) if var == "clip" else 1.0
            for k in g64:
                wd = 0.1 if (var == "wd01" and k in decay) else 0.0
                bad = within_tol(adam_step1(w[k].double(), grads[k] * coef, wd), gold[f"adamw_{var}.{k}"])
                if source == "golden" or not k.endswith("query_key_value.bias"):
                    assert not bad.any(), (source, var, k)
                else:
                    assert not (bad & ~kpass).any(), (source, var, k)
                    diff = (adam_step1(w[k].double(), grads[k] * coef, wd) - gold[f"adamw_{var}.{k}"].double()).abs()
                    worst_noise = max(worst_noise, float(diff[kpass].max()))
    report["adamw_kpass_noise_vs_f64"] = worst_noise


def same_file(a, b):
    """Byte equality, except safetensors (the header's metadata order is not stable): same tensors and metadata."""
    if not os.path.exists(b):
        return False
    if not a.endswith(".safetensors"):
        return open(a, "rb").read() == open(b, "rb").read()
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        if fa.metadata() != fb.metadata() or set(fa.keys()) != set(fb.keys()):
            return False
        return all(
            fa.get_tensor(k).dtype == fb.get_tensor(k).dtype and torch.equal(fa.get_tensor(k), fb.get_tensor(k))
            for k in fa.keys()
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=FIXTURES, help="fixture root (default: crates/neox/tests/fixtures)")
    ap.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare bytes")
    ap.add_argument("--report", action="store_true", help="print the per-fixture report as JSON")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out = tempfile.mkdtemp() if args.check else args.out
    os.makedirs(out, exist_ok=True)
    reports = [make_fixture(name, spec, out) for name, spec in MODELS.items()]
    if args.report:
        print(json.dumps(reports, indent=2, default=str))
    else:
        for r in reports:
            print(f"{r['name']}: loss={r['loss']:.6f} clip_norm={r['clip_grad_norm']:.4f} "
                  f"gen_min_margin={r['gen_min_margin']:.4g} sizes={r['sizes_bytes']}")
    if args.check:
        same = True
        for name in MODELS:
            for f in sorted(os.listdir(os.path.join(out, name))):
                if not same_file(os.path.join(out, name, f), os.path.join(args.out, name, f)):
                    same = False
                    print(f"DIFFERS: {name}/{f}")
        shutil.rmtree(out)
        print("check: identical" if same else "check: FAILED")
        sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
