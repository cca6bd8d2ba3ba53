"""Runs any `Plan`, forward or backward, on one rank.

Each step: post the step's sends and receives (one batch per channel),
compute the step's blocks while they are in flight, wait, fold in what
arrived, and drop what no later step reads. That overlap is the algorithm.
The tensors a rank holds and the message buffers live in
`tokenring.buffers`; what happened when is told to a `tokenring.timeline`
recorder, which does nothing when nobody listens.
"""

from __future__ import annotations

import torch

from . import timeline
from .agreement import AgreedCall, Agreement, PeerAborted, is_marker, marker_tensor, markers_readable
from .buffers import RESULTS, BufferPool, Holdings, Key, narrow
from .finite import poison_of, poisoned, witness
from .interfaces import AttentionKernel, Channel, Comm, Handle, Mask, PositionMask, Recv, Send, accumulation_dtype
from .masks import cached_position_mask
from .merge import merge_partial_
from .plan import ALL, Block, Payload, Plan, ProblemShape, Span, Step, Transfer


class Executor:
    """Executes plans for one rank of one Comm with one kernel."""

    def __init__(self, comm: Comm, kernel: AttentionKernel) -> None:
        self.comm = comm
        self.kernel = kernel
        self.pool = BufferPool()
        self.agreement = Agreement()  # what the ranks of this comm last agreed on (tokenring.agreement)
        self.auto_choice = None  # the last algorithm="auto" choice on this comm (tokenring.planner.Choice)

    def forward(self, plan: Plan, q, k, v, *, scale: float, timeout_s: float,
                kv_poison: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse) of this rank's queries; NaN wherever a non-finite q, k or v reaches (`tokenring.finite`).

        ``kv_poison``: the poison of k and v when the caller already knows it (a KV cache keeps it as
        rows are appended, `tokenring.finite.poison_of`), so the whole cache is not read again.

        Raises `PeerAborted` when a peer sent a marker instead of a message
        (see `tokenring.agreement`), after playing the rest of the plan with markers.
        """
        return _ForwardRun(self, plan, q, k, v, scale, kv_poison).run(timeout_s)

    def stop_agreed_call(self, call: AgreedCall, *, timeout_s: float) -> None:
        """Play ``call``'s plan with markers, so that peers running it stop and join the agreement."""
        held = Holdings(self.pool, call.shape, call.dtype, accumulation_dtype(call.dtype), self.comm.device)
        try:
            for step in call.plan.steps:
                _wait_all(_post_markers(self.comm, held, step), timeout_s)
        finally:
            held.release_all(failed=True)

    def backward(
        self, plan: Plan, q, k, v, out, lse, dout, *, scale: float, timeout_s: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dq, dk, dv) of this rank's shard, in the inputs' dtypes."""
        return _BackwardRun(self, plan, q, k, v, out, lse, dout, scale).run(timeout_s)


def problem_shape(q: torch.Tensor, k: torch.Tensor) -> ProblemShape:
    """The per-rank sizes of a call with these shards."""
    batch, seq, q_heads, head_dim = q.shape
    return ProblemShape(
        batch=batch, seq_local=seq, q_heads=q_heads, kv_heads=k.shape[2], head_dim=head_dim,
        itemsize=q.element_size(), acc_itemsize=torch.empty((), dtype=accumulation_dtype(q.dtype)).element_size(),
        kv_len=k.shape[1],
    )


def _post_markers(comm: Comm, held: Holdings, step: Step) -> list[Handle]:
    """A marker in place of each of the step's sends; receives of the plan's sizes, so anything fits."""
    handles = []
    marker = marker_tensor(held.device)
    for channel in (Channel.QUERY, Channel.PARTIAL):
        sends = [Send(t.dst, marker) for t in step.transfers if t.src == comm.rank and t.payload.channel is channel]
        recvs = [Recv(t.src, held.message_buffer(t.payload, t.span)) for t in step.transfers
                 if t.dst == comm.rank and t.payload.channel is channel]
        if sends or recvs:
            handles.append(comm.exchange(sends, recvs, channel=channel, step=step.index))
    return handles


def _wait_all(handles: list[Handle], timeout_s: float) -> None:
    for handle in handles:
        handle.wait(timeout_s)


class _Exchange:
    """One step's posted messages: the handles to wait on and where each arrival lands."""

    def __init__(self) -> None:
        self.handles: list[Handle] = []
        self.received: list[tuple[Transfer, torch.Tensor]] = []
        self.sent: list[torch.Tensor] = []  # kept alive until the wait


