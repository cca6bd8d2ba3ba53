"""Balanced layouts for packed documents: which global tokens each rank holds.

A packed sequence of S tokens holds documents with boundaries
``cu_seqlens = [0, l1, l1 + l2, ..., S]``. Attention stays within a document,
causal within it when asked, and optionally within a sliding window
``(left, right)`` in flash-attn's meaning (-1: unbounded on that side).

A rank's work is the number of (query, key) entries its queries score. With
documents, a layout that ignores them leaves ranks unequal: the global zigzag
pairs an early chunk with a late one, which only balances one long causal
document. ``balanced_assignment`` instead gives every rank exactly S / N
tokens and about the same work:

* some documents, the heaviest first, are cut over all N ranks, each rank
  taking the same number of their tokens: each stretch of a document on which
  the keys seen per query grow linearly (a causal document, the start of a
  windowed one) is cut zigzag-wise within itself, an early and a late piece
  per rank; a stretch where every query sees as many keys (no mask, the rest
  of a windowed document) is cut into contiguous pieces;
* the other documents stay whole where they can, grouped with their
  neighbours into clumps so a rank holds few contiguous runs, and are dealt to
  ranks largest first, each to the rank whose final work is projected lowest,
  splitting a clump only where token counts force it.

Cutting more documents and using smaller clumps balance better but give more
runs, so the assignment tries the plain contiguous and global zigzag cuts
first, then cuts 0, 1, 2, 3, 4, 6, 9, ... of the heaviest documents with
clumps from coarse to fine, and keeps the candidate with the fewest runs
per rank whose largest work is within ``BALANCE_TOLERANCE`` of the mean (else
the best balanced one). Everything is a deterministic function of the
boundaries, the world size, ``causal`` and ``window``, so every rank computes
the same layout and ``shard_documents`` / ``unshard_documents`` are exact
inverses. ``benchmarks/document_balance.py`` prints the balance and runs
against the layouts that ignore documents.

The only divisibility requirement: S must be divisible by the world size N.
No document length needs to divide by anything.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from typing import Sequence

import torch

Run = tuple[int, int]  # global token positions [start, stop)

# The assignment stops refining once the largest rank's work is within this
# factor of the mean; finer granularity beyond it only buys more runs.
BALANCE_TOLERANCE = 1.03

# Clump sizes tried, as fractions of one rank's mean work and token count;
# 0 deals every uncut document alone.
_CLUMPS = (1.0, 0.5, 0.25, 0.125, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 0.0)


def _cut_counts(documents: int) -> list[int]:
    """How many of the heaviest documents a candidate cuts over all ranks: 0, 1, 2, 3, 4, 6, 9, ... all."""
    counts, count = [], 0
    while count < documents:
        counts.append(count)
        count = max(count + 1, count * 3 // 2)
    counts.append(documents)
    return counts


# ----------------------------------------------------------------- validation


def validate_cu_seqlens(cu_seqlens, total_length: int | None = None) -> tuple[int, ...]:
    """The boundaries as a tuple of Python ints, or a ValueError saying what is wrong.

    ``cu_seqlens`` is a 1-D int32/int64 tensor or a sequence of ints that starts
    at 0, increases strictly (every document has at least one token) and, when
    ``total_length`` is given, ends at it.
    """
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1:
            raise ValueError(
                f"cu_seqlens must be a 1-D integer tensor of document boundaries, got shape {tuple(cu_seqlens.shape)}"
            )
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must have dtype int32 or int64, got {cu_seqlens.dtype}")
        bounds = tuple(int(v) for v in cu_seqlens.tolist())
    else:
        try:
            bounds = tuple(cu_seqlens)
        except TypeError:
            raise ValueError(
                f"cu_seqlens must be a 1-D integer tensor or a sequence of ints, got {type(cu_seqlens).__name__}"
            ) from None
        for index, value in enumerate(bounds):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"cu_seqlens[{index}] must be an int, got {value!r}")
    if len(bounds) < 2:
        raise ValueError(f"cu_seqlens must hold at least two boundaries [0, ..., S], got {list(bounds)}")
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    for index in range(1, len(bounds)):
        if bounds[index] <= bounds[index - 1]:
            raise ValueError(
                f"cu_seqlens must increase strictly (documents are non-empty), "
                f"but cu_seqlens[{index}] = {bounds[index]} <= cu_seqlens[{index - 1}] = {bounds[index - 1]}"
            )
    if total_length is not None and bounds[-1] != total_length:
        raise ValueError(f"cu_seqlens must end at the sequence length {total_length}, got {bounds[-1]}")
    return bounds


def validate_window(window) -> tuple[int, int]:
    """``(left, right)`` with -1 for an unbounded side; None means (-1, -1)."""
    if window is None:
        return (-1, -1)
    try:
        left, right = window
    except (TypeError, ValueError):
        raise ValueError(f"window must be None or a pair (left, right), got {window!r}") from None
    for name, value in (("left", left), ("right", right)):
        if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < -1:
            raise ValueError(f"window {name} must be an int >= -1 (-1: unbounded), got {value!r}")
    return (int(left), int(right))


def _validate_world_size(world_size) -> int:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    return world_size


def _validate_rank(rank, world_size: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank!r} is outside [0, {world_size})")
    return rank


# -------------------------------------------------------- documents and positions


def document_lengths(cu_seqlens) -> list[int]:
    bounds = validate_cu_seqlens(cu_seqlens)
    return [stop - start for start, stop in zip(bounds, bounds[1:])]


def document_ids_and_positions(cu_seqlens, global_positions: torch.Tensor | None = None):
    """``(document_ids, positions_in_document)`` for each global position (all S by default).

    Both are int64 tensors shaped like ``global_positions``; a kernel derives a
    block's mask from these plus ``causal`` and ``window``.
    """
    bounds = validate_cu_seqlens(cu_seqlens)
    total = bounds[-1]
    boundaries = torch.tensor(bounds, dtype=torch.int64)
    if global_positions is None:
        global_positions = torch.arange(total, dtype=torch.int64)
    else:
        global_positions = torch.as_tensor(global_positions).to(torch.int64)
        if global_positions.numel() and (int(global_positions.min()) < 0 or int(global_positions.max()) >= total):
            raise ValueError(f"global positions must lie in [0, {total}) for these cu_seqlens")
    boundaries = boundaries.to(global_positions.device)
    document_ids = torch.searchsorted(boundaries, global_positions, right=True) - 1
    return document_ids, global_positions - boundaries[document_ids]


# ------------------------------------------------------------------ work model


def _document_prefix_work(length: int, count: int, causal: bool, left: int, right: int) -> int:
    """Keys seen by the first ``count`` queries of a document of ``length`` tokens.

    Query o sees keys max(0, o - L) .. min(length - 1, o + R), never fewer than
    itself since L, R >= 0; the sum has a closed form so huge documents cost
    nothing to score.
    """
    last = length - 1
    reach_left = left if left >= 0 else length
    reach_right = 0 if causal else (right if right >= 0 else length)
    # sum of min(last, o + R): o + R up to o = last - R, then flat at last
    rising = min(max(last - reach_right + 1, 0), count)
    upper = rising * reach_right + rising * (rising - 1) // 2 + (count - rising) * last
    # sum of max(0, o - L): zero up to o = L, then 1, 2, ...
    past = max(count - 1 - reach_left, 0)
    lower = past * (past + 1) // 2
    return upper - lower + count


class WorkModel:
    """Scored (query, key) entries of any global run of queries, in exact integers."""

    def __init__(self, cu_seqlens, *, causal: bool, window=None):
        self.bounds = validate_cu_seqlens(cu_seqlens)
        self.causal = bool(causal)
        self.left, self.right = validate_window(window)
        self.lengths = [stop - start for start, stop in zip(self.bounds, self.bounds[1:])]
        self.cumulative = [0]
        for length in self.lengths:
            self.cumulative.append(self.cumulative[-1] + self.document_prefix(length, length))

    @property
    def total(self) -> int:
        return self.cumulative[-1]

    def document_prefix(self, length: int, count: int) -> int:
        return _document_prefix_work(length, count, self.causal, self.left, self.right)

    def linear_segments(self, length: int) -> list[tuple[int, int, bool]]:
        """``(start, stop, flat)`` offsets where the keys seen per query change linearly.

        Keys seen by query o are min(l - 1, o + R) - max(0, o - L) + 1: it bends
        only where o + R reaches the end and where o - L leaves 0. On a linear
        stretch a zigzag cut gives every rank the same work, and on a flat one
        any equal cut does.
        """
        reach_left = self.left if self.left >= 0 else length
        reach_right = 0 if self.causal else (self.right if self.right >= 0 else length)
        bends = sorted({0, length, min(max(length - reach_right, 0), length), min(reach_left + 1, length)})
        segments = []
        for start, stop in zip(bends, bends[1:]):
            first = self.document_prefix(length, start + 1) - self.document_prefix(length, start)
            last = self.document_prefix(length, stop) - self.document_prefix(length, stop - 1)
            segments.append((start, stop, first == last))
        return segments

    def prefix(self, position: int) -> int:
        document = bisect.bisect_right(self.bounds, position) - 1
        if document >= len(self.lengths):
            return self.total
        return self.cumulative[document] + self.document_prefix(
            self.lengths[document], position - self.bounds[document]
        )

    def run(self, start: int, stop: int) -> int:
        return self.prefix(stop) - self.prefix(start)


# ---------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class DocumentLayout:
    """The global token runs each rank holds: sorted, disjoint, merged, S / N tokens per rank.

    A rank's local rows are its runs' tokens in increasing global position.
    """

    world_size: int
    total_length: int
    runs: tuple[tuple[Run, ...], ...]

    def __post_init__(self):
        if len(self.runs) != self.world_size:
            raise ValueError(f"layout has runs for {len(self.runs)} ranks, expected {self.world_size}")
        per_rank = self.total_length // self.world_size
        covered = []
        for rank, runs in enumerate(self.runs):
            tokens = 0
            for index, (start, stop) in enumerate(runs):
                if not start < stop or (index and runs[index - 1][1] >= start):
                    raise ValueError(f"rank {rank} runs must be non-empty, sorted, disjoint and merged: {runs}")
                tokens += stop - start
            if tokens != per_rank:
                raise ValueError(f"rank {rank} holds {tokens} tokens, expected {per_rank}")
            covered.extend(runs)
        covered.sort()
        position = 0
        for start, stop in covered:
            if start != position:
                raise ValueError(f"layout does not cover every token exactly once (at position {position})")
            position = stop
        if position != self.total_length:
            raise ValueError(f"layout covers {position} tokens, expected {self.total_length}")

    @property
    def tokens_per_rank(self) -> int:
        return self.total_length // self.world_size

    def rank_runs(self, rank: int) -> tuple[Run, ...]:
        return self.runs[_validate_rank(rank, self.world_size)]

    def runs_per_rank(self) -> list[int]:
        return [len(runs) for runs in self.runs]

    def rank_positions(self, rank: int) -> torch.Tensor:
        """Global position of each local row of ``rank`` (int64, increasing)."""
        return _runs_to_positions(self.rank_runs(rank))


def _runs_to_positions(runs: Sequence[Run]) -> torch.Tensor:
    if not runs:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat([torch.arange(start, stop, dtype=torch.int64) for start, stop in runs])


def _merged(pieces: list[Run]) -> tuple[Run, ...]:
    merged: list[list[int]] = []
    for start, stop in sorted(pieces):
        if merged and merged[-1][1] == start:
            merged[-1][1] = stop
        else:
            merged.append([start, stop])
    return tuple((start, stop) for start, stop in merged)


def _check_divisible(total: int, world_size: int, what: str = "world_size") -> None:
    if total % world_size:
        raise ValueError(
            f"sequence length S = {total} (cu_seqlens[-1]) must be divisible by {what} {world_size}: "
            f"every rank holds S / N tokens"
        )


def contiguous_assignment(total_length: int, world_size: int) -> DocumentLayout:
    """The layout that ignores documents: rank r holds the r-th of N equal slices."""
    world_size = _validate_world_size(world_size)
    _check_divisible(total_length, world_size)
    size = total_length // world_size
    return DocumentLayout(world_size, total_length, tuple(((r * size, (r + 1) * size),) for r in range(world_size)))


def global_zigzag_assignment(total_length: int, world_size: int) -> DocumentLayout:
    """The layout that ignores documents: 2N slices, rank r holds slices r and 2N-1-r.

    S must divide by 2N here; shown for comparison with ``balanced_assignment``.
    """
    world_size = _validate_world_size(world_size)
    _check_divisible(total_length, 2 * world_size, "2 * world_size")
    size = total_length // (2 * world_size)
    runs = tuple(
        _merged([(r * size, (r + 1) * size), ((2 * world_size - 1 - r) * size, (2 * world_size - r) * size)])
        for r in range(world_size)
    )
    return DocumentLayout(world_size, total_length, runs)


def work_per_rank(layout: DocumentLayout, cu_seqlens, causal: bool, window=None) -> list[int]:
    """Scored (query, key) entries of each rank's queries against all keys, under the document mask."""
    model = WorkModel(cu_seqlens, causal=causal, window=window)
    if model.bounds[-1] != layout.total_length:
        raise ValueError(f"cu_seqlens ends at {model.bounds[-1]} but the layout covers {layout.total_length} tokens")
    return [sum(model.run(start, stop) for start, stop in runs) for runs in layout.runs]


