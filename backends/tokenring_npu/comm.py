"""Point-to-point messaging over an HCCL process group (torch_npu).

Two transport rules that HCCL users report, and that this Comm enforces so the
scheduler never has to know them:

* a batch of point-to-point operations must not hold several sends to the
  same peer (nor, symmetrically, several receives from one peer): every send
  of a batch for one peer is coalesced into ONE message (its bytes in batch
  order), and the receiver, which posts the matching receives in the same
  order, takes that one message into a staging buffer and splits it;
* a sent tensor must start at storage offset 0 and be dense: a view (such as
  the second half of a shard) is copied first. Receives into such views go
  through a staging buffer too.

The executor already packs a step's (out, lse) for one peer into a single
buffer, so on TokenRing's and Ring's plans the coalescing is normally a no-op;
it is what makes the Comm correct for any caller of the Comm contract.

HCCL ignores tags, so messages between two ranks match in the order they are
posted; every rank posts a step's QUERY batch before its PARTIAL batch, so the
order agrees on both sides. Gloo honours tags, which lets the tests run this
very code over gloo on a CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from tokenring.kit import RollCall, all_gather_bytes, transport_errors, transport_message, wait_works
from tokenring.interfaces import BackendError, Channel, Comm, CommTimeout, Handle, Recv, Send, TokenRingError
from tokenring.runtime.executors import timeout_s as default_timeout_s

BLOCKING_WAIT_ENV = "TOKENRING_NPU_BLOCKING_WAIT"

_CHANNEL_TAGS = {Channel.QUERY: 0, Channel.PARTIAL: 1}


def _tag(step: int, channel: Channel) -> int:
    return step * len(_CHANNEL_TAGS) + _CHANNEL_TAGS[channel]


def _sendable(tensor: torch.Tensor) -> torch.Tensor:
    """A dense tensor at storage offset 0 holding ``tensor``'s values."""
    if tensor.is_contiguous() and tensor.storage_offset() == 0:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a dense tensor (viewing as a narrower dtype is always allowed)."""
    return tensor.reshape(-1).view(torch.uint8)


@dataclass
class WireMessage:
    """One message on the wire: to or from ``peer``, and the tensors it carries."""

    peer: int
    buffer: torch.Tensor              # uint8, dense, storage offset 0: both ends post the same count and type
    parts: list[torch.Tensor]         # the caller's tensors, in batch order
    in_place: bool = False            # a receive whose buffer is the caller's tensor itself


def _by_peer(operations: Sequence[Send] | Sequence[Recv]) -> dict[int, list[torch.Tensor]]:
    """Each peer's tensors in batch order; peers in order of first appearance."""
    by_peer: dict[int, list[torch.Tensor]] = {}
    for op in operations:
        by_peer.setdefault(op.peer, []).append(op.tensor)
    return by_peer


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def coalesce_sends(sends: Sequence[Send]) -> list[WireMessage]:
    """One message per peer, in order of each peer's first send."""
    messages = []
    for peer, tensors in _by_peer(sends).items():
        if len(tensors) == 1:
            messages.append(WireMessage(peer, _as_bytes(_sendable(tensors[0])), tensors))
            continue
        buffer = torch.empty(_nbytes(tensors), dtype=torch.uint8, device=tensors[0].device)
        offset = 0
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            buffer[offset : offset + nbytes].copy_(_as_bytes(t.contiguous()))
            offset += nbytes
        messages.append(WireMessage(peer, buffer, tensors))
    return messages


def coalesce_recvs(recvs: Sequence[Recv]) -> list[WireMessage]:
    """One message per peer; receive straight into the caller's tensor where the rules allow."""
    messages = []
    for peer, tensors in _by_peer(recvs).items():
        if len(tensors) == 1 and tensors[0].is_contiguous() and tensors[0].storage_offset() == 0:
            messages.append(WireMessage(peer, _as_bytes(tensors[0]), tensors, in_place=True))
        else:
            staging = torch.empty(_nbytes(tensors), dtype=torch.uint8, device=tensors[0].device)
            messages.append(WireMessage(peer, staging, tensors))
    return messages


def scatter_received(message: WireMessage) -> None:
    """Copy a staged message into the caller's receive tensors (no-op when received in place)."""
    if message.in_place:
        return
    staged = message.buffer
    offset = 0
    for t in message.parts:
        nbytes = t.numel() * t.element_size()
        piece = staged[offset : offset + nbytes]
        if t.is_contiguous():
            _as_bytes(t).copy_(piece)
        else:
            # A uint8 slice may not be aligned for a wider dtype: copy it out first.
            t.copy_(piece.clone().view(t.dtype).view(t.shape))
        offset += nbytes


