"""Replays a plan on an interconnect profile and predicts its time, without any process or tensor.

`simulate(plan, shape, topology)` walks the plan's steps as the executor
(`tokenring.executor`) runs them on every rank at once:

* a rank posts step s's messages the moment it finished step s-1, then
  computes the step's blocks, then waits for all its messages of the step
  (sent and received); only then does it post step s+1. Its step s ends at
  max(post + compute, its last message done);
* a message starts when both its sender and its receiver have posted the
  step (a point-to-point transfer needs the receive posted: rendezvous);
* it crosses the resources `Topology.route` names (links, switch ports,
  NICs, a device's injection limit). Messages on one resource at once share
  its bandwidth equally (processor sharing, each resource on its own); a
  message is done when its last resource has carried it, plus the latency of
  its path.

Compute per block is its attention FLOPs (4·B·Hq·D per score entry, half of
a causal block; the backward ``Compute.backward_ratio`` times that) over the
profile's rate for a block of that size, plus a per-call overhead; each
message adds ``Compute.message_overhead_s`` of host time to the compute of
its sender and of its receiver in its step.

What is not modelled: the merge of arriving partials and other host work,
the kernel slowing down while messages use the same memory, a transport
that runs both directions of a pair at less than full rate, congestion
inside a switch or between NICs, and bandwidth a message leaves unused on
one resource because another resource limits it (each resource shares
equally among all its messages, so a prediction errs slow, never fast, for
that reason). docs/planner.md has the whole model and its limits.

`predict_all` runs every registered schedule, forward and backward, for one
problem on one profile and names the fastest: the planner's input.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

from .layout import Layout, default_layout, parse_layout
from .plan import Payload, Plan, ProblemShape
from .topology import Topology, resource_name

# Score-matrix FLOPs of the forward kernel per entry, per head and head-dim element: QK^T and PV, 2 each.
FORWARD_FLOPS_PER_ENTRY = 4


@dataclass(frozen=True)
class StepPrediction:
    index: int
    time: float      # what the step adds to the pass: the last rank's end of it minus the last rank's end before it
    compute: float   # the busiest rank's compute in the step
    comm: float      # the longest a rank's messages of the step took, from its post to its last one done
    exposed: float   # the longest a rank waited for messages after its compute
    bytes: int       # all messages of the step


@dataclass(frozen=True)
class Prediction:
    """What `simulate` predicts for one plan on one profile (seconds and bytes)."""

    algorithm: str
    backward: bool
    world_size: int
    total: float                 # from the first post to the last rank done
    steps: tuple[StepPrediction, ...]
    compute: float               # the busiest rank's compute over the pass
    comm: float                  # summed over ranks and steps: time from post to the rank's last message done
    exposed: float               # summed over ranks and steps: time waiting for messages past compute
    resource_bytes: dict[str, int] = field(compare=False)  # bytes over each link, port, NIC

    @property
    def hidden_share(self) -> float:
        """The share of communication time hidden behind compute (1.0 when nothing moves)."""
        return 1.0 if self.comm <= 0 else max(0.0, 1.0 - self.exposed / self.comm)

    @property
    def busiest_resource(self) -> tuple[str, int] | None:
        """The resource that carried the most bytes, and how many."""
        if not self.resource_bytes:
            return None
        return max(self.resource_bytes.items(), key=lambda item: (item[1], item[0]))

    def to_json(self) -> dict:
        return {
            "algorithm": self.algorithm, "backward": self.backward, "world_size": self.world_size,
            "total_s": self.total, "compute_s": self.compute, "comm_s": self.comm, "exposed_s": self.exposed,
            "hidden_share": self.hidden_share,
            "steps": [{"step": s.index, "time_s": s.time, "compute_s": s.compute, "comm_s": s.comm,
                       "exposed_s": s.exposed, "bytes": s.bytes} for s in self.steps],
            "resource_bytes": dict(sorted(self.resource_bytes.items())),
        }


def block_flops(shape: ProblemShape, work: float) -> float:
    """Forward FLOPs of a block that computes ``work`` of one shard-by-shard score matrix (`Block.work`)."""
    return FORWARD_FLOPS_PER_ENTRY * shape.batch * shape.q_heads * shape.head_dim * (
        shape.seq_local * shape.kv_seq * work)


class _Routes:
    """Resource numbers and path latency per directed pair, resolved once per pair."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.index: dict[tuple, int] = {}
        self.keys: list[tuple] = []
        self.bandwidth: list[float] = []

    def path(self, src: int, dst: int) -> tuple[tuple[int, ...], float]:
        ids = []
        latency = 0.0
        index = self.index
        for key, bytes_per_s, resource_latency in self.topology.route_keys(src, dst):
            i = index.get(key)
            if i is None:
                i = index[key] = len(self.keys)
                self.keys.append(key)
                self.bandwidth.append(bytes_per_s)
            ids.append(i)
            latency += resource_latency
        return tuple(ids), latency


