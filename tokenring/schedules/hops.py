"""Plans in which one kind of tensor travels one hop per step round the ring.

Not a schedule itself: the TokenRing and ring builders are both this walk,
with queries or with keys/values travelling. The walk sends only the span of
a travelling tensor that some later holder still needs.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction

from ..interfaces import Mask
from ..layout import Layout
from ..plan import Block, Payload, ProblemShape, Span, Step, Transfer, visible_block

# A nominal MHA problem, used only to compare the two directions of travel;
# for the plans built here the choice does not depend on it.
NOMINAL_SHAPE = ProblemShape(batch=1, seq_local=2, q_heads=1, kv_heads=1, head_dim=64, itemsize=2)


def one_hop_steps(moves_queries: bool, layout: Layout, causal: bool, n: int, direction: int) -> tuple[Step, ...]:
    """The steps of a walk in which each owner's queries (or keys/values) move ``direction`` one hop per step.

    Queries travelling: each holder computes them against its own keys/values
    and the partial result goes straight back to the owner one step later, so
    the plan has one more step than compute steps. Keys/values travelling:
    each holder computes its own queries against them and keeps the result.
    """
    payload = Payload.QUERY if moves_queries else Payload.KEY_VALUE

    def holder(owner: int, hops: int) -> int:
        return (owner + hops * direction) % n

    def block(owner: int, hops: int) -> Block | None:
        rank = holder(owner, hops)
        q_owner, kv_owner = (owner, rank) if moves_queries else (rank, owner)
        visible = visible_block(layout, causal, q_owner, kv_owner)
        if visible is None:
            return None
        q_span, kv_span, mask = visible
        return Block(rank, q_owner, q_span, kv_owner, kv_span, mask)

    def still_needed(owner: int, from_hops: int) -> Span | None:
        needed: Span | None = None
        for hops in range(from_hops, n):
            b = block(owner, hops)
            if b is not None:
                needed = (b.q_span if moves_queries else b.kv_span).hull(needed)
        return needed

    n_steps = n + 1 if moves_queries and n > 1 else n
    steps = []
    for index in range(n_steps):
        blocks: list[Block] = []
        transfers: list[Transfer] = []
        for owner in range(n):
            if index < n:
                b = block(owner, index)
                if b is not None:
                    blocks.append(b)
                span = still_needed(owner, index + 1) if index < n - 1 else None
                if span is not None:
                    transfers.append(Transfer(holder(owner, index), holder(owner, index + 1), payload, owner, span))
            previous = block(owner, index - 1) if moves_queries and index >= 2 else None
            if previous is not None:
                transfers.append(Transfer(previous.rank, owner, Payload.PARTIAL, owner, previous.q_span))
        blocks.sort(key=lambda b: b.rank)
        steps.append(Step(index, tuple(blocks), tuple(transfers)))
    return tuple(steps)


def total_bytes(steps: tuple[Step, ...]) -> int:
    return sum(NOMINAL_SHAPE.payload_bytes(t.payload, t.span) for s in steps for t in s.transfers)


def cheaper_direction(moves_queries: bool, layout: Layout, causal: bool, n: int) -> tuple[int, tuple[Step, ...]]:
    """The direction (+1: r -> r+1) whose walk moves fewer bytes, ties to +1, and its steps."""
    walks = [(d, one_hop_steps(moves_queries, layout, causal, n, d)) for d in (1, -1)]
    return min(walks, key=lambda walk: total_bytes(walk[1]))


def direction_note(direction: int, what: str) -> str:
    return f"{what} travel r -> r{'+' if direction > 0 else '-'}1"



def _split_rows(span: Span, pieces: int) -> list[Span]:
    """``span`` cut into ``pieces`` equal runs of rows, in order."""
    edges = [span.start + span.fraction * Fraction(i, pieces) for i in range(pieces + 1)]
    return [Span(a, b) for a, b in zip(edges, edges[1:])]


def _own_block_halves(b: Block) -> tuple[list[Block], list[Block]] | None:
    """An owner's own block as (what stays at step 0, what moves to the tail), or None to keep it whole.

    No mask: the first half of its query rows stays, the second half moves.
    Causal (a diagonal block): the two diagonal halves stay, causal, and the
    second half's rows against the first half's keys, which they all see,
    move unmasked: half the work each way. Any other mask: kept whole.
    """
    first, second = _split_rows(b.q_span, 2)
    if b.mask is Mask.NONE:
        return [dataclasses.replace(b, q_span=first)], [dataclasses.replace(b, q_span=second)]
    if b.mask is Mask.CAUSAL and b.q_span == b.kv_span and b.q_owner == b.kv_owner:
        stays = [dataclasses.replace(b, q_span=half, kv_span=half) for half in (first, second)]
        return stays, [dataclasses.replace(b, q_span=second, kv_span=first, mask=Mask.NONE)]
    return None


def hide_tail(steps: tuple[Step, ...], pieces: int = 2, fill_with_own: bool = True) -> tuple[Step, ...]:
    """A queries-travel walk whose last blocks send their partials home in pieces as they finish.

    In the plain walk every holder computes its last block whole at the last
    compute step L and its partial (out, lse) leaves only at step L + 1, so
    the whole block and then the whole partial are exposed. Here each of the
    last step's blocks computed away from its owner is cut into ``pieces``
    runs of query rows: run i is computed at step L + i and its partial goes
    home at step L + i + 1, while run i + 1 is computed, so the final step
    carries 1/``pieces`` of each last partial. With ``fill_with_own`` half of
    each owner's own block (step 0, which needs nothing that travels) moves
    to that final step, so its compute covers the last piece's transfer.
    """
    last = max((s.index for s in steps if s.blocks), default=-1)
    tail = [b for b in steps[last].blocks if b.rank != b.q_owner] if last >= 0 else []
    if pieces < 2 or not tail or len(steps) != last + 2:
        return steps
    home = {(b.rank, b.q_owner, b.q_span) for b in tail}
    runs = {b: [dataclasses.replace(b, q_span=span) for span in _split_rows(b.q_span, pieces)] for b in tail}
    blocks: list[list[Block]] = [list(s.blocks) for s in steps[:last]] + [[] for _ in range(pieces + 1)]
    transfers: list[list[Transfer]] = [list(s.transfers) for s in steps[:last + 1]] + [[] for _ in range(pieces)]
    transfers[last + 1] = [t for t in steps[last + 1].transfers
                           if not (t.payload is Payload.PARTIAL and (t.src, t.owner, t.span) in home)]
    for b in steps[last].blocks:
        for i, run in enumerate(runs.get(b, [b])):
            blocks[last + i].append(run)
            if b in runs:
                transfers[last + i + 1].append(Transfer(run.rank, run.q_owner, Payload.PARTIAL, run.q_owner, run.q_span))
    if fill_with_own and last > 0:
        for b in list(blocks[0]):
            halves = _own_block_halves(b) if b.rank == b.q_owner else None
            if halves is not None:
                at = blocks[0].index(b)
                blocks[0][at:at + 1] = halves[0]
                blocks[-1] += halves[1]
    return tuple(Step(i, tuple(sorted(bs, key=lambda b: b.rank)), tuple(ts))
                 for i, (bs, ts) in enumerate(zip(blocks, transfers)))