def imbalance(works: Sequence[int]) -> float:
    """Largest work over the mean work (1.0 is perfect balance)."""
    works = list(works)
    mean = sum(works) / len(works)
    return max(works) / mean if mean else 1.0


def _cut_segment(start: int, stop: int, world_size: int, rotation: int, flat: bool):
    """Each rank's pieces of one linear stretch cut over all ranks, and the few leftover tokens.

    Every rank gets floor(length / N) tokens. A rising (or falling) stretch is
    cut zigzag-wise, slot s taking head piece s and tail piece s counted from
    the end, so cheap queries pair with dear ones; a flat stretch is cut into
    contiguous pieces, one run each. ``rotation`` shifts which rank takes which
    slot so the rounding of many documents does not pile on one rank. The
    leftover length mod N tokens sit together (the middle, or the end of a flat
    stretch) and are dealt like a small document.
    """
    share, leftover = divmod(stop - start, world_size)
    pieces: list[list[Run]] = [[] for _ in range(world_size)]
    if flat:
        for slot in range(world_size):
            rank = (slot + rotation) % world_size
            pieces[rank].append((start + slot * share, start + (slot + 1) * share))
        return pieces, (stop - leftover, stop)
    head = share // 2
    tail = share - head
    for slot in range(world_size):
        rank = (slot + rotation) % world_size
        if head:
            pieces[rank].append((start + slot * head, start + (slot + 1) * head))
        if tail:
            pieces[rank].append((stop - (slot + 1) * tail, stop - slot * tail))
    return pieces, (start + world_size * head, stop - world_size * tail)


