#!/usr/bin/env python3
"""Score a model served by `dolly serve` with EleutherAI's lm-evaluation-harness (developer check, not CI).

Makes a small Dolly model (`dolly init-model` pythia-14m, then 2 steps of `dolly train` so that its directory has
the Dolly tokenizer with the three special tokens, as every trained model has), writes a local task file of
dolly-15k records (no hub), serves the model, and runs three lm-eval tasks to completion:

- `dolly_ll` (loglikelihood, `local-completions`): lm-eval sends `echo: true, logprobs: 1, max_tokens: 1` with
  token-id prompts and sums the entries after the context. Its number per record must equal the sum of the
  server's own echoed log-probabilities over the same ids (recorded from lm-eval's payloads), within float
  printing. It is NOT `dolly eval`'s loss: lm-eval moves a context's trailing whitespace into the continuation and
  builds the ids as tokenize(stripped context) + tokenize(whole)[len(tokenize(stripped context)):]; Dolly's
  prompt ends in the special token `### Response:\\n`, so lm-eval scores `... ### Response:` followed by the
  response minus its first tokens. The check prints both numbers; use `dolly eval` for Dolly-format likelihoods.
- `dolly_gen` (generate_until, `local-completions`): greedy continuation of the Dolly prompt until `### End`;
  each answer must equal `dolly generate --greedy`'s.
- `dolly_chat` (generate_until, `local-chat-completions` with `--apply_chat_template`): the instruction as the
  user message; each answer must equal `dolly generate --greedy`'s.

    python -m venv ../venv && ../venv/bin/pip install "lm-eval[api]==0.4.13" transformers==5.25.0
    ../venv/bin/python tools/lm_eval_check.py [--dolly target/release/dolly] [--records 6]
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

INTRO = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
         "request.")
HERE = os.path.dirname(os.path.abspath(__file__))


def training_prompt(instruction, context):
    if context:
        return f"{INTRO}\n\n### Instruction:\n{instruction}\n\nInput:\n{context}\n\n### Response:\n"
    return f"{INTRO}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dolly", default="target/release/dolly")
    ap.add_argument("--lm-eval", default=os.path.join(os.path.dirname(sys.executable), "lm_eval"))
    ap.add_argument("--records", type=int, default=6)
    ap.add_argument("--data", default=os.path.join(HERE, "../../shared/data"))
    args = ap.parse_args()
    exe = os.path.abspath(args.dolly)
    tokenizer = os.path.abspath(os.path.join(args.data, "20B_tokenizer.json"))
    with tempfile.TemporaryDirectory() as d:
        # short records without context (the chat task sends the instruction alone)
        recs = []
        with open(os.path.join(args.data, "databricks-dolly-15k.jsonl")) as f:
            for line in f:
                r = json.loads(line)
                if not r["context"] and len(r["instruction"]) + len(r["response"]) < 400:
                    recs.append(r)
                if len(recs) == args.records:
                    break
        records = os.path.join(d, "records.jsonl")
        with open(records, "w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
        task_data = os.path.join(d, "task.jsonl")
        with open(task_data, "w") as f:
            for r in recs:
                f.write(json.dumps({"prompt": training_prompt(r["instruction"], ""),
                                    "target": r["response"] + "\n\n### End",
                                    "instruction": r["instruction"], "response": r["response"]}) + "\n")
        tasks = os.path.join(d, "tasks")
        os.makedirs(tasks)
        write_tasks(tasks, task_data)

        base, model = os.path.join(d, "base"), os.path.join(d, "model")
        run([exe, "init-model", "--tokenizer", "none", "--preset", "pythia-14m", "--output", base])
        run([exe, "train", "--input-model", base, "--tokenizer", tokenizer, "--training-dataset", records,
             "--local-output-dir", model, "--max-steps", "2", "--test-size", "0", "--per-device-train-batch-size",
             "2", "--max-length", "512", "--lr", "1e-3"])
        # dolly eval on the same records: the reference loss sum
        mj = os.path.join(d, "eval.json")
        run([exe, "eval", model, "--dataset", records, "--split", "all", "--test-size", "0", "--max-length", "2048",
             "--metrics-json", mj])
        ev = json.load(open(mj))
        want_ll = -ev["loss"] * ev["tokens"]
        want_answers = [generate(exe, model, r["instruction"]) for r in recs]

        p = subprocess.Popen([exe, "serve", model, "--port", "0", "--model-name", "dolly-check", "--log-requests",
                              "false"], stderr=subprocess.PIPE, text=True)
        try:
            addr = next(line.strip().split("http://")[1] for line in p.stderr if "http://" in line)
            out = os.path.join(d, "lm")
            common = ["--include_path", tasks, "--output_path", out, "--log_samples", "--batch_size", "1"]
            payloads = os.path.join(d, "payloads.jsonl")
            run([sys.executable, "-c", WRAP, payloads, "run", "--model", "local-completions", "--model_args",
                 f"model=dolly-check,base_url=http://{addr}/v1/completions,tokenizer_backend=huggingface,"
                 f"tokenizer={model},tokenized_requests=True,num_concurrent=1,max_retries=1",
                 "--tasks", "dolly_ll,dolly_gen", *common])
            run([args.lm_eval, "--model", "local-chat-completions", "--model_args",
                 f"model=dolly-check,base_url=http://{addr}/v1/chat/completions,num_concurrent=1,max_retries=1",
                 "--tasks", "dolly_chat", "--apply_chat_template", *common])
            # the server's echo of each loglikelihood request lm-eval sent, summed after lm-eval's context length
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(model)
            sent = [json.loads(line)[0] for line in open(payloads)]
            echo_sums = {}
            for r in recs:
                ctx_len = len(tok(training_prompt(r["instruction"], "").rstrip())["input_ids"])
                ids = next(x for x in sent if x[:ctx_len] == tok(training_prompt(r["instruction"], "").rstrip())
                           ["input_ids"])
                body = {"model": "dolly-check", "prompt": [ids], "max_tokens": 0, "echo": True, "logprobs": 0}
                lps = post(addr, "/v1/completions", body)["choices"][0]["logprobs"]["token_logprobs"]
                echo_sums[r["instruction"]] = sum(lps[ctx_len:])
        finally:
            p.terminate()
            rc = p.wait(timeout=60)
        assert rc == 0, f"dolly serve exited {rc}"

        ll = samples(out, "dolly_ll")
        assert len(ll) == len(recs)
        worst = 0.0
        for smp in ll:
            got, want = float(smp["resps"][0][0][0]), echo_sums[smp["doc"]["instruction"]]
            worst = max(worst, abs(got - want))
        assert worst < 1e-4, f"lm-eval's log-likelihood differs from the server's echo by {worst}"
        got_ll = sum(float(smp["resps"][0][0][0]) for smp in ll)
        print(f"dolly_ll: {len(ll)} log-likelihoods equal to the server's echo of lm-eval's ids (largest difference "
              f"{worst:.1e}); lm-eval's sum {got_ll:.4f} vs dolly eval's -loss sum {want_ll:.4f} over "
              f"{ev['tokens']} response tokens (different quantities: lm-eval drops the `### Response:\\n` token)")
        for task in ("dolly_gen", "dolly_chat"):
            got = [s["filtered_resps"][0].strip() for s in sorted(samples(out, task), key=lambda s: s["doc_id"])]
            for i, (g, w) in enumerate(zip(got, want_answers)):
                assert g == w.strip(), f"{task} doc {i}: lm-eval {g!r} vs dolly generate {w!r}"
            print(f"{task}: {len(got)} answers equal to dolly generate --greedy")
        print("lm-eval check passed")
    return 0


def write_tasks(tasks, data):
    src = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    with open(os.path.join(tasks, "dolly_ll.yaml"), "w") as f:
        f.write("task: dolly_ll\n" + src + "output_type: loglikelihood\ndoc_to_text: \"{{prompt}}\"\n"
                "doc_to_target: \"{{target}}\"\ntarget_delimiter: \"\"\nmetric_list:\n"
                # (no perplexity metric: its bootstrap stderr overflows on a barely trained model)
                "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    gen = ("output_type: generate_until\ndoc_to_target: \"{{response}}\"\ntarget_delimiter: \"\"\n"
           "generation_kwargs:\n  until: [\"### End\"]\n  max_gen_toks: 16\n  do_sample: false\n  temperature: 0\n"
           "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    with open(os.path.join(tasks, "dolly_gen.yaml"), "w") as f:
        f.write("task: dolly_gen\n" + src + "doc_to_text: \"{{prompt}}\"\n" + gen)
    with open(os.path.join(tasks, "dolly_chat.yaml"), "w") as f:
        f.write("task: dolly_chat\n" + src + "doc_to_text: \"{{instruction}}\"\n" + gen)


def generate(exe, model, instruction):
    o = subprocess.run([exe, "generate", model, instruction, "--greedy", "--max-new-tokens", "16", "--no-stream"],
                       check=True, capture_output=True, text=True)
    return o.stdout


# lm-eval's CLI with its completions payload builder recording each request's token ids (argv[1]: the file)
WRAP = """
import json, sys
import lm_eval.models.openai_completions as oc
out = sys.argv.pop(1)
orig = oc.LocalCompletionsAPI._create_payload
def record(self, messages, *a, **k):
    if not k.get("generate", a[0] if a else False):
        with open(out, "a") as f:
            f.write(json.dumps(messages) + "\\n")
    return orig(self, messages, *a, **k)
oc.LocalCompletionsAPI._create_payload = record
from lm_eval.__main__ import cli_evaluate
sys.argv[0] = "lm_eval"
sys.exit(cli_evaluate())
"""


def post(addr, path, body):
    import urllib.request
    req = urllib.request.Request(f"http://{addr}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


def samples(out, task):
    files = glob.glob(os.path.join(out, "**", f"samples_{task}_*.jsonl"), recursive=True)
    assert files, f"no samples file for {task} under {out}"
    with open(sorted(files)[-1]) as f:
        return [json.loads(line) for line in f]


def run(cmd):
    o = subprocess.run(cmd, capture_output=True, text=True)
    if o.returncode != 0:
        sys.stderr.write(o.stdout[-4000:] + o.stderr[-8000:])
        raise SystemExit(f"failed: {' '.join(cmd[:3])} ... (exit {o.returncode})")
    return o


if __name__ == "__main__":
    sys.exit(main())
