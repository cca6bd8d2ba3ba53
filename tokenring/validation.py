"""Checking each rank's own arguments before any traffic, without raising and without a device sync.

Every rank checks its arguments here, reading only their metadata; the
result goes into the cross-rank agreement (`tokenring.runtime.agreement`), so a rank
with bad input makes every rank raise, with a message that names the
argument, the rank and what was expected.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from tokenring.placement.documents import validate_cu_seqlens
from tokenring.interfaces import Backend
from tokenring.placement.layout import Layout, parse_layout
from tokenring.schedules.build import parse_algorithm


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"
    return f"{type(t).__name__}"


def local_problem(
    q: Any, k: Any, v: Any, *, causal: Any, softmax_scale: Any, layout: Any, algorithm: Any, backend: Backend,
    documents: bool = False,
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
    if layout is Layout.ZIGZAG and seq % 2 and not documents:  # with documents, tokens are placed per document
        return f"argument 'q': the zigzag layout needs an even S_local (two chunks per rank), got S_local = {seq}"
    problem = _capability_problem(q, k, causal, backend)
    if problem is None and full_checks():
        problem = _non_finite_problem(q, k, v)
    return problem


def full_checks() -> bool:
    """Whether ``TOKENRING_CHECKS=full`` asks for the checks that read tensor values (a device sync each)."""
    return os.environ.get("TOKENRING_CHECKS", "").strip().lower() == "full"


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
    # Opt-in: reading values waits for the device. By default non-finite inputs
    # come out as NaN instead (tokenring.runtime.finite), which costs no sync.
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


def mask_arguments(
    cu_seqlens: Any, window: Any, q: torch.Tensor, world_size: int, backend: Backend
) -> tuple[tuple[int, ...] | None, tuple[int, int] | None, str | None]:
    """(document boundaries, window, problem) from ``cu_seqlens`` and ``window``. Never raises.

    Reads ``cu_seqlens`` on the host: a CPU tensor or a list costs no device sync.
    """
    boundaries = None
    if cu_seqlens is not None:
        boundaries, problem = _boundaries(cu_seqlens, q.shape[1] * world_size)
        if problem is not None:
            return None, None, f"argument 'cu_seqlens': {problem}"
        if not backend.capabilities.varlen:
            return None, None, f"argument 'cu_seqlens': backend {backend.name!r} does not support packed documents (varlen)"
        if q.shape[0] != 1:
            return None, None, f"argument 'q': cu_seqlens needs batch size 1 (documents packed along S), got {q.shape[0]}"
    parsed_window = None
    if window is not None:
        if (not isinstance(window, (tuple, list)) or len(window) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) and x >= -1 for x in window)):
            return None, None, f"argument 'window': expected (left, right), integers >= -1 (-1: unbounded), got {window!r}"
        parsed_window = (int(window[0]), int(window[1]))
        if parsed_window == (-1, -1):
            parsed_window = None
        elif not (backend.capabilities.varlen and backend.capabilities.window):
            return None, None, f"argument 'window': backend {backend.name!r} does not support sliding windows"
    return boundaries, parsed_window, None


def _boundaries(cu_seqlens: Any, seq_len: int) -> tuple[tuple[int, ...] | None, str | None]:
    try:
        values = validate_cu_seqlens(cu_seqlens)
    except ValueError as error:
        return None, str(error).removeprefix("cu_seqlens ")
    if values[-1] > seq_len:
        return None, (f"the last boundary {values[-1]} is past the sequence's end S = {seq_len} "
                      "(S_local x world size)")
    return values, None
