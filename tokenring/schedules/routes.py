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

from tokenring.placement.layout import Layout
from tokenring.plan.model import ALL, Block, Payload, Span, Step, Transfer
from tokenring.schedules.hops import hull, visibility


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
    visible = visibility(layout, causal)
    pieces: dict[tuple[Span, int], Span | None] = {}  # (a visible span, route) -> its part in the route's piece

    def piece_of(span: Span, at: int) -> Span | None:
        key = (span, at)
        if key not in pieces:
            pieces[key] = span.intersection(routes[at].piece)
        return pieces[key]

    # Per route and owner: the ranks it visits, the block at each hop and the span still needed from each hop on.
    paths: list[list[list[int]]] = []
    blocks_at: list[list[list[Block | None]]] = []
    needed: list[list[list[Span | None]]] = []
    for at, route in enumerate(routes):
        route_paths, route_blocks, route_needed = [], [], []
        for owner in range(n):
            path = [owner]
            for _ in range(route.hops):
                path.append(route.successor[path[-1]])
            row: list[Block | None] = [None]
            for hop in range(1, route.hops + 1):
                rank = path[hop]
                q_owner, kv_owner = (owner, rank) if moves_queries else (rank, owner)
                v = visible(q_owner, kv_owner)
                b = None
                if v is not None:
                    q_span, kv_span, mask = v
                    if moves_queries:
                        q_span = piece_of(q_span, at)
                    else:
                        kv_span = piece_of(kv_span, at)
                    if q_span is not None and kv_span is not None:
                        b = Block(rank, q_owner, q_span, kv_owner, kv_span, mask)
                row.append(b)
            still: list[Span | None] = [None] * (route.hops + 2)
            running: Span | None = None
            for hop in range(route.hops, 0, -1):
                b = row[hop]
                if b is not None:
                    running = hull(b.q_span if moves_queries else b.kv_span, running)
                still[hop] = running
            route_paths.append(path)
            route_blocks.append(row)
            route_needed.append(still)
        paths.append(route_paths)
        blocks_at.append(route_blocks)
        needed.append(route_needed)

    last_hop = max((r.hops for r in routes), default=0)
    n_steps = last_hop + 2 if moves_queries and last_hop else last_hop + 1
    computed: dict[int, list[Block]] = {}
    steps = []
    for index in range(n_steps):
        blocks: list[Block] = []
        transfers: list[Transfer] = []
        for owner in range(n):
            if index == 0:
                v = visible(owner, owner)
                if v is not None:
                    blocks.append(Block(owner, owner, v[0], owner, v[1], v[2]))
            for at, route in enumerate(routes):
                if 1 <= index <= route.hops:
                    b = blocks_at[at][owner][index]
                    if b is not None:
                        blocks.append(b)
                span = needed[at][owner][index + 1] if index < route.hops else None
                if span is not None:
                    path = paths[at][owner]
                    transfers.append(Transfer(path[index], path[index + 1], payload, owner, span))
        if moves_queries:
            for b in computed.get(index - 1, ()):
                if b.rank != b.q_owner:
                    transfers.append(Transfer(b.rank, b.q_owner, Payload.PARTIAL, b.q_owner, b.q_span))
        blocks.sort(key=lambda b: b.rank)
        computed[index] = blocks
        steps.append(Step(index, tuple(blocks), tuple(transfers)))
    return tuple(steps)
