"""How a sequence is cut into per-rank shards.

* ``contiguous``: the sequence is cut into N chunks; rank r holds chunk r.
* ``zigzag``: the sequence is cut into 2N chunks; rank r holds chunks r and
  2N-1-r, in that order. With a causal mask every rank then has the same
  amount of work, and each local shard splits into a FIRST and a SECOND half.
"""

from __future__ import annotations

import enum
from typing import Sequence

import torch


class Layout(str, enum.Enum):
    CONTIGUOUS = "contiguous"
    ZIGZAG = "zigzag"


def parse_layout(layout: "Layout | str") -> Layout:
    try:
        return Layout(layout)
    except ValueError:
        choices = ", ".join(repr(x.value) for x in Layout)
        raise ValueError(f"unknown layout {layout!r}; expected one of {choices}") from None


def default_layout(causal: bool) -> str:
    """zigzag balances causal work across ranks; without a mask contiguous is as good and simpler."""
    return Layout.ZIGZAG.value if causal is True else Layout.CONTIGUOUS.value


def chunks_per_rank(layout: Layout) -> int:
    return 2 if Layout(layout) is Layout.ZIGZAG else 1


def rank_chunks(layout: Layout, rank: int, world_size: int) -> tuple[int, ...]:
    """Global chunk indices held by ``rank``, in local order."""
    if Layout(layout) is Layout.ZIGZAG:
        return (rank, 2 * world_size - 1 - rank)
    return (rank,)


def shard(x: torch.Tensor, rank: int, world_size: int, *, layout: "Layout | str", dim: int = 1) -> torch.Tensor:
    """This rank's shard of the full-sequence tensor ``x`` (sequence along ``dim``)."""
    layout = parse_layout(layout)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    n_chunks = world_size * chunks_per_rank(layout)
    length = x.shape[dim]
    if length % n_chunks:
        raise ValueError(
            f"sequence length {length} (dim {dim}) must be divisible by {n_chunks} "
            f"for layout {layout.value!r} over {world_size} ranks"
        )
    chunks = x.chunk(n_chunks, dim=dim)
    return torch.cat([chunks[c] for c in rank_chunks(layout, rank, world_size)], dim=dim)


def unshard(parts: Sequence[torch.Tensor], *, layout: "Layout | str", dim: int = 1) -> torch.Tensor:
    """The full-sequence tensor from per-rank shards given in rank order."""
    layout = parse_layout(layout)
    world_size = len(parts)
    if world_size == 0:
        raise ValueError("unshard needs at least one part")
    per_rank = chunks_per_rank(layout)
    chunks: list[torch.Tensor | None] = [None] * (world_size * per_rank)
    for rank, part in enumerate(parts):
        if part.shape[dim] % per_rank:
            raise ValueError(f"part of rank {rank} has odd length {part.shape[dim]} along dim {dim}")
        for chunk, index in zip(part.chunk(per_rank, dim=dim), rank_chunks(layout, rank, world_size)):
            chunks[index] = chunk
    return torch.cat(chunks, dim=dim)  # type: ignore[arg-type]
