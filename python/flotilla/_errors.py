"""The exceptions a trainer sees, and the protocol's error kinds.

Every error the worker sends keeps its ``kind`` (the protocol's error kind)
and its one-line message verbatim as ``str(error)``.
"""

from __future__ import annotations

from typing import Literal, cast, get_args

# The error kinds, each written once, here. python/tests/test_protocol_sync.py
# checks WorkerErrorKind against the kinds worker/src/exec/ sends.

#: Kinds with which the worker refuses a restore: the job is blocked or falls
#: back to an older checkpoint.
RestoreRefusalKind = Literal["model_mismatch", "device_memory", "corrupt", "unavailable"]

#: Every kind the worker sends in a refusal (its ``"kind"``): the restore
#: refusals; ``protocol`` (the trainer broke the protocol's rules, or speaks
#: another version); ``io`` (the worker could not make its snapshot buffer);
#: ``stopping`` (the worker is stopping this process: exit).
WorkerErrorKind = Literal[RestoreRefusalKind, "protocol", "io", "stopping"]

#: Kinds this package gives the errors it finds itself: ``client`` (found
#: before anything was sent), ``worker_gone`` (the worker closed the socket).
ClientErrorKind = Literal["client", "worker_gone"]

#: Every :attr:`FlotillaError.kind`.
ErrorKind = Literal[WorkerErrorKind, ClientErrorKind]


def _strings(literal: object) -> tuple[str, ...]:
    """A ``Literal``'s strings, nested ``Literal``\\ s flattened (Python 3.9.0
    does not flatten them itself)."""
    out: list[str] = []
    for arg in get_args(literal):
        if isinstance(arg, str):
            out.append(arg)
        else:
            out.extend(_strings(arg))
    return tuple(out)


# The casts hold: each tuple is exactly the strings of its Literal.
#: :data:`RestoreRefusalKind`'s values.
RESTORE_REFUSAL_KINDS = cast("tuple[RestoreRefusalKind, ...]", _strings(RestoreRefusalKind))
#: :data:`WorkerErrorKind`'s values.
WORKER_ERROR_KINDS = cast("tuple[WorkerErrorKind, ...]", _strings(WorkerErrorKind))
#: :data:`ErrorKind`'s values.
ERROR_KINDS = cast("tuple[ErrorKind, ...]", _strings(ErrorKind))


class FlotillaError(Exception):
    """Any failure talking to the Flotilla worker, or a refusal from it.

    ``kind`` is the protocol's error kind (``protocol``, ``stopping``, ...;
    see :data:`WorkerErrorKind`) or ``client`` for errors found by this
    package before anything was sent, ``worker_gone`` for :class:`WorkerGone`.
    """

    def __init__(self, message: str, kind: ErrorKind = "client") -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind


class RestoreRefused(FlotillaError):
    """The worker refused to restore the checkpoint (``device_memory``,
    ``corrupt``, ``unavailable``): the job is blocked or falls back to an
    older checkpoint, and this process should exit."""


class ModelMismatch(RestoreRefused):
    """The checkpoint's variables do not match the model (kind
    ``model_mismatch``). The message lists every missing, unexpected,
    mis-typed and mis-shaped variable at once."""

    def __init__(self, message: str, kind: ErrorKind = "model_mismatch") -> None:
        super().__init__(message, kind)


class WorkerGone(FlotillaError):
    """The worker closed this process's socket: it stopped or died. The
    process must exit (it is no longer part of the job)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "worker_gone")
