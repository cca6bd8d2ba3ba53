"""Block attention through torch's CUDA efficient-attention operators (no flash-attn needed).

``aten::_scaled_dot_product_efficient_attention`` returns the logsumexp we
merge by, and ``..._backward`` takes a final lse, so one block's forward and
backward need nothing but torch. Where the operator differs from the kernel
contract, this adapter bridges:

* layout: it wants (B, H, S, D); we hand it transposed views of our
  (B, S, H, D) tensors, which is the memory layout it computes in anyway;
* lse: (B, H, ceil(Sq / 32) * 32) padded with +inf; we slice it to Sq, and
  pad ours back the same way for the backward, which reads the padding;
* mask: its ``is_causal`` is top-left aligned, the contract bottom-right.
  They agree on square blocks (all the schedules use). For Sq > Sk the
  first Sq - Sk query rows see nothing (out 0, lse -inf, no kernel work)
  and the rest form a square block; for Sq < Sk an explicit additive bias
  carries the bottom-right mask (its rows all see at least one key, so the
  operator never meets an empty row, whose result it leaves undefined);
* grouped heads: it wants equal head counts. Without a mask the query heads
  of a group are folded into the sequence dimension so that K and V are not
  copied; with a mask K and V are repeated per query head and dk/dv summed
  back over each group in float32;
* masks from tokens (packed documents, windows, padding: a `PositionMask`)
  go in as an explicit additive bias; rows that see no key of the block
  are set to out 0, lse -inf (and dq 0) after the operator, which leaves
  such rows undefined.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from tokenring.interfaces import AttentionKernel, Mask, PositionMask, accumulation_dtype
from tokenring.placement.masks import dense_allowed

from tokenring.kit import HeadGroups, lse_for_backward, no_gradients, nothing_seen

LSE_PAD = 32         # the operator's lse padding
BIAS_ALIGNMENT = 16  # elements: the bias row stride the operator accepts for every dtype


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def bottom_right_bias(q_len: int, k_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(Sq, Sk) additive mask: query i sees key j when j <= i + Sk - Sq; rows padded for alignment."""
    storage = torch.zeros(q_len, _round_up(k_len, BIAS_ALIGNMENT), dtype=dtype, device=device)
    i = torch.arange(q_len, device=device).unsqueeze(1)
    j = torch.arange(storage.shape[1], device=device).unsqueeze(0)
    storage.masked_fill_(j > i + (k_len - q_len), float("-inf"))
    return storage[:, :k_len]


