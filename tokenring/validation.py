"""Checking arguments on each rank, and agreement across ranks, before any traffic.

Every rank first checks its own arguments without raising, then all ranks
exchange a small description of their call (and their local error, if any).
So a rank with bad input makes every rank raise at once, with a message that
names the argument, the rank and what was expected, instead of leaving its
peers waiting in a point-to-point exchange that never comes.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from .interfaces import Backend, BackendError, Comm, InputError
from .layout import Layout, parse_layout
from .plans import parse_algorithm

_API = "token_ring_attn"


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"
    return f"{type(t).__name__}"


def local_problem(
    q: Any, k: Any, v: Any, *, causal: Any, softmax_scale: Any, layout: Any, algorithm: Any, backend: Backend
) -> str | None:
    """What is wrong with this rank's arguments, or None. Never raises."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return f"argument '{name}': expected a torch.Tensor, got {_describe(t)}"
    layouts = "(B, S_local, H, D)"
    for name, t, heads in (("q", q, "Hq"), ("k", k, "Hkv"), ("v", v, "Hkv")):
        if t.dim() != 4:
            return (
                f"argument '{name}': expected 4 dimensions {layouts.replace('H', heads)}, "
                f"got {t.dim()} ({_describe(t)})"
            )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            return f"argument '{name}': expected dtype {q.dtype} like q, got {t.dtype}"
        if t.device != q.device:
            return f"argument '{name}': expected device {q.device} like q, got {t.device}"
    if not q.is_floating_point():
        return f"argument 'q': expected a floating-point dtype, got {q.dtype}"
    if k.shape != v.shape:
        return f"argument 'v': expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}"
    batch, seq, q_heads, head_dim = q.shape
    if k.shape[0] != batch:
        return f"argument 'k': expected batch size {batch} like q, got {k.shape[0]}"
    if k.shape[1] != seq:
        return f"argument 'k': expected sequence length {seq} like q (S_local), got {k.shape[1]}"
    if k.shape[3] != head_dim:
        return f"argument 'k': expected head dim {head_dim} like q, got {k.shape[3]}"
    kv_heads = k.shape[2]
    if kv_heads == 0 or q_heads % kv_heads:
        return f"argument 'q': expected a head count Hq that is a multiple of Hkv = {kv_heads}, got Hq = {q_heads}"
    if seq == 0 or batch == 0 or head_dim == 0:
        return f"argument 'q': expected non-empty batch, sequence and head dims, got shape {tuple(q.shape)}"
    if not isinstance(causal, bool):
        return f"argument 'causal': expected True or False, got {causal!r}"
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or not (
            math.isfinite(softmax_scale) and softmax_scale > 0
        ):
            return f"argument 'softmax_scale': expected None or a finite number > 0, got {softmax_scale!r}"
    try:
        layout = parse_layout(layout)
    except ValueError as error:
        return f"argument 'layout': {error}"
    try:
        parse_algorithm(algorithm)
    except ValueError as error:
        return f"argument 'algorithm': {error}"
    if layout is Layout.ZIGZAG and seq % 2:
        return f"argument 'q': the zigzag layout needs an even S_local (two chunks per rank), got S_local = {seq}"
    return _capability_problem(q, k, causal, backend) or _non_finite_problem(q, k, v)


def plan_problem(plan: Any, q: torch.Tensor, k: torch.Tensor) -> str | None:
    """What stops ``plan`` from cutting this rank's shards into its spans, or None."""
    pieces = plan.granularity
    for name, t in (("q", q), ("k", k)):
        if t.shape[1] % pieces:
            return (
                f"argument '{name}': schedule {plan.algorithm!r} cuts each shard into {pieces} equal pieces, "
                f"so S_local must be a multiple of {pieces}, got {t.shape[1]}"
            )
    return None


