"""The trainer's side of the worker protocol (docs/TRAINER_PROTOCOL.md)."""

from __future__ import annotations

import math
import mmap
import os
import socket
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Union, overload

import numpy as np

from ._errors import (
    RESTORE_REFUSAL_KINDS,
    FlotillaError,
    ModelMismatch,
    RestoreRefused,
    WorkerErrorKind,
    WorkerGone,
)
from ._protocol import (
    FinishRequest,
    HelloReply,
    HelloRequest,
    OkReply,
    Reply,
    Request,
    RestoreReply,
    RestoreRequest,
    SaveBeginReply,
    SaveBeginRequest,
    SaveDoneRequest,
    StepReply,
    StepRequest,
    protocol_error,
    parse_refusal,
    parse_reply,
)
from ._tensors import (
    BF16_STORAGE,
    NUMPY_DTYPES,
    DTypeLike,
    Tensor,
    TensorLike,
    normalize_like,
    spec_of,
    wire_specs,
)
from ._wire import read_frame, write_frame

#: The protocol version this client speaks.
PROTOCOL_VERSION = 1

#: A like-spec as :meth:`Context.restore` accepts it.
LikeSpec = Mapping[str, Union[TensorLike, tuple[DTypeLike, Sequence[int]]]]

#: Shared memory mapped by this process (an empty buffer stands for size 0).
_Buffer = Union[mmap.mmap, bytearray]


def _refusal(kind: WorkerErrorKind, message: str) -> FlotillaError:
    if kind == "model_mismatch":
        return ModelMismatch(message)
    if kind in RESTORE_REFUSAL_KINDS:
        return RestoreRefused(message, kind)
    return FlotillaError(message, kind)


@overload
def _exchange(sock: socket.socket, request: HelloRequest) -> HelloReply: ...
@overload
def _exchange(sock: socket.socket, request: RestoreRequest) -> RestoreReply: ...
@overload
def _exchange(sock: socket.socket, request: StepRequest) -> StepReply: ...
@overload
def _exchange(sock: socket.socket, request: SaveBeginRequest) -> SaveBeginReply: ...
@overload
def _exchange(sock: socket.socket, request: SaveDoneRequest | FinishRequest) -> OkReply: ...


def _exchange(sock: socket.socket, request: Request) -> Reply:
    """Sends one request and returns its reply, checked against the reply's
    type (:func:`parse_reply`); a refusal is raised."""
    write_frame(sock, request)
    reply = read_frame(sock)
    if reply.get("ok") is not True:
        refusal = parse_refusal(request["op"], reply)
        raise _refusal(refusal["kind"], refusal["error"])
    return parse_reply(request["op"], reply)


# Fill the page tables at map time: the worker touched the pages already,
# and faulting them in one by one during the first copy would triple it.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


