"""The client against an in-test worker (tests/fakeworker.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest

import flotilla
from fakeworker import FakeWorker


def stored(array: np.ndarray, dtype: str | None = None) -> tuple[str, tuple[int, ...], bytes]:
    little = array.astype(array.dtype.newbyteorder("<"))
    return dtype or flotilla.dtype_name(array.dtype), array.shape, little.tobytes()


def test_init_outside_a_worker_says_how_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOTILLA_SOCKET", raising=False)
    with pytest.raises(flotilla.FlotillaError) as e:
        flotilla.init()
    assert "FLOTILLA_SOCKET is not set" in str(e.value)
    assert "flotilla worker" in str(e.value) and "--exec -- python train.py" in str(e.value)
    assert not isinstance(e.value, flotilla.WorkerGone)


def test_init_with_a_dead_socket(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> None:
    monkeypatch.setenv("FLOTILLA_SOCKET", os.path.join(tmp_path, "gone.sock"))
    with pytest.raises(flotilla.WorkerGone, match="gone.sock"):
        flotilla.init()


def test_hello(worker: FakeWorker) -> None:
    worker.hello = {"job": "demo", "rank": 2, "world_size": 4, "generation": 3, "start_step": 0}
    with flotilla.init() as ctx:
        assert (ctx.job, ctx.rank, ctx.world_size, ctx.generation, ctx.start_step) == ("demo", 2, 4, 3, 0)
        assert ctx.restoring is False


def test_init_puts_the_rank_it_was_given_in_the_environment(
    worker: FakeWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a spare's process starts before it has a rank: what torch.distributed
    # reads from the environment comes with the hello's answer
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    worker.hello = {"rank": 3, "world_size": 4, "local_rank": 1, "master_addr": "10.0.0.7", "master_port": "29511"}
    with flotilla.init():
        got = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    assert got == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29511"}


def test_fresh_start_sends_the_like_spec(worker: FakeWorker) -> None:
    with flotilla.init() as ctx:
        assert ctx.restore() is None
        assert ctx.restore(like={"model/w": np.zeros((2, 3), np.float32), "bf": ("BF16", (4,))}) is None
    assert worker.likes == [None, [["model/w", "F32", [2, 3]], ["bf", "BF16", [4]]]]


def test_restore_gives_writable_zero_copy_views(worker: FakeWorker) -> None:
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    bits = np.array([0x3F80, 0x4000, 0xBF80], dtype=np.uint16)
    worker.shard = {
        "model/w": stored(w),
        "model/h": stored(np.array([1.5, -2.0], dtype=np.float16)),
        "model/bf": stored(bits, "BF16"),
        "optimizer/step": stored(np.array(12, dtype=np.int64)),
        "mask": stored(np.array([True, False])),
        "empty": stored(np.zeros((0, 3), np.float64)),
    }
    worker.hello = {"start_step": 12}
    with flotilla.init() as ctx:
        assert ctx.restoring and ctx.start_step == 12
        state = ctx.restore(like={"model/w": w, "model/h": ("F16", [2]), "model/bf": ("BF16", [3]),
                                  "optimizer/step": (np.int64, ()), "mask": ("BOOL", [2]),
                                  "empty": ("F64", (0, 3))})
    assert state is not None and list(state) == list(worker.shard)
    np.testing.assert_array_equal(state["model/w"], w)
    assert state["model/h"].dtype == np.float16 and state["model/h"].tolist() == [1.5, -2.0]
    assert state["model/bf"].dtype == np.uint16 and state["model/bf"].tolist() == bits.tolist()
    assert state["optimizer/step"].shape == () and int(state["optimizer/step"]) == 12
    assert state["mask"].tolist() == [True, False] and state["empty"].shape == (0, 3)
    # Views of the shared file, writable: training can go on in place.
    restored = state["model/w"]
    assert restored.flags.writeable and not restored.flags.owndata
    restored += 1
    path = os.path.join(worker.directory, "restore-1")
    with open(path, "rb") as f:
        f.seek(8)
        assert np.frombuffer(f.read(24), np.float32).tolist() == (w + 1).ravel().tolist()


def test_restore_copies_misaligned_tensors(worker: FakeWorker) -> None:
    w = np.arange(6, dtype=np.float64)
    worker.shard = {"w": stored(w), "b": stored(np.array([True]))}
    worker.restore_padding = 1
    with flotilla.init() as ctx:
        state = ctx.restore()
    assert state is not None
    assert state["w"].flags.aligned and state["w"].flags.owndata and state["w"].tolist() == w.tolist()
    assert not state["b"].flags.owndata  # bytes are always aligned


@pytest.mark.parametrize("kind, error_type", [
    ("model_mismatch", flotilla.ModelMismatch),
    ("device_memory", flotilla.RestoreRefused),
    ("corrupt", flotilla.RestoreRefused),
    ("unavailable", flotilla.RestoreRefused),
    ("stopping", flotilla.FlotillaError),
    ("protocol", flotilla.FlotillaError),
])
def test_restore_refusals(worker: FakeWorker, kind: str, error_type: type) -> None:
    message = f"rank 2 on GPU 0 (NVIDIA H100): {kind}, the way out"
    worker.refuse = {"restore": (kind, message)}
    with flotilla.init() as ctx, pytest.raises(error_type) as e:
        ctx.restore(like={"w": ("F32", [1])})
    assert str(e.value) == message and e.value.kind == kind
    assert isinstance(e.value, flotilla.RestoreRefused) == (error_type is not flotilla.FlotillaError)


def test_model_mismatch_from_the_worker(worker: FakeWorker) -> None:
    worker.shard = {"model/a": stored(np.zeros((2, 3), np.float32))}
    with flotilla.init() as ctx, pytest.raises(flotilla.ModelMismatch) as e:
        ctx.restore(like={"model/a": ("F32", [3, 3]), "model/b": ("F32", [1])})
    assert str(e.value) == (
        "checkpoint 1 rank 0 does not match the model: missing model/b; "
        "model/a has shape [2, 3], model expects [3, 3]"
    )


def test_save_copies_every_kind_of_array(worker: FakeWorker) -> None:
    worker.every_steps = 2
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    tensors = {
        "z/non_contiguous": base[::2, 1::2],
        "a/transposed": base.T,
        "m/big_endian": np.arange(5, dtype=">f8"),
        "m/bool": np.array([True, False, True]),
        "m/bf16": flotilla.Tensor(np.array([0x3F80, 0x7FC0], dtype=np.uint16), "BF16"),
        "m/bf16_from_int16": flotilla.Tensor(np.array([-32768, 1], dtype=np.int16), "BF16"),
        "optimizer/step": np.array(2, dtype=np.int64),
        "scalar": np.float16(0.5),
        "empty": np.zeros((3, 0), np.uint8),
    }
    with flotilla.init() as ctx:
        assert ctx.step_done(1) is False
        assert ctx.step_done(2) is True
        stall = ctx.save(tensors)
        ctx.finish("ab12")
    assert worker.steps == [1, 2] and worker.stalls == [stall] and 0 < stall < 5
    assert worker.digests == ["ab12"]
    shard = worker.saves[2]
    assert list(shard) == list(tensors)  # the mapping's order
    assert shard["z/non_contiguous"] == ("F32", (2, 3), np.ascontiguousarray(base[::2, 1::2]).tobytes())
    assert shard["a/transposed"] == ("F32", (6, 4), np.ascontiguousarray(base.T).tobytes())
    assert shard["m/big_endian"] == ("F64", (5,), np.arange(5, dtype="<f8").tobytes())
    assert shard["m/bool"] == ("BOOL", (3,), b"\x01\x00\x01")
    assert shard["m/bf16"] == ("BF16", (2,), b"\x80\x3f\xc0\x7f")
    assert shard["m/bf16_from_int16"] == ("BF16", (2,), b"\x00\x80\x01\x00")
    assert shard["optimizer/step"] == ("I64", (), (2).to_bytes(8, "little"))
    assert shard["scalar"] == ("F16", (), np.float16(0.5).tobytes())
    assert shard["empty"] == ("U8", (3, 0), b"")


def test_save_reuses_the_mapping_until_the_variables_change(worker: FakeWorker) -> None:
    worker.every_steps = 1
    with flotilla.init() as ctx:
        for step in (1, 2):
            assert ctx.step_done(step)
            ctx.save({"w": np.full(3, step, np.float32)})
            if step == 1:
                first = ctx._save_buffer
        assert ctx._save_buffer is first
        assert ctx.step_done(3)
        ctx.save({"w": np.full(3, 3, np.float32), "extra": np.ones(1000, np.float64)})
        assert ctx._save_buffer is not first and first is not None and first[2].closed
    assert len(worker.snapshot_paths) == 2
    assert [np.frombuffer(worker.saves[s]["w"][2], np.float32)[0] for s in (1, 2, 3)] == [1, 2, 3]


def test_save_when_no_checkpoint_is_due(worker: FakeWorker) -> None:
    with flotilla.init() as ctx:
        ctx.step_done(1)
        with pytest.raises(flotilla.FlotillaError, match="save_begin without a checkpoint due") as e:
            ctx.save({"w": np.zeros(1, np.float32)})
    assert e.value.kind == "protocol"


def test_save_refuses_unsupported_dtypes_before_sending(worker: FakeWorker) -> None:
    worker.every_steps = 1
    with flotilla.init() as ctx:
        assert ctx.step_done(1)
        with pytest.raises(TypeError, match="^c: dtype complex128"):
            ctx.save({"w": np.zeros(1), "c": np.zeros(1, complex)})
        ctx.save({"w": np.zeros(1)})  # the checkpoint is still due
    assert list(worker.saves[1]) == ["w"]


def test_worker_gone(worker: FakeWorker) -> None:
    worker.hang_up_on = "step"
    with flotilla.init() as ctx, pytest.raises(flotilla.WorkerGone, match="must exit") as e:
        ctx.step_done(1)
    assert isinstance(e.value, flotilla.FlotillaError) and e.value.kind == "worker_gone"
