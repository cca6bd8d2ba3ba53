"""The proof of replicated-query plans (decode against a sequence-sharded cache, `tokenring.schedules.replicated`).

It walks the plan on symbols, as `tokenring.proofs.plancheck` does for other
plans: each rank's result must cover every (query atom, key atom) pair
exactly once, every message must be sent by the rank whose result it is,
only once it has one, and a rank computes only with its own queries and
keys/values.
"""

from __future__ import annotations

import math
from collections import Counter

from tokenring.interfaces import Mask
from tokenring.plan.model import Payload, Plan, PlanError, Span
from tokenring.proofs.wellformed import check_step


def check_replicated_plan(plan: Plan) -> None:
    """Raise `PlanError` unless every rank's result covers every (query, key) pair exactly once."""
    if not plan.replicated_queries:
        raise PlanError("check_replicated_plan needs a plan with replicated queries")
    if plan.backward or plan.causal or plan.tokens is not None:
        raise PlanError("a replicated-query plan is a forward plan of full attention (no causal or token mask)")
    n = plan.world_size
    spans = [s for step in plan.steps for b in step.blocks for s in (b.q_span, b.kv_span)]
    spans += [t.span for step in plan.steps for t in step.transfers]
    atoms = math.lcm(1, *(s.denominator for s in spans))

    def q_atoms(span: Span) -> range:
        first, count = span.rows(atoms)
        return range(first, first + count)

    covered = [Counter() for _ in range(n)]  # per rank: (query atom, (key owner, key atom)) -> times
    world = set(range(n))
    for position, step in enumerate(plan.steps):
        where = check_step(step, position, world)
        arriving = []
        for t in step.transfers:
            if t.payload is not Payload.MERGED:
                raise PlanError(f"{where}: payload {t.payload.value} does not belong in a replicated-query plan")
            if t.owner != t.src:
                raise PlanError(f"{where}: rank {t.src} sends rank {t.owner}'s merged result: only its own")
            rows = set(q_atoms(t.span))
            carried = Counter({pair: c for pair, c in covered[t.src].items() if pair[0] in rows})
            if not carried:
                raise PlanError(f"{where}: rank {t.src} sends a merged result for {t.span} before it has any")
            arriving.append((t.dst, carried))
        for b in step.blocks:
            if b.q_owner != b.rank or b.kv_owner != b.rank:
                raise PlanError(f"{where}: rank {b.rank} computes with another rank's queries or keys: {b}")
            if b.mask is not Mask.NONE:
                raise PlanError(f"{where}: masked block in a replicated-query plan: {b}")
            first, count = b.kv_span.rows(atoms)
            for qa in q_atoms(b.q_span):
                for ka in range(first, first + count):
                    covered[b.rank][(qa, (b.kv_owner, ka))] += 1
        for dst, carried in arriving:
            covered[dst].update(carried)
    required = Counter({(qa, (owner, ka)): 1 for qa in range(atoms) for owner in range(n) for ka in range(atoms)})
    for rank, got in enumerate(covered):
        if got != required:
            missing = sorted((required - got).elements())[:5]
            extra = sorted((got - required).elements())[:5]
            raise PlanError(f"rank {rank}'s result: (query atom, (key owner, key atom)) pairs missing {missing} "
                            f"or extra/duplicated {extra}")
