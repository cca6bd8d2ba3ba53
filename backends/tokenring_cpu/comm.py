"""Point-to-point messaging over a torch.distributed gloo group.

gloo keeps one TCP connection per pair of ranks, and a pair sending to each
other at once over that one connection gets about half the rate each way
(measured: benchmarks/gloo_duplex.py). TokenRing sends both ways over a pair
at some steps (queries to r+1 while partials come back from r+1), so each
direction of a pair gets a connection of its own: messages from the lower
rank to the higher travel in one subgroup, the others in a second one.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from tokenring.kit import RollCall, all_gather_bytes, transport_errors, transport_message, wait_works
from tokenring.interfaces import BackendError, Channel, Comm, CommTimeout, Handle
from tokenring.runtime.executors import timeout_s as default_timeout_s

_CHANNEL_TAGS = {Channel.QUERY: 0, Channel.PARTIAL: 1}


def _tag(step: int, channel: Channel) -> int:
    # One tag per (step, channel): the two channels never share a message queue.
    return step * len(_CHANNEL_TAGS) + _CHANNEL_TAGS[channel]


class _GlooHandle(Handle):
    def __init__(self, works, labels, tensors, where: str):
        self._works = works
        self._labels = labels    # per work, the peer it talks to
        self._tensors = tensors  # keep sent/received tensors alive until complete
        self._where = where

    def wait(self, timeout_s: float) -> None:
        wait_works(self._works, timeout_s, self._where, self._labels)
        self._works = []
        self._tensors = []


class GlooComm(Comm):
    """Asynchronous isend/irecv to any peer of a gloo group; channels are tag spaces, directions subgroups."""

    accepts_short_messages = True  # gloo fills the start of a larger receive buffer (and aborts on a longer message)

    def __init__(self, group=None) -> None:
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise BackendError(
                "backend 'cpu': torch.distributed is not initialized; call "
                "torch.distributed.init_process_group('gloo', ...) on every rank first"
            )
        group = group if group is not None else dist.group.WORLD
        backend_name = str(dist.get_backend(group))
        if "gloo" not in backend_name:
            raise BackendError(
                f"backend 'cpu' needs a gloo process group, got {backend_name!r}; "
                "create one with torch.distributed.new_group(backend='gloo')"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = torch.device("cpu")
        self._upward, self._downward = group, group
        if self.world_size > 1:
            self._upward, self._downward = self._direction_groups(group)

    def _direction_groups(self, group):
        """Two subgroups over the same ranks, made by every member at once, within the call timeout."""
        seconds = default_timeout_s()
        ranks = dist.get_process_group_ranks(group)
        roll = RollCall("connect", group)
        roll.arrive()
        try:
            # Only this group's members take part in making these: they are the ones calling.
            return tuple(
                dist.new_group(ranks, backend="gloo", timeout=datetime.timedelta(seconds=seconds),
                               use_local_synchronization=True)
                for _ in range(2)
            )
        except Exception as error:
            raise CommTimeout(
                f"rank {self.rank}: setting up the cpu backend's connections: not every rank of the group "
                f"took part within {seconds:.1f} s: {roll.describe_absent()} (did every rank call "
                f"token_ring_attn?); the transport said: {transport_message(error)}"
            ) from error

    def _direction(self, src: int, dst: int):
        """The subgroup carrying messages from group rank ``src`` to ``dst``."""
        return self._upward if src < dst else self._downward

    def exchange(self, sends, recvs, *, channel, step):
        tag = _tag(step, channel)
        where = f"rank {self.rank}, step {step}, {Channel(channel).value} channel"
        works, labels, tensors = [], [], []
        for send in sends:
            tensor = send.tensor if send.tensor.is_contiguous() else send.tensor.contiguous()
            label = f"sending to rank {send.peer}"
            with transport_errors(f"{where}, {label}"):
                works.append(dist.isend(tensor, group=self._direction(self.rank, send.peer), group_dst=send.peer,
                                        tag=tag))
            labels.append(label)
            tensors.append(tensor)
            self._record_sent(step, send.peer, tensor.numel() * tensor.element_size())
        for recv in recvs:
            if not recv.tensor.is_contiguous():
                raise ValueError("receive buffers must be contiguous for gloo")
            label = f"receiving from rank {recv.peer}"
            with transport_errors(f"{where}, {label}"):
                works.append(dist.irecv(recv.tensor, group=self._direction(recv.peer, self.rank),
                                        group_src=recv.peer, tag=tag))
            labels.append(label)
            tensors.append(recv.tensor)
        return _GlooHandle(works, labels, tensors, where)

    def all_gather_bytes(self, payload: bytes, *, timeout_s: float) -> list[bytes]:
        return all_gather_bytes(
            payload, group=self.group, world_size=self.world_size, timeout_s=timeout_s,
            where=f"rank {self.rank}, agreement check",
        )
