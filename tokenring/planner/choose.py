"""``algorithm="auto"``: the schedule the simulator predicts fastest for this call on this group's profile.

No schedule wins everywhere (docs/design.md, "Where each schedule wins and
why"), and every plan's traffic per link and step is known before it runs, so
the choice is a replay: `tokenring.planner.simulate.predict` runs a schedule's
forward plan (and its backward plan, when the call needs gradients) on the
profile and the fastest wins. Schedules predicted within `TIE` of the
fastest count as tied, and ties go to the simpler schedule (`PREFERENCE`), so
that noise in a profile does not flip the choice. Only the schedules that
could change the choice are built and replayed: the others are ruled out by
a closed-form lower bound on their time (`lower_bound`, `skippable`), so the
choice is the one replaying every schedule would make, at the cost of the
few plans that matter.

The profile is the file `tokenring calibrate` writes (`tokenring.planner.topology`,
default location there); without one, or with one for another number of
ranks, the planner assumes `ASSUMED` — one switch port per device, the case
in which moving the fewest bytes (the ring, for GQA) is never wrong by much.
The choice is a pure function of the call's shape and the profile, cached per
shape, and is part of the call's agreed signature: ranks whose profiles
choose differently get an `InputError` naming both choices, never a hang.
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass

from tokenring.plan.model import ProblemShape
from tokenring.planner.topology import Topology, default_profile_path, load_profile, switch

AUTO = "auto"
TIE = 0.03  # relative: predictions closer than this are a tie (the model is not that exact)
PREFERENCE = ("ring", "tokenring", "ring-2way", "tokenring-2way", "ring-multi", "tokenring-multi")
ASSUMED_GBPS, ASSUMED_LATENCY_US = 100.0, 5.0


@dataclass(frozen=True)
class Choice:
    algorithm: str
    predicted_s: float           # the chosen schedule's predicted time for the call (forward, or fwd + bwd)
    profile: str                 # where the profile came from
    runner_up: str | None = None
    runner_up_s: float | None = None

    def describe(self) -> str:
        more = (f"; next {self.runner_up} at {self.runner_up_s * 1e3:.3g} ms"
                if self.runner_up is not None and self.runner_up_s is not None else "")
        return f"auto chose {self.algorithm} ({self.predicted_s * 1e3:.3g} ms predicted on {self.profile}{more})"


_profile_lock = threading.Lock()
_profile_cache: dict[tuple, Topology | None] = {}


def group_profile(world_size: int) -> tuple[Topology, str]:
    """The profile the planner uses for a group of ``world_size`` ranks, and where it came from."""
    path = default_profile_path()
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError:
        stamp = None
    key = (str(path), stamp)
    with _profile_lock:
        if key not in _profile_cache:
            _profile_cache.clear()
            _profile_cache[key] = load_profile(path) if stamp is not None else None
        profile = _profile_cache[key]
    if profile is not None and profile.world_size == world_size:
        return profile, f"profile {path}"
    return (switch(world_size, ASSUMED_GBPS, ASSUMED_LATENCY_US, name="assumed"),
            f"an assumed switch ({ASSUMED_GBPS:g} Gbit/s per port; no profile for {world_size} ranks at {path})")


def choose(shape: ProblemShape, causal: bool, layout: str, world_size: int, needs_grad: bool,
           profile: Topology | None = None) -> Choice:
    """The fastest exact schedule for this call; ``profile`` defaults to `group_profile`."""
    if profile is None:
        profile, source = group_profile(world_size)
    else:
        source = profile.name or profile.describe()
    return _choose(shape, bool(causal), str(layout), world_size, bool(needs_grad), profile, source)


@functools.lru_cache(maxsize=256)
def _choose(shape: ProblemShape, causal: bool, layout: str, world_size: int, needs_grad: bool,
            profile: Topology, source: str) -> Choice:
    from tokenring.schedules.build import schedule_names  # the registry loads plugins: only when asked
    from tokenring.planner.simulate import predict

    if profile.world_size != world_size:
        raise ValueError(f"the profile describes {profile.world_size} ranks, the group has {world_size}")
    rank = {name: i for i, name in enumerate(PREFERENCE)}

    def preference(name: str) -> tuple[int, str]:
        return rank.get(name, len(PREFERENCE)), name

    # Simplest first: the cheap plans are built first and the costly ones (multi-ring) only when their
    # lower bound says they could win or tie (`skippable`); the choice is the one replaying all would make.
    timed: dict[str, float] = {}
    errors: list[str] = []
    for name in sorted(schedule_names(), key=preference):
        if timed and skippable(name, timed, preference,
                               lambda: lower_bound(name, shape, profile, causal, layout, needs_grad)):
            continue
        estimate = predict(name, shape, profile, causal, layout, backward=needs_grad)
        if estimate.error is not None:
            errors.append(f"{name}: {estimate.error}")
            continue
        timed[name] = estimate.training if needs_grad else estimate.forward.total
    if not timed:
        raise ValueError(f"no registered schedule can run this call ({'; '.join(errors)})")
    chosen = _pick(timed, preference)
    others = sorted((seconds, name) for name, seconds in timed.items() if name != chosen)
    runner_up = others[0] if others else (None, None)
    return Choice(chosen, timed[chosen], source, runner_up[1], runner_up[0])


def _pick(timed: dict[str, float], preference) -> str:
    """The simplest schedule predicted within `TIE` of the fastest."""
    best = min(timed.values())
    return min((name for name, seconds in timed.items() if seconds <= best * (1 + TIE)), key=preference)


def skippable(name: str, timed: dict[str, float], preference, bound) -> bool:
    """Whether schedule ``name``, whose time is at least ``bound()``, cannot change the choice among ``timed``.

    It cannot when it is slower than the fastest so far by more than the tie
    (then it is neither the fastest nor tied with it), or when it is less
    simple than the current choice and could at best tie with it (the choice
    stays tied with the fastest, and wins the tie).
    """
    best = min(timed.values())
    chosen = _pick(timed, preference)
    at_least = bound()
    if at_least <= 0:
        return False
    return at_least > best * (1 + TIE) or (
        preference(name) > preference(chosen) and timed[chosen] <= at_least * (1 + TIE))


# -- lower bounds without a plan --------------------------------------------------------------------

# What the first-party schedules move and where they compute, which is all `lower_bound` needs of them:
# "kv": keys/values travel and every block runs on its query owner's rank (its dK/dV go home summed);
# "q": queries travel, every block runs on its key owner's rank and sends its partial (dq) straight home.
# A schedule not named here (a plugin's) gets the bound that holds for any exact plan: its compute.
FAMILY = {"ring": "kv", "ring-reverse": "kv", "ring-2way": "kv", "ring-multi": "kv",
          "tokenring": "q", "tokenring-2way": "q", "tokenring-multi": "q"}
# A bound is computed in another order of float operations than the simulation: keep it safely below.
_BOUND_MARGIN = 1 - 1e-9


def lower_bound(name: str, shape: ProblemShape, profile: Topology, causal: bool, layout: str,
                needs_grad: bool) -> float:
    """Seconds the schedule's forward (+ backward) takes at least on ``profile``, in closed form: no plan is built.

    Per rank and pass, the larger of its compute (every visible block at the
    fastest kernel rate the profile knows, plus the call overhead per block)
    and the bytes it must receive and send over what it can receive and send
    at once (`Topology.receive_capacity`); 0 when nothing is known.
    """
    from tokenring.placement.layout import parse_layout

    try:
        parsed = parse_layout(layout)
        return sum(_pass_bound(FAMILY.get(name), shape, profile, bool(causal), parsed, backward)
                   for backward in ((False, True) if needs_grad else (False,))) * _BOUND_MARGIN
    except ValueError:  # a shard that does not fall on whole rows: the schedule's own prediction says why
        return 0.0


def _pass_bound(family: str | None, shape: ProblemShape, profile: Topology, causal: bool, layout,
                backward: bool) -> float:
    import math

    from tokenring.plan.model import Block, Payload, visible_block
    from tokenring.planner.simulate import block_flops

    n = profile.world_size
    if n < 2:
        return 0.0
    compute = profile.compute
    rates = [k.flop_per_s for k in compute.kernels if k.backward == backward] or [compute.flop_per_s]
    fastest = max(rates)
    factor = compute.backward_ratio if backward else 1.0

    # Which rows see which depends only on whether the query owner is after, before or the key owner.
    def seen(q_owner: int, kv_owner: int):
        visible = visible_block(layout, causal, q_owner, kv_owner)
        if visible is None:
            return None
        q_span, kv_span, mask = visible
        work = float(Block(0, q_owner, q_span, kv_owner, kv_span, mask).work)
        seconds = (0.0 if math.isinf(fastest) else block_flops(shape, work) * factor / fastest)
        return q_span, kv_span, seconds + compute.call_overhead_s

    diagonal, after, before = seen(0, 0), seen(1, 0), seen(0, 1)  # after: the query owner is the later rank

    def seconds(block) -> float:
        return 0.0 if block is None else block[2]

    def payload(kind: Payload, block, which: int) -> float:
        return 0.0 if block is None else float(shape.payload_bytes(kind, block[which]))

    if family is None:  # any exact plan computes every visible block somewhere: the average rank's share
        total = n * seconds(diagonal) + n * (n - 1) / 2 * (seconds(after) + seconds(before))
        return total / n
    cap_in, cap_out = profile.receive_capacity, profile.send_capacity
    bound = 0.0
    for r in range(n):
        later, earlier = n - 1 - r, r  # ranks after r, ranks before r
        if family == "kv":
            # r computes its queries against every key it sees; the keys it sees must arrive.
            work = seconds(diagonal) + earlier * seconds(after) + later * seconds(before)
            received = earlier * payload(Payload.KEY_VALUE, after, 1) + later * payload(Payload.KEY_VALUE, before, 1)
            sent = 0.0
            if backward:
                # The dK/dV of r's rows that others used come home (at least the larger of the two uses), and
                # r sends its own share of every other owner's dK/dV on (down the chain, or straight home).
                if later and after is not None or earlier and before is not None:
                    received += max(payload(Payload.GRAD_KEY_VALUE, after, 1) if later else 0.0,
                                    payload(Payload.GRAD_KEY_VALUE, before, 1) if earlier else 0.0)
                sent = (earlier * payload(Payload.GRAD_KEY_VALUE, after, 1)
                        + later * payload(Payload.GRAD_KEY_VALUE, before, 1))
        else:
            query, result = (Payload.GRAD_QUERY, Payload.GRAD_PARTIAL) if backward else (
                Payload.QUERY, Payload.PARTIAL)
            # r computes every query that sees its keys; those queries arrive and their results leave, straight
            # home; r's own queries' results come back from everyone that saw them.
            work = seconds(diagonal) + later * seconds(after) + earlier * seconds(before)
            received = (later * payload(query, after, 0) + earlier * payload(query, before, 0)
                        + earlier * payload(result, after, 0) + later * payload(result, before, 0))
            sent = later * payload(result, after, 0) + earlier * payload(result, before, 0)
        comm = max(received / cap_in(r) if received else 0.0, sent / cap_out(r) if sent else 0.0)
        bound = max(bound, work, comm)
    return bound
