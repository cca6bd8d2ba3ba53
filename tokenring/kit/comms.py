"""What `Comm` implementations over torch.distributed share: bounded waits, guarded posts, the agreement gather.

torch.distributed reports failures as RuntimeErrors whose wording varies by
backend and version, prefixed with the path of the C++ file in torch's build.
These helpers turn a timed-out wait into `CommTimeout` and any other
transport failure, when posting or when waiting, into `TokenRingError`, as a
sentence that names the rank, the step, the channel and the peer. Where the
default store of torch.distributed can tell, a timeout also names the ranks
that never came (`RollCall`).
"""

from __future__ import annotations

import contextlib
import datetime
import re
import time
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from tokenring.interfaces import CommTimeout, TokenRingError

_BUILD_PATH = re.compile(r"\[[^\[\]]*\.(?:cc|cpp|cu|c|h|hpp):\d+\]\s*")


def is_timeout(error: BaseException) -> bool:
    """Whether a torch.distributed error says that a wait ran out of time (gloo, NCCL, HCCL wordings)."""
    text = str(error).lower()
    return "timed out" in text or "timeout" in text or "timing out" in text


def transport_message(error: BaseException) -> str:
    """The transport's complaint as a sentence: its first line, without torch's build paths."""
    text = _BUILD_PATH.sub("", str(error)).strip()
    first = text.splitlines()[0].strip() if text else ""
    first = first.split(". ")[0].rstrip(".")  # torch appends generic advice ("This is typically caused by ...")
    return first or type(error).__name__


def _peer_gone(error: BaseException) -> bool:
    text = str(error).lower()
    return any(words in text for words in ("connection closed", "connection reset", "broken pipe", "closed by peer",
                                           "connection refused", "end of file"))


@contextlib.contextmanager
def transport_errors(where: str, timeout_s: float | None = None) -> Iterator[None]:
    """Turn a torch.distributed failure inside the block into ours, naming ``where``."""
    try:
        yield
    except TokenRingError:
        raise
    except Exception as error:  # torch raises RuntimeError, DistBackendError (a RuntimeError) or ValueError
        if is_timeout(error):
            within = f" within {timeout_s:.1f} s" if timeout_s is not None else ""
            raise CommTimeout(
                f"{where}: no answer{within} "
                "(did every rank of the group call token_ring_attn, with the same arguments?)"
            ) from error
        why = " (its process has probably died)" if _peer_gone(error) else ""
        raise TokenRingError(f"{where}: the transport failed{why}: {transport_message(error)}") from error


def wait_work(work: Any, timeout_s: float, where: str) -> None:
    """Block on one torch.distributed work for at most ``timeout_s``; raise ours, naming ``where``."""
    with transport_errors(where, timeout_s):
        work.wait(datetime.timedelta(seconds=timeout_s))


def wait_works(works: Iterable[Any], timeout_s: float, where: str, labels: Sequence[str] | None = None) -> None:
    """Block on several works, all within one deadline ``timeout_s`` from now.

    ``labels`` (one per work, e.g. "receiving from rank 2") make the error
    name the peer whose link failed.
    """
    deadline = time.monotonic() + timeout_s
    works = list(works)
    for index, work in enumerate(works):
        label = f", {labels[index]}" if labels is not None else ""
        wait_work(work, max(deadline - time.monotonic(), 0.001), where + label)


class RollCall:
    """Who reached a named point of a group, kept in torch.distributed's default store.

    Each rank `arrive`s before a collective that every rank must join (making
    connections, the agreement); when the collective times out, `absent` lists
    the ranks that never arrived. Without a default store (it is torch's
    private ``_get_default_store``) it knows nothing and says so.
    """

    _counts: dict[tuple, int] = {}

    def __init__(self, what: str, group: Any) -> None:
        self.ranks = tuple(dist.get_process_group_ranks(group))
        number = RollCall._counts.get((what, self.ranks), 0)  # every member reaches points in the same order
        RollCall._counts[(what, self.ranks)] = number + 1
        self.prefix = f"tokenring/roll/{what}/{'-'.join(map(str, self.ranks))}/{number}/"
        try:
            self.store = dist.distributed_c10d._get_default_store()
        except Exception:
            self.store = None

    def arrive(self) -> None:
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.store.set(self.prefix + str(dist.get_rank()), b"1")

    def absent(self) -> list[int] | None:
        """Group ranks that have not arrived, or None when the store cannot tell."""
        if self.store is None:
            return None
        try:
            return [i for i, r in enumerate(self.ranks) if not self.store.check([self.prefix + str(r)])]
        except Exception:
            return None

    def describe_absent(self) -> str:
        absent = self.absent()
        if absent is None:
            return "which ranks did not come is unknown (no store to ask)"
        if not absent:
            return "every rank arrived, so one of them failed on the way"
        return f"rank{'s' if len(absent) > 1 else ''} {', '.join(map(str, absent))} never came"


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
    roll = RollCall("gather", group)
    roll.arrive()
    try:
        return _gather(payload, group, world_size, timeout_s, where, device, dtype)
    except CommTimeout as error:
        raise CommTimeout(f"{error}; {roll.describe_absent()}") from error.__cause__


def _gather(payload, group, world_size, timeout_s, where, device, dtype) -> list[bytes]:
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
