"""Multi-ring schedules: the travelling tensor split into pieces, one per edge-disjoint directed ring.

On a direct full mesh a single ring uses 1/(N-1) of each rank's outgoing
links. Here each owner's travelling shard is cut into k pieces and piece i
goes round directed Hamiltonian ring i (`tokenring.schedules.rings`); the
rings share no directed link, so all k pieces move at once, each over links
of its own (the idea of TASP / HamiltonAttention, arXiv 2509.26541). k is the
largest power of two not above the number of rings found (N = 8: 7 rings,
k = 4), so a shard splits into k equal pieces (S_local a multiple of k; with
zigzag, piece i is chunk i of each half, and S_local a multiple of 2k). ``tokenring-multi`` moves queries (partials straight home),
``ring-multi`` keys/values. Behind a switch the links are not separate and
these only tie with the one-ring forms at best.
"""

from __future__ import annotations

from tokenring.hookspecs import hookimpl
from tokenring.placement.layout import Layout
from tokenring.plan.model import Plan, Schedule, Span
from tokenring.schedules.hops import hide_tail
from tokenring.schedules.rings import directed_rings
from tokenring.schedules.routes import Route, ring_successors, route_steps


def ring_count(n: int) -> int:
    """How many of the edge-disjoint rings carry a piece: the largest power of two not above their number."""
    count = 1
    while count * 2 <= len(directed_rings(n)):
        count *= 2
    return count


def multi_ring_routes(n: int, layout: Layout) -> list[Route]:
    """Piece i of every owner's shard round ring i.

    With the zigzag layout piece i is chunk i of each of the shard's two
    halves (two routes on the same ring): the causal blocks then give every
    rank the same work at every step, since a rank needs either a whole
    shard's first half or its second half, never a quarter of the rows only.
    """
    rings = directed_rings(n)
    k = ring_count(n)
    routes = []
    for i in range(k):
        successor = ring_successors(list(rings[i]))
        if layout is Layout.ZIGZAG:
            routes += [Route(successor, Span.chunks(i, i + 1, 2 * k), n - 1),
                       Route(successor, Span.chunks(k + i, k + i + 1, 2 * k), n - 1)]
        else:
            routes.append(Route(successor, Span.chunks(i, i + 1, k), n - 1))
    return routes


def _note(n: int) -> str:
    return f"{ring_count(n)} pieces on as many of the {len(directed_rings(n))} edge-disjoint rings"


def build_queries(layout: Layout, causal: bool, world_size: int) -> Plan:
    steps = hide_tail(route_steps(True, layout, causal, world_size, multi_ring_routes(world_size, layout)))
    return Plan("tokenring-multi", layout, causal, world_size, steps, note="queries: " + _note(world_size))


def build_keys(layout: Layout, causal: bool, world_size: int) -> Plan:
    steps = route_steps(False, layout, causal, world_size, multi_ring_routes(world_size, layout))
    return Plan("ring-multi", layout, causal, world_size, steps, note="keys/values: " + _note(world_size))


@hookimpl
def tokenring_register_schedules(register):
    register(Schedule("tokenring-multi",
                      "queries split over edge-disjoint directed rings of a full mesh; partials straight home",
                      build_queries))
    register(Schedule("ring-multi", "keys/values split over edge-disjoint directed rings of a full mesh",
                      build_keys))
