#!/usr/bin/env bash
# Compares `flotilla bench snapshot` with a plain `dd conv=fdatasync` of the
# same size, interleaved (the disk here swings 2-4x between runs), and prints
# the medians of the per-pair ratios.
#
#   scripts/bench-snapshot-vs-dd.sh [BYTES] [PAIRS] [DIR]
set -euo pipefail
bytes=${1:-1073741824}
pairs=${2:-5}
dir=${3:-${TMPDIR:-/tmp}/flotilla-bench}
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${FLOTILLA_BIN:-$here/target/release/flotilla}
[ -x "$bin" ] || (cd "$here" && cargo build --release --quiet)
mkdir -p "$dir"
mib=$(( (bytes + 1048575) / 1048576 ))

run_dd() {
  # dd prints e.g. "1073741824 bytes (1.1 GB, 1.0 GiB) copied, 0.61 s, 1.8 GB/s";
  # compute MB/s (10^6) from bytes and seconds ourselves
  local out secs
  out=$(LC_ALL=C dd if=/dev/zero of="$dir/dd.bin" bs=1M count="$mib" conv=fdatasync 2>&1 | tail -n 1)
  rm -f "$dir/dd.bin"
  secs=$(sed -E 's/.* copied, ([0-9.e+-]+) s.*/\1/' <<<"$out")
  python3 -c "print($mib*1048576/$secs/1e6)"
}

run_flotilla() {
  "$bin" bench snapshot --bytes "$bytes" --runs 1 --warmup 1 --dir "$dir" --json
}

results=$(mktemp)
for i in $(seq 1 "$pairs"); do
  if (( i % 2 )); then dd_mbps=$(run_dd); fl=$(run_flotilla); else fl=$(run_flotilla); dd_mbps=$(run_dd); fi
  python3 - "$dd_mbps" "$fl" >>"$results" <<'PY'
import json, sys
dd = float(sys.argv[1]); r = json.loads(sys.argv[2])
print(json.dumps({"dd_mb_per_s": dd, "write_mb_per_s": r["write_mb_per_s"],
                  "stall_seconds": r["stall_seconds"], "write_seconds": r["write_seconds"],
                  "read_verify_mb_per_s": r["read_verify_mb_per_s"]}))
PY
  tail -n 1 "$results" >&2
done
python3 - "$results" "$bytes" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
med = statistics.median
print(json.dumps({
    "bytes": int(sys.argv[2]), "pairs": len(rows),
    "dd_mb_per_s": round(med(r["dd_mb_per_s"] for r in rows), 1),
    "write_mb_per_s": round(med(r["write_mb_per_s"] for r in rows), 1),
    "write_vs_dd": round(med(r["write_mb_per_s"] / r["dd_mb_per_s"] for r in rows), 3),
    "stall_seconds": round(med(r["stall_seconds"] for r in rows), 4),
    "stall_vs_write": round(med(r["stall_seconds"] / r["write_seconds"] for r in rows), 4),
    "read_verify_mb_per_s": round(med(r["read_verify_mb_per_s"] for r in rows), 1),
}, indent=2))
PY
rm -f "$results"
