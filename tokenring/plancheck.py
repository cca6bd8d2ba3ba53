"""Checking a plan by running it on symbols instead of tensors.

`check_plan` follows every tensor through the plan (who holds which part of
whose queries or keys/values, which partial results are waiting to be sent)
and proves, at the granularity of sequence chunks, that every query chunk
meets every key chunk it may see exactly once, under the right mask, and that
every partial result reaches its owner. It needs no process and no tensor, so
any plan (ours or a new one) can be checked in microseconds.
"""

from __future__ import annotations

from collections import Counter

from .interfaces import Mask
from .layout import rank_chunks
from .plan import Block, Part, Payload, Plan, Transfer

FULL = "full"
DIAGONAL = "diagonal"
Pair = tuple[int, int, str]  # (query chunk, key chunk, how they meet)


class PlanError(AssertionError):
    """The plan would compute something other than exact attention."""


def _part_chunks(plan: Plan, owner: int, part: Part) -> tuple[int, ...]:
    chunks = rank_chunks(plan.layout, owner, plan.world_size)
    if part is Part.ALL:
        return chunks
    if len(chunks) != 2:
        raise PlanError(f"part {part.value} used with the {plan.layout.value} layout, which has no halves")
    return (chunks[0],) if part is Part.FIRST else (chunks[1],)


def block_pairs(plan: Plan, block: Block) -> list[Pair]:
    """The (query chunk, key chunk, how) pairs one block computes."""
    q_chunks = _part_chunks(plan, block.q_owner, block.q_part)
    kv_chunks = _part_chunks(plan, block.kv_owner, block.kv_part)
    if block.mask is Mask.NONE:
        return [(qc, kc, FULL) for qc in q_chunks for kc in kv_chunks]
    if (block.q_owner, block.q_part) != (block.kv_owner, block.kv_part):
        raise PlanError(f"causal mask on a block that is not a local diagonal block: {block}")
    # Causal within the concatenated local chunks: position a sees position b <= a.
    pairs = []
    for a, qc in enumerate(q_chunks):
        for b, kc in enumerate(kv_chunks):
            if a > b:
                pairs.append((qc, kc, FULL))
            elif a == b:
                pairs.append((qc, kc, DIAGONAL))
    return pairs


def required_pairs(plan: Plan) -> Counter:
    n_chunks = len(rank_chunks(plan.layout, 0, plan.world_size)) * plan.world_size
    pairs: Counter = Counter()
    for qc in range(n_chunks):
        for kc in range(n_chunks):
            if not plan.causal:
                pairs[(qc, kc, FULL)] += 1
            elif qc > kc:
                pairs[(qc, kc, FULL)] += 1
            elif qc == kc:
                pairs[(qc, kc, DIAGONAL)] += 1
    return pairs


_RESULT = {False: Payload.PARTIAL, True: Payload.GRAD_PARTIAL}
_QUERY = {False: Payload.QUERY, True: Payload.GRAD_QUERY}


