"""Runs any `Plan`, forward or backward, on one rank.

A plan is first lowered, once per (plan, rank, shape), into this rank's
program (`tokenring.runtime.program`): numbered slots for every piece it will hold,
integer rows for every span, and per step the posts, the blocks and the
arrivals. The loop below only reads it. Each step: post the step's sends and
receives (one batch per channel), compute the step's blocks while they are
in flight, wait, fold in what arrived, and free what no later step reads.
That overlap is the algorithm. What happened when is told to a
`tokenring.runtime.timeline` recorder, which does nothing when nobody listens.
"""

from __future__ import annotations

import torch

from tokenring.runtime import timeline
from tokenring.runtime.agreement import AgreedCall, Agreement, PeerAborted, is_marker, marker_tensor, markers_readable
from tokenring.runtime.buffers import BufferPool
from tokenring.runtime.finite import poison_of, poisoned, witness
from tokenring.interfaces import AttentionKernel, Comm, Handle, Mask, Recv, Send, accumulation_dtype
from tokenring.placement.masks import cached_position_mask
from tokenring.runtime.merge import merge_partial_
from tokenring.plan.model import Plan, ProblemShape
from tokenring.runtime.program import LOCAL, Arrival, BlockOp, Message, Program, RecvOp, SendOp, Start, StepProgram, lower

_PROGRAMS_KEPT = 64  # per executor: programs of the plans and shapes in use (a model has a few)


