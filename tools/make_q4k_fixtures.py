#!/usr/bin/env python3
"""Writes crates/neox/tests/fixtures/quant/q4_k_*: inputs, their q4_K blocks as ggml's reference quantizer
(`quantize_row_q4_K_ref`, what `llama-quantize` runs without an importance matrix) writes them, and those blocks
dequantized by the `gguf` package (gguf-py 0.19.0 has Q4_K's dequantize but no quantize, hence the C reference).

    python3 tools/make_q4k_fixtures.py --llama-cpp /path/llama_cpp_python-0.3.36   # the PyPI sdist, extracted

The sdist's vendor/llama.cpp/ggml/src/ggml-quants.c is compiled with gcc -O2 -ffp-contract=off (no fused
multiply-add: the quantizer's float sums then round as written, as Rust's do; a -march=native build may contract
them and, rarely, pick another rounding) into a small program, with stubs for the four ggml.c symbols it links
against but the q4_K path never calls. Pinned: llama-cpp-python 0.3.36's llama.cpp, gguf==0.19.0,
numpy==2.4.6 (asserted). CI reads only the committed files.
"""
import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
from importlib.metadata import version

import numpy as np

MAIN = r"""
#include <stdio.h>
#include <stdlib.h>
#include "ggml-quants.h"
int main(void) {
    size_t cap = 1 << 24;
    float *x = malloc(cap * 4);
    size_t n = fread(x, 4, cap, stdin);
    if (n % 256) { fprintf(stderr, "%zu values: not whole super-blocks\n", n); return 1; }
    block_q4_K *y = malloc(sizeof(block_q4_K) * (n / 256));
    quantize_row_q4_K_ref(x, y, (long long)n);
    fwrite(y, sizeof(block_q4_K), n / 256, stdout);
    return 0;
}
"""
STUBS = r"""
#include <stdio.h>
#include <stdlib.h>
void ggml_abort(const char *file, int line, const char *fmt, ...) { fprintf(stderr, "%s:%d\n", file, line); abort(); }
size_t ggml_row_size(int t, long long n) { (void)t; (void)n; abort(); }
const char *ggml_type_name(int t) { (void)t; abort(); }
size_t ggml_type_size(int t) { (void)t; abort(); }
"""


def inputs():
    rng = np.random.default_rng(20261204)
    rows = []
    # ordinary weights at several scales (two super-blocks each)
    for scale in (1e-3, 0.02, 1.0, 300.0):
        rows.append(rng.normal(0, scale, size=(2, 256)))
    # all zero; all equal (positive, negative); one non-zero value; all positive (the min becomes 0)
    rows.append(np.zeros((1, 256)))
    rows.append(np.full((1, 256), 0.75))
    rows.append(np.full((1, 256), -0.5))
    b = np.zeros((1, 256)); b[0, 77] = -0.25; rows.append(b)
    rows.append(rng.uniform(0.1, 2.0, size=(1, 256)))
    # one zero sub-block among ordinary ones (its scale is 0: its quants stay as the search left them)
    b = rng.normal(0, 0.05, size=(1, 256)); b[0, 64:96] = 0; rows.append(b)
    # sub-blocks of very different magnitudes (6-bit scales saturate), an outlier, tiny values
    b = rng.normal(0, 1, size=(1, 256)) * np.repeat(10.0 ** np.arange(-3, 5), 32); rows.append(b)
    b = rng.normal(0, 0.01, size=(1, 256)); b[0, 5] = 3.0; rows.append(b)
    rows.append(rng.normal(0, 1e-6, size=(1, 256)))
    # Laplacian, as trained weights look
    rows.append(rng.laplace(0, 0.02, size=(4, 256)))
    return np.concatenate(rows).astype(np.float32).reshape(-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True, help="extracted llama_cpp_python-0.3.36 sdist")
    args = ap.parse_args()
    assert version("gguf") == "0.19.0", version("gguf")
    assert np.__version__ == "2.4.6", np.__version__
    import gguf
    from gguf.quants import dequantize

    ggml = pathlib.Path(args.llama_cpp) / "vendor/llama.cpp/ggml"
    assert (ggml / "src/ggml-quants.c").is_file(), ggml
    out = pathlib.Path(__file__).resolve().parent.parent / "crates/neox/tests/fixtures/quant"
    out.mkdir(parents=True, exist_ok=True)
    x = inputs()
    with tempfile.TemporaryDirectory() as d:
        d = pathlib.Path(d)
        (d / "main.c").write_text(MAIN)
        (d / "stubs.c").write_text(STUBS)
        exe = d / "q4k"
        subprocess.run(["gcc", "-O2", "-ffp-contract=off", "-std=c11", "-w", f"-I{ggml / 'include'}",
                        f"-I{ggml / 'src'}", str(d / "main.c"), str(d / "stubs.c"), str(ggml / "src/ggml-quants.c"),
                        "-lm", "-o", str(exe)], check=True)
        blocks = subprocess.run([str(exe)], input=x.astype("<f4").tobytes(), capture_output=True, check=True).stdout
    assert len(blocks) == len(x) // 256 * 144, len(blocks)
    deq = dequantize(np.frombuffer(blocks, dtype=np.uint8).reshape(-1, 144), gguf.GGMLQuantizationType.Q4_K)
    deq = np.asarray(deq, dtype=np.float32).reshape(-1)
    (out / "q4_k_input.f32").write_bytes(x.astype("<f4").tobytes())
    (out / "q4_k_blocks.bin").write_bytes(blocks)
    (out / "q4_k_dequant.f32").write_bytes(deq.astype("<f4").tobytes())
    err = np.abs(deq - x).max()
    print(f"{len(x) // 256} super-blocks -> {out}; largest |dequant - x| {err:.3g}", file=sys.stderr)


if __name__ == "__main__":
    main()
