#!/usr/bin/env bash
# A silent host: SIGSTOP one worker (default failure settings: heartbeats
# every 500 ms, timeout 3000 ms) and time (a) until the coordinator starts
# a whole-job restore, (b) after SIGCONT, until every rank trains again.
#
#   scripts/bench-silent-host.sh [RUNS] [PARAMS_PER_RANK_BYTES]
set -euo pipefail
runs=${1:-3}
bytes=${2:-268435456}
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${FLOTILLA_BIN:-$here/target/release/flotilla}
[ -x "$bin" ] || (cd "$here" && cargo build --release --quiet)
dir=$(mktemp -d)
all=()
trap 'kill -9 "${all[@]}" 2>/dev/null; rm -rf "$dir"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
peers=""; https=(); apis=()
for i in 1 2 3; do
  r=$(port); h=$(port); a=$(port)
  peers="$peers${peers:+,}$i=127.0.0.1:$r"; https+=("127.0.0.1:$h"); apis+=("127.0.0.1:$a")
done
for i in 1 2 3; do
  RUST_LOG=warn "$bin" coordinator --id $i --peers "$peers" --http-addr "${https[$((i-1))]}" \
    --api-addr "${apis[$((i-1))]}" --data-dir "$dir/c$i" 2>"$dir/c$i.log" &
  all+=($!); disown
done
endpoints=$(printf 'http://%s,' "${https[@]}"); endpoints=${endpoints%,}
cat >"$dir/job.toml" <<TOML
name = "silent"
world_size = 4
[checkpoint]
every_steps = 50
root = "$dir/ckpt"
[trainer]
total_steps = 1000000
params_per_rank_bytes = $bytes
layers = 4
step_time_ms = 5
TOML
sleep 2
"$bin" submit "$dir/job.toml" --endpoints "$endpoints" >/dev/null
coordinators=$(IFS=,; echo "${apis[*]}")
pids=()
for r in 0 1 2 3; do
  RUST_LOG=warn "$bin" worker --coordinators "$coordinators" --job silent --rank $r 2>"$dir/w$r.log" &
  pids+=($!); all+=($!); disown
done
field() { "$bin" status --json --job silent --endpoints "$endpoints" | python3 -c "import json,sys; j=json.load(sys.stdin)['jobs'][0]; print($1)"; }
now() { date +%s.%N; }
until [ "$(field "j['state'] == 'running' and j['latest_committed'] is not None")" = True ]; do sleep 0.2; done
for run in $(seq 1 "$runs"); do
  gen=$(field "j['generation']")
  kill -STOP "${pids[1]}"; t0=$(now)
  until [ "$(field "j['generation']")" -gt "$gen" ]; do sleep 0.02; done; t1=$(now)
  kill -CONT "${pids[1]}"; t2=$(now)
  until [ "$(field "j['state'] == 'running'")" = True ]; do sleep 0.02; done; t3=$(now)
  python3 -c "print(f'run $run: SIGSTOP -> restore started {$t1-$t0:.2f} s; SIGCONT -> all ranks training {$t3-$t2:.2f} s')"
  sleep 2
done
