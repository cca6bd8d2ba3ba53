"""Non-finite inputs give NaN outputs, without waiting for the device.

A kernel cannot tell a score of -inf that came from an infinite input from a
masked one, and what it does with a row of NaN scores is its own affair:
torch's CPU flash operator returns out 0 and lse 0 for all-NaN query rows in
short blocks on some CPUs. So the guarantee must not pass through the kernel.
Refusing such input means reading values on the host, a device sync on every
call; that is opt-in (``TOKENRING_CHECKS=full``, `tokenring.validation`).

By default the engine carries a *poison* past the kernel: a 0-dim tensor that
is 0 when a tensor's values are all finite and NaN otherwise (one `aminmax`,
on the device). The executor adds it to the partial results themselves:

* q's poison spoils its own rank's result (every row it owns);
* k's poison spoils the lse (and out) of every block computed against k,
  wherever that block runs. Keys that travel carry it with them: the copy of
  k that leaves its rank is made with the poison added (the same copy the
  executor made anyway), so the receiver reads it from any one element
  (`witness`), without a pass over the piece;
* a NaN lse spoils out wherever partials merge (`merge_partial_` weighs a
  row by exp(lse − max)), and the one partial taken without a merge gets the
  poison added to its out as it is copied.

A non-finite v reaches the output through the kernel's own product with v.
"""

from __future__ import annotations

import torch


def poison_of(t: torch.Tensor) -> torch.Tensor:
    """0-dim: 0 when every value of ``t`` is finite, NaN otherwise; one read of ``t``, no host sync."""
    if not t.is_floating_point() or t.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=t.device)
    low, high = torch.aminmax(t)  # NaN propagates into both; +-inf shows in one
    return low.float() * 0 + high.float() * 0  # never overflows


def witness(t: torch.Tensor) -> torch.Tensor:
    """The poison of a tensor that is all NaN or not at all (a poisoned copy): read from one element."""
    return t[(0,) * t.dim()].float() * 0


def poisoned(t: torch.Tensor, poison: torch.Tensor, *, dtype: torch.dtype | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """A copy of ``t`` (in ``dtype``, or into ``out``) with ``poison`` added: the copy that was needed anyway."""
    if out is None:
        out = torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device)
    return torch.add(t, poison, out=out)

