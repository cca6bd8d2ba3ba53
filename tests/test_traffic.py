"""What the Comm really sent equals what the plan predicts, per step and directed link."""

import pytest

from tokenring.plan import ProblemShape, build_plan
from tokenring.testing.problems import Problem


def measured_link_bytes(results):
    totals = {}
    for r in results:
        for entry in r["sent"]:
            key = (entry["step"], entry["src"], entry["dst"])
            totals[key] = totals.get(key, 0) + entry["bytes"]
    return sorted((step, src, dst, n) for (step, src, dst), n in totals.items())


def planned_link_bytes(problem: Problem, world_size: int):
    shape = ProblemShape(
        batch=problem.batch,
        seq_local=problem.seq_len // world_size,
        q_heads=problem.q_heads,
        kv_heads=problem.kv_heads,
        head_dim=problem.head_dim,
        itemsize=problem.torch_dtype.itemsize,
        lse_itemsize=8 if problem.dtype == "float64" else 4,
    )
    plan = build_plan(problem.algorithm, problem.resolved_layout, problem.causal, world_size)
    return [(t.step, t.src, t.dst, t.bytes) for t in plan.link_bytes(shape)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("algorithm", ["tokenring", "ring"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype,heads", [("float32", (4, 4)), ("bfloat16", (4, 1)), ("float16", (6, 2)), ("float64", (2, 2))])
def test_sent_bytes_equal_planned_bytes(worlds, seed, world_size, algorithm, causal, dtype, heads):
    # An odd head dim and odd head counts give out sections that need padding in the packed partial.
    problem = Problem(seed, batch=2, seq_len=6 * world_size, q_heads=heads[0], kv_heads=heads[1], head_dim=17 if dtype != "float64" else 16,
                      dtype=dtype, causal=causal, algorithm=algorithm)
    results = worlds.get(world_size).run_ok("tokenring.testing.tasks.attention", problem)
    measured = measured_link_bytes(results)
    planned = planned_link_bytes(problem, world_size)
    assert measured == planned
    if world_size == 1:
        assert measured == []
    else:
        assert measured, "a multi-rank run must move data"
