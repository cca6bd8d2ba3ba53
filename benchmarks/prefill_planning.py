"""How much of a chunked-prefill call is planning: the token mask, the masked plan, the program, the masks.

Each chunk meets a cache of a new length and so needs a plan of its own, as in a
real prefill. On CPU ranks (gloo), one layer's attention per chunk:

    python benchmarks/prefill_planning.py [--cache 16384] [--chunk 1024] [--chunks 4] [--world-size 2]

Prints, per chunk and schedule, the call's seconds, the planning seconds inside it
and their ratio (the slowest rank's).
"""

from __future__ import annotations

import argparse
import os

from tokenring.tools.launch import LocalWorld


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=int, default=16384)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--q-heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--algorithms", nargs="+", default=["tokenring", "ring"])
    args = parser.parse_args(argv)
    threads = max(1, (os.cpu_count() or 1) // args.world_size)
    with LocalWorld(args.world_size, tokenring_backend="cpu", threads_per_rank=threads) as world:
        for algorithm in args.algorithms:
            per_rank = world.run_ok("tokenring.testing.inference_tasks.prefill_planning_share", args.cache,
                                    args.chunk, args.chunks, args.q_heads, args.kv_heads, args.head_dim, algorithm,
                                    timeout_s=3600)
            for index in range(args.chunks):
                rows = [rank_rows[index] for rank_rows in per_rank]
                total = max(r["seconds"] for r in rows)
                plan = max(r["plan_seconds"] for r in rows)
                print(f"N={args.world_size} {algorithm:>9} chunk {index} (cache {rows[0]['cache']:>6} + {args.chunk}): "
                      f"call {total:7.3f} s, planning {plan:7.4f} s = {100 * plan / total:5.1f} %", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
