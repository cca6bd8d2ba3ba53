"""Block attention as plain matrix products: slow, simple, exact.

The contract (tokenring.AttentionKernel): tensors (B, S, H, D); lse
(B, Hq, Sq) in float32 (float64 for float64 inputs); a causal block is
aligned to its bottom-right corner; a row that sees no key gets out 0 and
lse -inf; query head h uses key/value head h // (Hq // Hkv).
"""

from __future__ import annotations

import torch

from tokenring import AttentionKernel, Mask
from tokenring.kit import accumulation_dtype, lse_for_backward


class MathKernel(AttentionKernel):
    def _scores(self, q, k, scale, mask):
        """Scores (B, Hkv, group, Sq, Sk) in the accumulation dtype, masked with -inf."""
        batch, q_len, q_heads, head_dim = q.shape
        k_len, kv_heads = k.shape[1], k.shape[2]
        acc = accumulation_dtype(q.dtype)
        grouped_q = q.to(acc).reshape(batch, q_len, kv_heads, q_heads // kv_heads, head_dim)
        scores = torch.einsum("bqhgd,bkhd->bhgqk", grouped_q, k.to(acc)) * scale
        if Mask(mask) is Mask.CAUSAL:
            i = torch.arange(q_len).unsqueeze(1)
            j = torch.arange(k_len).unsqueeze(0)
            scores = scores.masked_fill(j > i + (k_len - q_len), float("-inf"))
        return scores

    @staticmethod
    def _probabilities(scores, lse):
        # exp(scores - lse); a row with lse = -inf saw no key: with +inf there, probability 0, not NaN.
        return torch.exp(scores - lse_for_backward(lse).unsqueeze(-1))

    def forward(self, q, k, v, *, scale, mask):
        batch, q_len, q_heads, _ = q.shape
        scores = self._scores(q, k, scale, mask)
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.einsum("bhgqk,bkhd->bqhgd", self._probabilities(scores, lse), v.to(scores.dtype))
        return out.reshape(batch, q_len, q_heads, -1).to(q.dtype), lse.reshape(batch, q_heads, q_len)

    def backward(self, dout, q, k, v, out, lse, *, scale, mask):
        batch, q_len, q_heads, head_dim = q.shape
        kv_heads = k.shape[2]
        group = q_heads // kv_heads
        scores = self._scores(q, k, scale, mask)
        acc = scores.dtype
        # out and lse are the final ones over all keys, so these are this block's
        # share of the true probabilities, and delta is the true row sum.
        probs = self._probabilities(scores, lse.to(acc).reshape(batch, kv_heads, group, q_len))
        grouped = lambda x: x.to(acc).reshape(batch, q_len, kv_heads, group, -1)  # noqa: E731
        dout_g, out_g, q_g = grouped(dout), grouped(out), grouped(q)
        delta = (dout_g * out_g).sum(-1).permute(0, 2, 3, 1)  # (B, Hkv, group, Sq)
        dprobs = torch.einsum("bqhgd,bkhd->bhgqk", dout_g, v.to(acc))
        dscores = probs * (dprobs - delta.unsqueeze(-1))
        dq = torch.einsum("bhgqk,bkhd->bqhgd", dscores, k.to(acc)) * scale
        dk = torch.einsum("bhgqk,bqhgd->bkhd", dscores, q_g) * scale  # summed over the group
        dv = torch.einsum("bhgqk,bqhgd->bkhd", probs, dout_g)
        return dq.reshape(batch, q_len, q_heads, head_dim).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
