"""Packed documents, sliding windows and padding: exact on every schedule, and only the needed work and bytes."""

import random
import time

import pytest
import torch

from tokenring.plan.backward import derive_backward
from tokenring.proofs.masked import check_masked_plan
from tokenring.schedules.masked import mask_plan
from tokenring.placement.masks import TokenMask, contiguous_runs, token_mask_for_call, zigzag_runs
from tokenring.plan.model import Payload, ProblemShape
from tokenring.proofs.plancheck import PlanError, check_plan
from tokenring.schedules.build import build_masked_plan, build_plan, schedule_names
from tokenring.testing.checks import assert_all_ranks_fail, check_attention, check_gradients
from tokenring.testing.problems import Problem
from tokenring.tools.tasks import from_bytes

ALGORITHMS = pytest.mark.parametrize("algorithm", schedule_names())


def random_boundaries(rng: random.Random, seq_len: int, documents: int, padding: int = 0) -> tuple[int, ...]:
    end = seq_len - padding
    cuts = sorted(rng.sample(range(1, end), min(documents - 1, end - 1)))
    return tuple([0, *cuts, end])


def seq_len_for(algorithm: str, world_size: int, rows: int = 8) -> int:
    granularity = build_plan(algorithm, "contiguous", False, world_size).granularity
    per_rank = rows * granularity // __import__("math").gcd(rows, granularity)
    return per_rank * world_size


# -- plans: proven pair by pair, forward and backward, on random masks --

@ALGORITHMS
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5, 8])
def test_masked_plans_are_proven_pair_by_pair(algorithm, world_size):
    rng = random.Random(world_size * 7919 + len(algorithm))
    seq_len = seq_len_for(algorithm, world_size, rows=4)
    full = build_plan(algorithm, "contiguous", False, world_size)
    for trial in range(4):
        boundaries = random_boundaries(rng, seq_len, rng.randint(1, 6), padding=rng.choice([0, 0, 3]))
        window = rng.choice([None, (3, -1), (2, 1), (-1, 2), (0, 0)])
        causal = rng.choice([True, False])
        runs = rng.choice([contiguous_runs, zigzag_runs])(seq_len, world_size)
        tokens = TokenMask(seq_len, runs, boundaries, causal, window)
        plan = mask_plan(full, tokens)
        check_masked_plan(plan)
        check_plan(plan)
        check_plan(derive_backward(plan))


def test_the_counting_proof_catches_a_missing_or_doubled_block():
    seq_len, world_size = 32, 4
    tokens = TokenMask(seq_len, contiguous_runs(seq_len, world_size), (0, 32), True, None)
    plan = mask_plan(build_plan("ring", "contiguous", False, world_size), tokens)
    blocks = [b for s in plan.steps for b in s.blocks]
    assert blocks
    dropped = plan.steps[-1]
    broken = plan.__class__(**{**plan.__dict__, "steps": plan.steps[:-1] + (dropped.__class__(
        dropped.index, dropped.blocks[1:], dropped.transfers),)})
    with pytest.raises(PlanError, match="visible pairs"):
        check_masked_plan(broken)
    doubled = plan.__class__(**{**plan.__dict__, "steps": plan.steps[:-1] + (dropped.__class__(
        dropped.index, dropped.blocks + dropped.blocks[:1], dropped.transfers),)})
    with pytest.raises(PlanError, match="overlaps"):
        check_masked_plan(doubled)


@ALGORITHMS
def test_blocks_and_messages_nobody_needs_are_dropped(algorithm):
    """One document per rank: no block crosses ranks, so nothing but the local blocks remains."""
    world_size = 4
    seq_len = seq_len_for(algorithm, world_size)
    length = seq_len // world_size
    boundaries = tuple(range(0, seq_len + 1, length))
    tokens = token_mask_for_call(seq_len, world_size, "contiguous", True, None, boundaries)
    plan = build_masked_plan(algorithm, tokens)
    assert all(b.rank == b.q_owner == b.kv_owner for s in plan.steps for b in s.blocks)
    assert not [t for _, t in plan.transfers()]
    assert not [t for _, t in build_masked_plan(algorithm, tokens, backward=True).transfers()]


