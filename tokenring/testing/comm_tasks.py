"""Rank-side halves of the Comm contract checks, run in local worlds by the conformance suite.

Each task builds (once per process) the backend's Comm over the world group,
moves known tensors, and returns what it saw; the suite judges the answers.
Payloads are random from a seed shared by all ranks, so a receiver can
rebuild exactly what its sender sent.
"""

from __future__ import annotations

import time

import torch

from tokenring.interfaces import Channel, Comm, Recv, Send

_COMMS: dict[str, Comm] = {}


def _comm(backend_name: str) -> Comm:
    # A Comm may own communicators or streams: build one per process, not per task.
    if backend_name not in _COMMS:
        from tokenring.registry import registry

        _COMMS[backend_name] = registry.get(backend_name).create_comm(None)
    return _COMMS[backend_name]


def _payload(seed: int, src: int, tag: int, numel: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + src * 1009 + tag)
    return torch.randn(numel, generator=gen).to(device)


def _mismatches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[str]:
    return [name for name in want if not torch.equal(got[name].cpu(), want[name].cpu())]


def _sent_since(comm: Comm, start: int) -> list[dict]:
    return [t.to_json() for t in comm.sent[start:]]


def every_peer_distance(rank: int, world_size: int, backend_name: str, seed: int, timeout_s: float) -> dict:
    """For each distance d: send to rank + d, receive from rank - d (one exchange per d, step d)."""
    comm = _comm(backend_name)
    start = len(comm.sent)
    got, want = {}, {}
    for distance in range(1, world_size):
        dst, src = (rank + distance) % world_size, (rank - distance) % world_size
        numel = 64 + distance  # a different size per distance: a mixed-up message cannot fit
        outgoing = _payload(seed, rank, distance, numel, comm.device)
        incoming = torch.empty(numel, device=comm.device)
        handle = comm.exchange([Send(dst, outgoing)], [Recv(src, incoming)], channel=Channel.QUERY, step=distance)
        handle.wait(timeout_s)
        got[f"d{distance}"] = incoming
        want[f"d{distance}"] = _payload(seed, src, distance, numel, comm.device)
    return {"mismatches": _mismatches(got, want), "sent": _sent_since(comm, start)}


def two_channels_in_flight(rank: int, world_size: int, backend_name: str, seed: int, timeout_s: float) -> dict:
    """Queries go to the next rank while partials go to the previous one, same step, both posted before any wait.

    At world size 2 both messages travel between the same pair: a Comm that
    did not keep its channels apart would hand one to the other's receive.
    The partial channel is waited on first, the reverse of posting order.
    """
    comm = _comm(backend_name)
    start = len(comm.sent)
    nxt, prev = (rank + 1) % world_size, (rank - 1) % world_size
    query_out = _payload(seed, rank, 1, 96, comm.device)
    partial_out = _payload(seed, rank, 2, 96, comm.device)
    query_in = torch.empty(96, device=comm.device)
    partial_in = torch.empty(96, device=comm.device)
    query = comm.exchange([Send(nxt, query_out)], [Recv(prev, query_in)], channel=Channel.QUERY, step=0)
    partial = comm.exchange([Send(prev, partial_out)], [Recv(nxt, partial_in)], channel=Channel.PARTIAL, step=0)
    partial.wait(timeout_s)
    query.wait(timeout_s)
    want = {"query": _payload(seed, prev, 1, 96, comm.device), "partial": _payload(seed, nxt, 2, 96, comm.device)}
    return {"mismatches": _mismatches({"query": query_in, "partial": partial_in}, want), "sent": _sent_since(comm, start)}


