#!/usr/bin/env python3
"""Write the `pytorch_model.bin` fixtures under crates/neox/tests/fixtures/pickle/<case>/.

Developer tool only (CI never runs Python). Run from the repository root in a venv OUTSIDE the repository with
the pinned versions below (the same torch/safetensors/numpy as tools/requirements.txt; transformers is not needed):

    python3.11 -m venv /path/venv && /path/venv/bin/pip install torch==2.15.0 safetensors==0.8.0 numpy==2.4.6
    /path/venv/bin/python tools/make_pickle_fixtures.py

The tensors come from crates/neox/tests/fixtures/tiny-parallel/model.safetensors, cut down to keep the files
small: the first 16 rows of `embed_in`/`embed_out`, layer 0 only, the final LayerNorm. config.json is
tiny-parallel's with `vocab_size` 16 and `num_hidden_layers` 1. crates/neox/tests/pickle_io.rs checks that dolly
loads every case to exactly these values (bf16/f16 cases: the values rounded as torch's `.to()` rounds them).

Cases:
  f32/          torch.save(OrderedDict) of float32 clones (one storage each), plus the buffers 2023 Pythia
                checkpoints carry (bool `attention.bias`, `masked_bias`, `rotary_emb.inv_freq`)
  bf16-views/   bfloat16; every tensor is a view into ONE flat storage at its own offset; `attention.dense.weight`
                is a transposed (non-contiguous) view; `embed_out.weight` shares `embed_in.weight`'s storage
                and offset (tied), so it must load as embed_in's values
  f16-sharded/  float16 in pytorch_model-0000{1,2}-of-00002.bin + pytorch_model.bin.index.json
  legacy/       torch.save(..., _use_new_zipfile_serialization=False): the pre-1.6 format, to be refused
  hostile/      a torch-style zip whose data.pkl holds an object whose __reduce__ is (os.system, ("echo pwned",)):
                must be refused naming the global `posix.system`, without running anything
Each torch.save'd case is checked here by torch.load(weights_only=True) against the source tensors.
"""

import collections
import io
import json
import os
import pickle
import shutil
import sys
import zipfile

PINNED = {"torch": "2.15.0", "safetensors": "0.8.0", "numpy": "2.4.6"}


def check_versions():
    import numpy
    import safetensors
    import torch

    found = {
        "torch": torch.__version__.split("+")[0],
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
    }
    bad = {k: (found[k], v) for k, v in PINNED.items() if found[k] != v}
    if bad:
        sys.exit(f"version mismatch (found, pinned): {bad}")


check_versions()

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

FIX = "crates/neox/tests/fixtures"
SRC = f"{FIX}/tiny-parallel"
OUT = f"{FIX}/pickle"
VOCAB, LAYERS = 16, 1


def source():
    full = load_file(f"{SRC}/model.safetensors")
    sd = collections.OrderedDict()
    for name in ["gpt_neox.embed_in.weight"]:
        sd[name] = full[name][:VOCAB].clone()
    for name in sorted(k for k in full if k.startswith("gpt_neox.layers.0.")):
        sd[name] = full[name].clone()
    for name in ["gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias"]:
        sd[name] = full[name].clone()
    sd["embed_out.weight"] = full["embed_out.weight"][:VOCAB].clone()
    for t in sd.values():
        assert t.dtype == torch.float32
    return sd


def write_config(d):
    cfg = json.load(open(f"{SRC}/config.json"))
    cfg["vocab_size"] = VOCAB
    cfg["num_hidden_layers"] = LAYERS
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/config.json", "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


def check_loads(path, want):
    got = torch.load(path, weights_only=True)
    assert list(got) == list(want), (path, list(got))
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (path, k)


def f32_case(sd):
    d = f"{OUT}/f32"
    write_config(d)
    out = collections.OrderedDict(sd)
    max_pos = json.load(open(f"{SRC}/config.json"))["max_position_embeddings"]
    out["gpt_neox.layers.0.attention.bias"] = torch.tril(torch.ones(max_pos, max_pos, dtype=torch.bool))[None, None]
    out["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    out["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, 4, 2).float() / 4))
    torch.save(out, f"{d}/pytorch_model.bin")
    check_loads(f"{d}/pytorch_model.bin", out)


def bf16_views_case(sd):
    d = f"{OUT}/bf16-views"
    write_config(d)
    transposed = "gpt_neox.layers.0.attention.dense.weight"
    names = [n for n in sd if n != "embed_out.weight"]
    # The flat storage: a 3-element lead-in (every offset is non-zero), then each tensor's elements; the
    # transposed one stored as its transpose, row-major.
    parts = [torch.zeros(3)]
    for n in names:
        parts.append((sd[n].t().contiguous() if n == transposed else sd[n]).reshape(-1))
    flat = torch.cat(parts).to(torch.bfloat16)
    out = collections.OrderedDict()
    off = 3
    for n in names:
        k = sd[n].numel()
        v = flat[off : off + k]
        if n == transposed:
            rows, cols = sd[n].shape
            out[n] = v.view(cols, rows).t()
            assert not out[n].is_contiguous()
        else:
            out[n] = v.view(sd[n].shape)
        assert out[n].storage_offset() == off
        off += k
    out["embed_out.weight"] = flat[3 : 3 + sd["gpt_neox.embed_in.weight"].numel()].view(VOCAB, -1)
    for n in names:
        assert torch.equal(out[n], sd[n].to(torch.bfloat16)), n
    torch.save(out, f"{d}/pytorch_model.bin")
    check_loads(f"{d}/pytorch_model.bin", out)


def f16_sharded_case(sd):
    d = f"{OUT}/f16-sharded"
    write_config(d)
    names = list(sd)
    shards = {
        "pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
        "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :],
    }
    weight_map = {}
    for file, part in shards.items():
        out = collections.OrderedDict((n, sd[n].to(torch.float16)) for n in part)
        torch.save(out, f"{d}/{file}")
        check_loads(f"{d}/{file}", out)
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * 2 for t in sd.values())
    with open(f"{d}/pytorch_model.bin.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")


def legacy_case():
    d = f"{OUT}/legacy"
    write_config(d)
    torch.save({"gpt_neox.embed_in.weight": torch.zeros(2)}, f"{d}/pytorch_model.bin", _use_new_zipfile_serialization=False)


class Pwned:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def hostile_case():
    d = f"{OUT}/hostile"
    write_config(d)
    body = pickle.dumps(collections.OrderedDict([("gpt_neox.embed_in.weight", Pwned())]), protocol=2)
    assert b"cposix\nsystem\n" in body
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", body)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    with open(f"{d}/pytorch_model.bin", "wb") as f:
        f.write(buf.getvalue())


def main():
    if not os.path.isdir(SRC):
        sys.exit("run from the repository root")
    shutil.rmtree(OUT, ignore_errors=True)
    sd = source()
    f32_case(sd)
    bf16_views_case(sd)
    f16_sharded_case(sd)
    legacy_case()
    hostile_case()
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT}: {total} bytes")


if __name__ == "__main__":
    main()