@ALGORITHMS
def test_masked_traffic_is_at_most_the_full_plans_and_drops_with_the_empty_share(algorithm):
    world_size = 4
    seq_len = seq_len_for(algorithm, world_size, rows=16)
    shape = ProblemShape(batch=1, seq_local=seq_len // world_size, q_heads=4, kv_heads=4, head_dim=16,
                         itemsize=4, acc_itemsize=4)
    full = sum(t.bytes for t in build_plan(algorithm, "contiguous", False, world_size).link_bytes(shape))
    window = token_mask_for_call(seq_len, world_size, "contiguous", False, (2, 2), None)
    masked = sum(t.bytes for t in build_masked_plan(algorithm, window).link_bytes(shape))
    assert masked < full / 2, (masked, full)  # a narrow window needs only the neighbours' edges


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_the_zigzag_layout_balances_the_work_of_packed_documents(world_size):
    """The largest rank's scored entries over the mean, read off the plan itself: at most 1.10."""
    rng = random.Random(world_size)
    seq_len = 4096 * world_size
    lengths = []
    while sum(lengths) < seq_len:
        lengths.append(max(1, int(rng.lognormvariate(5.5, 1.2))))
    boundaries = tuple(sorted({0, *[sum(lengths[:i]) for i in range(1, len(lengths))]} - {seq_len}
                              | {seq_len}))
    boundaries = tuple(b for b in boundaries if b <= seq_len)
    for layout, bound in (("zigzag", 1.10), ("contiguous", None)):
        tokens = token_mask_for_call(seq_len, world_size, layout, True, None, boundaries)
        plan = build_masked_plan("ring", tokens)
        length = tokens.rows_per_rank
        from tokenring.placement.masks import visibility

        work = [0] * world_size
        for step in plan.steps:
            for b in step.blocks:
                work[b.q_owner] += visibility(tokens, b.q_owner, b.q_span.row_range(length), b.kv_owner,
                                              b.kv_span.row_range(length)).entries
        ratio = max(work) / (sum(work) / world_size)
        if bound is not None:
            assert ratio <= bound, (layout, world_size, ratio)


def test_planning_a_masked_call_is_cached_and_cheap():
    boundaries = tuple(sorted(random.Random(3).sample(range(1, 32768), 63))) + (32768,)
    boundaries = (0,) + boundaries
    start = time.perf_counter()
    tokens = token_mask_for_call(32768, 8, "contiguous", True, None, boundaries)
    build_masked_plan("tokenring", tokens)
    first = time.perf_counter() - start
    start = time.perf_counter()
    build_masked_plan("tokenring", token_mask_for_call(32768, 8, "contiguous", True, None, boundaries))
    again = time.perf_counter() - start
    assert first < 5 and again < 0.01, (first, again)


# -- exactness against float64 on processes, forward and backward --

def masked_problem(seed, world_size, algorithm, *, causal, layout, heads=(4, 2), documents=4, padding=0,
                   window=None, dtype="float32"):
    rng = random.Random(seed * 31 + world_size)
    seq_len = seq_len_for(algorithm, world_size)
    boundaries = random_boundaries(rng, seq_len, documents, padding)
    return Problem(seed, batch=1, seq_len=seq_len, q_heads=heads[0], kv_heads=heads[1], head_dim=16,
                   causal=causal, layout=layout, algorithm=algorithm, cu_seqlens=boundaries, window=window,
                   dtype=dtype)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@ALGORITHMS
def test_packed_documents_causal_are_exact_forward_and_backward(worlds, seed, world_size, algorithm):
    """The zigzag layout, which places tokens per document; padding at the end."""
    problem = masked_problem(seed, world_size, algorithm, causal=True, layout="zigzag", padding=2, documents=5)
    check_gradients(worlds.get(world_size), problem)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("algorithm", ["tokenring", "ring-2way"])
def test_packed_documents_on_the_contiguous_layout_are_exact(worlds, seed, world_size, algorithm):
    problem = masked_problem(seed, world_size, algorithm, causal=True, layout="contiguous", documents=3)
    check_gradients(worlds.get(world_size), problem)


