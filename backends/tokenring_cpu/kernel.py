"""Block attention on the CPU through torch's flash-attention CPU operators.

`aten._scaled_dot_product_flash_attention_for_cpu` returns the logsumexp we
need and has a matching backward, but differs from the kernel contract in
ways this adapter normalises: it wants (B, H, S, D), its causal mask is
top-left aligned, it reports lse 0 (not -inf) for a row that sees no key, and
it crashes on an empty key block, which we answer without calling it.
"""

from __future__ import annotations

import torch

from tokenring.interfaces import AttentionKernel, Mask, accumulation_dtype

_forward_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_backward_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    # The operator reads the last dimension as if its stride were 1 (any other
    # stride gives silently wrong results), while other strides are honoured.
    return x if x.stride(-1) == 1 else x.contiguous()


def _bottom_right_causal_bias(q_len: int, k_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask: query i sees key j when j <= i + k_len - q_len."""
    i = torch.arange(q_len).unsqueeze(1)
    j = torch.arange(k_len).unsqueeze(0)
    bias = torch.zeros(q_len, k_len, dtype=dtype)
    return bias.masked_fill(j > i + (k_len - q_len), float("-inf"))


class _Block:
    """How one block maps onto the operator: head grouping and mask."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, mask: Mask) -> None:
        self.batch, self.q_len, self.q_heads, self.head_dim = q.shape
        self.k_len, self.kv_heads = k.shape[1], k.shape[2]
        self.group = self.q_heads // self.kv_heads
        causal = Mask(mask) is Mask.CAUSAL
        self.is_causal = causal and self.q_len == self.k_len  # the op's top-left mask is right here
        self.bias = (
            _bottom_right_causal_bias(self.q_len, self.k_len, q.dtype) if causal and not self.is_causal else None
        )
        # Without a mask, the query heads of one group can share one K/V head:
        # fold them into the sequence dimension instead of copying K and V.
        self.folded = self.group > 1 and not causal
        self.blind_rows = max(self.q_len - self.k_len, 0) if causal else 0

    def rows_in(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Sq, Hq, D) -> the operator's (B, H, S, D) view of query rows."""
        x = _unit_stride(x)
        if not self.folded:
            return x.transpose(1, 2)
        x = x.reshape(self.batch, self.q_len, self.kv_heads, self.group, -1).permute(0, 2, 3, 1, 4)
        return x.reshape(self.batch, self.kv_heads, self.group * self.q_len, -1)

    def rows_out(self, x: torch.Tensor) -> torch.Tensor:
        """The operator's query rows back to (B, Sq, Hq, D)."""
        if not self.folded:
            return x.transpose(1, 2)
        x = x.reshape(self.batch, self.kv_heads, self.group, self.q_len, -1).permute(0, 3, 1, 2, 4)
        return x.reshape(self.batch, self.q_len, self.q_heads, -1)

    def lse_in(self, lse: torch.Tensor) -> torch.Tensor:
        return lse.reshape(self.batch, self.kv_heads, self.group * self.q_len) if self.folded else lse

    def keys_in(self, x: torch.Tensor) -> torch.Tensor:
        x = _unit_stride(x)
        if self.group > 1 and not self.folded:
            x = x.repeat_interleave(self.group, dim=2)
        return x.transpose(1, 2)

    def key_grads_out(self, dx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.group > 1 and not self.folded:
            dx = dx.reshape(self.batch, self.kv_heads, self.group, self.k_len, -1).sum(2, dtype=accumulation_dtype(dtype))
        return dx.transpose(1, 2).to(dtype)


class CpuSdpaKernel(AttentionKernel):
    """The CPU reference kernel: every dtype torch's CPU operator takes, any head dim, GQA."""

    def forward(self, q, k, v, *, scale, mask):
        lse_dtype = accumulation_dtype(q.dtype)
        block = _Block(q, k, mask)
        if block.q_len == 0 or block.k_len == 0:
            return (
                torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype),
                torch.full((block.batch, block.q_heads, block.q_len), float("-inf"), dtype=lse_dtype),
            )
        out, lse = _forward_op(
            block.rows_in(q), block.keys_in(k), block.keys_in(v), 0.0, block.is_causal,
            attn_mask=block.bias, scale=scale,
        )
        out = block.rows_out(out)
        lse = lse.reshape(block.batch, block.q_heads, block.q_len).to(lse_dtype)
        if block.blind_rows:
            # Rows before the bottom-right diagonal see nothing: out 0, lse -inf.
            lse[:, :, : block.blind_rows] = float("-inf")
            out = out.clone()
            out[:, : block.blind_rows] = 0
        return out, lse

    def backward(self, dout, q, k, v, out, lse, *, scale, mask):
        block = _Block(q, k, mask)
        if block.q_len == 0 or block.k_len == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        # The operator forms probabilities as exp(scores - lse): a row that saw
        # no key anywhere (lse = -inf) must get probability 0, which +inf gives.
        lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
        dq, dk, dv = _backward_op(
            block.rows_in(dout), block.rows_in(q), block.keys_in(k), block.keys_in(v),
            block.rows_in(out), block.lse_in(lse).contiguous(), 0.0, block.is_causal,
            attn_mask=block.bias, scale=scale,
        )
        return block.rows_out(dq), block.key_grads_out(dk, k.dtype), block.key_grads_out(dv, v.dtype)
