"""What the Comm really sent equals what the plan predicts, per step and directed link."""

import pytest

from tokenring.interfaces import LinkTraffic
from tokenring.plan import sum_by_link
from tokenring.testing.problems import Problem


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("algorithm", ["tokenring", "ring"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype,heads", [("float32", (4, 4)), ("bfloat16", (4, 1)), ("float16", (6, 2)), ("float64", (2, 2))])
def test_sent_bytes_equal_planned_bytes(worlds, seed, world_size, algorithm, causal, dtype, heads):
    # An odd head dim and odd head counts give out sections that need padding in the packed partial.
    problem = Problem(seed, batch=2, seq_len=6 * world_size, q_heads=heads[0], kv_heads=heads[1], head_dim=17 if dtype != "float64" else 16,
                      dtype=dtype, causal=causal, algorithm=algorithm)
    results = worlds.get(world_size).run_ok("tokenring.testing.tasks.attention", problem)
    measured = sum_by_link(LinkTraffic(**message) for r in results for message in r["sent"])
    planned = problem.planned_link_bytes(world_size)
    assert measured == planned
    if world_size == 1:
        assert measured == []
    else:
        assert measured, "a multi-rank run must move data"
