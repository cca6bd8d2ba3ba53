"""The schedules themselves, checked symbolically: no processes, no tensors."""

import itertools

import pytest

from tokenring.interfaces import Mask
from tokenring.plan import Algorithm, Part, Payload, ProblemShape, build_plan
from tokenring.plancheck import PlanError, check_plan, work_per_rank

WORLD_SIZES = [1, 2, 3, 4, 5, 8]
VARIANTS = list(itertools.product(["tokenring", "ring"], ["contiguous", "zigzag"], [False, True]))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("algorithm,layout,causal", VARIANTS)
@pytest.mark.parametrize("direction", [1, -1])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_every_query_meets_every_visible_key_exactly_once(algorithm, layout, causal, world_size, direction, backward):
    check_plan(build_plan(algorithm, layout, causal, world_size, direction, backward=backward))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("algorithm", ["tokenring", "ring"])
def test_causal_zigzag_gives_every_rank_the_same_work_at_every_step(algorithm, world_size):
    plan = build_plan(algorithm, "zigzag", True, world_size)
    for index, work in enumerate(work_per_rank(plan)):
        if index < world_size:
            assert len(set(work)) == 1, f"step {index}: work per rank {work}"
    off_diagonal = [step.blocks[0].work for step in plan.steps[1:world_size]]
    assert all(w == 2.0 for w in off_diagonal), "each off-diagonal step is half a block (2 of 4 half-units)"


@pytest.mark.parametrize("algorithm", ["tokenring", "ring"])
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
    payloads = {t.payload for _, t in plan.transfers()}
    assert payloads == {Payload.QUERY, Payload.PARTIAL}
    assert len(plan.steps) == world_size + 1
    # The query hops one rank per step; the partial goes straight back to its owner.
    for index, t in plan.transfers():
        if t.payload is Payload.QUERY:
            assert (t.dst - t.src) % world_size == plan.direction % world_size
            assert (t.src - t.owner) % world_size == (index * plan.direction) % world_size
        else:
            assert t.dst == t.owner
            assert (t.src - t.owner) % world_size == ((index - 1) * plan.direction) % world_size
    # every rank merges exactly N-1 partials
    for rank in range(world_size):
        merged = [t for _, t in plan.transfers() if t.payload is Payload.PARTIAL and t.dst == rank]
        assert len(merged) == world_size - 1


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_ring_moves_only_keys_and_values(world_size):
    plan = build_plan("ring", "contiguous", False, world_size)
    assert {t.payload for _, t in plan.transfers()} == {Payload.KEY_VALUE}
    assert len(plan.steps) == world_size


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_causal_zigzag_tokenring_sends_half_queries_after_the_wrap(world_size):
    plan = build_plan("tokenring", "zigzag", True, world_size)
    if world_size > 2:  # at N = 2 both directions are the same ring
        assert plan.direction == -1
    query_parts = [t.part for _, t in plan.transfers() if t.payload is Payload.QUERY]
    partial_parts = [t.part for _, t in plan.transfers() if t.payload is Payload.PARTIAL]
    # Q_j visits ranks below j (need all of it), then ranks above j (second half only).
    n = world_size
    assert query_parts.count(Part.SECOND) == n * (n - 1) // 2
    assert query_parts.count(Part.ALL) == n * (n - 1) - n * (n - 1) // 2
    assert partial_parts.count(Part.SECOND) == n * (n - 1) // 2


def test_traffic_per_step_matches_the_design_table():
    # DESIGN §4, MHA, contiguous non-causal: Q is L*H*D elements, out+lse L*H*D + L*H.
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
    assert by_step[n] == [partial_bytes] * n
    assert all(t.bytes == kv_bytes for t in ring)
    assert len(ring) == n * (n - 1)


def test_gqa_makes_the_ring_cheaper_and_the_plan_says_so():
    shape = ProblemShape(batch=1, seq_local=64, q_heads=8, kv_heads=1, head_dim=64, itemsize=2)
    tokenring = sum(t.bytes for t in build_plan("tokenring", "contiguous", False, 4).link_bytes(shape))
    ring = sum(t.bytes for t in build_plan("ring", "contiguous", False, 4).link_bytes(shape))
    assert ring < tokenring


def test_the_checker_catches_a_broken_plan():
    good = build_plan("tokenring", "zigzag", True, 3)
    step = good.steps[1]
    broken_block = step.blocks[0].__class__(**{**step.blocks[0].__dict__, "mask": Mask.NONE, "q_part": Part.ALL, "kv_part": Part.ALL})
    broken = good.__class__(
        **{**good.__dict__, "steps": (good.steps[0], step.__class__(step.index, (broken_block,) + step.blocks[1:], step.transfers)) + good.steps[2:]}
    )
    with pytest.raises(PlanError):
        check_plan(broken)
    dropped = good.__class__(**{**good.__dict__, "steps": good.steps[:-1]})
    with pytest.raises(PlanError, match="never sends"):
        check_plan(dropped)
    ring = build_plan("ring", "contiguous", False, 3, backward=True)
    without_last_grads = ring.__class__(**{**ring.__dict__, "steps": ring.steps[:-1]})
    with pytest.raises(PlanError, match="dk/dv"):
        check_plan(without_last_grads)


def test_bad_plan_arguments_are_rejected():
    with pytest.raises(ValueError, match="algorithm"):
        build_plan("ulysses", "contiguous", False, 2)
    with pytest.raises(ValueError, match="layout"):
        build_plan(Algorithm.RING, "striped", False, 2)
    with pytest.raises(ValueError, match="world_size"):
        build_plan("ring", "contiguous", False, 0)


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
@pytest.mark.parametrize("causal", [False, True])
def test_tokenring_backward_never_moves_keys_values_or_their_gradients(world_size, causal):
    plan = build_plan("tokenring", "zigzag" if causal else "contiguous", causal, world_size, backward=True)
    forward = build_plan("tokenring", "zigzag" if causal else "contiguous", causal, world_size)
    assert {t.payload for _, t in plan.transfers()} == {Payload.GRAD_QUERY, Payload.GRAD_PARTIAL}
    assert [s.blocks for s in plan.steps] == [s.blocks for s in forward.steps]
    assert plan.direction == forward.direction


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_ring_backward_returns_every_dk_dv_sum_to_its_owner_one_hop_at_a_time(world_size):
    plan = build_plan("ring", "contiguous", False, world_size, backward=True)
    grads = [(i, t) for i, t in plan.transfers() if t.payload is Payload.GRAD_KEY_VALUE]
    assert len(grads) == world_size * (world_size - 1)
    for _, t in grads:
        assert (t.dst - t.src) % world_size == plan.direction % world_size
    assert len(plan.steps) == world_size + 1
