"""Ring-Attention the other way round: keys/values always travel r -> r-1.

A demonstration that a schedule is one builder: this module and its tests
(tests/test_schedule_ring_reverse.py, tests/golden/plans/ring-reverse.txt)
are all it took. It moves the same bytes as ``ring`` except with a causal
contiguous layout, where ``ring`` picks r -> r+1 because there the keys stop
travelling once no later rank needs them; going this way round they must
pass every earlier rank first.
"""

from __future__ import annotations

from tokenring.hookspecs import hookimpl
from tokenring.placement.layout import Layout
from tokenring.plan.model import Plan, Schedule
from tokenring.schedules.hops import one_hop_steps

NAME = "ring-reverse"


def build(layout: Layout, causal: bool, world_size: int) -> Plan:
    steps = one_hop_steps(False, layout, causal, world_size, direction=-1)
    return Plan(NAME, layout, causal, world_size, steps, note="keys/values travel r -> r-1")


@hookimpl
def tokenring_register_schedules(register):
    register(Schedule(NAME, "the ring with keys/values travelling r -> r-1 (a demonstration schedule)", build))
