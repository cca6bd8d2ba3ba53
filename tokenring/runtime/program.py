"""A plan lowered, once per (plan, rank, shape), into the program one rank runs.

A `Plan` speaks of spans of owners' payloads; running it means asking, at
every block and message, which held piece contains a span, which message will
carry a result home, and when a piece is last read. All of that depends only
on (plan, rank, shape), so `lower` answers it once: every piece a rank will
hold gets a numbered *slot*, every span becomes integer rows within a slot,
and each step becomes three flat lists (posts, blocks, arrivals) and the
slots to free after it. The executor then reads nothing but the program
(`tokenring.runtime.executor`), and the markers that stop a call play the same posts
(`tokenring.runtime.agreement`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tokenring.runtime.buffers import RESULTS
from tokenring.interfaces import Channel, Mask
from tokenring.plan.model import ALL, Block, Payload, Plan, ProblemShape, Span, Transfer

LOCAL = -1  # a slot number meaning "this rank's own k, v" or "the accumulator"


@dataclass(frozen=True)
class Message:
    """How one (payload, span) message is laid out: its sections' shapes and byte offsets."""

    payload: Payload
    rows: int                                   # along the payload's sequence dimension
    sections: tuple[tuple[str, tuple[int, ...], bool, int, int, int], ...]  # name, shape, acc, seq_dim, offset, bytes
    nbytes: int

    @property
    def packed(self) -> bool:
        """Several sections in one byte buffer (else the one section's tensor is the message)."""
        return len(self.sections) > 1


def message(shape: ProblemShape, payload: Payload, span: Span) -> Message:
    spans = shape.section_spans(payload, span)
    sections = tuple((s.name, s.shape, s.accumulator, s.seq_dim, offset, nbytes) for s, offset, nbytes in spans)
    _, offset, nbytes = spans[-1]
    return Message(payload, shape.span_len(payload, span), sections, offset + nbytes)


class Arrival(enum.Enum):
    HOLD = "hold"              # a travelling input kept in its slot
    MERGE = "merge"            # (out, lse) merged into the accumulator's rows
    ADD_DQ = "add_dq"          # dq added to this rank's dq rows
    ADD_DKV = "add_dkv"        # dk, dv added to this rank's own rows
    ADD_DKV_ON = "add_dkv_on"  # dk, dv added to a running sum held here for another owner


class Start(enum.Enum):
    """How a block's result for another rank starts its pending message."""

    PACK = "pack"    # the block's result is the whole message: packed into a new buffer
    EMPTY = "empty"  # a new message of seen-nothing rows (out 0, lse -inf; dq 0; dk, dv 0), then folded in
    FOLD = "fold"    # folded into the message an earlier block started


@dataclass(frozen=True)
class SendOp:
    transfer: Transfer
    slot: int                          # LOCAL: the accumulator (a merged result)
    rows: tuple[int, int] | None       # within the slot's piece; None: the piece's own message as it is
    message: Message
    leaves: bool                       # a result: the slot is emptied, its buffer free after the wait


@dataclass(frozen=True)
class RecvOp:
    transfer: Transfer
    message: Message
    arrival: Arrival
    slot: int                          # HOLD: the slot it fills; ADD_DKV_ON: the running sum's slot
    rows: tuple[int, int]              # MERGE / ADD_*: rows of the accumulator, or within the running sum
    replaces: int | None = None        # HOLD: a slot of the same span it replaces (freed first)
    starts_sum: bool = False           # ADD_DKV_ON: the running sum starts here (zeros)


@dataclass(frozen=True)
class Post:
    """One `Comm.exchange`: one channel's sends and receives of a step."""

    channel: Channel
    sends: tuple[SendOp, ...]
    recvs: tuple[RecvOp, ...]


