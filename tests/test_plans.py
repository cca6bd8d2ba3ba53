"""The registered schedules themselves, checked symbolically: no processes, no tensors."""

import itertools

import pytest

from tokenring.plan.backward import derive_backward
from tokenring.interfaces import Mask
from tokenring.placement.layout import Layout
from tokenring.plan.model import ALL, SECOND, Block, Payload, Plan, ProblemShape, Step
from tokenring.proofs.plancheck import PlanError, check_plan, work_per_rank
from tokenring.schedules.build import build_plan, schedule_names
from tokenring.schedules.hops import cheaper_direction, one_hop_steps

WORLD_SIZES = [1, 2, 3, 4, 5, 8]
MASKS = list(itertools.product(["contiguous", "zigzag"], [False, True]))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("layout,causal", MASKS)
@pytest.mark.parametrize("algorithm", schedule_names())
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_every_query_meets_every_visible_key_exactly_once(algorithm, layout, causal, world_size, backward):
    check_plan(build_plan(algorithm, layout, causal, world_size, backward=backward))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("layout,causal", MASKS)
@pytest.mark.parametrize("moves", ["queries", "keys"])
@pytest.mark.parametrize("direction", [1, -1])
def test_one_hop_walks_are_exact_either_way_round(moves, layout, causal, world_size, direction):
    steps = one_hop_steps(moves == "queries", Layout(layout), causal, world_size, direction)
    plan = Plan("walk", Layout(layout), causal, world_size, steps)
    check_plan(plan)
    check_plan(derive_backward(plan))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("algorithm", schedule_names())
def test_causal_zigzag_gives_every_rank_the_same_work_at_every_compute_step(algorithm, world_size):
    plan = build_plan(algorithm, "zigzag", True, world_size)
    per_step = work_per_rank(plan)
    for index, work in enumerate(per_step):
        if any(work):
            assert len(set(work)) == 1, f"step {index}: work per rank {work}"
    # the diagonal block and N - 1 off-diagonal half blocks, each half a shard squared
    assert [sum(step[r] for step in per_step) for r in range(world_size)] == [world_size / 2] * world_size


@pytest.mark.parametrize("algorithm", schedule_names())
@pytest.mark.parametrize("causal", [False, True])
def test_world_of_one_sends_nothing_and_computes_once(algorithm, causal):
    plan = build_plan(algorithm, "zigzag" if causal else "contiguous", causal, 1)
    assert len(plan.steps) == 1
    assert plan.steps[0].transfers == ()
    (block,) = plan.steps[0].blocks
    assert block.mask is (Mask.CAUSAL if causal else Mask.NONE)


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_tokenring_moves_queries_and_partials_never_keys(world_size):
    plan = build_plan("tokenring", "contiguous", False, world_size)
    direction, _ = cheaper_direction(True, Layout.CONTIGUOUS, False, world_size)
    assert plan.note == "queries travel r -> r+1"
    payloads = {t.payload for _, t in plan.transfers()}
    assert payloads == {Payload.QUERY, Payload.PARTIAL}
    assert len(plan.steps) == world_size + 2  # the last block in two halves (hops.hide_tail)
    # The query hops one rank per step; the partial goes straight back to its owner.
    for index, t in plan.transfers():
        if t.payload is Payload.QUERY:
            assert (t.dst - t.src) % world_size == direction % world_size
            assert (t.src - t.owner) % world_size == (index * direction) % world_size
        else:
            assert t.dst == t.owner
            hops = min(index - 1, world_size - 1)  # the last block's halves both come from the last holder
            assert (t.src - t.owner) % world_size == (hops * direction) % world_size
    for rank in range(world_size):
        merged = [t for _, t in plan.transfers() if t.payload is Payload.PARTIAL and t.dst == rank]
        assert len(merged) == world_size  # N - 2 whole partials and the last one in two halves


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_ring_moves_only_keys_and_values(world_size):
    plan = build_plan("ring", "contiguous", False, world_size)
    assert {t.payload for _, t in plan.transfers()} == {Payload.KEY_VALUE}
    assert len(plan.steps) == world_size


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_causal_zigzag_tokenring_sends_half_queries_after_the_wrap(world_size):
    plan = build_plan("tokenring", "zigzag", True, world_size)
    if world_size > 2:  # at N = 2 both directions are the same ring
        assert plan.note == "queries travel r -> r-1"
    query_spans = [t.span for _, t in plan.transfers() if t.payload is Payload.QUERY]
    halves: dict = {}  # the last block's partial leaves in two halves (hops.hide_tail): join them again
    for _, t in plan.transfers():
        if t.payload is Payload.PARTIAL:
            halves[(t.src, t.owner)] = t.span.hull(halves.get((t.src, t.owner)))
    partial_spans = list(halves.values())
    # Q_j visits ranks below j (need all of it), then ranks above j (second chunk only).
    n = world_size
    assert query_spans.count(SECOND) == n * (n - 1) // 2
    assert query_spans.count(ALL) == n * (n - 1) - n * (n - 1) // 2
    assert partial_spans.count(SECOND) == n * (n - 1) // 2


