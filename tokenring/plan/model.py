"""Schedules as data: the plan model.

A `Plan` says, for every step, which blocks each rank computes (whose
queries, which span of them, against whose keys/values, which span, under
which mask) and which messages go where. One executor runs any plan; the same
plan gives the exact traffic per directed link, the work per rank, and the
proof of the schedule itself (`tokenring.proofs.plancheck`), without any process.

The model (docs/design.md, "The plan model"):

* A `Span` is any contiguous piece of one rank's shard, as a fraction of it:
  ``Span.chunks(a, b, n)`` is chunks [a, b) of the shard cut into n equal
  chunks. Query and key/value shards may have different lengths; a span
  means the same fraction of each.
* A step may hold any number of blocks per rank and any number of messages
  per pair. Messages are posted before the step's compute and have arrived
  once the step is waited on.
* Builders (one per schedule, in `tokenring.schedules`) write forward plans;
  the gradient pass of any forward plan is derived by `tokenring.plan.backward`.
"""

from __future__ import annotations

import enum
import functools
import math
import operator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from tokenring.interfaces import Channel, LinkTraffic, Mask
from tokenring.placement.layout import Layout

if TYPE_CHECKING:
    from tokenring.placement.masks import TokenMask


class PlanError(AssertionError):
    """The plan would compute something other than exact attention (raised by `tokenring.proofs.plancheck`)."""


