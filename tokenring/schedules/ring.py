"""Ring-Attention (Liu et al., 2023), the baseline: keys/values travel, results stay where computed.

Each owner's keys/values move one hop per step; every holder computes its
own queries against them and merges the result locally. In the backward the
dK/dV sums follow the keys/values home (`tokenring.plan.backward`).
"""

from __future__ import annotations

from tokenring.hookspecs import hookimpl
from tokenring.placement.layout import Layout
from tokenring.plan.model import Plan, Schedule
from tokenring.schedules.hops import cheaper_direction, direction_note

NAME = "ring"


def build(layout: Layout, causal: bool, world_size: int) -> Plan:
    direction, steps = cheaper_direction(False, layout, causal, world_size)
    return Plan(NAME, layout, causal, world_size, steps, note=direction_note(direction, "keys/values"))


@hookimpl
def tokenring_register_schedules(register):
    register(Schedule(
        NAME,
        "keys/values travel one hop per step, results stay; wins with GQA and behind a switch",
        build,
    ))