def _assign(model: WorkModel, world_size: int, cut: frozenset[int], clump: float) -> DocumentLayout:
    """One candidate layout.

    The documents indexed by ``cut`` are cut over all ranks; the others are
    grouped with their neighbours into clumps of at most ``clump`` of a rank's
    mean work and token count, and clumps are dealt.
    """
    bounds = model.bounds
    total_length = bounds[-1]
    per_rank = total_length // world_size
    clump_work_limit = clump * model.total / world_size
    clump_tokens = clump * per_rank

    pieces: list[list[Run]] = [[] for _ in range(world_size)]
    work = [0] * world_size
    free: list[Run] = []  # runs dealt whole where possible
    clump_start = clump_stop = None
    clump_work = 0
    rotation = 0
    for index, length in enumerate(model.lengths):
        start, stop = bounds[index], bounds[index + 1]
        document_work = model.cumulative[index + 1] - model.cumulative[index]
        if index in cut:
            if clump_start is not None:
                free.append((clump_start, clump_stop))
                clump_start = None
            for offset, end, flat in model.linear_segments(length):
                if end - offset < world_size:
                    free.append((start + offset, start + end))
                    continue
                split, leftover = _cut_segment(start + offset, start + end, world_size, rotation, flat)
                rotation += 1
                for rank, rank_pieces in enumerate(split):
                    pieces[rank].extend(rank_pieces)
                    work[rank] += sum(model.run(a, b) for a, b in rank_pieces)
                if leftover[0] < leftover[1]:
                    free.append(leftover)
            continue
        if clump_start is not None and (
            clump_work + document_work > clump_work_limit or clump_stop - clump_start + length > clump_tokens
        ):
            free.append((clump_start, clump_stop))
            clump_start = None
        if clump_start is None:
            clump_start, clump_work = start, 0
        clump_stop = stop
        clump_work += document_work
    if clump_start is not None:
        free.append((clump_start, clump_stop))

    capacity = [per_rank - sum(b - a for a, b in rank_pieces) for rank_pieces in pieces]
    items = sorted(((model.run(a, b), a, b) for a, b in free), key=lambda item: (-item[0], item[1]))
    remaining_work = sum(item[0] for item in items)
    remaining_tokens = sum(b - a for _, a, b in items)
    for item_work, start, stop in items:
        tokens = stop - start
        remaining_work -= item_work
        remaining_tokens -= tokens
        # what the rest will add per token of capacity left, so a rank that still
        # has much room is not mistaken for a light one
        density = remaining_work / remaining_tokens if remaining_tokens else 0.0
        fitting = [rank for rank in range(world_size) if capacity[rank] >= tokens]
        if fitting:
            rank = min(fitting, key=lambda r: (work[r] + item_work + density * (capacity[r] - tokens), r))
            pieces[rank].append((start, stop))
            work[rank] += item_work
            capacity[rank] -= tokens
            continue
        # no rank has room for all of it: pour it into the lightest ranks with room
        position = start
        for rank in sorted(
            (r for r in range(world_size) if capacity[r] > 0), key=lambda r: (work[r] + density * capacity[r], r)
        ):
            if position == stop:
                break
            end = min(stop, position + capacity[rank])
            pieces[rank].append((position, end))
            work[rank] += model.run(position, end)
            capacity[rank] -= end - position
            position = end
    return DocumentLayout(world_size, total_length, tuple(_merged(rank_pieces) for rank_pieces in pieces))


