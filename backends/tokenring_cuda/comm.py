"""Point-to-point messaging over NCCL, one communicator (and so one CUDA stream) per channel.

`NcclComm` creates, once, over the ranks of the group it is given:

* a process group per `Channel`, so that travelling queries and returning
  partial results are separate NCCL communicators whose kernels run on
  separate streams, concurrently, as in the original implementation;
* a small gloo group for `all_gather_bytes` (agreement checks on a few
  bytes of CPU data, bounded by a timeout, before any GPU traffic).

Each `exchange` posts one ``batch_isend_irecv`` on its channel's group.
NCCL orders it after the work already queued on the current (compute)
stream, and `_NcclHandle.wait` makes the compute stream wait for the batch
(``work.wait()`` records an event on the NCCL stream and makes the current
stream wait on it): the host never blocks inside the step loop.

Timeouts. A host that never blocks cannot raise at ``timeout_s`` itself, so
by default a peer that stops answering is caught by NCCL's watchdog after
the group's timeout (``TOKENRING_TIMEOUT_S`` when the Comm was created,
300 s by default), which then, per ``TORCH_NCCL_ASYNC_ERROR_HANDLING``,
tears the process down (torch's default) or aborts the communicator and
raises on the next wait (``=2``). With ``TOKENRING_CUDA_BLOCKING_WAIT=1``
every wait blocks the host instead, up to ``timeout_s``, and raises
`CommTimeout` naming the rank, step and channel: exact, but without
overlap across steps. Creating the groups is itself bounded by the timeout
and raises `CommTimeout` when a rank does not take part.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from tokenring.kit import RollCall, all_gather_bytes, is_timeout, transport_errors, transport_message, wait_works
from tokenring.interfaces import BackendError, Channel, Comm, CommTimeout, Handle, TokenRingError
from tokenring.runtime.executors import timeout_s as default_timeout_s

BLOCKING_WAIT_ENV = "TOKENRING_CUDA_BLOCKING_WAIT"


def _blocking_wait_requested() -> bool:
    return os.environ.get(BLOCKING_WAIT_ENV, "").strip() not in ("", "0")


class _NcclHandle(Handle):
    def __init__(self, works, tensors, comm: "NcclComm", step: int, channel: Channel, peers: str = ""):
        self._works = works
        self._tensors = tensors  # keep the batch's tensors referenced until it is waited on
        self._comm = comm
        self._step = step
        self._channel = channel
        self._peers = peers  # "exchanging with rank 1, rank 3"

    def wait(self, timeout_s: float) -> None:
        where = f"rank {self._comm.rank}, step {self._step}, {self._channel.value} channel"
        if self._peers:
            where += f", {self._peers}"
        if self._comm.blocking_wait:
            wait_works(self._works, timeout_s, where)
        else:
            for work in self._works:
                try:
                    work.wait()  # NCCL: the current stream waits for the batch; the host goes on
                except RuntimeError as error:  # an earlier failure the watchdog recorded
                    raise TokenRingError(f"{where}: communication failed: {transport_message(error)}") from error
        self._works = []
        self._tensors = []


class NcclComm(Comm):
    """Batched isend/irecv to any peer; each channel on its own communicator.

    ``transport`` is the torch.distributed backend of the per-channel groups:
    "nccl" in use; the CPU tests pass "gloo" to exercise everything else
    (group creation, peers, byte counts, ordering, agreement) without a GPU.
    """

    def __init__(
        self,
        group=None,
        *,
        transport: str = "nccl",
        timeout_s: float | None = None,
        blocking_wait: bool | None = None,
    ) -> None:
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise BackendError(
                "backend 'cuda': torch.distributed is not initialized; call "
                "torch.distributed.init_process_group('nccl', ...) on every rank first"
            )
        group = group if group is not None else dist.group.WORLD
        self.group = group
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise BackendError("backend 'cuda': this process is not a member of the group it was given")
        self.world_size = dist.get_world_size(group)
        self.transport = transport
        self.blocking_wait = _blocking_wait_requested() if blocking_wait is None else blocking_wait
        self.timeout_s = default_timeout_s() if timeout_s is None else timeout_s
        self.device = self._claim_device(group) if transport == "nccl" else torch.device("cpu")
        self._global_ranks = dist.get_process_group_ranks(group)
        self._channel_groups: dict[Channel, object] = {}
        self._agreement_group = None
        if self.world_size > 1:
            self._create_groups()

    def _claim_device(self, group) -> torch.device:
        """The rank's GPU, made current before any NCCL call (NCCL binds a communicator to it)."""
        bound = getattr(group, "bound_device_id", None)  # init_process_group(device_id=...)
        device = bound if bound is not None else torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        return device

    def _create_groups(self) -> None:
        timeout = datetime.timedelta(seconds=self.timeout_s)
        roll = RollCall("connect", self.group)
        roll.arrive()
        try:
            # Every member creates these in the same order; only the members take
            # part (local synchronisation), so a subgroup works as well as the world.
            for channel in (Channel.QUERY, Channel.PARTIAL):
                self._channel_groups[channel] = dist.new_group(
                    self._global_ranks, timeout=timeout, backend=self.transport, use_local_synchronization=True
                )
            self._agreement_group = dist.new_group(
                self._global_ranks, timeout=timeout, backend="gloo", use_local_synchronization=True
            )
        except Exception as error:
            if is_timeout(error):
                raise CommTimeout(
                    f"rank {self.rank}: creating the cuda backend's process groups: not every rank of the "
                    f"group took part within {self.timeout_s:.1f} s: {roll.describe_absent()} "
                    f"({transport_message(error)})"
                ) from error
            raise TokenRingError(
                f"rank {self.rank}: creating the cuda backend's process groups failed: {transport_message(error)}"
            ) from error
        # Point-to-point batches must not be a communicator's first operation
        # unless every rank is in them; one tiny collective per channel sets
        # the communicators up here, outside the step loop.
        for channel_group in self._channel_groups.values():
            dist.all_reduce(torch.zeros(1, device=self.device), group=channel_group)

    def exchange(self, sends, recvs, *, channel, step):
        channel = Channel(channel)
        if not sends and not recvs:
            return _NcclHandle([], [], self, step, channel)
        if self.world_size == 1:
            raise TokenRingError(f"rank 0, step {step}: a group of one rank has no peer to exchange with")
        group = self._channel_groups[channel]
        ops, tensors = [], []
        for send in sends:
            tensor = send.tensor if send.tensor.is_contiguous() else send.tensor.contiguous()
            self._check(tensor, "send", send.peer, step)
            ops.append(dist.P2POp(dist.isend, tensor, self._global_ranks[send.peer], group))
            tensors.append(tensor)
            self._record_sent(step, send.peer, tensor.numel() * tensor.element_size())
        for recv in recvs:
            if not recv.tensor.is_contiguous():
                raise ValueError(f"rank {self.rank}, step {step}: receive buffers must be contiguous")
            self._check(recv.tensor, "receive", recv.peer, step)
            ops.append(dist.P2POp(dist.irecv, recv.tensor, self._global_ranks[recv.peer], group))
            tensors.append(recv.tensor)
        peers = sorted({s.peer for s in sends} | {r.peer for r in recvs})
        with_peers = "exchanging with " + ", ".join(f"rank {p}" for p in peers)
        with transport_errors(f"rank {self.rank}, step {step}, {channel.value} channel, {with_peers}"):
            works = dist.batch_isend_irecv(ops)
        return _NcclHandle([w for w in works if w is not None], tensors, self, step, channel, with_peers)

    def _check(self, tensor: torch.Tensor, what: str, peer: int, step: int) -> None:
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise ValueError(f"rank {self.rank}, step {step}: cannot {what} peer {peer} in a group of {self.world_size}")
        if tensor.device != self.device:
            raise BackendError(
                f"rank {self.rank}, step {step}: a tensor to {what} is on {tensor.device}, but this rank's "
                f"communicators are on {self.device}; call torch.cuda.set_device(local_rank) before the first "
                "token_ring_attn call and keep q, k and v on that device"
            )

    def all_gather_bytes(self, payload: bytes, *, timeout_s: float) -> list[bytes]:
        return all_gather_bytes(
            payload, group=self._agreement_group, world_size=self.world_size, timeout_s=timeout_s,
            where=f"rank {self.rank}, agreement check",
        )
