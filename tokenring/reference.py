"""Plain attention over the full sequence in float64: the ground truth of every test."""

from __future__ import annotations

import torch


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    cu_seqlens: "torch.Tensor | list[int] | None" = None,
    window: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of softmax(q kᵀ · scale) v in float64; inputs (B, S, H, D), GQA allowed.

    ``causal`` masks key j for query i when j > i + (Sk - Sq) (bottom-right,
    which is the usual mask when Sq == Sk). A row with no visible key gives
    out 0 and lse -inf. ``cu_seqlens`` and ``window`` mean what they mean for
    `tokenring.token_ring_attn` (Sq == Sk then).
    """
    q64, k64, v64 = (t.to(torch.float64) for t in (q, k, v))  # differentiable, for gradient references
    group = q.shape[2] // k.shape[2]
    if group > 1:
        k64 = k64.repeat_interleave(group, dim=2)
        v64 = v64.repeat_interleave(group, dim=2)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    scores = torch.einsum("bqhd,bkhd->bhqk", q64, k64) * scale
    if causal:
        q_len, k_len = q.shape[1], k.shape[1]
        i = torch.arange(q_len).unsqueeze(1)
        j = torch.arange(k_len).unsqueeze(0)
        scores = scores.masked_fill(j > i + (k_len - q_len), float("-inf"))
    if cu_seqlens is not None or window is not None:
        from tokenring.placement.masks import full_sequence_mask

        seq_len = q.shape[1]
        bounds = (0, seq_len) if cu_seqlens is None else tuple(int(b) for b in (
            cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens))
        allowed = full_sequence_mask(seq_len, bounds, False, window)
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - torch.where(torch.isneginf(lse), 0.0, lse).unsqueeze(-1))
    out = torch.einsum("bhqk,bkhd->bqhd", weights, v64)
    return out, lse