def _non_finite_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    # Kernels treat a NaN score row like a row that saw no key (out 0), so a
    # NaN would come out as a finite, wrong answer; refuse it here instead.
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not bool(torch.isfinite(t).all()):
            return f"argument '{name}': expected finite values, got NaN or infinity"
    return None


def _capability_problem(q: torch.Tensor, k: torch.Tensor, causal: bool, backend: Backend) -> str | None:
    caps = backend.capabilities
    if q.device.type != backend.device_type:
        return (
            f"argument 'q': backend {backend.name!r} runs on device type {backend.device_type!r}, "
            f"got a tensor on {q.device}"
        )
    if q.dtype not in caps.dtypes:
        supported = ", ".join(sorted(str(d) for d in caps.dtypes))
        return f"argument 'q': backend {backend.name!r} supports dtypes {supported}, got {q.dtype}"
    if caps.head_dims is not None and q.shape[3] not in caps.head_dims:
        return f"argument 'q': backend {backend.name!r} supports head dims {list(caps.head_dims)}, got {q.shape[3]}"
    if caps.max_q_heads is not None and q.shape[2] > caps.max_q_heads:
        return f"argument 'q': backend {backend.name!r} supports at most {caps.max_q_heads} query heads, got {q.shape[2]}"
    if q.shape[2] != k.shape[2] and not caps.gqa:
        return f"argument 'k': backend {backend.name!r} needs as many K/V heads as query heads (no GQA), got {k.shape[2]}"
    if causal and not caps.causal:
        return f"argument 'causal': backend {backend.name!r} does not support causal attention"
    return None


def call_signature(q, k, v, *, causal, softmax_scale, layout, algorithm, backend: Backend, needs_grad: bool) -> dict:
    """What every rank must agree on, as JSON-friendly values."""
    def shape(t):
        return list(t.shape) if isinstance(t, torch.Tensor) else None

    return {
        "shape of argument 'q'": shape(q),
        "shape of argument 'k'": shape(k),
        "shape of argument 'v'": shape(v),
        "dtype of argument 'q'": str(q.dtype) if isinstance(q, torch.Tensor) else None,
        "argument 'causal'": causal if isinstance(causal, bool) else repr(causal),
        "argument 'softmax_scale'": (
            softmax_scale if isinstance(softmax_scale, (int, float, type(None))) else repr(softmax_scale)
        ),
        "argument 'layout'": str(getattr(layout, "value", layout)),
        "argument 'algorithm'": str(getattr(algorithm, "value", algorithm)),
        "argument 'backend'": backend.name,
        "whether q, k or v require grad": needs_grad,
    }


def agree(
    comm: Comm, signature: dict, problem: str | None, *, timeout_s: float, error: type[Exception] = InputError
) -> None:
    """Raise on every rank if any rank is wrong or the ranks differ.

    A rank's ``problem`` is raised as ``error`` on that rank and as the same
    error type on every other rank; disagreement raises InputError.
    """
    rank = comm.rank
    payload = json.dumps({"signature": signature, "problem": problem, "error": error.__name__}).encode()
    if comm.world_size == 1:
        everyone = [payload]
    else:
        everyone = comm.all_gather_bytes(payload, timeout_s=timeout_s)
    calls = [json.loads(p) for p in everyone]
    if problem is not None:
        raise error(f"{_API} on rank {rank}: {problem}")
    for other, call in enumerate(calls):
        if call["problem"] is not None:
            their_error = BackendError if call["error"] == BackendError.__name__ else InputError
            raise their_error(
                f"{_API} on rank {rank}: cannot run because rank {other} rejected its input: "
                f"{_API} on rank {other}: {call['problem']}"
            )
    for field in signature:
        values = [call["signature"].get(field) for call in calls]
        if any(value != values[0] for value in values):
            listing = ", ".join(f"rank {r} has {value!r}" for r, value in enumerate(values))
            raise InputError(
                f"{_API} on rank {rank}: {field} differs across ranks ({listing}); "
                "every rank must pass the same"
            )
