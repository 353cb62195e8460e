#!/usr/bin/env python3
"""Writes the Python-parity fixture for the Rust tokenizer set-up: what it does, what it deliberately does not do.

Does: loads ../shared/data/20B_tokenizer.json with the Python `tokenizers` library (pinned in
tools/requirements-data.txt), adds Dolly's three special tokens in Dolly's order, builds the exact Dolly training
text of every record of ../shared/data/databricks-dolly-15k.jsonl (spec section 2), tokenizes it and records,
per record (file order, 1-based line), the token count and the first 16 hex digits of sha256 over the ids written
as little-endian u32; one sha256 over all ids of all records; full ids and Dolly-style labels (everything up to
and including the first 50279 masked with -100, spec section 6) for a few records; ids of some tricky strings;
and the drop counts at max length 2048 and 1024 (length >= max is dropped, spec section 5).
Does not: need transformers, torch or the network; CI never runs it (the fixture is committed).

Usage (from the repository root):
    python3 -m venv ../venv-tok && ../venv-tok/bin/pip install -r tools/requirements-data.txt
    ../venv-tok/bin/python tools/tokenizer_fixture.py [--shared ../shared/data] [--out PATH]
"""

import argparse
import hashlib
import json
import struct
import sys

import tokenizers
from tokenizers import Tokenizer

INTRO = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
         "request.")
END_KEY = "### End"
INSTRUCTION_KEY = "### Instruction:"
RESPONSE_KEY_NL = "### Response:\n"
SPECIALS = [END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL]

TRICKY = [
    "Hello Dolly!",
    "### Response:\n### End### Instruction:",
    "a  b   c                          d",
    "caf\u0065\u0301 vs caf\u00e9",  # NFC normalizer: e + combining acute -> e-acute
    "tabs\tand\r\nCRLF\n\n\nand emoji \U0001F600 and \u4e2d\u6587",
    "<|endoftext|>x<|padding|>",
    " ### Response: (no newline) ### End.",
]


def training_text(instruction, context, response):
    if context:
        return (f"{INTRO}\n\n{INSTRUCTION_KEY}\n{instruction}\n\nInput:\n{context}\n\n"
                f"{RESPONSE_KEY_NL}{response}\n\n{END_KEY}")
    return f"{INTRO}\n\n{INSTRUCTION_KEY}\n{instruction}\n\n{RESPONSE_KEY_NL}{response}\n\n{END_KEY}"


def ids_bytes(ids):
    return struct.pack(f"<{len(ids)}I", *ids)


def dolly_labels(ids, response_id):
    labels = list(ids)
    first = ids.index(response_id)
    for i in range(first + 1):
        labels[i] = -100
    return labels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default="../shared/data")
    ap.add_argument("--out", default="crates/data/tests/fixtures/tokenizer_parity.json")
    a = ap.parse_args()

    tok = Tokenizer.from_file(f"{a.shared}/20B_tokenizer.json")
    added = tok.add_special_tokens(SPECIALS)
    special_ids = [tok.token_to_id(s) for s in SPECIALS]
    response_id = special_ids[2]

    per_record = []
    all_hash = hashlib.sha256()
    full = []
    lengths = []
    with open(f"{a.shared}/databricks-dolly-15k.jsonl", encoding="utf-8") as f:
        texts = []
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            r = json.loads(line)
            texts.append((lineno, training_text(r["instruction"], r["context"], r["response"])))
    encs = tok.encode_batch([t for _, t in texts], add_special_tokens=True)
    for (lineno, text), enc in zip(texts, encs):
        ids = enc.ids
        b = ids_bytes(ids)
        all_hash.update(b)
        lengths.append(len(ids))
        per_record.append(f"{lineno}:{len(ids)}:{hashlib.sha256(b).hexdigest()[:16]}")
    # Full ids/labels for a few records: the first three lines, the shortest with and without context.
    picks = {1, 2, 3}
    with_ctx = [(len(e.ids), ln) for (ln, t), e in zip(texts, encs) if "\n\nInput:\n" in t]
    without = [(len(e.ids), ln) for (ln, t), e in zip(texts, encs) if "\n\nInput:\n" not in t]
    picks.add(min(with_ctx)[1])
    picks.add(min(without)[1])
    for (lineno, text), enc in zip(texts, encs):
        if lineno in picks:
            full.append({"line": lineno, "input_ids": enc.ids, "labels": dolly_labels(enc.ids, response_id)})

    tricky = [{"text": t, "ids": tok.encode(t, add_special_tokens=True).ids} for t in TRICKY]
    out = {
        "source": "tools/tokenizer_fixture.py",
        "tokenizers_version": tokenizers.__version__,
        "python": sys.version.split()[0],
        "tokenizer_file": "20B_tokenizer.json",
        "added_special_tokens": added,
        "special_ids": special_ids,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "records": len(per_record),
        "dropped_at_2048": sum(1 for n in lengths if n >= 2048),
        "dropped_at_1024": sum(1 for n in lengths if n >= 1024),
        "total_tokens": sum(lengths),
        "all_ids_sha256": all_hash.hexdigest(),
        "tricky": tricky,
        "full": sorted(full, key=lambda x: x["line"]),
        "per_record": per_record,
    }
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(out, f, separators=(",", ":"), ensure_ascii=True)
        f.write("\n")
    print(f"wrote {a.out}: {out['records']} records, dropped@2048={out['dropped_at_2048']}, "
          f"dropped@1024={out['dropped_at_1024']}, total_tokens={out['total_tokens']}")


if __name__ == "__main__":
    main()
