"""Block attention on the CPU through torch's flash-attention CPU operator.

`torch.ops.aten._scaled_dot_product_flash_attention_for_cpu` returns the
logsumexp we need, but differs from the kernel contract in three ways this
adapter normalises: it wants (B, H, S, D), its causal mask is top-left
aligned, and it reports lse 0 (not -inf) for a row that sees no key. It also
crashes on an empty key block, which we answer without calling it.
"""

from __future__ import annotations

import torch

from tokenring.interfaces import AttentionKernel, Mask


def _bottom_right_causal_bias(q_len: int, k_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask: query i sees key j when j <= i + k_len - q_len."""
    i = torch.arange(q_len).unsqueeze(1)
    j = torch.arange(k_len).unsqueeze(0)
    bias = torch.zeros(q_len, k_len, dtype=dtype)
    return bias.masked_fill(j > i + (k_len - q_len), float("-inf"))


class CpuSdpaKernel(AttentionKernel):
    """The CPU reference kernel: every dtype torch's CPU operator takes, any head dim, GQA."""

    def forward(self, q, k, v, *, scale, mask):
        batch, q_len, q_heads, head_dim = q.shape
        k_len, kv_heads = k.shape[1], k.shape[2]
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        if q_len == 0 or k_len == 0:
            return (
                torch.zeros(batch, q_len, q_heads, v.shape[-1], dtype=q.dtype),
                torch.full((batch, q_heads, q_len), float("-inf"), dtype=lse_dtype),
            )
        group = q_heads // kv_heads
        causal = Mask(mask) is Mask.CAUSAL
        square_causal = causal and q_len == k_len
        bias = _bottom_right_causal_bias(q_len, k_len, q.dtype) if causal and not square_causal else None

        if group > 1 and not causal:
            # Without a mask, the query heads of one group can share one K/V head:
            # fold them into the sequence dimension instead of copying K and V.
            q_folded = q.reshape(batch, q_len, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
            q_folded = q_folded.reshape(batch, kv_heads, group * q_len, head_dim)
            out, lse = self._call(q_folded, k.transpose(1, 2), v.transpose(1, 2), False, None, scale)
            out = out.reshape(batch, kv_heads, group, q_len, -1).permute(0, 3, 1, 2, 4).reshape(batch, q_len, q_heads, -1)
            lse = lse.reshape(batch, q_heads, q_len)
        else:
            if group > 1:
                k = k.repeat_interleave(group, dim=2)
                v = v.repeat_interleave(group, dim=2)
            out, lse = self._call(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), square_causal, bias, scale)
            out = out.transpose(1, 2)

        lse = lse.to(lse_dtype)
        if bias is not None and q_len > k_len:
            # Rows before the bottom-right diagonal see nothing: out 0, lse -inf.
            blind = q_len - k_len
            lse[:, :, :blind] = float("-inf")
            out = out.clone()
            out[:, :blind] = 0
        return out, lse

    @staticmethod
    def _call(q, k, v, is_causal, bias, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=bias, scale=scale
        )
