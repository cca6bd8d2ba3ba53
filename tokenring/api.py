"""The public entry point: `token_ring_attn`."""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from typing import Any, Iterator

import torch

from .executor import Executor
from .interfaces import Backend, BackendError, LinkTraffic
from .layout import Layout
from .plan import Algorithm, build_plan
from .registry import registry
from .validation import agree, call_signature, local_problem

DEFAULT_TIMEOUT_S = 300.0


def timeout_s() -> float:
    """Seconds any wait may take before it raises; ``TOKENRING_TIMEOUT_S`` overrides."""
    return float(os.environ.get("TOKENRING_TIMEOUT_S", DEFAULT_TIMEOUT_S))


_executors: dict[tuple[str, Any], Executor] = {}
_executors_lock = threading.Lock()


def _executor(backend: Backend, group: Any) -> Executor:
    key = (backend.name, group)
    with _executors_lock:
        executor = _executors.get(key)
        if executor is None:
            executor = Executor(backend.create_comm(group), backend.create_kernel())
            _executors[key] = executor
        return executor


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


def _resolve_backend(backend: str | None, q: Any) -> Backend:
    if backend is not None:
        if not isinstance(backend, str):
            raise BackendError(f"argument 'backend': expected a backend name or None, got {backend!r}")
        return registry.get(backend)
    if not isinstance(q, torch.Tensor):
        raise BackendError(f"argument 'q': expected a torch.Tensor to choose a backend from, got {type(q).__name__}")
    return registry.for_device(q.device.type)


def token_ring_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    group: Any = None,
    backend: str | None = None,
    layout: str | None = None,
    algorithm: str = "tokenring",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over a sequence sharded across the ranks of ``group``.

    Every rank of ``group`` (default: the world group) calls this with its own
    shard: q is (B, S_local, Hq, D), k and v are (B, S_local, Hkv, D), with Hq
    a multiple of Hkv. Shards follow ``layout``: "zigzag" (the default when
    causal) or "contiguous" (the default otherwise); see `tokenring.shard`.

    ``algorithm="tokenring"`` keeps K and V still and moves queries and
    partial results; ``"ring"`` runs the Ring-Attention baseline (K and V
    travel) through the same engine.

    Returns out, with q's shape and dtype, or (out, lse) with ``return_lse``,
    lse being (B, Hq, S_local) float32 (float64 for float64 inputs), the
    natural-log normaliser of each query row.

    Raises `tokenring.InputError` on every rank when any rank's arguments are
    invalid or the ranks disagree, `tokenring.BackendError` when no backend
    fits, and `tokenring.CommTimeout` when a peer stops answering.
    """
    chosen = _resolve_backend(backend, q)
    executor = _executor(chosen, group)
    comm = executor.comm
    if layout is None:
        layout = Layout.ZIGZAG.value if causal is True else Layout.CONTIGUOUS.value
    problem = local_problem(
        q, k, v, causal=causal, softmax_scale=softmax_scale, layout=layout, algorithm=algorithm, backend=chosen
    )
    if problem is None and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        problem = "argument 'q': inputs require grad, but the backward pass is not implemented yet"
    signature = call_signature(
        q, k, v, causal=causal, softmax_scale=softmax_scale, layout=layout, algorithm=algorithm,
        backend=chosen, world_size=comm.world_size,
    )
    wait_s = timeout_s()
    agree(comm, signature, problem, timeout_s=wait_s)

    plan = build_plan(Algorithm(algorithm), Layout(layout), causal, comm.world_size)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    comm.sent.clear()
    try:
        out, lse = executor.run(plan, q, k, v, scale=scale, timeout_s=wait_s)
    finally:
        log = _traffic_log.get()
        if log is not None:
            log.extend(comm.sent)
        comm.sent.clear()
    return (out, lse) if return_lse else out
