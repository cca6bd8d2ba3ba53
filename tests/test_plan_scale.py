"""Plans at scale: every schedule builds and proves its plans at N = 64 quickly, and the two proofs agree.

`tokenring.proofs.plancheck.check_plan` proves small plans pair by pair ("atoms") and large ones on rectangles of
rows ("spans"). Both must reach the same verdict on every registered schedule and on plans broken on purpose.
"""

import dataclasses
import random
import time

import pytest

from tokenring.interfaces import Mask
from tokenring.plan.model import ALL, Plan, Step
from tokenring.proofs.plancheck import PlanError, _span_grid, check_plan
from tokenring.schedules.build import _plans, build_plan, schedule_names

MASKS = [("contiguous", False), ("contiguous", True), ("zigzag", False), ("zigzag", True)]


def _verdict(plan: Plan, method: str) -> bool:
    try:
        check_plan(plan, method=method)
    except PlanError:
        return False
    return True


@pytest.mark.slow
def test_every_schedule_builds_and_proves_forward_and_backward_at_64_quickly():
    """Generous: a loaded 2-core machine. (The multi-ring plans are the largest: N^2 x N/2 blocks; zigzag doubles
    their pieces, so this takes the contiguous causal form.)"""
    _plans.clear()
    started = time.process_time()
    for name in schedule_names():
        for backward in (False, True):
            plan = build_plan(name, "contiguous", True, 64, backward=backward)
            assert plan.world_size == 64 and plan.backward is backward
    assert time.process_time() - started < 30


@pytest.mark.parametrize("algorithm", schedule_names())
def test_both_proofs_accept_every_schedule(algorithm):
    for n in range(1, 9):
        for layout, causal in MASKS:
            for backward in (False, True):
                plan = build_plan(algorithm, layout, causal, n, backward=backward)
                assert _span_grid(plan) is not None, "the registered schedules are all provable on spans"
                check_plan(plan, method="atoms")
                check_plan(plan, method="spans")


def _broken(plan: Plan, rng: random.Random) -> list[Plan]:
    """Plans that differ from ``plan`` in one place each: most are wrong, a few may still be exact."""
    steps = list(plan.steps)
    out = []

    def with_step(index: int, step: Step) -> Plan:
        changed = list(steps)
        changed[index] = step
        return dataclasses.replace(plan, steps=tuple(changed))

    with_blocks = [s for s in steps if s.blocks]
    with_transfers = [s for s in steps if s.transfers]
    for _ in range(3):
        if with_blocks:
            s = rng.choice(with_blocks)
            i = rng.randrange(len(s.blocks))
            b = s.blocks[i]
            out.append(with_step(s.index, Step(s.index, s.blocks[:i] + s.blocks[i + 1:], s.transfers)))  # dropped
            out.append(with_step(s.index, Step(s.index, s.blocks + (b,), s.transfers)))  # duplicated
            wide = dataclasses.replace(b, q_span=ALL, kv_span=ALL)
            out.append(with_step(s.index, Step(s.index, s.blocks[:i] + (wide,) + s.blocks[i + 1:], s.transfers)))
            flipped = dataclasses.replace(b, mask=Mask.NONE if b.mask is Mask.CAUSAL else Mask.CAUSAL)
            out.append(with_step(s.index, Step(s.index, s.blocks[:i] + (flipped,) + s.blocks[i + 1:], s.transfers)))
        if with_transfers:
            s = rng.choice(with_transfers)
            i = rng.randrange(len(s.transfers))
            t = s.transfers[i]
            out.append(with_step(s.index, Step(s.index, s.blocks, s.transfers[:i] + s.transfers[i + 1:])))  # lost
            if s.index + 1 < len(steps):  # delivered one step late
                later = steps[s.index + 1]
                moved = with_step(s.index, Step(s.index, s.blocks, s.transfers[:i] + s.transfers[i + 1:]))
                changed = list(moved.steps)
                changed[s.index + 1] = Step(later.index, later.blocks, later.transfers + (t,))
                out.append(dataclasses.replace(plan, steps=tuple(changed)))
            out.append(with_step(s.index, Step(s.index, s.blocks, s.transfers + (t,))))  # sent twice
            out.append(with_step(s.index, Step(s.index, s.blocks, s.transfers[:i] + (dataclasses.replace(
                t, span=ALL),) + s.transfers[i + 1:])))  # more than it holds, or a result for rows not computed
            other = (t.dst + 1) % plan.world_size
            if other != t.src:
                out.append(with_step(s.index, Step(s.index, s.blocks, s.transfers[:i] + (dataclasses.replace(
                    t, dst=other),) + s.transfers[i + 1:])))  # to the wrong rank
    out.append(dataclasses.replace(plan, steps=tuple(steps[:-1])))  # the last step lost
    return out


@pytest.mark.parametrize("algorithm", schedule_names())
def test_both_proofs_reject_the_same_broken_plans(algorithm):
    rng = random.Random(16)
    rejected = 0
    for n in (2, 3, 4, 5):
        for layout, causal in MASKS:
            for backward in (False, True):
                for broken in _broken(build_plan(algorithm, layout, causal, n, backward=backward), rng):
                    atoms, spans = _verdict(broken, "atoms"), _verdict(broken, "spans")
                    assert atoms == spans, (n, layout, causal, backward, broken.describe())
                    rejected += not atoms
    assert rejected > 100


def test_the_span_proof_catches_what_the_atom_tests_catch():
    good = build_plan("ring", "contiguous", False, 2)
    step = good.steps[0]
    duplicated = dataclasses.replace(good, steps=(Step(0, step.blocks + step.blocks[:1], step.transfers),)
                                     + good.steps[1:])
    with pytest.raises(PlanError, match="extra/duplicated"):
        check_plan(duplicated, method="spans")
    tokenring = build_plan("tokenring", "zigzag", True, 3)
    with pytest.raises(PlanError, match="never sends"):
        check_plan(dataclasses.replace(tokenring, steps=tokenring.steps[:-1]), method="spans")
    ring = build_plan("ring", "contiguous", False, 3, backward=True)
    with pytest.raises(PlanError, match="dk/dv"):
        check_plan(dataclasses.replace(ring, steps=ring.steps[:-1]), method="spans")
    with pytest.raises(ValueError, match="method"):
        check_plan(ring, method="pairs")
