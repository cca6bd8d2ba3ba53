"""Recording the bytes a rank's Comm sent during a block of code (`record_traffic`)."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

from tokenring.interfaces import Comm, LinkTraffic

_traffic_log: contextvars.ContextVar[list[LinkTraffic] | None] = contextvars.ContextVar("tokenring_traffic", default=None)


@contextlib.contextmanager
def record_traffic() -> Iterator[list[LinkTraffic]]:
    """Collect, into the yielded list, the bytes this rank's Comm sent during the block.

    Each entry is a `LinkTraffic` (step, src, dst, bytes), one per message, in
    send order, as the backend's Comm counted it.
    """
    log: list[LinkTraffic] = []
    token = _traffic_log.set(log)
    try:
        yield log
    finally:
        _traffic_log.reset(token)


@contextlib.contextmanager
def recording(comm: Comm) -> Iterator[None]:
    """Hand what ``comm`` sends during the block to an active `record_traffic`."""
    comm.sent.clear()
    try:
        yield
    finally:
        log = _traffic_log.get()
        if log is not None:
            log.extend(comm.sent)
        comm.sent.clear()
