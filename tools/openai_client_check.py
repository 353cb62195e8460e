#!/usr/bin/env python3
"""Drive `dolly serve` with the official `openai` Python client (developer check, not CI).

Starts `target/release/dolly serve` on 127.0.0.1 (ephemeral port) with a random pythia-14m model written by
`dolly init-model` and the 20B tokenizer, then: lists models, runs a completion and a chat completion (greedy),
streams both and checks the streamed text equals the non-streamed one, checks that errors surface as
`openai.BadRequestError` / `openai.NotFoundError`, and stops the server with SIGTERM (expects exit 0).

    python -m venv /tmp/oai && /tmp/oai/bin/pip install openai
    /tmp/oai/bin/python tools/openai_client_check.py [--dolly target/release/dolly]
"""

import argparse
import os
import subprocess
import sys
import tempfile

import openai
from openai import OpenAI


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dolly", default="target/release/dolly")
    ap.add_argument("--tokenizer",
                    default=os.path.join(os.path.dirname(__file__), "../../shared/data/20B_tokenizer.json"))
    args = ap.parse_args()
    exe = os.path.abspath(args.dolly)
    with tempfile.TemporaryDirectory() as d:
        m = os.path.join(d, "m")
        subprocess.run([exe, "init-model", "--tokenizer", "none", "--preset", "pythia-14m", "--output", m], check=True,
                       stderr=subprocess.DEVNULL)
        p = subprocess.Popen([exe, "serve", m, "--tokenizer", os.path.abspath(args.tokenizer), "--port", "0",
                              "--model-name", "dolly-check"], stderr=subprocess.PIPE, text=True)
        try:
            addr = next(line.strip().split("http://")[1] for line in p.stderr if "http://" in line)
            c = OpenAI(base_url=f"http://{addr}/v1", api_key="unused")
            assert [x.id for x in c.models.list().data] == ["dolly-check"]
            r = c.completions.create(model="dolly-check", prompt="Name three birds.", max_tokens=24, temperature=0)
            text = r.choices[0].text
            assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
            s = "".join(ch.choices[0].text for ch in c.completions.create(
                model="dolly-check", prompt="Name three birds.", max_tokens=24, temperature=0, stream=True))
            assert s == text, (s, text)
            msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three birds."}]
            cr = c.chat.completions.create(model="dolly-check", messages=msgs, max_tokens=24, temperature=0)
            ctext = cr.choices[0].message.content
            cs = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
                model="dolly-check", messages=msgs, max_tokens=24, temperature=0, stream=True))
            assert cs == ctext, (cs, ctext)
            for bad, exc in [(dict(model="dolly-check", prompt="x", max_tokens=0), openai.BadRequestError),
                             (dict(model="dolly-check", prompt="x", temperature=5), openai.BadRequestError),
                             (dict(model="other", prompt="x"), openai.NotFoundError)]:
                try:
                    c.completions.create(**bad)
                    raise AssertionError(f"accepted {bad}")
                except exc as e:
                    assert e.body and e.body.get("message"), e
            print(f"openai {openai.__version__}: models, completions, chat, streaming (== non-streaming), "
                  f"errors: OK\ncompletion: {text!r}\nchat: {ctext!r}")
        finally:
            p.terminate()
            rc = p.wait(timeout=60)
        assert rc == 0, f"dolly serve exited {rc}"
    return 0


if __name__ == "__main__":
    sys.exit(main())