class Executor:
    """Executes plans for one rank of one Comm with one kernel."""

    def __init__(self, comm: Comm, kernel: AttentionKernel) -> None:
        self.comm = comm
        self.kernel = kernel
        self.pool = BufferPool()
        self.agreement = Agreement()  # what the ranks of this comm last agreed on (tokenring.runtime.agreement)
        self.auto_choice = None  # the last algorithm="auto" choice on this comm (tokenring.planner.choose.Choice)
        # Keyed by the plan's identity (the plan is kept in the value, so the id stays its own): hashing a
        # plan would read all of it on every call.
        self._programs: dict[tuple[int, ProblemShape], tuple[Plan, Program]] = {}
        self._masks: dict[tuple[int, torch.device], tuple[Plan, dict]] = {}

    def program(self, plan: Plan, shape: ProblemShape) -> Program:
        """This rank's program for ``plan`` on ``shape``, lowered on first use."""
        key = (id(plan), shape)
        found = self._programs.get(key)
        if found is not None and found[0] is plan:
            return found[1]
        if len(self._programs) >= _PROGRAMS_KEPT:
            self._programs.clear()
        program = lower(plan, self.comm.rank, shape)
        self._programs[key] = (plan, program)
        return program

    def masks_for(self, plan: Plan, device: torch.device):
        """The position masks of ``plan``'s token-masked blocks on ``device``, made on first use."""
        key = (id(plan), device)
        found = self._masks.get(key)
        if found is None or found[0] is not plan:
            if len(self._masks) >= _PROGRAMS_KEPT:
                self._masks.clear()
            found = self._masks[key] = (plan, {})
        made = found[1]

        def mask(spec):
            got = made.get(spec)
            if got is None:
                q_owner, q_rows, kv_owner, kv_rows = spec
                assert plan.tokens is not None
                got = made[spec] = cached_position_mask(plan.tokens, q_owner, q_rows, kv_owner, kv_rows, device)
            return got

        return mask

    def forward(self, plan: Plan, q, k, v, *, scale: float, timeout_s: float,
                kv_poison: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse) of this rank's queries; NaN wherever a non-finite q, k or v reaches (`tokenring.runtime.finite`).

        ``kv_poison``: the poison of k and v when the caller already knows it (a KV cache keeps it as
        rows are appended, `tokenring.runtime.finite.poison_of`), so the whole cache is not read again.

        Raises `PeerAborted` when a peer sent a marker instead of a message
        (see `tokenring.runtime.agreement`), after playing the rest of the plan with markers.
        """
        if plan.causal and plan.tokens is None and k.shape[1] != q.shape[1]:
            # The kernel aligns a causal mask to each block's bottom-right corner; spans of shards of
            # different lengths would place it elsewhere than the plan's proof assumes.
            raise ValueError(f"a causal plan needs keys/values as long as the queries per rank, got "
                             f"{k.shape[1]} and {q.shape[1]}")
        program = self.program(plan, problem_shape(q, k))
        return _ForwardRun(self, program, plan, q, k, v, scale, kv_poison).run(timeout_s)

    def stop_agreed_call(self, call: AgreedCall, *, timeout_s: float) -> None:
        """Play ``call``'s plan with markers, so that peers running it stop and join the agreement."""
        play_markers(self.comm, self.program(call.plan, call.shape), call.dtype, self.comm.device, timeout_s)

    def backward(
        self, plan: Plan, q, k, v, out, lse, dout, *, scale: float, timeout_s: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dq, dk, dv) of this rank's shard, in the inputs' dtypes."""
        program = self.program(plan, problem_shape(q, k))
        return _BackwardRun(self, program, plan, q, k, v, out, lse, dout, scale).run(timeout_s)


def problem_shape(q: torch.Tensor, k: torch.Tensor) -> ProblemShape:
    """The per-rank sizes of a call with these shards."""
    batch, seq, q_heads, head_dim = q.shape
    return ProblemShape(
        batch=batch, seq_local=seq, q_heads=q_heads, kv_heads=k.shape[2], head_dim=head_dim,
        itemsize=q.element_size(), acc_itemsize=torch.empty((), dtype=accumulation_dtype(q.dtype)).element_size(),
        kv_len=k.shape[1],
    )


def _wait_all(handles: list[Handle], timeout_s: float) -> None:
    for handle in handles:
        handle.wait(timeout_s)


class _Piece:
    """What a slot holds: the sections of one piece, and the pooled message behind them, if any."""

    __slots__ = ("sections", "buffer")

    def __init__(self, sections: dict[str, torch.Tensor], buffer: torch.Tensor | None = None) -> None:
        self.sections, self.buffer = sections, buffer


class _Run:
    """One pass of one program: the step loop, with what a block and an arrival do left to the pass."""

    def __init__(self, executor: Executor, program: Program, plan: Plan, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.comm, self.kernel, self.program, self.plan = executor.comm, executor.kernel, program, plan
        self.rank = self.comm.rank
        self.dtype, self.device = dtype, device
        self.acc_dtype = accumulation_dtype(dtype)
        self.pool = executor.pool
        # Forward and backward of one schedule and shape share buffers; another schedule starts afresh.
        self.pool.keep_only_for((program.shape, dtype, device, plan.algorithm))
        self.slots: list[_Piece | None] = [None] * program.slots
        self.in_flight: list[torch.Tensor] = []  # pooled buffers of this step's sends: free after the wait
        self._sent: list[torch.Tensor] = []       # the step's send tensors, kept alive until the wait
        self.masks = executor.masks_for(plan, device)
        self.trace = timeline.recorder(self.rank, self.comm.world_size, plan.algorithm, plan.backward)
        self.step_index = 0

    # -- the loop -----------------------------------------------------------------

    def run(self, timeout_s: float):
        failed = True
        try:
            for number, step in enumerate(self.program.steps):
                self.step_index = step.index
                handles, received = self._post(step)
                for op in step.blocks:
                    self._compute(op)
                self._wait(handles, timeout_s)
                stopped = _marker_in(received, self.rank, step.index) if self.watch_markers else None
                if stopped is not None:
                    play_markers(self.comm, self.program, self.dtype, self.device, timeout_s, first_step=number + 1)
                    raise stopped
                if received:
                    merged = self.trace.clock()
                    for op, buffer in received:
                        self._arrive(op, buffer)
                    self.trace.merged(step.index, merged, [(op.transfer, b) for op, b in received])
                for slot in step.frees:
                    self._free(slot)
            result = self.result()
            failed = False
        finally:
            self._release_all(failed)
        self.trace.finish()
        return result

    def _post(self, step: StepProgram) -> tuple[list[Handle], list[tuple[RecvOp, torch.Tensor]]]:
        """Hand the step's sends and receives to the Comm, one batch per channel."""
        started = self.trace.clock()
        handles, received, sent = [], [], []
        for post in step.posts:
            sends = [Send(op.transfer.dst, self._outgoing(op)) for op in post.sends]
            recvs = []
            for op in post.recvs:
                buffer = self._take(op.message)
                received.append((op, buffer))
                recvs.append(Recv(op.transfer.src, buffer))
            sent.extend(s.tensor for s in sends)
            handles.append(self.comm.exchange(sends, recvs, channel=post.channel, step=step.index))
        if handles:
            self.trace.posted(step.step, self.rank, started, sent, [b for _, b in received])
        self._sent = sent
        return handles, received

    def _wait(self, handles: list[Handle], timeout_s: float) -> None:
        started = self.trace.clock()
        for handle in handles:
            handle.wait(timeout_s)
        if handles:
            self.trace.add(timeline.WAIT, self.step_index, started)
        for buffer in self.in_flight:
            self.pool.give(buffer)
        self.in_flight.clear()
        self._sent = []

    # -- buffers --------------------------------------------------------------------

    def _take(self, message: Message) -> torch.Tensor:
        if message.packed:
            return self.pool.take((message.nbytes,), torch.uint8, self.device)
        _, shape, accumulator, _, _, _ = message.sections[0]
        return self.pool.take(shape, self.acc_dtype if accumulator else self.dtype, self.device)

    def _views(self, message: Message, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        if not message.packed:
            return {message.sections[0][0]: buffer}
        return {name: buffer[offset:offset + nbytes].view(self.acc_dtype if acc else self.dtype).view(shape)
                for name, shape, acc, _, offset, nbytes in message.sections}

    def _hold_message(self, slot: int, message: Message, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        sections = self._views(message, buffer)
        self.slots[slot] = _Piece(sections, buffer)
        return sections

    def _free(self, slot: int) -> None:
        piece = self.slots[slot]
        if piece is not None:
            self.slots[slot] = None
            if piece.buffer is not None:
                self.pool.give(piece.buffer)

    def _release_all(self, failed: bool) -> None:
        """After a failure a send may still be reading any buffer: none goes back, and the pool starts afresh."""
        if failed:
            self.slots = []
            self.in_flight.clear()
            self.pool.clear()
            return
        for slot in range(len(self.slots)):
            self._free(slot)

    def _outgoing(self, op: SendOp) -> torch.Tensor:
        """The message tensor of a send: a held piece's own buffer, or packed from its rows."""
        if op.slot == LOCAL:
            tensors = self._accumulated(op.rows)
        else:
            piece = self.slots[op.slot]
            if piece is None:
                raise RuntimeError(f"plan error: rank {self.rank} sends {op.transfer} before holding it")
            if op.leaves:  # a result leaves as it is now; its buffer is free once the send is waited on
                self.slots[op.slot] = None
                if piece.buffer is not None:
                    self.in_flight.append(piece.buffer)
            if op.rows is None and piece.buffer is not None:
                return piece.buffer
            tensors = _rows_of(piece.sections, op.rows, op.message)
        if not op.message.packed:
            (tensor,) = tensors.values()
            return tensor.contiguous()
        buffer = self._take(op.message)
        for name, view in self._views(op.message, buffer).items():
            view.copy_(tensors[name])
        self.in_flight.append(buffer)
        return buffer

    def _kv(self, op: BlockOp) -> tuple[torch.Tensor, torch.Tensor]:
        offset, count = op.kv_rows
        if op.kv_slot == LOCAL:
            k, v = self.local_kv
            if count == k.shape[1]:
                return k, v
            return k.narrow(1, offset, count), v.narrow(1, offset, count)
        kv = self.slots[op.kv_slot].sections["kv"]  # type: ignore[union-attr]
        if count != kv.shape[2]:
            kv = kv.narrow(2, offset, count)
        return kv[0], kv[1]

    def _mask(self, op: BlockOp):
        return op.mask if isinstance(op.mask, Mask) else self.masks(op.mask)

    def _accumulated(self, rows):
        raise NotImplementedError

    def _compute(self, op: BlockOp) -> None:
        raise NotImplementedError

    def _arrive(self, op: RecvOp, buffer: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self):
        raise NotImplementedError


def _rows_of(sections: dict[str, torch.Tensor], rows: tuple[int, int] | None,
             message: Message) -> dict[str, torch.Tensor]:
    """``rows`` of a piece's sections, each narrowed along its own sequence dimension (None: all of it)."""
    if rows is None:
        return sections
    offset, count = rows
    return {name: sections[name].narrow(seq_dim, offset, count) for name, _, _, seq_dim, _, _ in message.sections}


def _marker_in(received, rank: int, step: int) -> PeerAborted | None:
    """Whether a peer stopped the call: a marker arrived in place of a message (host buffers only)."""
    for op, buffer in received:
        if is_marker(buffer):
            return PeerAborted(rank, op.transfer.src, step)
    return None


def play_markers(comm: Comm, program: Program, dtype: torch.dtype, device: torch.device, timeout_s: float,
                 first_step: int = 0) -> None:
    """A marker in place of each send of the program from ``first_step`` on; receives of the plan's sizes.

    A rank that stops a call (or found a marker) plays the rest of the agreed plan this way, so that every
    peer's posted receive completes and finds the marker (`tokenring.runtime.agreement`).
    """
    marker = marker_tensor(device)
    acc_dtype = accumulation_dtype(dtype)
    for step in program.steps[first_step:]:
        handles = []
        for post in step.posts:
            recvs = []
            for op in post.recvs:
                if op.message.packed:
                    buffer = torch.empty((op.message.nbytes,), dtype=torch.uint8, device=device)
                else:
                    _, shape, accumulator, _, _, _ = op.message.sections[0]
                    buffer = torch.empty(shape, dtype=acc_dtype if accumulator else dtype, device=device)
                recvs.append(Recv(op.transfer.src, buffer))
            sends = [Send(op.transfer.dst, marker) for op in post.sends]
            handles.append(comm.exchange(sends, recvs, channel=post.channel, step=step.index))
        _wait_all(handles, timeout_s)


class _ForwardRun(_Run):
    def __init__(self, executor, program, plan, q, k, v, scale, kv_poison=None):
        super().__init__(executor, program, plan, q.dtype, q.device)
        self.scale = scale
        # A NaN or infinity in q, k or v never comes out finite, whatever the kernel does with it: its
        # poison is added to the partial results past the kernel (tokenring.runtime.finite).
        self.query_poison = poison_of(q)
        self.kv_poison = poison_of(k) + poison_of(v) if kv_poison is None else kv_poison
        self.local_kv = (k, v)
        self.slots[program.own_slot] = _Piece({"q": q})
        if program.own_kv_slot is not None:
            # Keys leave with their and the values' poison added in the copy that packs them (tokenring.runtime.finite).
            kv = torch.empty((2, *k.shape), dtype=k.dtype, device=k.device)
            poisoned(k, self.kv_poison, out=kv[0])
            kv[1].copy_(v)
            self.slots[program.own_kv_slot] = _Piece({"kv": kv})
        # Only the forward is stopped by markers: the backward runs a call the ranks already agreed on.
        self.watch_markers = markers_readable(self.comm)
        self.acc_out: torch.Tensor | None = None
        self.acc_lse: torch.Tensor | None = None
        self.q_shape = q.shape

    def _start_accumulator(self) -> None:
        """Every row as seeing nothing yet (out 0, lse -inf), or NaN when this rank's q is not finite."""
        shape = self.program.shape
        lse_shape = (shape.batch, shape.q_heads, shape.seq_local)
        poison = self.query_poison.to(self.acc_dtype)
        self.acc_out = poison.expand(self.q_shape).contiguous()
        self.acc_lse = (poison + float("-inf")).expand(lse_shape).contiguous()

    def _accumulate(self, out, lse, rows: tuple[int, int], poison: torch.Tensor | None) -> None:
        """Fold a partial of ``rows`` in; ``poison`` is its keys/values' (None: the sender added it)."""
        if self.acc_out is None:
            if rows[1] == self.program.shape.seq_local:  # it covers every row: take it as is, q's poison added
                poison = self.query_poison if poison is None else poison + self.query_poison
                self.acc_out = poisoned(out, poison, dtype=self.acc_dtype)
                self.acc_lse = poisoned(lse, poison, dtype=self.acc_dtype)
                return
            self._start_accumulator()
        offset, count = rows
        merge_partial_(self.acc_out.narrow(1, offset, count), self.acc_lse.narrow(2, offset, count), out,
                       lse if poison is None else lse + poison)

    def _accumulated(self, rows):
        # Replicated queries: this rank's result so far, as it stood when the step began.
        offset, count = rows
        return {"out": self.acc_out.narrow(1, offset, count), "lse": self.acc_lse.narrow(2, offset, count)}

    def _compute(self, op: BlockOp) -> None:
        q = self.slots[op.q_slot].sections["q"]
        if op.q_rows[1] != q.shape[1]:
            q = q.narrow(1, *op.q_rows)
        k, v = self._kv(op)
        started = self.trace.clock()
        out, lse = self.kernel.forward(q, k, v, scale=self.scale, mask=self._mask(op))
        merged = self.trace.computed(self.step_index, started, op.block)
        # Keys that travelled were copied with their poison added: any element tells it.
        poison = self.kv_poison if op.kv_slot == LOCAL else witness(k)
        if op.result_slot == LOCAL:
            self._accumulate(out, lse, op.result_rows, poison)
        elif op.result_start is Start.PACK:
            buffer = self._take(op.result_message)
            sections = self._hold_message(op.result_slot, op.result_message, buffer)
            poisoned(out, poison, out=sections["out"])
            poisoned(lse, poison, out=sections["lse"])
        else:  # several blocks' rows leave in one message: merge them here
            if op.result_start is Start.EMPTY:
                sections = self._hold_message(op.result_slot, op.result_message, self._take(op.result_message))
                sections["out"].zero_()
                sections["lse"].fill_(float("-inf"))
            pending = self.slots[op.result_slot].sections
            offset, count = op.result_rows
            merge_partial_(pending["out"].narrow(1, offset, count), pending["lse"].narrow(2, offset, count),
                           out, lse + poison)
        self.trace.add(timeline.MERGE, self.step_index, merged, local=op.result_slot == LOCAL)

    def _arrive(self, op: RecvOp, buffer: torch.Tensor) -> None:
        if op.arrival is Arrival.HOLD:
            if op.replaces is not None:
                self._free(op.replaces)
            self._hold_message(op.slot, op.message, buffer)
            return
        sections = self._views(op.message, buffer)
        self._accumulate(sections["out"], sections["lse"], op.rows, None)
        self.pool.give(buffer)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.acc_out is None or self.acc_lse is None:
            if self.plan.tokens is None:
                raise RuntimeError(f"plan error: rank {self.rank} received no result for its queries")
            # Under a token mask a rank of padding only sees nothing: out 0, lse -inf.
            self._start_accumulator()
        assert self.acc_out is not None and self.acc_lse is not None
        return self.acc_out.to(self.dtype), self.acc_lse


class _BackwardRun(_Run):
    watch_markers = False

    def __init__(self, executor, program, plan, q, k, v, out, lse, dout, scale):
        super().__init__(executor, program, plan, q.dtype, q.device)
        self.scale = scale
        self.local_kv = (k, v)
        self.input_dtypes = (q.dtype, k.dtype, v.dtype)
        self.slots[program.own_slot] = _Piece({"q": q, "dout": dout, "out": out, "lse": lse})
        if program.own_kv_slot is not None:
            self.slots[program.own_kv_slot] = _Piece({"kv": torch.stack((k, v))})
        self.dq = torch.zeros(q.shape, dtype=self.acc_dtype, device=self.device)
        self.dk = torch.zeros(k.shape, dtype=self.acc_dtype, device=self.device)
        self.dv = torch.zeros(v.shape, dtype=self.acc_dtype, device=self.device)

    def _compute(self, op: BlockOp) -> None:
        mine = self.slots[op.q_slot].sections
        if op.q_rows[1] != mine["q"].shape[1]:
            offset, count = op.q_rows
            mine = {"q": mine["q"].narrow(1, offset, count), "dout": mine["dout"].narrow(1, offset, count),
                    "out": mine["out"].narrow(1, offset, count), "lse": mine["lse"].narrow(2, offset, count)}
        k, v = self._kv(op)
        started = self.trace.clock()
        dq, dk, dv = self.kernel.backward(
            mine["dout"], mine["q"], k, v, mine["out"], mine["lse"], scale=self.scale, mask=self._mask(op)
        )
        self.trace.computed(self.step_index, started, op.block)
        offset, count = op.result_rows
        if op.result_slot == LOCAL:
            self.dq.narrow(1, offset, count).add_(dq)
        elif op.result_start is Start.PACK:
            self.slots[op.result_slot] = _Piece({"dq": dq.contiguous()})
        else:
            if op.result_start is Start.EMPTY:
                self._hold_message(op.result_slot, op.result_message, self._take(op.result_message))["dq"].zero_()
            self.slots[op.result_slot].sections["dq"].narrow(1, offset, count).add_(dq)
        offset, count = op.sum_rows
        if op.sum_slot == LOCAL:
            self.dk.narrow(1, offset, count).add_(dk)
            self.dv.narrow(1, offset, count).add_(dv)
        else:
            running = self._running_sum(op.sum_slot, op.sum_message, op.sum_starts).narrow(2, offset, count)
            running[0].add_(dk)
            running[1].add_(dv)

    def _running_sum(self, slot: int, message: Message, starts: bool) -> torch.Tensor:
        """The dk/dv sum held here for another owner's keys, on its way home (zeros where it starts)."""
        if starts:
            self._hold_message(slot, message, self._take(message))["dkv"].zero_()
        return self.slots[slot].sections["dkv"]

    def _arrive(self, op: RecvOp, buffer: torch.Tensor) -> None:
        offset, count = op.rows
        if op.arrival is Arrival.HOLD:
            if op.replaces is not None:
                self._free(op.replaces)
            self._hold_message(op.slot, op.message, buffer)
            return
        if op.arrival is Arrival.ADD_DQ:
            self.dq.narrow(1, offset, count).add_(buffer)
        elif op.arrival is Arrival.ADD_DKV:
            self.dk.narrow(1, offset, count).add_(buffer[0])
            self.dv.narrow(1, offset, count).add_(buffer[1])
        else:
            self._running_sum(op.slot, op.message, op.starts_sum).narrow(2, offset, count).add_(buffer)
        self.pool.give(buffer)

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q_dtype, k_dtype, v_dtype = self.input_dtypes
        return self.dq.to(q_dtype), self.dk.to(k_dtype), self.dv.to(v_dtype)
