"""Dtype names, the Tensor wrapper, like-specs and mismatch messages."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

import flotilla
from flotilla._tensors import mismatch_message, normalize_like, spec_of, state_specs, wire_specs

PAIRS = [
    (np.bool_, "BOOL"), (np.uint8, "U8"), (np.int8, "I8"), (np.int16, "I16"),
    (np.uint16, "U16"), (np.int32, "I32"), (np.uint32, "U32"), (np.int64, "I64"),
    (np.uint64, "U64"), (np.float16, "F16"), (np.float32, "F32"), (np.float64, "F64"),
]


@pytest.mark.parametrize("np_dtype, name", PAIRS)
def test_dtype_names(np_dtype: type, name: str) -> None:
    assert flotilla.dtype_name(np_dtype) == name
    assert flotilla.dtype_name(np.dtype(np_dtype)) == name
    assert flotilla.dtype_name(np.dtype(np_dtype).str) == name  # e.g. "<f4"
    assert flotilla.dtype_name(name) == name


def test_dtype_names_ignore_byte_order_and_accept_bf16() -> None:
    assert flotilla.dtype_name(">f4") == "F32"
    assert flotilla.dtype_name("float64") == "F64"
    assert flotilla.dtype_name("BF16") == "BF16"
    # "U8" is the safetensors name, not numpy's 8-character unicode string.
    assert flotilla.dtype_name("U8") == "U8"


@pytest.mark.parametrize("bad", [np.complex64, np.float128 if hasattr(np, "float128") else object, "U3"])
def test_unsupported_dtypes_are_refused(bad: object) -> None:
    with pytest.raises(TypeError, match="has no checkpoint dtype"):
        flotilla.dtype_name(bad)  # type: ignore[arg-type]


def test_tensor_wrapper() -> None:
    bits = np.array([0x3F80, 0xC000], dtype=np.uint16)
    t = flotilla.Tensor(bits, "BF16")
    assert t.shape == (2,) and spec_of("x", t) == ("BF16", (2,))
    assert flotilla.Tensor(bits.view(np.int16), "BF16").dtype == "BF16"
    with pytest.raises(ValueError, match="2-byte items"):
        flotilla.Tensor(np.zeros(2, np.float32), "BF16")
    with pytest.raises(ValueError, match="unknown dtype"):
        flotilla.Tensor(bits, "bfloat16")
    with pytest.raises(TypeError, match="numpy array"):
        flotilla.Tensor([1, 2], "BF16")  # type: ignore[arg-type]


def test_spec_of_names_the_variable() -> None:
    assert spec_of("s", np.float32(1.5)) == ("F32", ())
    assert spec_of("s", np.zeros((), np.int64)) == ("I64", ())
    with pytest.raises(TypeError, match="^model/w: dtype complex128"):
        spec_of("model/w", np.zeros(2, complex))
    with pytest.raises(TypeError, match="^model/w: expected a numpy array"):
        spec_of("model/w", [1.0])  # type: ignore[arg-type]


def test_normalize_like() -> None:
    like = normalize_like({
        "a": np.zeros((2, 3), np.float32),
        "b": ("float16", [4]),
        "c": (np.int64, ()),
        "d": ("BF16", (5, 6)),
        "e": (np.dtype(">u4"), np.array([7])),
        "f": flotilla.Tensor(np.zeros(3, np.uint16), "BF16"),
        "g": ("I8", []),
    })
    assert like == {
        "a": ("F32", (2, 3)), "b": ("F16", (4,)), "c": ("I64", ()), "d": ("BF16", (5, 6)),
        "e": ("U32", (7,)), "f": ("BF16", (3,)), "g": ("I8", ()),
    }
    assert list(like) == list("abcdefg")
    # tuples, sent as MessagePack arrays
    assert wire_specs(like)[:2] == [("a", "F32", [2, 3]), ("b", "F16", [4])]
    assert type(wire_specs(like)[4][2][0]) is int


def test_normalize_like_errors_name_the_variable() -> None:
    with pytest.raises(TypeError, match=r"like\['x'\]: expected an array"):
        normalize_like({"x": 3})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"like\['y'\]: dtype complex64"):
        normalize_like({"y": (np.complex64, [1])})


def test_mismatch_lists_everything_at_once() -> None:
    expected = {"m/a": ("F32", (3, 3)), "m/b": ("F32", (1,)), "m/c": ("F32", (2,)),
                "m/x": ("F32", (3, 3)), "m/y": ("F16", (2,))}
    actual = {"m/x": ("F32", (2, 3)), "m/y": ("F32", (2,)), "m/z": ("I64", ()),
              "m/c": ("F32", (2,))}
    assert mismatch_message(expected, actual) == (
        "state does not match the model: missing m/a, m/b; unexpected m/z; "
        "m/x has shape [2, 3], model expects [3, 3]; m/y has dtype F32, model expects F16"
    )
    assert mismatch_message(expected, dict(expected)) is None
    assert mismatch_message({"s": ("F64", ())}, {"s": ("F64", (1,))}, "checkpoint 7 rank 2") == (
        "checkpoint 7 rank 2 does not match the model: s has shape [1], model expects []"
    )


def test_state_specs_read_raw_bits_as_bf16_where_expected() -> None:
    expected = {"w": ("BF16", (2,)), "u": ("U16", (2,))}
    state = {"w": np.zeros(2, np.uint16), "u": np.zeros(2, np.uint16)}
    assert state_specs(state, expected) == {"w": ("BF16", (2,)), "u": ("U16", (2,))}
    assert state_specs({"w": np.zeros(2, np.float16)}, expected) == {"w": ("F16", (2,))}


def test_digest() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    expected = hashlib.sha256(b"a\0" + a.tobytes() + b"b\0" + b"\x01\x00").hexdigest()
    bits = flotilla.Tensor(np.array([1], np.uint16), "BF16")
    assert flotilla.digest({"b": bits, "a": a}) == expected
    assert flotilla.digest({"a": a.astype(">f4"), "b": np.array([1], np.int16)}) == expected
    assert flotilla.digest({"a": np.asfortranarray(a), "b": bits}) == expected
    assert flotilla.digest({"a": a, "b": np.array([2], np.uint16)}) != expected
