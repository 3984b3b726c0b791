#!/usr/bin/env bash
# The --exec figures of docs/BENCHMARKS.md, each from one run of a release
# build on a real local cluster (3 coordinators, 4 workers):
#   1. the trainer-side stall of ctx.save at 256 MiB per rank, against a
#      numpy copy of the same bytes and torch.save of the same state to the
#      same disk (when PYTHON has torch), alternating, medians;
#   2. a trainer process SIGKILLed → all ranks training again, for the numpy
#      example and (when PYTHON has torch) the PyTorch DDP example.
#   PYTHON  the interpreter (default python3; e.g. .venv-frameworks/bin/python)
#   DIR     where checkpoints and logs go (default: a temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
dir="${DIR:-$(mktemp -d)}"
mkdir -p "$dir"
cargo build --release --locked -q
bin=target/release/flotilla
env_args=(--env "PYTHONPATH=$PWD/python")
has_torch=$("$py" -c 'import torch' 2>/dev/null && echo yes || echo no)

echo "--- 1. ctx.save at 256 MiB per rank (4 ranks) against a numpy copy$([ "$has_torch" = yes ] && echo ' and torch.save')"
torch_args=()
[ "$has_torch" = yes ] && torch_args=(--torch-dir "$dir/torch-save")
rm -rf "$dir/stall"
"$bin" bench exec --kills 0 --workers 4 --every-steps 150 --dir "$dir/stall-cluster" "${env_args[@]}" -- \
  "$py" "$PWD/scripts/bench_stall.py" --bytes $((256 << 20)) --checkpoints 5 --out "$dir/stall" "${torch_args[@]}"
"$py" - "$dir/stall" <<'PY'
import json, pathlib, statistics, sys
runs = [json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("rank-*.json"))]
def med(key, skip_first=False):
    v = [x for r in runs for x in (r[key][1:] if skip_first else r[key])]
    return statistics.median(v) if v else None
save, first = med("save_seconds", True), statistics.median(r["save_seconds"][0] for r in runs)
copy, torch = med("numpy_copy_seconds"), med("torch_save_seconds")
print(f"ranks {len(runs)}, {runs[0]['bytes'] / 2**20:.0f} MiB each, {len(runs[0]['save_seconds'])} checkpoints")
print(f"ctx.save stall (median, first save excluded): {save * 1e3:.1f} ms")
print(f"first ctx.save of a process (creates the buffer): {first * 1e3:.1f} ms")
print(f"numpy copy of the same bytes (median): {copy * 1e3:.1f} ms   → ctx.save / copy = {save / copy:.2f}")
if torch:
    print(f"torch.save + fsync of the same state (median): {torch * 1e3:.1f} ms   → torch.save / ctx.save = {torch / save:.1f}×")
PY

echo "--- 2. a trainer process SIGKILLed → all 4 ranks training again: numpy example"
"$bin" bench exec --kills 5 --workers 4 --every-steps 50 --dir "$dir/numpy-cluster" "${env_args[@]}" -- \
  "$py" "$PWD/examples/numpy/train.py" --steps 1000000 --step-time-ms 10 --log-every 0
if [ "$has_torch" = yes ]; then
  echo "--- 2. the same: PyTorch DDP example (gloo)"
  "$bin" bench exec --kills 5 --workers 4 --every-steps 50 --dir "$dir/ddp-cluster" "${env_args[@]}" -- \
    "$py" "$PWD/examples/pytorch_ddp/train.py" --steps 1000000 --step-time-ms 10 --log-every 0
fi
echo "logs and checkpoints: $dir"
