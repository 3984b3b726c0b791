"""Framing of the trainer protocol: a 4-byte little-endian length, then that
many bytes of MessagePack (a map with string keys), at most 16 MiB."""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack

from ._errors import FlotillaError, WorkerGone

#: The largest message either side may send.
MAX_FRAME = 16 * 1024 * 1024

_LENGTH = struct.Struct("<I")


def encode(message: dict[str, Any]) -> bytes:
    """One message as a frame (length prefix included)."""
    body: bytes = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise FlotillaError(
            f"a {message.get('op', 'message')!r} request of {len(body)} bytes exceeds the "
            f"protocol's {MAX_FRAME}-byte frame limit"
        )
    return _LENGTH.pack(len(body)) + body


def decode(body: bytes | bytearray) -> dict[str, Any]:
    """A frame's body (without the length prefix) as a message."""
    try:
        message = msgpack.unpackb(body, raw=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise FlotillaError(f"the worker sent a malformed message: {e}", "protocol") from None
    if not isinstance(message, dict):
        raise FlotillaError(
            f"the worker sent a {type(message).__name__}, expected a map", "protocol"
        )
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


def read_frame(sock: socket.socket) -> dict[str, Any]:
    """Reads one message; raises :class:`WorkerGone` when the socket closes."""
    (length,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))
    if length > MAX_FRAME:
        raise FlotillaError(
            f"the worker sent a frame of {length} bytes, over the {MAX_FRAME}-byte limit",
            "protocol",
        )
    return decode(_recv_exact(sock, length))


def write_frame(sock: socket.socket, message: dict[str, Any]) -> None:
    """Sends one message; raises :class:`WorkerGone` when the socket is closed."""
    frame = encode(message)
    try:
        sock.sendall(frame)
    except (BrokenPipeError, ConnectionResetError):
        raise _gone() from None
