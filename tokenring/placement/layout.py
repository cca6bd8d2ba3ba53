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


def shard(x: torch.Tensor, rank: int, world_size: int, *, layout: "Layout | str", dim: int = 1,
          cu_seqlens: "torch.Tensor | Sequence[int] | None" = None) -> torch.Tensor:
    """This rank's shard of the full-sequence tensor ``x`` (sequence along ``dim``).

    With ``cu_seqlens`` (packed documents, see `tokenring.token_ring_attn`) and
    the zigzag layout, tokens are placed per document: pass the same
    ``cu_seqlens`` to `unshard`. The sequence length must then divide by
    ``world_size`` only.
    """
    layout = parse_layout(layout)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    if cu_seqlens is not None:
        runs = _document_runs(x.shape[dim], world_size, layout, cu_seqlens, dim)
        return torch.cat([x.narrow(dim, a, b - a) for a, b in runs[rank]], dim=dim)
    n_chunks = world_size * chunks_per_rank(layout)
    length = x.shape[dim]
    if length % n_chunks:
        raise ValueError(
            f"sequence length {length} (dim {dim}) must be divisible by {n_chunks} "
            f"for layout {layout.value!r} over {world_size} ranks"
        )
    chunks = x.chunk(n_chunks, dim=dim)
    return torch.cat([chunks[c] for c in rank_chunks(layout, rank, world_size)], dim=dim)


def unshard(parts: Sequence[torch.Tensor], *, layout: "Layout | str", dim: int = 1,
            cu_seqlens: "torch.Tensor | Sequence[int] | None" = None) -> torch.Tensor:
    """The full-sequence tensor from per-rank shards given in rank order (the inverse of `shard`)."""
    layout = parse_layout(layout)
    world_size = len(parts)
    if world_size == 0:
        raise ValueError("unshard needs at least one part")
    if cu_seqlens is not None:
        seq_len = sum(part.shape[dim] for part in parts)
        runs = _document_runs(seq_len, world_size, layout, cu_seqlens, dim)
        pieces: list[tuple[int, torch.Tensor]] = []
        for rank, part in enumerate(parts):
            if part.shape[dim] != seq_len // world_size:
                raise ValueError(f"part of rank {rank} has {part.shape[dim]} rows along dim {dim}, "
                                 f"expected {seq_len // world_size}")
            offset = 0
            for a, b in runs[rank]:
                pieces.append((a, part.narrow(dim, offset, b - a)))
                offset += b - a
        return torch.cat([piece for _, piece in sorted(pieces, key=lambda p: p[0])], dim=dim)
    per_rank = chunks_per_rank(layout)
    chunks: list[torch.Tensor | None] = [None] * (world_size * per_rank)
    for rank, part in enumerate(parts):
        if part.shape[dim] % per_rank:
            raise ValueError(f"part of rank {rank} has odd length {part.shape[dim]} along dim {dim}")
        for chunk, index in zip(part.chunk(per_rank, dim=dim), rank_chunks(layout, rank, world_size)):
            chunks[index] = chunk
    return torch.cat(chunks, dim=dim)  # type: ignore[arg-type]


def _document_runs(seq_len: int, world_size: int, layout: Layout, cu_seqlens, dim: int):
    from tokenring.placement.documents import validate_cu_seqlens
    from tokenring.placement.masks import layout_runs

    if seq_len % world_size:
        raise ValueError(f"sequence length {seq_len} (dim {dim}) must be divisible by the world size {world_size}")
    values = validate_cu_seqlens(cu_seqlens)
    if values[-1] > seq_len:
        raise ValueError(f"cu_seqlens ends at {values[-1]}, past the sequence length {seq_len}")
    return layout_runs(seq_len, world_size, layout.value, tuple(int(v) for v in values))
