"""TokenRing (Wang et al., 2024): keys/values stay, queries travel, partial results go straight home.

Each owner's queries move one hop per step; every holder computes them
against its own keys/values and sends the partial (out, lse) straight back to
the owner one step later, over the link direction the queries leave idle.
On the causal zigzag layout the queries travel r -> r-1: they first visit the
ranks that need all of them, and only their second chunk continues past the
wrap. The last blocks' partials leave in halves as they finish, and half of
each owner's own block fills the final step (`hops.hide_tail`).
"""

from __future__ import annotations

from tokenring.hookspecs import hookimpl
from tokenring.placement.layout import Layout
from tokenring.plan.model import Plan, Schedule
from tokenring.schedules.hops import cheaper_direction, direction_note, hide_tail

NAME = "tokenring"


def build(layout: Layout, causal: bool, world_size: int) -> Plan:
    direction, steps = cheaper_direction(True, layout, causal, world_size)
    return Plan(NAME, layout, causal, world_size, hide_tail(steps), note=direction_note(direction, "queries"))


@hookimpl
def tokenring_register_schedules(register):
    register(Schedule(
        NAME,
        "queries travel one hop per step, K/V stay, partials go straight home; wins for MHA on a full mesh",
        build,
    ))
