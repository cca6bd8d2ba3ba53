"""Schedules as data.

A `Plan` says, for every step, which block each rank computes (whose queries,
which part of them, against whose keys/values, under which mask) and which
messages go where. One executor runs any plan; the same plan gives the exact
traffic per directed link, the work per rank, and the tests of the schedule
itself, without any process.

Two algorithms are built here:

* ``tokenring``: keys/values never move. Queries travel one hop per step on
  the QUERY channel; each partial result (out, lse) goes straight back to the
  query's owner, one step after it was computed, on the PARTIAL channel. A
  final step carries the last partials.
* ``ring`` (Ring-Attention, the baseline): keys/values travel one hop per step
  and every partial result is merged where it was computed.

Both can run either way round the ring. The builder sends only the part of a
travelling tensor that some later holder still needs, and picks the direction
that moves fewer bytes (ties go to r -> r+1). For TokenRing on the causal
zigzag layout that is r -> r-1: a query first visits the ranks whose chunks
both precede its own second chunk (they need all of it), then, after the
wrap, the ranks that only see its second half, so only that half travels on.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple

from .interfaces import Channel, LinkTraffic, Mask
from .layout import Layout, parse_layout


class Algorithm(str, enum.Enum):
    TOKENRING = "tokenring"
    RING = "ring"


def parse_algorithm(algorithm: "Algorithm | str") -> Algorithm:
    try:
        return Algorithm(algorithm)
    except ValueError:
        choices = ", ".join(repr(a.value) for a in Algorithm)
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {choices}") from None


class Part(str, enum.Enum):
    """A part of one rank's local shard. Halves exist only in the zigzag layout."""

    ALL = "all"
    FIRST = "first"
    SECOND = "second"

    def union(self, other: "Part | None") -> "Part":
        if other is None or other is self:
            return self
        return Part.ALL

    def contains(self, other: "Part") -> bool:
        return self is Part.ALL or self is other

    @property
    def halves(self) -> int:
        return 2 if self is Part.ALL else 1


class Pass(str, enum.Enum):
    FORWARD = "forward"
    BACKWARD = "backward"


class Payload(str, enum.Enum):
    # forward
    QUERY = "query"            # q of the owner
    KEY_VALUE = "key_value"    # k and v of the owner, packed together
    PARTIAL = "partial"        # (out, lse) of the owner's queries from one block
    # backward
    GRAD_QUERY = "grad_query"  # (q, dout, out, lse) of the owner, packed together
    GRAD_PARTIAL = "grad_partial"  # dq of the owner's queries from one block
    GRAD_KEY_VALUE = "grad_key_value"  # (dk, dv) of the owner, summed over the holders so far

    @property
    def channel(self) -> Channel:
        results = (Payload.PARTIAL, Payload.GRAD_PARTIAL, Payload.GRAD_KEY_VALUE)
        return Channel.PARTIAL if self in results else Channel.QUERY


class Section(NamedTuple):
    """One tensor inside a message."""

    name: str
    shape: tuple[int, ...]
    accumulator: bool  # in the accumulation dtype (float32/float64), else in the inputs' dtype


@dataclass(frozen=True)
class Block:
    """One kernel call: ``rank`` computes q_owner's q_part against kv_owner's kv_part."""

    rank: int
    q_owner: int
    q_part: Part
    kv_owner: int
    kv_part: Part
    mask: Mask

    @property
    def work(self) -> float:
        """Score-matrix entries computed, in units of (half shard)^2."""
        area = self.q_part.halves * self.kv_part.halves
        return area / 2 if self.mask is Mask.CAUSAL else float(area)


@dataclass(frozen=True)
class Transfer:
    """One message: ``src`` sends ``part`` of ``owner``'s ``payload`` to ``dst``."""

    src: int
    dst: int
    payload: Payload
    owner: int
    part: Part


@dataclass(frozen=True)
class Step:
    index: int
    blocks: tuple[Block, ...]        # at most one per rank
    transfers: tuple[Transfer, ...]  # posted before the step's compute, waited after it

    def block_of(self, rank: int) -> Block | None:
        return next((b for b in self.blocks if b.rank == rank), None)


