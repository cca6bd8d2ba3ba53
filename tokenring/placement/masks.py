"""The mask of one call over global token positions: packed documents, a window, causal, padding.

A `TokenMask` is plan data (hashable, no tensors): which global tokens each
rank holds (sorted runs of positions), where the documents of the packed
sequence start and end, and whether attention is causal and windowed. Query
token i of document [a, b) sees key j when

    a <= j < b,   j <= i (causal),   i - left <= j <= i + right (window, -1 unbounded)

so every row's visible keys are one interval of global positions,
[low(i), high(i)]. Tokens from the last boundary to the end of the sequence
are padding: they see no key and no query sees them.

Because each shard's rows are in increasing global position, the keys a row
sees inside any span of a shard are one run of that span's rows too, found by
binary search. That makes every question a plan asks about a block (empty?
fully visible? which rows at all?) cost O(rows · log rows), never rows².
"""

from __future__ import annotations

import bisect
import functools
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from tokenring.interfaces import PositionMask

Runs = tuple[tuple[int, int], ...]  # sorted, disjoint [start, stop) runs of global positions


@dataclass(frozen=True)
class TokenMask:
    """Which global tokens each rank holds, and what each query token may see.

    ``runs[r]`` are the positions of rank r's query rows, and of its key/value
    rows too unless ``kv_runs`` says otherwise: with ``kv_runs`` the queries of
    a call and its keys/values are different tokens (new tokens against a
    cache, `tokenring.inference`). Every rank holds as many query rows as
    every other, and as many key/value rows; positions are unique per side
    and below ``seq_len``.
    """

    seq_len: int
    runs: tuple[Runs, ...]        # runs[r]: the global positions of rank r's query rows, in local row order
    boundaries: tuple[int, ...]   # [0, l1, l1+l2, ..., end]; tokens from end to seq_len are padding
    causal: bool
    window: tuple[int, int] | None = None  # (left, right), -1 unbounded on that side
    kv_runs: tuple[Runs, ...] | None = None  # rank r's key/value rows; None: the same tokens as its queries

    def __post_init__(self) -> None:
        if self.kv_runs is not None:
            if len(self.kv_runs) != len(self.runs):
                raise ValueError(f"kv_runs for {len(self.kv_runs)} ranks, runs for {len(self.runs)}")
            for name, all_runs in (("runs", self.runs), ("kv_runs", self.kv_runs)):
                lengths = {_run_length(r) for r in all_runs}
                if len(lengths) > 1:
                    raise ValueError(f"every rank must hold as many rows of {name}, got {sorted(lengths)}")

    @property
    def world_size(self) -> int:
        return len(self.runs)

    @property
    def rows_per_rank(self) -> int:
        """Query rows per rank."""
        if self.kv_runs is None:
            return self.seq_len // self.world_size
        return _run_length(self.runs[0]) if self.runs else 0

    @property
    def kv_rows_per_rank(self) -> int:
        """Key/value rows per rank."""
        if self.kv_runs is None:
            return self.rows_per_rank
        return _run_length(self.kv_runs[0]) if self.kv_runs else 0

    @property
    def key_runs(self) -> tuple[Runs, ...]:
        return self.runs if self.kv_runs is None else self.kv_runs

    def describe(self) -> str:
        documents = len(self.boundaries) - 1
        padding = self.seq_len - self.boundaries[-1]
        parts = [f"{documents} document{'s' if documents != 1 else ''}"]
        if padding:
            parts.append(f"{padding} padding tokens")
        if self.causal:
            parts.append("causal")
        if self.window is not None:
            parts.append(f"window {self.window}")
        return ", ".join(parts)

    # Plan-time tables are numpy arrays: planning is host work, and numpy's small-array calls cost
    # microseconds where torch's cost a millisecond.
    def positions(self, rank: int) -> np.ndarray:
        return _positions(self, rank)

    def documents(self, rank: int) -> np.ndarray:
        """Document index of each of ``rank``'s query rows; -1 for padding."""
        return _documents(self, rank)

    def kv_positions(self, rank: int) -> np.ndarray:
        """Global positions of ``rank``'s key/value rows."""
        return _kv_tables(self)[0][rank] if self.kv_runs is not None else _positions(self, rank)

    def kv_documents(self, rank: int) -> np.ndarray:
        """Document index of each of ``rank``'s key/value rows; -1 for padding."""
        return _kv_tables(self)[1][rank] if self.kv_runs is not None else _documents(self, rank)

    def limits(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(low, high): the global positions each of ``rank``'s query rows may see, inclusive."""
        return _limits(self, rank)

    def visible_counts(self, q_owner: int, q_rows: tuple[int, int], kv_owner: int,
                       kv_rows: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """For each query row of the rectangle: (first visible key row, how many), keys local to the span."""
        low, high = self.limits(q_owner)
        low, high = low[q_rows[0]:q_rows[1]], high[q_rows[0]:q_rows[1]]
        keys = self.kv_positions(kv_owner)[kv_rows[0]:kv_rows[1]]
        first = np.searchsorted(keys, low, side="left")
        stop = np.searchsorted(keys, high, side="right")
        return first, np.maximum(stop - first, 0)

    def position_mask(self, q_owner: int, q_rows: tuple[int, int], kv_owner: int, kv_rows: tuple[int, int],
                      device: torch.device) -> PositionMask:
        """What a kernel needs to mask one block: the rows' global positions and documents."""
        def on_device(t: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(t)).to(device)

        return PositionMask(
            q_positions=on_device(self.positions(q_owner)[q_rows[0]:q_rows[1]]),
            k_positions=on_device(self.kv_positions(kv_owner)[kv_rows[0]:kv_rows[1]]),
            q_documents=on_device(self.documents(q_owner)[q_rows[0]:q_rows[1]]),
            k_documents=on_device(self.kv_documents(kv_owner)[kv_rows[0]:kv_rows[1]]),
            causal=self.causal,
            window=self.window,
        )


@dataclass(frozen=True)
class BlockVisibility:
    """What the mask leaves of one rectangle of a block: nothing, all of it, or some rows of each side."""

    empty: bool
    full: bool
    q_rows: tuple[int, int]   # the hull of query rows that see something (local to the shard)
    kv_rows: tuple[int, int]  # the hull of key rows seen by some row
    entries: int              # visible (query, key) pairs


def visibility(mask: TokenMask, q_owner: int, q_rows: tuple[int, int], kv_owner: int,
               kv_rows: tuple[int, int]) -> BlockVisibility:
    first, count = mask.visible_counts(q_owner, q_rows, kv_owner, kv_rows)
    entries = int(count.sum())
    if entries == 0:
        return BlockVisibility(True, False, q_rows, kv_rows, 0)
    width = kv_rows[1] - kv_rows[0]
    seeing = np.flatnonzero(count > 0)
    q_hull = (q_rows[0] + int(seeing[0]), q_rows[0] + int(seeing[-1]) + 1)
    kv_first = int(first[seeing].min())
    kv_stop = int((first[seeing] + count[seeing]).max())
    full = entries == (q_rows[1] - q_rows[0]) * width
    return BlockVisibility(False, full, q_hull, (kv_rows[0] + kv_first, kv_rows[0] + kv_stop), entries)


# -- per-rank tables, computed once per mask (the mask is hashable plan data) --

def _run_length(runs: Runs) -> int:
    return sum(b - a for a, b in runs)


def _runs_positions(all_runs: tuple[Runs, ...]) -> tuple[np.ndarray, ...]:
    return tuple(np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in runs]) if runs
                 else np.zeros(0, dtype=np.int64) for runs in all_runs)


