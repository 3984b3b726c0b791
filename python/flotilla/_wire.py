"""Framing of the trainer protocol: a 4-byte little-endian length, then that
many bytes of MessagePack (a map with string keys), at most 16 MiB.

What goes out is a typed message (:mod:`flotilla._protocol`); what comes in
is a :data:`Message`, a map not yet checked against any type:
:func:`flotilla._protocol.parse_reply` does that."""

from __future__ import annotations

import socket
import struct
from typing import Union

import msgpack

from ._errors import FlotillaError, WorkerGone
from ._protocol import Reply, Request

#: A decoded message, before it is checked against its type.
Message = dict[str, object]

#: What either side sends (the client sends requests; a worker, or the
#: tests' fake one, replies).
Outgoing = Union[Request, Reply]

#: The largest message either side may send.
MAX_FRAME = 16 * 1024 * 1024

_LENGTH = struct.Struct("<I")


def encode(message: Outgoing) -> bytes:
    """One message as a frame (length prefix included)."""
    body: bytes = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise FlotillaError(
            f"a {message.get('op', 'message')!r} request of {len(body)} bytes exceeds the "
            f"protocol's {MAX_FRAME}-byte frame limit"
        )
    return _LENGTH.pack(len(body)) + body


def decode(body: bytes | bytearray) -> Message:
    """A frame's body (without the length prefix) as a message."""
    try:
        message: object = msgpack.unpackb(body, raw=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise FlotillaError(f"the worker sent a malformed message: {e}", "protocol") from None
    if not isinstance(message, dict):
        raise FlotillaError(
            f"the worker sent a {type(message).__name__}, expected a map", "protocol"
        )
    for key in message:
        if not isinstance(key, str):
            raise FlotillaError(f"the worker sent a map with the key {key!r}, not a string", "protocol")
    return message


def _gone() -> WorkerGone:
    return WorkerGone(
        "the Flotilla worker closed this trainer's socket (it stopped or died); "
        "this process must exit"
    )


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        try:
            k = sock.recv_into(view[got:])
        except ConnectionResetError:
            raise _gone() from None
        if k == 0:
            raise _gone()
        got += k
    return buf


def read_frame(sock: socket.socket) -> Message:
    """Reads one message; raises :class:`WorkerGone` when the socket closes."""
    (length,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))
    if length > MAX_FRAME:
        raise FlotillaError(
            f"the worker sent a frame of {length} bytes, over the {MAX_FRAME}-byte limit",
            "protocol",
        )
    return decode(_recv_exact(sock, length))


def write_frame(sock: socket.socket, message: Outgoing) -> None:
    """Sends one message; raises :class:`WorkerGone` when the socket is closed."""
    frame = encode(message)
    try:
        sock.sendall(frame)
    except (BrokenPipeError, ConnectionResetError):
        raise _gone() from None
