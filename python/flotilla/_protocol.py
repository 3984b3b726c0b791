"""The trainer protocol's messages as types (docs/TRAINER_PROTOCOL.md).

Every request the client sends and every reply the worker sends has a
``TypedDict`` here, with the field names and types of the Rust structs that
(de)serialize them in ``worker/src/exec/protocol.rs`` (``Request``, ``Okay``,
``Refusal``, ``HelloReply``, ``RestoreReply``, ``RestoredState``,
``StepReply``, ``SaveBeginReply``); ``python/tests/test_protocol_sync.py``
checks the two sides against each other.

A reply read from the socket is untyped (:data:`flotilla._wire.Message`)
until :func:`parse_reply` has checked it against its type: only then does
the client use it, so a worker that breaks the protocol gets a
``protocol`` error naming the field, never a ``KeyError`` or a wrong value
deep in the client.

This module evaluates its annotations at run time (:func:`parse_reply` reads
them with :func:`typing.get_type_hints`), so it spells unions ``Optional``
and ``Union``, not ``X | Y``, for Python 3.9.
"""

from collections.abc import Mapping
from functools import lru_cache
from typing import Literal, Optional, TypedDict, Union, cast, get_args, get_origin, get_type_hints

from ._errors import WORKER_ERROR_KINDS, FlotillaError, WorkerErrorKind

# ---- values inside messages -----------------------------------------------

#: A tensor declared by the trainer, ``[name, dtype, shape]`` (Rust:
#: ``TensorDecl = (String, String, Vec<usize>)``). Sent as an array.
TensorDecl = tuple[str, str, list[int]]

#: A tensor of a restored shard, ``[name, dtype, shape, offset, length]``
#: (Rust: ``(String, String, Vec<usize>, u64, u64)``): its bytes are
#: ``length`` bytes at ``offset`` of the shared-memory file.
RestoredTensor = tuple[str, str, list[int], int, int]

# ---- requests (Rust: `enum Request`, `#[serde(tag = "op", rename_all = "snake_case")]`) ----


class HelloRequest(TypedDict):
    """The first request. ``pid`` is documented and sent; the worker reads
    only ``version`` (serde ignores the rest)."""

    op: Literal["hello"]
    version: int
    pid: int


class RestoreRequest(TypedDict):
    """Waits until the job runs; ``like`` (None: take the shard as it is)
    is checked against the shard first."""

    op: Literal["restore"]
    like: Optional[list[TensorDecl]]


class StepRequest(TypedDict):
    """``step`` steps are complete."""

    op: Literal["step"]
    step: int


class SaveBeginRequest(TypedDict):
    """Asks for the snapshot buffer, right after a step answered
    ``checkpoint: true``."""

    op: Literal["save_begin"]
    tensors: list[TensorDecl]


class SaveDoneRequest(TypedDict):
    """The tensors are in the buffer; ``stall_seconds`` is the whole save's
    time."""

    op: Literal["save_done"]
    stall_seconds: float


class FinishRequest(TypedDict):
    """The rank is done; ``digest`` is an optional hex digest of its state."""

    op: Literal["finish"]
    digest: Optional[str]


#: Every request, told apart by ``op``.
Request = Union[
    HelloRequest, RestoreRequest, StepRequest, SaveBeginRequest, SaveDoneRequest, FinishRequest
]

#: Every request's ``op``.
Op = Literal["hello", "restore", "step", "save_begin", "save_done", "finish"]

# ---- replies ----------------------------------------------------------------


class OkReply(TypedDict):
    """The reply to ``save_done`` and ``finish`` (Rust: ``Okay``)."""

    ok: Literal[True]


class Refusal(TypedDict):
    """The reply to any request the worker refuses: ``error`` is one line
    that names the thing and the way out."""

    ok: Literal[False]
    kind: WorkerErrorKind
    error: str


class HelloReply(TypedDict):
    """The job and this rank."""

    ok: Literal[True]
    job: str
    rank: int
    world_size: int
    generation: int
    start_step: int
    restoring: bool
    local_rank: int
    master_addr: str
    master_port: str


class RestoredState(TypedDict):
    """The shard being restored: map ``size`` bytes of ``path`` (shared
    memory), read-write."""

    path: str
    size: int
    step: int
    tensors: list[RestoredTensor]


class RestoreReply(TypedDict):
    """``state`` is None on a fresh start."""

    ok: Literal[True]
    state: Optional[RestoredState]


class StepReply(TypedDict):
    """``checkpoint``: save now, before training further."""

    ok: Literal[True]
    checkpoint: bool


class SaveBeginReply(TypedDict):
    """The snapshot buffer (``size`` 0: nothing to map) and each tensor's
    offset in it, in the request's order."""

    ok: Literal[True]
    path: str
    size: int
    offsets: list[int]


#: Every reply.
Reply = Union[OkReply, Refusal, HelloReply, RestoreReply, StepReply, SaveBeginReply]

