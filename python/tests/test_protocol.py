"""Replies are checked against their types before the client uses them."""

from __future__ import annotations

import pytest

import flotilla
from fakeworker import FakeWorker
from flotilla._protocol import parse_refusal, parse_reply

STATE = {"path": "/dev/shm/x", "size": 16, "step": 3, "tensors": [["w", "F32", [2, 2], 0, 16]]}


def test_a_valid_reply_comes_back_typed() -> None:
    reply = parse_reply("restore", {"ok": True, "state": STATE, "newer_field": 1})
    assert reply == {"ok": True, "state": {**STATE, "tensors": [("w", "F32", [2, 2], 0, 16)]}}
    assert parse_reply("restore", {"ok": True, "state": None}) == {"ok": True, "state": None}
    assert parse_reply("finish", {"ok": True}) == {"ok": True}


@pytest.mark.parametrize("op, reply, error", [
    ("hello", {"ok": True, "job": "j", "rank": 0, "world_size": 1, "generation": 1, "start_step": 0},
     "its reply to 'hello' lacks 'restoring'"),
    ("hello", {"ok": True, "job": "j", "rank": True, "world_size": 1, "generation": 1,
               "start_step": 0, "restoring": False},
     "its reply to 'hello' has rank = True, expected int"),
    ("step", {"ok": True, "checkpoint": "yes"}, "its reply to 'step' has checkpoint = 'yes', expected bool"),
    ("restore", {"ok": True, "state": {**STATE, "tensors": [["w", "F32", [2, 2], -1.5, 16]]}},
     r"its reply to 'restore' has state.tensors\[0\]\[3\] = -1.5, expected int"),
    ("restore", {"ok": True, "state": {"path": "/dev/shm/x"}}, "its reply to 'restore' lacks 'state.size'"),
    ("save_begin", {"ok": True, "path": "p", "size": 8, "offsets": [0, None]},
     r"its reply to 'save_begin' has offsets\[1\] = None, expected int"),
])
def test_a_broken_reply_is_a_protocol_error(op: str, reply: dict[str, object], error: str) -> None:
    with pytest.raises(flotilla.FlotillaError, match=f"^the worker broke the trainer protocol: {error}") as e:
        parse_reply(op, reply)
    assert e.value.kind == "protocol"


def test_refusals() -> None:
    assert parse_refusal("step", {"ok": False, "kind": "io", "error": "no room"}) == {
        "ok": False, "kind": "io", "error": "no room"}
    assert parse_refusal("step", {"ok": False}) == {
        "ok": False, "kind": "protocol", "error": "the worker refused 'step'"}
    unknown = parse_refusal("step", {"ok": False, "kind": "busy", "error": "try later"})
    assert unknown["kind"] == "protocol" and unknown["error"].startswith("try later (error kind 'busy'")


def test_the_client_checks_the_worker(worker: FakeWorker) -> None:
    worker.hello = {"world_size": "4"}
    with pytest.raises(flotilla.FlotillaError, match="has world_size = '4', expected int"):
        flotilla.init()
    worker.hello = {}
    worker.refuse = {"step": ("busy", "the worker is busy")}
    with flotilla.init() as ctx, pytest.raises(flotilla.FlotillaError) as e:
        ctx.step_done(1)
    assert e.value.kind == "protocol" and str(e.value).startswith("the worker is busy (error kind 'busy'")
