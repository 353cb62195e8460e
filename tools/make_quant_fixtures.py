#!/usr/bin/env python3
"""Writes crates/neox/tests/fixtures/quant/: inputs and their q8_0 blocks as the `gguf` package quantizes them
(gguf-py's Q8_0.quantize_blocks, documented bit-exact with ggml's quantize_row_q8_0_ref).

    /path/venv/bin/python tools/make_quant_fixtures.py

Pinned: gguf==0.19.0, numpy==2.4.6 (asserted). CI reads only the committed files.
"""
import pathlib
import sys

import gguf
import numpy as np
from gguf.quants import quantize

from importlib.metadata import version

assert version("gguf") == "0.19.0", version("gguf")
assert np.__version__ == "2.4.6", np.__version__

out = pathlib.Path(__file__).resolve().parent.parent / "crates/neox/tests/fixtures/quant"
out.mkdir(parents=True, exist_ok=True)

rng = np.random.default_rng(20261203)
blocks = []
# ordinary weights at several scales
for scale in (1e-3, 0.02, 1.0, 300.0):
    blocks.append(rng.normal(0, scale, size=(8, 32)))
# a zero block (scale 0), one non-zero value, all equal, mixed signs with the max negative
blocks.append(np.zeros((1, 32)))
b = np.zeros((1, 32)); b[0, 7] = -0.25; blocks.append(b)
blocks.append(np.full((1, 32), 0.75))
b = rng.uniform(-1, 1, size=(1, 32)); b[0, 3] = -2.0; blocks.append(b)
# ties: amax 127 makes d = 1 exactly, so k + 0.5 values round half away from zero (roundf, not rint)
b = np.array([[127.0] + [k + 0.5 for k in range(-15, 16)]]); blocks.append(b)
# tiny values: an f16-subnormal scale
blocks.append(rng.normal(0, 1e-6, size=(2, 32)))
x = np.concatenate(blocks).astype(np.float32).reshape(-1)
q = quantize(x.reshape(-1, 32), gguf.GGMLQuantizationType.Q8_0)
(out / "q8_0_input.f32").write_bytes(x.astype("<f4").tobytes())
(out / "q8_0_blocks.bin").write_bytes(q.tobytes())
print(f"{x.size} values, {q.size} bytes of q8_0 -> {out}", file=sys.stderr)
