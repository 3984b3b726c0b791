"""The exceptions a trainer sees.

Every error the worker sends keeps its ``kind`` (the protocol's error kind)
and its one-line message verbatim as ``str(error)``.
"""

from __future__ import annotations


class FlotillaError(Exception):
    """Any failure talking to the Flotilla worker, or a refusal from it.

    ``kind`` is the protocol's error kind (``protocol``, ``stopping``, ...) or
    ``client`` for errors found by this package before anything was sent.
    """

    def __init__(self, message: str, kind: str = "client") -> None:
        super().__init__(message)
        self.kind = kind


class RestoreRefused(FlotillaError):
    """The worker refused to restore the checkpoint (``device_memory``,
    ``corrupt``, ``unavailable``): the job is blocked or falls back to an
    older checkpoint, and this process should exit."""


class ModelMismatch(RestoreRefused):
    """The checkpoint's variables do not match the model (kind
    ``model_mismatch``). The message lists every missing, unexpected,
    mis-typed and mis-shaped variable at once."""

    def __init__(self, message: str, kind: str = "model_mismatch") -> None:
        super().__init__(message, kind)


class WorkerGone(FlotillaError):
    """The worker closed this process's socket: it stopped or died. The
    process must exit (it is no longer part of the job)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "worker_gone")
