"""Work balance of packed-document layouts: tokenring.placement.documents.balanced_assignment against layouts that ignore documents.

    python benchmarks/document_balance.py [--length S] [--seed SEED]

For each length mix and world size N it prints the largest rank's work over the
mean (scored query-key entries under the document mask; 1.00 is perfect) and
the contiguous runs per rank (max / mean) of:

* balanced: balanced_assignment(cu_seqlens, N, causal=...);
* contiguous: rank r holds the r-th of N slices, documents ignored;
* zigzag: 2N slices, rank r holds r and 2N-1-r, documents ignored.

Pure CPU arithmetic; it takes seconds.
"""

import argparse
import math
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokenring.placement import documents  # noqa: E402


def lognormal_tail(total: int, rng: random.Random) -> list[int]:
    """Many short documents and a long tail (median total/256, sigma 1.3)."""
    return _fill(total, lambda: max(1, int(rng.lognormvariate(math.log(total / 256), 1.3))))


def one_long(total: int, rng: random.Random) -> list[int]:
    """One document of 60 % of the sequence (longer than a shard for N >= 2) among short ones."""
    long_length = int(total * 0.6)
    shorts = _fill(total - long_length, lambda: rng.randint(16, 1024))
    at = rng.randint(0, len(shorts))
    return shorts[:at] + [long_length] + shorts[at:]


def equal(total: int, rng: random.Random) -> list[int]:
    """Twelve documents of equal length."""
    return [total // 12] * 12


def short_odd(total: int, rng: random.Random) -> list[int]:
    """Lengths 1..1500 (no divisibility; most shorter than a zigzag chunk)."""
    return _fill(total, lambda: rng.randint(1, 1500))


MIXES = {
    "a lognormal tail": lognormal_tail,
    "b one long + short": one_long,
    "c equal lengths": equal,
    "d short, odd lengths": short_odd,
}


def _fill(total: int, draw) -> list[int]:
    lengths: list[int] = []
    used = 0
    while used < total:
        length = min(draw(), total - used)
        lengths.append(length)
        used += length
    return lengths


def boundaries(lengths: list[int]) -> list[int]:
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    return bounds


def describe(layout, bounds, causal, window) -> str:
    works = documents.work_per_rank(layout, bounds, causal, window)
    runs = layout.runs_per_rank()
    return f"{documents.imbalance(works):5.3f} {max(runs):5d}/{sum(runs) / len(runs):<7.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=3 * 2**15, help="S; must divide by 2N for the zigzag column")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = [("causal", True, None), ("causal, window (4096, 0)", True, (4096, 0)), ("no mask", False, None)]
    print(f"S = {args.length}, seed {args.seed}; each cell: max/mean work, runs per rank max/mean")
    for label, causal, window in settings:
        print(f"\n## {label}\n")
        print("| mix | docs | N | balanced | contiguous | zigzag | plan ms |")
        print("|---|---|---|---|---|---|---|")
        for name, make in MIXES.items():
            lengths = make(args.length, random.Random(args.seed))
            bounds = boundaries(lengths)
            for world_size in (2, 3, 4, 8):
                documents._balanced.cache_clear()
                started = time.perf_counter()
                layout = documents.balanced_assignment(bounds, world_size, causal=causal, window=window)
                elapsed = (time.perf_counter() - started) * 1e3
                contiguous = documents.contiguous_assignment(args.length, world_size)
                zigzag = documents.global_zigzag_assignment(args.length, world_size)
                print(
                    f"| {name} | {len(lengths)} | {world_size} | {describe(layout, bounds, causal, window)} | "
                    f"{describe(contiguous, bounds, causal, window)} | {describe(zigzag, bounds, causal, window)} | "
                    f"{elapsed:.1f} |"
                )


if __name__ == "__main__":
    main()