class _Run:
    """The step loop shared by both passes; subclasses say what a block and an arrival do."""

    query_payload = Payload.QUERY

    def __init__(self, executor: Executor, plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 kv_poison: torch.Tensor | None = None):
        self.comm, self.kernel, self.plan, self.scale = executor.comm, executor.kernel, plan, scale
        self.rank = self.comm.rank
        self.dtype, self.device = q.dtype, q.device
        self.acc_dtype = accumulation_dtype(q.dtype)
        self.shape = problem_shape(q, k)
        executor.pool.keep_only_for((self.shape, self.dtype, self.device))
        self.held = Holdings(executor.pool, self.shape, self.dtype, self.acc_dtype, self.device)
        self.local_kv = (k, v)
        if plan.causal and plan.tokens is None and k.shape[1] != q.shape[1]:
            # The kernel aligns a causal mask to each block's bottom-right corner; spans of shards of
            # different lengths would place it elsewhere than the plan's proof assumes.
            raise ValueError(f"a causal plan needs keys/values as long as the queries per rank, got "
                             f"{k.shape[1]} and {q.shape[1]}")
        if any(t.payload is Payload.KEY_VALUE and t.src == self.rank == t.owner for _, t in plan.transfers()):
            # Keys leave with their and the values' poison added in the copy that packs them (tokenring.finite).
            kv = torch.empty((2, *k.shape), dtype=k.dtype, device=k.device)
            if kv_poison is None:
                kv[0].copy_(k)
            else:
                poisoned(k, kv_poison, out=kv[0])
            kv[1].copy_(v)
            self.held.hold(Payload.KEY_VALUE, self.rank, ALL, {"kv": kv})
        self.release_after = _release_schedule(plan, self.rank, self.query_payload)
        self.result_sends: dict[int, list[tuple[int, Transfer]]] = {}
        for index, t in plan.transfers():
            if t.src == self.rank and t.payload in (Payload.PARTIAL, Payload.GRAD_PARTIAL):
                self.result_sends.setdefault(t.owner, []).append((index, t))
        self.trace = timeline.recorder(self.rank, self.comm.world_size, plan.algorithm, plan.backward)
        self.step_index = 0

    def run(self, timeout_s: float):
        failed = True
        stopped: PeerAborted | None = None
        try:
            for step in self.plan.steps:
                self.step_index = step.index
                if stopped is not None:
                    _wait_all(_post_markers(self.comm, self.held, step), timeout_s)
                    continue
                exchange = self._post(step)
                for block in step.blocks_of(self.rank):
                    self._compute(block)
                self._wait(exchange, timeout_s)
                stopped = self._marker_in(exchange)
                if stopped is not None:
                    continue
                merged = self.trace.clock()
                for transfer, buffer in exchange.received:
                    self._arrive(transfer, buffer)
                self.trace.merged(step.index, merged, exchange.received)
                for key in self.release_after.get(step.index, ()):
                    self.held.release(key)
            if stopped is not None:
                raise stopped
            result = self.result()
            failed = False
        finally:
            self.held.release_all(failed)
        self.trace.finish()
        return result

    def _marker_in(self, exchange: "_Exchange") -> PeerAborted | None:
        """Whether a peer stopped the call: a marker arrived in place of a message (host buffers only)."""
        if not self.watch_markers:
            return None
        for transfer, buffer in exchange.received:
            if is_marker(buffer):
                return PeerAborted(self.rank, transfer.src, self.step_index)
        return None

    def _post(self, step: Step) -> _Exchange:
        """Hand the step's sends and receives to the Comm, one batch per channel."""
        started = self.trace.clock()
        exchange = _Exchange()
        for channel in (Channel.QUERY, Channel.PARTIAL):
            sends = [Send(t.dst, self._outgoing(t)) for t in step.transfers
                     if t.src == self.rank and t.payload.channel is channel]
            recvs = []
            for t in step.transfers:
                if t.dst == self.rank and t.payload.channel is channel:
                    buffer = self.held.message_buffer(t.payload, t.span)
                    exchange.received.append((t, buffer))
                    recvs.append(Recv(t.src, buffer))
            if sends or recvs:
                exchange.sent.extend(s.tensor for s in sends)
                exchange.handles.append(self.comm.exchange(sends, recvs, channel=channel, step=step.index))
        if exchange.handles:
            self.trace.posted(step, self.rank, started, exchange.sent, [b for _, b in exchange.received])
        return exchange

    def _outgoing(self, t: Transfer) -> torch.Tensor:
        return self.held.outgoing(t)

    def _wait(self, exchange: _Exchange, timeout_s: float) -> None:
        started = self.trace.clock()
        for handle in exchange.handles:
            handle.wait(timeout_s)
        if exchange.handles:
            self.trace.add(timeline.WAIT, self.step_index, started)
        self.held.step_waited()

    def _key_value(self, owner: int, span: Span) -> tuple[torch.Tensor, torch.Tensor]:
        if owner == self.rank:
            k, v = self.local_kv
            return narrow(k, span, 1), narrow(v, span, 1)
        kv = self.held.get(Payload.KEY_VALUE, owner, span)["kv"]
        return kv[0], kv[1]

    def _result_carrier(self, payload: Payload, block: Block) -> Span:
        """The span of the message that will take this block's result home: the next one covering its rows."""
        for index, t in self.result_sends.get(block.q_owner, ()):
            if index > self.step_index and t.payload is payload and t.span.contains(block.q_span):
                return t.span
        raise RuntimeError(f"plan error: rank {self.rank} never sends the result of {block}")

    def _empty_result(self, payload: Payload, owner: int, span: Span) -> dict[str, torch.Tensor]:
        """A held result for ``span`` of ``owner``'s rows that has seen nothing yet: out 0, lse -inf, dq 0."""
        buffer = self.held.message_buffer(payload, span)
        self.held.hold_message(payload, owner, span, buffer)
        sections = self.held.result(payload, owner, span)
        assert sections is not None
        for name, tensor in sections.items():
            tensor.fill_(float("-inf") if name == "lse" else 0.0)
        return sections

    def _kernel_mask(self, block: Block) -> "Mask | PositionMask":
        if block.mask is not Mask.TOKENS:
            return block.mask
        assert self.plan.tokens is not None
        return cached_position_mask(self.plan.tokens, block.q_owner, block.q_span.row_range(self.shape.seq_local),
                                    block.kv_owner, block.kv_span.row_range(self.shape.kv_seq), self.device)

    def _compute(self, block: Block) -> None:
        raise NotImplementedError

    def _arrive(self, t: Transfer, buffer: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self):
        raise NotImplementedError