def _runs_documents(mask: TokenMask, positions: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    bounds = np.asarray(mask.boundaries, dtype=np.int64)
    tables = []
    for rank_positions in positions:
        document = np.searchsorted(bounds, rank_positions, side="right") - 1
        document[rank_positions >= mask.boundaries[-1]] = -1
        tables.append(document)
    return tuple(tables)


@functools.lru_cache(maxsize=256)
def _positions_table(mask: TokenMask) -> tuple[np.ndarray, ...]:
    return _runs_positions(mask.runs)


@functools.lru_cache(maxsize=256)
def _kv_tables(mask: TokenMask) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """(positions, documents) of each rank's key/value rows, for a mask with ``kv_runs``."""
    assert mask.kv_runs is not None
    positions = _runs_positions(mask.kv_runs)
    return positions, _runs_documents(mask, positions)


def _positions(mask: TokenMask, rank: int) -> np.ndarray:
    return _positions_table(mask)[rank]


@functools.lru_cache(maxsize=256)
def _documents_table(mask: TokenMask) -> tuple[np.ndarray, ...]:
    return _runs_documents(mask, _positions_table(mask))


def _documents(mask: TokenMask, rank: int) -> np.ndarray:
    return _documents_table(mask)[rank]


@functools.lru_cache(maxsize=256)
def _limits_table(mask: TokenMask) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    bounds = np.asarray(mask.boundaries, dtype=np.int64)
    tables = []
    for rank in range(mask.world_size):
        positions = _positions(mask, rank)
        document = _documents(mask, rank)
        padding = document < 0
        safe = np.maximum(document, 0)
        low = bounds[safe].copy()
        high = bounds[np.minimum(safe + 1, len(bounds) - 1)] - 1
        if mask.causal:
            high = np.minimum(high, positions)
        if mask.window is not None:
            left, right = mask.window
            if left >= 0:
                low = np.maximum(low, positions - left)
            if right >= 0:
                high = np.minimum(high, positions + right)
        # A padding row sees nothing: an empty interval.
        low[padding] = 1
        high[padding] = 0
        tables.append((low, high))
    return tuple(tables)


def _limits(mask: TokenMask, rank: int) -> tuple[np.ndarray, np.ndarray]:
    return _limits_table(mask)[rank]


@functools.lru_cache(maxsize=256)
def visible_runs(mask: TokenMask) -> dict:
    """Per query owner, filled as asked by `tokenring.schedules.masked`: the (first, stop) key rows each of its
    query rows sees over each whole key shard (a row's visible keys are one run of rows), and the entries of
    each pair of shards."""
    return {}


def dense_allowed(mask: PositionMask) -> torch.Tensor:
    """(Sq, Sk) boolean: which key each query row of a block sees. For kernels that take explicit masks."""
    qp, kp = mask.q_positions.unsqueeze(1), mask.k_positions.unsqueeze(0)
    allowed = (mask.q_documents.unsqueeze(1) == mask.k_documents.unsqueeze(0)) & (mask.q_documents.unsqueeze(1) >= 0)
    if mask.causal:
        allowed &= kp <= qp
    if mask.window is not None:
        left, right = mask.window
        if left >= 0:
            allowed &= kp >= qp - left
        if right >= 0:
            allowed &= kp <= qp + right
    return allowed


def full_sequence_mask(seq_len: int, boundaries: tuple[int, ...], causal: bool,
                       window: tuple[int, int] | None) -> torch.Tensor:
    """(S, S) boolean mask of plain attention over the whole sequence: the reference's."""
    positions = torch.arange(seq_len, dtype=torch.int64)
    bounds = torch.tensor(boundaries, dtype=torch.int64)
    documents = torch.searchsorted(bounds, positions, right=True) - 1
    documents[positions >= boundaries[-1]] = -1
    return dense_allowed(PositionMask(positions, positions, documents, documents, causal, window))


def contiguous_runs(seq_len: int, world_size: int) -> tuple[Runs, ...]:
    length = seq_len // world_size
    return tuple(((r * length, (r + 1) * length),) for r in range(world_size))


def zigzag_runs(seq_len: int, world_size: int) -> tuple[Runs, ...]:
    chunk = seq_len // (2 * world_size)
    return tuple(((r * chunk, (r + 1) * chunk), ((2 * world_size - 1 - r) * chunk, (2 * world_size - r) * chunk))
                 for r in range(world_size))


@functools.lru_cache(maxsize=4096)  # the same blocks come back on every call with the same mask
def cached_position_mask(mask: TokenMask, q_owner: int, q_rows: tuple[int, int], kv_owner: int,
                         kv_rows: tuple[int, int], device: torch.device) -> PositionMask:
    return mask.position_mask(q_owner, q_rows, kv_owner, kv_rows, device)


@functools.lru_cache(maxsize=64)
def layout_runs(seq_len: int, world_size: int, layout: str, boundaries: tuple[int, ...] | None) -> tuple[Runs, ...]:
    """Which global tokens each rank holds under ``layout``, given the documents.

    With documents (or padding) and the zigzag layout the tokens are placed per
    document (`tokenring.placement.documents`), so that causal work stays balanced
    whatever the lengths; otherwise the layout's usual chunks. Depends on
    nothing else, so `shard` and the call agree.
    """
    if layout == "zigzag" and boundaries is not None:
        from tokenring.placement.documents import balanced_assignment

        # Trailing padding is placed like one more document, so every rank gets its share of it.
        placed = boundaries if boundaries[-1] == seq_len else boundaries + (seq_len,)
        assignment = balanced_assignment(placed, world_size, causal=True)
        return tuple(tuple((int(a), int(b)) for a, b in rank_runs) for rank_runs in assignment.runs)
    if layout == "zigzag":
        return zigzag_runs(seq_len, world_size)
    return contiguous_runs(seq_len, world_size)


@functools.lru_cache(maxsize=64)
def token_mask_for_call(seq_len: int, world_size: int, layout: str, causal: bool,
                        window: tuple[int, int] | None, boundaries: tuple[int, ...] | None) -> TokenMask:
    """The `TokenMask` of a call: which tokens each rank holds under ``layout``, and what they may see."""
    runs = layout_runs(seq_len, world_size, layout, boundaries)
    return TokenMask(seq_len, runs, boundaries if boundaries is not None else (0, seq_len), causal, window)


def mask_fingerprint(boundaries: tuple[int, ...] | None, window: tuple[int, int] | None) -> str:
    """A short, readable summary every rank must share: documents (count, end, digest) and window."""
    parts = []
    if boundaries is not None:
        digest = hashlib.sha1(",".join(map(str, boundaries)).encode()).hexdigest()[:12]
        parts.append(f"{len(boundaries) - 1} documents ending at {boundaries[-1]} (boundaries sha1 {digest})")
    if window is not None:
        parts.append(f"window {list(window)}")
    return "; ".join(parts)


@dataclass(frozen=True)
class Segment:
    """Rows [row, row + length) of a shard: consecutive global positions [position, ...) of one document."""

    row: int
    position: int
    length: int
    document: int  # -1: padding


@functools.lru_cache(maxsize=256)
def _segments_table(mask: TokenMask) -> tuple[tuple[Segment, ...], ...]:
    return _runs_segments(mask, mask.runs)


@functools.lru_cache(maxsize=256)
def _kv_segments_table(mask: TokenMask) -> tuple[tuple[Segment, ...], ...]:
    return _runs_segments(mask, mask.key_runs)


def _runs_segments(mask: TokenMask, all_runs: tuple[Runs, ...]) -> tuple[tuple[Segment, ...], ...]:
    bounds = mask.boundaries
    tables = []
    for runs in all_runs:
        segments, row = [], 0
        for start, stop in runs:
            position = start
            while position < stop:
                if position >= bounds[-1]:
                    document, end = -1, stop
                else:
                    document = bisect.bisect_right(bounds, position) - 1
                    end = min(stop, bounds[document + 1])
                segments.append(Segment(row, position, end - position, document))
                row += end - position
                position = end
        tables.append(tuple(segments))
    return tuple(tables)


def segments(mask: TokenMask, rank: int) -> tuple[Segment, ...]:
    """The segments of ``rank``'s query rows."""
    return _segments_table(mask)[rank]


def kv_segments(mask: TokenMask, rank: int) -> tuple[Segment, ...]:
    """The segments of ``rank``'s key/value rows."""
    if mask.kv_runs is None:
        return _segments_table(mask)[rank]
    return _kv_segments_table(mask)[rank]


def visible_rectangles(mask: TokenMask, q_owner: int, q_rows: tuple[int, int], kv_owner: int,
                       kv_rows: tuple[int, int]) -> list[tuple[tuple[int, int], tuple[int, int], bool]]:
    """The non-empty pieces of a rectangle: one per pair of same-document segments that meet.

    Each is (query rows, key rows, fully visible), the rows trimmed to those
    that see something and the keys seen, found in closed form: within one
    document the visible keys of query i are [low(i), high(i)], both
    non-decreasing in i.
    """
    left, right = mask.window if mask.window is not None else (-1, -1)
    bounds = mask.boundaries
    by_document: dict[int, list[tuple[int, int, int]]] = {}  # document -> (first row, first position, length)
    for seg in kv_segments(mask, kv_owner):
        first, stop = max(seg.row, kv_rows[0]), min(seg.row + seg.length, kv_rows[1])
        if seg.document >= 0 and first < stop:
            by_document.setdefault(seg.document, []).append((first, seg.position + first - seg.row, stop - first))
    pieces = []
    for seg in segments(mask, q_owner):
        keys = by_document.get(seg.document)
        first, stop = max(seg.row, q_rows[0]), min(seg.row + seg.length, q_rows[1])
        if keys is None or first >= stop:
            continue
        q_row0, p0, p1 = first, seg.position + first - seg.row, seg.position + stop - seg.row  # positions [p0, p1)
        doc_start, doc_last = bounds[seg.document], bounds[seg.document + 1] - 1

        def low(i: int) -> int:
            return max(doc_start, i - left) if left >= 0 else doc_start

        def high(i: int) -> int:
            h = doc_last
            if mask.causal:
                h = min(h, i)
            if right >= 0:
                h = min(h, i + right)
            return h

        for k_row0, k0, count in keys:
            k1 = k0 + count  # key positions [k0, k1)
            i_first = p0
            if mask.causal:
                i_first = max(i_first, k0)
            if right >= 0:
                i_first = max(i_first, k0 - right)
            i_last = p1 - 1
            if left >= 0:
                i_last = min(i_last, k1 - 1 + left)
            if i_first > i_last:
                continue
            j_first, j_last = max(low(i_first), k0), min(high(i_last), k1 - 1)
            full = low(i_last) <= j_first and high(i_first) >= j_last
            pieces.append(((q_row0 + i_first - p0, q_row0 + i_last - p0 + 1),
                           (k_row0 + j_first - k0, k_row0 + j_last - k0 + 1), full))
    return pieces


def clear_tables() -> None:
    """Forget every mask's per-rank tables and kernel masks.

    They are cached per mask, which suits training (the same masks come
    back); a KV cache makes a new mask for every prefill chunk, each with
    tables as long as the cache, so `tokenring.inference` drops the old ones.
    """
    for cached in (_positions_table, _kv_tables, _documents_table, _limits_table, cached_position_mask,
                   _segments_table, _kv_segments_table, visible_runs):
        cached.cache_clear()
