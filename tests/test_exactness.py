"""token_ring_attn against plain float64 attention on the full sequence."""


import pytest

from tokenring.testing.checks import check_attention
from tokenring.schedules.build import schedule_names
from tokenring.testing.problems import Problem

WORLD_SIZES = [1, 2, 3, 4]
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
ALGORITHMS = pytest.mark.parametrize("algorithm", schedule_names())
CAUSAL = pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])


def run_and_check(worlds, problem: Problem, world_size: int, memory: str = "contiguous"):
    return check_attention(worlds.get(world_size), problem, memory)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@ALGORITHMS
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", list(HEADS))
def test_float32_matrix(worlds, seed, world_size, algorithm, causal, heads):
    q_heads, kv_heads = HEADS[heads]
    problem = Problem(seed, batch=2, seq_len=16 * world_size, q_heads=q_heads, kv_heads=kv_heads,
                      head_dim=32, causal=causal, algorithm=algorithm)
    run_and_check(worlds, problem, world_size)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
@CAUSAL
@ALGORITHMS
def test_dtypes(worlds, seed, world_size, dtype, causal, algorithm):
    problem = Problem(seed, batch=2, seq_len=16 * world_size, q_heads=4, kv_heads=2, head_dim=64,
                      dtype=dtype, causal=causal, algorithm=algorithm)
    run_and_check(worlds, problem, world_size)


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("head_dim", [16, 24, 64, 80, 128])
@CAUSAL
def test_head_dims(worlds, seed, world_size, head_dim, causal):
    problem = Problem(seed, batch=1, seq_len=8 * world_size, q_heads=2, kv_heads=1, head_dim=head_dim,
                      causal=causal)
    run_and_check(worlds, problem, world_size)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@ALGORITHMS
@CAUSAL
def test_custom_softmax_scale_and_large_logits(worlds, seed, world_size, algorithm, causal):
    # A scale of 1.0 with D = 64 gives logits of tens: exercises the lse merge far from 0.
    problem = Problem(seed, batch=3, seq_len=8 * world_size, q_heads=2, kv_heads=2, head_dim=64,
                      causal=causal, algorithm=algorithm, softmax_scale=1.0)
    run_and_check(worlds, problem, world_size)


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("layout,causal", [("contiguous", True), ("zigzag", False)])
@ALGORITHMS
def test_non_default_layouts(worlds, seed, world_size, layout, causal, algorithm):
    problem = Problem(seed, batch=2, seq_len=16 * world_size, q_heads=4, kv_heads=1, head_dim=32,
                      causal=causal, layout=layout, algorithm=algorithm)
    run_and_check(worlds, problem, world_size)


def test_minimal_zigzag_shard_of_four_tokens(worlds, seed):
    # TokenRing's zigzag plan cuts a shard into quarters: its last blocks go in two halves of a chunk.
    problem = Problem(seed, batch=1, seq_len=16, q_heads=1, kv_heads=1, head_dim=16, causal=True)
    run_and_check(worlds, problem, 4)


@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize("memory", ["strided", "heads-major"])
@CAUSAL
@ALGORITHMS
def test_inputs_that_are_not_contiguous(worlds, seed, world_size, memory, causal, algorithm):
    problem = Problem(seed, batch=2, seq_len=8 * world_size, q_heads=4, kv_heads=2, head_dim=16,
                      causal=causal, algorithm=algorithm)
    run_and_check(worlds, problem, world_size, memory)
