#!/usr/bin/env python3
"""Server field costs, same server, same run, alternating in rounds (developer tool; CI never runs Python):

- logprobs overhead: single-stream greedy tokens/s without logprobs vs with `logprobs: 5` (the log-softmax over
  the vocabulary and the top-5 per token). Target: < 5% slower.
- n = 4: one request with `n: 4` (one prefill, four rows) vs four concurrent n = 1 requests of the same prompt
  vs one n = 1 request: aggregate completion tokens/s and wall time.

A random-init `--preset` model from `dolly init-model`, greedy (sampled for n = 4 so the rows differ; the random
model never emits `### End`, so each row uses its whole budget, which is checked). Ratios are medians of
per-round ratios, each round's measurements taken seconds apart (this host drifts by tens of percent).

    python tools/bench_server_fields.py [--preset pythia-70m] [--runs 5] [--new-tokens 128] [--bf16]
"""

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

PROMPT = "Write a long and detailed story about a dragon who learns to read books in an old library by the sea."


def post(addr, body):
    host, port = addr.split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    v = json.loads(r.read())
    assert r.status == 200, v
    dt = time.perf_counter() - t0
    c.close()
    assert all(ch["finish_reason"] == "length" for ch in v["choices"]), v["choices"]
    return dt, v


def concurrent(addr, bodies):
    out = [None] * len(bodies)

    def worker(i):
        out[i] = post(addr, bodies[i])[1]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(bodies))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--preset", default="pythia-70m")
    ap.add_argument("--dolly", default="target/release/dolly")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--tokenizer",
                    default=os.path.join(os.path.dirname(__file__), "../../shared/data/20B_tokenizer.json"))
    args = ap.parse_args()
    exe, n = os.path.abspath(args.dolly), args.new_tokens
    rounds = []
    with tempfile.TemporaryDirectory() as d:
        m = os.path.join(d, "m")
        subprocess.run([exe, "init-model", "--tokenizer", "none", "--preset", args.preset, "--output", m], check=True,
                       stderr=subprocess.DEVNULL)
        cmd = [exe, "--threads", str(args.threads), "serve", m, "--tokenizer", os.path.abspath(args.tokenizer),
               "--port", "0", "--max-batch", "8", "--log-requests", "false"] + (["--bf16"] if args.bf16 else [])
        p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        try:
            addr = next(line.strip().split("http://")[1] for line in p.stderr if "http://" in line)
            threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
            greedy = {"prompt": PROMPT, "max_tokens": n, "temperature": 0}
            post(addr, dict(greedy, max_tokens=8))  # warm-up
            for r in range(args.runs):
                plain_s, _ = post(addr, greedy)
                lp_s, v = post(addr, dict(greedy, logprobs=5))
                assert len(v["choices"][0]["logprobs"]["token_logprobs"]) == n
                sampled = {"prompt": PROMPT, "max_tokens": n, "temperature": 1.0, "top_p": 1.0, "seed": r}
                n4_s, v4 = post(addr, dict(sampled, n=4))
                assert v4["usage"]["completion_tokens"] == 4 * n
                sep_s, _ = concurrent(addr, [dict(sampled, seed=100 * r + i) for i in range(4)])
                one_s, _ = post(addr, sampled)
                rnd = {"plain_tok_s": n / plain_s, "logprobs_tok_s": n / lp_s,
                       "logprobs_overhead": lp_s / plain_s - 1, "n4_tok_s": 4 * n / n4_s,
                       "four_requests_tok_s": 4 * n / sep_s, "single_tok_s": n / one_s,
                       "n4_over_four_requests": sep_s / n4_s, "n4_over_single": (4 * n / n4_s) / (n / one_s)}
                rounds.append(rnd)
                print(f"round {r + 1}: {rnd['plain_tok_s']:.1f} tok/s, with logprobs {rnd['logprobs_tok_s']:.1f} "
                      f"({100 * rnd['logprobs_overhead']:+.1f}%); n=4 {rnd['n4_tok_s']:.1f} tok/s vs 4 requests "
                      f"{rnd['four_requests_tok_s']:.1f} vs 1 request {rnd['single_tok_s']:.1f}", file=sys.stderr)
        finally:
            p.terminate()
            p.wait(timeout=60)
    med = statistics.median
    keys = rounds[0].keys()
    out = {"preset": args.preset, "new_tokens": n, "threads": args.threads, "bf16": args.bf16, "runs": args.runs,
           **{f"median_{k}": med(r[k] for r in rounds) for k in keys}, "rounds": rounds}
    print(json.dumps(out, indent=1))
    print(f"\nmedians of {args.runs} rounds: logprobs=5 overhead {100 * out['median_logprobs_overhead']:+.1f}% "
          f"({out['median_plain_tok_s']:.1f} -> {out['median_logprobs_tok_s']:.1f} tok/s); n=4 "
          f"{out['median_n4_tok_s']:.1f} tok/s aggregate = {out['median_n4_over_four_requests']:.2f}x four "
          f"concurrent requests, {out['median_n4_over_single']:.2f}x one request", file=sys.stderr)


if __name__ == "__main__":
    main()
