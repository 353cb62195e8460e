#!/usr/bin/env python3
"""Writes crates/neox/tests/fixtures/gguf-llama/: GGUF files written by llama.cpp's own converter
(convert_hf_to_gguf.py, the copy vendored in llama-cpp-python 0.3.36's sdist) from the tiny-parallel fixture
model, at --outtype f32 and q8_0, plus the small tokenizer.json they were converted with.

    LLAMA_CPP_DIR=/path/llama_cpp_python-0.3.36/vendor/llama.cpp /path/venv/bin/python tools/make_gguf_fixture.py

The converter needs a tokenizer: this script cuts the GPT-NeoX-20B tokenizer (../shared/data/20B_tokenizer.json)
to the fixture's 512 ids (vocabulary ids < 512, the merges among them). The converter recognises a tokenizer by
a hash of how it splits a test text, which the cut tokenizer no longer matches, so the script tells it the answer
it gives the full GPT-NeoX-20B tokenizer ("olmo", as llama.cpp's table says for that tokenizer); and under
transformers 5 the converter cannot find `rotary_pct` (KeyError: it reads transformers' config object, which
now holds rope_parameters), so the script hands it config.json's value. Nothing else is patched. Pinned: torch 2.15.0, transformers 5.24.0 (tools/requirements.txt). CI reads only the files.
"""
import json
import os
import pathlib
import shutil
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
LLAMA = pathlib.Path(os.environ["LLAMA_CPP_DIR"])
SRC = ROOT / "crates/neox/tests/fixtures/tiny-parallel"
OUT = ROOT / "crates/neox/tests/fixtures/gguf-llama"
sys.path.insert(0, str(LLAMA / "gguf-py"))
sys.path.insert(0, str(LLAMA))


def small_tokenizer(n):
    t = json.loads((ROOT.parent / "shared/data/20B_tokenizer.json").read_text())
    vocab = {s: i for s, i in t["model"]["vocab"].items() if i < n}
    merges = []
    for m in t["model"]["merges"]:
        a, b = m.split(" ") if isinstance(m, str) else m
        if a in vocab and b in vocab and (a + b) in vocab:
            merges.append(f"{a} {b}")
    t["model"]["vocab"] = vocab
    t["model"]["merges"] = merges
    t["added_tokens"] = [a for a in t["added_tokens"] if a["id"] < n]
    return t


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    tok = small_tokenizer(512)
    (OUT / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False, indent=1))
    import convert_hf_to_gguf
    from conversion.base import TextModel

    TextModel.get_vocab_base_pre = lambda self, tokenizer: "olmo"
    # With transformers 5 the converter's hparams (from AutoConfig) carry rope_parameters instead of the
    # config.json's rotary_pct, and conversion/gptneox.py reads hparams["rotary_pct"] (KeyError): give it back
    # the value config.json holds.
    from conversion.gptneox import GPTNeoXModel

    original = GPTNeoXModel.set_gguf_parameters

    def set_gguf_parameters(self):
        raw = json.loads((pathlib.Path(self.dir_model) / "config.json").read_text())
        self.hparams.setdefault("rotary_pct", raw["rotary_pct"])
        original(self)

    GPTNeoXModel.set_gguf_parameters = set_gguf_parameters
    with tempfile.TemporaryDirectory() as d:
        d = pathlib.Path(d)
        for f in ("config.json", "model.safetensors"):
            shutil.copy(SRC / f, d / f)
        shutil.copy(OUT / "tokenizer.json", d / "tokenizer.json")
        (d / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>", "add_bos_token": False, "add_eos_token": False}))
        for t in ("f32", "q8_0"):
            sys.argv = ["convert_hf_to_gguf.py", str(d), "--outtype", t, "--outfile", str(OUT / f"tiny-parallel-{t}.gguf")]
            convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
