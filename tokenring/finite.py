"""Non-finite inputs give NaN outputs, without waiting for the device.

A kernel cannot tell a score of -inf that came from an infinite input from a
masked one: a row whose scores are all -inf counts as a row that saw no key
(out 0), and a key whose scores are -inf is skipped. Either way a NaN or an
infinity in q or k could come out as a finite, wrong answer. Refusing such
input means reading tensor values on the host, a device sync on every call,
so that is opt-in (``TOKENRING_CHECKS=full``, `tokenring.validation`). By
default the engine turns the whole q (or k) of a rank into NaN when any of
its values is not finite, on the device: every output row that q's rows or
k's keys reach is then NaN. A non-finite v reaches the output by itself.
"""

from __future__ import annotations

import torch


def nan_if_not_finite(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when every value is finite, else all NaN; no host sync, one read of ``t``."""
    if not t.is_floating_point() or t.numel() == 0:
        return t
    low, high = torch.aminmax(t)  # NaN propagates into both; +-inf shows in one
    poison = low * 0 + high * 0  # 0 when both are finite, NaN otherwise; never overflows
    return t + poison
