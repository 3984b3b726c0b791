#!/usr/bin/env python3
"""A deterministic numpy trainer run by Flotilla: per rank, a small MLP
regression trained with Adam, checkpointed and restored through the
``flotilla`` package.

Under a worker (one per rank):
    flotilla worker --coordinators ... --job numpy-mlp --rank R \\
        --exec -- python3 examples/numpy/train.py --steps 300

Without one, the digests a failure-free run must end with:
    python3 examples/numpy/train.py --reference --world-size 4 --steps 300

Every step is a pure function of (seed, rank, step, current variables), so a
run restored from a checkpoint at any step ends with the same digest.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import numpy as np

import flotilla

INPUTS, OUTPUTS, LAYERS = 16, 4, 3
BETA1, BETA2, EPSILON = np.float32(0.9), np.float32(0.999), np.float32(1e-8)

State = dict[str, np.ndarray[Any, Any]]


def layer_shapes(hidden: int) -> list[tuple[int, int]]:
    """(fan_in, fan_out) of each dense layer."""
    widths = [INPUTS] + [hidden] * (LAYERS - 1) + [OUTPUTS]
    return list(zip(widths[:-1], widths[1:]))


def hidden_for_bytes(n: int) -> int:
    """The hidden width whose state (weights, Adam m and v, f32) is about n bytes."""
    # bytes = 3 * 4 * (h² + (INPUTS + OUTPUTS + 2) h + OUTPUTS) + 8
    b = INPUTS + OUTPUTS + 2
    c = OUTPUTS - (n - 8) / 12
    return max(1, int((-b + math.sqrt(b * b - 4 * c)) / 2))


def model_names() -> list[str]:
    """The model's variable names, in a fixed order."""
    return [f"model/dense_{i}/{part}" for i in range(LAYERS) for part in ("kernel", "bias")]


