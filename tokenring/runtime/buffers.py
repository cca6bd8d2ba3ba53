"""Message buffers reused across steps and calls.

What a rank holds while it runs a plan, and when each buffer goes back to the
pool, is decided once per plan by `tokenring.runtime.program`: a buffer that was sent
goes back only after the step that sent it has been waited on, so a send in
flight never sees its data change.
"""

from __future__ import annotations

import torch

from tokenring.plan.model import Payload

# Payloads a rank holds until it sends them home (or on), then drops.
RESULTS = (Payload.PARTIAL, Payload.GRAD_PARTIAL, Payload.GRAD_KEY_VALUE)


class BufferPool:
    """Receive and packing buffers reused across steps and calls of equal shapes."""

    def __init__(self) -> None:
        self._free: dict[tuple[tuple[int, ...], torch.dtype, torch.device], list[torch.Tensor]] = {}
        self._problem: object = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        free = self._free.get((tuple(shape), dtype, device))
        return free.pop() if free else torch.empty(shape, dtype=dtype, device=device)

    def give(self, tensor: torch.Tensor) -> None:
        self._free.setdefault((tuple(tensor.shape), tensor.dtype, tensor.device), []).append(tensor)

    def clear(self) -> None:
        self._free.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for free in self._free.values() for t in free)

    def keep_only_for(self, problem: object) -> None:
        """Drop the buffers of earlier problems when the problem changes, so memory stays bounded."""
        if problem != self._problem:
            self._free.clear()
            self._problem = problem
