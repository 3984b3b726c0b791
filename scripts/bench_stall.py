"""The trainer-side stall of ``ctx.save``, run as an ``--exec`` trainer.

At each checkpoint the coordinator schedules, this trainer times, on the
same state and in the same process:

- ``ctx.save(state)``: the whole stall a Flotilla checkpoint costs the
  trainer (its tensors copied into the worker's shared memory; the worker
  writes the shard in the background);
- a plain numpy copy of the same bytes into a preallocated buffer (the
  floor: one memcpy);
- with ``--torch-dir``, ``torch.save`` of the same tensors to a file there,
  flushed and fsynced (what a trainer that checkpoints by itself blocks on).

The order of the three alternates between checkpoints. Each rank writes
its figures to ``--out/rank-R.json``. Run it with ``scripts/bench-exec.sh``
or by hand:

    flotilla bench exec --kills 0 --workers 4 --every-steps 200 \\
      --env PYTHONPATH=$PWD/python -- python3 scripts/bench_stall.py --out /tmp/stall
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import flotilla

TENSORS = 16


def make_state(nbytes: int, rank: int) -> dict[str, np.ndarray[Any, Any]]:
    """TENSORS float32 arrays of about ``nbytes`` in all, every page touched."""
    per = max(1, nbytes // (4 * TENSORS))
    rng = np.random.default_rng(rank)
    return {f"model/block_{i}/w": rng.standard_normal(per, dtype=np.float32) for i in range(TENSORS)}


def numpy_copy(state: dict[str, np.ndarray[Any, Any]], into: np.ndarray[Any, Any]) -> None:
    at = 0
    for a in state.values():
        np.copyto(into[at : at + a.nbytes], a.view(np.uint8))
        at += a.nbytes


def torch_save(state: dict[str, np.ndarray[Any, Any]], path: Path) -> None:
    import torch

    with open(path, "wb") as f:
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, f)
        f.flush()
        os.fsync(f.fileno())


def timed(f: Callable[[], object]) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bytes", type=int, default=256 << 20, help="state per rank (default 256 MiB)")
    p.add_argument("--checkpoints", type=int, default=5, help="checkpoints to time (default 5)")
    p.add_argument("--step-time-ms", type=float, default=20, help="sleep per step (default 20)")
    p.add_argument("--out", type=Path, required=True, help="directory for rank-R.json")
    p.add_argument("--torch-dir", type=Path, help="also time torch.save into this directory")
    args = p.parse_args()

    ctx = flotilla.init()
    state = make_state(args.bytes, ctx.rank)
    restored = ctx.restore(like=state)  # declaring the layout lets the worker prepare its buffer
    if restored is not None:
        state = restored
    total = sum(a.nbytes for a in state.values())
    floor = np.ones(total, dtype=np.uint8)  # preallocated and touched, like the worker's buffer
    figures: dict[str, list[float]] = {"save": [], "numpy_copy": [], "torch_save": []}
    if args.torch_dir:
        args.torch_dir.mkdir(parents=True, exist_ok=True)
    step = ctx.start_step
    while len(figures["save"]) < args.checkpoints:
        time.sleep(args.step_time_ms / 1e3)
        state["model/block_0/w"][0] += 1
        step += 1
        if not ctx.step_done(step):
            continue
        runs: list[tuple[str, Callable[[], object]]] = [
            ("save", lambda: ctx.save(state)),
            ("numpy_copy", lambda: numpy_copy(state, floor)),
        ]
        if args.torch_dir:
            path = args.torch_dir / f"rank-{ctx.rank}.pt"
            runs.append(("torch_save", lambda: torch_save(state, path)))
        if len(figures["save"]) % 2:
            runs.reverse()
        for name, f in runs:
            figures[name].append(timed(f))
        print(f"step {step}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in figures.items() if v), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"rank": ctx.rank, "bytes": total, **{f"{k}_seconds": v for k, v in figures.items()}}
    (args.out / f"rank-{ctx.rank}.json").write_text(json.dumps(result))
    ctx.finish()


if __name__ == "__main__":
    main()
