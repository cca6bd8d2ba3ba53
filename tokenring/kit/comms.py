"""What `Comm` implementations over torch.distributed share: bounded waits and the agreement gather.

torch.distributed reports a timed-out wait as a RuntimeError whose wording
varies by backend and version; these helpers turn it into `CommTimeout`
naming where it happened, and any other failure into `TokenRingError`.
"""

from __future__ import annotations

import datetime
import time
from typing import Any, Iterable

import torch
import torch.distributed as dist

from ..interfaces import CommTimeout, TokenRingError


def is_timeout(error: BaseException) -> bool:
    """Whether a torch.distributed error says that a wait ran out of time (gloo, NCCL, HCCL wordings)."""
    text = str(error).lower()
    return "timed out" in text or "timeout" in text or "timing out" in text


def wait_work(work: Any, timeout_s: float, where: str) -> None:
    """Block on one torch.distributed work for at most ``timeout_s``; raise ours, naming ``where``."""
    try:
        work.wait(datetime.timedelta(seconds=timeout_s))
    except RuntimeError as error:
        if is_timeout(error):
            raise CommTimeout(
                f"{where}: no answer from a peer within {timeout_s:.1f} s "
                "(did every rank of the group call token_ring_attn with the same arguments?)"
            ) from error
        raise TokenRingError(f"{where}: communication failed: {error}") from error


def wait_works(works: Iterable[Any], timeout_s: float, where: str) -> None:
    """Block on several works, all within one deadline ``timeout_s`` from now."""
    deadline = time.monotonic() + timeout_s
    for work in works:
        wait_work(work, max(deadline - time.monotonic(), 0.001), where)


def all_gather_bytes(
    payload: bytes,
    *,
    group: Any,
    world_size: int,
    timeout_s: float,
    where: str,
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype = torch.uint8,
) -> list[bytes]:
    """Every rank's ``payload``, in rank order: lengths first, then the padded bytes, within ``timeout_s``.

    ``device`` and ``dtype`` carry the bytes where the transport wants them
    (one value per element; HCCL gathers int32 everywhere, gloo uint8).
    """
    if world_size == 1:
        return [bytes(payload)]
    deadline = time.monotonic() + timeout_s
    length = torch.tensor([len(payload)], dtype=torch.int64 if dtype == torch.uint8 else dtype, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world_size)]
    wait_work(dist.all_gather(lengths, length, group=group, async_op=True), timeout_s, where)
    counts = [int(n.item()) for n in lengths]
    mine = torch.zeros(max(counts), dtype=dtype)
    if payload:
        mine[: len(payload)] = torch.tensor(list(payload), dtype=dtype)
    mine = mine.to(device)
    everyone = [torch.empty_like(mine) for _ in range(world_size)]
    remaining = max(deadline - time.monotonic(), 0.001)
    wait_work(dist.all_gather(everyone, mine, group=group, async_op=True), remaining, where)
    return [bytes(t[:n].cpu().tolist()) for t, n in zip(everyone, counts)]