def ordered_messages(rank: int, world_size: int, backend_name: str, seed: int, timeout_s: float) -> dict:
    """Three same-sized messages to one peer in one batch, then two more batches: all arrive in order."""
    comm = _comm(backend_name)
    start = len(comm.sent)
    nxt, prev = (rank + 1) % world_size, (rank - 1) % world_size
    got, want = {}, {}
    for step in range(3):
        tags = [10 * step + i for i in range(3)]
        sends = [Send(nxt, _payload(seed, rank, tag, 32, comm.device)) for tag in tags]
        recvs = [Recv(prev, torch.empty(32, device=comm.device)) for _ in tags]
        comm.exchange(sends, recvs, channel=Channel.QUERY, step=step).wait(timeout_s)
        for tag, recv in zip(tags, recvs):
            got[f"step{step}-message{tag % 10}"] = recv.tensor
            want[f"step{step}-message{tag % 10}"] = _payload(seed, prev, tag, 32, comm.device)
    return {"mismatches": _mismatches(got, want), "sent": _sent_since(comm, start)}


def wait_for_absent_peer(rank: int, world_size: int, backend_name: str, absent_rank: int, timeout_s: float) -> dict:
    """Rank 0 waits for a message from ``absent_rank``, which never sends; it must raise, not hang."""
    comm = _comm(backend_name)  # on every rank: building a Comm may be collective
    if rank != 0:
        return {"role": "absent" if rank == absent_rank else "bystander"}
    incoming = torch.empty(8, device=comm.device)
    started = time.monotonic()
    handle = comm.exchange([], [Recv(absent_rank, incoming)], channel=Channel.QUERY, step=0)
    try:
        handle.wait(timeout_s)
    except Exception as exc:  # the contract: any error, promptly; the suite checks which
        return {
            "role": "waiter",
            "raised": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "message": str(exc),
            "seconds": time.monotonic() - started,
        }
    return {"role": "waiter", "raised": None, "seconds": time.monotonic() - started}


def short_message(rank: int, world_size: int, backend_name: str, timeout_s: float) -> dict:
    """Rank r sends a 16-byte message to rank r + 1, which receives it into a 64-byte buffer.

    Only for a Comm that declares ``accepts_short_messages``; returns whether
    it does and, if so, whether the buffer's start holds the message.
    """
    comm = _comm(backend_name)
    if not getattr(comm, "accepts_short_messages", False):
        return {"declared": False}
    short = torch.arange(16, dtype=torch.uint8, device=comm.device) + rank
    buffer = torch.full((64,), 255, dtype=torch.uint8, device=comm.device)
    following, preceding = (rank + 1) % world_size, (rank - 1) % world_size
    comm.exchange([Send(following, short)], [Recv(preceding, buffer)], channel=Channel.QUERY, step=0).wait(timeout_s)
    return {"declared": True, "start": buffer[:16].cpu().tolist()}


def peer_dies_after_posting(rank: int, world_size: int, backend_name: str, victim: int, timeout_s: float) -> dict:
    """Each rank sends to rank + 1 and receives from rank - 1; ``victim`` posts only its receive, then dies.

    Returns, on the survivors, what posting and waiting raised: {"outcome":
    "ok" or the exception's class name, "is_ours", "message", "seconds"}.
    """
    import os
    import signal

    from tokenring.interfaces import TokenRingError

    comm = _comm(backend_name)
    following, preceding = (rank + 1) % world_size, (rank - 1) % world_size
    outgoing = torch.ones(1024, device=comm.device)
    incoming = torch.empty(1024, device=comm.device)
    sends = [] if rank == victim else [Send(following, outgoing)]
    started = time.monotonic()
    try:
        handle = comm.exchange(sends, [Recv(preceding, incoming)], channel=Channel.QUERY, step=0)
        if rank == victim:
            os.kill(os.getpid(), signal.SIGKILL)
        handle.wait(timeout_s)
    except Exception as error:
        return {"outcome": type(error).__name__, "is_ours": isinstance(error, TokenRingError), "message": str(error),
                "seconds": time.monotonic() - started}
    return {"outcome": "ok", "seconds": time.monotonic() - started}