@dataclass(frozen=True)
class ProblemShape:
    """Per-rank sizes that turn a plan's parts into bytes."""

    batch: int
    seq_local: int
    q_heads: int
    kv_heads: int
    head_dim: int
    itemsize: int          # bytes per element of q, k, v
    acc_itemsize: int = 4  # accumulation dtype: float32, or float64 for float64 inputs

    def part_len(self, part: Part) -> int:
        return self.seq_local if part is Part.ALL else self.seq_local // 2

    def sections(self, payload: Payload, part: Part) -> tuple[Section, ...]:
        """The tensors one message carries, in order."""
        length = self.part_len(part)
        rows = (self.batch, length, self.q_heads, self.head_dim)
        key_value = (2, self.batch, length, self.kv_heads, self.head_dim)
        lse = Section("lse", (self.batch, self.q_heads, length), True)
        if payload is Payload.QUERY:
            return (Section("q", rows, False),)
        if payload is Payload.KEY_VALUE:
            return (Section("kv", key_value, False),)
        if payload is Payload.PARTIAL:
            return (Section("out", rows, False), lse)
        if payload is Payload.GRAD_QUERY:
            return (Section("q", rows, False), Section("dout", rows, False), Section("out", rows, False), lse)
        if payload is Payload.GRAD_PARTIAL:
            return (Section("dq", rows, False),)
        return (Section("dkv", key_value, True),)

    def section_spans(self, payload: Payload, part: Part) -> list[tuple[Section, int, int]]:
        """(section, byte offset, byte length) of each section of a packed message.

        Every section but the last is padded to a multiple of 8 bytes so the
        next one is aligned for any float type.
        """
        spans = []
        offset = 0
        for section in self.sections(payload, part):
            nbytes = math.prod(section.shape) * (self.acc_itemsize if section.accumulator else self.itemsize)
            spans.append((section, offset, nbytes))
            offset += -(-nbytes // 8) * 8
        return spans

    def payload_bytes(self, payload: Payload, part: Part) -> int:
        _, offset, nbytes = self.section_spans(payload, part)[-1]
        return offset + nbytes


@dataclass(frozen=True)
class Plan:
    algorithm: Algorithm
    layout: Layout
    causal: bool
    world_size: int
    direction: int  # +1: travelling tensors go r -> r+1; -1: r -> r-1
    steps: tuple[Step, ...]
    backward: bool = False  # the gradient pass of the same schedule

    def transfers(self) -> Iterator[tuple[int, Transfer]]:
        for step in self.steps:
            for transfer in step.transfers:
                yield step.index, transfer

    def link_bytes(self, shape: ProblemShape) -> list[LinkTraffic]:
        """Bytes per (step, src, dst), summed over the messages of that link and step."""
        return sum_by_link(
            LinkTraffic(index, t.src, t.dst, shape.payload_bytes(t.payload, t.part)) for index, t in self.transfers()
        )

    def describe(self) -> str:
        lines = [
            f"{self.algorithm.value} plan, {self.layout.value} layout, "
            f"{'causal' if self.causal else 'non-causal'}, N={self.world_size}, direction {self.direction:+d}"
            f"{', backward' if self.backward else ''}"
        ]
        for step in self.steps:
            lines.append(f"step {step.index}:")
            for b in step.blocks:
                lines.append(
                    f"  rank {b.rank}: q[{b.q_owner}].{b.q_part.value} x kv[{b.kv_owner}].{b.kv_part.value}"
                    f" mask={b.mask.value}"
                )
            for t in step.transfers:
                lines.append(f"  {t.src} -> {t.dst}: {t.payload.value}[{t.owner}].{t.part.value}")
        return "\n".join(lines)


def sum_by_link(messages: Iterable[LinkTraffic]) -> list[LinkTraffic]:
    """One entry per (step, src, dst) with the bytes of all its messages, sorted."""
    totals: dict[tuple[int, int, int], int] = {}
    for m in messages:
        totals[(m.step, m.src, m.dst)] = totals.get((m.step, m.src, m.dst), 0) + m.bytes
    return [LinkTraffic(step, src, dst, n) for (step, src, dst), n in sorted(totals.items())]


def visible_block(layout: Layout, causal: bool, q_owner: int, kv_owner: int) -> tuple[Part, Part, Mask] | None:
    """Which part of q_owner's queries sees which part of kv_owner's keys, or None.

    Zigzag, causal, with j = q_owner and r = kv_owner:
    * j == r: the local diagonal block under a causal mask;
    * j > r: j's chunks both follow r's first chunk and precede its second,
      so all of q_j sees only r's FIRST half, unmasked;
    * j < r: only j's second chunk follows r's chunks; it sees all of them.
    """
    if not causal:
        return Part.ALL, Part.ALL, Mask.NONE
    if q_owner == kv_owner:
        return Part.ALL, Part.ALL, Mask.CAUSAL
    if layout is Layout.CONTIGUOUS:
        return (Part.ALL, Part.ALL, Mask.NONE) if q_owner > kv_owner else None
    if q_owner > kv_owner:
        return Part.ALL, Part.FIRST, Mask.NONE
    return Part.SECOND, Part.ALL, Mask.NONE


def _build_steps(algorithm: Algorithm, layout: Layout, causal: bool, n: int, direction: int) -> tuple[Step, ...]:
    """Steps of a plan in which one kind of tensor travels one hop per step.

    TokenRing: the travelling tensor is the owner's queries, computed against
    each holder's keys/values; the partial result goes back to the owner one
    step later. Ring: the travelling tensor is the owner's keys/values,
    computed against each holder's queries; results stay where computed.
    """
    moves_queries = algorithm is Algorithm.TOKENRING
    payload = Payload.QUERY if moves_queries else Payload.KEY_VALUE

    def holder(owner: int, hops: int) -> int:
        return (owner + hops * direction) % n

    def block(owner: int, hops: int) -> Block | None:
        rank = holder(owner, hops)
        q_owner, kv_owner = (owner, rank) if moves_queries else (rank, owner)
        visible = visible_block(layout, causal, q_owner, kv_owner)
        if visible is None:
            return None
        return Block(rank, q_owner, visible[0], kv_owner, visible[1], visible[2])

    def travelling_part(b: Block) -> Part:
        return b.q_part if moves_queries else b.kv_part

    def still_needed(owner: int, from_hops: int) -> Part | None:
        needed: Part | None = None
        for hops in range(from_hops, n):
            b = block(owner, hops)
            if b is not None:
                needed = travelling_part(b).union(needed)
        return needed

    # TokenRing needs one more step, after the last compute, to return the last partials.
    n_steps = n + 1 if moves_queries and n > 1 else n
    steps = []
    for index in range(n_steps):
        blocks: list[Block] = []
        transfers: list[Transfer] = []
        for owner in range(n):
            if index < n:
                b = block(owner, index)
                if b is not None:
                    blocks.append(b)
                part = still_needed(owner, index + 1) if index < n - 1 else None
                if part is not None:
                    transfers.append(Transfer(holder(owner, index), holder(owner, index + 1), payload, owner, part))
            previous = block(owner, index - 1) if moves_queries and index >= 2 else None
            if previous is not None:
                transfers.append(Transfer(previous.rank, owner, Payload.PARTIAL, owner, previous.q_part))
        blocks.sort(key=lambda b: b.rank)
        steps.append(Step(index, tuple(blocks), tuple(transfers)))
    return tuple(steps)


# A nominal MHA problem (units: one element per head-dim entry) used only to
# compare the two directions of travel; the choice does not depend on it for
# the plans built here.
_NOMINAL_SHAPE = ProblemShape(batch=1, seq_local=2, q_heads=1, kv_heads=1, head_dim=64, itemsize=2)


@functools.lru_cache(maxsize=256)
def _backward_steps(forward: Plan) -> tuple[Step, ...]:
    """The gradient pass: the forward's blocks and travel, with gradient payloads.

    TokenRing: (q, dout, out, lse) travel where q did, and each block's dq goes
    back to its owner where the partial (out, lse) did; dk and dv never move.
    Ring: k and v travel as before, and the dk/dv each holder adds follow them
    one step behind, summed on the way, until they reach their owner (one
    extra step after the last compute).
    """
    renamed = {
        Payload.QUERY: Payload.GRAD_QUERY,
        Payload.PARTIAL: Payload.GRAD_PARTIAL,
        Payload.KEY_VALUE: Payload.KEY_VALUE,
    }
    steps = [
        Step(s.index, s.blocks, tuple(dataclasses.replace(t, payload=renamed[t.payload]) for t in s.transfers))
        for s in forward.steps
    ]
    n = forward.world_size
    if forward.algorithm is not Algorithm.RING or n == 1:
        return tuple(steps)
    steps.append(Step(n, (), ()))
    transfers: list[list[Transfer]] = [list(s.transfers) for s in steps]

    def holder(owner: int, hops: int) -> int:
        return (owner + hops * forward.direction) % n

    for owner in range(n):
        summed: Part | None = None  # the part of dk/dv the travelling sum covers so far
        for index in range(1, n + 1):
            if summed is not None:
                transfers[index].append(
                    Transfer(holder(owner, index - 1), holder(owner, index), Payload.GRAD_KEY_VALUE, owner, summed)
                )
            block = steps[index].block_of(holder(owner, index)) if index < n else None
            if block is not None and block.kv_owner == owner:
                summed = block.kv_part.union(summed)
    return tuple(Step(s.index, s.blocks, tuple(t)) for s, t in zip(steps, transfers))


@functools.lru_cache(maxsize=256)
def build_plan(
    algorithm: "Algorithm | str",
    layout: "Layout | str",
    causal: bool,
    world_size: int,
    direction: int | None = None,
    backward: bool = False,
) -> Plan:
    """The schedule of one attention call (or of its gradient, with ``backward``). Pure; cached.

    The backward plan travels the same way as the forward plan of the same
    arguments, so a forward and its backward always agree on direction.
    """
    algorithm = parse_algorithm(algorithm)
    layout = parse_layout(layout)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if direction not in (None, 1, -1):
        raise ValueError(f"direction must be +1, -1 or None, got {direction}")
    if backward:
        forward = build_plan(algorithm, layout, causal, world_size, direction)
        return dataclasses.replace(forward, steps=_backward_steps(forward), backward=True)
    candidates = [direction] if direction is not None else [1, -1]
    plans = [
        Plan(algorithm, layout, bool(causal), world_size, d, _build_steps(algorithm, layout, bool(causal), world_size, d))
        for d in candidates
    ]
    return min(plans, key=lambda p: sum(t.bytes for t in p.link_bytes(_NOMINAL_SHAPE)))