@pytest.mark.parametrize("world_size", [2, 3, 4])
@ALGORITHMS
def test_window_with_documents_not_causal_is_exact(worlds, seed, world_size, algorithm):
    problem = masked_problem(seed, world_size, algorithm, causal=False, layout="contiguous", window=(5, 3),
                             heads=(4, 1))
    check_gradients(worlds.get(world_size), problem)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("algorithm", ["tokenring", "ring"])
def test_causal_window_without_documents_is_exact(worlds, seed, world_size, algorithm):
    seq_len = 16 * world_size
    problem = Problem(seed, batch=2, seq_len=seq_len, q_heads=4, kv_heads=4, head_dim=16, causal=True,
                      algorithm=algorithm, window=(6, -1))
    check_gradients(worlds.get(world_size), problem)
    check_attention(worlds.get(world_size), problem.with_(dtype="bfloat16"))


@pytest.mark.parametrize("algorithm", ["tokenring", "ring-multi"])
def test_a_rank_of_padding_only_gets_zeros_not_nan(worlds, seed, algorithm):
    world_size = 3
    seq_len = seq_len_for(algorithm, world_size)
    length = seq_len // world_size
    problem = Problem(seed, batch=1, seq_len=seq_len, q_heads=2, kv_heads=2, head_dim=16, causal=True,
                      layout="contiguous", algorithm=algorithm, cu_seqlens=(0, 3, seq_len - length))
    results = check_gradients(worlds.get(world_size), problem)
    last = results[-1]
    for name in ("out", "dq", "dk", "dv"):
        tensor = from_bytes(last[name])
        assert torch.equal(tensor, torch.zeros_like(tensor)), f"{name} of the padding rank is not all zeros"


# -- bad input: every rank raises, naming the argument --

BAD = {
    "boundaries not increasing": ({"all": {"cu_seqlens": [0, 8, 8, 24]}}, ["argument 'cu_seqlens'", "increase strictly"], None),
    "past the end": ({"all": {"cu_seqlens": [0, 30]}}, ["argument 'cu_seqlens'", "past the sequence's end"], None),
    "float tensor on one rank": ({1: {"cu_seqlens": torch.tensor([0.0, 24.0])}}, ["argument 'cu_seqlens'", "int32"], 1),
    "not starting at 0": ({"all": {"cu_seqlens": [2, 24]}}, ["argument 'cu_seqlens'", "start at 0"], None),
    "window not a pair": ({"all": {"window": (3,)}}, ["argument 'window'", "(left, right)"], None),
    "window below -1": ({2: {"window": (-2, 0)}}, ["argument 'window'", ">= -1"], 2),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_masks_fail_on_every_rank(worlds, seed, case):
    changes, fragments, culprit = BAD[case]
    problem = Problem(seed, batch=1, seq_len=24, q_heads=2, kv_heads=2, head_dim=16)
    results = worlds.get(3).run("tokenring.testing.tasks.call_with", problem, changes, timeout_s=60)
    assert_all_ranks_fail(results, *fragments, culprit=culprit)


def test_documents_need_batch_one(worlds, seed):
    problem = Problem(seed, batch=2, seq_len=24, q_heads=2, kv_heads=2, head_dim=16)
    results = worlds.get(3).run("tokenring.testing.tasks.call_with", problem, {"all": {"cu_seqlens": [0, 24]}},
                                timeout_s=60)
    assert_all_ranks_fail(results, "argument 'q'", "batch size 1")


def test_ranks_with_different_documents_all_fail(worlds, seed):
    problem = Problem(seed, batch=1, seq_len=24, q_heads=2, kv_heads=2, head_dim=16, cu_seqlens=(0, 10, 24))
    results = worlds.get(3).run("tokenring.testing.tasks.call_with", problem, {1: {"cu_seqlens": [0, 12, 24]}},
                                timeout_s=60)
    for r in results:
        assert not r.ok and "documents and window" in r.error and "differs across ranks" in r.error, r.error
