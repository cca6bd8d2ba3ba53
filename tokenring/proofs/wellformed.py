"""What every checker asks of a step first: numbered in order, every rank named in the world, no self-sends.

The atom and span checkers (`tokenring.proofs.plancheck`) and the replicated-query
checker (`tokenring.proofs.replicated`) all start each step here, so a broken plan
gets the same words whichever proves it.
"""

from __future__ import annotations

import operator

from tokenring.plan.model import PlanError, Step

_rank, _q_owner, _kv_owner = operator.attrgetter("rank"), operator.attrgetter("q_owner"), operator.attrgetter("kv_owner")
_src, _dst, _owner = operator.attrgetter("src"), operator.attrgetter("dst"), operator.attrgetter("owner")


def check_step(step: Step, position: int, world: set[int]) -> str:
    """Raise `PlanError` unless ``step`` is well formed; returns how errors name it ("step 3")."""
    where = f"step {step.index}"
    if step.index != position:
        raise PlanError(f"{where} stands at position {position}: steps must be numbered 0, 1, 2, ... in order")
    blocks, transfers = step.blocks, step.transfers
    # Asked of all at once first (in C); one by one only to name the first culprit.
    if not (world.issuperset(map(_rank, blocks)) and world.issuperset(map(_q_owner, blocks))
            and world.issuperset(map(_kv_owner, blocks))):
        for b in blocks:
            if b.rank not in world or b.q_owner not in world or b.kv_owner not in world:
                raise PlanError(f"{where}: block outside the world: {b}")
    if not (world.issuperset(map(_src, transfers)) and world.issuperset(map(_dst, transfers))
            and world.issuperset(map(_owner, transfers))):
        for t in transfers:
            if t.src not in world or t.dst not in world or t.owner not in world:
                raise PlanError(f"{where}: transfer outside the world: {t}")
    for t in transfers:
        if t.src == t.dst:
            raise PlanError(f"{where}: rank {t.src} sends to itself")
    return where
