"""Messages over gloo: one batched call per exchange, one process group per channel.

Keeping each channel in its own process group means query traffic and
partial results never share a message queue, so neither waits behind the
other. Creating the groups is collective: every rank builds this Comm at the
same point (TokenRing does so on the first call with a given group).
"""

from __future__ import annotations

import datetime
import time

import torch
import torch.distributed as dist

from tokenring import BackendError, Channel, Comm, CommTimeout, Handle


class _BatchHandle(Handle):
    def __init__(self, works, tensors, where: str):
        self._works = works
        self._tensors = tensors  # alive until the transport is done with them
        self._where = where

    def wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for work in self._works:
            _wait(work, max(deadline - time.monotonic(), 0.001), self._where)
        self._works, self._tensors = [], []


def _wait(work, timeout_s: float, where: str) -> None:
    try:
        work.wait(datetime.timedelta(seconds=timeout_s))
    except RuntimeError as error:
        if "timed out" in str(error).lower():
            raise CommTimeout(f"{where}: no answer from a peer within {timeout_s:.1f} s") from error
        raise


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
        works = dist.batch_isend_irecv(ops) if ops else []
        return _BatchHandle(works, tensors, f"rank {self.rank}, step {step}, {Channel(channel).value} channel")

    def all_gather_bytes(self, payload: bytes, *, timeout_s: float) -> list[bytes]:
        where = f"rank {self.rank}, agreement check"
        lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        _wait(dist.all_gather(lengths, torch.tensor([len(payload)]), group=self._parent, async_op=True), timeout_s, where)
        longest = max(int(n) for n in lengths)
        mine = torch.zeros(longest, dtype=torch.uint8)
        mine[: len(payload)] = torch.tensor(list(payload), dtype=torch.uint8)
        gathered = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)]
        _wait(dist.all_gather(gathered, mine, group=self._parent, async_op=True), timeout_s, where)
        return [bytes(t[: int(n)].tolist()) for t, n in zip(gathered, lengths)]
