"""Long-context prefill on N ranks: each rank holds 1/N of the prompt, and of the activations.

A prompt too long for one process's memory budget is run sequence-parallel:
every rank holds the (small) model whole and its own shard of the prompt;
attention is exact across ranks (tokenring.nn.TokenRingAttention) and
everything else is per token. The script runs the same prefill in one process
and on N ranks, checks that both predict the same next-token logits, and
reports each process's peak resident memory during the pass (its rise above
the loaded model and a short warm-up pass). The one-process run is the same
model through TokenRing at N = 1 (no messages), so the comparison isolates
what splitting the sequence saves.

    python examples/long_context_prefill.py                    # 16384 tokens, 2 ranks
    python examples/long_context_prefill.py --world-size 4 --seq-len 32768 --budget-mib 300
    torchrun --nproc-per-node 4 examples/long_context_prefill.py --seq-len 32768

Started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in
the environment: the env:// rendezvous), the ranks are torchrun's: each runs
its shard in its own process, with the machine's cores shared among the
node's ranks, and rank 0 runs the one-process prefill afterwards (a process
of its own), compares and prints. Multi-node: torchrun's --nnodes and
rendezvous options (README.md).

Exit status 0 when the logits agree (relative error under 1e-4) and every
rank's peak is below the single process's (under torchrun, on every rank).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys

import tokenring
from tokenring.registry import registry
from tokenring.tools.launch import LocalWorld
from tokenring.testing.model_tasks import PREFILL_CONFIG, prefill
from tokenring.tools.problems import relative_error
from tokenring.tools.tasks import from_bytes

MIB = 2**20


def run_prefill(world_size: int, args: argparse.Namespace) -> list[dict]:
    # Every run gets the same cores in all: one process uses them all, N ranks share them.
    threads = max(1, (os.cpu_count() or 1) // world_size)
    # Large blocks straight from mmap and back on free: resident memory then follows what is
    # live, instead of what glibc's adaptive threshold happened to keep on its heap.
    env = {"TOKENRING_BACKEND": args.backend, "MALLOC_MMAP_THRESHOLD_": str(MIB)}
    with LocalWorld(world_size, tokenring_backend=args.backend, threads_per_rank=threads, env=env) as world:
        return world.run_ok("tokenring.testing.model_tasks.prefill", PREFILL_CONFIG, args.seed, args.seq_len,
                            args.layout, timeout_s=args.timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=None, help="ranks to start (default 2); under torchrun, torchrun's")
    parser.add_argument("--seq-len", type=int, default=16384, help="prompt length, all ranks together")
    parser.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    parser.add_argument("--budget-mib", type=float, default=160.0,
                        help="a per-process memory budget to report against (MiB)")
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)

    if all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")):
        if args.world_size not in (None, int(os.environ["WORLD_SIZE"])):
            parser.error(f"under torchrun the world size is torchrun's ({os.environ['WORLD_SIZE']}); "
                         f"--world-size {args.world_size} is for the self-launched script")
        return prefill_in_torchrun_world(args)
    args.world_size = args.world_size or 2
    print_model(args)
    single = run_prefill(1, args)[0]
    return report(args, single, run_prefill(args.world_size, args))


def prefill_in_torchrun_world(args: argparse.Namespace) -> int:
    """This process is one rank of torchrun's world: prefill its shard, gather to rank 0, compare there."""
    import torch
    import torch.distributed as dist

    # What run_prefill's environment does for the ranks it starts, done from inside: the same
    # cores in all (torchrun sets OMP_NUM_THREADS=1), and large blocks straight from mmap.
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        _mmap_threshold(MIB)
    os.environ["TOKENRING_BACKEND"] = args.backend
    backend = registry.get(args.backend)
    backend.prepare_process(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend.distributed_backend)   # env://
    rank, args.world_size = dist.get_rank(), dist.get_world_size()
    try:
        if rank == 0:
            print_model(args)
        mine = prefill(rank, args.world_size, PREFILL_CONFIG, args.seed, args.seq_len, args.layout)
        ranks = [None] * args.world_size if rank == 0 else None
        dist.gather_object(mine, ranks, dst=0)
        # The one-process run starts once the ranks are done, so it has the cores to itself.
        status = [report(args, run_prefill(1, args)[0], ranks) if rank == 0 else None]
        dist.broadcast_object_list(status, src=0)
        return status[0]
    finally:
        dist.destroy_process_group()


def _mmap_threshold(nbytes: int) -> None:
    """glibc's M_MMAP_THRESHOLD, as MALLOC_MMAP_THRESHOLD_ sets it at start; elsewhere nothing."""
    try:
        ctypes.CDLL(None).mallopt(-3, nbytes)   # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def print_model(args: argparse.Namespace) -> None:
    c = PREFILL_CONFIG
    print(f"model: {c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} heads ({c.num_kv_heads} KV), "
          f"MLP {c.intermediate_size}, vocab {c.vocab_size}; prompt {args.seq_len} tokens, layout {args.layout}")


def report(args: argparse.Namespace, single: dict, ranks: list[dict]) -> int:
    """Print the comparison of the one-process run with the ranks'; the exit status."""
    next_logits = [from_bytes(r["next_logits"]) for r in ranks if r["next_logits"] is not None]
    error = relative_error(next_logits[0], from_bytes(single["next_logits"]))

    if single["peak_mem_bytes"] is None:
        print("resident memory cannot be measured here (Linux /proc only)")
        return 0 if error < 1e-4 else 1
    single_mib = single["peak_mem_bytes"] / MIB
    rank_mib = [r["peak_mem_bytes"] / MIB for r in ranks]
    print(f"1 process : peak {single_mib:8.1f} MiB, {single['seconds']:.1f} s")
    for rank, (mib, result) in enumerate(zip(rank_mib, ranks)):
        print(f"rank {rank}/{args.world_size}: peak {mib:8.1f} MiB ({mib / single_mib:.2f} of one process), "
              f"{result['seconds']:.1f} s")
    fits = "fits" if max(rank_mib) <= args.budget_mib else "does NOT fit"
    over = "exceeds" if single_mib > args.budget_mib else "fits"
    ok = error < 1e-4 and max(rank_mib) < single_mib
    print(f"next-token logits, {args.world_size} ranks vs 1 process: relative error {error:.2e}")
    print(f"{'OK' if ok else 'FAILED'}: budget {args.budget_mib:.0f} MiB: one process {over} it ({single_mib:.0f} MiB); "
          f"every one of {args.world_size} ranks {fits} (largest {max(rank_mib):.0f} MiB, "
          f"{max(rank_mib) / single_mib:.2f} of one process)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
