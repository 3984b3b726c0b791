#!/usr/bin/env python3
"""A deterministic TensorFlow/Keras trainer run by Flotilla: per rank (no
collectives), an MLP regression trained with Adam; the model and optimizer
live in a tf.train.Checkpoint, saved and restored through
``flotilla.tensorflow``.

Under a worker (one per rank):
    flotilla worker --coordinators ... --job tensorflow-keras --rank R \\
        --exec -- python3 examples/tensorflow/train.py --steps 200

Without one, the digests a failure-free run must end with:
    python3 examples/tensorflow/train.py --reference --world-size 4 --steps 200

`--variant changed` builds a different model (the first layer wider, one
more layer): restoring a checkpoint of the normal model into it fails with
one flotilla.ModelMismatch naming every mismatched variable.
"""

from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # no start-up chatter

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import flotilla  # noqa: E402
import flotilla.tensorflow  # noqa: E402

INPUTS, OUTPUTS = 16, 4


def build(args: argparse.Namespace, rank: int) -> tuple[tf.train.Checkpoint, keras.Model, keras.optimizers.Optimizer]:
    """This rank's model and Adam optimizer (built, so its slots exist), in a
    checkpoint. The changed variant widens the first layer and adds one."""
    keras.utils.set_random_seed(int(np.random.SeedSequence([args.seed, rank]).generate_state(1)[0]))
    widths = [args.hidden] * 2
    if args.variant == "changed":
        widths = [args.hidden * 2, args.hidden, args.hidden]
    layers = [keras.layers.Dense(w, activation="tanh", name=f"dense_{i}") for i, w in enumerate(widths)]
    model = keras.Sequential([keras.Input((INPUTS,)), *layers, keras.layers.Dense(OUTPUTS, name="out")])
    optimizer = keras.optimizers.Adam(args.lr)
    optimizer.build(model.trainable_variables)
    return tf.train.Checkpoint(model=model, optimizer=optimizer), model, optimizer


def teacher(seed: int, rank: int) -> np.ndarray:
    """This rank's regression target: y = sin(x @ teacher)."""
    t = np.random.default_rng([seed, rank, 0]).standard_normal((INPUTS, OUTPUTS), dtype=np.float32)
    return t / np.float32(math.sqrt(INPUTS))


def train_step(
    model: keras.Model, optimizer: keras.optimizers.Optimizer, target: np.ndarray,
    args: argparse.Namespace, rank: int, step: int,
) -> float:
    """Takes the model from `step` to `step + 1` steps; returns the loss."""
    rng = np.random.default_rng([args.seed, rank, step + 1])
    x = rng.standard_normal((args.batch, INPUTS), dtype=np.float32)
    y = np.sin(x @ target)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x) - y))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return float(loss)


def run_under_flotilla(args: argparse.Namespace) -> None:
    """One rank, started by `flotilla worker ... --exec`."""
    ctx = flotilla.init()
    ckpt, model, optimizer = build(args, ctx.rank)
    state = ctx.restore(like=flotilla.tensorflow.like(ckpt))
    if state is not None:
        flotilla.tensorflow.load_state(ckpt, state)
    target = teacher(args.seed, ctx.rank)
    for step in range(ctx.start_step, args.steps):
        loss = train_step(model, optimizer, target, args, ctx.rank, step)
        time.sleep(args.step_time_ms / 1000)
        if args.log_every and (step + 1) % args.log_every == 0:
            print(f"rank {ctx.rank} step {step + 1} loss {loss:.6f}", flush=True)
        if ctx.step_done(step + 1):
            ctx.save(flotilla.tensorflow.state_tensors(ckpt))
    digest = flotilla.digest(flotilla.tensorflow.state_tensors(ckpt))
    print(f"rank {ctx.rank} digest {digest}", flush=True)
    ctx.finish(digest)
    ctx.close()


def reference(args: argparse.Namespace) -> None:
    """Every rank's failure-free run, in this process, without Flotilla."""
    for rank in range(args.world_size):
        ckpt, model, optimizer = build(args, rank)
        target = teacher(args.seed, rank)
        for step in range(args.steps):
            train_step(model, optimizer, target, args, rank, step)
        print(f"rank {rank} digest {flotilla.digest(flotilla.tensorflow.state_tensors(ckpt))}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; see README.md."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="train until this step (default 200)")
    p.add_argument("--hidden", type=int, default=32, help="width of the hidden layers (default 32)")
    p.add_argument("--batch", type=int, default=32, help="examples per step (default 32)")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam's learning rate (default 0.01)")
    p.add_argument("--seed", type=int, default=42, help="seed of data and initialisation (default 42)")
    p.add_argument("--variant", choices=["normal", "changed"], default="normal",
                   help="changed: first layer twice as wide and one more layer (default normal)")
    p.add_argument("--step-time-ms", type=float, default=0, help="sleep per step, simulating compute (default 0)")
    p.add_argument("--log-every", type=int, default=50, help="print the loss every N steps; 0: never (default 50)")
    p.add_argument("--reference", action="store_true", help="no worker: run every rank here and print "
                   "'rank R digest HEX' for each")
    p.add_argument("--world-size", type=int, default=4, help="ranks to run with --reference (default 4)")
    args = p.parse_args(argv)
    if args.seed < 0 or args.hidden < 1 or args.batch < 1 or args.steps < 0:
        p.error("--seed and --steps must be >= 0; --hidden and --batch >= 1")
    return args


def main() -> None:
    args = parse_args()
    tf.config.experimental.enable_op_determinism()
    if args.reference:
        reference(args)
    else:
        run_under_flotilla(args)


if __name__ == "__main__":
    main()
