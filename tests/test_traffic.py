"""What the Comm really sent equals what the plan predicts, per step and directed link."""

import pytest

from tokenring.interfaces import LinkTraffic
from tokenring.plan.model import sum_by_link
from tokenring.schedules.build import schedule_names
from tokenring.testing.problems import Problem
from tokenring.tools.problems import fitting_seq_local

ALGORITHMS = pytest.mark.parametrize("algorithm", schedule_names())


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@ALGORITHMS
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype,heads", [("float32", (4, 4)), ("bfloat16", (4, 1)), ("float16", (6, 2)), ("float64", (2, 2))])
def test_sent_bytes_equal_planned_bytes(worlds, seed, world_size, algorithm, causal, dtype, heads):
    # An odd head dim and odd head counts give out sections that need padding in the packed partial.
    seq_len = fitting_seq_local(6, algorithm, causal, world_size) * world_size  # 6, or what the pieces divide
    problem = Problem(seed, batch=2, seq_len=seq_len, q_heads=heads[0], kv_heads=heads[1], head_dim=17 if dtype != "float64" else 16,
                      dtype=dtype, causal=causal, algorithm=algorithm)
    results = worlds.get(world_size).run_ok("tokenring.testing.tasks.attention", problem)
    measured = sum_by_link(LinkTraffic(**message) for r in results for message in r["sent"])
    planned = problem.planned_link_bytes(world_size)
    assert measured == planned
    if world_size == 1:
        assert measured == []
    else:
        assert measured, "a multi-rank run must move data"


def design_table_link_bytes(problem: Problem, world_size: int) -> dict:
    """Bytes per (step, src, dst) for contiguous, non-causal runs, straight from docs/design.md, "Traffic".

    Written independently of ProblemShape: a Q is L·Hq·D elements, a partial
    out + lse is L·Hq·D elements (padded to 8 bytes so lse is aligned) plus
    L·Hq float32, K and V together are 2·L·Hkv·D elements.
    """
    n, size = world_size, problem.torch_dtype.itemsize
    rows = problem.batch * (problem.seq_len // n)
    q_bytes = rows * problem.q_heads * problem.head_dim * size
    partial_bytes = -(-q_bytes // 8) * 8 + rows * problem.q_heads * 4
    half_q_bytes = q_bytes // 2
    half_partial_bytes = -(-half_q_bytes // 8) * 8 + rows // 2 * problem.q_heads * 4
    kv_bytes = 2 * rows * problem.kv_heads * problem.head_dim * size
    expected = {}
    for src in range(n):
        if problem.algorithm == "ring":
            for step in range(n - 1):
                expected[(step, src, (src + 1) % n)] = kv_bytes
            continue
        for step in range(n + 2):
            if step < n - 1:
                expected[(step, src, (src + 1) % n)] = q_bytes
            if step >= 2:  # the partial of step - 1, computed for the rank step - 1 hops behind
                hops = min(step - 1, n - 1)  # the last block is computed, and sent, in two halves
                dst = (src - hops) % n
                size = half_partial_bytes if step >= n else partial_bytes
                expected[(step, src, dst)] = expected.get((step, src, dst), 0) + size
    return expected


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("algorithm", ["tokenring", "ring"])  # the two schedules the design table describes
def test_sent_bytes_equal_the_design_table(worlds, seed, world_size, algorithm):
    # fp16, 3 query heads of 5 dims, 1 K/V head: the out section needs padding before lse.
    problem = Problem(seed, batch=1, seq_len=6 * world_size, q_heads=3, kv_heads=1, head_dim=5, dtype="float16",
                      algorithm=algorithm)
    results = worlds.get(world_size).run_ok("tokenring.testing.tasks.attention", problem)
    measured = {(t.step, t.src, t.dst): t.bytes for t in sum_by_link(LinkTraffic(**m) for r in results for m in r["sent"])}
    assert measured == design_table_link_bytes(problem, world_size)