@dataclass(frozen=True)
class BlockOp:
    block: Block
    q_slot: int
    q_rows: tuple[int, int]            # within the q slot's piece
    kv_slot: int                       # LOCAL: this rank's own k, v
    kv_rows: tuple[int, int]           # within the kv slot's piece, or of the local shard
    mask: object                       # a `Mask`, or (Mask.TOKENS) the key of its position mask
    result_slot: int                   # LOCAL: this rank's own rows (accumulator / dq)
    result_rows: tuple[int, int]       # of the accumulator, or within the pending message
    result_start: Start
    result_message: Message | None     # the pending message's layout (not LOCAL)
    sum_slot: int = LOCAL              # backward: where dk, dv go (LOCAL: this rank's own)
    sum_rows: tuple[int, int] = (0, 0)
    sum_starts: bool = False
    sum_message: Message | None = None


@dataclass(frozen=True)
class StepProgram:
    index: int
    posts: tuple[Post, ...]
    blocks: tuple[BlockOp, ...]
    frees: tuple[int, ...]             # slots whose last reader ran in this step (after its arrivals)
    step: object                       # the plan's `Step`, for the timeline


@dataclass(frozen=True)
class Program:
    """What one rank does to run one plan on one shape."""

    rank: int
    shape: ProblemShape
    steps: tuple[StepProgram, ...]
    slots: int                         # how many slots the program numbers
    own_slot: int                      # the slot of this rank's own travelling input (q, or the gradient inputs)
    own_kv_slot: int | None            # the slot of this rank's own k, v when the plan sends them


class _Held:
    """The symbolic holdings of one rank while the plan is walked: what `Holdings` did on every call."""

    def __init__(self) -> None:
        self.pieces: dict[tuple[Payload, int], list[tuple[Span, int]]] = {}
        self.slots = 0

    def new_slot(self) -> int:
        self.slots += 1
        return self.slots - 1

    def hold(self, key, span: Span) -> tuple[int, int | None]:
        pieces = self.pieces.setdefault(key, [])
        replaced = next((slot for s, slot in pieces if s == span), None)
        if replaced is not None:
            pieces[:] = [(s, slot) for s, slot in pieces if slot != replaced]
        slot = self.new_slot()
        pieces.append((span, slot))
        return slot, replaced

    def find(self, key, span: Span, exact: bool = False) -> tuple[Span, int]:
        for held, slot in self.pieces.get(key, ()):
            if held == span or (not exact and held.contains(span)):
                return held, slot
        have = ", ".join(str(s) for s, _ in self.pieces.get(key, ())) or "nothing"
        raise RuntimeError(f"plan error: needs {key[0].value}[{key[1]}].{span} but holds {have}")

    def exact(self, key, span: Span) -> int | None:
        return next((slot for s, slot in self.pieces.get(key, ()) if s == span), None)

    def drop(self, key, slot: int) -> None:
        self.pieces[key] = [(s, x) for s, x in self.pieces[key] if x != slot]

    def release(self, key) -> list[int]:
        return [slot for _, slot in self.pieces.pop(key, ())]


def _rows_within(shape: ProblemShape, payload: Payload, span: Span, outer: Span) -> tuple[int, int]:
    length = shape.kv_seq if payload.of_keys else shape.seq_local
    first, count = span.rows(length)
    return first - outer.rows(length)[0], count


