#!/usr/bin/env bash
# Interleaved coordinator benchmark of two builds on the same machine:
#   scripts/bench-compare.sh OLD_BINARY NEW_BINARY [PAIRS]
# runs `bench coordinator` at 1,024 workers (a connection each) and at
# 10,000 workers on node sessions, old then new, PAIRS times (default 2).
# Shards go to a tmpfs (/dev/shm/fl-bench). Compare medians, not one run.
set -euo pipefail
OLD=${1:?usage: $0 OLD_BINARY NEW_BINARY [PAIRS]}
NEW=${2:?usage: $0 OLD_BINARY NEW_BINARY [PAIRS]}
PAIRS=${3:-2}
DIR=/dev/shm/fl-bench
run() {
  rm -rf "$DIR"
  echo "=== $1 $2"
  "$3" bench coordinator --shard-dir "$DIR" "${@:4}" 2>&1 | grep -E "checkpoint round|restore directive|leader CPU|leader memory"
}
for i in $(seq "$PAIRS"); do
  for b in OLD NEW; do run "run $i $b" "1024 per-rank" "${!b}" --workers 1024 --rounds 20 --failures 3; done
  for b in OLD NEW; do
    run "run $i $b" "10000 node-sessions" "${!b}" --workers 10000 --rounds 10 --failures 1 --heartbeat-ms 500 --node-sessions
  done
done
rm -rf "$DIR"
