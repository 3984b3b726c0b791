"""flotilla.torch: names, like-specs and exact round trips."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import flotilla  # noqa: E402
import flotilla.torch as ft  # noqa: E402
from fakeworker import FakeWorker  # noqa: E402


class Net(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh())
        self.head = torch.nn.Linear(8, 2)
        self.scale = torch.nn.Parameter(torch.randn(3, dtype=torch.bfloat16))
        self.register_buffer("table", torch.arange(6, dtype=torch.int16).reshape(2, 3) * seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)) * self.scale.float().sum()


def train(model: Net, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 5, generator=g), torch.randn(16, 2, generator=g)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def bits(model: Net, optimizer: torch.optim.Optimizer) -> dict[str, bytes]:
    out = {}
    for name, value in ft.state_tensors(model, optimizer).items():
        array = value.array if isinstance(value, flotilla.Tensor) else value
        out[name] = np.ascontiguousarray(array).tobytes()
    return out


def make(seed: int, kind: str = "adam") -> tuple[Net, torch.optim.Optimizer]:
    model = Net(seed)
    if kind == "adam":
        return model, torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    return model, torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, dampening=0.1)


def test_names_and_specs() -> None:
    model, opt = make(1)
    train(model, opt, range(2))
    tensors = ft.state_tensors(model, opt)
    assert list(tensors)[:4] == ["model/scale", "model/table", "model/body/0/weight", "model/body/0/bias"]
    assert "model/body/1/num_batches_tracked" in tensors
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert f"optimizer/state/body/0/weight/{key}" in tensors
    assert tensors["optimizer/param_groups/0/lr"] == np.float64(1e-2)
    assert "optimizer/param_groups/0/betas" not in tensors
    assert "optimizer/param_groups/0/amsgrad" not in tensors
    assert isinstance(tensors["model/scale"], flotilla.Tensor)
    spec = ft.like(model, opt)
    assert spec["model/scale"] == ("BF16", (3,))
    assert spec["model/table"] == ("I16", (2, 3))
    assert spec["optimizer/state/scale/exp_avg"] == ("BF16", (3,))
    assert spec["optimizer/state/head/weight/step"] == ("F32", ())
    assert spec == {name: flotilla._tensors.spec_of(name, v) for name, v in tensors.items()}


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_round_trip_is_bit_exact(kind: str) -> None:
    model, opt = make(1, kind)
    train(model, opt, range(3))
    saved = {n: (v.array.copy() if isinstance(v, flotilla.Tensor) else v.copy())
             for n, v in ft.state_tensors(model, opt).items()}
    saved["optimizer/param_groups/0/lr"] = np.array(5e-3)

    other, other_opt = make(2, kind)  # another initialisation, no optimizer state
    assert not other_opt.state
    ft.load_state(other, other_opt, saved)
    assert other_opt.param_groups[0]["lr"] == 5e-3
    other_opt.param_groups[0]["lr"] = opt.param_groups[0]["lr"]
    assert bits(other, other_opt) == bits(model, opt)

    train(model, opt, range(3, 6))
    train(other, other_opt, range(3, 6))
    assert bits(other, other_opt) == bits(model, opt)


def test_like_leaves_a_fresh_optimizer_fresh() -> None:
    model, opt = make(1)
    reference, reference_opt = make(1)
    params_before = bits(model, None)
    assert "optimizer/state/head/bias/exp_avg_sq" in ft.like(model, opt)
    assert not opt.state and bits(model, None) == params_before
    assert all(p.grad is None for p in model.parameters())
    train(model, opt, range(4))
    train(reference, reference_opt, range(4))
    assert bits(model, opt) == bits(reference, reference_opt)


def test_mismatch_is_reported_whole_before_copying() -> None:
    model, _ = make(1)
    state = {n: v for n, v in ft.state_tensors(model).items() if n != "model/head/bias"}
    state["model/head/weight"] = np.zeros((3, 8), np.float32)
    state["model/table"] = np.zeros((2, 3), np.float32)
    state["model/extra"] = np.zeros(1, np.float32)
    target, target_opt = make(2)
    before = bits(target, None)
    with pytest.raises(flotilla.ModelMismatch) as e:
        ft.load_state(target, None, state)
    assert str(e.value) == (
        "state does not match the model: missing model/head/bias; unexpected model/extra; "
        "model/table has dtype F32, model expects I16; "
        "model/head/weight has shape [3, 8], model expects [2, 8]"
    )
    assert bits(target, None) == before and not target_opt.state


def test_save_and_restore_through_the_worker(worker: FakeWorker) -> None:
    model, opt = make(1)
    train(model, opt, range(3))
    worker.every_steps = 3
    with flotilla.init() as ctx:
        assert ctx.restore(like=ft.like(model, opt)) is None
        assert ctx.step_done(3)
        ctx.save(ft.state_tensors(model, opt))
    worker.shard, worker.hello = worker.saves[3], {"start_step": 3}

    restored, restored_opt = make(2)
    with flotilla.init() as ctx:
        state = ctx.restore(like=ft.like(restored, restored_opt))
        assert state is not None and state["model/scale"].dtype == np.uint16
        ft.load_state(restored, restored_opt, state)
    assert bits(restored, restored_opt) == bits(model, opt)