class _BatchHandle(Handle):
    def __init__(self, works, sent: list[WireMessage], received: list[WireMessage], where: str, blocking: bool):
        self._works = works
        self._sent = sent            # keeps send buffers alive until the batch completes
        self._received = received
        self._where = where
        self._blocking = blocking

    def wait(self, timeout_s: float) -> None:
        if self._blocking:
            wait_works(self._works, timeout_s, self._where)
        else:
            for work in self._works:
                try:
                    work.wait()  # HCCL: the current stream waits for the batch; the host goes on
                except RuntimeError as error:
                    raise TokenRingError(f"{self._where}: communication failed: {error}") from error
        # On an NPU, wait() orders the current stream after the transfer, so
        # these copies see the received bytes.
        for message in self._received:
            scatter_received(message)
        self._works, self._sent, self._received = [], [], []


class BatchedP2PComm(Comm):
    """Comm over ``torch.distributed.batch_isend_irecv`` with one message per peer and batch.

    ``expected_backend`` names the torch.distributed backend the group must
    use ("hccl" for `HcclComm`; the tests use "gloo"); ``device`` is where
    staging buffers live. The agreement gathers over a gloo group on the
    host, so it never waits for the device.

    Waits. By default a wait only orders the current stream after the batch
    and the host goes on, as the CUDA Comm does; a silent peer is then caught
    by HCCL's own timeout. ``TOKENRING_NPU_BLOCKING_WAIT=1`` (or
    ``blocking_wait=True``) makes every wait block the host up to the call's
    timeout and raise `CommTimeout`. On a CPU (gloo) the host blocks anyway,
    so there waits are always bounded.
    """

    backend_label = "npu"

    def __init__(self, group=None, *, expected_backend: str, device: torch.device,
                 batch_isend_irecv: Callable = dist.batch_isend_irecv, blocking_wait: bool | None = None) -> None:
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise BackendError(
                f"backend {self.backend_label!r}: torch.distributed is not initialized; call "
                f"torch.distributed.init_process_group({expected_backend!r}, ...) on every rank first"
            )
        group = group if group is not None else dist.group.WORLD
        backend_name = str(dist.get_backend(group))
        if expected_backend not in backend_name:
            raise BackendError(
                f"backend {self.backend_label!r} needs a {expected_backend} process group, got {backend_name!r}; "
                f"create one with torch.distributed.new_group(backend={expected_backend!r})"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = torch.device(device)
        self._batch_isend_irecv = batch_isend_irecv
        if blocking_wait is None:
            blocking_wait = self.device.type == "cpu" or os.environ.get(BLOCKING_WAIT_ENV, "").strip() not in ("", "0")
        self.blocking_wait = blocking_wait
        self._agreement_group = group if "gloo" in backend_name else self._host_group(group)

    def _host_group(self, group):
        """A gloo group over the same ranks, for the agreement's few bytes of host data."""
        if dist.get_world_size(group) == 1:
            return group
        seconds = default_timeout_s()
        try:
            return dist.new_group(dist.get_process_group_ranks(group), backend="gloo", use_local_synchronization=True,
                                  timeout=datetime.timedelta(seconds=seconds))
        except Exception as error:
            raise CommTimeout(
                f"rank {self.rank}: creating the {self.backend_label} backend's agreement group: not every rank of "
                f"the group took part within {seconds:.1f} s: {roll.describe_absent()} ({transport_message(error)})"
            ) from error

    def exchange(self, sends, recvs, *, channel, step):
        for message, what in [(m, "send to") for m in sends] + [(m, "receive from") for m in recvs]:
            if not 0 <= message.peer < self.world_size or message.peer == self.rank:
                raise ValueError(
                    f"rank {self.rank}, step {step}: cannot {what} peer {message.peer} in a group of {self.world_size}"
                )
        tag = _tag(step, channel)
        outgoing = coalesce_sends(sends)
        incoming = coalesce_recvs(recvs)
        ops = [dist.P2POp(dist.isend, m.buffer, group=self.group, group_peer=m.peer, tag=tag) for m in outgoing]
        ops += [dist.P2POp(dist.irecv, m.buffer, group=self.group, group_peer=m.peer, tag=tag) for m in incoming]
        for m in outgoing:
            self._record_sent(step, m.peer, m.buffer.numel() * m.buffer.element_size())
        peers = sorted({m.peer for m in outgoing} | {m.peer for m in incoming})
        where = (f"rank {self.rank}, step {step}, {Channel(channel).value} channel, exchanging with "
                 + ", ".join(f"rank {p}" for p in peers))
        with transport_errors(where):  # a peer gone shows up here too, as our error
            works = self._batch_isend_irecv(ops) if ops else []
        return _BatchHandle(works or [], outgoing, incoming, where, self.blocking_wait)

    def all_gather_bytes(self, payload: bytes, *, timeout_s: float) -> list[bytes]:
        return all_gather_bytes(
            payload, group=self._agreement_group, world_size=self.world_size, timeout_s=timeout_s,
            where=f"rank {self.rank}, agreement check",
        )


class HcclComm(BatchedP2PComm):
    """The NPU backend's Comm: an HCCL group, staging on this process's current NPU."""

    def __init__(self, group=None) -> None:
        import torch_npu  # noqa: F401  (registers torch.npu and the "hccl" backend)

        super().__init__(group, expected_backend="hccl", device=torch.device("npu", torch.npu.current_device()))