@functools.lru_cache(maxsize=64)
def _balanced(bounds: tuple[int, ...], world_size: int, causal: bool, window: tuple[int, int]) -> DocumentLayout:
    total_length = bounds[-1]
    if world_size == 1:
        return DocumentLayout(1, total_length, (((0, total_length),),))
    model = WorkModel(bounds, causal=causal, window=window)

    def score(layout: DocumentLayout) -> float:
        return imbalance([sum(model.run(a, b) for a, b in runs) for runs in layout.runs])

    # plain cuts first: one or two runs per rank, and often good enough
    plain = [contiguous_assignment(total_length, world_size)]
    if total_length % (2 * world_size) == 0:
        plain.append(global_zigzag_assignment(total_length, world_size))
    best_balanced, best_balanced_score = plain[0], score(plain[0])
    for candidate in plain:
        candidate_score = score(candidate)
        if candidate_score <= BALANCE_TOLERANCE:
            return candidate
        if candidate_score < best_balanced_score:
            best_balanced, best_balanced_score = candidate, candidate_score

    # cut the heaviest documents first; documents shorter than N cannot be cut evenly
    heaviest = sorted(
        (index for index, length in enumerate(model.lengths) if length >= world_size),
        key=lambda index: (model.cumulative[index] - model.cumulative[index + 1], index),
    )
    fewest_runs: DocumentLayout | None = None
    fewest_key = None
    for count in _cut_counts(len(heaviest)):
        # each cut document puts a run on every rank (two adjacent ones may merge)
        if fewest_key is not None and count // 2 >= fewest_key[0]:
            break
        cut = frozenset(heaviest[:count])
        # the finest clumps balance best: when they miss, coarser ones will too
        finest = _assign(model, world_size, cut, _CLUMPS[-1])
        finest_score = score(finest)
        if finest_score < best_balanced_score:
            best_balanced, best_balanced_score = finest, finest_score
        if finest_score > BALANCE_TOLERANCE:
            continue
        for clump in _CLUMPS:  # coarse to fine: the first that balances has the fewest runs
            candidate = finest if clump == _CLUMPS[-1] else _assign(model, world_size, cut, clump)
            candidate_score = score(candidate)
            if candidate_score <= BALANCE_TOLERANCE:
                key = (max(candidate.runs_per_rank()), sum(candidate.runs_per_rank()), candidate_score)
                if fewest_key is None or key < fewest_key:
                    fewest_runs, fewest_key = candidate, key
                break
    return fewest_runs if fewest_runs is not None else best_balanced


