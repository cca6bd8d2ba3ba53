"""Runs any `Plan` on one rank.

Each step: post the step's sends and receives (one batch per channel), compute
the step's block while they are in flight, wait, then fold in what arrived.
That overlap is the algorithm. A buffer that was sent is only reused after the
step that sent it has been waited on, so a send in flight never sees its data
change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .interfaces import AttentionKernel, Channel, Comm, Handle, Recv, Send
from .merge import merge_partial_
from .plan import Block, Part, Payload, Plan, ProblemShape, Step, Transfer

Key = tuple[Payload, int]  # (what, whose)


@dataclass
class _Held:
    tensor: torch.Tensor
    part: Part
    pooled: bool  # came from the buffer pool, goes back to it when released


class _BufferPool:
    """Receive buffers reused across steps (and across calls with equal shapes)."""

    def __init__(self) -> None:
        self._free: dict[tuple[tuple[int, ...], torch.dtype, torch.device], list[torch.Tensor]] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        free = self._free.get((shape, dtype, device))
        return free.pop() if free else torch.empty(shape, dtype=dtype, device=device)

    def give(self, tensor: torch.Tensor) -> None:
        self._free.setdefault((tuple(tensor.shape), tensor.dtype, tensor.device), []).append(tensor)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class Executor:
    """Executes plans for one rank of one Comm with one kernel."""

    def __init__(self, comm: Comm, kernel: AttentionKernel) -> None:
        self.comm = comm
        self.kernel = kernel
        self._pool = _BufferPool()

    def run(
        self,
        plan: Plan,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        timeout_s: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        run = _Run(self, plan, q, k, v, scale)
        for step in plan.steps:
            run.step(step, timeout_s)
        return run.result()


class _Run:
    def __init__(self, executor: Executor, plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
        self.comm = executor.comm
        self.kernel = executor.kernel
        self.pool = executor._pool
        self.plan = plan
        self.rank = self.comm.rank
        self.scale = scale
        self.q = q
        self.dtype = q.dtype
        self.device = q.device
        acc_dtype = accumulation_dtype(q.dtype)
        batch, seq, q_heads, head_dim = q.shape
        self.shape = ProblemShape(
            batch=batch,
            seq_local=seq,
            q_heads=q_heads,
            kv_heads=k.shape[2],
            head_dim=head_dim,
            itemsize=q.element_size(),
            lse_itemsize=torch.empty((), dtype=acc_dtype).element_size(),
        )
        self.acc_dtype = acc_dtype
        self.acc_out: torch.Tensor | None = None
        self.acc_lse: torch.Tensor | None = None
        self.held: dict[Key, _Held] = {(Payload.QUERY, self.rank): _Held(q, Part.ALL, pooled=False)}
        self.local_kv = (k, v)
        self.release_after = _release_schedule(plan, self.rank)

    # -- tensors by part ---------------------------------------------------

    @staticmethod
    def _narrow(tensor: torch.Tensor, held: Part, wanted: Part, seq_dim: int) -> torch.Tensor:
        if held is wanted:
            return tensor
        if held is not Part.ALL:
            raise RuntimeError(f"plan error: holds {held.value} but needs {wanted.value}")
        half = tensor.shape[seq_dim] // 2
        return tensor.narrow(seq_dim, 0 if wanted is Part.FIRST else half, half)

    def _key_value(self, owner: int, part: Part) -> tuple[torch.Tensor, torch.Tensor]:
        if owner == self.rank:
            k, v = self.local_kv
            return self._narrow(k, Part.ALL, part, 1), self._narrow(v, Part.ALL, part, 1)
        held = self.held[(Payload.KEY_VALUE, owner)]
        packed = self._narrow(held.tensor, held.part, part, 2)
        return packed[0], packed[1]

    def _query(self, owner: int, part: Part) -> torch.Tensor:
        held = self.held[(Payload.QUERY, owner)]
        return self._narrow(held.tensor, held.part, part, 1)

    def _outgoing(self, t: Transfer) -> torch.Tensor:
        if t.payload is Payload.KEY_VALUE and t.owner == self.rank and (Payload.KEY_VALUE, t.owner) not in self.held:
            k, v = self.local_kv
            self.held[(Payload.KEY_VALUE, t.owner)] = _Held(torch.stack((k, v)), Part.ALL, pooled=False)
        held = self.held[(t.payload, t.owner)]
        if t.payload is Payload.PARTIAL:
            return held.tensor
        return self._narrow(held.tensor, held.part, t.part, 2 if t.payload is Payload.KEY_VALUE else 1).contiguous()

    def _receive_buffer(self, t: Transfer) -> torch.Tensor:
        s = self.shape
        length = s.part_len(t.part)
        if t.payload is Payload.QUERY:
            return self.pool.take((s.batch, length, s.q_heads, s.head_dim), self.dtype, self.device)
        if t.payload is Payload.KEY_VALUE:
            return self.pool.take((2, s.batch, length, s.kv_heads, s.head_dim), self.dtype, self.device)
        return self.pool.take((s.payload_bytes(Payload.PARTIAL, t.part),), torch.uint8, self.device)

    # -- partial results -----------------------------------------------------

    def _pack_partial(self, out: torch.Tensor, lse: torch.Tensor, part: Part) -> torch.Tensor:
        out_bytes, lse_bytes = self.shape.partial_sections(part)
        packed = self.pool.take((out_bytes + lse_bytes,), torch.uint8, self.device)
        out_view, lse_view = self._partial_views(packed, part)
        out_view.copy_(out)
        lse_view.copy_(lse)
        return packed

    def _partial_views(self, packed: torch.Tensor, part: Part) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.shape
        length = s.part_len(part)
        out_bytes, _ = self.shape.partial_sections(part)
        out_numel = s.batch * length * s.q_heads * s.head_dim
        out_view = packed[: out_numel * s.itemsize].view(self.dtype).view(s.batch, length, s.q_heads, s.head_dim)
        lse_view = packed[out_bytes:].view(self.acc_dtype).view(s.batch, s.q_heads, length)
        return out_view, lse_view

    def _accumulate(self, out: torch.Tensor, lse: torch.Tensor, part: Part) -> None:
        if self.acc_out is None:
            if part is Part.ALL:  # first contribution covers everything: take it as is
                self.acc_out = out.to(self.acc_dtype, copy=True)
                self.acc_lse = lse.to(self.acc_dtype, copy=True)
                return
            self.acc_out = torch.zeros(self.q.shape, dtype=self.acc_dtype, device=self.device)
            self.acc_lse = torch.full(
                (self.shape.batch, self.shape.q_heads, self.shape.seq_local),
                float("-inf"),
                dtype=self.acc_dtype,
                device=self.device,
            )
        assert self.acc_lse is not None
        acc_out = self._narrow(self.acc_out, Part.ALL, part, 1)
        acc_lse = self._narrow(self.acc_lse, Part.ALL, part, 2)
        merge_partial_(acc_out, acc_lse, out, lse)

    # -- one step ------------------------------------------------------------

    def step(self, step: Step, timeout_s: float) -> None:
        incoming = [t for t in step.transfers if t.dst == self.rank]
        outgoing = [t for t in step.transfers if t.src == self.rank]
        handles: list[Handle] = []
        received: list[tuple[Transfer, torch.Tensor]] = []
        for channel in (Channel.QUERY, Channel.PARTIAL):
            sends = [Send(t.dst, self._outgoing(t)) for t in outgoing if t.payload.channel is channel]
            recvs = []
            for t in incoming:
                if t.payload.channel is channel:
                    buffer = self._receive_buffer(t)
                    received.append((t, buffer))
                    recvs.append(Recv(t.src, buffer))
            if sends or recvs:
                handles.append(self.comm.exchange(sends, recvs, channel=channel, step=step.index))

        block = step.block_of(self.rank)
        if block is not None:
            self._compute(block)

        for handle in handles:
            handle.wait(timeout_s)

        for t, buffer in received:
            if t.payload is Payload.PARTIAL:
                self._accumulate(*self._partial_views(buffer, t.part), t.part)
                self.pool.give(buffer)
            else:
                self._release((t.payload, t.owner))
                self.held[(t.payload, t.owner)] = _Held(buffer, t.part, pooled=True)
        for key in self.release_after.get(step.index, ()):
            self._release(key)

    def _compute(self, block: Block) -> None:
        q = self._query(block.q_owner, block.q_part)
        k, v = self._key_value(block.kv_owner, block.kv_part)
        out, lse = self.kernel.forward(q, k, v, scale=self.scale, mask=block.mask)
        if block.q_owner == self.rank:
            self._accumulate(out, lse, block.q_part)
        else:
            packed = self._pack_partial(out, lse, block.q_part)
            self.held[(Payload.PARTIAL, block.q_owner)] = _Held(packed, block.q_part, pooled=True)

    def _release(self, key: Key) -> None:
        held = self.held.pop(key, None)
        if held is not None and held.pooled:
            self.pool.give(held.tensor)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        for key in list(self.held):
            if key[1] != self.rank:
                self._release(key)
        self.held.clear()
        if self.acc_out is None or self.acc_lse is None:
            raise RuntimeError(f"plan error: rank {self.rank} received no result for its queries")
        return self.acc_out.to(self.dtype), self.acc_lse


def _release_schedule(plan: Plan, rank: int) -> dict[int, list[Key]]:
    """After which step each travelling tensor held by ``rank`` is last used."""
    last_use: dict[Key, int] = {}
    for step in plan.steps:
        block = step.block_of(rank)
        if block is not None:
            if block.q_owner != rank:
                last_use[(Payload.QUERY, block.q_owner)] = step.index
            if block.kv_owner != rank:
                last_use[(Payload.KEY_VALUE, block.kv_owner)] = step.index
        for t in step.transfers:
            if t.src == rank:
                last_use[(t.payload, t.owner)] = step.index
    schedule: dict[int, list[Key]] = {}
    for key, index in last_use.items():
        schedule.setdefault(index, []).append(key)
    return schedule
