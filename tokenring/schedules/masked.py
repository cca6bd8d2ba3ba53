"""Any schedule's plan, cut down to a call's token mask (packed documents, window, padding).

Not a schedule: every schedule gets masks the same way. `mask_plan` takes the
schedule's plan for full attention (every query meets every key) and a
`TokenMask`, then

1. replaces each block by its parts that the mask lets something through:
   one per pair of same-document segments of the two shards that meet,
   trimmed to the rows that see something and the keys seen (a block whose
   rectangle holds no visible pair disappears); a part stays unmasked
   (`Mask.NONE`) when all of it is visible, else it is masked from the
   tokens (`Mask.TOKENS`);
2. sends each result message only for the rows its parts cover (the
   executor merges the parts into one message of that span);
3. sends each travelling query or key/value span only as far, and only as
   much of it, as some later block or forward needs (a backward liveness
   pass), dropping steps left with nothing.

The backward is derived from the masked forward as from any plan. Because
the full plan is proven and masking only removes pairs nobody may see,
`tokenring.proofs.masked.check_masked_plan` re-proves the result by counting:
each owner pair's visible pairs equal the sum over its (disjoint) blocks.
`tokenring.proofs.plancheck` proves small masked plans pair by pair in the tests.
"""

from __future__ import annotations

import dataclasses

from tokenring.interfaces import Mask
from tokenring.placement.masks import TokenMask, visible_rectangles
from tokenring.plan.model import Block, Payload, Plan, Span, Step, Transfer

_TRAVELLING = (Payload.QUERY, Payload.KEY_VALUE)


def _span(rows: tuple[int, int], length: int) -> Span:
    return Span.chunks(rows[0], rows[1], length)


def _masked_blocks(block: Block, tokens: TokenMask) -> list[Block]:
    """The parts of ``block`` where the mask lets something through: one per pair of document segments that meet.

    Fully visible parts of the same query rows whose key rows touch are one
    part (a query segment against many earlier runs of keys, as against a
    cache filled chunk by chunk).
    """
    q_length, kv_length = tokens.rows_per_rank, tokens.kv_rows_per_rank
    pieces = visible_rectangles(tokens, block.q_owner, block.q_span.row_range(q_length), block.kv_owner,
                                block.kv_span.row_range(kv_length))
    merged: list[tuple[tuple[int, int], tuple[int, int], bool]] = []
    for q_rows, kv_rows, full in pieces:
        if merged:
            last_q, last_kv, last_full = merged[-1]
            if full and last_full and last_q == q_rows and last_kv[1] == kv_rows[0]:
                merged[-1] = (q_rows, (last_kv[0], kv_rows[1]), True)
                continue
        merged.append((q_rows, kv_rows, full))
    rank, q_owner, kv_owner = block.rank, block.q_owner, block.kv_owner
    return [Block(rank, q_owner, _span(q_rows, q_length), kv_owner, _span(kv_rows, kv_length),
                  Mask.NONE if full else Mask.TOKENS)
            for q_rows, kv_rows, full in merged]


def mask_plan(plan: Plan, tokens: TokenMask) -> Plan:
    """``plan`` (a forward plan of full attention) restricted to what ``tokens`` lets queries see."""
    if plan.backward or plan.causal or plan.tokens is not None:
        raise ValueError(f"mask_plan takes a forward plan of full attention, got {plan.describe()[:80]}")
    if tokens.world_size != plan.world_size:
        raise ValueError(f"token mask for {tokens.world_size} ranks, plan for {plan.world_size}")
    for length in {tokens.rows_per_rank, tokens.kv_rows_per_rank}:
        if length % plan.granularity:
            raise ValueError(f"{length} rows per rank do not split into the plan's {plan.granularity} pieces")

    # 1. blocks
    blocks_per_step = [[_masked_blocks(b, tokens) for b in step.blocks] for step in plan.steps]

    # 2. results: each message carries the rows its blocks' parts still cover
    pending: dict[tuple[int, int, Span], list[Block]] = {}
    result_spans: dict[tuple[int, int], Span | None] = {}  # (step, transfer index) -> span, None: drop
    for index, step in enumerate(plan.steps):
        for t_index, t in enumerate(step.transfers):
            if t.payload is Payload.PARTIAL:
                parts = pending.pop((t.src, t.owner, t.span), [])
                span = None
                for part in parts:
                    span = part.q_span.hull(span)
                result_spans[(index, t_index)] = span
        for original, parts in zip(step.blocks, blocks_per_step[index]):
            if original.rank != original.q_owner:
                pending.setdefault((original.rank, original.q_owner, original.q_span), []).extend(parts)
    blocks_per_step_flat = [[part for parts in step_parts for part in parts] for step_parts in blocks_per_step]

    # 3. travelling inputs: only what is still needed, from the last step backwards
    need: dict[tuple[int, Payload, int], Span] = {}

    def needs(rank: int, payload: Payload, owner: int, span: Span) -> None:
        key = (rank, payload, owner)
        need[key] = span.hull(need.get(key))

    kept_transfers: list[list[Transfer]] = [[] for _ in plan.steps]
    for index in range(len(plan.steps) - 1, -1, -1):
        step = plan.steps[index]
        for t_index, t in enumerate(step.transfers):
            if t.payload is Payload.PARTIAL:
                span = result_spans[(index, t_index)]
                if span is not None:
                    kept_transfers[index].append(dataclasses.replace(t, span=span))
            elif t.payload in _TRAVELLING:
                wanted = need.get((t.dst, t.payload, t.owner))
                span = t.span.intersection(wanted) if wanted is not None else None
                if span is not None:
                    kept_transfers[index].append(dataclasses.replace(t, span=span))
                    needs(t.src, t.payload, t.owner, span)
            else:
                raise ValueError(f"mask_plan: unexpected {t.payload.value} transfer in a forward plan")
        for b in blocks_per_step_flat[index]:
            needs(b.rank, Payload.QUERY, b.q_owner, b.q_span)
            needs(b.rank, Payload.KEY_VALUE, b.kv_owner, b.kv_span)

    steps = []
    for index, step in enumerate(plan.steps):
        blocks = tuple(blocks_per_step_flat[index])
        transfers = tuple(kept_transfers[index])
        if blocks or transfers:
            steps.append(Step(len(steps), blocks, transfers))
    return dataclasses.replace(plan, steps=tuple(steps), causal=tokens.causal, tokens=tokens)
