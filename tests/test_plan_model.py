"""The general plan model: spans, several blocks per rank and messages per pair, unequal lengths.

Hand-written plans that no registered schedule builds are proven by the
checker, derived into their backward, and executed on N threads of this
process through the real executor and kernel, against float64 attention.
"""

from fractions import Fraction

import pytest
import torch

from tokenring.plan.backward import derive_backward
from tokenring.interfaces import Mask
from tokenring.placement.layout import Layout
from tokenring.plan.model import ALL, FIRST, SECOND, Block, Payload, Plan, ProblemShape, Span, Step, Transfer
from tokenring.proofs.plancheck import PlanError, check_plan
from tokenring.reference import reference_attention
from tokenring.schedules.build import build_plan, schedule_names

from threaded_world import run_plan


# -- spans ---------------------------------------------------------------------------


def test_spans_are_fractions_of_a_shard():
    third = Span.chunks(1, 2, 3)
    assert third.rows(12) == (4, 4)
    assert Span.chunks(0, 2, 4) == FIRST and str(FIRST) == "[0:1)/2" and str(ALL) == "all"
    assert ALL.contains(third) and not third.contains(ALL)
    assert FIRST.hull(SECOND) == ALL
    assert Span.chunks(2, 3, 4).within(SECOND) == FIRST
    assert third.fraction == Fraction(1, 3) and third.denominator == 3
    with pytest.raises(ValueError, match="whole rows"):
        third.rows(10)
    with pytest.raises(ValueError, match="start < stop"):
        Span.chunks(2, 2, 3)


# -- hand-written plans --------------------------------------------------------------


def split_tokenring(n: int, pieces: int) -> Plan:
    """TokenRing whose queries travel as ``pieces`` separate messages per pair, one block per piece."""
    spans = [Span.chunks(i, i + 1, pieces) for i in range(pieces)]
    steps = []
    for index in range(n + 1):
        blocks, transfers = [], []
        for owner in range(n):
            here = (owner + index) % n
            if index < n:
                blocks += [Block(here, owner, s, here, ALL, Mask.NONE) for s in spans]
            if index < n - 1:
                transfers += [Transfer(here, (here + 1) % n, Payload.QUERY, owner, s) for s in spans]
            if index >= 2:
                before = (owner + index - 1) % n
                transfers += [Transfer(before, owner, Payload.PARTIAL, owner, s) for s in spans]
        steps.append(Step(index, tuple(blocks), tuple(transfers)))
    return Plan("split-tokenring", Layout.CONTIGUOUS, False, n, tuple(steps))


def gather_to_rank_zero(n: int) -> Plan:
    """Rank 0 receives everyone's queries and keys/values (two messages per pair), computes every
    block in one step (many blocks per rank, several for the same query span, merged before they go
    home), and sends each partial home."""
    step0 = Step(
        0,
        (Block(0, 0, ALL, 0, ALL, Mask.NONE),),
        tuple(t for r in range(1, n) for t in (Transfer(r, 0, Payload.QUERY, r, ALL),
                                               Transfer(r, 0, Payload.KEY_VALUE, r, ALL))),
    )
    blocks = tuple(Block(0, j, ALL, i, ALL, Mask.NONE) for j in range(n) for i in range(n) if (i, j) != (0, 0))
    step1 = Step(1, blocks, ())
    step2 = Step(2, (), tuple(Transfer(0, j, Payload.PARTIAL, j, ALL) for j in range(1, n)))
    return Plan("gather", Layout.CONTIGUOUS, False, n, (step0, step1, step2))


def more_after_sending(n: int) -> Plan:
    """Rank 1 sends what it has of rank 0's result in the same step as it computes more of it,
    which goes home a step later: the send must carry the result as it was when posted."""
    assert n == 2
    none = Mask.NONE
    steps = (
        Step(0, (Block(0, 0, ALL, 0, ALL, none), Block(1, 1, ALL, 1, ALL, none)),
             (Transfer(0, 1, Payload.QUERY, 0, ALL), Transfer(1, 0, Payload.QUERY, 1, ALL))),
        Step(1, (Block(0, 1, ALL, 0, ALL, none), Block(1, 0, ALL, 1, FIRST, none)), ()),
        Step(2, (Block(1, 0, ALL, 1, SECOND, none),),
             (Transfer(1, 0, Payload.PARTIAL, 0, ALL), Transfer(0, 1, Payload.PARTIAL, 1, ALL))),
        Step(3, (), (Transfer(1, 0, Payload.PARTIAL, 0, ALL),)),
    )
    return Plan("more-after-sending", Layout.CONTIGUOUS, False, 2, steps)


HAND_WRITTEN = {
    "split-in-2": lambda n: split_tokenring(n, 2),
    "split-in-3": lambda n: split_tokenring(n, 3),
    "gather": gather_to_rank_zero,
}


def _problem(n, q_len, kv_len, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, n * q_len, 4, 8, generator=gen, dtype=dtype)
    k, v = (torch.randn(1, n * kv_len, 2, 8, generator=gen, dtype=dtype) for _ in range(2))
    dout = torch.randn(1, n * q_len, 4, 8, generator=gen, dtype=dtype)
    shards = [(q[:, r * q_len:(r + 1) * q_len], k[:, r * kv_len:(r + 1) * kv_len], v[:, r * kv_len:(r + 1) * kv_len])
              for r in range(n)]
    douts = [dout[:, r * q_len:(r + 1) * q_len] for r in range(n)]
    return (q, k, v, dout), shards, douts


def _expected(q, k, v, dout, scale):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = reference_attention(*leaves, softmax_scale=scale)
    out.backward(dout)
    return out.detach(), lse, [t.grad for t in leaves]


