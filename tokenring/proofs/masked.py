"""The proof of masked plans (`tokenring.schedules.masked`), by counting.

Masking only removes pairs nobody may see from a proven full plan, so what is
left to prove is that nothing visible was lost or doubled: per (query owner,
key owner), the blocks' rectangles are disjoint and their visible pairs add
up to all the pairs the mask lets through.
"""

from __future__ import annotations

import numpy as np

from tokenring.interfaces import Mask
from tokenring.placement.masks import TokenMask, visible_runs
from tokenring.plan.model import Plan, PlanError


def check_masked_plan(plan: Plan) -> None:
    """Prove by counting that a masked plan computes each visible pair exactly once.

    Per (query owner, key owner): the blocks' rectangles are disjoint and
    their visible pairs add up to all the pairs the mask lets through.
    Results reaching their owners is proven for the full plan this one came
    from; `tokenring.proofs.plancheck.check_plan` proves both pair by pair on small
    sizes.
    """
    tokens = plan.tokens
    if tokens is None:
        raise ValueError("check_masked_plan needs a masked plan")
    q_length, kv_length = tokens.rows_per_rank, tokens.kv_rows_per_rank
    found = [(step.index, b, b.q_span.row_range(q_length), b.kv_span.row_range(kv_length))
             for step in plan.steps for b in step.blocks]
    entries, full, required = _count_visible(tokens, [(b.q_owner, b.kv_owner) + q_rows + kv_rows
                                                      for _, b, q_rows, kv_rows in found])
    rectangles: dict[tuple[int, int], list[tuple[tuple[int, int], tuple[int, int]]]] = {}
    counted: dict[tuple[int, int], int] = {}
    for (index, b, q_rows, kv_rows), seen, whole in zip(found, entries, full):
        key = (b.q_owner, b.kv_owner)
        if b.mask is Mask.NONE and not whole:
            raise PlanError(f"step {index}: unmasked block hides masked pairs: {b}")
        for other_q, other_kv in rectangles.get(key, ()):
            if _overlap(q_rows, other_q) and _overlap(kv_rows, other_kv):
                raise PlanError(f"step {index}: block {b} overlaps another block of the same owners")
        rectangles.setdefault(key, []).append((q_rows, kv_rows))
        counted[key] = counted.get(key, 0) + seen
    for q_owner in range(tokens.world_size):
        for kv_owner in range(tokens.world_size):
            want = required[(q_owner, kv_owner)]
            got = counted.get((q_owner, kv_owner), 0)
            if got != want:
                raise PlanError(f"queries of rank {q_owner} x keys of rank {kv_owner}: the plan computes "
                                f"{got} visible pairs, the mask has {want}")


_KEEP_RUNS_UP_TO = 1 << 22  # a mask's (first, stop) tables are kept (`masks.visible_runs`) up to this many rows


def _count_visible(tokens: TokenMask, blocks: list[tuple[int, int, int, int, int, int]]
                   ) -> tuple[list[int], list[bool], dict[tuple[int, int], int]]:
    """`masks.visibility`'s (entries, full) of each (q owner, kv owner, q0, q1, k0, k1), and the entries of each
    whole pair of shards, in a few numpy calls per query owner instead of a dozen per block.

    Each query row's visible keys are one run of the key owner's rows, [first, stop) found once over the whole
    shard; within key rows [k0, k1) the row sees ``clip(stop) - clip(first)`` of them, as
    `TokenMask.visible_counts` counts on the slice.
    """
    n, q_length = tokens.world_size, tokens.rows_per_rank
    keep = visible_runs(tokens) if n * n * q_length <= _KEEP_RUNS_UP_TO else None
    by_q_owner: dict[int, list[int]] = {}
    for at, block in enumerate(blocks):
        by_q_owner.setdefault(block[0], []).append(at)
    entries = [0] * len(blocks)
    full = [False] * len(blocks)
    required: dict[tuple[int, int], int] = {}
    for q_owner in range(n):
        got = keep.get(q_owner) if keep is not None else None
        if got is None:  # first[kv owner, row], stop[kv owner, row], flattened; and each pair's entries
            low, high = tokens.limits(q_owner)
            first = np.empty((n, q_length), dtype=np.int64)
            stop = np.empty((n, q_length), dtype=np.int64)
            for kv_owner in range(n):
                keys = tokens.kv_positions(kv_owner)
                first[kv_owner] = np.searchsorted(keys, low, side="left")
                stop[kv_owner] = np.searchsorted(keys, high, side="right")
            got = (first.ravel(), stop.ravel(), np.maximum(stop - first, 0).sum(axis=1).tolist())
            if keep is not None:
                keep[q_owner] = got
        first, stop, pairs = got
        for kv_owner, count in enumerate(pairs):
            required[(q_owner, kv_owner)] = count
        ats = by_q_owner.get(q_owner)
        if not ats:
            continue
        table = np.array([blocks[at][1:] for at in ats], dtype=np.int64).reshape(-1, 5)
        kv_owner, q0, q1, k0, k1 = table.T
        lengths = q1 - q0
        offsets = np.cumsum(lengths) - lengths
        rows = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(offsets - (kv_owner * q_length + q0), lengths)
        a, b = np.repeat(k0, lengths), np.repeat(k1, lengths)
        count = np.maximum(np.clip(stop[rows], a, b) - np.clip(first[rows], a, b), 0)
        running = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(count)])
        sums = running[offsets + lengths] - running[offsets]
        whole = sums == lengths * (k1 - k0)
        for at, seen, is_full in zip(ats, sums.tolist(), whole.tolist()):
            entries[at] = seen
            full[at] = is_full
    return entries, full, required


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]
