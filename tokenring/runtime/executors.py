"""The process's runtime state: one executor per (backend, group), and the one timeout every wait takes.

* `timeout_s()`: seconds any wait may take before it raises, 300 by default;
  ``TOKENRING_TIMEOUT_S`` overrides. Nothing else reads that variable: the
  call path, the KV cache and the first-party backends' Comms (their
  connection set-up, NCCL's and HCCL's watchdogs) all ask here.
* `open_executor(backend, group)`: the `Executor` of a backend over a group,
  made once (its Comm, its kernel, its agreement state and buffer pool) and
  kept until the interpreter exits.
* `resolve_backend(name, q)` and `backend_and_executor(name, q, group)`: the
  backend a call names, or the one that serves q's device; and, when it
  cannot be used on this rank, another backend's executor through which the
  rank still takes part in the agreement.

Imported by the call path (`tokenring.call`), the KV cache
(`tokenring.inference`) and the backends; it imports none of them.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from typing import Any

import torch

from tokenring.runtime.executor import Executor
from tokenring.interfaces import Backend, BackendError, InputError, TokenRingError
from tokenring.registry import registry

__all__ = ["DEFAULT_TIMEOUT_S", "TIMEOUT_ENV", "backend_and_executor", "open_executor", "resolve_backend",
           "timeout_s"]

DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_ENV = "TOKENRING_TIMEOUT_S"


def timeout_s() -> float:
    """Seconds any wait may take before it raises; ``TOKENRING_TIMEOUT_S`` overrides (read on every call)."""
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


# -- the executors -----------------------------------------------------------------------------

_executors: dict[tuple[str, Any], Executor] = {}
_executors_lock = threading.Lock()


@atexit.register
def forget_executors() -> None:
    """Drop the cached executors, and with them their comms' process groups, while the interpreter
    still runs: a gloo group freed during interpreter shutdown can abort the process."""
    with _executors_lock:
        _executors.clear()


def executor_for(backend: Backend, group: Any) -> Executor:
    """The executor of ``backend`` over ``group`` (a resolved group: None or a ProcessGroup), made once."""
    key = (backend.name, group)
    with _executors_lock:
        executor = _executors.get(key)
        if executor is None:
            executor = Executor(backend.create_comm(group), backend.create_kernel())
            _executors[key] = executor
        return executor


def executors() -> dict[tuple[str, Any], Executor]:
    """A copy of the cache: (backend name, group) -> executor (for tests and tools)."""
    with _executors_lock:
        return dict(_executors)


def open_executor(backend: Backend, group: Any) -> Executor:
    """`executor_for`, with torch's complaint about the group made a readable `InputError`."""
    try:
        return executor_for(backend, group)
    except TokenRingError:  # already ours and readable: a missing backend, a comm that timed out starting
        raise
    except Exception as error:  # torch's own complaint about the group, made readable
        raise InputError(f"token_ring_attn: argument 'group': {error}") from error


# -- choosing the backend ----------------------------------------------------------------------

def resolve_backend(backend: str | None, q: Any) -> Backend:
    """The backend named ``backend``, or the one serving q's device type; `BackendError` otherwise."""
    if backend is not None:
        if not isinstance(backend, str):
            raise BackendError(f"argument 'backend': expected a backend name or None, got {backend!r}")
        return registry.get(backend)
    if not isinstance(q, torch.Tensor):
        raise BackendError(f"argument 'q': expected a torch.Tensor to choose a backend from, got {type(q).__name__}")
    return registry.for_device(q.device.type)


def backend_and_executor(backend: str | None, q: Any, group: Any) -> tuple[Backend, Executor, str | None]:
    """The backend to run on, an executor to agree with the other ranks, and why not, if so.

    When the requested backend cannot be used on this rank, the rank still
    takes part in the agreement, through the Comm of another backend over the
    same group, so that every rank hears why at once instead of waiting for
    a rank that gave up.
    """
    try:
        chosen = resolve_backend(backend, q)
        return chosen, open_executor(chosen, group), None
    except BackendError as error:
        problem = str(error)
    candidates = []
    if isinstance(q, torch.Tensor):
        with contextlib.suppress(BackendError):
            candidates.append(registry.for_device(q.device.type))
    candidates += [e.backend for e in registry.entries() if e.backend is not None and e.available]
    for candidate in candidates:
        with contextlib.suppress(TokenRingError):
            return candidate, open_executor(candidate, group), problem
    raise BackendError(problem)  # no way to tell the other ranks