def _shared_finish(starts: list[float], sizes: list[float], bandwidth: float) -> list[float]:
    """When each message is carried by one resource that shares its bandwidth equally among those present.

    Exact processor sharing with arrivals: a virtual clock counts the bytes
    each present message has received; it advances at bandwidth / (messages
    present), and a message leaves when the clock passes its arrival reading
    plus its size.
    """
    first = starts[0]
    if all(start == first for start in starts):
        # All present from the start: the k-th smallest leaves once every message has had its size.
        finish = [0.0] * len(starts)
        served = 0.0  # bytes each message still present has received
        elapsed = first
        left = len(starts)
        for i in sorted(range(len(sizes)), key=sizes.__getitem__):
            elapsed += (sizes[i] - served) * left / bandwidth
            served = sizes[i]
            finish[i] = elapsed
            left -= 1
        return finish
    order = sorted(range(len(starts)), key=starts.__getitem__)
    finish = [0.0] * len(starts)
    present: list[tuple[float, int]] = []  # (virtual reading at which it is done, message)
    now = virtual = 0.0

    def serve_until(limit: float) -> None:
        nonlocal now, virtual
        while present:
            done_at = now + (present[0][0] - virtual) * len(present) / bandwidth
            if done_at > limit:
                virtual += (limit - now) * bandwidth / len(present)
                now = limit
                return
            now, virtual = done_at, present[0][0]
            finish[heapq.heappop(present)[1]] = now
        now = max(now, limit)

    for i in order:
        serve_until(starts[i])
        heapq.heappush(present, (virtual + sizes[i], i))
    serve_until(math.inf)
    return finish


