"""The examples in ../../examples run against fake workers: a run restored
from a checkpoint ends with the digest of a failure-free run (the --reference
mode). Skipped where the examples (or their framework) are not present."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from fakeworker import FakeWorker

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PACKAGE = Path(__file__).resolve().parents[1]

if not EXAMPLES.is_dir():
    pytest.skip("examples/ is not next to python/", allow_module_level=True)


def reference(script: str, *args: str) -> list[str]:
    """The per-rank digests printed by `train.py --reference ...`."""
    out = subprocess.run([sys.executable, str(EXAMPLES / script), "--reference", *args],
                         check=True, capture_output=True, text=True, env=_env()).stdout
    lines = [line.split() for line in out.splitlines()]
    lines = [line for line in lines if line[:1] == ["rank"] and line[2:3] == ["digest"]]
    assert [int(line[1]) for line in lines] == list(range(len(lines)))
    return [line[3] for line in lines]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(PACKAGE), **extra)
    return env


@contextmanager
def fake_workers(n: int, **hello: object) -> Iterator[list[FakeWorker]]:
    """n fake workers for the ranks 0..n-1 of one job."""
    with ExitStack() as stack:
        workers = []
        for rank in range(n):
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flotilla-")))
            worker = FakeWorker(directory, hello={"rank": rank, "world_size": n, **hello})
            stack.callback(worker.close)
            workers.append(worker)
        yield workers


def run_ranks(script: str, workers: list[FakeWorker], *args: str,
              extra_env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess[str]]:
    """Runs one process per fake worker, as `flotilla worker --exec` would."""
    procs = []
    for rank, worker in enumerate(workers):
        env = _env(FLOTILLA_SOCKET=worker.socket_path, RANK=str(rank),
                   WORLD_SIZE=str(len(workers)), **(extra_env or {}))
        procs.append(subprocess.Popen([sys.executable, str(EXAMPLES / script), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def restore_from(workers: list[FakeWorker], step: int) -> None:
    """Makes each fake worker restore the shard its rank saved at `step`."""
    for worker in workers:
        worker.shard = worker.saves[step]
        worker.hello["start_step"] = step
        worker.saves, worker.digests = {}, []


def rendezvous() -> dict[str, str]:
    """MASTER_ADDR and a free MASTER_PORT, as the worker gives them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(s.getsockname()[1])}


def check_checkpoint_and_restore(script: str, ranks: int, steps: int, every: int,
                                 restore_step: int, *args: str) -> None:
    """Runs the example under fake workers from the start (checkpointing
    every `every` steps), then again restored from `restore_step`: both must
    end with the reference's digests."""
    args = ("--steps", str(steps), *args)
    expected = reference(script, "--world-size", str(ranks), *args)
    with fake_workers(ranks) as workers:
        for worker in workers:
            worker.every_steps = every
        for rank, result in enumerate(run_ranks(script, workers, *args, extra_env=rendezvous())):
            assert result.returncode == 0, result.stderr
            assert f"rank {rank} digest {expected[rank]}" in result.stdout
        assert [w.digests for w in workers] == [[d] for d in expected]
        assert sorted(workers[0].saves) == list(range(every, steps + 1, every))

        restore_from(workers, restore_step)
        for result in run_ranks(script, workers, *args, extra_env=rendezvous()):
            assert result.returncode == 0, result.stderr
        assert [w.digests for w in workers] == [[d] for d in expected]
        assert workers[0].steps[-(steps - restore_step):] == list(range(restore_step + 1, steps + 1))


def test_numpy_example_restores_bit_exactly() -> None:
    check_checkpoint_and_restore("numpy/train.py", 2, 300, 100, 200)


def test_numpy_example_restoring_a_different_model_fails_clearly() -> None:
    with fake_workers(1) as workers:
        workers[0].every_steps = 10
        assert run_ranks("numpy/train.py", workers, "--steps", "10")[0].returncode == 0
        restore_from(workers, 10)
        result = run_ranks("numpy/train.py", workers, "--steps", "20", "--hidden", "48")[0]
    assert result.returncode != 0
    assert "flotilla.ModelMismatch: checkpoint 1 rank 0 does not match the model: " \
           "model/dense_0/kernel has shape [16, 32], model expects [16, 48]; " \
           "model/dense_0/bias has shape [32], model expects [48]; " in result.stderr


def test_pytorch_ddp_example_restores_bit_exactly() -> None:
    pytest.importorskip("torch")
    check_checkpoint_and_restore("pytorch_ddp/train.py", 4, 60, 20, 40, "--device", "cpu")


def test_tensorflow_example_restores_bit_exactly() -> None:
    pytest.importorskip("tensorflow")
    check_checkpoint_and_restore("tensorflow/train.py", 2, 40, 10, 20)


def test_tensorflow_example_changed_variant_is_refused_whole() -> None:
    pytest.importorskip("tensorflow")
    with fake_workers(1) as workers:
        workers[0].every_steps = 5
        assert run_ranks("tensorflow/train.py", workers, "--steps", "5")[0].returncode == 0
        restore_from(workers, 5)
        result = run_ranks("tensorflow/train.py", workers, "--steps", "10", "--variant", "changed")[0]
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("flotilla.ModelMismatch: checkpoint 1 rank 0 does not match the model: missing ")
    for part in ("optimizer/_trainable_variables/6, optimizer/_trainable_variables/7;",
                 "optimizer/_variables/17",  # the extra layer's Adam slots
                 "optimizer/_trainable_variables/0 has shape [16, 32], model expects [16, 64]",
                 "optimizer/_trainable_variables/4 has shape [32, 4], model expects [32, 32]"):
        assert part in error
