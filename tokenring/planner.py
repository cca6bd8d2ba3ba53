"""``algorithm="auto"``: the schedule the simulator predicts fastest for this call on this group's profile.

No schedule wins everywhere (docs/design.md, "Where each schedule wins and
why"), and every plan's traffic per link and step is known before it runs, so
the choice is a replay: `tokenring.simulate.predict_all` runs each registered
schedule's forward plan (and its backward plan, when the call needs
gradients) on the profile and the fastest wins. Schedules predicted within
`TIE` of the fastest count as tied, and ties go to the simpler schedule
(`PREFERENCE`), so that noise in a profile does not flip the choice.

The profile is the file `tokenring calibrate` writes (`tokenring.topology`,
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

from .plan import ProblemShape
from .topology import Topology, default_profile_path, load_profile, switch

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
    from .simulate import predict_all

    if profile.world_size != world_size:
        raise ValueError(f"the profile describes {profile.world_size} ranks, the group has {world_size}")
    comparison = predict_all(shape, profile, causal, layout)
    timed = []
    for estimate in comparison.estimates:
        if estimate.error is not None:
            continue
        seconds = estimate.training if needs_grad else estimate.forward.total
        timed.append((seconds, estimate.name))
    if not timed:
        reasons = "; ".join(f"{e.name}: {e.error}" for e in comparison.estimates)
        raise ValueError(f"no registered schedule can run this call ({reasons})")
    best = min(seconds for seconds, _ in timed)
    tied = [name for seconds, name in timed if seconds <= best * (1 + TIE)]
    rank = {name: i for i, name in enumerate(PREFERENCE)}
    chosen = min(tied, key=lambda name: (rank.get(name, len(PREFERENCE)), name))
    chosen_s = next(seconds for seconds, name in timed if name == chosen)
    others = sorted((seconds, name) for seconds, name in timed if name != chosen)
    runner_up = others[0] if others else (None, None)
    return Choice(chosen, chosen_s, source, runner_up[1], runner_up[0])