class Span(tuple):
    """Chunks [start, stop) of a shard cut into ``of`` equal chunks (0 <= start < stop <= of).

    Always in lowest terms, so a span is a plain tuple of three ints: equal
    spans compare and hash equal, cheaply. ``Span(start, stop)`` with
    fractions of the shard (or 0 and 1) builds the same span.
    """

    __slots__ = ()

    def __new__(cls, start, stop, of: int | None = None) -> "Span":
        if of is None:
            start, stop = Fraction(start), Fraction(stop)
            of = start.denominator * stop.denominator // math.gcd(start.denominator, stop.denominator)
            start, stop = start.numerator * (of // start.denominator), stop.numerator * (of // stop.denominator)
        elif not (type(start) is int and type(stop) is int and type(of) is int):
            start, stop, of = operator.index(start), operator.index(stop), operator.index(of)
        if not 0 <= start < stop <= of:
            raise ValueError(f"a span needs 0 <= start < stop <= 1, got [{start}/{of}, {stop}/{of})")
        g = math.gcd(start, stop, of)
        if g != 1:
            start, stop, of = start // g, stop // g, of // g
        return tuple.__new__(cls, (start, stop, of))

    def __getnewargs__(self) -> tuple[int, int, int]:
        return tuple(self)

    start = property(operator.itemgetter(0), doc="The first chunk, of ``of``.")
    stop = property(operator.itemgetter(1), doc="The chunk after the last, of ``of``.")
    of = property(operator.itemgetter(2), doc="How many equal chunks the shard is cut into (in lowest terms).")

    @classmethod
    def chunks(cls, first: int, stop: int, of: int) -> "Span":
        """Chunks [first, stop) of a shard cut into ``of`` equal chunks."""
        return cls(first, stop, of)

    @property
    def fraction(self) -> Fraction:
        """The share of the shard it covers."""
        return Fraction(self[1] - self[0], self[2])

    @property
    def denominator(self) -> int:
        """The fewest equal chunks a shard must be cut into for this span to be whole chunks."""
        return self[2]

    def rows(self, length: int) -> tuple[int, int]:
        """(offset, count) of this span in a shard of ``length`` rows."""
        start, stop, of = self
        per_chunk, rest = divmod(length, of)
        if rest:
            raise ValueError(f"span {self} does not fall on whole rows of a shard of {length}")
        return start * per_chunk, (stop - start) * per_chunk

    def row_range(self, length: int) -> tuple[int, int]:
        """[first, stop) rows of this span in a shard of ``length`` rows."""
        start, stop, of = self
        per_chunk, rest = divmod(length, of)
        if rest:
            raise ValueError(f"span {self} does not fall on whole rows of a shard of {length}")
        return start * per_chunk, stop * per_chunk

    def contains(self, other: "Span") -> bool:
        a, b, n = self
        c, d, m = other
        if n == m:
            return a <= c and d <= b
        return a * m <= c * n and d * n <= b * m

    def hull(self, other: "Span | None") -> "Span":
        """The smallest span covering both."""
        if other is None or other == self:
            return self
        key = (self, other)
        got = _HULLS.get(key)
        if got is None:
            a, b, n = self
            c, d, m = other
            if n == m:
                got = Span(min(a, c), max(b, d), n)
            else:
                of = n * m // math.gcd(n, m)
                got = Span(min(a * (of // n), c * (of // m)), max(b * (of // n), d * (of // m)), of)
            if len(_HULLS) > 65536:
                _HULLS.clear()
            _HULLS[key] = got
        return got

    def intersection(self, other: "Span") -> "Span | None":
        """The rows both cover, or None."""
        a, b, n = self
        c, d, m = other
        if n != m:
            of = n * m // math.gcd(n, m)
            a, b, c, d, n = a * (of // n), b * (of // n), c * (of // m), d * (of // m), of
        start, stop = max(a, c), min(b, d)
        return Span(start, stop, n) if start < stop else None

    def within(self, outer: "Span") -> "Span":
        """This span as a fraction of ``outer``, which must contain it."""
        if not outer.contains(self):
            raise ValueError(f"span {self} is not inside {outer}")
        a, b, n = self
        c, d, m = outer
        # a/n - c/m over (d - c)/m: (a m - c n) / ((d - c) n)
        return Span(a * m - c * n, b * m - c * n, (d - c) * n)

    def __str__(self) -> str:
        if self == ALL:
            return "all"
        return f"[{self[0]}:{self[1]})/{self[2]}"

    def __repr__(self) -> str:
        return f"Span({self[0]}, {self[1]}, {self[2]})"


# Span.hull by value: builders and the backward ask it for the same few pairs of spans again and again.
_HULLS: dict[tuple[Span, Span], Span] = {}


def _ratio(numerator: int, denominator: int) -> str:
    """``str(Fraction(numerator, denominator))``, in ints."""
    g = math.gcd(numerator, denominator)
    numerator, denominator = numerator // g, denominator // g
    return str(numerator) if denominator == 1 else f"{numerator}/{denominator}"


ALL = Span(0, 1, 1)
FIRST = Span.chunks(0, 1, 2)   # the first of a zigzag shard's two chunks
SECOND = Span.chunks(1, 2, 2)  # the second


class Payload(str, enum.Enum):
    # forward
    QUERY = "query"            # q of the owner
    KEY_VALUE = "key_value"    # k and v of the owner, packed together
    PARTIAL = "partial"        # (out, lse) of the owner's queries from one block
    # backward
    GRAD_QUERY = "grad_query"  # (q, dout, out, lse) of the owner, packed together
    GRAD_PARTIAL = "grad_partial"  # dq of the owner's queries from one block
    GRAD_KEY_VALUE = "grad_key_value"  # (dk, dv) of the owner, summed over the holders so far
    # replicated queries (Plan.replicated_queries): every rank holds the same queries
    MERGED = "merged"          # (out, lse) of the sender's queries, merged over all it has computed and received

    @property
    def channel(self) -> Channel:
        results = (Payload.PARTIAL, Payload.GRAD_PARTIAL, Payload.GRAD_KEY_VALUE, Payload.MERGED)
        return Channel.PARTIAL if self in results else Channel.QUERY

    @property
    def of_keys(self) -> bool:
        """Rows of the owner's key/value shard, not of its query shard."""
        return self in (Payload.KEY_VALUE, Payload.GRAD_KEY_VALUE)


@dataclass(frozen=True)
class Section:
    """One tensor inside a message."""

    name: str
    shape: tuple[int, ...]
    accumulator: bool  # in the accumulation dtype (float32/float64), else in the inputs' dtype
    seq_dim: int       # the dimension along which a span narrows it


# Block and Transfer are frozen dataclasses whose __init__ fills the instance dict at once: a plan at
# N = 1024 holds millions of them, and the generated frozen __init__ (one object.__setattr__ per field)
# costs twice as much. Same fields, same equality, hashing and dataclasses.replace.
@dataclass(frozen=True, init=False)
class Block:
    """One kernel call: ``rank`` computes q_owner's q_span against kv_owner's kv_span."""

    rank: int
    q_owner: int
    q_span: Span
    kv_owner: int
    kv_span: Span
    mask: Mask

    def __init__(self, rank: int, q_owner: int, q_span: Span, kv_owner: int, kv_span: Span, mask: Mask) -> None:
        d = self.__dict__
        d["rank"] = rank
        d["q_owner"] = q_owner
        d["q_span"] = q_span
        d["kv_owner"] = kv_owner
        d["kv_span"] = kv_span
        d["mask"] = mask

    @property
    def work(self) -> Fraction:
        """Score-matrix entries computed, as a fraction of one shard-by-shard block."""
        qa, qb, qn = self.q_span
        ka, kb, kn = self.kv_span
        return Fraction((qb - qa) * (kb - ka), qn * kn * (2 if self.mask is Mask.CAUSAL else 1))


@dataclass(frozen=True, init=False)
class Transfer:
    """One message: ``src`` sends ``span`` of ``owner``'s ``payload`` to ``dst``."""

    src: int
    dst: int
    payload: Payload
    owner: int
    span: Span

    def __init__(self, src: int, dst: int, payload: Payload, owner: int, span: Span) -> None:
        d = self.__dict__
        d["src"] = src
        d["dst"] = dst
        d["payload"] = payload
        d["owner"] = owner
        d["span"] = span


@dataclass(frozen=True)
class Step:
    index: int
    blocks: tuple[Block, ...]        # any number per rank, computed in this order
    transfers: tuple[Transfer, ...]  # posted before the step's compute, waited after it

    def blocks_of(self, rank: int) -> tuple[Block, ...]:
        return tuple(b for b in self.blocks if b.rank == rank)


@dataclass(frozen=True)
class ProblemShape:
    """Per-rank sizes that turn a plan's spans into bytes.

    ``seq_local`` is the length of each rank's query shard; ``kv_len`` that of
    its key/value shard (None: the same).
    """

    batch: int
    seq_local: int
    q_heads: int
    kv_heads: int
    head_dim: int
    itemsize: int          # bytes per element of q, k, v
    acc_itemsize: int = 4  # accumulation dtype: float32, or float64 for float64 inputs
    kv_len: int | None = None

    @property
    def kv_seq(self) -> int:
        return self.seq_local if self.kv_len is None else self.kv_len

    def span_len(self, payload: Payload, span: Span) -> int:
        return span.rows(self.kv_seq if payload.of_keys else self.seq_local)[1]

    @functools.lru_cache(maxsize=4096)  # asked for every message of every call; a function of its arguments
    def sections(self, payload: Payload, span: Span) -> tuple[Section, ...]:
        """The tensors one message carries, in order."""
        length = self.span_len(payload, span)
        rows = (self.batch, length, self.q_heads, self.head_dim)
        key_value = (2, self.batch, length, self.kv_heads, self.head_dim)
        lse = Section("lse", (self.batch, self.q_heads, length), True, 2)
        if payload is Payload.QUERY:
            return (Section("q", rows, False, 1),)
        if payload is Payload.KEY_VALUE:
            return (Section("kv", key_value, False, 2),)
        if payload in (Payload.PARTIAL, Payload.MERGED):
            return (Section("out", rows, False, 1), lse)
        if payload is Payload.GRAD_QUERY:
            return (
                Section("q", rows, False, 1), Section("dout", rows, False, 1), Section("out", rows, False, 1), lse,
            )
        if payload is Payload.GRAD_PARTIAL:
            return (Section("dq", rows, False, 1),)
        return (Section("dkv", key_value, True, 2),)

    @functools.lru_cache(maxsize=4096)
    def section_spans(self, payload: Payload, span: Span) -> tuple[tuple[Section, int, int], ...]:
        """(section, byte offset, byte length) of each section of a packed message.

        Every section but the last is padded to a multiple of 8 bytes so the
        next one is aligned for any float type.
        """
        spans = []
        offset = 0
        for section in self.sections(payload, span):
            nbytes = math.prod(section.shape) * (self.acc_itemsize if section.accumulator else self.itemsize)
            spans.append((section, offset, nbytes))
            offset += -(-nbytes // 8) * 8
        return tuple(spans)

    def payload_bytes(self, payload: Payload, span: Span) -> int:
        _, offset, nbytes = self.section_spans(payload, span)[-1]
        return offset + nbytes


@dataclass(frozen=True)
class Plan:
    algorithm: str         # the name of the schedule that built it
    layout: Layout
    causal: bool
    world_size: int
    steps: tuple[Step, ...]
    backward: bool = False  # the gradient pass of the same schedule
    tokens: "TokenMask | None" = None  # packed documents, window or padding (tokenring.placement.masks); blocks masked TOKENS
    note: str = field(default="", compare=False)  # the builder's word on this instance, e.g. its direction
    # Every rank holds the same queries (decode: each rank runs the model on the new token); results are
    # merged with `Payload.MERGED` messages and every rank ends with the output (tokenring.schedules.replicated).
    replicated_queries: bool = False

    @property
    def granularity(self) -> int:
        """The fewest equal pieces every shard must split into for all of this plan's spans to be whole."""
        of = {b.q_span[2] for step in self.steps for b in step.blocks}
        of.update(b.kv_span[2] for step in self.steps for b in step.blocks)
        of.update(t.span[2] for step in self.steps for t in step.transfers)
        return math.lcm(1, *of)

    def transfers(self) -> Iterator[tuple[int, Transfer]]:
        for step in self.steps:
            for transfer in step.transfers:
                yield step.index, transfer

    def link_bytes(self, shape: ProblemShape) -> list[LinkTraffic]:
        """Bytes per (step, src, dst), summed over the messages of that link and step."""
        return sum_by_link(
            LinkTraffic(index, t.src, t.dst, shape.payload_bytes(t.payload, t.span)) for index, t in self.transfers()
        )

    def describe(self, shape: ProblemShape | None = None) -> str:
        """The plan step by step; with ``shape``, the bytes of each message and per directed link."""
        header = (
            f"{self.algorithm} plan, {self.layout.value} layout, {'causal' if self.causal else 'non-causal'}, "
            f"N={self.world_size}{', backward' if self.backward else ''}"
            f"{', replicated queries' if self.replicated_queries else ''}"
            f"{', ' + self.tokens.describe() if self.tokens is not None else ''}"
        )
        lines = [header + (f" ({self.note})" if self.note else "")]
        for step in self.steps:
            lines.append(f"step {step.index}:")
            for b in step.blocks:
                lines.append(
                    f"  rank {b.rank} computes q[{b.q_owner}].{b.q_span} x kv[{b.kv_owner}].{b.kv_span} mask={b.mask.value}"
                )
            for t in step.transfers:
                size = f" ({shape.payload_bytes(t.payload, t.span)} B)" if shape is not None else ""
                lines.append(f"  {t.src} -> {t.dst}: {t.payload.value}[{t.owner}].{t.span}{size}")
        if shape is not None:
            totals: dict[tuple[int, int], int] = {}
            for traffic in self.link_bytes(shape):
                totals[(traffic.src, traffic.dst)] = totals.get((traffic.src, traffic.dst), 0) + traffic.bytes
            lines.append("bytes per directed link:")
            lines += [f"  {src} -> {dst}: {n}" for (src, dst), n in sorted(totals.items())] or ["  none"]
        return "\n".join(lines)

    def to_json(self, shape: ProblemShape | None = None) -> dict:
        def span(s: Span) -> list[str]:
            return [_ratio(s[0], s[2]), _ratio(s[1], s[2])]

        steps = []
        for step in self.steps:
            blocks = [
                {"rank": b.rank, "q_owner": b.q_owner, "q_span": span(b.q_span), "kv_owner": b.kv_owner,
                 "kv_span": span(b.kv_span), "mask": b.mask.value}
                for b in step.blocks
            ]
            transfers = []
            for t in step.transfers:
                entry = {"src": t.src, "dst": t.dst, "payload": t.payload.value, "owner": t.owner, "span": span(t.span)}
                if shape is not None:
                    entry["bytes"] = shape.payload_bytes(t.payload, t.span)
                transfers.append(entry)
            steps.append({"step": step.index, "blocks": blocks, "transfers": transfers})
        data = {
            "algorithm": self.algorithm, "layout": self.layout.value, "causal": self.causal,
            "world_size": self.world_size, "backward": self.backward, "note": self.note, "steps": steps,
        }
        if self.replicated_queries:
            data["replicated_queries"] = True
        if self.tokens is not None:
            data["tokens"] = self.tokens.describe()
        if shape is not None:
            data["link_bytes"] = [t.to_json() for t in self.link_bytes(shape)]
        return data


def sum_by_link(messages: Iterable[LinkTraffic]) -> list[LinkTraffic]:
    """One entry per (step, src, dst) with the bytes of all its messages, sorted."""
    totals: dict[tuple[int, int, int], int] = {}
    for m in messages:
        totals[(m.step, m.src, m.dst)] = totals.get((m.step, m.src, m.dst), 0) + m.bytes
    return [LinkTraffic(step, src, dst, n) for (step, src, dst), n in sorted(totals.items())]


def visible_block(layout: Layout, causal: bool, q_owner: int, kv_owner: int) -> tuple[Span, Span, Mask] | None:
    """Which span of q_owner's queries sees which span of kv_owner's keys, or None.

    Zigzag, causal, with j = q_owner and r = kv_owner:
    * j == r: the local diagonal block under a causal mask;
    * j > r: j's chunks both follow r's first chunk and precede its second,
      so all of q_j sees only r's FIRST chunk, unmasked;
    * j < r: only j's second chunk follows r's chunks; it sees all of them.
    """
    if not causal:
        return ALL, ALL, Mask.NONE
    if q_owner == kv_owner:
        return ALL, ALL, Mask.CAUSAL
    if layout is Layout.CONTIGUOUS:
        return (ALL, ALL, Mask.NONE) if q_owner > kv_owner else None
    if q_owner > kv_owner:
        return ALL, FIRST, Mask.NONE
    return SECOND, ALL, Mask.NONE


Builder = Callable[[Layout, bool, int], Plan]


@dataclass(frozen=True)
class Schedule:
    """A named way to run attention: ``build(layout, causal, world_size)`` returns its forward plan.

    Registered through the ``tokenring_register_schedules`` hook; the
    backward plan of any schedule is derived from its forward plan.
    """

    name: str
    summary: str       # one line: what travels where, and where the schedule wins
    build: Builder
    layouts: tuple[Layout, ...] = (Layout.CONTIGUOUS, Layout.ZIGZAG)
