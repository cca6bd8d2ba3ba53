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
from dataclasses import dataclass
from typing import Iterable, Iterator

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


class Payload(str, enum.Enum):
    QUERY = "query"            # q of the owner, (B, L, Hq, D)
    KEY_VALUE = "key_value"    # k and v of the owner, packed as (2, B, L, Hkv, D)
    PARTIAL = "partial"        # (out, lse) of the owner's queries, packed in one message

    @property
    def channel(self) -> Channel:
        return Channel.PARTIAL if self is Payload.PARTIAL else Channel.QUERY


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
    lse_itemsize: int = 4  # float32 (8 when inputs are float64)

    def part_len(self, part: Part) -> int:
        return self.seq_local if part is Part.ALL else self.seq_local // 2

    def payload_bytes(self, payload: Payload, part: Part) -> int:
        length = self.part_len(part)
        if payload is Payload.QUERY:
            return self.batch * length * self.q_heads * self.head_dim * self.itemsize
        if payload is Payload.KEY_VALUE:
            return 2 * self.batch * length * self.kv_heads * self.head_dim * self.itemsize
        out_bytes, lse_bytes = self.partial_sections(part)
        return out_bytes + lse_bytes

    def partial_sections(self, part: Part) -> tuple[int, int]:
        """Byte sizes of the out and lse sections of a packed partial.

        The out section is padded to a multiple of 8 bytes so the lse section
        that follows it is aligned for any float type.
        """
        length = self.part_len(part)
        out_bytes = self.batch * length * self.q_heads * self.head_dim * self.itemsize
        out_bytes = -(-out_bytes // 8) * 8
        return out_bytes, self.batch * self.q_heads * length * self.lse_itemsize


@dataclass(frozen=True)
class Plan:
    algorithm: Algorithm
    layout: Layout
    causal: bool
    world_size: int
    direction: int  # +1: travelling tensors go r -> r+1; -1: r -> r-1
    steps: tuple[Step, ...]

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
def build_plan(
    algorithm: "Algorithm | str",
    layout: "Layout | str",
    causal: bool,
    world_size: int,
    direction: int | None = None,
) -> Plan:
    """The schedule of one attention call. Pure; cached."""
    algorithm = parse_algorithm(algorithm)
    layout = parse_layout(layout)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if direction not in (None, 1, -1):
        raise ValueError(f"direction must be +1, -1 or None, got {direction}")
    candidates = [direction] if direction is not None else [1, -1]
    plans = [
        Plan(algorithm, layout, bool(causal), world_size, d, _build_steps(algorithm, layout, bool(causal), world_size, d))
        for d in candidates
    ]
    return min(plans, key=lambda p: sum(t.bytes for t in p.link_bytes(_NOMINAL_SHAPE)))


def plan_summary(plan: Plan) -> dict:
    """A JSON-friendly view of a plan (for the CLI and for debugging)."""
    return {
        "algorithm": plan.algorithm.value,
        "layout": plan.layout.value,
        "causal": plan.causal,
        "world_size": plan.world_size,
        "direction": plan.direction,
        "steps": [
            {
                "index": s.index,
                "blocks": [
                    {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in dataclasses.asdict(b).items()}
                    for b in s.blocks
                ],
                "transfers": [
                    {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in dataclasses.asdict(t).items()}
                    for t in s.transfers
                ],
            }
            for s in plan.steps
        ],
    }