#: The reply type of each request (a refusal aside).
REPLY_TYPES: dict[Op, type] = {
    "hello": HelloReply,
    "restore": RestoreReply,
    "step": StepReply,
    "save_begin": SaveBeginReply,
    "save_done": OkReply,
    "finish": OkReply,
}

# ---- checking a decoded reply against its type ------------------------------


class _Mismatch(Exception):
    """A value that is not of its field's type: ``where`` it is, and what
    was expected."""

    def __init__(self, where: str, expected: str) -> None:
        super().__init__(where, expected)
        self.where = where
        self.expected = expected


def _name(hint: object) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return repr(hint).replace("typing.", "")


def _literal_values(hint: object) -> tuple[object, ...]:
    """The values of a ``Literal``, nested ones flattened."""
    values: list[object] = []
    for arg in get_args(hint):
        if get_origin(arg) is Literal:
            values.extend(_literal_values(arg))
        else:
            values.append(arg)
    return tuple(values)


def _convert(value: object, hint: object, where: str) -> object:
    """``value`` checked against ``hint``, arrays made tuples where the hint
    is a tuple; raises :class:`_Mismatch`."""
    origin = get_origin(hint)
    if hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is Literal:
        # 1 == True: compare types too
        if any(type(value) is type(v) and value == v for v in _literal_values(hint)):
            return value
    elif origin is Union:
        arms = get_args(hint)
        if value is None and type(None) in arms:
            return None
        others = [arm for arm in arms if arm is not type(None)]
        if len(others) == 1:  # an Optional: a mismatch inside it names its place
            return _convert(value, others[0], where)
        for arm in others:
            try:
                return _convert(value, arm, where)
            except _Mismatch:
                pass
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item,) = get_args(hint)
            return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is tuple:
        items = get_args(hint)
        if isinstance(value, (list, tuple)) and len(value) == len(items):
            return tuple(_convert(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, items)))
    elif isinstance(hint, type) and issubclass(hint, dict) and hasattr(hint, "__required_keys__"):
        # a TypedDict (typing.is_typeddict is 3.10+)
        if isinstance(value, Mapping):
            return _convert_fields(value, hint, where)
    else:
        raise TypeError(f"_convert: unsupported type {hint!r}")
    raise _Mismatch(where, _name(hint))


@lru_cache(maxsize=None)
def _hints(typed: type) -> dict[str, object]:
    """A TypedDict's fields and their types (read once: a reply comes every step)."""
    return get_type_hints(typed)


def _convert_fields(message: Mapping[str, object], typed: type, where: str) -> dict[str, object]:
    """The fields ``typed`` declares, each checked; other fields are left
    out (a newer worker may send more)."""
    out: dict[str, object] = {}
    for key, hint in _hints(typed).items():
        if key not in message:
            raise _Mismatch(f"{where}.{key}" if where else key, "missing")
        out[key] = _convert(message[key], hint, f"{where}.{key}" if where else key)
    return out


def _describe(message: Mapping[str, object], where: str) -> str:
    value: object = message
    for part in where.replace("[", ".").replace("]", "").split("."):
        if isinstance(value, Mapping):
            value = value.get(part)
        elif isinstance(value, (list, tuple)):
            value = value[int(part)]
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def protocol_error(message: str) -> FlotillaError:
    """An error of kind ``protocol``: the worker sent what the protocol does
    not allow."""
    return FlotillaError(f"the worker broke the trainer protocol: {message}", "protocol")


def _check(message: Mapping[str, object], typed: type, op: str) -> dict[str, object]:
    try:
        return _convert_fields(message, typed, "")
    except _Mismatch as e:
        if e.expected == "missing":
            raise protocol_error(f"its reply to {op!r} lacks {e.where!r}") from None
        raise protocol_error(
            f"its reply to {op!r} has {e.where} = {_describe(message, e.where)}, "
            f"expected {e.expected}"
        ) from None


def parse_reply(op: Op, message: Mapping[str, object]) -> Reply:
    """The worker's ``ok: true`` reply to ``op``, checked against its type.

    Raises:
        FlotillaError: (kind ``protocol``) a field is missing or of another
            type; the message names it.
    """
    # _check made it a REPLY_TYPES[op], one of Reply's arms, field by field
    return cast(Reply, _check(message, REPLY_TYPES[op], op))


def parse_refusal(op: Op, message: Mapping[str, object]) -> Refusal:
    """A reply without ``ok: true`` as a refusal. A kind this client does not
    know keeps the worker's message and becomes ``protocol``; a reply with
    neither ``kind`` nor ``error`` is a ``protocol`` refusal of ``op``."""
    error = message.get("error")
    kind = message.get("kind", "protocol")
    if not isinstance(error, str):
        error = f"the worker refused {op!r}"
    for known in WORKER_ERROR_KINDS:
        if kind == known:
            return {"ok": False, "kind": known, "error": error}
    return {
        "ok": False,
        "kind": "protocol",
        "error": f"{error} (error kind {kind!r}, unknown to this client: install the client "
        "of the worker's release)",
    }
