"""Plans in which pieces of one kind of tensor travel several routes at once.

Not a schedule itself: the two-way and multi-ring schedules are this walk.
A `Route` is a directed ring of all ranks (each rank's successor), the piece
of every owner's travelling tensor (queries, or keys/values) that goes round
it, and how many hops it makes. All routes move one hop per step together,
so on a full mesh each uses its own links. Each owner computes its own block
once, whole, at step 0; every other block is the visible part of one piece
at one holder. Queries travelling: each partial result goes straight home
one step after its block. A piece travels only as far as some later holder
on its route needs it, and only the span that holder needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..layout import Layout
from ..plan import ALL, Block, Payload, Span, Step, Transfer, visible_block


@dataclass(frozen=True)
class Route:
    successor: tuple[int, ...]  # successor[r]: the rank after r on this ring
    piece: Span                 # the rows of each owner's travelling shard that go this way
    hops: int                   # how many ranks after the owner it visits


def ring_successors(order: list[int]) -> tuple[int, ...]:
    """The successor map of the directed ring visiting ``order`` and back to its start."""
    successor = [0] * len(order)
    for here, there in zip(order, order[1:] + order[:1]):
        successor[here] = there
    return tuple(successor)


def two_way_routes(n: int) -> list[Route]:
    """The whole tensor both ways round the ring r -> r+1 and r -> r-1, half the ranks each way."""
    up = ring_successors(list(range(n)))
    down = ring_successors(list(range(n))[::-1])
    routes = [Route(up, ALL, n // 2)]  # ceil((n - 1) / 2)
    if (n - 1) // 2:
        routes.append(Route(down, ALL, (n - 1) // 2))
    return routes


def route_steps(moves_queries: bool, layout: Layout, causal: bool, n: int, routes: list[Route]) -> tuple[Step, ...]:
    payload = Payload.QUERY if moves_queries else Payload.KEY_VALUE

    def holder(route: Route, owner: int, hop: int) -> int:
        rank = owner
        for _ in range(hop):
            rank = route.successor[rank]
        return rank

    def block(route: Route | None, owner: int, hop: int) -> Block | None:
        rank = owner if route is None else holder(route, owner, hop)
        q_owner, kv_owner = (owner, rank) if moves_queries else (rank, owner)
        visible = visible_block(layout, causal, q_owner, kv_owner)
        if visible is None:
            return None
        q_span, kv_span, mask = visible
        if route is not None:
            if moves_queries:
                q_span = q_span.intersection(route.piece)
            else:
                kv_span = kv_span.intersection(route.piece)
            if q_span is None or kv_span is None:
                return None
        return Block(rank, q_owner, q_span, kv_owner, kv_span, mask)

    def still_needed(route: Route, owner: int, from_hop: int) -> Span | None:
        needed: Span | None = None
        for hop in range(from_hop, route.hops + 1):
            b = block(route, owner, hop)
            if b is not None:
                needed = (b.q_span if moves_queries else b.kv_span).hull(needed)
        return needed

    last_hop = max((r.hops for r in routes), default=0)
    n_steps = last_hop + 2 if moves_queries and last_hop else last_hop + 1
    computed: dict[int, list[Block]] = {}
    steps = []
    for index in range(n_steps):
        blocks: list[Block] = []
        transfers: list[Transfer] = []
        for owner in range(n):
            if index == 0:
                own = block(None, owner, 0)
                if own is not None:
                    blocks.append(own)
            for route in routes:
                if 1 <= index <= route.hops:
                    b = block(route, owner, index)
                    if b is not None:
                        blocks.append(b)
                span = still_needed(route, owner, index + 1) if index < route.hops else None
                if span is not None:
                    transfers.append(Transfer(holder(route, owner, index), holder(route, owner, index + 1), payload,
                                              owner, span))
        if moves_queries:
            for b in computed.get(index - 1, ()):
                if b.rank != b.q_owner:
                    transfers.append(Transfer(b.rank, b.q_owner, Payload.PARTIAL, b.q_owner, b.q_span))
        blocks.sort(key=lambda b: b.rank)
        computed[index] = blocks
        steps.append(Step(index, tuple(blocks), tuple(transfers)))
    return tuple(steps)