def balanced_assignment(cu_seqlens, world_size: int, *, causal: bool, window=None) -> DocumentLayout:
    """Which global token runs each rank holds: S / N tokens each, work balanced under the document mask.

    Deterministic in (boundaries, world_size, causal, window), and cached on them.
    S = cu_seqlens[-1] must be divisible by ``world_size``; nothing else must divide.
    """
    bounds = validate_cu_seqlens(cu_seqlens)
    world_size = _validate_world_size(world_size)
    _check_divisible(bounds[-1], world_size)
    return _balanced(bounds, world_size, bool(causal), validate_window(window))


# ----------------------------------------------------------- shard / unshard


def permutation(layout: DocumentLayout) -> torch.Tensor:
    """Global index of each row when the ranks' shards are concatenated in rank order (int64)."""
    return _runs_to_positions([run for runs in layout.runs for run in runs])


def inverse_permutation(layout: DocumentLayout) -> torch.Tensor:
    """For each global index, its row in the rank-order concatenation: ``inverse[permutation] = arange``."""
    forward = permutation(layout)
    inverse = torch.empty_like(forward)
    inverse[forward] = torch.arange(forward.numel(), dtype=forward.dtype)
    return inverse


def shard_documents(
    x: torch.Tensor,
    rank: int,
    world_size: int,
    cu_seqlens,
    *,
    dim: int = 1,
    causal: bool = True,
    window=None,
) -> torch.Tensor:
    """Rows of ``x`` (sequence along ``dim``) that ``rank`` holds under ``balanced_assignment``, in global order."""
    world_size = _validate_world_size(world_size)
    _validate_rank(rank, world_size)
    bounds = validate_cu_seqlens(cu_seqlens, total_length=x.shape[dim])
    layout = balanced_assignment(bounds, world_size, causal=causal, window=window)
    return x.index_select(dim, layout.rank_positions(rank).to(x.device))


def unshard_documents(
    parts: Sequence[torch.Tensor],
    cu_seqlens,
    *,
    dim: int = 1,
    causal: bool = True,
    window=None,
) -> torch.Tensor:
    """The full sequence from per-rank shards in rank order; the exact inverse of ``shard_documents``."""
    if len(parts) == 0:
        raise ValueError("unshard_documents needs at least one part")
    world_size = len(parts)
    bounds = validate_cu_seqlens(cu_seqlens)
    _check_divisible(bounds[-1], world_size)
    per_rank = bounds[-1] // world_size
    for rank, part in enumerate(parts):
        if part.shape[dim] != per_rank:
            raise ValueError(
                f"part of rank {rank} has {part.shape[dim]} rows along dim {dim}, expected S / N = {per_rank}"
            )
    layout = balanced_assignment(bounds, world_size, causal=causal, window=window)
    joined = torch.cat(list(parts), dim=dim)
    return joined.index_select(dim, inverse_permutation(layout).to(joined.device))
