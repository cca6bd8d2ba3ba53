"""Block attention on the CPU through torch's flash-attention CPU operators.

`aten._scaled_dot_product_flash_attention_for_cpu` returns the logsumexp we
need and has a matching backward, but differs from the kernel contract in
ways this adapter normalises: it wants (B, H, S, D), its causal mask is
top-left aligned, it reports lse 0 (not -inf) for a row that sees no key, and
it crashes on an empty key block, which we answer without calling it.
"""

from __future__ import annotations

import torch

from tokenring.kit import HeadGroups, lse_for_backward, no_gradients, nothing_seen
from tokenring.interfaces import AttentionKernel, Mask, PositionMask, accumulation_dtype
from tokenring.placement.masks import dense_allowed

_forward_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_backward_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _bottom_right_causal_bias(q_len: int, k_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask: query i sees key j when j <= i + k_len - q_len."""
    i = torch.arange(q_len).unsqueeze(1)
    j = torch.arange(k_len).unsqueeze(0)
    bias = torch.zeros(q_len, k_len, dtype=dtype)
    return bias.masked_fill(j > i + (k_len - q_len), float("-inf"))


class _Block(HeadGroups):
    """How one block maps onto the operator: head grouping and mask."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, mask: "Mask | PositionMask") -> None:
        batch, q_len, q_heads, _ = q.shape
        from_tokens = isinstance(mask, PositionMask)
        causal = not from_tokens and Mask(mask) is Mask.CAUSAL
        # Without a mask, the query heads of one group can share one K/V head
        # (folded into the sequence) instead of copying K and V.
        super().__init__(batch, q_len, q_heads, k.shape[2], k.shape[1], fold=not (causal or from_tokens))
        self.q_len = q_len
        self.is_causal = causal and q_len == self.k_len  # the op's top-left mask is right here
        self.bias = _bottom_right_causal_bias(q_len, self.k_len, q.dtype) if causal and not self.is_causal else None
        self.blind_rows = max(q_len - self.k_len, 0) if causal else 0
        self.blind: torch.Tensor | None = None  # rows that see no key of this block, when the mask is from tokens
        if from_tokens:
            allowed = dense_allowed(mask)
            self.bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
            blind = ~allowed.any(dim=1)
            self.blind = blind if bool(blind.any()) else None


class CpuSdpaKernel(AttentionKernel):
    """The CPU reference kernel: every dtype torch's CPU operator takes, any head dim, GQA."""

    def forward(self, q, k, v, *, scale, mask):
        block = _Block(q, k, mask)
        if block.q_len == 0 or block.k_len == 0:
            return nothing_seen(q, v)
        out, lse = _forward_op(
            block.rows_in(q), block.keys_in(k), block.keys_in(v), 0.0, block.is_causal,
            attn_mask=block.bias, scale=scale,
        )
        out = block.rows_out(out)
        lse = block.lse_out(lse).to(accumulation_dtype(q.dtype))
        if block.blind_rows:
            # Rows before the bottom-right diagonal see nothing: out 0, lse -inf.
            lse[:, :, : block.blind_rows] = float("-inf")
            out = out.clone()
            out[:, : block.blind_rows] = 0
        if block.blind is not None:
            lse[:, :, block.blind] = float("-inf")
            out = out.clone()
            out[:, block.blind] = 0
        return out, lse

    def backward(self, dout, q, k, v, out, lse, *, scale, mask):
        block = _Block(q, k, mask)
        if block.q_len == 0 or block.k_len == 0:
            return no_gradients(q, k, v)
        dq, dk, dv = _backward_op(
            block.rows_in(dout), block.rows_in(q), block.keys_in(k), block.keys_in(v),
            block.rows_in(out), block.lse_in(lse_for_backward(lse)).contiguous(), 0.0, block.is_causal,
            attn_mask=block.bias, scale=scale,
        )
        dq, dk, dv = block.rows_out(dq), block.key_grads_out(dk, k.dtype), block.key_grads_out(dv, v.dtype)
        if block.blind is not None:  # the operator's softmax of a row of -inf only is NaN
            dq = dq.clone()
            dq[:, block.blind] = 0
        return dq, dk, dv