def _map_shared(path: str, size: int) -> _Buffer:
    """Maps ``size`` bytes of the shared-memory file ``path``, shared and
    read-write."""
    if size == 0:
        return bytearray()
    try:
        fd = os.open(path, os.O_RDWR)
        try:
            return mmap.mmap(fd, size, flags=_MAP_FLAGS, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
    except (OSError, ValueError) as e:
        raise protocol_error(f"cannot map {size} bytes of {path}: {e}") from None


class Context:
    """This process's connection to its Flotilla worker; made by :func:`init`.

    Attributes (from the worker's answer to ``hello``):
        job: the job's name.
        rank: this process's rank, ``0 <= rank < world_size``.
        world_size: the number of ranks in the job.
        generation: the job's generation (grows by one with every restore).
        start_step: 0, or the step of the checkpoint being restored: train
            from here.
        restoring: whether a checkpoint is being restored, i.e. whether
            :meth:`restore` will return a state.
    """

    def __init__(self, sock: socket.socket, hello: HelloReply) -> None:
        self._sock = sock
        self.job: str = hello["job"]
        self.rank: int = hello["rank"]
        self.world_size: int = hello["world_size"]
        self.generation: int = hello["generation"]
        self.start_step: int = hello["start_step"]
        self.restoring: bool = hello["restoring"]
        # The worker's snapshot buffer: (path, size, mapping), reused while
        # the path and size stay the same.
        self._save_buffer: tuple[str, int, _Buffer] | None = None

    def restore(self, like: LikeSpec | None = None) -> dict[str, np.ndarray[Any, Any]] | None:
        """Waits until the job runs; returns None on a fresh start, else this
        rank's shard of the checkpoint being restored.

        Args:
            like: the model's variables, ``{name: array | flotilla.Tensor |
                (dtype, shape)}``; dtype is a numpy dtype or a safetensors
                name (``"BF16"`` for bfloat16). The worker checks the shard
                against it before this process sees a byte.

        Returns:
            ``{name: array}`` in the shard's order: writable zero-copy views
            of shared memory that stay valid for the life of the process (a
            copy instead where the worker's offset is not a multiple of the
            item size). BF16 variables come back as ``uint16`` arrays of
            their raw bits.

        Raises:
            ModelMismatch: the shard does not match ``like`` (the message
                names every difference).
            RestoreRefused: not enough device memory, a corrupt shard, or
                the checkpoint is unavailable; the job falls back or blocks.
            WorkerGone: the worker stopped; exit.
        """
        specs = None if like is None else wire_specs(normalize_like(like))
        state = _exchange(self._sock, {"op": "restore", "like": specs})["state"]
        if state is None:
            return None
        size = state["size"]
        buffer = _map_shared(state["path"], size)
        tensors: dict[str, np.ndarray[Any, Any]] = {}
        for name, dtype, shape, offset, length in state["tensors"]:
            np_dtype = BF16_STORAGE if dtype == "BF16" else NUMPY_DTYPES.get(dtype)
            if np_dtype is None:
                raise protocol_error(f"unknown dtype {dtype!r} for {name}")
            count = math.prod(shape)
            if count * np_dtype.itemsize != length or offset < 0 or offset + length > size:
                raise protocol_error(
                    f"{name} ({dtype} {shape}) does not fit {length} bytes at offset "
                    f"{offset} of a {size}-byte buffer"
                )
            view = np.frombuffer(buffer, np_dtype, count, offset).reshape(shape)
            # numpy computes on misaligned arrays by other code paths (no BLAS),
            # so results could differ in the last bits: copy those.
            tensors[name] = view if view.flags.aligned else view.copy()
        return tensors

    def step_done(self, step: int) -> bool:
        """Reports that ``step`` steps are complete; True when a checkpoint is
        due now: then call :meth:`save` before training further."""
        return _exchange(self._sock, {"op": "step", "step": int(step)})["checkpoint"]

    def save(self, tensors: Mapping[str, TensorLike]) -> float:
        """Copies this rank's variables into the worker's snapshot buffer;
        the worker then writes the shard while training goes on.

        Call it only right after :meth:`step_done` returned True. The
        variables are stored in the mapping's order; arrays may be
        non-contiguous or big-endian (they are stored C-contiguous,
        little-endian); bfloat16 goes as ``flotilla.Tensor(bits, "BF16")``.

        Returns:
            The stall: seconds this call kept training from going on (also
            reported to the worker as ``flotilla_snapshot_stall_seconds``).

        Raises:
            FlotillaError: no checkpoint is due (kind ``protocol``), or the
                worker refused.
            TypeError: a value is not an array of a checkpoint dtype.
        """
        start = time.perf_counter()
        items = list(tensors.items())
        specs = {name: spec_of(name, value) for name, value in items}
        reply = _exchange(self._sock, {"op": "save_begin", "tensors": wire_specs(specs)})
        path, size, offsets = reply["path"], reply["size"], reply["offsets"]
        if len(offsets) != len(items):
            raise protocol_error(f"{len(offsets)} offsets for {len(items)} tensors")
        buffer = self._snapshot_buffer(path, size)
        for (name, value), offset in zip(items, offsets):
            _copy_into(buffer, size, offset, name, value)
        stall = time.perf_counter() - start
        _exchange(self._sock, {"op": "save_done", "stall_seconds": stall})
        return stall

    def _snapshot_buffer(self, path: str, size: int) -> _Buffer:
        if self._save_buffer is not None:
            old_path, old_size, buffer = self._save_buffer
            if (old_path, old_size) == (path, size):
                return buffer
            self._close_save_buffer()
        buffer = _map_shared(path, size)
        self._save_buffer = (path, size, buffer)
        return buffer

    def _close_save_buffer(self) -> None:
        if self._save_buffer is not None:
            buffer = self._save_buffer[2]
            if isinstance(buffer, mmap.mmap):
                buffer.close()
            self._save_buffer = None

    def finish(self, digest: str | None = None) -> None:
        """Tells the worker this rank is done; exit 0 afterwards.

        Args:
            digest: an optional hex digest of this rank's final state; the
                worker combines the ranks' digests into the job's
                ``final_digest``.
        """
        _exchange(self._sock, {"op": "finish", "digest": digest})

    def close(self) -> None:
        """Closes the connection (restored arrays stay valid)."""
        self._close_save_buffer()
        self._sock.close()

    def __enter__(self) -> Context:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _copy_into(buffer: _Buffer, size: int, offset: int, name: str, value: TensorLike) -> None:
    """Copies one variable's elements to ``offset`` of the snapshot buffer,
    C-contiguous and little-endian, without intermediate copies."""
    array = value.array if isinstance(value, Tensor) else np.asarray(value)
    if array.size == 0:
        return
    if offset < 0 or offset + array.nbytes > size:
        raise protocol_error(
            f"offset {offset} for {name} ({array.nbytes} bytes) is outside the "
            f"{size}-byte snapshot buffer"
        )
    target = np.frombuffer(buffer, array.dtype.newbyteorder("<"), array.size, offset)
    np.copyto(target.reshape(array.shape), array, casting="equiv")


def _export_rank(hello: HelloReply) -> None:
    """Puts the rank the worker gave into ``os.environ``, as torchrun would,
    so that ``torch.distributed.init_process_group()`` after ``init()``
    works unchanged (a spare's process started before it had them)."""
    os.environ["RANK"] = str(hello["rank"])
    os.environ["WORLD_SIZE"] = str(hello["world_size"])
    os.environ["LOCAL_RANK"] = str(hello["local_rank"])
    if hello["master_addr"]:
        os.environ["MASTER_ADDR"] = hello["master_addr"]
        os.environ["MASTER_PORT"] = hello["master_port"]


def init() -> Context:
    """Connects to the worker that started this process (``FLOTILLA_SOCKET``)
    and says hello.

    Raises:
        FlotillaError: the process was not started by a Flotilla worker.
        WorkerGone: the worker's socket cannot be reached.
    """
    path = os.environ.get("FLOTILLA_SOCKET")
    if not path:
        raise FlotillaError(
            "flotilla.init(): FLOTILLA_SOCKET is not set, so this process was not started by a "
            "Flotilla worker; start it under one: flotilla worker --coordinators HOST:PORT,... "
            "--job JOB --rank R --exec -- python train.py ..."
        )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        raise WorkerGone(
            f"flotilla.init(): cannot connect to the Flotilla worker at FLOTILLA_SOCKET={path} "
            f"({e.strerror or e}): the worker stopped or died; this process must exit"
        ) from None
    try:
        # a spare's process waits here until the worker is given a rank
        hello = _exchange(sock, {"op": "hello", "version": PROTOCOL_VERSION, "pid": os.getpid()})
        _export_rank(hello)
        return Context(sock, hello)
    except BaseException:
        sock.close()
        raise
