"""What each rank did, step by step: posts, block computes, waits, merges.

The executor records a `Timeline` per pass (forward or backward) of each call
only when someone listens: a plugin implementing the
``tokenring_timeline`` hook (see `tokenring.hookspecs`), or code inside a
`collect` block. Whether anyone listens is checked once per pass; with no
listener the executor records nothing and does no per-event work.

Times are seconds on the host's monotonic clock (``time.monotonic``), which
on Linux is one clock for every process of the machine, so the timelines of
all ranks of a local run line up.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

# Event kinds.
POST = "post"        # the step's sends and receives handed to the Comm (they run from here on)
COMPUTE = "compute"  # one block kernel call
WAIT = "wait"        # blocked until the step's messages completed
MERGE = "merge"      # folding results into accumulators (partials that arrived, or local blocks)

clock = time.monotonic


@dataclass(frozen=True)
class Event:
    kind: str
    step: int
    start_s: float
    end_s: float
    detail: dict[str, Any] = field(default_factory=dict)  # e.g. {"bytes_out": 4096, "peers": [1, 3]}

    @property
    def seconds(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class Timeline:
    """One rank's events for one pass of one call."""

    rank: int
    world_size: int
    algorithm: str
    backward: bool
    events: tuple[Event, ...]

    @property
    def start_s(self) -> float:
        return min((e.start_s for e in self.events), default=0.0)

    @property
    def end_s(self) -> float:
        return max((e.end_s for e in self.events), default=0.0)

    def total(self, kind: str) -> float:
        return sum(e.seconds for e in self.events if e.kind == kind)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Timeline":
        events = tuple(Event(**e) for e in data["events"])
        return cls(data["rank"], data["world_size"], data["algorithm"], data["backward"], events)


class Recorder:
    """Collects one pass's events; `finish` hands the timeline to every listener."""

    def __init__(self, rank: int, world_size: int, algorithm: str, backward: bool, listeners) -> None:
        self.rank, self.world_size, self.algorithm, self.backward = rank, world_size, algorithm, backward
        self.events: list[Event] = []
        self._listeners = listeners

    @staticmethod
    def clock() -> float:
        return clock()

    def add(self, kind: str, step: int, start_s: float, **detail: Any) -> None:
        self.events.append(Event(kind, step, start_s, clock(), detail))

    def posted(self, step, rank: int, start_s: float, sent, received) -> None:
        """The step's messages were handed to the Comm (``step`` a `tokenring.plan.model.Step`)."""
        self.add(
            POST, step.index, start_s,
            sends=[[t.dst, t.payload.value] for t in step.transfers if t.src == rank],
            recvs=[[t.src, t.payload.value] for t in step.transfers if t.dst == rank],
            bytes_out=sum(x.numel() * x.element_size() for x in sent),
            bytes_in=sum(x.numel() * x.element_size() for x in received),
        )

    def computed(self, step: int, start_s: float, block) -> float:
        """One block kernel ran from ``start_s`` until now; returns now."""
        self.add(COMPUTE, step, start_s, q_owner=block.q_owner, kv_owner=block.kv_owner)
        return clock()

    def merged(self, step: int, start_s: float, received) -> None:
        if received:
            self.add(MERGE, step, start_s, arrived=[t.payload.value for t, _ in received])

    def finish(self) -> Timeline:
        timeline = Timeline(self.rank, self.world_size, self.algorithm, self.backward, tuple(self.events))
        for listener in self._listeners:
            listener(timeline)
        return timeline


class _NoRecorder:
    """What the executor records into when nobody listens: every call does nothing."""

    @staticmethod
    def clock() -> float:
        return 0.0

    def add(self, kind: str, step: int, start_s: float, **detail: Any) -> None:
        pass

    def posted(self, step, rank: int, start_s: float, sent, received) -> None:
        pass

    def computed(self, step: int, start_s: float, block) -> float:
        return 0.0

    def merged(self, step: int, start_s: float, received) -> None:
        pass

    def finish(self) -> None:
        return None


NO_RECORDER = _NoRecorder()


_collectors: list[list[Timeline]] = []


@contextlib.contextmanager
def collect() -> Iterator[list[Timeline]]:
    """Gather, into the yielded list, the timelines of this process's passes during the block."""
    gathered: list[Timeline] = []
    _collectors.append(gathered)
    try:
        yield gathered
    finally:
        _collectors.remove(gathered)


_quiet = 0


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Record nothing during the block, even with listeners (e.g. calibration runs that are not the user's calls)."""
    global _quiet
    _quiet += 1
    try:
        yield
    finally:
        _quiet -= 1


def _plugin_hook():
    from tokenring.registry import registry

    hook = registry.hook.tokenring_timeline
    return hook if hook.get_hookimpls() else None


def recorder(rank: int, world_size: int, algorithm: str, backward: bool) -> "Recorder | _NoRecorder":
    """A recorder for one pass, or `NO_RECORDER` when nobody listens (then nothing is recorded)."""
    if _quiet:
        return NO_RECORDER
    listeners: list[Callable[[Timeline], None]] = [c.append for c in _collectors]
    hook = _plugin_hook()
    if hook is not None:
        listeners.append(lambda timeline: hook(timeline=timeline))
    if not listeners:
        return NO_RECORDER
    return Recorder(rank, world_size, algorithm, backward, listeners)


# -- reading timelines -------------------------------------------------------------


def step_summary(timeline: Timeline) -> list[dict[str, float]]:
    """Per step: seconds computing, waiting and merging, and the step's wall time."""
    steps: dict[int, dict[str, float]] = {}
    for e in timeline.events:
        row = steps.setdefault(e.step, {"step": e.step, "start_s": e.start_s, "end_s": e.end_s})
        row[e.kind] = row.get(e.kind, 0.0) + e.seconds
        row["start_s"] = min(row["start_s"], e.start_s)
        row["end_s"] = max(row["end_s"], e.end_s)
    return [steps[k] for k in sorted(steps)]