def simulate(plan: Plan, shape: ProblemShape, topology: Topology) -> Prediction:
    """Predict the time of ``plan`` for problem ``shape`` on ``topology``: per step, in total, bytes per resource."""
    n = plan.world_size
    if topology.world_size != n:
        raise ValueError(f"the plan is for {n} ranks, the topology has {topology.world_size} devices")
    routes = _Routes(topology)
    compute_model = topology.compute
    backward = plan.backward
    flop_factor = compute_model.backward_ratio if backward else 1.0
    overhead = compute_model.call_overhead_s
    per_message = compute_model.message_overhead_s
    seq_q, seq_kv = shape.seq_local, shape.kv_seq

    # Spans repeat over a plan (ALL, FIRST, SECOND, a few chunks): price each kind of block and message once.
    # Keyed on identity, which the plan keeps alive, because hashing Fractions on every block is slow.
    block_seconds: dict[tuple[int, int, object], float] = {}
    message_bytes: dict[object, dict[int, int]] = {payload: {} for payload in Payload}
    paths: dict[int, tuple[tuple[int, ...], float]] = {}  # keyed src * n + dst
    bandwidth = routes.bandwidth

    def price_block(block) -> float:
        q_rows = block.q_span.fraction * seq_q
        kv_rows = block.kv_span.fraction * seq_kv
        flops = block_flops(shape, float(block.work)) * flop_factor
        rate = compute_model.rate(backward, int(q_rows), int(kv_rows))
        return (0.0 if math.isinf(rate) else flops / rate) + overhead

    post = [0.0] * n  # when each rank posts the current step: when it finished the previous one
    last_end = 0.0
    pair_bytes: defaultdict[int, int] = defaultdict(int)  # keyed src * n + dst; spread over resources at the end
    steps: list[StepPrediction] = []
    comm_total = exposed_total = 0.0
    busiest_compute = [0.0] * n
    for step in plan.steps:
        compute = [0.0] * n
        for b in step.blocks:
            key = (id(b.q_span), id(b.kv_span), b.mask)
            seconds = block_seconds.get(key)
            if seconds is None:
                seconds = block_seconds[key] = price_block(b)
            compute[b.rank] += seconds
        if per_message:
            for t in step.transfers:  # host time on both ends of each message, while the rank cannot compute
                compute[t.src] += per_message
                compute[t.dst] += per_message

        # Gather each resource's messages of this step. Most resources carry one message a step: those
        # are settled at once; the others share (`_shared_finish`).
        count = len(step.transfers)
        msg_src = [0] * count
        msg_dst = [0] * count
        msg_start = [0.0] * count
        msg_size = [0] * count
        msg_latency = [0.0] * count
        first_user: dict[int, int] = {}   # resource -> its first message of the step
        second_user: dict[int, int] = {}  # resource -> its second one, if any
        crowded: dict[int, list[int]] = {}  # resource -> all its messages, when three or more
        for i, t in enumerate(step.transfers):
            sizes = message_bytes[t.payload]
            size = sizes.get(id(t.span))
            if size is None:
                size = sizes[id(t.span)] = shape.payload_bytes(t.payload, t.span)
            src, dst = t.src, t.dst
            pair = src * n + dst
            path = paths.get(pair)
            if path is None:
                path = paths[pair] = routes.path(src, dst)
            pair_bytes[pair] += size
            msg_src[i], msg_dst[i], msg_size[i], msg_latency[i] = src, dst, size, path[1]
            msg_start[i] = post[src] if post[src] >= post[dst] else post[dst]
            for r in path[0]:
                other = first_user.setdefault(r, i)
                if other != i:
                    second = second_user.setdefault(r, i)
                    if second != i:
                        users = crowded.get(r)
                        if users is None:
                            crowded[r] = [other, second, i]
                        else:
                            users.append(i)

        carried = [0.0] * count  # when the slowest resource on its path has carried each message
        for r, i in first_user.items():
            if r in second_user:
                continue
            done = msg_start[i] + msg_size[i] / bandwidth[r]
            if done > carried[i]:
                carried[i] = done
        for r, j in second_user.items():
            if r in crowded:
                continue
            i = first_user[r]
            bw = bandwidth[r]
            if msg_start[i] == msg_start[j]:
                # Both from the same moment, the usual pair (a query and a partial on one port): both at half
                # rate until the smaller is done, then the larger alone.
                if msg_size[i] > msg_size[j]:
                    i, j = j, i
                done_i = msg_start[i] + 2 * msg_size[i] / bw
                done_j = msg_start[i] + (msg_size[i] + msg_size[j]) / bw
            else:
                done_i, done_j = _shared_finish([msg_start[i], msg_start[j]], [msg_size[i], msg_size[j]], bw)
            if done_i > carried[i]:
                carried[i] = done_i
            if done_j > carried[j]:
                carried[j] = done_j
        for r, members in crowded.items():
            finish = _shared_finish([msg_start[i] for i in members], [msg_size[i] for i in members], bandwidth[r])
            for i, done in zip(members, finish):
                if done > carried[i]:
                    carried[i] = done

        messages_done = [-1.0] * n  # per rank: when its last message of the step is done (-1: it has none)
        for i in range(count):
            done = carried[i] + msg_latency[i]
            for rank in (msg_src[i], msg_dst[i]):
                if done > messages_done[rank]:
                    messages_done[rank] = done

        step_comm = step_exposed = 0.0
        for r in range(n):
            computed = post[r] + compute[r]
            busiest_compute[r] += compute[r]
            end = computed
            if messages_done[r] >= 0:
                comm = messages_done[r] - post[r]
                waited = messages_done[r] - computed if messages_done[r] > computed else 0.0
                end = computed + waited
                comm_total += comm
                exposed_total += waited
                if comm > step_comm:
                    step_comm = comm
                if waited > step_exposed:
                    step_exposed = waited
            post[r] = end
        end_of_step = max(post) if n else 0.0
        steps.append(StepPrediction(step.index, end_of_step - last_end, max(compute, default=0.0), step_comm,
                                    step_exposed, sum(msg_size)))
        last_end = end_of_step

    by_resource = [0] * len(routes.keys)
    for pair, size in pair_bytes.items():
        for r in paths[pair][0]:
            by_resource[r] += size
    resource_bytes = {resource_name(key): size for key, size in zip(routes.keys, by_resource)}
    return Prediction(
        algorithm=plan.algorithm, backward=backward, world_size=n, total=last_end, steps=tuple(steps),
        compute=max(busiest_compute, default=0.0), comm=comm_total, exposed=exposed_total,
        resource_bytes=resource_bytes,
    )


