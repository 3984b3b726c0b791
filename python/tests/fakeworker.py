"""An in-test stand-in for the worker's side of the trainer protocol.

It serves one connection at a time on a Unix socket in a thread, keeps the
shards saved to it, and can hand a shard back on a restore, so the client and
the examples can be tested without the Rust worker.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flotilla._tensors import BF16_STORAGE, NUMPY_DTYPES, mismatch_message
from flotilla._wire import read_frame, write_frame

#: A saved variable: dtype name, shape and raw little-endian bytes.
Stored = tuple[str, tuple[int, ...], bytes]


@dataclass
class FakeWorker:
    """Speaks the worker's side of docs/TRAINER_PROTOCOL.md.

    Attributes set before a connection: ``hello`` (the reply's fields),
    ``shard`` (restored on ``restore``; None for a fresh start),
    ``every_steps`` (checkpoint cadence), ``refuse`` (op -> (kind, error)),
    ``hang_up_on`` (an op after which the socket closes unanswered),
    ``restore_padding`` (bytes put before each restored tensor: 0 keeps the
    tensors of a shard saved in order of falling item size aligned).
    Recorded: ``likes``, ``steps``, ``saves`` (step -> shard), ``stalls``,
    ``digests``.
    """

    directory: Path
    hello: dict[str, Any] = field(default_factory=dict)
    shard: dict[str, Stored] | None = None
    every_steps: int = 0
    refuse: dict[str, tuple[str, str]] = field(default_factory=dict)
    hang_up_on: str | None = None
    restore_padding: int = 0
    likes: list[Any] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    saves: dict[int, dict[str, Stored]] = field(default_factory=dict)
    stalls: list[float] = field(default_factory=list)
    digests: list[str | None] = field(default_factory=list)
    snapshot_paths: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.socket_path = str(self.directory / "worker.sock")
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.socket_path)
        self._server.listen()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stops serving."""
        self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self._thread.join(5)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with conn:
                self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        session = _Session(self)
        while True:
            try:
                request = read_frame(conn)
            except Exception:
                return
            op = request["op"]
            if op == self.hang_up_on:
                return
            if op in self.refuse:
                kind, error = self.refuse[op]
                reply: dict[str, Any] = {"ok": False, "kind": kind, "error": error}
            else:
                reply = session.handle(op, request)
            write_frame(conn, reply)


class _Session:
    """One trainer process's conversation."""

    def __init__(self, worker: FakeWorker) -> None:
        self.worker = worker
        self.checkpoint_due = False
        self.pending: tuple[int, str, list[Any], list[int]] | None = None
        self.snapshot: tuple[list[Any], str] | None = None

    def handle(self, op: str, request: dict[str, Any]) -> dict[str, Any]:
        w = self.worker
        if op == "hello":
            assert request["version"] == 1 and request["pid"] > 0
            reply = {"job": "test", "rank": 0, "world_size": 1, "generation": 1,
                     "start_step": 0, "restoring": w.shard is not None,
                     "local_rank": 0, "master_addr": "", "master_port": ""}
            reply.update(w.hello)
            return {"ok": True, **reply}
        if op == "restore":
            return self.restore(request["like"])
        if op == "step":
            w.steps.append(request["step"])
            self.checkpoint_due = w.every_steps > 0 and request["step"] % w.every_steps == 0
            return {"ok": True, "checkpoint": self.checkpoint_due}
        if op == "save_begin":
            if not self.checkpoint_due:
                return {"ok": False, "kind": "protocol",
                        "error": "save_begin without a checkpoint due: call save only after "
                                 "step_done returned True"}
            self.checkpoint_due = False
            return self.save_begin(request["tensors"])
        if op == "save_done":
            return self.save_done(request["stall_seconds"])
        if op == "finish":
            w.digests.append(request["digest"])
            return {"ok": True}
        return {"ok": False, "kind": "protocol", "error": f"unknown op {op!r}"}

    def restore(self, like: list[Any] | None) -> dict[str, Any]:
        w = self.worker
        w.likes.append(like)
        if w.shard is None:
            return {"ok": True, "state": None}
        if like is not None:
            expected = {name: (dtype, tuple(shape)) for name, dtype, shape in like}
            actual = {name: (dtype, shape) for name, (dtype, shape, _) in w.shard.items()}
            message = mismatch_message(expected, actual, "checkpoint 1 rank 0")
            if message:
                return {"ok": False, "kind": "model_mismatch", "error": message}
        path = w.directory / f"restore-{len(w.likes)}"
        tensors, offset = [], 8  # after a pretend 8-byte header, like a safetensors file
        with open(path, "wb") as f:
            for name, (dtype, shape, data) in w.shard.items():
                offset += w.restore_padding
                f.seek(offset)
                f.write(data)
                tensors.append([name, dtype, list(shape), offset, len(data)])
                offset += len(data)
            f.truncate(offset)
        return {"ok": True, "state": {"path": str(path), "size": offset,
                                      "step": w.hello.get("start_step", 0), "tensors": tensors}}

    def save_begin(self, specs: list[Any]) -> dict[str, Any]:
        w = self.worker
        offsets, offset = [], 0
        for _, dtype, shape in specs:
            offsets.append(offset)
            item = 2 if dtype == "BF16" else NUMPY_DTYPES[dtype].itemsize
            offset += -(-item * int(np.prod(shape)) // 64) * 64
        if self.snapshot is None or self.snapshot[0] != specs:
            path = str(w.directory / f"snapshot-{len(w.snapshot_paths)}")
            with open(path, "wb") as f:
                f.truncate(offset)
            w.snapshot_paths.append(path)
            self.snapshot = (specs, path)
        self.pending = (w.steps[-1], self.snapshot[1], specs, offsets)
        return {"ok": True, "path": self.snapshot[1], "size": offset, "offsets": offsets}

    def save_done(self, stall: float) -> dict[str, Any]:
        w = self.worker
        assert self.pending is not None
        step, path, specs, offsets = self.pending
        data = Path(path).read_bytes()
        shard = {}
        for (name, dtype, shape), offset in zip(specs, offsets):
            item = BF16_STORAGE.itemsize if dtype == "BF16" else NUMPY_DTYPES[dtype].itemsize
            length = item * int(np.prod(shape))
            shard[name] = (dtype, tuple(shape), data[offset:offset + length])
        w.saves[step] = shard
        w.stalls.append(stall)
        self.pending = None
        return {"ok": True}
