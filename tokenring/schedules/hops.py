"""Plans in which one kind of tensor travels one hop per step round the ring.

Not a schedule itself: the TokenRing and ring builders are both this walk,
with queries or with keys/values travelling. The walk sends only the span of
a travelling tensor that some later holder still needs.
"""

from __future__ import annotations

import dataclasses
import operator
from collections import Counter

from tokenring.interfaces import Mask
from tokenring.placement.layout import Layout
from tokenring.plan.model import Block, Payload, ProblemShape, Span, Step, Transfer, visible_block

# A nominal MHA problem, used only to compare the two directions of travel;
# for the plans built here the choice does not depend on it.
NOMINAL_SHAPE = ProblemShape(batch=1, seq_local=2, q_heads=1, kv_heads=1, head_dim=64, itemsize=2)


def visibility(layout: Layout, causal: bool):
    """``visible_block`` as a function of (q_owner, kv_owner), asked once per case.

    What a pair sees depends only on whether the query owner comes before,
    after or is the key owner (`plan.visible_block`), so the walks below,
    which ask N^2 times, ask it three times and reuse the same spans.
    """
    cases = {(a, b): visible_block(layout, causal, a, b) for a, b in ((0, 0), (1, 0), (0, 1))}
    same, later, earlier = cases[(0, 0)], cases[(1, 0)], cases[(0, 1)]

    def visible(q_owner: int, kv_owner: int) -> tuple[Span, Span, Mask] | None:
        if q_owner == kv_owner:
            return same
        return later if q_owner > kv_owner else earlier

    return visible


def hull(span: Span, other: Span | None) -> Span:
    """``span.hull(other)``, with the walks' common cases first: nothing yet, or the same span."""
    if other is None or other == span:
        return span
    return span.hull(other)


def _walk(moves_queries: bool, layout: Layout, causal: bool, n: int, direction: int):
    """Per owner, per hop: the visible (q_span, kv_span, mask) or None, and the span still needed from that hop on.

    ``needed[owner][h]`` is the hull of the travelling spans of hops h..n-1, a
    running hull from the last hop backwards: O(N^2) in all.
    """
    visible = visibility(layout, causal)
    same, later, earlier = visible(0, 0), visible(1, 0), visible(0, 1)
    if not moves_queries:  # the holder's queries against the owner's keys: the roles swap
        later, earlier = earlier, later
    travelling = 0 if moves_queries else 1
    seen: list[list] = []
    needed: list[list[Span | None]] = []
    for owner in range(n):
        # The rank at each hop, and whether the owner's queries come after (later) or before its keys there.
        row = [same if rank == owner else (later if owner > rank else earlier)
               for rank in ((owner + hops * direction) % n for hops in range(n))]
        running: Span | None = None
        still: list[Span | None] = [None] * (n + 1)
        for hops in range(n - 1, -1, -1):
            v = row[hops]
            if v is not None:
                span = v[travelling]
                running = span if running is None or running == span else span.hull(running)
            still[hops] = running
        seen.append(row)
        needed.append(still)
    return seen, needed


def one_hop_steps(moves_queries: bool, layout: Layout, causal: bool, n: int, direction: int) -> tuple[Step, ...]:
    """The steps of a walk in which each owner's queries (or keys/values) move ``direction`` one hop per step.

    Queries travelling: each holder computes them against its own keys/values
    and the partial result goes straight back to the owner one step later, so
    the plan has one more step than compute steps. Keys/values travelling:
    each holder computes its own queries against them and keeps the result.
    Each transfer carries the hull of what the later holders still need.
    """
    return _steps(moves_queries, n, direction, *_walk(moves_queries, layout, causal, n, direction))


