#!/usr/bin/env bash
# Peak memory of a LoRA run on Dolly's own model sizes (issue 14): a random pythia-2.8b and pythia-6.9b written
# in bf16 by `dolly init-model` (streamed, no f32 copy), then 2 LoRA steps (r 16, all-linear, Dolly's token rows)
# at batch 1 x 256 tokens with gradient checkpointing and --bf16 true (the base held in bf16). Prints, per
# preset: the run's own memory estimate, the peak RSS it recorded (VmHWM, metrics.jsonl's last row), the step
# time and the LoRA share. Not a CI test (minutes and 14 GB of disk per 6.9b model).
#
#   tools/bench_lora_memory.sh                  # both presets, models under ../bench-models (reused if present)
#   PRESETS="pythia-2.8b" tools/bench_lora_memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DOLLY=${DOLLY:-target/release/dolly}
MODELS=${MODELS:-../bench-models}
PRESETS=${PRESETS:-"pythia-2.8b pythia-6.9b"}
DATA=${DATA:-../shared/data/databricks-dolly-15k.jsonl}
TOK=${TOK:-../shared/data/20B_tokenizer.json}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
mkdir -p "$MODELS"
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; $(free -g | awk '/Mem:/ {print $2}') GiB"
for p in $PRESETS; do
  m="$MODELS/$p-bf16"
  if [ ! -f "$m/model.safetensors" ]; then
    /usr/bin/time -f "init-model $p: %e s, peak %M KiB" "$DOLLY" init-model --preset "$p" --dtype bf16 --tokenizer none --output "$m"
  fi
  head -n 200 "$DATA" > "$OUT/d.jsonl"
  /usr/bin/time -f "train $p: %e s wall, peak %M KiB (time's view)" "$DOLLY" train --input-model "$m" --tokenizer "$TOK" \
    --training-dataset "$OUT/d.jsonl" --local-output-dir "$OUT/$p" --max-steps 2 --per-device-train-batch-size 1 \
    --max-length 256 --test-size 0 --save-steps 100 --logging-steps 1 --lora-r 16 --bf16 true \
    --gradient-checkpointing true 2>&1 | grep -E "^(model|LoRA|memory|step|done|train )" || true
  python3 - "$OUT/$p/metrics.jsonl" "$p" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steps = [r for r in rows if "loss" in r]
peak = [r for r in rows if "peak_rss_bytes" in r][-1]["peak_rss_bytes"][0]
dt = steps[-1]["elapsed_s"] - steps[0]["elapsed_s"] if len(steps) > 1 else float("nan")
print(f"{sys.argv[2]}: peak RSS {peak / 2**30:.2f} GiB, second step {dt:.1f} s, tokens/s {steps[-1]['tokens_per_s']:.1f}")
EOF
done
