"""Training parity: a tiny Llama trained sequence-parallel matches the single-process model at every step.

The model (tokenring.testing.tiny_llama) is built from plain torch modules
with random weights from a fixed seed. The single-process run uses plain
attention on whole sequences; the sequence-parallel run is the same model
with every attention module a tokenring.nn.TokenRingAttention, trained on N
CPU ranks, each holding its shard of every sequence. Its training step
(tokenring.testing.model_tasks.sequence_parallel_training) differs from the
single-process one in these lines only:

    batch = sequence.shard_batch({"input_ids": ids, "labels": ids})   # shift labels, then shard
    logits = model(batch["input_ids"], batch["position_ids"])          # true positions for rotary
    loss = sequence.causal_lm_loss(logits, batch["shift_labels"])     # mean over all ranks' tokens
    loss.backward()
    sequence.all_reduce_gradients(model.parameters())                 # sum replicated parameters' grads

    python examples/train_parity.py                       # world sizes 1, 2, 4; float32
    python examples/train_parity.py --world-sizes 2 3 --steps 8 --dtype float64
    torchrun --nproc-per-node 4 examples/train_parity.py  # the world torchrun starts

Started by torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT: the env:// rendezvous), the script trains on the
world it is part of (one world size: torchrun's) and rank 0 compares and
prints; on its own it starts each world size's ranks itself. Multi-node:
the same script, torchrun's --nnodes and rendezvous options (README.md).

Exit status 0 only when, at every step and world size, the loss and the
gradients match the single-process model within tolerance (under torchrun,
on every rank); the last line states the largest differences seen.
"""

from __future__ import annotations

import argparse
import os
import sys

from tokenring.schedules.build import schedule_names
from tokenring.registry import registry
from tokenring.tools.launch import LocalWorld
from tokenring.testing.model_tasks import (
    TrainingRun,
    compare_training,
    reference_training,
    sequence_parallel_training,
)

TOLERANCE = {"float32": (1e-5, 1e-5), "float64": (1e-12, 1e-12)}  # (loss: absolute, gradient: relative to max|g|)


def launched_by_torchrun() -> bool:
    """Whether an env:// launcher (torchrun) started this process as one rank of its world."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=None,
                        help="ranks to start, one world after another (default 1 2 4); under torchrun, torchrun's")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32, help="full sequence; divisible by 2N for zigzag")
    parser.add_argument("--dtype", default="float32", choices=sorted(TOLERANCE))
    parser.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    parser.add_argument("--algorithm", default="tokenring", choices=schedule_names())
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    run = TrainingRun(seed=args.seed, steps=args.steps, batch=args.batch, seq_len=args.seq_len, dtype=args.dtype,
                      layout=args.layout, algorithm=args.algorithm)
    if launched_by_torchrun():
        world_size = int(os.environ["WORLD_SIZE"])
        if args.world_sizes not in (None, [world_size]):
            parser.error(f"under torchrun the world size is torchrun's ({world_size}); "
                         f"--world-sizes {' '.join(map(str, args.world_sizes))} is for the self-launched script")
        return train_in_torchrun_world(args, run)
    world_sizes = args.world_sizes or [1, 2, 4]
    reference = reference_training(run)
    print("single-process losses: " + ", ".join(f"{x:.6f}" for x in reference["losses"]))
    reports = []
    for world_size in world_sizes:
        with LocalWorld(world_size, tokenring_backend=args.backend, threads_per_rank=1,
                        env={"TOKENRING_BACKEND": args.backend}) as world:
            per_rank = world.run_ok("tokenring.testing.model_tasks.sequence_parallel_training", run)
        reports.append(report_world(world_size, reference, per_rank, args.dtype))
    return summarize(reports, world_sizes, args)


def train_in_torchrun_world(args: argparse.Namespace, run: TrainingRun) -> int:
    """This process is one rank of torchrun's world: train, gather to rank 0, compare there; all exit alike."""
    import torch.distributed as dist

    os.environ["TOKENRING_BACKEND"] = args.backend
    backend = registry.get(args.backend)
    backend.prepare_process(int(os.environ["LOCAL_RANK"]))   # the device of this node's LOCAL_RANK (GPU, NPU)
    dist.init_process_group(backend.distributed_backend)     # env://: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world_size = dist.get_rank(), dist.get_world_size()
    try:
        mine = sequence_parallel_training(rank, world_size, run)
        per_rank = [None] * world_size if rank == 0 else None
        dist.gather_object(mine, per_rank, dst=0)
        status = [None]
        if rank == 0:
            reference = reference_training(run)
            print("single-process losses: " + ", ".join(f"{x:.6f}" for x in reference["losses"]))
            report = report_world(world_size, reference, per_rank, args.dtype)
            status[0] = summarize([report], [world_size], args)
        dist.broadcast_object_list(status, src=0)
        return status[0]
    finally:
        dist.destroy_process_group()


def report_world(world_size: int, reference: dict, per_rank: list[dict], dtype: str):
    report = compare_training(world_size, reference, per_rank)
    verdict = "ok" if report.holds(*TOLERANCE[dtype]) else "MISMATCH"
    print(f"N={world_size}: losses " + ", ".join(f"{x:.6f}" for x in per_rank[0]["losses"])
          + f"; max |loss diff| {report.max_loss_diff:.2e}, max grad diff {report.max_grad_diff:.2e} [{verdict}]")
    return report


def summarize(reports: list, world_sizes: list[int], args: argparse.Namespace) -> int:
    loss_tolerance, grad_tolerance = TOLERANCE[args.dtype]
    holds = all(r.holds(loss_tolerance, grad_tolerance) for r in reports)
    worst_loss = max(r.max_loss_diff for r in reports)
    worst_grad = max(r.max_grad_diff for r in reports)
    sizes = ", ".join(str(n) for n in world_sizes)
    print(f"{'parity holds' if holds else 'parity FAILED'} ({args.dtype}, {args.steps} steps, N = {sizes}): "
          f"largest |loss - single-process loss| = {worst_loss:.3e} (tolerance {loss_tolerance:g}), "
          f"largest gradient difference max|g - g_ref|/max|g_ref| = {worst_grad:.3e} (tolerance {grad_tolerance:g})",
          flush=True)
    return 0 if holds else 1


if __name__ == "__main__":
    sys.exit(main())
