"""Block attention on Ascend NPUs through torch_npu's fused attention operators.

The adapter translates the kernel contract (tokenring.interfaces.AttentionKernel)
into calls of ``npu_fusion_attention`` and ``npu_fusion_attention_grad``:

* layout: our (B, S, H, D) is the operator's "BSND"; head_num is Hq and the
  operator infers Hkv from the key (GQA needs Hq a multiple of Hkv).
* lse: the forward returns softmax_max and softmax_sum, float32 (B, Hq, Sq, 8),
  the same value in each of the 8 columns; lse = max + log(sum) of column 0.
* causal: Mask.CAUSAL is aligned to the bottom-right corner, which is the
  operator's sparse_mode 3 (rightDownCausal) with the compressed 2048x2048
  upper-triangular bool mask (True = masked out). When Sq > Sk the first
  Sq - Sk query rows see no key; the documentation does not say what the
  operator returns for such rows, so we never give it any: those rows are
  answered here (out 0, lse -inf, zero gradients) and only the last Sk rows,
  a square causal block, go to the operator.
* backward: the operator rebuilds the block's probabilities from the forward's
  softmax statistics as P = exp(S - softmax_max) / softmax_sum (documented
  shape [B, N, Sq, 8], float32; see specification.py for the sources). Any
  pair with max + log(sum) = lse gives the same P, so the *final* merged lse
  of each row is passed as softmax_max = lse, softmax_sum = 1, replicated to
  8 columns. A row whose lse is -inf (it saw no key anywhere) gets the
  largest finite float32 as its max, so its P is exactly 0 without any
  infinity reaching the operator, and its dq is zeroed here.

The two operators are injected (``ops``: any object with the two functions as
attributes). The default is torch_npu, imported on first use; the tests pass
`tokenring_npu.specification`, an executable specification of the documented
behaviour, NOT the hardware.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tokenring.interfaces import AttentionKernel, Mask, accumulation_dtype

from .specification import SOFTMAX_STAT_COLUMNS, compressed_causal_mask

LAYOUT = "BSND"
SPARSE_NONE = 0              # no atten_mask: every key is visible
SPARSE_RIGHT_DOWN_CAUSAL = 3
# With sparse_mode 3 the documentation says pre/next_tockens are ignored; we
# still pass the values that describe a causal mask, as Ascend's own examples do.
_ALL_TOKENS = 2147483647
_FINITE_MAX = torch.finfo(torch.float32).max


def _torch_npu_ops() -> Any:
    import torch_npu  # imported on first use: `import tokenring_npu` must work without it

    return torch_npu


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    # The executor hands over views (e.g. the second half of a shard); the
    # operator's handling of strided BSND views is not documented at the
    # torch_npu level, so it always gets dense tensors.
    return x if x.is_contiguous() else x.contiguous()


class NpuFusionAttentionKernel(AttentionKernel):
    """The kernel contract on top of npu_fusion_attention / npu_fusion_attention_grad."""

    def __init__(self, ops: Any = None) -> None:
        self._ops = ops
        self._masks: dict[torch.device, torch.Tensor] = {}

    @property
    def ops(self) -> Any:
        if self._ops is None:
            self._ops = _torch_npu_ops()
        return self._ops

    def _causal_mask(self, device: torch.device) -> torch.Tensor:
        mask = self._masks.get(device)
        if mask is None:
            mask = self._masks[device] = compressed_causal_mask(device)
        return mask

    def _mask_arguments(self, mask: Mask, device: torch.device) -> dict[str, Any]:
        if Mask(mask) is Mask.CAUSAL:
            return {
                "atten_mask": self._causal_mask(device),
                "sparse_mode": SPARSE_RIGHT_DOWN_CAUSAL,
                "pre_tockens": _ALL_TOKENS,
                "next_tockens": 0,
            }
        return {"atten_mask": None, "sparse_mode": SPARSE_NONE, "pre_tockens": _ALL_TOKENS, "next_tockens": _ALL_TOKENS}

    @staticmethod
    def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> None:
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"npu kernel: q, k, v must be (B, S, H, D), got {q.dim()}, {k.dim()}, {v.dim()} dims")
        if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
            raise ValueError(f"npu kernel: Hq must be a multiple of Hkv, got Hq={q.shape[2]}, Hkv={k.shape[2]}")
        if not math.isfinite(scale):
            raise ValueError(f"npu kernel: scale must be finite, got {scale}")

    @staticmethod
    def _blind_rows(q_len: int, k_len: int, mask: Mask) -> int:
        """Leading query rows that see no key under a bottom-right causal mask."""
        return max(q_len - k_len, 0) if Mask(mask) is Mask.CAUSAL else 0

    def forward(self, q, k, v, *, scale, mask):
        self._check(q, k, v, scale)
        batch, q_len, q_heads, _ = q.shape
        k_len = k.shape[1]
        lse_dtype = accumulation_dtype(q.dtype)
        blind = q_len if k_len == 0 else self._blind_rows(q_len, k_len, mask)
        out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.full((batch, q_heads, q_len), float("-inf"), dtype=lse_dtype, device=q.device)
        if blind == q_len:  # no query row sees any key: the operator needs S >= 1 anyway
            return out, lse
        seen = q[:, blind:]
        block_out, softmax_max, softmax_sum, *_ = self.ops.npu_fusion_attention(
            _unit_rows(seen), _unit_rows(k), _unit_rows(v), q_heads, LAYOUT,
            scale=float(scale), keep_prob=1.0, **self._mask_arguments(mask, q.device),
        )
        # Column 0 of the replicated statistics; sum >= 1 on every row that sees a key.
        block_lse = softmax_max[..., 0] + torch.log(softmax_sum[..., 0])
        if blind == 0:
            return block_out, block_lse.to(lse_dtype)
        out[:, blind:] = block_out
        lse[:, :, blind:] = block_lse
        return out, lse

    def backward(self, dout, q, k, v, out, lse, *, scale, mask):
        self._check(q, k, v, scale)
        q_len, q_heads = q.shape[1], q.shape[2]
        k_len = k.shape[1]
        dq = torch.zeros_like(q)
        blind = q_len if k_len == 0 else self._blind_rows(q_len, k_len, mask)
        if blind == q_len:
            return dq, torch.zeros_like(k), torch.zeros_like(v)
        rows = slice(blind, None)
        row_lse = lse[:, :, rows].to(torch.float32)
        saw_nothing = torch.isneginf(row_lse)
        softmax_max = torch.where(saw_nothing, torch.full_like(row_lse, _FINITE_MAX), row_lse)
        softmax_max = softmax_max.unsqueeze(-1).expand(*row_lse.shape, SOFTMAX_STAT_COLUMNS).contiguous()
        softmax_sum = torch.ones_like(softmax_max)
        block_dq, dk, dv, *_ = self.ops.npu_fusion_attention_grad(
            _unit_rows(q[:, rows]), _unit_rows(k), _unit_rows(v), _unit_rows(dout[:, rows]), q_heads, LAYOUT,
            softmax_max=softmax_max, softmax_sum=softmax_sum, attention_in=_unit_rows(out[:, rows]),
            scale_value=float(scale), keep_prob=1.0, **self._mask_arguments(mask, q.device),
        )
        # Unconditional (a `.any()` test would sync the host inside the step loop);
        # such rows already get P = 0 from max = FLT_MAX, this pins dq to exactly 0.
        block_dq = block_dq.masked_fill(saw_nothing.transpose(1, 2).unsqueeze(-1), 0)
        dq[:, rows] = block_dq
        return dq, dk.to(k.dtype), dv.to(v.dtype)
