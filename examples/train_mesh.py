"""Data parallel x context parallel on a 2-D DeviceMesh: a tiny Llama matches the single-process model at every step.

The world is a mesh of shape (dp, cp), dimensions named "dp" and "cp"
(2 x 2 by default: four ranks). Each data-parallel replica (a row of the mesh)
takes its own micro-batch of the global batch; the cp ranks of a replica
share each of its sequences, sharded along the sequence, and run attention
with TokenRing. Every tokenring call is given the whole mesh as ``group``
and finds its context-parallel dimension by name ("cp"):

    mesh = init_device_mesh("cpu", (dp, cp), mesh_dim_names=("dp", "cp"))
    model = DistributedDataParallel(model, device_mesh=mesh["dp"])   # averages gradients over dp
    batch = sequence.shard_batch({"input_ids": mine, "labels": mine}, group=mesh)
    logits = model(batch["input_ids"], batch["position_ids"])        # TokenRingAttention(group=mesh)
    loss = sequence.causal_lm_loss(logits, batch["shift_labels"], group=mesh)
    loss.backward()                                                   # DDP: mean over dp
    sequence.all_reduce_gradients(model.parameters(), group=mesh)    # sum of the shares over cp

Gradients are summed over "cp" (each cp rank's backward saw only its own
tokens of the replica's sequences) and averaged over "dp" (each replica's
loss is the mean over its own micro-batch, and micro-batches have equal
token counts, so the global loss is the mean of the replicas' losses).
``--dp-sync explicit`` does the dp average by hand instead of with DDP.

Every rank also trains the single-process model (plain attention, whole
sequences) on the whole global batch and compares, at every step, the
global loss and its own gradients after synchronisation with it.

    torchrun --nproc-per-node 4 examples/train_mesh.py            # env:// rendezvous, gloo on CPU
    torchrun --nproc-per-node 4 --standalone examples/train_mesh.py --steps 2
    torchrun --nproc-per-node 8 examples/train_mesh.py --dp 2 --cp 4 --dtype float64
    python examples/train_mesh.py                                 # no torchrun: starts dp x cp processes itself

Exit status 0 (on every rank) only when, at every step, on every rank,
|loss - single-process loss| <= 1e-5 and max|g - g_ref| / max|g_ref| <= 1e-5
(float32; 1e-12 for both in float64). Rank 0 prints each step and, last, the
largest differences seen.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from tokenring import sequence
from tokenring.schedules.build import schedule_names
from tokenring.runtime.executors import timeout_s
from tokenring.testing.model_tasks import TrainingRun, reference_training
from tokenring.testing.tiny_llama import build_reference, random_batches, sequence_parallel_copy

TOLERANCE = {"float32": (1e-5, 1e-5), "float64": (1e-12, 1e-12)}  # (loss: absolute, gradient: relative to max|g|)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dp", type=int, default=2, help="data-parallel replicas (mesh dimension 'dp')")
    parser.add_argument("--cp", type=int, default=2, help="context-parallel ranks per replica (mesh dimension 'cp')")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per replica; global batch dp x this")
    parser.add_argument("--seq-len", type=int, default=32, help="full sequence; divisible by 2 cp for zigzag")
    parser.add_argument("--dtype", default="float32", choices=sorted(TOLERANCE))
    parser.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    parser.add_argument("--algorithm", default="tokenring", choices=schedule_names())
    parser.add_argument("--backend", default="cpu", help="TokenRing backend")
    parser.add_argument("--dp-sync", default="ddp", choices=["ddp", "explicit"],
                        help="average gradients over dp with DistributedDataParallel or by hand")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def train(args: argparse.Namespace) -> int:
    """One rank's part; the process group is initialised. Returns the exit status, the same on every rank."""
    world_size = dist.get_world_size()
    if world_size != args.dp * args.cp:
        raise SystemExit(f"world size {world_size} is not dp x cp = {args.dp} x {args.cp}")
    mesh = init_device_mesh("cpu", (args.dp, args.cp), mesh_dim_names=("dp", "cp"))
    dp_rank = mesh.get_local_rank("dp")
    run = TrainingRun(seed=args.seed, steps=args.steps, batch=args.dp * args.micro_batch, seq_len=args.seq_len,
                      dtype=args.dtype, layout=args.layout, algorithm=args.algorithm)
    reference = reference_training(run)  # the single-process model on the whole global batch

    model = sequence_parallel_copy(build_reference(run.config, run.seed, run.torch_dtype),
                                   group=mesh, layout=args.layout, algorithm=args.algorithm, backend=args.backend)
    trained = model
    if args.dp_sync == "ddp":
        trained = DistributedDataParallel(model, device_mesh=mesh["dp"])
    optimizer = torch.optim.SGD(model.parameters(), lr=run.lr, momentum=run.momentum)
    loss_tolerance, grad_tolerance = TOLERANCE[args.dtype]
    worst = torch.zeros(2, dtype=torch.float64)  # largest |loss diff| and gradient difference, over steps and ranks
    mine = slice(dp_rank * args.micro_batch, (dp_rank + 1) * args.micro_batch)
    for step, ids in enumerate(random_batches(run.config, run.seed, run.steps, run.batch, run.seq_len)):
        micro = ids[mine]                                   # this replica's micro-batch, full sequences
        batch = sequence.shard_batch({"input_ids": micro, "labels": micro}, group=mesh, layout=args.layout)
        logits = trained(batch["input_ids"], batch["position_ids"])
        loss = sequence.causal_lm_loss(logits, batch["shift_labels"], group=mesh)  # this replica's mean
        optimizer.zero_grad()
        loss.backward()                                     # with DDP: gradients averaged over dp here
        sequence.all_reduce_gradients(model.parameters(), group=mesh)  # sum of the cp shares
        if args.dp_sync == "explicit":
            sequence.all_reduce_gradients(model.parameters(), group=mesh["dp"])
            for p in model.parameters():
                p.grad.div_(args.dp)
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss, group=mesh.get_group("dp"))
        global_loss = global_loss.item() / args.dp

        grad, want = _flat_grad(model).double(), reference["grads"][step].double()
        diffs = torch.tensor([abs(global_loss - reference["losses"][step]),
                              ((grad - want).abs().max() / want.abs().max()).item()], dtype=torch.float64)
        diffs = torch.where(torch.isnan(diffs), torch.full_like(diffs, float("inf")), diffs)
        dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
        worst = torch.maximum(worst, diffs)
        if dist.get_rank() == 0:
            print(f"step {step}: loss {global_loss:.6f} (single process {reference['losses'][step]:.6f}); "
                  f"max over ranks |loss diff| {diffs[0]:.2e}, gradient diff {diffs[1]:.2e}", flush=True)
        optimizer.step()

    holds = bool(worst[0] <= loss_tolerance and worst[1] <= grad_tolerance)
    if dist.get_rank() == 0:
        print(f"{'parity holds' if holds else 'parity FAILED'} ({args.dtype}, {args.steps} steps, mesh dp x cp = "
              f"{args.dp} x {args.cp}, dp sync {args.dp_sync}): largest |loss - single-process loss| = "
              f"{worst[0]:.3e} (tolerance {loss_tolerance:g}), largest gradient difference "
              f"max|g - g_ref|/max|g_ref| = {worst[1]:.3e} (tolerance {grad_tolerance:g})", flush=True)
    return 0 if holds else 1


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=timeout_s())


def _run_rank(args: argparse.Namespace, **init: object) -> int:
    torch.set_num_threads(1)  # dp x cp processes on one machine
    dist.init_process_group("gloo", timeout=_timeout(), **init)
    try:
        return train(args)
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, args: argparse.Namespace, init_file: str) -> None:
    status = _run_rank(args, init_method=f"file://{init_file}", rank=rank, world_size=args.dp * args.cp)
    if status:
        sys.exit(status)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "RANK" in os.environ:  # started by torchrun (or another env:// launcher)
        return _run_rank(args)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="tokenring-mesh-") as folder:
        try:
            mp.spawn(_spawned, args=(args, os.path.join(folder, "rendezvous")), nprocs=args.dp * args.cp)
        except mp.ProcessExitedException as error:
            print(f"a rank failed: {error}", file=sys.stderr)
            return error.exit_code or 1
        except mp.ProcessRaisedException as error:
            print(f"a rank failed: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
