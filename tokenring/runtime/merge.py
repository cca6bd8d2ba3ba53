"""Combining partial attention results by their log-sum-exp."""

from __future__ import annotations

import torch


def merge_partial_(
    acc_out: torch.Tensor,
    acc_lse: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    """Fold the partial (out, lse) into the accumulator (acc_out, acc_lse), in place.

    acc_out is (B, S, H, D) in the accumulation dtype (float32, or float64 for
    float64 inputs); acc_lse and lse are (B, H, S). Either side may be a row
    that has seen no key (lse = -inf): the result stays finite and such a row
    keeps out 0 and lse -inf.
    """
    new_lse = torch.logaddexp(acc_lse, lse)
    # exp(-inf - -inf) would be NaN; where nothing was seen, weigh both sides 0.
    finite = torch.where(torch.isneginf(new_lse), torch.zeros_like(new_lse), new_lse)
    acc_weight = torch.exp(acc_lse - finite).transpose(1, 2).unsqueeze(-1)
    new_weight = torch.exp(lse - finite).transpose(1, 2).unsqueeze(-1)
    acc_out.mul_(acc_weight).add_(out.to(acc_out.dtype) * new_weight)
    acc_lse.copy_(new_lse)
