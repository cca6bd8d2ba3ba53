"""Two-way schedules: the travelling tensor goes both ways round the ring, half the ranks each way.

``tokenring-2way``: each owner's queries go to r+1, r+2, ... and to r-1,
r-2, ... at once, ceil((N-1)/2) and floor((N-1)/2) hops; every holder sends
its partial straight home one step later; the last blocks' partials leave
in halves as they finish (`hops.hide_tail`). ``ring-2way``: the same with the
keys/values, results staying where computed; in the backward each holder's
dK/dV sum goes straight home. Both use both directions of every ring link in
about half the steps of their one-way form (docs/design.md, "Where each
schedule wins and why").
"""

from __future__ import annotations

from tokenring.hookspecs import hookimpl
from tokenring.placement.layout import Layout
from tokenring.plan.model import Plan, Schedule
from tokenring.schedules.hops import hide_tail
from tokenring.schedules.routes import route_steps, two_way_routes


def build_queries(layout: Layout, causal: bool, world_size: int) -> Plan:
    steps = hide_tail(route_steps(True, layout, causal, world_size, two_way_routes(world_size)))
    return Plan("tokenring-2way", layout, causal, world_size, steps, note="queries travel both ways, half the ring each")


def build_keys(layout: Layout, causal: bool, world_size: int) -> Plan:
    steps = route_steps(False, layout, causal, world_size, two_way_routes(world_size))
    return Plan("ring-2way", layout, causal, world_size, steps, note="keys/values travel both ways, half the ring each")


@hookimpl
def tokenring_register_schedules(register):
    register(Schedule("tokenring-2way",
                      "queries go both ways round the ring, half the ranks each way; partials straight home",
                      build_queries))
    register(Schedule("ring-2way", "keys/values go both ways round the ring, half the ranks each way", build_keys))
