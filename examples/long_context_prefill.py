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

Exit status 0 when the logits agree (relative error under 1e-4) and every
rank's peak is below the single process's.
"""

from __future__ import annotations

import argparse
import os
import sys

import tokenring
from tokenring.tools.launch import LocalWorld
from tokenring.testing.model_tasks import PREFILL_CONFIG
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
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=16384, help="prompt length, all ranks together")
    parser.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    parser.add_argument("--budget-mib", type=float, default=160.0,
                        help="a per-process memory budget to report against (MiB)")
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)

    c = PREFILL_CONFIG
    print(f"model: {c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} heads ({c.num_kv_heads} KV), "
          f"MLP {c.intermediate_size}, vocab {c.vocab_size}; prompt {args.seq_len} tokens, layout {args.layout}")
    single = run_prefill(1, args)[0]
    ranks = run_prefill(args.world_size, args)
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
          f"{max(rank_mib) / single_mib:.2f} of one process)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
