"""TensorFlow adapter: the variables of a ``tf.train.Checkpoint``, by their
checkpoint names.

Importing this module imports TensorFlow (``import flotilla`` alone does
not).

A variable's name is the path by which TensorFlow's own checkpoints know it:
the first path to it in a breadth-first walk of the object graph from the
checkpoint (``tf.train.TrackableView``), its parts escaped as TensorFlow
does (``.`` -> ``..``, ``/`` -> ``.S``) and joined by ``/``; i.e. the keys
``tf.train.list_variables`` shows, without ``/.ATTRIBUTES/VARIABLE_VALUE``.
With Keras 3, a model's trainable variables are first reached through the
optimizer (``optimizer/_trainable_variables/0``) and its slot variables are
``optimizer/_variables/N``; without an optimizer in the checkpoint they are
reached through the model (``model/_functional/_operations/1/_kernel``).
Names are stable for a given model and optimizer built the same way.

Build a Keras optimizer before listing, so its slot variables exist::

    optimizer.build(model.trainable_variables)
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer)
    state = ctx.restore(like=flotilla.tensorflow.like(ckpt))
    if state is not None:
        flotilla.tensorflow.load_state(ckpt, state)
    ...
    if ctx.step_done(step + 1):
        ctx.save(flotilla.tensorflow.state_tensors(ckpt))

bfloat16 variables travel as ``flotilla.Tensor(bits, "BF16")``. Only
variables are covered (not lookup tables or other saveables).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from ._errors import ModelMismatch
from ._tensors import Spec, Tensor, TensorLike, mismatch_message, state_specs

try:
    import keras

    # type[Any]: an isinstance check keeps what TensorFlow's objects offer
    _VARIABLE_TYPES: tuple[type[Any], ...] = (tf.Variable, keras.Variable)
    _OPTIMIZER_TYPES: tuple[type[Any], ...] = (keras.optimizers.Optimizer,)
except ImportError:  # TensorFlow without Keras 3
    _VARIABLE_TYPES, _OPTIMIZER_TYPES = (tf.Variable,), ()

__all__ = ["like", "load_state", "state_tensors", "variables"]

_DTYPE_NAMES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int16": "I16",
    "uint16": "U16",
    "int32": "I32",
    "uint32": "U32",
    "int64": "I64",
    "uint64": "U64",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
}


def _escape(name: str) -> str:
    """One path part, escaped as TensorFlow's checkpoint keys escape it."""
    return name.replace(".", "..").replace("/", ".S")


def variables(ckpt: tf.train.Checkpoint) -> dict[str, Any]:
    """Every variable reachable from ``ckpt``, by checkpoint name, in
    breadth-first order.

    Raises:
        ValueError: a Keras optimizer in the graph is not built yet (its
            slot variables would be missing).
    """
    view = tf.train.TrackableView(ckpt)
    paths: dict[int, str] = {id(ckpt): ""}
    seen = [ckpt]  # keeps every visited object alive, so ids stay unique
    queue: deque[Any] = deque([ckpt])
    found: dict[str, Any] = {}
    while queue:
        node = queue.popleft()
        if isinstance(node, _OPTIMIZER_TYPES) and not node.built:
            raise ValueError(
                f"the optimizer at {paths[id(node)] or 'the root'} is not built, so its slot "
                "variables do not exist yet: call optimizer.build(model.trainable_variables) first"
            )
        for name, child in view.children(node).items():
            if id(child) in paths:
                continue
            parent = paths[id(node)]
            path = f"{parent}/{_escape(name)}" if parent else _escape(name)
            paths[id(child)] = path
            seen.append(child)
            if isinstance(child, _VARIABLE_TYPES):
                found[path] = child
            else:
                queue.append(child)
    return found


def _spec(name: str, variable: Any) -> Spec:
    dtype = tf.as_dtype(variable.dtype).name
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"{name}: dtype {dtype} has no checkpoint dtype")
    return _DTYPE_NAMES[dtype], tuple(int(n) for n in variable.shape)


def like(ckpt: tf.train.Checkpoint) -> dict[str, Spec]:
    """The like-spec of the checkpoint's variables, ``{name: (dtype,
    shape)}``, for :meth:`flotilla.Context.restore`."""
    return {name: _spec(name, v) for name, v in variables(ckpt).items()}


def state_tensors(ckpt: tf.train.Checkpoint) -> dict[str, TensorLike]:
    """The checkpoint's variables as arrays, for :meth:`flotilla.Context.save`."""
    out: dict[str, TensorLike] = {}
    for name, variable in variables(ckpt).items():
        dtype, _ = _spec(name, variable)
        value = variable.numpy()
        out[name] = Tensor(value.view(np.uint16), "BF16") if dtype == "BF16" else value
    return out


def load_state(ckpt: tf.train.Checkpoint, state: Mapping[str, TensorLike]) -> None:
    """Assigns ``state`` (e.g. what :meth:`flotilla.Context.restore` returned)
    to the checkpoint's variables by name, bit for bit.

    Raises:
        ModelMismatch: before anything is assigned, listing every missing,
            unexpected, mis-typed and mis-shaped variable.
    """
    found = variables(ckpt)
    expected = {name: _spec(name, v) for name, v in found.items()}
    message = mismatch_message(expected, state_specs(state, expected))
    if message:
        raise ModelMismatch(message)
    for name, variable in found.items():
        value = state[name]
        array = value.array if isinstance(value, Tensor) else np.asarray(value)
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        if expected[name][0] == "BF16":
            variable.assign(tf.bitcast(tf.constant(array.view(np.uint16)), tf.bfloat16))
        else:
            variable.assign(array)
