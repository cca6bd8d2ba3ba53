"""Plans in which one kind of tensor travels one hop per step round the ring.

Not a schedule itself: the TokenRing and ring builders are both this walk,
with queries or with keys/values travelling. The walk sends only the span of
a travelling tensor that some later holder still needs.
"""

from __future__ import annotations

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