class _Block(HeadGroups):
    """How one block maps onto the operator: which rows run, head grouping, mask."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, mask: "Mask | PositionMask") -> None:
        batch, q_len, q_heads, _ = q.shape
        k_len = k.shape[1]
        self.tokens = mask if isinstance(mask, PositionMask) else None
        causal = self.tokens is None and Mask(mask) is Mask.CAUSAL
        # Bottom-right alignment: the first Sq - Sk rows see no key at all.
        self.first_row = max(q_len - k_len, 0) if causal else 0
        super().__init__(batch, q_len - self.first_row, q_heads, k.shape[2], k_len,
                         fold=not causal and self.tokens is None)
        self.q_len = q_len
        self.is_causal = causal and self.rows == k_len  # square: top-left is bottom-right
        self.needs_bias = (causal and self.rows < k_len) or self.tokens is not None
        self.blind: torch.Tensor | None = None  # rows that see no key of this block (token masks)
        if self.tokens is not None:
            self.allowed = dense_allowed(self.tokens)
            blind = ~self.allowed.any(dim=1)
            self.blind = blind if bool(blind.any()) else None

    def bias(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        if not self.needs_bias:
            return None
        if self.tokens is not None:
            storage = torch.zeros(self.rows, _round_up(self.k_len, BIAS_ALIGNMENT), dtype=dtype, device=device)
            mask = storage[:, : self.k_len].masked_fill_(~self.allowed.to(device), float("-inf"))
        else:
            mask = bottom_right_bias(self.rows, self.k_len, dtype, device)
        return mask.expand(self.batch, self.op_heads, self.rows, self.k_len)

    def clear_blind_rows(self, x: torch.Tensor, fill: float, seq_dim: int) -> torch.Tensor:
        if self.blind is None:
            return x
        x = x.clone()
        index = [slice(None)] * x.dim()
        index[seq_dim] = self.blind.to(x.device)
        x[tuple(index)] = fill
        return x

    def rows_in(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Sq, Hq, D) -> the operator's (B, H, S, D) view of the rows that run."""
        return super().rows_in(x[:, self.first_row :] if self.first_row else x)

    def lse_in(self, lse: torch.Tensor) -> torch.Tensor:
        """Our (B, Hq, Sq) final lse -> the operator's (B, H, padded rows), +inf in the padding."""
        rows = super().lse_in(lse_for_backward(lse[..., self.first_row :].to(torch.float32)))
        padded = torch.full(
            (self.batch, self.op_heads, _round_up(self.op_rows, LSE_PAD)), math.inf, dtype=torch.float32, device=lse.device
        )
        padded[..., : self.op_rows] = rows
        return padded

    def all_rows(self, part: torch.Tensor, fill: float, seq_dim: int) -> torch.Tensor:
        """``part`` (the rows that ran) placed into a full-height tensor filled with ``fill``."""
        if not self.first_row:
            return part
        shape = list(part.shape)
        shape[seq_dim] = self.q_len
        whole = torch.full(shape, fill, dtype=part.dtype, device=part.device)
        whole.narrow(seq_dim, self.first_row, self.rows).copy_(part)
        return whole


def _no_rng_state() -> torch.Tensor:
    # Dropout is 0: the backward never reads the philox seed/offset, but wants tensors.
    return torch.empty((), dtype=torch.int64)


class SdpaEfficientKernel(AttentionKernel):
    """fp32/fp16/bf16 blocks through torch's CUDA memory-efficient attention.

    ``forward_op``/``backward_op`` default to the aten operators; tests pass
    stand-ins with the same signatures (`tokenring_cuda.specification`).
    """

    def __init__(self, forward_op: Callable | None = None, backward_op: Callable | None = None) -> None:
        self._forward_op = forward_op or torch.ops.aten._scaled_dot_product_efficient_attention
        self._backward_op = backward_op or torch.ops.aten._scaled_dot_product_efficient_attention_backward

    def forward(self, q, k, v, *, scale, mask):
        block = _Block(q, k, mask)
        if block.rows == 0 or block.k_len == 0:
            return nothing_seen(q, v)
        out, lse, _, _ = self._forward_op(
            block.rows_in(q), block.keys_in(k), block.keys_in(v), block.bias(q.dtype, q.device),
            True, 0.0, block.is_causal, scale=scale,
        )
        out = block.all_rows(block.rows_out(out), 0.0, seq_dim=1)
        lse = block.all_rows(block.lse_out(lse).to(accumulation_dtype(q.dtype)), -math.inf, seq_dim=2)
        return block.clear_blind_rows(out, 0.0, 1), block.clear_blind_rows(lse, -math.inf, 2)

    def backward(self, dout, q, k, v, out, lse, *, scale, mask):
        block = _Block(q, k, mask)
        if block.rows == 0 or block.k_len == 0:
            return no_gradients(q, k, v)
        dq, dk, dv, _ = self._backward_op(
            block.rows_in(dout), block.rows_in(q), block.keys_in(k), block.keys_in(v),
            block.bias(q.dtype, q.device), block.rows_in(out), block.lse_in(lse),
            _no_rng_state(), _no_rng_state(), 0.0, [True, True, True, False], block.is_causal, scale=scale,
        )
        dq = block.clear_blind_rows(block.all_rows(block.rows_out(dq), 0.0, seq_dim=1), 0.0, 1)
        return dq, block.key_grads_out(dk, k.dtype), block.key_grads_out(dv, v.dtype)
