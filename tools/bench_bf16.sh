#!/bin/bash
# bf16 products (issue 14): alternate the training step of two dolly binaries in f32 and bf16 compute, ROUNDS
# times, one JSON line per run under "== round R NAME". The new binary also runs bf16 compute on the f32 gemm
# (--no-bf16-kernel), the path CPUs without AVX512_BF16 take.
# Usage: tools/bench_bf16.sh OLD_BIN NEW_BIN [ROUNDS] [PRESET]   (batch 4 x 256, 5 timed steps after 1)
set -u
OLD=$1; NEW=$2; ROUNDS=${3:-3}; PRESET=${4:-pythia-70m}
run() {
  local round=$1 name=$2 bin=$3; shift 3
  echo "== round $round $name load $(cut -d" " -f1 /proc/loadavg)"
  "$bin" bench train --preset "$PRESET" --batch-size 4 --seq-len 256 --steps 5 --warmup 1 --json "$@"
}
for round in $(seq 1 "$ROUNDS"); do
  run "$round" old-f32 "$OLD"
  run "$round" new-f32 "$NEW"
  run "$round" old-bf16 "$OLD" --bf16
  run "$round" new-bf16 "$NEW" --bf16
  run "$round" new-bf16-f32-products "$NEW" --bf16 --no-bf16-kernel
done
