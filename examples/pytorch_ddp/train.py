#!/usr/bin/env python3
"""A deterministic PyTorch DistributedDataParallel trainer run by Flotilla:
an MLP regression trained with Adam over all ranks, checkpointed and
restored through ``flotilla.torch``.

Under a worker (one per rank; the worker sets MASTER_ADDR, MASTER_PORT,
RANK and WORLD_SIZE for torch.distributed):
    flotilla worker --coordinators ... --job pytorch-ddp --rank R \\
        --exec -- python3 examples/pytorch_ddp/train.py --steps 200

Without one (4 local processes, no Flotilla), the digests a failure-free run
must end with:
    python3 examples/pytorch_ddp/train.py --reference --world-size 4 --steps 200

All ranks hold the same replica, so they print the same digest.
"""

import argparse
import math
import os
import socket
import time
from typing import Any

# cuBLAS is deterministic only with a fixed workspace; set before CUDA starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import flotilla  # noqa: E402
import flotilla.torch  # noqa: E402

INPUTS, OUTPUTS = 16, 4


def pick_device(args: argparse.Namespace) -> torch.device:
    """CUDA (this process's GPU) or CPU, as --device says."""
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        torch.set_num_threads(1)  # several ranks per host; one thread keeps results fixed
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def build(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model (the same initialisation on every rank) and its optimizer."""
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(INPUTS, args.hidden), torch.nn.Tanh(),
        torch.nn.Linear(args.hidden, args.hidden), torch.nn.Tanh(),
        torch.nn.Linear(args.hidden, OUTPUTS),
    ).to(device)
    return model, torch.optim.Adam(model.parameters(), lr=args.lr)


def teacher(seed: int, device: torch.device) -> torch.Tensor:
    """The regression target: y = sin(x @ teacher)."""
    t = np.random.default_rng(seed).standard_normal((INPUTS, OUTPUTS), dtype=np.float32)
    return torch.from_numpy(t / np.float32(math.sqrt(INPUTS))).to(device)


# No `from __future__ import annotations` here: DDP checks this hook's
# annotations at run time.
def rank_ordered_mean(_: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: averages a bucket of gradients over the ranks,
    summing in rank order.

    An all-reduce sums in an order that depends on where each gradient lies
    in DDP's bucket, and DDP re-lays its buckets out after the first
    iteration: a run restored from a checkpoint would sum its first step
    differently from an uninterrupted run, and differ in the last bits.
    """
    grads = bucket.buffer()
    parts = [torch.empty_like(grads) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, grads)
    total = parts[0]
    for part in parts[1:]:
        total += part
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(total.div_(len(parts)))
    return future


def train_step(
    ddp: DistributedDataParallel, optimizer: torch.optim.Optimizer, target: torch.Tensor,
    args: argparse.Namespace, rank: int, step: int,
) -> float:
    """Takes the model from `step` to `step + 1` steps on this rank's batch
    (gradients averaged over all ranks); returns the local loss."""
    rng = np.random.default_rng([args.seed, rank, step + 1])
    x = torch.from_numpy(rng.standard_normal((args.batch, INPUTS), dtype=np.float32)).to(target.device)
    y = torch.sin(x @ target)
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(ddp(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()


def run(args: argparse.Namespace, ctx: flotilla.Context | None, rank: int) -> str:
    """This rank's training from start (or from the checkpoint the worker
    restores, with `ctx`); returns the digest of the final state."""
    torch.use_deterministic_algorithms(True)
    device = pick_device(args)
    model, optimizer = build(args, device)
    start_step = 0
    if ctx is not None:
        state = ctx.restore(like=flotilla.torch.like(model, optimizer))
        if state is not None:
            flotilla.torch.load_state(model, optimizer, state)
        start_step = ctx.start_step
    # MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE come from the environment.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    ddp.register_comm_hook(None, rank_ordered_mean)
    target = teacher(args.seed, device)
    for step in range(start_step, args.steps):
        loss = train_step(ddp, optimizer, target, args, rank, step)
        if args.log_every and (step + 1) % args.log_every == 0:
            print(f"rank {rank} step {step + 1} loss {loss:.6f}", flush=True)
        if ctx is not None:
            time.sleep(args.step_time_ms / 1000)
            if ctx.step_done(step + 1):
                ctx.save(flotilla.torch.state_tensors(model, optimizer))
    dist.destroy_process_group()
    return flotilla.digest(flotilla.torch.state_tensors(model, optimizer))


def run_under_flotilla(args: argparse.Namespace) -> None:
    """One rank, started by `flotilla worker ... --exec`."""
    ctx = flotilla.init()
    digest = run(args, ctx, ctx.rank)
    print(f"rank {ctx.rank} digest {digest}", flush=True)
    ctx.finish(digest)
    ctx.close()


def _reference_rank(rank: int, args: argparse.Namespace, port: int, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(args.world_size), LOCAL_RANK=str(rank))
    results.put((rank, run(args, None, rank)))


def reference(args: argparse.Namespace) -> None:
    """A failure-free run of every rank in local processes, without Flotilla."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_reference_rank, args=(args, port, results), nprocs=args.world_size)
    for rank, digest in sorted(results.get() for _ in range(args.world_size)):
        print(f"rank {rank} digest {digest}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; see README.md."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="train until this step (default 200)")
    p.add_argument("--hidden", type=int, default=64, help="width of the hidden layers (default 64)")
    p.add_argument("--batch", type=int, default=32, help="examples per step and rank (default 32)")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam's learning rate (default 0.01)")
    p.add_argument("--seed", type=int, default=42, help="seed of data and initialisation (default 42)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CUDA (nccl) where available, else CPU (gloo); reference and real runs "
                   "must use the same (default auto)")
    p.add_argument("--step-time-ms", type=float, default=0, help="sleep per step, simulating compute (default 0)")
    p.add_argument("--log-every", type=int, default=50, help="print the loss every N steps; 0: never (default 50)")
    p.add_argument("--reference", action="store_true", help="no worker: run --world-size local processes "
                   "and print 'rank R digest HEX' for each")
    p.add_argument("--world-size", type=int, default=4, help="processes with --reference (default 4)")
    args = p.parse_args(argv)
    if args.seed < 0 or args.hidden < 1 or args.batch < 1 or args.steps < 0 or args.world_size < 1:
        p.error("--seed and --steps must be >= 0; --hidden, --batch and --world-size >= 1")
    return args


def main() -> None:
    args = parse_args()
    if args.reference:
        reference(args)
    else:
        run_under_flotilla(args)


if __name__ == "__main__":
    main()