# -- every schedule at once ------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleEstimate:
    """One schedule's predictions for one problem, or why it has none."""

    name: str
    forward: Prediction | None
    backward: Prediction | None
    error: str | None = None

    @property
    def training(self) -> float | None:
        """Forward + backward seconds."""
        if self.forward is None or self.backward is None:
            return None
        return self.forward.total + self.backward.total

    @property
    def training_hidden_share(self) -> float | None:
        if self.forward is None or self.backward is None:
            return None
        comm = self.forward.comm + self.backward.comm
        exposed = self.forward.exposed + self.backward.exposed
        return 1.0 if comm <= 0 else max(0.0, 1.0 - exposed / comm)

    def to_json(self) -> dict:
        return {
            "name": self.name, "error": self.error, "training_s": self.training,
            "training_hidden_share": self.training_hidden_share,
            "forward": None if self.forward is None else self.forward.to_json(),
            "backward": None if self.backward is None else self.backward.to_json(),
        }


@dataclass(frozen=True)
class Comparison:
    """Every schedule's estimate, and which is fastest forward and forward + backward (None: none ran)."""

    estimates: tuple[ScheduleEstimate, ...]
    fastest: str | None          # by forward + backward time
    fastest_forward: str | None  # by forward time alone (inference)

    def estimate(self, name: str) -> ScheduleEstimate:
        for e in self.estimates:
            if e.name == name:
                return e
        raise KeyError(name)

    def to_json(self) -> dict:
        return {"fastest": self.fastest, "fastest_forward": self.fastest_forward,
                "schedules": [e.to_json() for e in self.estimates]}


def predict_all(shape: ProblemShape, topology: Topology, causal: bool, layout: "Layout | str | None" = None,
                schedules: Iterable[str] | None = None) -> Comparison:
    """Each schedule's forward and backward prediction for ``shape`` on ``topology``, and the fastest.

    ``schedules`` defaults to every registered one; ``layout`` to the
    default for ``causal``. A schedule that cannot run this problem (a layout
    it does not support, a shard that does not split into its pieces, a plan
    that does not build) gets an estimate with the reason and no times; ties
    go to the schedule listed first.
    """
    from .plans import schedule_names  # the registry loads plugins: only when asked

    layout = parse_layout(layout or default_layout(causal))
    names = tuple(schedule_names() if schedules is None else schedules)
    estimates = [predict(name, shape, topology, causal, layout) for name in names]
    ran = [e for e in estimates if e.error is None]
    fastest = min(ran, key=lambda e: e.training, default=None)
    fastest_forward = min(ran, key=lambda e: e.forward.total, default=None)
    return Comparison(tuple(estimates), fastest and fastest.name, fastest_forward and fastest_forward.name)


def predict(name: str, shape: ProblemShape, topology: Topology, causal: bool,
            layout: "Layout | str | None" = None, backward: bool = True) -> ScheduleEstimate:
    """One schedule's forward and backward prediction (`predict_all` for one name); the reason when it cannot run.

    ``backward=False`` builds and simulates the forward plan alone (the estimate's ``backward`` is None).
    """
    from .plans import build_plan

    layout = parse_layout(layout or default_layout(causal))
    try:
        forward_plan = build_plan(name, layout, causal, topology.world_size)
        backward_plan = build_plan(name, layout, causal, topology.world_size, backward=True) if backward else None
        _check_divides(forward_plan, shape)
        forward = simulate(forward_plan, shape, topology)
        predicted = None if backward_plan is None else simulate(backward_plan, shape, topology)
    except (ValueError, AssertionError) as error:  # PlanError is an AssertionError
        return ScheduleEstimate(name, None, None, str(error))
    return ScheduleEstimate(name, forward, predicted)


def _check_divides(plan: Plan, shape: ProblemShape) -> None:
    pieces = plan.granularity
    for what, length in (("query", shape.seq_local), ("key/value", shape.kv_seq)):
        if length % pieces:
            raise ValueError(f"the {what} shard of {length} rows does not split into the plan's {pieces} pieces")
