"""Messages over gloo: one batched call per exchange, one process group per channel.

Keeping each channel in its own process group means query traffic and
partial results never share a message queue, so neither waits behind the
other. Creating the groups is collective: every rank builds this Comm at the
same point (TokenRing does so on the first call with a given group).

Waiting with a timeout and the agreement gather come from the backend kit
(`tokenring.kit`), which turns a timed-out wait into `CommTimeout` naming
the rank and step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tokenring import BackendError, Channel, Comm, Handle
from tokenring.kit import all_gather_bytes, transport_errors, wait_works


class _BatchHandle(Handle):
    def __init__(self, works, tensors, where: str):
        self._works = works
        self._tensors = tensors  # alive until the transport is done with them
        self._where = where

    def wait(self, timeout_s: float) -> None:
        wait_works(self._works, timeout_s, self._where)
        self._works, self._tensors = [], []


class BatchedGlooComm(Comm):
    def __init__(self, group=None) -> None:
        super().__init__()
        if not dist.is_initialized():
            raise BackendError("backend 'template-cpu': call torch.distributed.init_process_group('gloo') first")
        parent = group if group is not None else dist.group.WORLD
        ranks = dist.get_process_group_ranks(parent)
        self.rank = dist.get_rank(parent)
        self.world_size = len(ranks)
        self.device = torch.device("cpu")
        self._global_ranks = ranks
        self._groups = {channel: dist.new_group(ranks, backend="gloo") for channel in (Channel.QUERY, Channel.PARTIAL)}
        self._parent = parent

    def exchange(self, sends, recvs, *, channel, step):
        group = self._groups[Channel(channel)]
        ops, tensors = [], []
        for send in sends:
            tensor = send.tensor.contiguous()  # gloo sends contiguous memory only
            ops.append(dist.P2POp(dist.isend, tensor, self._global_ranks[send.peer], group=group, tag=step))
            tensors.append(tensor)
            self._record_sent(step, send.peer, tensor.numel() * tensor.element_size())
        for recv in recvs:
            ops.append(dist.P2POp(dist.irecv, recv.tensor, self._global_ranks[recv.peer], group=group, tag=step))
            tensors.append(recv.tensor)
        peers = sorted({s.peer for s in sends} | {r.peer for r in recvs})
        where = (f"rank {self.rank}, step {step}, {Channel(channel).value} channel, exchanging with "
                 + ", ".join(f"rank {p}" for p in peers))
        # A transport failure while posting (a peer gone, say) must surface as a TokenRing error too.
        with transport_errors(where):
            works = dist.batch_isend_irecv(ops) if ops else []
        return _BatchHandle(works, tensors, where)

    def all_gather_bytes(self, payload: bytes, *, timeout_s: float) -> list[bytes]:
        return all_gather_bytes(
            payload, group=self._parent, world_size=self.world_size, timeout_s=timeout_s,
            where=f"rank {self.rank}, agreement check",
        )
