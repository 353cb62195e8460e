#!/usr/bin/env python3
"""Drive `dolly serve` with the official `openai` Python client, one check per feature (developer check, not CI).

Starts `target/release/dolly serve` on 127.0.0.1 (ephemeral port, an API key) with a random pythia-14m model written
by `dolly init-model` and the 20B tokenizer, then through the client: models; completions and chat (greedy),
streamed text equal to non-streamed; `stop` (the text ends before it, finish_reason "stop"); `n` with a `seed`
(reproducible, choices indexed); `logprobs` (completions: top-1 equals the greedy token's; chat: `top_logprobs`
with bytes); `echo` with `max_tokens: 0` (prompt scoring, as lm-eval sends it); `stream_options.include_usage`
(a final usage chunk equal to the non-streamed usage); presence/frequency penalties and `logit_bias` (a +100 bias
forces its token); `min_tokens` through `extra_body`; `response_format` JSON mode refused; a wrong key refused;
errors raised as `BadRequestError`/`NotFoundError`/`AuthenticationError`; SIGTERM exit 0.

    python -m venv ../venv && ../venv/bin/pip install openai
    ../venv/bin/python tools/openai_client_check.py [--dolly target/release/dolly]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import urllib.request

import openai
from openai import OpenAI

KEY = "sk-check-123"
M = "dolly-check"


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok  {name}")


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
                              "--model-name", M, "--api-key", KEY, "--log-requests", "false"],
                             stderr=subprocess.PIPE, text=True)
        try:
            addr = next(line.strip().split("http://")[1] for line in p.stderr if "http://" in line)
            run_checks(addr)
        finally:
            p.terminate()
            rc = p.wait(timeout=60)
        assert rc == 0, f"dolly serve exited {rc}"
    print(f"openai {openai.__version__}: all checks passed")
    return 0


def run_checks(addr):
    c = OpenAI(base_url=f"http://{addr}/v1", api_key=KEY)
    check("models", [x.id for x in c.models.list().data] == [M])
    prompt = "Name three birds."
    r = c.completions.create(model=M, prompt=prompt, max_tokens=24, temperature=0)
    text = r.choices[0].text
    check("completion", r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1)
    s = "".join(ch.choices[0].text for ch in c.completions.create(
        model=M, prompt=prompt, max_tokens=24, temperature=0, stream=True))
    check("completion stream == non-stream", s == text, (s, text))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
    cr = c.chat.completions.create(model=M, messages=msgs, max_tokens=24, temperature=0)
    ctext = cr.choices[0].message.content
    cs = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model=M, messages=msgs, max_tokens=24, temperature=0, stream=True) if ch.choices)
    check("chat stream == non-stream", cs == ctext, (cs, ctext))

    # stop: a piece of the greedy text from its middle
    stop = text[len(text) // 2:len(text) // 2 + 3]
    r = c.completions.create(model=M, prompt=prompt, max_tokens=24, temperature=0, stop=[stop])
    check("stop", r.choices[0].text == text[:text.find(stop)] and r.choices[0].finish_reason == "stop",
          (stop, r.choices[0].text))
    rs = "".join(ch.choices[0].text for ch in c.completions.create(
        model=M, prompt=prompt, max_tokens=24, temperature=0, stop=[stop], stream=True))
    check("stop streamed", rs == r.choices[0].text, (rs, r.choices[0].text))

    # n with a seed
    a = c.completions.create(model=M, prompt=prompt, max_tokens=8, n=3, seed=7, top_p=1.0)
    b = c.completions.create(model=M, prompt=prompt, max_tokens=8, n=3, seed=7, top_p=1.0)
    check("n + seed reproducible", [x.text for x in a.choices] == [x.text for x in b.choices])
    check("n indexed", [x.index for x in a.choices] == [0, 1, 2] and len({x.text for x in a.choices}) > 1)
    check("n usage", a.usage.completion_tokens == 24, a.usage)

    # logprobs
    r = c.completions.create(model=M, prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    check("logprobs shape", len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6)
    check("logprobs top-1 = greedy", all(abs(max(t.values()) - x) < 1e-6 for t, x in zip(lp.top_logprobs,
                                                                                          lp.token_logprobs)))
    check("logprobs tokens spell the text", "".join(lp.tokens) == r.choices[0].text)
    cr = c.chat.completions.create(model=M, messages=msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    content = cr.choices[0].logprobs.content
    check("chat logprobs", content and all(len(t.top_logprobs) == 2 and t.bytes is not None for t in content))

    # echo with max_tokens 0: prompt scoring
    r = c.completions.create(model=M, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    check("echo text", r.choices[0].text == prompt and r.usage.completion_tokens == 0)
    check("echo logprobs", lp.token_logprobs[0] is None and all(x < 0 for x in lp.token_logprobs[1:]))

    # include_usage
    chunks = list(c.completions.create(model=M, prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    plain = c.completions.create(model=M, prompt=prompt, max_tokens=10, temperature=0)
    check("include_usage", chunks[-1].choices == [] and chunks[-1].usage == plain.usage, chunks[-1])

    # penalties and logit_bias
    tok = json.loads(post(addr, "/tokenize", {"content": " hello"}))["tokens"][0]
    r = c.completions.create(model=M, prompt=prompt, max_tokens=4, temperature=0, logit_bias={str(tok): 100})
    check("logit_bias", r.choices[0].text == " hello" * 4, r.choices[0].text)
    r = c.completions.create(model=M, prompt=prompt, max_tokens=12, temperature=0, logit_bias={str(tok): 20},
                             frequency_penalty=2.0)
    check("frequency_penalty", 4 <= r.choices[0].text.count(" hello") < 12, r.choices[0].text)
    r = c.completions.create(model=M, prompt=prompt, max_tokens=12, temperature=0, presence_penalty=1.5)
    check("presence_penalty accepted", r.choices[0].finish_reason in ("stop", "length"))
    end = json.loads(post(addr, "/tokenize", {"content": "### End"}))["tokens"][0]
    r = c.completions.create(model=M, prompt=prompt, max_tokens=12, temperature=0, logit_bias={str(end): 100},
                             extra_body={"min_tokens": 3})
    check("min_tokens", r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "stop", r.usage)

    # refusals
    for bad, exc in [(dict(model=M, prompt="x", max_tokens=0), openai.BadRequestError),
                     (dict(model=M, prompt="x", temperature=5), openai.BadRequestError),
                     (dict(model=M, prompt="x", extra_body={"response_format": {"type": "json_object"}}),
                      openai.BadRequestError),
                     (dict(model=M, prompt="x", suffix="y"), openai.BadRequestError),
                     (dict(model="other", prompt="x"), openai.NotFoundError)]:
        try:
            c.completions.create(**bad)
            raise AssertionError(f"accepted {bad}")
        except exc as e:
            check(f"refused {list(bad)[-1]}", e.body and e.body.get("message"), e)
    try:
        OpenAI(base_url=f"http://{addr}/v1", api_key="wrong").models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError:
        check("wrong key refused", True)


def post(addr, path, body):
    req = urllib.request.Request(f"http://{addr}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req) as r:
        return r.read()


if __name__ == "__main__":
    sys.exit(main())
