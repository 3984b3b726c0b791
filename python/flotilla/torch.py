"""PyTorch adapter: a module's and an optimizer's state as Flotilla tensors.

Importing this module imports torch (``import flotilla`` alone does not).

Variable names:

* ``model/<key>``: every entry of ``model.state_dict()`` (parameters and
  persistent buffers), ``.`` in the key replaced by ``/``
  (``model/encoder/0/weight``);
* ``optimizer/state/<parameter name>/<key>``: the optimizer's per-parameter
  state (``exp_avg``, ``exp_avg_sq``, ``step`` for Adam; ``momentum_buffer``
  for SGD), the parameter named as in ``model.named_parameters()``;
* ``optimizer/param_groups/<i>/<key>``: each parameter group's numeric
  hyper-parameters (``lr``, ``eps``, ``weight_decay``, ...) as F64 scalars;
  the others (``betas``, flags) are not saved.

bfloat16 tensors travel as ``flotilla.Tensor(bits, "BF16")``. A
``DistributedDataParallel`` model is unwrapped, so its names are those of the
module inside.

Typical use::

    ctx = flotilla.init()
    state = ctx.restore(like=flotilla.torch.like(model, optimizer))
    if state is not None:
        flotilla.torch.load_state(model, optimizer, state)
    ...
    if ctx.step_done(step + 1):
        ctx.save(flotilla.torch.state_tensors(model, optimizer))
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

from ._errors import ModelMismatch
from ._tensors import Spec, Tensor, TensorLike, mismatch_message, state_specs

__all__ = ["init_optimizer_state", "like", "load_state", "state_tensors"]

_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.int64: "I64",
    torch.uint64: "U64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}


@dataclass(frozen=True)
class _Number:
    """A Python number kept in a dict: a parameter group's hyper-parameter,
    or a number in an optimizer's state. Saved as an F64 scalar."""

    owner: dict[Any, Any]
    key: Any

    def set(self, value: float) -> None:
        self.owner[self.key] = type(self.owner[self.key])(value)


_Entry = Union[torch.Tensor, _Number]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.module
    return model


def _entries(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    prefix_model: str,
    prefix_opt: str,
) -> dict[str, _Entry]:
    """Every variable by name: the live tensors (or numbers) that hold it."""
    model = _unwrap(model)
    entries: dict[str, _Entry] = {
        f"{prefix_model}/{key.replace('.', '/')}": tensor
        for key, tensor in model.state_dict().items()
    }
    if optimizer is None:
        return entries
    param_names = {id(p): name.replace(".", "/") for name, p in model.named_parameters()}
    for i, group in enumerate(optimizer.param_groups):
        for param in group["params"]:
            if id(param) not in param_names:
                raise ValueError(
                    f"the optimizer's parameter group {i} holds a parameter of shape "
                    f"{list(param.shape)} that is not in the model"
                )
            param_state = optimizer.state.get(param, {})
            for key, value in param_state.items():
                name = f"{prefix_opt}/state/{param_names[id(param)]}/{key}"
                if isinstance(value, torch.Tensor):
                    entries[name] = value
                elif _is_number(value):
                    entries[name] = _Number(param_state, key)
                elif value is not None:
                    raise TypeError(f"{name}: cannot save optimizer state of type {type(value).__name__}")
        for key, value in group.items():
            if key != "params" and _is_number(value):
                entries[f"{prefix_opt}/param_groups/{i}/{key}"] = _Number(group, key)
    return entries


def _spec(name: str, entry: _Entry) -> Spec:
    if isinstance(entry, _Number):
        return "F64", ()
    try:
        return _DTYPE_NAMES[entry.dtype], tuple(entry.shape)
    except KeyError:
        raise TypeError(f"{name}: dtype {entry.dtype} has no checkpoint dtype") from None


def state_tensors(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    prefix_model: str = "model",
    prefix_opt: str = "optimizer",
) -> dict[str, TensorLike]:
    """The model's (and optimizer's) state as arrays, for
    :meth:`flotilla.Context.save`.

    Tensors on a GPU are copied to the CPU; arrays of CPU tensors share
    their memory, so save them before training further.
    """
    out: dict[str, TensorLike] = {}
    for name, entry in _entries(model, optimizer, prefix_model, prefix_opt).items():
        _spec(name, entry)  # refuses dtypes a checkpoint cannot hold
        if isinstance(entry, _Number):
            out[name] = np.array(entry.owner[entry.key], dtype=np.float64)
            continue
        tensor = entry.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            out[name] = Tensor(tensor.view(torch.int16).numpy(), "BF16")
        else:
            out[name] = tensor.numpy()
    return out


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Creates the optimizer's per-parameter state without changing the
    parameters: one step with zero gradients, after which every parameter
    and gradient is put back bit for bit. The state's values are whatever
    that step left (to be overwritten by :func:`load_state`).

    For optimizers whose ``step()`` needs no closure (Adam, AdamW, SGD, ...);
    step hooks registered on the optimizer run once. :func:`like` and
    :func:`load_state` call it when the optimizer has no state yet.
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    saved = [(p, p.detach().clone(), p.grad) for p in params]
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
    finally:
        with torch.no_grad():
            for p, value, grad in saved:
                p.copy_(value)
                p.grad = grad


def like(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    prefix_model: str = "model",
    prefix_opt: str = "optimizer",
) -> dict[str, Spec]:
    """The like-spec of :func:`state_tensors`' variables, ``{name: (dtype,
    shape)}``, for :meth:`flotilla.Context.restore`.

    If the optimizer has no state yet (before its first step), the spec
    describes the state it will have: it is created with
    :func:`init_optimizer_state`, described, and removed again, leaving the
    optimizer as it was.
    """
    if optimizer is not None and not optimizer.state:
        init_optimizer_state(optimizer)
        try:
            return like(model, optimizer, prefix_model, prefix_opt)
        finally:
            optimizer.state.clear()
    entries = _entries(model, optimizer, prefix_model, prefix_opt)
    return {name: _spec(name, entry) for name, entry in entries.items()}


def _to_torch(array: np.ndarray[Any, Any], dtype: torch.dtype) -> torch.Tensor:
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if dtype == torch.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def load_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: Mapping[str, TensorLike],
    prefix_model: str = "model",
    prefix_opt: str = "optimizer",
) -> None:
    """Copies ``state`` (e.g. what :meth:`flotilla.Context.restore` returned)
    into the model's and optimizer's existing tensors, in place and bit for
    bit, onto each tensor's device. The optimizer's state is created first
    if it has none (see :func:`init_optimizer_state`).

    Raises:
        ModelMismatch: before anything is copied, listing every missing,
            unexpected, mis-typed and mis-shaped variable.
    """
    expected = like(model, optimizer, prefix_model, prefix_opt)
    message = mismatch_message(expected, state_specs(state, expected))
    if message:
        raise ModelMismatch(message)
    if optimizer is not None and not optimizer.state:
        init_optimizer_state(optimizer)
    entries = _entries(model, optimizer, prefix_model, prefix_opt)
    with torch.no_grad(), warnings.catch_warnings():
        # Read-only arrays are only read here.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, entry in entries.items():
            value = state[name]
            array = value.array if isinstance(value, Tensor) else np.asarray(value)
            if isinstance(entry, _Number):
                entry.set(array.item())
            else:
                entry.copy_(_to_torch(array, entry.dtype))
