"""What both CUDA kernel adapters do the same way."""

from __future__ import annotations

import torch

from tokenring.interfaces import accumulation_dtype


def unit_stride(x: torch.Tensor) -> torch.Tensor:
    """The fused kernels read the last dimension with stride 1; other strides are passed through."""
    return x if x.stride(-1) == 1 else x.contiguous()


def nothing_seen(q: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of a block with no queries or no keys: out 0, lse -inf; no kernel is called."""
    batch, q_len, q_heads, _ = q.shape
    out = torch.zeros(batch, q_len, q_heads, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((batch, q_heads, q_len), float("-inf"), dtype=accumulation_dtype(q.dtype), device=q.device)
    return out, lse


def no_gradients(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def lse_for_backward(lse: torch.Tensor) -> torch.Tensor:
    """The final lse as fused backwards read it: float32, and +inf where the contract has -inf.

    A row that saw no key anywhere has lse = -inf; the kernels form
    probabilities as exp(score - lse), which is NaN for masked scores there,
    but 0 with +inf (flash-attn marks such rows +inf itself).
    """
    lse = lse.to(torch.float32)
    return torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
