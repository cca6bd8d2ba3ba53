"""The plan of a call: the registered schedules, each plan built once and proven.

`schedule_names` is the one list of schedules every tool, test and plugin
reads; `build_plan` gives the plan of a call, forward or backward, proven by
`tokenring.proofs.plancheck` the first time it is built. The builders themselves
live in `tokenring.schedules`, one module each, and register through the
same pluggy hook a third-party plugin uses (see `tokenring.hookspecs`).
"""

from __future__ import annotations

import contextlib
import gc
import threading

from tokenring.plan.backward import derive_backward
from tokenring.placement.layout import Layout, parse_layout
from tokenring.proofs.masked import check_masked_plan
from tokenring.schedules.masked import mask_plan
from tokenring.placement.masks import TokenMask
from tokenring.plan.model import Plan, Schedule
from tokenring.proofs.plancheck import PlanError, check_plan
from tokenring.registry import registry


def schedule_names() -> tuple[str, ...]:
    """Names of every registered schedule, first-party ones first."""
    return registry.schedule_names()


def get_schedule(name: str) -> Schedule:
    """The named schedule; ValueError listing the registered names otherwise."""
    return registry.schedule(name)


def parse_algorithm(algorithm: str) -> str:
    """The name of a registered schedule, or ValueError naming the registered ones."""
    return get_schedule(algorithm).name


_plans: dict[tuple, Plan] = {}
_plans_lock = threading.Lock()
_paused = 0  # how many threads are building with the cyclic garbage collector paused
_paused_lock = threading.Lock()


@contextlib.contextmanager
def _collector_paused():
    """Building and proving a plan allocates millions of acyclic objects at large N (a ring plan at N = 1024
    holds two million blocks and messages); the cyclic collector would scan them again and again, for nothing
    it could free. Paused while any thread builds, restored after the last."""
    global _paused
    with _paused_lock:
        if _paused == 0:
            _paused_was_enabled[0] = gc.isenabled()
            gc.disable()
        _paused += 1
    try:
        yield
    finally:
        with _paused_lock:
            _paused -= 1
            if _paused == 0 and _paused_was_enabled[0]:
                gc.enable()


_paused_was_enabled = [True]


def build_plan(algorithm: str, layout: "Layout | str", causal: bool, world_size: int, backward: bool = False) -> Plan:
    """The schedule of one attention call (or of its gradient, with ``backward``). Pure; cached; proven."""
    generation = registry.generation  # read first: a plan is never cached under a newer registry
    schedule = get_schedule(algorithm)
    layout = parse_layout(layout)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if layout not in schedule.layouts:
        supported = ", ".join(repr(x.value) for x in schedule.layouts)
        raise ValueError(f"schedule {schedule.name!r} supports layouts {supported}, got {layout.value!r}")
    key = (generation, schedule.name, layout, bool(causal), world_size, backward)
    with _plans_lock:
        plan = _plans.get(key)
    if plan is not None:
        return plan
    with _collector_paused():
        if backward:
            plan = derive_backward(build_plan(schedule.name, layout, causal, world_size))
        else:
            plan = schedule.build(layout, bool(causal), world_size)
            if not isinstance(plan, Plan) or (plan.algorithm, plan.layout, plan.causal, plan.world_size,
                                              plan.backward) != (schedule.name, layout, bool(causal), world_size, False):
                raise PlanError(
                    f"schedule {schedule.name!r} built a plan for something else than "
                    f"({schedule.name!r}, {layout.value!r}, causal={bool(causal)}, N={world_size}, forward)"
                )
        try:
            check_plan(plan)
        except PlanError as error:
            raise PlanError(f"schedule {schedule.name!r} ({layout.value}, causal={bool(causal)}, N={world_size}"
                            f"{', backward' if backward else ''}) is not exact: {error}") from None
    return _remember(key, plan)


def build_masked_plan(algorithm: str, tokens: "TokenMask", backward: bool = False) -> Plan:
    """The schedule's plan cut down to ``tokens``' mask (tokenring.schedules.masked). Cached by mask; proven by counting."""
    generation = registry.generation
    key = (generation, "masked", get_schedule(algorithm).name, tokens, backward)
    with _plans_lock:
        plan = _plans.get(key)
    if plan is not None:
        return plan
    if backward:
        with _collector_paused():
            plan = derive_backward(build_masked_plan(algorithm, tokens))
    else:
        full = build_plan(algorithm, Layout.CONTIGUOUS, False, tokens.world_size)
        with _collector_paused():
            plan = mask_plan(full, tokens)
            try:
                check_masked_plan(plan)
            except PlanError as error:
                raise PlanError(f"schedule {algorithm!r} under the mask ({tokens.describe()}) is not exact: "
                                f"{error}") from None
    return _remember(key, plan)


def _remember(key: tuple, plan: Plan) -> Plan:
    with _plans_lock:
        if len(_plans) > 512:
            _plans.clear()
        _plans[key] = plan
    return plan