def _steps(moves_queries: bool, n: int, direction: int, seen: list[list], needed: list[list[Span | None]]) -> tuple[Step, ...]:
    payload = Payload.QUERY if moves_queries else Payload.KEY_VALUE
    partial = Payload.PARTIAL
    n_steps = n + 1 if moves_queries and n > 1 else n
    steps = []
    for index in range(n_steps):
        blocks: list[Block] = []
        transfers: list[Transfer] = []
        add_block, add_transfer = blocks.append, transfers.append
        if index < n:
            shift = index * direction
            for rank in range(n):  # each rank holds one owner's tensor per step: blocks come in rank order
                owner = (rank - shift) % n
                v = seen[owner][index]
                if v is not None:
                    if moves_queries:
                        add_block(Block(rank, owner, v[0], rank, v[1], v[2]))
                    else:
                        add_block(Block(rank, rank, v[0], owner, v[1], v[2]))
        sends = index < n - 1
        results = moves_queries and index >= 2
        if sends or results:
            here = (index * direction) % n        # where owner 0's tensor is at this step
            before = ((index - 1) * direction) % n  # and where it was one step earlier
            for owner in range(n):
                if sends:
                    span = needed[owner][index + 1]
                    if span is not None:
                        add_transfer(Transfer(here, (here + direction) % n, payload, owner, span))
                if results:
                    previous = seen[owner][index - 1]
                    if previous is not None:
                        add_transfer(Transfer(before, owner, partial, owner, previous[0]))
                here = here + 1 if here < n - 1 else 0
                before = before + 1 if before < n - 1 else 0
        steps.append(Step(index, tuple(blocks), tuple(transfers)))
    return tuple(steps)


def total_bytes(steps: tuple[Step, ...]) -> int:
    return sum(NOMINAL_SHAPE.payload_bytes(t.payload, t.span) for s in steps for t in s.transfers)


def _walk_bytes(moves_queries: bool, n: int, seen: list[list], needed: list[list[Span | None]]) -> int:
    """``total_bytes`` of the steps ``_steps`` would build from this walk, without building them."""
    payload = Payload.QUERY if moves_queries else Payload.KEY_VALUE
    sizes: dict[tuple[Payload, Span], int] = {}

    def size(p: Payload, span: Span) -> int:
        got = sizes.get((p, span))
        if got is None:
            got = sizes[(p, span)] = NOMINAL_SHAPE.payload_bytes(p, span)
        return got

    sent: Counter = Counter()  # travelling spans sent, and the query spans whose partials go home
    results: Counter = Counter()
    for owner in range(n):
        sent.update(needed[owner][1:n])  # transfers at steps 0..n-2 carry needed[1..n-1]
        if moves_queries and n > 1:  # partials of the blocks at hops 1..n-1 go home at step hops + 1
            results.update(v[0] for v in seen[owner][1:n] if v is not None)
    total = sum(count * size(payload, span) for span, count in sent.items() if span is not None)
    return total + sum(count * size(Payload.PARTIAL, span) for span, count in results.items())


def cheaper_direction(moves_queries: bool, layout: Layout, causal: bool, n: int) -> tuple[int, tuple[Step, ...]]:
    """The direction (+1: r -> r+1) whose walk moves fewer bytes, ties to +1, and its steps."""
    walks = []
    for d in (1, -1):
        walk = _walk(moves_queries, layout, causal, n, d)
        walks.append((_walk_bytes(moves_queries, n, *walk), d, walk))
    cost, direction, walk = min(walks, key=lambda w: w[0])  # the first of equals: ties go to +1
    return direction, _steps(moves_queries, n, direction, *walk)


def direction_note(direction: int, what: str) -> str:
    return f"{what} travel r -> r{'+' if direction > 0 else '-'}1"



def _split_rows(span: Span, pieces: int) -> list[Span]:
    """``span`` cut into ``pieces`` equal runs of rows, in order."""
    start, stop, of = span
    edges = [start * pieces + (stop - start) * i for i in range(pieces + 1)]
    return [Span(a, b, of * pieces) for a, b in zip(edges, edges[1:])]


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
        first: list[Block] = []
        for b in blocks[0]:
            halves = _own_block_halves(b) if b.rank == b.q_owner else None
            if halves is None:
                first.append(b)
            else:  # in its place, what stays; what moves goes to the final step
                first += halves[0]
                blocks[-1] += halves[1]
        blocks[0] = first
    by_rank = operator.attrgetter("rank")
    return tuple(Step(i, tuple(sorted(bs, key=by_rank)), tuple(ts)) for i, (bs, ts) in enumerate(zip(blocks, transfers)))
