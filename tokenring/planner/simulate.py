"""Replays a plan on an interconnect profile and predicts its time, without any process or tensor.

`simulate(plan, shape, topology)` walks the plan's steps as the executor
(`tokenring.runtime.executor`) runs them on every rank at once:

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
import operator
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from tokenring.placement.layout import Layout, default_layout, parse_layout
from tokenring.plan.model import Plan, ProblemShape
from tokenring.planner.topology import Topology, resource_name

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


class _Router:
    """Every message's resources (numbered) and path latency, for whole steps at once.

    Full meshes, switches and two-level groups are numbered arithmetically
    (vectorized: a million pairs cost nothing); a physical ring's routes are
    resolved pair by pair (`_Routes`) and remembered. The numbers are the
    keys' order in `key`, the bandwidths in `bandwidth`.
    """

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        n = self.n = topology.world_size
        self.arithmetic = topology.kind != "ring"
        if not self.arithmetic:
            self.routes = _Routes(topology)
            self.pairs: dict[int, tuple[tuple[int, ...], float]] = {}
            return
        link, inter, injection = topology.link, topology.inter_node, topology.injection_bytes_per_s
        self.links = n * n if topology.kind == "fullmesh" else 0
        base = self.links
        # link a->b | port a out | port b in | nic out | nic in | injection a | ejection b
        self.port_out, self.port_in = base, base + n
        self.nic_out, self.nic_in = base + 2 * n, base + 3 * n
        self.injection, self.ejection = base + 4 * n, base + 5 * n
        bandwidth = np.empty(base + 6 * n)
        bandwidth[:base + 2 * n] = link.bytes_per_s
        bandwidth[base + 2 * n:base + 4 * n] = inter.bytes_per_s if inter is not None else math.nan
        bandwidth[base + 4 * n:] = injection if injection is not None else math.nan
        self.bandwidth = bandwidth

    def key(self, i: int) -> tuple:
        if not self.arithmetic:
            return self.routes.keys[i]
        n, nic = self.n, self.topology.nic
        if i < self.links:
            return ("link", i // n, i % n)
        i -= self.links
        what, index = divmod(i, n)
        return (("port out", index), ("port in", index), ("nic out", nic, index), ("nic in", nic, index),
                ("injection", index), ("ejection", index))[what]

    def names(self, ids: "np.ndarray") -> list[str]:
        """`resource_name` of each resource number (the links of a full mesh spelled in bulk)."""
        if not self.arithmetic:
            return [resource_name(self.key(i)) for i in ids.tolist()]
        links = ids[ids < self.links]
        named = [f"link {a}->{b}" for a, b in zip((links // self.n).tolist(), (links % self.n).tolist())]
        return named + [resource_name(self.key(i)) for i in ids[ids >= self.links].tolist()]

    def resolve(self, src: "np.ndarray", dst: "np.ndarray") -> "tuple[np.ndarray, np.ndarray]":
        """(resources, latency): a row of resource numbers per message (-1: none), and its path's latency."""
        if not self.arithmetic:
            return self._resolve_each(src, dst)
        topology = self.topology
        n, per_node = self.n, topology.devices_per_node
        columns = []
        if topology.injection_bytes_per_s is not None:
            columns.append(self.injection + src)
        same = (src // per_node) == (dst // per_node)
        if topology.nodes > 1:
            out, into = (src // per_node, dst // per_node) if topology.nic == "node" else (src, dst)
            first_between, second_between = self.nic_out + out, self.nic_in + into
        if topology.kind == "fullmesh":
            first, second = src * n + dst, np.full_like(src, -1)
        else:
            first, second = self.port_out + src, self.port_in + dst
        if topology.nodes > 1:
            first = np.where(same, first, first_between)
            second = np.where(same, second, second_between)
        columns += [first, second]
        if topology.injection_bytes_per_s is not None:
            columns.append(self.ejection + dst)
        latency = np.full(len(src), topology.link.latency_s)
        if topology.nodes > 1:
            latency = np.where(same, latency, topology.inter_node.latency_s)
        return np.stack(columns, axis=1), latency

    def _resolve_each(self, src, dst):
        pairs, routes = self.pairs, self.routes
        found = []
        for s, d in zip(src.tolist(), dst.tolist()):
            path = pairs.get(s * self.n + d)
            if path is None:
                path = pairs[s * self.n + d] = routes.path(s, d)
            found.append(path)
        width = max((len(p[0]) for p in found), default=1)
        resources = np.full((len(found), width), -1, dtype=np.int64)
        for row, (ids, _) in enumerate(found):
            resources[row, :len(ids)] = ids
        self.bandwidth = np.asarray(routes.bandwidth, dtype=float)
        return resources, np.array([p[1] for p in found], dtype=float)


def _two_finish(start_a, size_a, start_b, size_b, bw):
    """`_shared_finish` of two messages with different starts, for many resources at once, float for float.

    ``a`` is the resource's first message in the step, ``b`` its second.
    """
    a_first = start_a < start_b
    s1 = np.where(a_first, start_a, start_b)  # the earlier
    s2 = np.where(a_first, start_b, start_a)
    z1 = np.where(a_first, size_a, size_b)
    z2 = np.where(a_first, size_b, size_a)
    k1 = 0.0 + z1                      # the earlier one's virtual reading when done
    alone = s1 + k1 / bw               # done before the later one arrives?
    later_first = alone > s2
    # Overlapping: both present from s2, the virtual clock at (s2 - s1) * bw.
    virtual = (s2 - s1) * bw
    k2 = virtual + z2
    pos1 = np.where(a_first, 0, 1)     # the earlier one's place in the call's list (ties in the heap go by it)
    one_leaves_first = (k1 < k2) | ((k1 == k2) & (pos1 == 0))
    low, high = np.where(one_leaves_first, k1, k2), np.where(one_leaves_first, k2, k1)
    done_low = s2 + (low - virtual) * 2 / bw
    done_high = done_low + (high - low) * 1 / bw
    overlap_1 = np.where(one_leaves_first, done_low, done_high)
    overlap_2 = np.where(one_leaves_first, done_high, done_low)
    # Apart: the earlier done at `alone`, the later alone from s2.
    k2_apart = k1 + z2
    apart_2 = s2 + (k2_apart - k1) * 1 / bw
    finish_1 = np.where(later_first, overlap_1, alone)
    finish_2 = np.where(later_first, overlap_2, apart_2)
    return np.where(a_first, finish_1, finish_2), np.where(a_first, finish_2, finish_1)


def simulate(plan: Plan, shape: ProblemShape, topology: Topology) -> Prediction:
    """Predict the time of ``plan`` for problem ``shape`` on ``topology``: per step, in total, bytes per resource."""
    n = plan.world_size
    if topology.world_size != n:
        raise ValueError(f"the plan is for {n} ranks, the topology has {topology.world_size} devices")
    router = _Router(topology)
    compute_model = topology.compute
    backward = plan.backward
    flop_factor = compute_model.backward_ratio if backward else 1.0
    overhead = compute_model.call_overhead_s
    per_message = compute_model.message_overhead_s
    seq_q, seq_kv = shape.seq_local, shape.kv_seq

    # Spans repeat over a plan (ALL, FIRST, SECOND, a few chunks): price each kind of block and message once.
    block_seconds: dict[tuple, float] = {}
    message_bytes: dict[tuple, int] = {}

    def price_block(block) -> float:
        q_rows = block.q_span.fraction * seq_q
        kv_rows = block.kv_span.fraction * seq_kv
        flops = block_flops(shape, float(block.work)) * flop_factor
        rate = compute_model.rate(backward, int(q_rows), int(kv_rows))
        return (0.0 if math.isinf(rate) else flops / rate) + overhead

    # Keys hashed in C: spans are tuples of ints; the payload and the mask by identity (enum members).
    get_q, get_kv, get_mask, get_payload, get_span = (
        operator.attrgetter(name) for name in ("q_span", "kv_span", "mask", "payload", "span"))
    get_rank, get_src, get_dst = (operator.attrgetter(name) for name in ("rank", "src", "dst"))

    def block_keys(blocks):
        return zip(map(get_q, blocks), map(get_kv, blocks), map(id, map(get_mask, blocks)))

    def message_keys(transfers):
        return zip(map(id, map(get_payload, transfers)), map(get_span, transfers))

    def block_costs(blocks) -> np.ndarray:
        try:
            return np.fromiter(map(block_seconds.__getitem__, block_keys(blocks)), float, len(blocks))
        except KeyError:  # a kind of block not priced yet: price the step's new ones, once
            for key, block in zip(block_keys(blocks), blocks):
                if key not in block_seconds:
                    block_seconds[key] = price_block(block)
            return block_costs(blocks)

    def message_sizes(transfers) -> np.ndarray:
        try:
            return np.fromiter(map(message_bytes.__getitem__, message_keys(transfers)), np.int64, len(transfers))
        except KeyError:
            for key, t in zip(message_keys(transfers), transfers):
                if key not in message_bytes:
                    message_bytes[key] = shape.payload_bytes(t.payload, t.span)
            return message_sizes(transfers)

    post = np.zeros(n)  # when each rank posts the current step: when it finished the previous one
    last_end = 0.0
    used_resources: list[np.ndarray] = []  # per step: each message's resources, and its bytes
    used_bytes: list[np.ndarray] = []
    steps: list[StepPrediction] = []
    comm_total = exposed_total = 0.0
    busiest_compute = np.zeros(n)
    for step in plan.steps:
        blocks, transfers = step.blocks, step.transfers
        compute = np.zeros(n)
        if blocks:
            ranks = np.fromiter(map(get_rank, blocks), np.int64, len(blocks))
            seconds = block_costs(blocks)
            np.add.at(compute, ranks, seconds)  # in block order, as a rank adds them up
        count = len(transfers)
        if not count:
            messages_done = np.full(n, -1.0)
            step_bytes = 0
        else:
            src = np.fromiter(map(get_src, transfers), np.int64, count)
            dst = np.fromiter(map(get_dst, transfers), np.int64, count)
            size = message_sizes(transfers)
            if per_message:  # host time on both ends of each message, while the rank cannot compute
                np.add.at(compute, np.stack([src, dst], axis=1).ravel(), per_message)
            resources, latency = router.resolve(src, dst)
            bandwidth = router.bandwidth
            start = np.maximum(post[src], post[dst])
            step_bytes = int(size.sum())

            # Each resource's messages of the step, in message order: most carry one, settled at once; two
            # share in closed form; three or more share by `_shared_finish`.
            width = resources.shape[1]
            flat = resources.ravel()
            owner = np.repeat(np.arange(count), width)
            keep = flat >= 0
            flat, owner = flat[keep], owner[keep]
            used_resources.append(flat)
            used_bytes.append(size[owner])
            order = np.argsort(flat, kind="stable")
            flat, owner = flat[order], owner[order]
            boundaries = np.flatnonzero(np.diff(flat)) + 1
            first = np.concatenate(([0], boundaries))
            users = np.diff(np.concatenate((first, [len(flat)])))
            carried = np.zeros(count)  # when the slowest resource on its path has carried each message

            alone = first[users == 1]
            if len(alone):
                i = owner[alone]
                np.maximum.at(carried, i, start[i] + size[i] / bandwidth[flat[alone]])
            pairs = first[users == 2]
            if len(pairs):
                i, j = owner[pairs], owner[pairs + 1]
                bw = bandwidth[flat[pairs]]
                same = start[i] == start[j]
                # Both from the same moment (a query and a partial on one port): both at half rate until the
                # smaller is done, then the larger alone.
                swap = size[i] > size[j]
                small, large = np.where(swap, j, i), np.where(swap, i, j)
                done_small = start[small] + 2 * size[small] / bw
                done_large = start[small] + (size[small] + size[large]) / bw
                done_i_same = np.where(swap, done_large, done_small)
                done_j_same = np.where(swap, done_small, done_large)
                done_i, done_j = _two_finish(start[i], size[i], start[j], size[j], bw)
                np.maximum.at(carried, i, np.where(same, done_i_same, done_i))
                np.maximum.at(carried, j, np.where(same, done_j_same, done_j))
            for at, many in zip(first[users > 2].tolist(), users[users > 2].tolist()):
                members = owner[at:at + many]
                finish = _shared_finish(start[members].tolist(), size[members].tolist(), float(bandwidth[flat[at]]))
                np.maximum.at(carried, members, finish)

            done = carried + latency
            messages_done = np.full(n, -1.0)  # per rank: when its last message of the step is done (-1: none)
            np.maximum.at(messages_done, src, done)
            np.maximum.at(messages_done, dst, done)

        computed = post + compute
        busiest_compute += compute
        has = messages_done >= 0
        waited = np.where(messages_done > computed, messages_done - computed, 0.0)
        end = np.where(has, computed + waited, computed)
        step_comm = step_exposed = 0.0
        if has.any():
            comm = (messages_done - post)[has]
            waits = waited[has]
            # Summed rank by rank, in order, as one would by hand (an accumulate adds in sequence).
            comm_total = float(np.add.accumulate(np.concatenate(([comm_total], comm)))[-1])
            exposed_total = float(np.add.accumulate(np.concatenate(([exposed_total], waits)))[-1])
            step_comm = max(0.0, float(comm.max()))
            step_exposed = max(0.0, float(waits.max()))
        post = end
        end_of_step = float(post.max()) if n else 0.0
        steps.append(StepPrediction(step.index, end_of_step - last_end, float(compute.max()) if n else 0.0,
                                    step_comm, step_exposed, step_bytes))
        last_end = end_of_step

    resource_bytes: dict[str, int] = {}
    if used_resources:
        flat = np.concatenate(used_resources)
        totals = np.bincount(flat, weights=np.concatenate(used_bytes).astype(float))
        touched = np.flatnonzero(np.bincount(flat))
        resource_bytes = dict(zip(router.names(touched), totals[touched].astype(np.int64).tolist()))
    return Prediction(
        algorithm=plan.algorithm, backward=backward, world_size=n, total=last_end, steps=tuple(steps),
        compute=float(busiest_compute.max()) if n else 0.0, comm=comm_total, exposed=exposed_total,
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
    from tokenring.schedules.build import schedule_names  # the registry loads plugins: only when asked

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
    from tokenring.schedules.build import build_plan

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
