"""token_ring_attn against plain float64 attention on the full sequence."""


import pytest
import torch

import tokenring
from tokenring.testing.problems import TOLERANCE, Problem, relative_error
from tokenring.testing.tasks import from_bytes

WORLD_SIZES = [1, 2, 3, 4]
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}


def run_and_check(worlds, problem: Problem, world_size: int, memory: str = "contiguous"):
    results = worlds.get(world_size).run_ok("tokenring.testing.tasks.attention", problem, memory)
    layout = problem.resolved_layout
    outs = [from_bytes(r["out"]) for r in results]
    lses = [from_bytes(r["lse"]) for r in results]
    out = tokenring.unshard(outs, layout=layout)
    lse = tokenring.unshard(lses, layout=layout, dim=2)
    want_out, want_lse = problem.reference()
    tolerance = TOLERANCE[problem.torch_dtype]
    err_out, err_lse = relative_error(out, want_out), relative_error(lse, want_lse)
    assert err_out <= tolerance and err_lse <= tolerance, (
        f"N={world_size} {problem}: rel err out {err_out:.3g}, lse {err_lse:.3g} > {tolerance:g}"
    )
    seq_local = problem.seq_len // world_size
    for rank_out, rank_lse in zip(outs, lses):
        assert rank_out.dtype == problem.torch_dtype
        assert rank_out.shape == (problem.batch, seq_local, problem.q_heads, problem.head_dim)
        assert rank_lse.shape == (problem.batch, problem.q_heads, seq_local)
        assert rank_lse.dtype == (torch.float64 if problem.dtype == "float64" else torch.float32)
    return results


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("algorithm", ["tokenring", "ring"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", list(HEADS))
def test_float32_matrix(worlds, seed, world_size, algorithm, causal, heads):
    q_heads, kv_heads = HEADS[heads]
    problem = Problem(seed, batch=2, seq_len=16 * world_size, q_heads=q_heads, kv_heads=kv_heads,
                      head_dim=32, causal=causal, algorithm=algorithm)
    run_and_check(worlds, problem, world_size)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dtypes(worlds, seed, world_size, dtype, causal):
    for algorithm in ("tokenring", "ring"):
        problem = Problem(seed, batch=2, seq_len=16 * world_size, q_heads=4, kv_heads=2, head_dim=64,
                          dtype=dtype, causal=causal, algorithm=algorithm)
        run_and_check(worlds, problem, world_size)


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("head_dim", [16, 24, 64, 80, 128])
def test_head_dims(worlds, seed, world_size, head_dim):
    for causal in (False, True):
        problem = Problem(seed, batch=1, seq_len=8 * world_size, q_heads=2, kv_heads=1, head_dim=head_dim,
                          causal=causal)
        run_and_check(worlds, problem, world_size)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("algorithm", ["tokenring", "ring"])
def test_custom_softmax_scale_and_large_logits(worlds, seed, world_size, algorithm):
    # A scale of 1.0 with D = 64 gives logits of tens: exercises the lse merge far from 0.
    for causal in (False, True):
        problem = Problem(seed, batch=3, seq_len=8 * world_size, q_heads=2, kv_heads=2, head_dim=64,
                          causal=causal, algorithm=algorithm, softmax_scale=1.0)
        run_and_check(worlds, problem, world_size)


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("layout,causal", [("contiguous", True), ("zigzag", False)])
def test_non_default_layouts(worlds, seed, world_size, layout, causal):
    for algorithm in ("tokenring", "ring"):
        problem = Problem(seed, batch=2, seq_len=16 * world_size, q_heads=4, kv_heads=1, head_dim=32,
                          causal=causal, layout=layout, algorithm=algorithm)
        run_and_check(worlds, problem, world_size)


def test_minimal_zigzag_shard_of_two_tokens(worlds, seed):
    problem = Problem(seed, batch=1, seq_len=8, q_heads=1, kv_heads=1, head_dim=16, causal=True)
    run_and_check(worlds, problem, 4)


@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize("memory", ["strided", "heads-major"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_inputs_that_are_not_contiguous(worlds, seed, world_size, memory, causal):
    for algorithm in ("tokenring", "ring"):
        problem = Problem(seed, batch=2, seq_len=8 * world_size, q_heads=4, kv_heads=2, head_dim=16,
                          causal=causal, algorithm=algorithm)
        run_and_check(worlds, problem, world_size, memory)