def _check_run(plan, n, q_len, kv_len):
    scale = 0.4
    (q, k, v, dout), shards, douts = _problem(n, q_len, kv_len)
    results, sent = run_plan(plan, shards, scale=scale, backward_plan=derive_backward(plan), douts=douts)
    out, lse, grads = _expected(q, k, v, dout, scale)
    got_out = torch.cat([r[0] for r in results], dim=1)
    got_lse = torch.cat([r[1] for r in results], dim=2)
    torch.testing.assert_close(got_out, out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got_lse, lse, rtol=1e-9, atol=1e-9)
    for index, grad in zip((2, 3, 4), grads):
        torch.testing.assert_close(torch.cat([r[index] for r in results], dim=1), grad, rtol=1e-9, atol=1e-9)
    return sent


def test_a_result_sent_while_more_of_it_is_computed_leaves_as_it_was():
    plan = more_after_sending(2)
    check_plan(plan)
    check_plan(derive_backward(plan))
    _check_run(plan, 2, q_len=4, kv_len=4)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("name", list(HAND_WRITTEN))
def test_hand_written_plans_are_proven_and_run_exactly(name, world_size):
    plan = HAND_WRITTEN[name](world_size)
    check_plan(plan)
    check_plan(derive_backward(plan))
    sent = _check_run(plan, world_size, q_len=6, kv_len=6)
    shape = ProblemShape(batch=1, seq_local=6, q_heads=4, kv_heads=2, head_dim=8, itemsize=8, acc_itemsize=8)
    assert sum(m.bytes for m in sent) == sum(t.bytes for t in plan.link_bytes(shape)) + sum(
        t.bytes for t in derive_backward(plan).link_bytes(shape))


def test_several_messages_per_pair_and_step_are_really_sent():
    plan = split_tokenring(3, 3)
    per_pair = {}
    for index, t in plan.transfers():
        per_pair[(index, t.src, t.dst, t.payload)] = per_pair.get((index, t.src, t.dst, t.payload), 0) + 1
    assert max(per_pair.values()) == 3
    assert max(len(plan.steps[0].blocks_of(r)) for r in range(3)) == 3


def test_backward_without_a_chain_sends_each_holders_dk_dv_straight_home():
    backward = derive_backward(gather_to_rank_zero(3))
    homeward = [(i, t.src, t.dst, t.owner) for i, t in backward.transfers() if t.payload is Payload.GRAD_KEY_VALUE]
    assert homeward == [(2, 0, 1, 1), (2, 0, 2, 2)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("algorithm", schedule_names())
def test_queries_and_keys_of_different_lengths_per_rank(algorithm, world_size):
    for q_len, kv_len in ((4, 12), (12, 2)):
        _check_run(build_plan(algorithm, "contiguous", False, world_size), world_size, q_len, kv_len)


def test_a_causal_block_off_the_diagonal_is_refused():
    plan = Plan("bad", Layout.CONTIGUOUS, True, 1, (Step(0, (Block(0, 0, FIRST, 0, ALL, Mask.CAUSAL),), ()),))
    with pytest.raises(PlanError, match="causal mask"):
        check_plan(plan)


def test_a_result_merged_twice_is_caught():
    plan = gather_to_rank_zero(3)
    doubled = Plan(plan.algorithm, plan.layout, plan.causal, 3,
                   (plan.steps[0], Step(1, plan.steps[1].blocks + plan.steps[1].blocks[:1], ()), plan.steps[2]))
    with pytest.raises(PlanError, match="extra/duplicated"):
        check_plan(doubled)


def test_a_causal_plan_refuses_keys_of_another_length():
    plan = build_plan("tokenring", "contiguous", True, 2)
    (_, _, _, _), shards, _ = _problem(2, 4, 8)
    with pytest.raises(ValueError, match="causal plan needs keys/values as long as the queries"):
        run_plan(plan, shards, scale=0.3)


@pytest.mark.parametrize("breakage,match", [
    ("rank", "block outside the world"),
    ("index", "steps must be numbered"),
])
def test_blocks_outside_the_world_and_misnumbered_steps_are_refused(breakage, match):
    plan = build_plan("tokenring", "contiguous", False, 3)
    if breakage == "rank":
        first = plan.steps[1]
        b = first.blocks[0]
        bad = Step(1, (Block(-1, b.q_owner, b.q_span, b.kv_owner, b.kv_span, b.mask),) + first.blocks[1:], first.transfers)
        steps = (plan.steps[0], bad) + plan.steps[2:]
    else:
        steps = tuple(Step(0, s.blocks, s.transfers) for s in plan.steps)
    with pytest.raises(PlanError, match=match):
        check_plan(Plan(plan.algorithm, plan.layout, plan.causal, 3, steps))


def test_granularity_is_the_finest_span_a_plan_cuts():
    assert build_plan("ring", "contiguous", False, 3).granularity == 1
    assert build_plan("ring", "zigzag", True, 3).granularity == 2
    # TokenRing computes its last blocks in two halves of their rows (hops.hide_tail)
    assert build_plan("tokenring", "contiguous", False, 3).granularity == 2
    assert build_plan("tokenring", "zigzag", True, 3).granularity == 4
    assert split_tokenring(2, 3).granularity == 3


def test_a_shard_the_plan_cannot_cut_is_refused_before_any_traffic():
    from tokenring.validation import plan_problem

    plan = split_tokenring(2, 3)
    q, k = torch.zeros(1, 6, 2, 8), torch.zeros(1, 4, 2, 8)
    assert plan_problem(plan, q, q) is None
    problem = plan_problem(plan, q, k)
    assert "argument 'k'" in problem and "multiple of 3" in problem and "got 4" in problem
