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
from .plan import Block, Part, Payload, Plan

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


def check_plan(plan: Plan) -> None:
    """Raise PlanError with the first thing the plan gets wrong."""
    n = plan.world_size
    held: list[dict[tuple[Payload, int], Part]] = [
        {(Payload.QUERY, r): Part.ALL, (Payload.KEY_VALUE, r): Part.ALL} for r in range(n)
    ]
    pending: list[dict[int, tuple[Part, list[Pair]]]] = [{} for _ in range(n)]  # partials not yet sent
    covered: list[list[Pair]] = [[] for _ in range(n)]  # per query owner, what reached it

    for step in plan.steps:
        where = f"step {step.index}"
        if len({b.rank for b in step.blocks}) != len(step.blocks):
            raise PlanError(f"{where}: a rank computes two blocks")
        arriving: list[tuple[int, tuple[Payload, int], Part, list[Pair] | None]] = []
        for t in step.transfers:
            if t.src == t.dst:
                raise PlanError(f"{where}: rank {t.src} sends to itself")
            if not (0 <= t.src < n and 0 <= t.dst < n):
                raise PlanError(f"{where}: transfer outside the world: {t}")
            if t.payload is Payload.PARTIAL:
                waiting = pending[t.src].pop(t.owner, None)
                if waiting is None or waiting[0] is not t.part:
                    raise PlanError(f"{where}: rank {t.src} sends a partial for rank {t.owner} it does not hold: {t}")
                if t.dst != t.owner:
                    raise PlanError(f"{where}: partial for rank {t.owner} sent to rank {t.dst}")
                arriving.append((t.dst, (t.payload, t.owner), t.part, waiting[1]))
            else:
                have = held[t.src].get((t.payload, t.owner))
                if have is None or not have.contains(t.part):
                    raise PlanError(f"{where}: rank {t.src} sends {t.payload.value}[{t.owner}].{t.part.value} it does not hold")
                arriving.append((t.dst, (t.payload, t.owner), t.part, None))
        for block in step.blocks:
            r = block.rank
            for payload, owner, part in (
                (Payload.QUERY, block.q_owner, block.q_part),
                (Payload.KEY_VALUE, block.kv_owner, block.kv_part),
            ):
                have = held[r].get((payload, owner))
                if have is None or not have.contains(part):
                    raise PlanError(f"{where}: rank {r} computes with {payload.value}[{owner}].{part.value} it does not hold")
            pairs = block_pairs(plan, block)
            if block.q_owner == r:
                covered[r].extend(pairs)
            else:
                if block.q_owner in pending[r]:
                    raise PlanError(f"{where}: rank {r} overwrites an unsent partial for rank {block.q_owner}")
                pending[r][block.q_owner] = (block.q_part, pairs)
        for dst, key, part, pairs in arriving:
            if pairs is not None:
                covered[dst].extend(pairs)
            else:
                held[dst][key] = part

    for r in range(n):
        if pending[r]:
            raise PlanError(f"rank {r} never sends its partials for ranks {sorted(pending[r])}")
    required = required_pairs(plan)
    got: Counter = Counter()
    for owner in range(n):
        for pair in covered[owner]:
            if pair[0] not in rank_chunks(plan.layout, owner, n):
                raise PlanError(f"rank {owner} received a result for query chunk {pair[0]}, which it does not own")
            got[pair] += 1
    if got != required:
        missing = sorted((required - got).elements())[:5]
        extra = sorted((got - required).elements())[:5]
        raise PlanError(f"chunk pairs missing {missing} or extra/duplicated {extra}")


def work_per_rank(plan: Plan) -> list[list[float]]:
    """work[step][rank] in units of (half shard)^2 of score entries."""
    return [
        [next((b.work for b in step.blocks if b.rank == r), 0.0) for r in range(plan.world_size)]
        for step in plan.steps
    ]
