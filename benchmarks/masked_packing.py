"""What packing documents saves: planned bytes, skipped blocks and measured time, per schedule.

A realistic mix (lognormal document lengths, a long tail) packed into one
causal sequence, against the same sequence as one causal document:

* plan level, N = 4 and 8, S = 32768 (no processes): bytes moved forward and
  backward, the share of blocks (in scored entries) the masked plan skips,
  the largest rank's work over the mean, and the planning time;
* measured, on gloo loopback, N = 4, S = 8192, B = 1, 8 heads of 64, float32:
  forward and forward + backward, median of 3, every rank's answer checked
  against float64 first.

    python benchmarks/masked_packing.py [--skip-measured]
"""

from __future__ import annotations

import random
import sys
import time


def lognormal_boundaries(seq_len: int, seed: int = 0) -> tuple[int, ...]:
    rng = random.Random(seed)
    bounds = [0]
    while bounds[-1] < seq_len:
        bounds.append(min(seq_len, bounds[-1] + max(1, int(rng.lognormvariate(6.0, 1.3)))))
    return tuple(bounds)


def plan_rows(world_size: int, seq_len: int) -> list[tuple]:
    from tokenring.placement.masks import token_mask_for_call, visibility
    from tokenring.plan.model import ProblemShape
    from tokenring.schedules.build import build_masked_plan, build_plan, schedule_names

    boundaries = lognormal_boundaries(seq_len)
    shape = ProblemShape(batch=1, seq_local=seq_len // world_size, q_heads=8, kv_heads=8, head_dim=64,
                         itemsize=4, acc_itemsize=4)
    rows = []
    for algorithm in schedule_names():
        whole_fwd = sum(t.bytes for t in build_plan(algorithm, "zigzag", True, world_size).link_bytes(shape))
        whole_bwd = sum(t.bytes for t in build_plan(algorithm, "zigzag", True, world_size, backward=True)
                        .link_bytes(shape))
        started = time.perf_counter()
        tokens = token_mask_for_call(seq_len, world_size, "zigzag", True, None, boundaries)
        plan = build_masked_plan(algorithm, tokens)
        backward = build_masked_plan(algorithm, tokens, backward=True)
        planning_ms = (time.perf_counter() - started) * 1e3
        length = tokens.rows_per_rank
        computed, visible = 0, 0
        work = [0] * world_size
        for step in plan.steps:
            for b in step.blocks:
                q_rows, kv_rows = b.q_span.row_range(length), b.kv_span.row_range(length)
                computed += (q_rows[1] - q_rows[0]) * (kv_rows[1] - kv_rows[0])
                entries = visibility(tokens, b.q_owner, q_rows, b.kv_owner, kv_rows).entries
                visible += entries
                work[b.q_owner] += entries
        fwd = sum(t.bytes for t in plan.link_bytes(shape))
        bwd = sum(t.bytes for t in backward.link_bytes(shape))
        rows.append((algorithm, whole_fwd / 2**20, fwd / 2**20, whole_bwd / 2**20, bwd / 2**20,
                     1 - computed / (seq_len * seq_len / 2), visible / computed,
                     max(work) / (sum(work) / world_size), planning_ms))
    print(f"\nN = {world_size}, S = {seq_len}, {len(boundaries) - 1} documents (lognormal), causal, zigzag per "
          f"document; bytes in MiB (8 heads of 64, float32)")
    print("| schedule | fwd MiB one doc | fwd MiB packed | bwd MiB one doc | bwd MiB packed | causal entries "
          "skipped | computed entries visible | max/mean work | planning ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.1f} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.0%} | {r[6]:.0%} | "
              f"{r[7]:.3f} | {r[8]:.0f} |")
    return rows


def measured(world_size: int = 4, seq_len: int = 8192) -> None:
    from tokenring.testing.problems import Problem
    from tokenring.tools.launch import LocalWorld

    boundaries = lognormal_boundaries(seq_len, seed=1)
    print(f"\nmeasured: N = {world_size}, S = {seq_len}, {len(boundaries) - 1} documents, gloo loopback, "
          f"median of 3 (ms, slowest rank)")
    print("| schedule | fwd one doc | fwd packed | fwd+bwd one doc | fwd+bwd packed |")
    print("|---|---|---|---|---|")
    with LocalWorld(world_size) as world:
        for algorithm in ("tokenring", "ring", "ring-2way", "tokenring-multi"):
            cells = []
            for backward in (False, True):
                for packed in (False, True):
                    problem = Problem(0, batch=1, seq_len=seq_len, q_heads=8, kv_heads=8, head_dim=64,
                                      causal=True, algorithm=algorithm,
                                      cu_seqlens=boundaries if packed else None)
                    results = world.run_ok("tokenring.tools.tasks.timed_attention", problem, 3, backward)
                    cells.append(max(r["median_s"] for r in results) * 1e3)
            print(f"| {algorithm} | {cells[0]:.0f} | {cells[1]:.0f} | {cells[2]:.0f} | {cells[3]:.0f} |")


def main() -> None:
    for n in (4, 8):
        plan_rows(n, 32768)
    if "--skip-measured" not in sys.argv:
        measured()


if __name__ == "__main__":
    main()
