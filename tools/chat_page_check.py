#!/usr/bin/env python3
"""Open `dolly serve`'s chat page in headless Chromium and check a streamed answer appears (developer check, not CI).

Starts `target/release/dolly serve` on 127.0.0.1 (ephemeral port, an API key, so the page's key prompt is
exercised) with a random pythia-14m model from `dolly init-model` and the 20B tokenizer, opens `/` in Debian's
Chromium through Playwright, checks the page asks for the key, enters it, checks the model name appears, types an
instruction and a context, sends, waits for the answer text and the "done" status, checks the answer equals the
API's own greedy answer for the same request (temperature 0), presses Stop on a long request, and saves
screenshots to --out (look at them).

    apt-get install chromium && python -m venv ../venv && ../venv/bin/pip install playwright
    ../venv/bin/python tools/chat_page_check.py [--out /tmp/chat-page]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import urllib.request

from playwright.sync_api import sync_playwright

KEY = "sk-page-check"


def api_answer(addr, instruction, context):
    msgs = [{"role": "system", "content": context}, {"role": "user", "content": instruction}]
    body = {"messages": msgs, "temperature": 0, "max_tokens": 40}
    req = urllib.request.Request(f"http://{addr}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dolly", default="target/release/dolly")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--out", default="/tmp/chat-page")
    ap.add_argument("--tokenizer",
                    default=os.path.join(os.path.dirname(__file__), "../../shared/data/20B_tokenizer.json"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    exe = os.path.abspath(args.dolly)
    with tempfile.TemporaryDirectory() as d:
        m = os.path.join(d, "m")
        subprocess.run([exe, "init-model", "--tokenizer", "none", "--preset", "pythia-14m", "--output", m], check=True,
                       stderr=subprocess.DEVNULL)
        p = subprocess.Popen([exe, "serve", m, "--tokenizer", os.path.abspath(args.tokenizer), "--port", "0",
                              "--model-name", "dolly-page", "--api-key", KEY, "--log-requests", "false"],
                             stderr=subprocess.PIPE, text=True)
        try:
            addr = next(line.strip().split("http://")[1] for line in p.stderr if "http://" in line)
            run(addr, args)
        finally:
            p.terminate()
            rc = p.wait(timeout=60)
        assert rc == 0, f"dolly serve exited {rc}"
    return 0


def run(addr, args):
    instruction, context = "Summarise the passage in one sentence.", "Dolly is an instruction-tuned model."
    want = api_answer(addr, instruction, context)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        # the page's CSP forbids eval; the harness's own wait predicates are evaluated as strings
        page = browser.new_context(viewport={"width": 1000, "height": 820}, bypass_csp=True).new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"http://{addr}/")
        page.wait_for_selector("#apikey", state="visible", timeout=10_000)
        print("ok  the page asks for the API key")
        page.fill("#apikey", KEY)
        page.dispatch_event("#apikey", "change")
        page.wait_for_function("document.getElementById('model').textContent === 'dolly-page'", timeout=10_000)
        print("ok  model name shown")
        page.fill("#instruction", instruction)
        page.fill("#context", context)
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "40")
        page.click("#send")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=60_000)
        got = page.inner_text("#answer")
        status = page.inner_text("#status")
        page.screenshot(path=os.path.join(args.out, "answer.png"), full_page=True)
        assert got.strip() == want.strip(), (got, want)
        print(f"ok  streamed answer equals the API's greedy answer ({status})")
        # a long answer, stopped
        page.fill("#max_tokens", "1900")
        page.fill("#temperature", "1")
        page.click("#send")
        page.wait_for_function("document.getElementById('answer').textContent.length > 20", timeout=60_000)
        page.click("#stop")
        page.wait_for_function("document.getElementById('status').textContent === 'stopped'", timeout=10_000)
        assert not page.is_disabled("#send")
        page.screenshot(path=os.path.join(args.out, "stopped.png"), full_page=True)
        print("ok  stop button ends the stream")
        assert not errors, errors
        browser.close()
    print(f"screenshots in {args.out}: answer.png, stopped.png")


if __name__ == "__main__":
    sys.exit(main())
