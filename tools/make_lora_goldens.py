#!/usr/bin/env python3
"""Write the LoRA golden fixture crates/neox/tests/fixtures/lora-tiny/ with PEFT + transformers.

Developer tool only (CI never runs Python). Run from the repository root with the pinned environment of
tools/requirements.txt (which includes peft):

    python tools/make_lora_goldens.py            # writes lora-tiny/
    python tools/make_lora_goldens.py --check    # regenerate into a temp dir and compare with the committed one

A tiny random GPT-NeoX with the Dolly vocabulary (50280 rows) whose weights are rounded to bf16 and saved as
bf16; every golden is computed in float32 on those bf16 values, single-threaded and seeded, so two runs give
the same tensors. Two adapters are written by PEFT's own `save_pretrained`: `adapter/` (LoRA r=4) and
`adapter-rslora/` (rsLoRA r=2); both also train rows 50277-50279 of `embed_in` and `embed_out` through PEFT's
`trainable_token_indices` (see docs/adapter-format.md for why). See crates/neox/tests/fixtures/README.md
for what each tensor holds.
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # PEFT looks the base config up; never ask the network

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
import make_goldens as mg  # noqa: E402  (asserts the torch/transformers/safetensors/numpy/tokenizers pins)

PINNED_PEFT = "0.21.2"


def check_peft_version():
    import peft

    if peft.__version__ != PINNED_PEFT:
        sys.exit(f"version mismatch: peft {peft.__version__}, pinned {PINNED_PEFT}; install tools/requirements.txt")


check_peft_version()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Trainer  # noqa: E402

FIXTURE = "lora-tiny"
VOCAB = 50280  # Dolly: the 20B tokenizer's 50277 ids + 3 special tokens
SPECIAL = [50277, 50278, 50279]  # "### End", "### Instruction:", "### Response:"
HIDDEN, LAYERS, HEADS, INTER = 16, 2, 2, 64
ROTARY = 0.5
SEED = 4321
T = 12
PAD_RIGHT = 3  # right padding on row 1
N_IGNORE = 4  # first positions of each row with label -100
PAD_ID = 0
MIN_GRAD = 1e-5
N_COLS = 512  # logits are stored for this many vocabulary columns (see README: size)
TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
ALPHA = 8
INIT_STD = 0.05  # B ~ N(0, 0.05^2); trained rows = base rows + N(0, 0.05^2)
ADAPTERS = {
    # dir: (r, use_rslora, seed, golden prefix)
    "adapter": (4, False, SEED + 11, ""),
    "adapter-rslora": (2, True, SEED + 20, "rslora."),
}

LR, BETAS, EPS, WD, CLIP, STEPS = 1e-3, (0.9, 0.999), 1e-8, 0.1, 1.0, 5


def make_config():
    return GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTER,
        rope_parameters={"rope_type": "default", "rope_theta": 10000, "partial_rotary_factor": ROTARY},
        max_position_embeddings=64,
        use_parallel_residual=True,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        attn_implementation="eager",
    )


def write_base(d):
    """Random init (make_goldens' large init), rounded to bf16, saved as bf16 with a 2023 Pythia config.json."""
    torch.manual_seed(SEED)
    cfg = make_config()
    model = GPTNeoXForCausalLM(cfg)
    mg.reinit(model)
    model = model.to(torch.bfloat16)
    model.save_pretrained(d, safe_serialization=True)
    os.remove(os.path.join(d, "generation_config.json"))
    legacy = mg.legacy_config_json(cfg)
    legacy["torch_dtype"] = "bfloat16"
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(legacy, f, indent=2, sort_keys=True)
        f.write("\n")
    with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "embed_out.weight" in keys and "lm_head.weight" not in keys, keys
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in keys)
    return {n: p.detach().float() for n, p in model.named_parameters()}


def load_base(dtype=torch.float32):
    """The fixture base as every golden sees it: bf16 values held in `dtype`. Loaded by the relative path
    FIXTURE (cwd = fixture root), which PEFT records as base_model_name_or_path."""
    m = GPTNeoXForCausalLM.from_pretrained(FIXTURE, attn_implementation="eager", dtype=dtype)
    m.eval()
    return m


