"""The public entry point: `token_ring_attn`, which prepares, agrees on and runs a call.

The steps live below it: `tokenring.call` (`prepare`, `agree`),
`tokenring.compiled` (`run`, and the torch.compile route), `tokenring.runtime.executors`
(the executors and the timeout).
"""

from __future__ import annotations

from typing import Any

import torch

from tokenring.call import agree, last_choice, prepare
from tokenring.compiled import compiled_token_ring_attn, in_graph, run
from tokenring.interfaces import InputError
from tokenring.runtime.executors import DEFAULT_TIMEOUT_S, timeout_s

__all__ = ["DEFAULT_TIMEOUT_S", "last_choice", "timeout_s", "token_ring_attn"]


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
    algorithm: str = "auto",
    return_lse: bool = False,
    caller_problem: str | None = None,
    cu_seqlens: Any = None,
    window: Any = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over a sequence sharded across the ranks of ``group``.

    Every rank of ``group`` (default: the world group) calls this with its own
    shard: q is (B, S_local, Hq, D), k and v are (B, S_local, Hkv, D), with Hq
    a multiple of Hkv. Shards follow ``layout``: "zigzag" (the default when
    causal) or "contiguous" (the default otherwise); see `tokenring.shard`.

    ``algorithm`` names a registered schedule (`tokenring.schedule_names`):
    ``"tokenring"`` keeps K and V still and moves queries and partial
    results; ``"ring"`` runs the Ring-Attention baseline (K and V travel);
    all run through the same engine. ``"auto"`` (the default) runs the one
    the simulator predicts fastest for this call's shape on the group's
    profile (`tokenring.planner.choose`; ``tokenring calibrate`` writes the profile);
    every rank makes the same choice, and `tokenring.last_choice` tells which.

    Returns out, with q's shape and dtype, or (out, lse) with ``return_lse``,
    lse being (B, Hq, S_local) float32 (float64 for float64 inputs), the
    natural-log normaliser of each query row.

    Differentiable in q, k and v (when the backend declares ``backward``):
    the backward pass runs the same schedule with K and V still kept in
    place. lse is not differentiable. Every rank must run the backward, as it
    ran the forward. Double backward is not supported.

    ``cu_seqlens`` packs documents along the sequence (batch size 1, as in
    flash-attn's varlen functions): ``[0, l1, l1+l2, ..., S]`` over the whole
    global sequence, the same on every rank, int32 or int64 (a CPU tensor or a
    list: it is read on the host). Attention stays within each document, and
    is causal within it with ``causal``. Any lengths work; tokens after the
    last boundary are padding, with out 0 and zero gradients. Shard with
    `tokenring.shard(..., cu_seqlens=cu_seqlens)`: with the zigzag layout
    tokens are placed per document so that every rank gets the same work.
    ``window=(left, right)`` is flash-attn's ``window_size`` in global
    positions: query i sees keys i - left ... i + right (-1: unbounded). Blocks
    and messages that no query needs are not computed and not sent.

    ``caller_problem`` is a wrapper's own reason to refuse this rank's call
    (say, a check of its inputs that token_ring_attn cannot see): every rank
    then raises `tokenring.InputError` naming it and this rank, as for a bad
    argument, without a collective of the wrapper's own.

    Raises `tokenring.InputError` on every rank when any rank's arguments are
    invalid or the ranks disagree, `tokenring.BackendError` when no backend
    fits, and `tokenring.CommTimeout` when a peer stops answering.
    """
    if torch.compiler.is_dynamo_compiling():  # Dynamo is tracing this call: tokenring/compiled.py
        if cu_seqlens is not None or window is not None:
            raise InputError("tokenring.token_ring_attn: cu_seqlens and window are not supported under "
                             "torch.compile yet; call it outside the compiled region (torch.compiler.disable)")
        layout = getattr(layout, "value", layout)  # a tokenring.Layout: its name
        if caller_problem is None and in_graph(q, k, v, causal, softmax_scale, group, layout, algorithm, backend):
            return compiled_token_ring_attn(q, k, v, causal=causal, softmax_scale=softmax_scale, backend=backend,
                                            layout=layout, algorithm=algorithm, return_lse=return_lse)
        # Outside the graph (a graph break), with the group given at run time: the eager path below.
        return torch.compiler.disable(token_ring_attn)(
            q, k, v, causal=causal, softmax_scale=softmax_scale, group=group, backend=backend, layout=layout,
            algorithm=algorithm, return_lse=return_lse, caller_problem=caller_problem,
        )
    record = prepare(q, k, v, causal=causal, softmax_scale=softmax_scale, group=group, backend=backend,
                     layout=layout, algorithm=algorithm, caller_problem=caller_problem, cu_seqlens=cu_seqlens,
                     window=window)
    agree(record)  # raises on every rank when any rank's call is wrong or the ranks differ
    out, lse = run(record, q, k, v)
    return (out, lse) if return_lse else out