def like_spec(hidden: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The variables this trainer saves and restores: (dtype, shape) by name."""
    spec: dict[str, tuple[str, tuple[int, ...]]] = {}
    for i, (fan_in, fan_out) in enumerate(layer_shapes(hidden)):
        spec[f"model/dense_{i}/kernel"] = ("F32", (fan_in, fan_out))
        spec[f"model/dense_{i}/bias"] = ("F32", (fan_out,))
    for name in model_names():
        spec[f"optimizer/{name}/m"] = spec[f"optimizer/{name}/v"] = spec[name]
    spec["optimizer/step"] = ("I64", ())
    return spec


def _seeds(seed: int, rank: int) -> list[np.random.SeedSequence]:
    # Step batches use [seed, rank, step + 1]; [seed, rank, 0] is the start.
    return np.random.SeedSequence([seed, rank, 0]).spawn(2)


def teacher(seed: int, rank: int) -> np.ndarray[Any, Any]:
    """The rank's regression target: y = sin(x @ teacher)."""
    rng = np.random.default_rng(_seeds(seed, rank)[0])
    return rng.standard_normal((INPUTS, OUTPUTS), dtype=np.float32) * np.float32(1 / math.sqrt(INPUTS))


def init_state(seed: int, rank: int, hidden: int) -> State:
    """A fresh model (scaled normal kernels, zero biases) and Adam state."""
    rng = np.random.default_rng(_seeds(seed, rank)[1])
    state: State = {}
    for name, (dtype, shape) in like_spec(hidden).items():
        if name.startswith("model/") and name.endswith("/kernel"):
            kernel = rng.standard_normal(shape, dtype=np.float32)
            kernel *= np.float32(1 / math.sqrt(shape[0]))
            state[name] = kernel
        else:
            state[name] = np.zeros(shape, np.int64 if dtype == "I64" else np.float32)
    return state


def train_step(
    state: State, target: np.ndarray[Any, Any], seed: int, rank: int, step: int,
    batch: int, lr: float,
) -> float:
    """Takes the model from `step` to `step + 1` steps in place (the arrays
    of `state` are updated, never replaced); returns the batch's loss."""
    rng = np.random.default_rng([seed, rank, step + 1])
    x = rng.standard_normal((batch, INPUTS), dtype=np.float32)
    y = np.sin(x @ target)

    # Forward: tanh hidden layers, linear output.
    activations = [x]
    for i in range(LAYERS):
        z = activations[-1] @ state[f"model/dense_{i}/kernel"] + state[f"model/dense_{i}/bias"]
        activations.append(np.tanh(z) if i < LAYERS - 1 else z)
    error = activations[-1] - y
    loss = float(np.mean(error * error))

    # Backward.
    grads: dict[str, np.ndarray[Any, Any]] = {}
    delta = error * np.float32(2 / error.size)
    for i in reversed(range(LAYERS)):
        grads[f"model/dense_{i}/kernel"] = activations[i].T @ delta
        grads[f"model/dense_{i}/bias"] = delta.sum(axis=0)
        if i > 0:
            h = activations[i]
            delta = (delta @ state[f"model/dense_{i}/kernel"].T) * (1 - h * h)

    # Adam.
    t = int(state["optimizer/step"]) + 1
    state["optimizer/step"][...] = t
    step_size = np.float32(lr * math.sqrt(1 - 0.999**t) / (1 - 0.9**t))
    for name, g in grads.items():
        m, v = state[f"optimizer/{name}/m"], state[f"optimizer/{name}/v"]
        m *= BETA1
        m += (1 - BETA1) * g
        v *= BETA2
        v += (1 - BETA2) * g * g
        state[name] -= step_size * m / (np.sqrt(v) + EPSILON)
    return loss


def run_under_flotilla(args: argparse.Namespace) -> None:
    """One rank, started by `flotilla worker ... --exec`."""
    ctx = flotilla.init()
    state = ctx.restore(like=like_spec(args.hidden))  # zero-copy views; trained in place
    if state is None:
        state = init_state(args.seed, ctx.rank, args.hidden)
    target = teacher(args.seed, ctx.rank)
    for step in range(ctx.start_step, args.steps):
        loss = train_step(state, target, args.seed, ctx.rank, step, args.batch, args.lr)
        time.sleep(args.step_time_ms / 1000)
        if args.log_every and (step + 1) % args.log_every == 0:
            print(f"rank {ctx.rank} step {step + 1} loss {loss:.6f}", flush=True)
        if ctx.step_done(step + 1):
            stall = ctx.save(state)
            print(f"rank {ctx.rank} step {step + 1} checkpoint, stall {stall * 1000:.1f} ms", flush=True)
    digest = flotilla.digest(state)
    print(f"rank {ctx.rank} digest {digest}", flush=True)
    ctx.finish(digest)
    ctx.close()


def reference(args: argparse.Namespace) -> None:
    """Every rank's failure-free run, in this process, without Flotilla."""
    for rank in range(args.world_size):
        state = init_state(args.seed, rank, args.hidden)
        target = teacher(args.seed, rank)
        for step in range(args.steps):
            train_step(state, target, args.seed, rank, step, args.batch, args.lr)
        print(f"rank {rank} digest {flotilla.digest(state)}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; see README.md."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="train until this step (default 300)")
    p.add_argument("--hidden", type=int, default=32, help="width of the hidden layers (default 32)")
    p.add_argument("--bytes", type=int, help="size the state to about this many bytes per rank "
                   "(sets --hidden; e.g. 268435456 for the stall benchmark)")
    p.add_argument("--batch", type=int, default=32, help="examples per step (default 32)")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam's learning rate (default 0.01)")
    p.add_argument("--seed", type=int, default=42, help="seed of data and initialisation (default 42)")
    p.add_argument("--step-time-ms", type=float, default=0, help="sleep per step, simulating compute (default 0)")
    p.add_argument("--log-every", type=int, default=100, help="print the loss every N steps; 0: never (default 100)")
    p.add_argument("--reference", action="store_true", help="no worker: run every rank here and print "
                   "'rank R digest HEX' for each")
    p.add_argument("--world-size", type=int, default=4, help="ranks to run with --reference (default 4)")
    args = p.parse_args(argv)
    if args.bytes is not None:
        args.hidden = hidden_for_bytes(args.bytes)
    if args.seed < 0 or args.hidden < 1 or args.batch < 1 or args.steps < 0:
        p.error("--seed, --steps must be >= 0 and --hidden, --batch >= 1")
    return args


def main() -> None:
    args = parse_args()
    if args.reference:
        reference(args)
    else:
        run_under_flotilla(args)


if __name__ == "__main__":
    main()
