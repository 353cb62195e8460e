#!/bin/bash
# Alternate two dolly binaries (e.g. the previous commit's and this one's) on the engine benchmarks, ROUNDS times,
# printing one JSON line per run under "== round R old|new". Usage: tools/bench_ab.sh OLD_BIN NEW_BIN [ROUNDS]
# Build the old binary from a worktree of the previous commit (`git worktree add /tmp/old HEAD~1 &&
# cargo build --release --manifest-path /tmp/old/Cargo.toml`). Compare runs of one round only: speed drifts.
set -u
OLD=$1; NEW=$2; ROUNDS=${3:-3}
for round in $(seq 1 "$ROUNDS"); do
  for eng in old new; do
    B=$OLD; [ "$eng" = new ] && B=$NEW
    echo "== round $round $eng"
    "$B" bench train --steps 3 --warmup 1 --json
    for bs in 1 8; do
      "$B" bench generate --batch-size "$bs" --new-tokens 128 --runs 3 --json
      "$B" bench generate --batch-size "$bs" --new-tokens 128 --runs 3 --bf16 --json
    done
  done
done
