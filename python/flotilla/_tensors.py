"""Dtypes, the `Tensor` wrapper, like-specs and model-mismatch messages.

Checkpoints name dtypes the way safetensors does (``F32``, ``BF16``, ...).
numpy has a dtype for every one of them except ``BF16``: bfloat16 tensors
travel as :class:`Tensor` objects holding their raw bits in a 2-byte integer
array, and :meth:`flotilla.Context.restore` returns them as ``uint16`` arrays.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from ._protocol import TensorDecl

#: safetensors dtype name -> numpy dtype (little-endian, as stored).
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
}

#: Bytes per element of every safetensors dtype the protocol knows.
ITEM_SIZES: dict[str, int] = {name: dt.itemsize for name, dt in NUMPY_DTYPES.items()}
ITEM_SIZES["BF16"] = 2

#: How a BF16 tensor comes back from a restore: its raw bits.
BF16_STORAGE = np.dtype("<u2")

Shape = tuple[int, ...]
#: A dtype as a caller may write it: a safetensors name or anything numpy accepts.
DTypeLike = Union[str, np.dtype[Any], type]
#: One variable's description: dtype name and shape.
Spec = tuple[str, Shape]


@dataclass(frozen=True)
class Tensor:
    """A tensor whose dtype numpy cannot express, as raw bits.

    ``Tensor(bits, "BF16")`` wraps a ``uint16`` (or ``int16``) array holding
    bfloat16 values bit for bit; :meth:`flotilla.Context.save` stores it as
    ``BF16``. Any safetensors dtype is accepted as long as the array's items
    have the same width, so the bytes are copied unchanged.
    """

    array: np.ndarray[Any, Any]
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in ITEM_SIZES:
            raise ValueError(
                f"unknown dtype {self.dtype!r}: use one of {', '.join(ITEM_SIZES)}"
            )
        if not isinstance(self.array, np.ndarray):
            raise TypeError(f"Tensor needs a numpy array, got {type(self.array).__name__}")
        if self.array.dtype.itemsize != ITEM_SIZES[self.dtype]:
            raise ValueError(
                f"a {self.dtype} tensor needs {ITEM_SIZES[self.dtype]}-byte items, "
                f"got an array of {self.array.dtype}"
            )

    @property
    def shape(self) -> Shape:
        """The tensor's shape."""
        return tuple(self.array.shape)


#: What ``save`` accepts per variable: an array, a numpy scalar (a 0-d
#: variable) or a :class:`Tensor`.
TensorLike = Union[np.ndarray[Any, Any], np.generic, Tensor]


def dtype_name(dtype: DTypeLike) -> str:
    """The safetensors name of a numpy dtype (or of a safetensors name).

    >>> dtype_name("float32"), dtype_name(np.int64), dtype_name("BF16")
    ('F32', 'I64', 'BF16')
    """
    if isinstance(dtype, str) and dtype in ITEM_SIZES:
        return dtype
    dt = np.dtype(dtype)
    for name, known in NUMPY_DTYPES.items():
        if dt.kind == known.kind and dt.itemsize == known.itemsize:
            return name
    raise TypeError(
        f"dtype {dt} has no checkpoint dtype: use one of bool, (u)int8..64, "
        "float16/32/64, or flotilla.Tensor(bits, 'BF16') for bfloat16"
    )


def spec_of(name: str, value: TensorLike) -> Spec:
    """The dtype name and shape of one variable to save (``name`` is only
    used in the error message)."""
    if isinstance(value, Tensor):
        return value.dtype, value.shape
    if not isinstance(value, (np.ndarray, np.generic)):
        raise TypeError(
            f"{name}: expected a numpy array or flotilla.Tensor, got {type(value).__name__}"
        )
    try:
        return dtype_name(value.dtype), tuple(value.shape)
    except TypeError as e:
        raise TypeError(f"{name}: {e}") from None


def normalize_like(
    like: Mapping[str, TensorLike | tuple[DTypeLike, Sequence[int]]],
) -> dict[str, Spec]:
    """Turns ``{name: array | Tensor | (dtype, shape)}`` into
    ``{name: (dtype_name, shape)}``."""
    out: dict[str, Spec] = {}
    for name, value in like.items():
        if isinstance(value, (np.ndarray, np.generic, Tensor)):
            out[name] = spec_of(name, value)
            continue
        try:
            dtype, shape = value
        except (TypeError, ValueError):
            raise TypeError(
                f"like[{name!r}]: expected an array, a flotilla.Tensor or (dtype, shape), "
                f"got {value!r}"
            ) from None
        try:
            out[name] = dtype_name(dtype), tuple(int(n) for n in shape)
        except TypeError as e:
            raise TypeError(f"like[{name!r}]: {e}") from None
    return out


def wire_specs(specs: Mapping[str, Spec]) -> list[TensorDecl]:
    """``{name: (dtype, shape)}`` as the protocol's ``[[name, dtype, shape], ...]``."""
    return [(name, dtype, list(shape)) for name, (dtype, shape) in specs.items()]


def _shape_text(shape: Shape) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def mismatch_message(
    expected: Mapping[str, Spec], actual: Mapping[str, Spec], what: str = "state"
) -> str | None:
    """Describes every difference between a model's variables (``expected``)
    and a state's (``actual``) in one line, in the model's order (unexpected
    ones in the state's), or returns None if they match.

    Format (SPEC §10): ``state does not match the model: missing a, b;
    unexpected c; x has shape [2, 3], model expects [3, 3]``.
    """
    missing = [n for n in expected if n not in actual]
    unexpected = [n for n in actual if n not in expected]
    parts = []
    if missing:
        parts.append("missing " + ", ".join(missing))
    if unexpected:
        parts.append("unexpected " + ", ".join(unexpected))
    for name in (n for n in expected if n in actual):
        (want_dtype, want_shape), (dtype, shape) = expected[name], actual[name]
        if dtype != want_dtype:
            parts.append(f"{name} has dtype {dtype}, model expects {want_dtype}")
        if shape != want_shape:
            parts.append(
                f"{name} has shape {_shape_text(shape)}, model expects {_shape_text(want_shape)}"
            )
    return f"{what} does not match the model: " + "; ".join(parts) if parts else None


def state_specs(state: Mapping[str, TensorLike], expected: Mapping[str, Spec]) -> dict[str, Spec]:
    """The specs of a state to load, read the way :meth:`Context.restore`
    returns them: an array of 2-byte integers stands for the ``BF16``
    variable the model expects under its name."""
    specs = {}
    for name, value in state.items():
        dtype, shape = spec_of(name, value)
        if expected.get(name, ("",))[0] == "BF16" and dtype in ("U16", "I16"):
            dtype = "BF16"
        specs[name] = (dtype, shape)
    return specs


def digest(tensors: Mapping[str, TensorLike]) -> str:
    """A hex sha256 of a state, e.g. for :meth:`flotilla.Context.finish`:
    over each variable by name, its UTF-8 name, a NUL byte, and its
    elements' bytes (C order, little-endian)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name]
        array = value.array if isinstance(value, Tensor) else np.asarray(value)
        h.update(name.encode() + b"\0")
        h.update(np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()
