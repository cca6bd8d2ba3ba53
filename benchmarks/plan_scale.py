"""Plans at scale: seconds to build and prove plans (tokenring.schedules.build), no process, no tensor.

* ``ring`` and ``tokenring`` at N = 1024, forward and backward (target: 5 s each);
* ``tokenring-multi`` and ``ring-multi`` at N = 64, forward and backward (target: 5 s each);
* masked plans, S = 32768, 38 lognormal documents (benchmarks/masked_packing.py), N = 8, zigzag, causal:
  forward + backward per schedule (target: 20 ms each).

Each number is the wall time of one `build_plan` (building, deriving the backward from the cached forward,
proving) with the plan cache cleared first; the backward includes its forward.

    python benchmarks/plan_scale.py [--n 1024] [--multi-n 64] [--only full|multi|masked] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def full_plans(names: list[str], n: int, layouts: list[tuple[str, bool]]) -> None:
    from tokenring.schedules.build import _plans, build_plan

    for name in names:
        for layout, causal in layouts:
            _plans.clear()
            started = time.perf_counter()
            build_plan(name, layout, causal, n)
            forward = time.perf_counter() - started
            started = time.perf_counter()
            build_plan(name, layout, causal, n, backward=True)
            backward = time.perf_counter() - started
            print(f"{name:16s} N={n:5d} {layout:10s} causal={causal!s:5s}  forward {forward:7.2f} s  "
                  f"backward {backward:7.2f} s (after its forward)", flush=True)


def masked_plans(world_size: int = 8, seq_len: int = 32768, fresh_tables: bool = False) -> None:
    from masked_packing import lognormal_boundaries
    from tokenring.placement.masks import clear_tables, token_mask_for_call
    from tokenring.schedules.build import _plans, build_masked_plan, build_plan, schedule_names

    boundaries = lognormal_boundaries(seq_len)
    print(f"masked: S = {seq_len}, N = {world_size}, {len(boundaries) - 1} documents, zigzag, causal"
          f"{', per-rank tables built afresh for each schedule' if fresh_tables else ''}")
    started = time.perf_counter()
    tokens = token_mask_for_call(seq_len, world_size, "zigzag", True, None, boundaries)
    print(f"  the token mask (documents placed per rank, tokenring.placement.documents): "
          f"{(time.perf_counter() - started) * 1e3:.1f} ms, once for all schedules")
    for name in schedule_names():
        _plans.clear()
        build_plan(name, "contiguous", False, world_size)  # the full plan, proven: not part of masking
        if fresh_tables:
            clear_tables()  # the mask's per-rank tables (positions, limits, segments), else kept as in a run
        started = time.perf_counter()
        build_masked_plan(name, tokens)
        build_masked_plan(name, tokens, backward=True)
        print(f"  {name:16s} {(time.perf_counter() - started) * 1e3:7.1f} ms (forward + backward)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--multi-n", type=int, default=64)
    parser.add_argument("--only", choices=("full", "multi", "masked"))
    parser.add_argument("--layouts", default="zigzag:1,contiguous:1",
                        help="comma-separated layout:causal pairs for the full plans")
    parser.add_argument("--profile", action="store_true", help="print the cProfile top 30 by own time")
    parser.add_argument("--fresh-tables", action="store_true",
                        help="masked: rebuild the mask's per-rank tables for every schedule (else the first pays)")
    args = parser.parse_args()
    layouts = [(part.split(":")[0], part.split(":")[1] == "1") for part in args.layouts.split(",")]
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    if args.only in (None, "full"):
        full_plans(["ring", "tokenring"], args.n, layouts)
    if args.only in (None, "multi"):
        full_plans(["tokenring-multi", "ring-multi"], args.multi_n, layouts)
    if args.only in (None, "masked"):
        masked_plans(fresh_tables=args.fresh_tables)
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
