"""Gradients of token_ring_attn against float64 autograd of plain attention on the full sequence."""

import pytest

from tokenring.testing.checks import check_gradients
from tokenring.schedules.build import schedule_names
from tokenring.testing.problems import Problem
from tokenring.tools.problems import fitting_seq_local

WORLD_SIZES = [1, 2, 3, 4]
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
ALGORITHMS = pytest.mark.parametrize("algorithm", schedule_names())


def run_and_check_grads(worlds, problem: Problem, world_size: int, memory: str = "contiguous"):
    return check_gradients(worlds.get(world_size), problem, memory)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@ALGORITHMS
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", list(HEADS))
def test_float32_gradients(worlds, seed, world_size, algorithm, causal, heads):
    q_heads, kv_heads = HEADS[heads]
    problem = Problem(seed, batch=2, seq_len=8 * world_size, q_heads=q_heads, kv_heads=kv_heads, head_dim=32,
                      causal=causal, algorithm=algorithm)
    run_and_check_grads(worlds, problem, world_size)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@ALGORITHMS
def test_gradients_in_other_dtypes(worlds, seed, world_size, dtype, causal, algorithm):
    problem = Problem(seed, batch=2, seq_len=16 * world_size, q_heads=4, kv_heads=2, head_dim=64, dtype=dtype,
                      causal=causal, algorithm=algorithm)
    run_and_check_grads(worlds, problem, world_size)


@pytest.mark.parametrize("world_size", [2, 3, 4])
@ALGORITHMS
@pytest.mark.parametrize("causal,layout", [(False, None), (True, None), (True, "contiguous"), (False, "zigzag")])
def test_gradients_with_custom_scale_and_non_default_layouts(worlds, seed, world_size, algorithm, causal, layout):
    problem = Problem(seed, batch=3, seq_len=8 * world_size, q_heads=2, kv_heads=1, head_dim=16, causal=causal,
                      layout=layout, algorithm=algorithm, softmax_scale=0.7)
    run_and_check_grads(worlds, problem, world_size)


@pytest.mark.parametrize("memory", ["strided", "heads-major"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@ALGORITHMS
def test_gradients_of_inputs_that_are_not_contiguous(worlds, seed, memory, causal, algorithm):
    problem = Problem(seed, batch=2, seq_len=24, q_heads=4, kv_heads=2, head_dim=16, causal=causal,
                      algorithm=algorithm)
    run_and_check_grads(worlds, problem, 3, memory)


@pytest.mark.parametrize("world_size", [2, 3])
@ALGORITHMS
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradcheck_in_float64(worlds, seed, world_size, algorithm, causal):
    seq_len = fitting_seq_local(4, algorithm, causal, world_size) * world_size
    problem = Problem(seed, batch=1, seq_len=seq_len, q_heads=2, kv_heads=1, head_dim=4, dtype="float64",
                      causal=causal, algorithm=algorithm)
    assert worlds.get(world_size).run_ok("tokenring.testing.tasks.gradcheck", problem, timeout_s=240) == [True] * world_size


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@ALGORITHMS
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_traffic_equals_the_backward_plan(worlds, seed, world_size, algorithm, causal):
    # S_local 6 (odd halves with zigzag), or the next length the schedule's pieces divide
    seq_len = fitting_seq_local(6, algorithm, causal, world_size) * world_size
    problem = Problem(seed, batch=2, seq_len=seq_len, q_heads=6, kv_heads=2, head_dim=17,
                      dtype="bfloat16", causal=causal, algorithm=algorithm)
    # check_gradients compares the bytes of both passes with their plans.
    run_and_check_grads(worlds, problem, world_size)


def test_double_backward_is_a_clear_error(worlds, seed):
    problem = Problem(seed, batch=1, seq_len=8, q_heads=2, kv_heads=2, head_dim=8)
    results = worlds.get(2).run("tokenring.testing.tasks.double_backward", problem, timeout_s=60)
    for r in results:
        assert not r.ok and "double backward" in r.error, r


@ALGORITHMS
def test_memory_kept_between_calls_is_a_few_shards_and_does_not_grow(worlds, seed, algorithm):
    problem = Problem(seed, batch=1, seq_len=64, q_heads=4, kv_heads=4, head_dim=16, causal=True, algorithm=algorithm)
    world = worlds.get(4)
    once = world.run_ok("tokenring.testing.tasks.pool_bytes_after_calls", problem, 1)
    many = world.run_ok("tokenring.testing.tasks.pool_bytes_after_calls", problem, 5)
    for first, later in zip(once, many):
        assert later["pool_bytes"] == first["pool_bytes"], "buffers must be reused, not accumulated"
        # Receive and packing buffers of one forward and one backward, full and half
        # sized (zigzag), double-buffered: a constant number of shards, whatever N.
        assert first["pool_bytes"] <= 32 * first["shard_bytes"]


def test_lse_is_returned_but_not_differentiable(worlds, seed):
    problem = Problem(seed, batch=1, seq_len=8, q_heads=2, kv_heads=2, head_dim=8)
    assert worlds.get(2).run_ok("tokenring.testing.tasks.lse_requires_grad", problem) == [False, False]
