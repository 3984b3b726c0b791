"""Framing: a 4-byte little-endian length, then MessagePack, at most 16 MiB."""

from __future__ import annotations

import socket
import struct
import threading

import msgpack
import pytest

import flotilla
from flotilla._wire import MAX_FRAME, decode, encode, read_frame, write_frame


def test_frame_layout() -> None:
    frame = encode({"op": "step", "step": 7, "blob": b"\x00\x01"})
    (length,) = struct.unpack("<I", frame[:4])
    assert length == len(frame) - 4
    assert msgpack.unpackb(frame[4:], raw=False) == {"op": "step", "step": 7, "blob": b"\x00\x01"}
    assert decode(frame[4:]) == {"op": "step", "step": 7, "blob": b"\x00\x01"}


def test_round_trip_over_a_socket_in_pieces() -> None:
    a, b = socket.socketpair()
    with a, b:
        frame = encode({"ok": True, "text": "é" * 1000})
        sender = threading.Thread(target=lambda: [b.sendall(frame[i:i + 3]) for i in range(0, len(frame), 3)])
        sender.start()
        assert read_frame(a) == {"ok": True, "text": "é" * 1000}
        sender.join()
        write_frame(a, {"op": "finish", "digest": None})
        assert read_frame(b) == {"op": "finish", "digest": None}


def test_oversized_frames_are_refused() -> None:
    with pytest.raises(flotilla.FlotillaError, match="frame limit"):
        encode({"op": "save_begin", "blob": b"x" * MAX_FRAME})
    a, b = socket.socketpair()
    with a, b:
        b.sendall(struct.pack("<I", MAX_FRAME + 1))
        with pytest.raises(flotilla.FlotillaError, match="over the 16777216-byte limit") as e:
            read_frame(a)
        assert e.value.kind == "protocol"


def test_malformed_messages_are_protocol_errors() -> None:
    with pytest.raises(flotilla.FlotillaError, match="expected a map"):
        decode(msgpack.packb([1, 2]))
    with pytest.raises(flotilla.FlotillaError, match="malformed"):
        decode(b"\xc1")


def test_a_closed_socket_means_the_worker_is_gone() -> None:
    a, b = socket.socketpair()
    with a:
        b.sendall(b"\x05\x00")  # half a length prefix, then EOF
        b.close()
        with pytest.raises(flotilla.WorkerGone, match="must exit"):
            read_frame(a)
        with pytest.raises(flotilla.WorkerGone):
            write_frame(a, {"op": "step", "step": 1})
