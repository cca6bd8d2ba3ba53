"""N ranks as threads of one process, exchanging tensors through queues.

Runs any plan through the real executor and kernel with no process group, so
that hand-written plans (several blocks per rank per step, several messages
per pair, spans finer than halves, queries and keys of different lengths)
are executed and counted in milliseconds.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from tokenring.runtime.executor import Executor
from tokenring.interfaces import Comm, CommTimeout, Handle, LinkTraffic
from tokenring_cpu.kernel import CpuSdpaKernel


class _Mailboxes:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._boxes: dict[tuple, queue.Queue] = {}

    def box(self, key: tuple) -> queue.Queue:
        with self._lock:
            return self._boxes.setdefault(key, queue.Queue())


class _Handle(Handle):
    def __init__(self, pending, sent):
        self._pending = pending
        self._sent = sent  # (tensor handed to the Comm, its value when handed over)

    def wait(self, timeout_s: float) -> None:
        for tensor, value in self._sent:
            # A real transport may read a send buffer until this wait: changing it before is a race.
            same = torch.equal(tensor, value) or (
                tensor.is_floating_point() and torch.allclose(tensor, value, rtol=0, atol=0, equal_nan=True))
            assert same, "a send buffer changed while the send was in flight"
        for box, tensor in self._pending:
            try:
                tensor.copy_(box.get(timeout=timeout_s))
            except queue.Empty:
                raise CommTimeout("threaded world: a message never came") from None


class ThreadComm(Comm):
    device = torch.device("cpu")

    def __init__(self, rank: int, world_size: int, mail: _Mailboxes) -> None:
        super().__init__()
        self.rank, self.world_size, self._mail = rank, world_size, mail

    def exchange(self, sends, recvs, *, channel, step):
        sent = []
        for s in sends:
            self._record_sent(step, s.peer, s.tensor.numel() * s.tensor.element_size())
            value = s.tensor.clone()
            self._mail.box((self.rank, s.peer, channel, step)).put(value)
            sent.append((s.tensor, value))
        return _Handle([(self._mail.box((r.peer, self.rank, channel, step)), r.tensor) for r in recvs], sent)

    def all_gather_bytes(self, payload, *, timeout_s):
        raise AssertionError("the executor never gathers")


def run_plan(plan, shards, *, scale: float, backward_plan=None, douts=None, timeout_s: float = 30.0,
             kernel=CpuSdpaKernel):
    """Run ``plan`` on every rank: shards[r] = (q, k, v). Returns per-rank results and sent traffic.

    ``kernel``: makes each rank's `AttentionKernel` (default: the CPU backend's).
    """
    n = plan.world_size
    mail = _Mailboxes()
    comms = [ThreadComm(r, n, mail) for r in range(n)]

    def one(rank):
        executor = Executor(comms[rank], kernel())
        q, k, v = shards[rank]
        out, lse = executor.forward(plan, q, k, v, scale=scale, timeout_s=timeout_s)
        if backward_plan is None:
            return out, lse
        grads = executor.backward(backward_plan, q, k, v, out, lse, douts[rank], scale=scale, timeout_s=timeout_s)
        return (out, lse, *grads)

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    sent: list[LinkTraffic] = [m for c in comms for m in c.sent]
    return results, sent