def make_batch():
    g = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(2, SPECIAL[0], (2, T), generator=g)
    # special tokens in inputs and labels: row 0 at 5, 8, 11; row 1 at 4, 7 (labels) and 1 (input only: its
    # label is ignored, so that row is trained through embed_in but not as a target)
    ids[0, 5], ids[0, 8], ids[0, 11] = SPECIAL
    ids[1, 4], ids[1, 7], ids[1, 1] = SPECIAL[1], SPECIAL[2], SPECIAL[0]
    mask = torch.ones_like(ids)
    mask[1, T - PAD_RIGHT:] = 0
    ids[1, T - PAD_RIGHT:] = PAD_ID
    labels = ids.clone()
    labels[:, :N_IGNORE] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def logit_columns(batch):
    """Sorted vocabulary columns whose logits are stored: the special rows, every id of the batch, and seeded
    random ids up to N_COLS."""
    cols = set(SPECIAL) | set(batch["input_ids"].flatten().tolist())
    g = torch.Generator().manual_seed(SEED + 2)
    for c in torch.randperm(VOCAB, generator=g).tolist():
        if len(cols) >= N_COLS:
            break
        cols.add(c)
    return torch.tensor(sorted(cols), dtype=torch.int64)


def loss_sum_and_count(logits, labels):
    """Sum of the per-token cross entropies (shift by one, -100 ignored), in float32, and the target count."""
    v = logits.shape[-1]
    s = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), labels[:, 1:].reshape(-1), ignore_index=-100,
                        reduction="sum")
    return s, int((labels[:, 1:] != -100).sum())


def saved_key(param_name):
    """In-memory PEFT parameter name -> key in adapter_model.safetensors (the adapter name is dropped)."""
    return param_name.replace(".default.", ".").removesuffix(".default")


def lora_config(r, use_rslora, inference_mode=False):
    return LoraConfig(
        r=r,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=TARGETS,
        use_rslora=use_rslora,
        task_type="CAUSAL_LM",
        # transformers 5 names the output module `lm_head` (saved as embed_out.weight in model.safetensors);
        # PEFT refuses the name `embed_out` ("Target modules {'embed_out'} not found").
        trainable_token_indices={"embed_in": SPECIAL, "lm_head": SPECIAL},
        inference_mode=inference_mode,
    )