def test_traffic_per_step_matches_the_design_table():
    # docs/design.md, "Traffic": MHA, contiguous non-causal: Q is L*H*D elements, out+lse L*H*D + L*H.
    shape = ProblemShape(batch=1, seq_local=128, q_heads=8, kv_heads=8, head_dim=64, itemsize=2, acc_itemsize=4)
    n = 4
    tokenring = build_plan("tokenring", "contiguous", False, n).link_bytes(shape)
    ring = build_plan("ring", "contiguous", False, n).link_bytes(shape)
    q_bytes = 128 * 8 * 64 * 2
    partial_bytes = q_bytes + 128 * 8 * 4
    kv_bytes = 2 * q_bytes
    by_step = {}
    for t in tokenring:
        by_step.setdefault(t.step, []).append(t.bytes)
    assert by_step[0] == [q_bytes] * n
    assert sorted(by_step[2]) == sorted([q_bytes] * n + [partial_bytes] * n)
    half_partial_bytes = q_bytes // 2 + 64 * 8 * 4  # the last block's partial leaves in halves (hops.hide_tail)
    assert sorted(by_step[n]) == [half_partial_bytes] * n
    assert by_step[n + 1] == [half_partial_bytes] * n
    assert all(t.bytes == kv_bytes for t in ring)
    assert len(ring) == n * (n - 1)


def test_gqa_makes_the_ring_cheaper_and_the_plan_says_so():
    shape = ProblemShape(batch=1, seq_local=64, q_heads=8, kv_heads=1, head_dim=64, itemsize=2)
    tokenring = sum(t.bytes for t in build_plan("tokenring", "contiguous", False, 4).link_bytes(shape))
    ring = sum(t.bytes for t in build_plan("ring", "contiguous", False, 4).link_bytes(shape))
    assert ring < tokenring


def _replace_step(plan: Plan, index: int, step: Step) -> Plan:
    steps = list(plan.steps)
    steps[index] = step
    return Plan(plan.algorithm, plan.layout, plan.causal, plan.world_size, tuple(steps), plan.backward)


def test_the_checker_catches_a_block_that_computes_too_much():
    good = build_plan("tokenring", "zigzag", True, 3)
    step = good.steps[1]
    wide = Block(step.blocks[0].rank, step.blocks[0].q_owner, ALL, step.blocks[0].kv_owner, ALL, Mask.NONE)
    with pytest.raises(PlanError):
        check_plan(_replace_step(good, 1, Step(step.index, (wide,) + step.blocks[1:], step.transfers)))


def test_the_checker_catches_a_result_never_sent():
    good = build_plan("tokenring", "zigzag", True, 3)
    with pytest.raises(PlanError, match="never sends"):
        check_plan(Plan(good.algorithm, good.layout, good.causal, 3, good.steps[:-1]))


def test_the_checker_catches_dk_dv_that_never_come_home():
    ring = build_plan("ring", "contiguous", False, 3, backward=True)
    with pytest.raises(PlanError, match="dk/dv"):
        check_plan(Plan(ring.algorithm, ring.layout, ring.causal, 3, ring.steps[:-1], backward=True))


def test_the_checker_catches_a_message_used_before_it_arrives():
    good = build_plan("ring", "contiguous", False, 3)
    # Deliver step 0's keys/values one step late: step 1's blocks then use what has not arrived.
    late = (Step(0, good.steps[0].blocks, ()), Step(1, good.steps[1].blocks, good.steps[0].transfers)) + good.steps[2:]
    with pytest.raises(PlanError, match="does not hold"):
        check_plan(Plan(good.algorithm, good.layout, good.causal, 3, late))


def test_the_checker_catches_a_duplicated_block():
    good = build_plan("ring", "contiguous", False, 2)
    step = good.steps[0]
    with pytest.raises(PlanError, match="extra/duplicated"):
        check_plan(_replace_step(good, 0, Step(0, step.blocks + step.blocks[:1], step.transfers)))


@pytest.mark.parametrize("call,match", [
    (("ulysses", "contiguous", False, 2), "algorithm"),
    (("ring", "striped", False, 2), "layout"),
    (("ring", "contiguous", False, 0), "world_size"),
])
def test_bad_plan_arguments_are_rejected(call, match):
    with pytest.raises(ValueError, match=match):
        build_plan(*call)


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
@pytest.mark.parametrize("causal", [False, True])
def test_tokenring_backward_never_moves_keys_values_or_their_gradients(world_size, causal):
    plan = build_plan("tokenring", "zigzag" if causal else "contiguous", causal, world_size, backward=True)
    forward = build_plan("tokenring", "zigzag" if causal else "contiguous", causal, world_size)
    assert {t.payload for _, t in plan.transfers()} == {Payload.GRAD_QUERY, Payload.GRAD_PARTIAL}
    assert [s.blocks for s in plan.steps] == [s.blocks for s in forward.steps]


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_ring_backward_returns_every_dk_dv_sum_to_its_owner_one_hop_at_a_time(world_size):
    plan = build_plan("ring", "contiguous", False, world_size, backward=True)
    grads = [(i, t) for i, t in plan.transfers() if t.payload is Payload.GRAD_KEY_VALUE]
    assert len(grads) == world_size * (world_size - 1)
    for _, t in grads:
        assert (t.dst - t.src) % world_size == 1
    assert len(plan.steps) == world_size + 1
