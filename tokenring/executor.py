"""Runs any `Plan`, forward or backward, on one rank.

Each step: post the step's sends and receives (one batch per channel), compute
the step's block while they are in flight, wait, then fold in what arrived.
That overlap is the algorithm. A buffer that was sent is only reused after the
step that sent it has been waited on, so a send in flight never sees its data
change, and a partial result is given back to the pool as soon as it has been
folded in.

When something listens for timelines (`tokenring.timeline`), each step's
post, block compute, wait and merges are recorded; the check is made once per
pass, and with no listener ``self.trace`` is None and nothing is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import timeline
from .interfaces import AttentionKernel, Channel, Comm, Handle, Recv, Send, accumulation_dtype
from .plan import Block, Part, Payload, Plan, ProblemShape, Step, Transfer

Key = tuple[Payload, int]  # (what, whose)

# Which dimension of each message section is the sequence.
_SEQ_DIM = {"q": 1, "dout": 1, "out": 1, "dq": 1, "k": 1, "v": 1, "lse": 2, "kv": 2, "dkv": 2}


@dataclass
class _Held:
    sections: dict[str, torch.Tensor]
    part: Part
    buffer: torch.Tensor | None = None  # the one message tensor behind the sections, if any
    pooled: bool = False                # the buffer came from the pool and goes back to it


class _BufferPool:
    """Receive and packing buffers reused across steps and calls of equal shapes."""

    def __init__(self) -> None:
        self._free: dict[tuple[tuple[int, ...], torch.dtype, torch.device], list[torch.Tensor]] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        free = self._free.get((tuple(shape), dtype, device))
        return free.pop() if free else torch.empty(shape, dtype=dtype, device=device)

    def give(self, tensor: torch.Tensor) -> None:
        self._free.setdefault((tuple(tensor.shape), tensor.dtype, tensor.device), []).append(tensor)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for free in self._free.values() for t in free)

    def keep_only_for(self, problem: object) -> None:
        """Drop the buffers of earlier problems when the problem changes, so memory stays bounded."""
        if problem != getattr(self, "_problem", None):
            self._free.clear()
            self._problem = problem


def narrow(tensor: torch.Tensor, held: Part, wanted: Part, seq_dim: int) -> torch.Tensor:
    """The ``wanted`` part of a tensor that holds the ``held`` part of a shard."""
    if held is wanted:
        return tensor
    if held is not Part.ALL:
        raise RuntimeError(f"plan error: holds the {held.value} part but needs the {wanted.value} part")
    half = tensor.shape[seq_dim] // 2
    return tensor.narrow(seq_dim, 0 if wanted is Part.FIRST else half, half)


def _narrow_sections(held: _Held, part: Part) -> dict[str, torch.Tensor]:
    return {name: narrow(t, held.part, part, _SEQ_DIM[name]) for name, t in held.sections.items()}


class Executor:
    """Executes plans for one rank of one Comm with one kernel."""

    def __init__(self, comm: Comm, kernel: AttentionKernel) -> None:
        self.comm = comm
        self.kernel = kernel
        self.pool = _BufferPool()

    def forward(self, plan: Plan, q, k, v, *, scale: float, timeout_s: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse) of this rank's queries."""
        return _ForwardRun(self, plan, q, k, v, scale).run(timeout_s)

    def backward(
        self, plan: Plan, q, k, v, out, lse, dout, *, scale: float, timeout_s: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dq, dk, dv) of this rank's shard, in the inputs' dtypes."""
        return _BackwardRun(self, plan, q, k, v, out, lse, dout, scale).run(timeout_s)


class _Run:
    """The step loop shared by both passes; subclasses say what a block and an arrival do."""

    query_payload = Payload.QUERY

    def __init__(self, executor: Executor, plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
        self.comm = executor.comm
        self.kernel = executor.kernel
        self.pool = executor.pool
        self.plan = plan
        self.rank = self.comm.rank
        self.scale = scale
        self.dtype = q.dtype
        self.device = q.device
        self.acc_dtype = accumulation_dtype(q.dtype)
        batch, seq, q_heads, head_dim = q.shape
        self.shape = ProblemShape(
            batch=batch,
            seq_local=seq,
            q_heads=q_heads,
            kv_heads=k.shape[2],
            head_dim=head_dim,
            itemsize=q.element_size(),
            acc_itemsize=torch.empty((), dtype=self.acc_dtype).element_size(),
        )
        self.pool.keep_only_for((self.shape, self.dtype, self.device))
        self.local_kv = (k, v)
        self.held: dict[Key, _Held] = {}
        self._packed_for_send: list[torch.Tensor] = []  # pooled copies, free again once their step is waited
        self.release_after = _release_schedule(plan, self.rank, self.query_payload)
        self.trace = timeline.recorder(self.rank, self.comm.world_size, plan.algorithm.value, plan.backward)
        self.step_index = 0

    def run(self, timeout_s: float):
        try:
            for step in self.plan.steps:
                self.step_index = step.index
                self._step(step, timeout_s)
            result = self.result()
        finally:
            for key in list(self.held):
                self._release(key)
        if self.trace is not None:
            self.trace.finish()
        return result

    # -- messages --------------------------------------------------------------

    def _dtype_of(self, accumulator: bool) -> torch.dtype:
        return self.acc_dtype if accumulator else self.dtype

    def _message_buffer(self, payload: Payload, part: Part) -> torch.Tensor:
        sections = self.shape.sections(payload, part)
        if len(sections) == 1:
            return self.pool.take(sections[0].shape, self._dtype_of(sections[0].accumulator), self.device)
        return self.pool.take((self.shape.payload_bytes(payload, part),), torch.uint8, self.device)

    def _unpack(self, payload: Payload, part: Part, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        spans = self.shape.section_spans(payload, part)
        if len(spans) == 1:
            return {spans[0][0].name: buffer}
        return {
            section.name: buffer[offset : offset + nbytes].view(self._dtype_of(section.accumulator)).view(section.shape)
            for section, offset, nbytes in spans
        }

    def _pack(self, payload: Payload, part: Part, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """One message holding ``tensors``; a single tensor is sent as it is."""
        if len(tensors) == 1:
            (tensor,) = tensors.values()
            return tensor.contiguous()
        buffer = self._message_buffer(payload, part)
        for name, view in self._unpack(payload, part, buffer).items():
            view.copy_(tensors[name])
        return buffer

    def _hold(self, key: Key, part: Part, buffer: torch.Tensor, pooled: bool = True) -> None:
        self._release(key)
        self.held[key] = _Held(self._unpack(key[0], part, buffer), part, buffer, pooled)

    def _release(self, key: Key) -> None:
        held = self.held.pop(key, None)
        if held is not None and held.pooled:
            assert held.buffer is not None
            self.pool.give(held.buffer)

    def _outgoing(self, t: Transfer) -> torch.Tensor:
        held = self.held[(t.payload, t.owner)]
        if held.part is t.part and held.buffer is not None:
            return held.buffer  # already one packed message
        message = self._pack(t.payload, t.part, _narrow_sections(held, t.part))
        if len(held.sections) > 1:
            self._packed_for_send.append(message)
        return message

    # -- one step --------------------------------------------------------------

    def _step(self, step: Step, timeout_s: float) -> None:
        trace = self.trace
        started = timeline.clock() if trace is not None else 0.0
        incoming = [t for t in step.transfers if t.dst == self.rank]
        outgoing = [t for t in step.transfers if t.src == self.rank]
        handles: list[Handle] = []
        received: list[tuple[Transfer, torch.Tensor]] = []
        sent: list[torch.Tensor] = []  # kept alive until the step's wait
        for channel in (Channel.QUERY, Channel.PARTIAL):
            sends = [Send(t.dst, self._outgoing(t)) for t in outgoing if t.payload.channel is channel]
            recvs = []
            for t in incoming:
                if t.payload.channel is channel:
                    buffer = self._message_buffer(t.payload, t.part)
                    received.append((t, buffer))
                    recvs.append(Recv(t.src, buffer))
            if sends or recvs:
                sent.extend(s.tensor for s in sends)
                handles.append(self.comm.exchange(sends, recvs, channel=channel, step=step.index))
        if trace is not None and handles:
            trace.add(
                timeline.POST, step.index, started,
                sends={t.dst: t.payload.value for t in outgoing},
                recvs={t.src: t.payload.value for t in incoming},
                bytes_out=sum(s.numel() * s.element_size() for s in sent),
                bytes_in=sum(b.numel() * b.element_size() for _, b in received),
            )

        block = step.block_of(self.rank)
        if block is not None:
            self._compute(block)

        if trace is not None:
            waited = timeline.clock()
        for handle in handles:
            handle.wait(timeout_s)
        if trace is not None and handles:
            trace.add(timeline.WAIT, step.index, waited)
            merged = timeline.clock()
        for buffer in self._packed_for_send:
            self.pool.give(buffer)
        self._packed_for_send.clear()
        for t, buffer in received:
            self._arrive(t, buffer)
        if trace is not None and received:
            trace.add(timeline.MERGE, step.index, merged, arrived=[t.payload.value for t, _ in received])
        for key in self.release_after.get(step.index, ()):
            self._release(key)

    def _key_value(self, owner: int, part: Part) -> tuple[torch.Tensor, torch.Tensor]:
        if owner == self.rank:
            k, v = self.local_kv
            return narrow(k, Part.ALL, part, 1), narrow(v, Part.ALL, part, 1)
        kv = _narrow_sections(self.held[(Payload.KEY_VALUE, owner)], part)["kv"]
        return kv[0], kv[1]

    def _add_into(self, accumulator: torch.Tensor, part: Part, value: torch.Tensor, seq_dim: int) -> None:
        narrow(accumulator, Part.ALL, part, seq_dim).add_(value)

    def _compute(self, block: Block) -> None:
        raise NotImplementedError

    def _arrive(self, t: Transfer, buffer: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self):
        raise NotImplementedError


class _ForwardRun(_Run):
    def __init__(self, executor, plan, q, k, v, scale):
        super().__init__(executor, plan, q, k, v, scale)
        self.held[(Payload.QUERY, self.rank)] = _Held({"q": q}, Part.ALL)
        if any(t.payload is Payload.KEY_VALUE and t.src == self.rank for _, t in plan.transfers()):
            self.held[(Payload.KEY_VALUE, self.rank)] = _Held({"kv": torch.stack((k, v))}, Part.ALL)
        self.acc_out: torch.Tensor | None = None
        self.acc_lse: torch.Tensor | None = None
        self.q_shape = q.shape

    def _accumulate(self, out: torch.Tensor, lse: torch.Tensor, part: Part) -> None:
        from .merge import merge_partial_

        if self.acc_out is None:
            if part is Part.ALL:  # the first contribution covers every row: take it as is
                self.acc_out = out.to(self.acc_dtype, copy=True)
                self.acc_lse = lse.to(self.acc_dtype, copy=True)
                return
            self.acc_out = torch.zeros(self.q_shape, dtype=self.acc_dtype, device=self.device)
            self.acc_lse = torch.full(
                (self.shape.batch, self.shape.q_heads, self.shape.seq_local),
                float("-inf"),
                dtype=self.acc_dtype,
                device=self.device,
            )
        assert self.acc_lse is not None
        merge_partial_(narrow(self.acc_out, Part.ALL, part, 1), narrow(self.acc_lse, Part.ALL, part, 2), out, lse)

    def _compute(self, block: Block) -> None:
        q = _narrow_sections(self.held[(Payload.QUERY, block.q_owner)], block.q_part)["q"]
        k, v = self._key_value(block.kv_owner, block.kv_part)
        started = timeline.clock() if self.trace is not None else 0.0
        out, lse = self.kernel.forward(q, k, v, scale=self.scale, mask=block.mask)
        if self.trace is not None:
            self.trace.add(timeline.COMPUTE, self.step_index, started, q_owner=block.q_owner, kv_owner=block.kv_owner)
            started = timeline.clock()
        if block.q_owner == self.rank:
            self._accumulate(out, lse, block.q_part)
        else:
            packed = self._pack(Payload.PARTIAL, block.q_part, {"out": out, "lse": lse})
            self._hold((Payload.PARTIAL, block.q_owner), block.q_part, packed)
        if self.trace is not None:
            self.trace.add(timeline.MERGE, self.step_index, started, local=block.q_owner == self.rank)

    def _arrive(self, t: Transfer, buffer: torch.Tensor) -> None:
        if t.payload is Payload.PARTIAL:
            sections = self._unpack(t.payload, t.part, buffer)
            self._accumulate(sections["out"], sections["lse"], t.part)
            self.pool.give(buffer)
        else:
            self._hold((t.payload, t.owner), t.part, buffer)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.acc_out is None or self.acc_lse is None:
            raise RuntimeError(f"plan error: rank {self.rank} received no result for its queries")
        return self.acc_out.to(self.dtype), self.acc_lse


class _BackwardRun(_Run):
    query_payload = Payload.GRAD_QUERY

    def __init__(self, executor, plan, q, k, v, out, lse, dout, scale):
        super().__init__(executor, plan, q, k, v, scale)
        self.input_dtypes = (q.dtype, k.dtype, v.dtype)
        mine = {"q": q, "dout": dout, "out": out, "lse": lse}
        self.held[(Payload.GRAD_QUERY, self.rank)] = _Held(mine, Part.ALL)
        if any(t.payload is Payload.KEY_VALUE and t.src == self.rank for _, t in plan.transfers()):
            self.held[(Payload.KEY_VALUE, self.rank)] = _Held({"kv": torch.stack((k, v))}, Part.ALL)
        self.dq = torch.zeros(q.shape, dtype=self.acc_dtype, device=self.device)
        self.dk = torch.zeros(k.shape, dtype=self.acc_dtype, device=self.device)
        self.dv = torch.zeros(v.shape, dtype=self.acc_dtype, device=self.device)

    def _compute(self, block: Block) -> None:
        mine = _narrow_sections(self.held[(Payload.GRAD_QUERY, block.q_owner)], block.q_part)
        k, v = self._key_value(block.kv_owner, block.kv_part)
        started = timeline.clock() if self.trace is not None else 0.0
        dq, dk, dv = self.kernel.backward(
            mine["dout"], mine["q"], k, v, mine["out"], mine["lse"], scale=self.scale, mask=block.mask
        )
        if self.trace is not None:
            self.trace.add(timeline.COMPUTE, self.step_index, started, q_owner=block.q_owner, kv_owner=block.kv_owner)
        if block.q_owner == self.rank:
            self._add_into(self.dq, block.q_part, dq, 1)
        else:
            self._hold((Payload.GRAD_PARTIAL, block.q_owner), block.q_part, dq.contiguous(), pooled=False)
        if block.kv_owner == self.rank:
            self._add_into(self.dk, block.kv_part, dk, 1)
            self._add_into(self.dv, block.kv_part, dv, 1)
        else:
            travelling = self._travelling_grad_kv(block.kv_owner)
            self._add_into(travelling[0], block.kv_part, dk, 1)
            self._add_into(travelling[1], block.kv_part, dv, 1)

    def _travelling_grad_kv(self, owner: int) -> torch.Tensor:
        """The running sum of dk/dv for ``owner``'s keys, held here on its way home."""
        key = (Payload.GRAD_KEY_VALUE, owner)
        if key not in self.held:
            buffer = self._message_buffer(Payload.GRAD_KEY_VALUE, Part.ALL).zero_()
            self._hold(key, Part.ALL, buffer)
        return self.held[key].sections["dkv"]

    def _arrive(self, t: Transfer, buffer: torch.Tensor) -> None:
        if t.payload is Payload.GRAD_PARTIAL:
            self._add_into(self.dq, t.part, buffer, 1)
            self.pool.give(buffer)
        elif t.payload is Payload.GRAD_KEY_VALUE:
            if t.owner == self.rank:
                self._add_into(self.dk, t.part, buffer[0], 1)
                self._add_into(self.dv, t.part, buffer[1], 1)
            else:
                self._add_into(self._travelling_grad_kv(t.owner), t.part, buffer, 2)
            self.pool.give(buffer)
        else:
            self._hold((t.payload, t.owner), t.part, buffer)

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q_dtype, k_dtype, v_dtype = self.input_dtypes
        return self.dq.to(q_dtype), self.dk.to(k_dtype), self.dv.to(v_dtype)


def _release_schedule(plan: Plan, rank: int, query_payload: Payload) -> dict[int, list[Key]]:
    """After which step each travelling tensor held by ``rank`` is last used."""
    last_use: dict[Key, int] = {}
    for step in plan.steps:
        block = step.block_of(rank)
        if block is not None:
            if block.q_owner != rank:
                last_use[(query_payload, block.q_owner)] = step.index
            if block.kv_owner != rank:
                last_use[(Payload.KEY_VALUE, block.kv_owner)] = step.index
        for t in step.transfers:
            if t.src == rank:
                last_use[(t.payload, t.owner)] = step.index
    schedule: dict[int, list[Key]] = {}
    for key, index in last_use.items():
        schedule.setdefault(index, []).append(key)
    return schedule