def lower(plan: Plan, rank: int, shape: ProblemShape) -> Program:
    """The program of ``rank`` for ``plan`` on ``shape`` (a forward or a backward plan)."""
    backward = plan.backward
    query = Payload.GRAD_QUERY if backward else Payload.QUERY
    partial = Payload.GRAD_PARTIAL if backward else Payload.PARTIAL
    held = _Held()
    own_slot, _ = held.hold((query, rank), ALL)
    own_kv_slot = None
    if any(t.payload is Payload.KEY_VALUE and t.src == rank == t.owner for _, t in plan.transfers()):
        own_kv_slot, _ = held.hold((Payload.KEY_VALUE, rank), ALL)
    result_sends: dict[int, list[tuple[int, Transfer]]] = {}
    for index, t in plan.transfers():
        if t.src == rank and t.payload in (partial, Payload.GRAD_KEY_VALUE):
            result_sends.setdefault(t.owner, []).append((index, t))
    last_use = _last_use(plan, rank, query)
    messages: dict[tuple[Payload, Span], Message] = {}

    def layout(payload: Payload, span: Span) -> Message:
        found = messages.get((payload, span))
        if found is None:
            found = messages[(payload, span)] = message(shape, payload, span)
        return found

    def carrier(step_index: int, payload: Payload, owner: int, span: Span) -> Span:
        for index, t in result_sends.get(owner, ()):
            if index > step_index and t.payload is payload and t.span.contains(span):
                return t.span
        raise RuntimeError(f"plan error: rank {rank} never sends the result of {payload.value}[{owner}].{span}")

    accumulating = False
    steps = []
    for step in plan.steps:
        posts = []
        for channel in (Channel.QUERY, Channel.PARTIAL):
            sends = []
            for t in step.transfers:
                if t.src != rank or t.payload.channel is not channel:
                    continue
                if t.payload is Payload.MERGED:
                    if not accumulating:
                        raise RuntimeError(f"plan error: rank {rank} sends a merged result before computing any")
                    sends.append(SendOp(t, LOCAL, t.span.rows(shape.seq_local), layout(t.payload, t.span), False))
                    continue
                key = (t.payload, t.owner)
                exact = t.payload in (Payload.PARTIAL, Payload.GRAD_PARTIAL)
                span, slot = held.find(key, t.span, exact=exact)
                leaves = t.payload in RESULTS
                if leaves:
                    held.drop(key, slot)
                rows = None if span == t.span else _rows_within(shape, t.payload, t.span, span)
                sends.append(SendOp(t, slot, rows, layout(t.payload, t.span), leaves))
            recvs = []
            for t in step.transfers:
                if t.dst != rank or t.payload.channel is not channel:
                    continue
                msg = layout(t.payload, t.span)
                if t.payload in (Payload.PARTIAL, Payload.MERGED):
                    recvs.append(RecvOp(t, msg, Arrival.MERGE, LOCAL, t.span.rows(shape.seq_local)))
                elif t.payload is Payload.GRAD_PARTIAL:
                    recvs.append(RecvOp(t, msg, Arrival.ADD_DQ, LOCAL, t.span.rows(shape.seq_local)))
                elif t.payload is Payload.GRAD_KEY_VALUE and t.owner == rank:
                    recvs.append(RecvOp(t, msg, Arrival.ADD_DKV, LOCAL, t.span.rows(shape.kv_seq)))
                elif t.payload is Payload.GRAD_KEY_VALUE:
                    recvs.append(RecvOp(t, msg, Arrival.ADD_DKV_ON, -2, (0, 0)))  # resolved after the blocks
                else:
                    recvs.append(RecvOp(t, msg, Arrival.HOLD, -2, (0, 0)))
            posts.append((channel, tuple(sends), recvs))
        blocks = []
        for block in step.blocks_of(rank):
            q_span, q_slot = held.find((query, block.q_owner), block.q_span)
            q_rows = _rows_within(shape, query, block.q_span, q_span)
            if block.kv_owner == rank:
                kv_slot, kv_rows = LOCAL, block.kv_span.rows(shape.kv_seq)
            else:
                kv_span, kv_slot = held.find((Payload.KEY_VALUE, block.kv_owner), block.kv_span)
                kv_rows = _rows_within(shape, Payload.KEY_VALUE, block.kv_span, kv_span)
            mask = block.mask
            if mask is Mask.TOKENS:
                mask = (block.q_owner, block.q_span.row_range(shape.seq_local),
                        block.kv_owner, block.kv_span.row_range(shape.kv_seq))
            fields = dict(block=block, q_slot=q_slot, q_rows=q_rows, kv_slot=kv_slot, kv_rows=kv_rows, mask=mask)
            if block.q_owner == rank:
                fields.update(result_slot=LOCAL, result_rows=block.q_span.rows(shape.seq_local),
                              result_start=Start.FOLD, result_message=None)
                accumulating = True
            else:
                span = carrier(step.index, partial, block.q_owner, block.q_span)
                pending = held.exact((partial, block.q_owner), span)
                if pending is None:
                    start = Start.PACK if span == block.q_span else Start.EMPTY
                    pending, _ = held.hold((partial, block.q_owner), span)
                else:
                    start = Start.FOLD
                fields.update(result_slot=pending, result_rows=_rows_within(shape, partial, block.q_span, span),
                              result_start=start, result_message=layout(partial, span))
            if backward and block.kv_owner != rank:
                span = carrier(step.index, Payload.GRAD_KEY_VALUE, block.kv_owner, block.kv_span)
                key = (Payload.GRAD_KEY_VALUE, block.kv_owner)
                running = held.exact(key, span)
                fields.update(sum_starts=running is None)
                if running is None:
                    running, _ = held.hold(key, span)
                fields.update(sum_slot=running, sum_message=layout(Payload.GRAD_KEY_VALUE, span),
                              sum_rows=_rows_within(shape, Payload.GRAD_KEY_VALUE, block.kv_span, span))
            elif backward:
                fields.update(sum_rows=block.kv_span.rows(shape.kv_seq))
            blocks.append(BlockOp(**fields))
        # Arrivals are folded in after the step's blocks, in order: their slots are numbered now.
        lowered_posts = []
        for channel, sends, recvs in posts:
            resolved = []
            for op in recvs:
                t = op.transfer
                if op.arrival is Arrival.HOLD:
                    slot, replaced = held.hold((t.payload, t.owner), t.span)
                    op = RecvOp(t, op.message, Arrival.HOLD, slot, (0, 0), replaced)
                elif op.arrival is Arrival.ADD_DKV_ON:
                    span = carrier(step.index, Payload.GRAD_KEY_VALUE, t.owner, t.span)
                    key = (Payload.GRAD_KEY_VALUE, t.owner)
                    running = held.exact(key, span)
                    starts = running is None
                    if starts:
                        running, _ = held.hold(key, span)
                    op = RecvOp(t, op.message, Arrival.ADD_DKV_ON, running,
                                _rows_within(shape, Payload.GRAD_KEY_VALUE, t.span, span), starts_sum=starts)
                elif op.arrival is Arrival.MERGE:
                    accumulating = True
                resolved.append(op)
            if sends or resolved:
                lowered_posts.append(Post(channel, sends, tuple(resolved)))
        frees = []
        for key in last_use.get(step.index, ()):
            frees.extend(held.release(key))
        steps.append(StepProgram(step.index, tuple(lowered_posts), tuple(blocks), tuple(frees), step))
    return Program(rank, shape, tuple(steps), held.slots, own_slot, own_kv_slot)


def _last_use(plan: Plan, rank: int, query_payload: Payload) -> dict[int, list[tuple[Payload, int]]]:
    """After which step each travelling input held by ``rank`` is last read (results go once sent)."""
    last: dict[tuple[Payload, int], int] = {}
    for step in plan.steps:
        for block in step.blocks_of(rank):
            last[(query_payload, block.q_owner)] = step.index
            if block.kv_owner != rank:
                last[(Payload.KEY_VALUE, block.kv_owner)] = step.index
        for t in step.transfers:
            if t.src == rank and t.payload not in RESULTS and t.payload is not Payload.MERGED:
                last[(t.payload, t.owner)] = max(step.index, last.get((t.payload, t.owner), -1))
    schedule: dict[int, list[tuple[Payload, int]]] = {}
    for key, index in last.items():
        schedule.setdefault(index, []).append(key)
    return schedule


def bytes_of(program: Program) -> int:
    """Bytes this rank sends over the whole program (a check against `Plan.link_bytes`)."""
    return sum(op.message.nbytes for step in program.steps for post in step.posts for op in post.sends)