def check_plan(plan: Plan) -> None:
    """Raise PlanError with the first thing the plan gets wrong.

    Forward plans: every query chunk's output covers every visible key chunk
    exactly once. Backward plans, in addition: every key chunk's dk/dv
    receives each visible query chunk's contribution exactly once, and the
    travelling dk/dv sums end at their owners.
    """
    n = plan.world_size
    query, result = _QUERY[plan.backward], _RESULT[plan.backward]
    held: list[dict[tuple[Payload, int], Part]] = [
        {(query, r): Part.ALL, (Payload.KEY_VALUE, r): Part.ALL} for r in range(n)
    ]
    pending: list[dict[int, tuple[Part, list[Pair]]]] = [{} for _ in range(n)]  # results not yet sent
    travelling_kv: list[dict[int, list[Pair]]] = [{} for _ in range(n)]  # dk/dv sums held on the way home
    covered_q: list[list[Pair]] = [[] for _ in range(n)]   # per query owner, what reached it
    covered_kv: list[list[Pair]] = [[] for _ in range(n)]  # per key owner (backward only)

    for step in plan.steps:
        where = f"step {step.index}"
        if len({b.rank for b in step.blocks}) != len(step.blocks):
            raise PlanError(f"{where}: a rank computes two blocks")
        arriving: list[tuple[Transfer, list[Pair] | None]] = []
        for t in step.transfers:
            if t.src == t.dst:
                raise PlanError(f"{where}: rank {t.src} sends to itself")
            if not (0 <= t.src < n and 0 <= t.dst < n):
                raise PlanError(f"{where}: transfer outside the world: {t}")
            if t.payload is result:
                waiting = pending[t.src].pop(t.owner, None)
                if waiting is None or waiting[0] is not t.part:
                    raise PlanError(f"{where}: rank {t.src} sends a result for rank {t.owner} it does not hold: {t}")
                if t.dst != t.owner:
                    raise PlanError(f"{where}: result for rank {t.owner} sent to rank {t.dst}")
                arriving.append((t, waiting[1]))
            elif t.payload is Payload.GRAD_KEY_VALUE and plan.backward:
                pairs = travelling_kv[t.src].pop(t.owner, None)
                if not pairs:
                    raise PlanError(f"{where}: rank {t.src} sends dk/dv for rank {t.owner} it does not hold")
                allowed = _part_chunks(plan, t.owner, t.part)
                if any(kc not in allowed for _, kc, _ in pairs):
                    raise PlanError(f"{where}: dk/dv for rank {t.owner} sent as part {t.part.value} misses rows")
                arriving.append((t, pairs))
            elif t.payload in (query, Payload.KEY_VALUE):
                have = held[t.src].get((t.payload, t.owner))
                if have is None or not have.contains(t.part):
                    raise PlanError(f"{where}: rank {t.src} sends {t.payload.value}[{t.owner}].{t.part.value} it does not hold")
                arriving.append((t, None))
            else:
                raise PlanError(f"{where}: payload {t.payload.value} does not belong in a {'backward' if plan.backward else 'forward'} plan")
        for block in step.blocks:
            r = block.rank
            for payload, owner, part in ((query, block.q_owner, block.q_part), (Payload.KEY_VALUE, block.kv_owner, block.kv_part)):
                have = held[r].get((payload, owner))
                if have is None or not have.contains(part):
                    raise PlanError(f"{where}: rank {r} computes with {payload.value}[{owner}].{part.value} it does not hold")
            pairs = block_pairs(plan, block)
            if block.q_owner == r:
                covered_q[r].extend(pairs)
            else:
                if block.q_owner in pending[r]:
                    raise PlanError(f"{where}: rank {r} overwrites an unsent result for rank {block.q_owner}")
                pending[r][block.q_owner] = (block.q_part, pairs)
            if plan.backward:
                if block.kv_owner == r:
                    covered_kv[r].extend(pairs)
                else:
                    travelling_kv[r].setdefault(block.kv_owner, []).extend(pairs)
        for t, pairs in arriving:
            if t.payload is result:
                covered_q[t.dst].extend(pairs)
            elif t.payload is Payload.GRAD_KEY_VALUE:
                if t.dst == t.owner:
                    covered_kv[t.dst].extend(pairs)
                else:
                    travelling_kv[t.dst].setdefault(t.owner, []).extend(pairs)
            else:
                held[t.dst][(t.payload, t.owner)] = t.part

    for r in range(n):
        if pending[r]:
            raise PlanError(f"rank {r} never sends its results for ranks {sorted(pending[r])}")
        if travelling_kv[r]:
            raise PlanError(f"rank {r} never sends the dk/dv it holds for ranks {sorted(travelling_kv[r])}")
    _check_coverage(plan, covered_q, "query", 0)
    if plan.backward:
        _check_coverage(plan, covered_kv, "key", 1)


def _check_coverage(plan: Plan, covered: list[list[Pair]], what: str, index: int) -> None:
    got: Counter = Counter()
    for owner, pairs in enumerate(covered):
        mine = rank_chunks(plan.layout, owner, plan.world_size)
        for pair in pairs:
            if pair[index] not in mine:
                raise PlanError(f"rank {owner} received a result for {what} chunk {pair[index]}, which it does not own")
            got[pair] += 1
    required = required_pairs(plan)
    if got != required:
        missing = sorted((required - got).elements())[:5]
        extra = sorted((got - required).elements())[:5]
        raise PlanError(f"{what} side: chunk pairs missing {missing} or extra/duplicated {extra}")


def work_per_rank(plan: Plan) -> list[list[float]]:
    """work[step][rank] in units of (half shard)^2 of score entries."""
    return [
        [next((b.work for b in step.blocks if b.rank == r), 0.0) for r in range(plan.world_size)]
        for step in plan.steps
    ]
