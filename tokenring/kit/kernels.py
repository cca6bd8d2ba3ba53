"""Helpers for kernel adapters: what every adapter of a fused attention operator does the same way.

Backends wrap vendor operators that want (B, H, S, D), equal head counts,
unit-stride rows, and +inf (not -inf) in the lse of a row that saw nothing.
These helpers translate between that and the `AttentionKernel` contract, in
plain torch, so that no backend writes them again.
"""

from __future__ import annotations

import torch

from tokenring.interfaces import accumulation_dtype


def unit_stride(x: torch.Tensor) -> torch.Tensor:
    """``x`` with stride 1 in its last dimension (fused operators read rows as dense; other strides pass)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def nothing_seen(q: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of a block with no queries or no keys: out 0, lse -inf, no operator called."""
    batch, q_len, q_heads, _ = q.shape
    out = torch.zeros(batch, q_len, q_heads, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((batch, q_heads, q_len), float("-inf"), dtype=accumulation_dtype(q.dtype), device=q.device)
    return out, lse


def no_gradients(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of a block with no queries or no keys."""
    return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def lse_for_backward(lse: torch.Tensor) -> torch.Tensor:
    """The final lse as fused backwards read it: +inf where the contract has -inf.

    A row that saw no key anywhere has lse = -inf. Backwards form
    probabilities as exp(score - lse), NaN for its masked scores with -inf,
    0 with +inf (flash-attn marks such rows +inf itself).
    """
    return torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)


class HeadGroups:
    """A block's query heads as an operator that wants equal head counts in (B, H, S, D) sees them.

    With ``fold`` (allowed when no mask depends on the row), the query heads
    of each group share their K/V head by being folded into the sequence
    dimension: the operator sees Hkv heads of group·rows rows, and K and V go
    in as they are. Without it, K and V are repeated to Hq heads and their
    gradients summed back over each group, in the accumulation dtype.
    """

    def __init__(self, batch: int, rows: int, q_heads: int, kv_heads: int, k_len: int, *, fold: bool) -> None:
        self.batch, self.rows, self.q_heads, self.kv_heads, self.k_len = batch, rows, q_heads, kv_heads, k_len
        self.group = q_heads // kv_heads
        self.folded = fold and self.group > 1
        self.op_heads = kv_heads if self.folded else q_heads
        self.op_rows = rows * self.group if self.folded else rows

    def rows_in(self, x: torch.Tensor) -> torch.Tensor:
        """(B, rows, Hq, D) -> the operator's (B, op_heads, op_rows, D)."""
        x = unit_stride(x)
        if not self.folded:
            return x.transpose(1, 2)
        x = x.reshape(self.batch, self.rows, self.kv_heads, self.group, -1).permute(0, 2, 3, 1, 4)
        return x.reshape(self.batch, self.kv_heads, self.op_rows, -1)

    def rows_out(self, x: torch.Tensor) -> torch.Tensor:
        """The operator's (B, op_heads, op_rows, D) -> (B, rows, Hq, D)."""
        if not self.folded:
            return x.transpose(1, 2)
        x = x.reshape(self.batch, self.kv_heads, self.group, self.rows, -1).permute(0, 3, 1, 2, 4)
        return x.reshape(self.batch, self.rows, self.q_heads, -1)

    def lse_in(self, lse: torch.Tensor) -> torch.Tensor:
        """Our (B, Hq, rows) lse -> the operator's (B, op_heads, op_rows)."""
        return lse.reshape(self.batch, self.op_heads, self.op_rows)

    def lse_out(self, lse: torch.Tensor) -> torch.Tensor:
        """The operator's (B, op_heads, op_rows + any padding) lse -> (B, Hq, rows)."""
        return lse[..., : self.op_rows].reshape(self.batch, self.q_heads, self.rows)

    def keys_in(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Sk, Hkv, D) -> the operator's (B, op_heads, Sk, D)."""
        x = unit_stride(x)
        if self.group > 1 and not self.folded:
            x = x.repeat_interleave(self.group, dim=2)
        return x.transpose(1, 2)

    def key_grads_out(self, dx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The operator's (B, op_heads, Sk, D) dk or dv -> (B, Sk, Hkv, D) in ``dtype``, summed over each group."""
        dx = dx.transpose(1, 2)
        if self.group > 1 and not self.folded:
            dx = dx.reshape(self.batch, self.k_len, self.kv_heads, self.group, -1).sum(3, dtype=accumulation_dtype(dtype))
        return dx.to(dtype)
