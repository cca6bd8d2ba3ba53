"""Edge-disjoint directed Hamiltonian rings of a full mesh, for the multi-ring schedules.

A direct full mesh of N devices has a link each way between every pair: the
complete symmetric digraph on N vertices. It splits into N - 1 directed
Hamiltonian cycles for every N but 4 and 6 (Tillson, 1980), where N - 2 is
the most. Here:

* odd N: Walecki's construction gives (N - 1)/2 undirected Hamiltonian
  cycles that share no edge; each, taken both ways, is two directed rings;
* even N up to 8: a seeded search, bounded by a fixed number of attempts
  (never by time: every rank must find the same rings), asks for N - 1 rings
  (N - 2 for 4 and 6) and settles for fewer if it must; the ring r -> r+1
  and its reverse are always there;
* even N above 8: Walecki's zigzags on the N - 1 ranks of a circle round a
  hub give (N - 2)/2 undirected Hamiltonian cycles of the full mesh that
  share no edge (what is left is a perfect matching); the ranks are renamed
  so that the first is r -> r+1, and each cycle, taken both ways, is two
  directed rings: N - 2 in all, in time linear in the links. (The search
  finds fewer than that above 8, and takes seconds; N - 2 rings give the
  multi-ring schedules as many pieces as N - 1 would, since N - 1 is odd.)

`tests/test_rings.py` checks that every directed link belongs to at most one
ring and that each ring visits every rank once.
"""

from __future__ import annotations

import functools
import random

_ATTEMPTS = 2000
_SEED = 20260926


_SEARCH_UP_TO = 8  # even N above this use the construction (`_even_rings`)


def _walecki(n: int) -> list[list[int]]:
    """(n - 1)//2 edge-disjoint undirected Hamiltonian cycles of K_n: a hub and zigzags round a circle of n - 1.

    n odd: they use every edge. n even: the zigzags round the odd circle
    leave one chord per sum class and one hub edge, a perfect matching.
    """
    m = n - 1
    cycles = []
    for i in range(m // 2):
        path = [i]
        for j in range(1, m):
            step = (j + 1) // 2
            path.append((i + step) % m if j % 2 else (i - step) % m)
        cycles.append([m] + path)
    return cycles


def _links(ring: list[int]) -> list[tuple[int, int]]:
    return list(zip(ring, ring[1:] + ring[:1]))


def _search(n: int, want: int) -> list[list[int]] | None:
    rng = random.Random(_SEED + n)
    base = [list(range(n)), [0] + list(range(n - 1, 0, -1))]
    for _ in range(_ATTEMPTS):
        free = {(a, b) for a in range(n) for b in range(n) if a != b}
        rings = []
        for ring in base[: min(want, 2)]:
            rings.append(ring)
            free.difference_update(_links(ring))
        while len(rings) < want:
            ring = _random_ring(n, free, rng)
            if ring is None:
                break
            rings.append(ring)
            free.difference_update(_links(ring))
        if len(rings) == want:
            return rings
    return None


def _random_ring(n: int, free: set, rng: random.Random) -> list[int] | None:
    path, seen = [0], {0}
    while len(path) < n:
        options = [b for b in range(n) if b not in seen and (path[-1], b) in free]
        if not options:
            return None
        path.append(rng.choice(options))
        seen.add(path[-1])
    return path if (path[-1], 0) in free else None


def _even_rings(n: int) -> list[list[int]]:
    """n - 2 edge-disjoint directed rings of the full mesh, n even: Walecki's cycles both ways, r -> r+1 first."""
    cycles = _walecki(n)
    rename = {rank: position for position, rank in enumerate(cycles[0])}  # the first cycle becomes 0, 1, ..., n-1
    rings = []
    for cycle in cycles:
        renamed = [rename[rank] for rank in cycle]
        at = renamed.index(0)
        ring = renamed[at:] + renamed[:at]
        rings += [ring, [0] + ring[:0:-1]]
    return rings


@functools.lru_cache(maxsize=None)
def directed_rings(n: int) -> tuple[tuple[int, ...], ...]:
    """Edge-disjoint directed rings through all ``n`` ranks, as rank orders, r -> r+1 first."""
    if n <= 2:
        return (tuple(range(n)),)
    if n % 2:
        cycles = _walecki(n)
        rings = [c for cycle in cycles for c in (cycle, [cycle[0]] + cycle[:0:-1])]
        return tuple(tuple(r) for r in rings)
    if n > _SEARCH_UP_TO:
        return tuple(tuple(r) for r in _even_rings(n))
    for want in range(n - 2 if n in (4, 6) else n - 1, 2, -1):
        found = _search(n, want)
        if found is not None:
            return tuple(tuple(r) for r in found)
    return (tuple(range(n)), tuple([0] + list(range(n - 1, 0, -1))))
