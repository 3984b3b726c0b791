"""flotilla.tensorflow: checkpoint names, exact round trips, whole mismatches."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import flotilla  # noqa: E402
import flotilla.tensorflow as ftf  # noqa: E402
from fakeworker import FakeWorker  # noqa: E402


def make(seed: int, widths: tuple[int, ...] = (8, 8)) -> tuple[tf.train.Checkpoint, keras.Model, keras.optimizers.Optimizer]:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((5,))] + [keras.layers.Dense(w, activation="tanh") for w in widths]
                             + [keras.layers.Dense(2)])
    optimizer = keras.optimizers.Adam(1e-2)
    optimizer.build(model.trainable_variables)
    extra = tf.Variable(tf.cast(tf.range(4, dtype=tf.float32) * seed, tf.bfloat16))
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, **{"odd.name/x": extra})
    return ckpt, model, optimizer


def train(model: keras.Model, optimizer: keras.optimizers.Optimizer, steps: range) -> None:
    for step in steps:
        rng = np.random.default_rng([step, 1])
        x, y = rng.standard_normal((16, 5), np.float32), rng.standard_normal((16, 2), np.float32)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))


def bits(ckpt: tf.train.Checkpoint) -> dict[str, bytes]:
    out = {}
    for name, value in ftf.state_tensors(ckpt).items():
        array = value.array if isinstance(value, flotilla.Tensor) else value
        out[name] = np.ascontiguousarray(array).tobytes()
    return out


def test_names_are_tensorflows_checkpoint_keys(tmp_path: os.PathLike[str]) -> None:
    ckpt, model, optimizer = make(1)
    train(model, optimizer, range(2))
    path = ckpt.write(os.path.join(tmp_path, "ckpt"))
    suffix = "/.ATTRIBUTES/VARIABLE_VALUE"
    keys = {k[: -len(suffix)]: tuple(shape) for k, shape in tf.train.list_variables(path) if k.endswith(suffix)}
    spec = ftf.like(ckpt)
    assert {name: shape for name, (_, shape) in spec.items()} == keys
    assert spec["odd..name.Sx"] == ("BF16", (4,))
    assert spec["optimizer/_iterations"] == ("I64", ())
    assert spec["optimizer/_trainable_variables/0"] == ("F32", (5, 8))
    assert len([n for n in spec if n.startswith("optimizer/_variables/")]) == 2 * 6  # m, v
    assert isinstance(ftf.state_tensors(ckpt)["odd..name.Sx"], flotilla.Tensor)


def test_round_trip_is_bit_exact() -> None:
    ckpt, model, optimizer = make(1)
    train(model, optimizer, range(3))
    saved = {n: (v.array.copy() if isinstance(v, flotilla.Tensor) else v.copy())
             for n, v in ftf.state_tensors(ckpt).items()}
    other, other_model, other_optimizer = make(2)
    assert bits(other) != bits(ckpt)
    ftf.load_state(other, saved)
    assert bits(other) == bits(ckpt)
    train(model, optimizer, range(3, 6))
    train(other_model, other_optimizer, range(3, 6))
    assert bits(other) == bits(ckpt)


def test_mismatch_lists_every_variable_before_assigning() -> None:
    ckpt, _, _ = make(1)
    state = ftf.state_tensors(ckpt)
    changed, _, _ = make(2, widths=(12, 8, 8))
    before = bits(changed)
    with pytest.raises(flotilla.ModelMismatch) as e:
        ftf.load_state(changed, state)
    message = str(e.value)
    assert message.startswith("state does not match the model: missing ")
    for part in ("optimizer/_trainable_variables/6, optimizer/_trainable_variables/7",
                 "optimizer/_trainable_variables/0 has shape [5, 8], model expects [5, 12]",
                 "optimizer/_trainable_variables/2 has shape [8, 8], model expects [12, 8]",
                 "optimizer/_variables/2 has shape [5, 8], model expects [5, 12]"):
        assert part in message
    assert "unexpected" not in message
    assert bits(changed) == before


def test_an_unbuilt_optimizer_is_refused() -> None:
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    ckpt = tf.train.Checkpoint(model=model, optimizer=keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match=r"optimizer\.build\(model\.trainable_variables\)"):
        ftf.like(ckpt)


def test_save_and_restore_through_the_worker(worker: FakeWorker) -> None:
    ckpt, model, optimizer = make(1)
    train(model, optimizer, range(2))
    worker.every_steps = 2
    with flotilla.init() as ctx:
        assert ctx.restore(like=ftf.like(ckpt)) is None
        assert ctx.step_done(2)
        ctx.save(ftf.state_tensors(ckpt))
    worker.shard, worker.hello = worker.saves[2], {"start_step": 2}
    restored, _, _ = make(3)
    with flotilla.init() as ctx:
        state = ctx.restore(like=ftf.like(restored))
        assert state is not None
        ftf.load_state(restored, state)
    assert bits(restored) == bits(ckpt)