class _ForwardRun(_Run):
    def __init__(self, executor, plan, q, k, v, scale, kv_poison=None):
        # A NaN or infinity in q, k or v never comes out finite, whatever the kernel does with it: its
        # poison is added to the partial results past the kernel (tokenring.finite).
        self.query_poison = poison_of(q)
        self.kv_poison = poison_of(k) + poison_of(v) if kv_poison is None else kv_poison
        super().__init__(executor, plan, q, k, v, scale, self.kv_poison)
        # Only the forward is stopped by markers: the backward runs a call the ranks already agreed on.
        self.watch_markers = markers_readable(self.comm)
        self.held.hold(Payload.QUERY, self.rank, ALL, {"q": q})
        self.acc_out: torch.Tensor | None = None
        self.acc_lse: torch.Tensor | None = None
        self.q_shape = q.shape

    def _start_accumulator(self) -> None:
        """Every row as seeing nothing yet (out 0, lse -inf), or NaN when this rank's q is not finite."""
        lse_shape = (self.shape.batch, self.shape.q_heads, self.shape.seq_local)
        poison = self.query_poison.to(self.acc_dtype)
        self.acc_out = poison.expand(self.q_shape).contiguous()
        self.acc_lse = (poison + float("-inf")).expand(lse_shape).contiguous()

    def _accumulate(self, out: torch.Tensor, lse: torch.Tensor, span: Span, poison: torch.Tensor | None) -> None:
        """Fold a partial of ``span``'s rows in; ``poison`` is its keys/values' (None: the sender added it)."""
        if self.acc_out is None:
            if span == ALL:  # the first contribution covers every row: take it as is, q's poison added
                poison = self.query_poison if poison is None else poison + self.query_poison
                self.acc_out = poisoned(out, poison, dtype=self.acc_dtype)
                self.acc_lse = poisoned(lse, poison, dtype=self.acc_dtype)
                return
            self._start_accumulator()
        assert self.acc_out is not None and self.acc_lse is not None
        merge_partial_(narrow(self.acc_out, span, 1), narrow(self.acc_lse, span, 2), out,
                       lse if poison is None else lse + poison)

    def _block_poison(self, block: Block, k: torch.Tensor) -> torch.Tensor:
        # Keys that travelled were copied with their poison added: any element tells it.
        return self.kv_poison if block.kv_owner == self.rank else witness(k)

    def _compute(self, block: Block) -> None:
        q = self.held.get(Payload.QUERY, block.q_owner, block.q_span)["q"]
        k, v = self._key_value(block.kv_owner, block.kv_span)
        started = self.trace.clock()
        out, lse = self.kernel.forward(q, k, v, scale=self.scale, mask=self._kernel_mask(block))
        merged = self.trace.computed(self.step_index, started, block)
        poison = self._block_poison(block, k)
        if block.q_owner == self.rank:
            self._accumulate(out, lse, block.q_span, poison)
        else:
            carrier = self._result_carrier(Payload.PARTIAL, block)
            pending = self.held.result(Payload.PARTIAL, block.q_owner, carrier)
            if pending is None and carrier == block.q_span:
                buffer = self.held.message_buffer(Payload.PARTIAL, block.q_span)
                sections = self.held.unpack(Payload.PARTIAL, block.q_span, buffer)
                poisoned(out, poison, out=sections["out"])
                poisoned(lse, poison, out=sections["lse"])
                self.held.hold_message(Payload.PARTIAL, block.q_owner, block.q_span, buffer)
            else:  # several blocks' rows leave in one message: merge them here
                if pending is None:
                    pending = self._empty_result(Payload.PARTIAL, block.q_owner, carrier)
                rows = block.q_span.within(carrier)
                merge_partial_(narrow(pending["out"], rows, 1), narrow(pending["lse"], rows, 2), out, lse + poison)
        self.trace.add(timeline.MERGE, self.step_index, merged, local=block.q_owner == self.rank)

    def _outgoing(self, t: Transfer) -> torch.Tensor:
        if t.payload is not Payload.MERGED:
            return self.held.outgoing(t)
        # Replicated queries: this rank's result so far, as it stood when the step began.
        if self.acc_out is None or self.acc_lse is None:
            raise RuntimeError(f"plan error: rank {self.rank} sends a merged result before computing any")
        return self.held.send_packed(t.payload, t.span, {"out": narrow(self.acc_out, t.span, 1),
                                                         "lse": narrow(self.acc_lse, t.span, 2)})

    def _arrive(self, t: Transfer, buffer: torch.Tensor) -> None:
        if t.payload in (Payload.PARTIAL, Payload.MERGED):
            sections = self.held.unpack(t.payload, t.span, buffer)
            self._accumulate(sections["out"], sections["lse"], t.span, None)
            self.held.pool.give(buffer)
        else:
            self.held.hold_message(t.payload, t.owner, t.span, buffer)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.acc_out is None or self.acc_lse is None:
            if self.plan.tokens is None:
                raise RuntimeError(f"plan error: rank {self.rank} received no result for its queries")
            # Under a token mask a rank of padding only sees nothing: out 0, lse -inf.
            self._start_accumulator()
        assert self.acc_out is not None and self.acc_lse is not None
        return self.acc_out.to(self.dtype), self.acc_lse


