#!/usr/bin/env python3
"""Our GGUF files against llama.cpp (llama-cpp-python) and gguf-py, and decode speed against llama.cpp.

    cargo build --release -p dolly && cargo build --release -p neox --example gguf_greedy
    ../venv/bin/python tools/check_gguf.py --dir ../gguf-check --presets 70m,410m [--rounds 3]
    (venv: pip install -r tools/requirements.txt gguf==0.19.0 llama-cpp-python==0.3.36)

For each preset: `dolly init-model` (random N(0, 0.02) weights, the GPT-NeoX-20B tokenizer), `dolly export-gguf`
at f32, bf16 and q8_0 (and q4_k with `--types f32,q4_k`), then
  1. gguf-py's GGUFReader reads every file (arch, tensor count, types);
  2. llama.cpp's own quantizer (llama_model_quantize, ftype MOSTLY_Q8_0; MOSTLY_Q4_K_S with `pure` and the token
     embedding and output tensor types set to q8_0, as ours keeps them) applied to our f32 file gives the same
     q8_0 (q4_K) tensor bytes as our q8_0 (q4_k) file;
  3. llama.cpp loads each file and its greedy tokens for a fixed prompt equal ours (neox example gguf_greedy);
  4. batch-1 decode tokens/s, llama.cpp and dolly alternating in rounds on the same file, 2 threads.
Pinned: llama-cpp-python==0.3.36 (llama.cpp as vendored there), gguf==0.19.0. Developer-only; CI never runs it.
"""
import argparse
import ctypes
import json
import pathlib
import statistics
import subprocess
import sys
import time

import gguf
import llama_cpp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOLLY = ROOT / "target/release/dolly"
GREEDY = ROOT / "target/release/examples/gguf_greedy"
TOKENIZER = ROOT.parent / "shared/data/20B_tokenizer.json"
PROMPT = [12, 500, 7000, 33, 1012, 2, 99, 4242]


def sh(*args):
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True).stdout


def llama(path, n_ctx=1024):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, n_threads_batch=2, logits_all=True, verbose=False)


def llama_greedy(llm, prompt, n):
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


def llama_decode_tps(llm, prompt_len, n):
    llm.reset()
    rng = np.random.default_rng(0)
    llm.eval([int(t) for t in rng.integers(100, 50000, prompt_len)])
    t0 = time.perf_counter()
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([tok])
    return n / (time.perf_counter() - t0)


def ours_tps(path, prompt_len, n):
    out = sh(DOLLY, "bench", "generate", "--model", path, "--prompt-len", prompt_len, "--new-tokens", n, "--runs", 1, "--json")
    return json.loads(out.strip().splitlines()[-1])["tokens_per_s"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="../gguf-check")
    ap.add_argument("--presets", default="70m,410m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--types", default="f32,bf16,q8_0")
    ap.add_argument("--prefill", type=int, default=512, help="prompt length of the prefill measurement (0: skip)")
    a = ap.parse_args()
    d = pathlib.Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    results = []
    for p in a.presets.split(","):
        m = d / f"m{p}"
        if not (m / "config.json").exists():
            sh(DOLLY, "init-model", "--preset", f"pythia-{p}", "--output", m, "--tokenizer", TOKENIZER)
        files = {}
        for t in a.types.split(","):
            files[t] = d / f"m{p}-{t}.gguf"
            if not files[t].exists():
                sh(DOLLY, "export-gguf", m, "--type", t, "--output", files[t])
            r = gguf.GGUFReader(str(files[t]))
            arch = r.fields["general.architecture"]
            assert bytes(arch.parts[arch.data[0]]).decode() == "gptneox"
            kinds = {str(t_.tensor_type.name) for t_ in r.tensors}
            print(f"{p} {t}: gguf-py reads {len(r.tensors)} tensors of types {sorted(kinds)}", flush=True)
        # llama.cpp's quantizer on our f32 file against our quantized files, tensor by tensor (q4_k: `pure`, every
        # layer matrix q4_K as ours are, with the embedding and head q8_0 as ours; llama.cpp's default q4_K_S/M
        # mixes in q5_K/q6_K tensors)
        for qt, ftype, pure in (("q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, False),
                                ("q4_k", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_S, True)):
            if "f32" not in files or qt not in files:
                continue
            theirs = d / f"m{p}-{qt}-llama.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            params.nthread = 2
            params.pure = pure
            if pure:
                params.token_embedding_type = int(gguf.GGMLQuantizationType.Q8_0)
                params.output_tensor_type = int(gguf.GGMLQuantizationType.Q8_0)
            rc = llama_cpp.llama_model_quantize(str(files["f32"]).encode(), str(theirs).encode(), ctypes.byref(params))
            assert rc == 0, f"llama_model_quantize returned {rc}"
            ra, rb = gguf.GGUFReader(str(files[qt])), gguf.GGUFReader(str(theirs))
            tb = {t_.name: t_ for t_ in rb.tensors}
            same = diff = 0
            for t_ in ra.tensors:
                o = tb[t_.name]
                if t_.tensor_type == o.tensor_type and bytes(t_.data.tobytes()) == bytes(o.data.tobytes()):
                    same += 1
                else:
                    diff += 1
                    print(f"  differs: {t_.name} ours {t_.tensor_type.name} llama.cpp {o.tensor_type.name}")
            print(f"{p} {qt}: {same} tensors byte-identical to llama.cpp's quantizer, {diff} differ", flush=True)
        # greedy tokens, then speed
        for t, f in files.items():
            llm = llama(f)
            want = llama_greedy(llm, PROMPT, 16)
            got = [int(x) for x in sh(GREEDY, f, 16, *PROMPT).split()]
            agree = sum(x == y for x, y in zip(want, got))
            print(f"{p} {t}: greedy tokens agree {agree}/16 (llama.cpp {want[:6]}..., ours {got[:6]}...)", flush=True)
            ll, us = [], []
            for _ in range(a.rounds):
                ll.append(llama_decode_tps(llm, 32, a.new_tokens))
                us.append(ours_tps(f, 32, a.new_tokens))
            row = dict(preset=p, type=t, llama_cpp=statistics.median(ll), dolly=statistics.median(us), agree=agree,
                       llama_runs=ll, dolly_runs=us)
            row["ratio"] = row["dolly"] / row["llama_cpp"]
            results.append(row)
            print(f"{p} {t}: decode tok/s dolly {row['dolly']:.1f} vs llama.cpp {row['llama_cpp']:.1f} = {row['ratio']:.2f}x "
                  f"(rounds {[round(x, 1) for x in us]} vs {[round(x, 1) for x in ll]})", flush=True)
            if a.prefill:
                lp, up = [], []
                for _ in range(a.rounds):
                    llm.reset()
                    t0 = time.perf_counter()
                    llm.eval(list(range(1000, 1000 + a.prefill)))
                    lp.append(time.perf_counter() - t0)
                    out = sh(DOLLY, "bench", "generate", "--model", f, "--prompt-len", a.prefill, "--new-tokens", 1, "--runs", 1, "--json")
                    up.append(json.loads(out.strip().splitlines()[-1])["ttft_s"])
                row["prefill_llama_s"], row["prefill_dolly_s"] = statistics.median(lp), statistics.median(up)
                print(f"{p} {t}: prefill of {a.prefill} tokens dolly {row['prefill_dolly_s']:.3f} s vs llama.cpp "
                      f"{row['prefill_llama_s']:.3f} s (rounds {[round(x, 3) for x in up]} vs {[round(x, 3) for x in lp]})", flush=True)
            del llm
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