def write_adapter(name, r, use_rslora, seed, base_params, report):
    """PEFT-initialised adapter, B and the token rows then perturbed (seeded), saved by PEFT's save_pretrained."""
    torch.manual_seed(seed)  # PEFT's kaiming_uniform_ init of A draws from the global generator
    pm = get_peft_model(load_base(), lora_config(r, use_rslora))
    g = torch.Generator().manual_seed(seed + 1)
    scaling = ALPHA / math.sqrt(r) if use_rslora else ALPHA / r
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if not p.requires_grad:
                continue
            if ".lora_A." in n:
                bound = 1.0 / math.sqrt(p.shape[1])  # kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))
                assert p.abs().max() <= bound and p.abs().max() > 0.5 * bound, n
            elif ".lora_B." in n:
                assert torch.equal(p, torch.zeros_like(p)), n
                p.copy_(torch.randn(p.shape, generator=g) * INIT_STD)
            elif "trainable_tokens_delta" in n:
                # PEFT stores the rows' VALUES (initialised to the base rows), not differences from them
                base = base_params["lm_head.weight" if ".lm_head." in n else "gpt_neox.embed_in.weight"]
                assert torch.equal(p, base[SPECIAL]), n
                p.add_(torch.randn(p.shape, generator=g) * INIT_STD)
            else:
                raise AssertionError(f"unexpected trainable parameter {n}")
    for m in pm.modules():
        if hasattr(m, "scaling") and isinstance(m.scaling, dict) and "default" in m.scaling:
            assert m.scaling["default"] == scaling
    d = os.path.join(FIXTURE, name)
    pm.save_pretrained(d)
    sd = get_peft_model_state_dict(pm)
    trainable = {saved_key(n): p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    with safe_open(os.path.join(d, "adapter_model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(trainable) == set(sd), (sorted(f.keys()), sorted(trainable))
        for k in f.keys():
            assert f.get_slice(k).get_dtype() == "F32" and torch.equal(f.get_tensor(k), trainable[k]), k
    report[f"{name}.files"] = sorted(os.listdir(d))
    report[f"{name}.n_tensors"] = len(trainable)
    report[f"{name}.scaling"] = scaling
    return trainable


def load_adapter(name, dtype=torch.float32, trainable=True):
    """The adapter as PeftModel.from_pretrained restores it from the fixture files."""
    m = PeftModel.from_pretrained(load_base(dtype), os.path.join(FIXTURE, name), is_trainable=trainable)
    if dtype != torch.float32:
        m = m.to(dtype)
    return m


def trainable_params(model):
    return {saved_key(n): p for n, p in model.named_parameters() if p.requires_grad}


def forward_goldens(model, batch, cols, prefix, tensors, report):
    """Logits (stored columns + full-row logsumexp), HF mean loss, loss sum, and grad of the loss sum."""
    model.train()  # dropout is 0 everywhere: train and eval give the same numbers
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    logits = out.logits
    assert logits.dtype == torch.float32 and logits.shape == (2, T, VOCAB)
    s, n = loss_sum_and_count(logits, batch["labels"])
    hf_loss = float(out.loss.detach())
    assert abs(hf_loss - float(s.detach()) / n) <= 1e-6 * hf_loss, (hf_loss, float(s.detach()), n)
    s.backward()
    grads = {k: p.grad.detach().clone() for k, p in trainable_params(model).items()}
    for k, gr in grads.items():
        # every entry clearly non-zero: Adam turns a gradient near 0 into a step of up to lr whose sign is
        # rounding noise, which no other implementation could reproduce in the trajectory
        assert float(gr.abs().min()) > MIN_GRAD, f"grad of {k} has an entry below {MIN_GRAD}: {float(gr.abs().min())}"
    tensors[prefix + "logits"] = logits.detach()[..., cols]
    tensors[prefix + "logits_lse"] = torch.logsumexp(logits.detach(), dim=-1)
    tensors[prefix + "loss"] = out.loss.detach().reshape(())
    tensors[prefix + "loss_sum"] = s.detach().reshape(())
    for k, gr in grads.items():
        tensors[f"{prefix}grad.{k}"] = gr
    report[prefix + "loss"] = hf_loss
    report[prefix + "grad_norm_of_sum"] = float(torch.sqrt(sum((gr.double() ** 2).sum() for gr in grads.values())))
    return logits.detach(), n


def decay_groups(model):
    """HF Trainer's parameter groups: its own get_decay_parameter_names decides who gets weight decay."""
    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    dec = [p for n, p in named if n in decay]
    nodec = [p for n, p in named if n not in decay]
    return [{"params": dec, "weight_decay": WD}, {"params": nodec, "weight_decay": 0.0}], len(dec), len(nodec)


def trajectory(model, batch):
    """STEPS AdamW steps on the same batch (HF mean loss, clip 1.0): per-step loss and pre-clip norm, final params."""
    model.train()
    groups, n_dec, n_nodec = decay_groups(model)
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
    params = [p for g in groups for p in g["params"]]
    losses, norms = [], []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(params, CLIP).detach())
        opt.step()
        losses.append(loss.detach())
    final = {k: p.detach().clone() for k, p in trainable_params(model).items()}
    return torch.stack(losses), torch.stack(norms).float(), final, n_dec, n_nodec


def make_fixture(out_root, report):
    cwd = os.getcwd()
    os.chdir(out_root)
    try:
        return _make_fixture(report)
    finally:
        os.chdir(cwd)


def _make_fixture(report):
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if os.path.isdir(FIXTURE):
        shutil.rmtree(FIXTURE)
    os.makedirs(FIXTURE)
    rounded = write_base(FIXTURE)
    base = load_base()
    for n, p in base.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, rounded[n]), n
    base_params = {n: p.detach().clone() for n, p in base.named_parameters()}

    batch = make_batch()
    cols = logit_columns(batch)
    tensors = dict(batch)
    tensors["logits_cols"] = cols
    with torch.no_grad():
        base_logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    tensors["base_logits"] = base_logits[..., cols]
    tensors["base_logits_lse"] = torch.logsumexp(base_logits, dim=-1)

    for name, (r, rs, seed, prefix) in ADAPTERS.items():
        saved = write_adapter(name, r, rs, seed, base_params, report)
        model = load_adapter(name)
        for k, p in trainable_params(model).items():
            assert p.dtype == torch.float32 and torch.equal(p, saved[k]), k
        logits, n = forward_goldens(model, batch, cols, prefix, tensors, report)
        tensors["n_targets"] = torch.tensor(n, dtype=torch.int64)
        mask = batch["attention_mask"].bool()
        report[prefix + "adapter_vs_base_logits_maxdiff"] = float((logits - base_logits)[mask].abs().max())
        with torch.no_grad(), model.disable_adapter():
            off = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.equal(off, base_logits), "disable_adapter() must give the base logits"

    # merge_and_unload (float32 base holding bf16 values: W + s*B@A and the token rows merged in float32)
    merged = load_adapter("adapter", trainable=False).merge_and_unload()
    assert type(merged) is GPTNeoXForCausalLM
    with torch.no_grad():
        ml = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    tensors["merged.logits"] = ml[..., cols]
    tensors["merged.logits_lse"] = torch.logsumexp(ml, dim=-1)
    with torch.no_grad():
        ul = load_adapter("adapter", trainable=False)(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    report["merged_vs_unmerged_logits_maxdiff"] = float((ml - ul).abs().max())
    rows = load_file(os.path.join(FIXTURE, "adapter", "adapter_model.safetensors"))
    # merging writes the stored row values into the matrices (index_copy), it adds nothing to them
    assert torch.equal(merged.gpt_neox.embed_in.weight[SPECIAL],
                       rows["base_model.model.gpt_neox.embed_in.token_adapter.trainable_tokens_delta"])
    assert torch.equal(merged.lm_head.weight[SPECIAL], rows["base_model.model.lm_head.token_adapter.trainable_tokens_delta"])

    # 5-step trajectory of the main adapter
    losses, norms, final, n_dec, n_nodec = trajectory(load_adapter("adapter"), batch)
    assert n_nodec == 0, "HF Trainer decays every LoRA/trainable-token tensor"
    report["traj.decay_group_tensors"] = n_dec
    report["traj.loss"] = [float(x) for x in losses]
    report["traj.grad_norm"] = [float(x) for x in norms]
    tensors["traj.loss"] = losses
    tensors["traj.grad_norm"] = norms
    for k, p in final.items():
        tensors[f"traj.final.{k}"] = p

    for k, v in tensors.items():
        assert v.dtype in (torch.int64, torch.float32), (k, v.dtype)
    meta = {
        "script": "tools/make_lora_goldens.py",
        "torch": mg.PINNED["torch"],
        "transformers": mg.PINNED["transformers"],
        "safetensors": mg.PINNED["safetensors"],
        "peft": PINNED_PEFT,
        "names": "grad./traj.final./rslora.grad. suffixes are the keys of adapter*/adapter_model.safetensors",
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(FIXTURE, "golden.safetensors"),
              metadata=meta)
    tolerance_selfcheck(report)
    sizes = {}
    for dirpath, _, files in os.walk(FIXTURE):
        for f in files:
            p = os.path.join(dirpath, f)
            sizes[os.path.relpath(p, FIXTURE)] = os.path.getsize(p)
    report["sizes_bytes"] = dict(sorted(sizes.items()))
    report["total_bytes"] = sum(sizes.values())
    return report


def within_tol(a, b):
    """Elements violating |a-b| <= 1e-4 + 1e-4|b| (b = golden)."""
    a, b = a.double(), b.double()
    return (a - b).abs() > 1e-4 + 1e-4 * b.abs()


def tolerance_selfcheck(report):
    """Recompute everything in float64 (a stand-in for another implementation) and check the README tolerance."""
    gold = load_file(os.path.join(FIXTURE, "golden.safetensors"))
    batch = {k: gold[k] for k in ("input_ids", "attention_mask", "labels")}
    cols, mask = gold["logits_cols"], gold["attention_mask"].bool()

    def check(name, a, b):
        bad = within_tol(a, b)
        assert not bad.any(), (name, int(bad.sum()), float((a.double() - b.double()).abs().max()))
        frac = float(((a.double() - b.double()).abs() / (1e-4 + 1e-4 * b.double().abs())).max())
        if os.environ.get("LORA_GOLDENS_VERBOSE"):
            print(f"f64 check {name}: {frac:.3g} of tolerance", file=sys.stderr)
        worst[0] = max(worst[0], frac)

    worst = [0.0]
    base = load_base(torch.float64)
    with torch.no_grad():
        lg = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    check("base_logits", lg[..., cols][mask], gold["base_logits"][mask])
    check("base_logits_lse", torch.logsumexp(lg, -1)[mask], gold["base_logits_lse"][mask])
    for name, (_, _, _, prefix) in ADAPTERS.items():
        m = load_adapter(name, torch.float64)
        out = m(**batch)
        check(prefix + "logits", out.logits[..., cols][mask], gold[prefix + "logits"][mask])
        check(prefix + "logits_lse", torch.logsumexp(out.logits, -1)[mask], gold[prefix + "logits_lse"][mask])
        check(prefix + "loss", out.loss, gold[prefix + "loss"])
        s, n = loss_sum_and_count(out.logits.double(), batch["labels"])
        assert n == int(gold["n_targets"])
        check(prefix + "loss_sum", s, gold[prefix + "loss_sum"])
        s.backward()
        for k, p in trainable_params(m).items():
            assert p.dtype == torch.float64, k
            check(prefix + "grad." + k, p.grad, gold[f"{prefix}grad.{k}"])
    merged = load_adapter("adapter", torch.float64, trainable=False).merge_and_unload()
    with torch.no_grad():
        ml = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    check("merged.logits", ml[..., cols][mask], gold["merged.logits"][mask])
    losses, norms, final, _, _ = trajectory(load_adapter("adapter", torch.float64), batch)
    check("traj.loss", losses, gold["traj.loss"])
    check("traj.grad_norm", norms, gold["traj.grad_norm"])
    for k, p in final.items():
        check("traj.final." + k, p, gold["traj.final." + k])
    report["f64_worst_fraction_of_tolerance"] = worst[0]
    # a margin for implementations that round differently from torch's float32 (seeds chosen for it)
    assert worst[0] < 0.25, worst[0]


def same_file(a, b):
    if a.endswith("adapter_config.json"):
        # compare as JSON (target_modules is a set written as a list)
        if not os.path.exists(b):
            return False
        ja, jb = json.load(open(a)), json.load(open(b))
        ja["target_modules"], jb["target_modules"] = sorted(ja["target_modules"]), sorted(jb["target_modules"])
        return ja == jb
    return mg.same_file(a, b)


def main():
    # adapter_config.json lists target_modules from a Python set: fix the string hash seed so the order (and
    # therefore the bytes) are the same on every run.
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=mg.FIXTURES, help="fixture root (default: crates/neox/tests/fixtures)")
    ap.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare")
    ap.add_argument("--report", action="store_true", help="print the full report as JSON")
    args = ap.parse_args()

    out = tempfile.mkdtemp() if args.check else os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    report = make_fixture(out, {"name": FIXTURE})
    if args.report:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(f"{FIXTURE}: loss={report['loss']:.6f} rslora.loss={report['rslora.loss']:.6f} "
              f"traj.loss={['%.6f' % x for x in report['traj.loss']]} total={report['total_bytes']} bytes "
              f"f64 worst={report['f64_worst_fraction_of_tolerance']:.3g} of tolerance")
    if args.check:
        same = True
        ref_root = os.path.join(os.path.abspath(args.out), FIXTURE)
        new_root = os.path.join(out, FIXTURE)
        for dirpath, _, files in os.walk(new_root):
            for f in sorted(files):
                p = os.path.join(dirpath, f)
                rel = os.path.relpath(p, new_root)
                if not same_file(p, os.path.join(ref_root, rel)):
                    same = False
                    print(f"DIFFERS: {FIXTURE}/{rel}")
        shutil.rmtree(out)
        print("check: identical" if same else "check: FAILED")
        sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