class _BackwardRun(_Run):
    query_payload = Payload.GRAD_QUERY
    watch_markers = False

    def __init__(self, executor, plan, q, k, v, out, lse, dout, scale):
        super().__init__(executor, plan, q, k, v, scale)
        self.input_dtypes = (q.dtype, k.dtype, v.dtype)
        self.held.hold(Payload.GRAD_QUERY, self.rank, ALL, {"q": q, "dout": dout, "out": out, "lse": lse})
        self.dq = torch.zeros(q.shape, dtype=self.acc_dtype, device=self.device)
        self.dk = torch.zeros(k.shape, dtype=self.acc_dtype, device=self.device)
        self.dv = torch.zeros(v.shape, dtype=self.acc_dtype, device=self.device)
        self.grad_kv_sends = [(index, t) for index, t in plan.transfers()
                              if t.payload is Payload.GRAD_KEY_VALUE and t.src == self.rank]

    def _compute(self, block: Block) -> None:
        mine = self.held.get(Payload.GRAD_QUERY, block.q_owner, block.q_span)
        k, v = self._key_value(block.kv_owner, block.kv_span)
        started = self.trace.clock()
        dq, dk, dv = self.kernel.backward(
            mine["dout"], mine["q"], k, v, mine["out"], mine["lse"], scale=self.scale, mask=self._kernel_mask(block)
        )
        self.trace.computed(self.step_index, started, block)
        if block.q_owner == self.rank:
            narrow(self.dq, block.q_span, 1).add_(dq)
        else:
            carrier = self._result_carrier(Payload.GRAD_PARTIAL, block)
            pending = self.held.result(Payload.GRAD_PARTIAL, block.q_owner, carrier)
            if pending is None and carrier == block.q_span:
                self.held.hold(Payload.GRAD_PARTIAL, block.q_owner, block.q_span, {"dq": dq.contiguous()})
            else:
                if pending is None:
                    pending = self._empty_result(Payload.GRAD_PARTIAL, block.q_owner, carrier)
                narrow(pending["dq"], block.q_span.within(carrier), 1).add_(dq)
        if block.kv_owner == self.rank:
            narrow(self.dk, block.kv_span, 1).add_(dk)
            narrow(self.dv, block.kv_span, 1).add_(dv)
        else:
            travelling = self._travelling_grad_kv(block.kv_owner, block.kv_span)
            travelling[0].add_(dk)
            travelling[1].add_(dv)

    def _travelling_grad_kv(self, owner: int, span: Span) -> torch.Tensor:
        """``span`` of the running dk/dv sum for ``owner``'s keys, held here on its way home.

        One sum per message that will carry it on (the plan's next dK/dV send
        of these rows): with keys/values in pieces a rank may hold several
        pieces of one owner at once, each only as long as its own rows.
        """
        carrier = next(t for index, t in self.grad_kv_sends
                       if index > self.step_index and t.owner == owner and t.span.contains(span))
        if self.held.result(Payload.GRAD_KEY_VALUE, owner, carrier.span) is None:
            buffer = self.held.message_buffer(Payload.GRAD_KEY_VALUE, carrier.span).zero_()
            self.held.hold_message(Payload.GRAD_KEY_VALUE, owner, carrier.span, buffer)
        whole = self.held.result(Payload.GRAD_KEY_VALUE, owner, carrier.span)["dkv"]
        return narrow(whole, span.within(carrier.span), 2)

    def _arrive(self, t: Transfer, buffer: torch.Tensor) -> None:
        if t.payload is Payload.GRAD_PARTIAL:
            narrow(self.dq, t.span, 1).add_(buffer)
            self.held.pool.give(buffer)
        elif t.payload is Payload.GRAD_KEY_VALUE:
            if t.owner == self.rank:
                narrow(self.dk, t.span, 1).add_(buffer[0])
                narrow(self.dv, t.span, 1).add_(buffer[1])
            else:
                self._travelling_grad_kv(t.owner, t.span).add_(buffer)
            self.held.pool.give(buffer)
        else:
            self.held.hold_message(t.payload, t.owner, t.span, buffer)

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q_dtype, k_dtype, v_dtype = self.input_dtypes
        return self.dq.to(q_dtype), self.dk.to(k_dtype), self.dv.to(v_dtype)


def _release_schedule(plan: Plan, rank: int, query_payload: Payload) -> dict[int, list[Key]]:
    """After which step each travelling input held by ``rank`` is last read (results go once sent)."""
    last_use: dict[Key, int] = {}
    for step in plan.steps:
        for block in step.blocks_of(rank):
            last_use[(query_payload, block.q_owner)] = step.index
            if block.kv_owner != rank:
                last_use[(Payload.KEY_VALUE, block.kv_owner)] = step.index
        for t in step.transfers:
            if t.src == rank and t.payload not in RESULTS and t.payload is not Payload.MERGED:
                last_use[(t.payload, t.owner)] = max(step.index, last_use.get((t.payload, t.owner), -1))
    schedule: dict[int, list[Key]] = {}
    for key, index in last_use.items():
        schedule.setdefault(index, []).append(key)
    return schedule
