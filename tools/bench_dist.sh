#!/usr/bin/env bash
# Distributed training throughput on one machine: 1 process x T threads (accumulation W, the same global batch)
# against W processes x T/W threads under ZeRO stages 0, 1, 2 and 3, alternating in rounds (speed drifts between
# minutes). Prints tokens/s per run (median over the logged steps after the first two), the ratio to the
# one-process run of the same round, and the share of step time spent inside collectives (rank 0).
# Needs a release binary built with `--features mpi` and Open MPI.
# With PACK=1 the rows are packed to 256 tokens: every rank's micro-batch then has the same shape, so the
# numbers show the cost of communication alone (padded rows of different lengths leave the rank with the
# shorter batch waiting at the reduction: docs/distributed.md#measurements).
# Usage: [PACK=1] tools/bench_dist.sh [ROUNDS=2] [PRESET=pythia-70m] [STEPS=12]
set -euo pipefail
ROUNDS=${1:-2}
PRESET=${2:-pythia-70m}
STEPS=${3:-12}
W=2
CORES=$(nproc)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${DOLLY_BIN:-$ROOT/target/release/dolly}
WORK=${BENCH_DIR:-/tmp/dolly-bench-dist}
DATA=${DOLLY_DATA:-$ROOT/../shared/data}
mkdir -p "$WORK"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
[ -d "$WORK/model-$PRESET" ] || "$BIN" init-model --preset "$PRESET" --seed 1 --tokenizer none --output "$WORK/model-$PRESET" >/dev/null
head -2000 "$DATA/databricks-dolly-15k.jsonl" > "$WORK/d.jsonl"
common=(train --input-model "$WORK/model-$PRESET" --tokenizer "$DATA/20B_tokenizer.json" --training-dataset "$WORK/d.jsonl"
  --per-device-train-batch-size 4 --max-length 256 --test-size 8 --eval-steps 100000 --save-steps 100000
  --max-steps "$STEPS" --logging-steps 1 --report-to none --overwrite-output-dir)
[ "${PACK:-0}" = 1 ] && common+=(--packing --pack-length 256)
median_tps() { python3 - "$1" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
steps = [r for r in rows if "tokens_per_s" in r]
tps = statistics.median(r["tokens_per_s"] for r in steps[2:])
# time inside collectives during the steps after the first two (start-up agreement excluded)
a, b = steps[1], steps[-1]
share = (b["comm_s"] - a["comm_s"]) / (b["elapsed_s"] - a["elapsed_s"]) if "comm_s" in a else 0.0
print(f"{tps:.0f} {share*100:.1f}")
PY
}
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $CORES cores; $PRESET, micro-batch 4, rows <= 256$([ "${PACK:-0}" = 1 ] && echo ' (packed)'), $STEPS steps"
for r in $(seq 1 "$ROUNDS"); do
  RAYON_NUM_THREADS=$CORES "$BIN" "${common[@]}" --gradient-accumulation-steps $W --local-output-dir "$WORK/one" 2>/dev/null
  read -r base _ < <(median_tps "$WORK/one")
  echo "round $r: 1 process x $CORES threads, accumulation $W: $base tok/s"
  for z in 0 1 2 3; do
    RAYON_NUM_THREADS=$((CORES / W)) mpirun --bind-to none --mca btl self,vader -np $W \
      "$BIN" "${common[@]}" --zero-stage $z --local-output-dir "$WORK/z$z" 2>/dev/null
    read -r tps share < <(median_tps "$WORK/z$z")
    python3 -c "print(f'round $r: $W processes x $((CORES / W)) thread(s), ZeRO-$z: $tps tok/s ({$tps/$base:.2f}x), collectives {$share}% of the step')"
  done
done
