"""Checking a plan by running it on symbols instead of tensors.

`check_plan` follows every tensor through the plan (who holds which span of
whose queries or keys/values, which partial results wait to be sent, which
dK/dV sums travel) and proves that every query meets every key it may see
exactly once, under the right mask, that every message is sent only by a
rank that holds what it sends, and that every result reaches its owner. It
works at the granularity of *atoms*: each rank's shard cut into as many equal
pieces as the finest span of the plan (and the layout's chunks) need. It needs
no process and no tensor, so any plan the model can express, ours or a new
one, is checked in milliseconds.
"""

from __future__ import annotations

import bisect
import functools
import math
import operator
from collections import Counter, defaultdict
from itertools import repeat

import numpy as np

from tokenring.interfaces import Mask
from tokenring.placement.layout import rank_chunks
from tokenring.placement.masks import TokenMask, full_sequence_mask
from tokenring.plan.model import ALL, Block, Payload, Plan, PlanError, Span, Transfer
from tokenring.proofs.replicated import check_replicated_plan
from tokenring.proofs.wellformed import check_step

FULL = "full"
DIAGONAL = "diagonal"
Pair = tuple[int, int, str]  # (global query atom, global key atom, how they meet)


class _Atoms:
    """Global atom numbers of the spans of each rank's shard, in sequence order."""

    def __init__(self, plan: Plan) -> None:
        self.n = plan.world_size
        self.tokens = plan.tokens
        if self.tokens is not None:  # a masked plan: one atom per row, numbered by global position
            self.per_rank = self.tokens.rows_per_rank
            self.kv_per_rank = self.tokens.kv_rows_per_rank  # keys/values may be other tokens (a cache)
            return
        self.chunks = [rank_chunks(plan.layout, r, self.n) for r in range(self.n)]
        per_rank = len(self.chunks[0])
        spans = [b.q_span for s in plan.steps for b in s.blocks] + [b.kv_span for s in plan.steps for b in s.blocks]
        spans += [t.span for s in plan.steps for t in s.transfers]
        self.per_rank = math.lcm(per_rank, *(s.denominator for s in spans))
        self.per_chunk = self.per_rank // per_rank

    def of(self, owner: int, span: Span) -> list[int]:
        first, count = span.rows(self.per_rank)
        return [self._global(owner, i) for i in range(first, first + count)]

    def kv_of(self, owner: int, span: Span) -> list[int]:
        """The atoms of a span of ``owner``'s keys/values: as `of`, but for a mask's own key/value tokens."""
        if self.tokens is None or self.tokens.kv_runs is None:
            return self.of(owner, span)
        first, count = span.rows(self.kv_per_rank)
        return [int(p) for p in self.tokens.kv_positions(owner)[first:first + count]]

    def _global(self, owner: int, local: int) -> int:
        if self.tokens is not None:
            return int(self.tokens.positions(owner)[local])
        chunk = self.chunks[owner][local // self.per_chunk]
        return chunk * self.per_chunk + local % self.per_chunk

    def total(self) -> int:
        return self.n * self.per_rank


def block_pairs(plan: Plan, block: Block, atoms: _Atoms | None = None) -> list[Pair]:
    """The (query atom, key atom, how) pairs one block computes."""
    atoms = atoms or _Atoms(plan)
    q_atoms = atoms.of(block.q_owner, block.q_span)
    kv_atoms = atoms.kv_of(block.kv_owner, block.kv_span)
    if block.mask is Mask.NONE:
        return [(qa, ka, FULL) for qa in q_atoms for ka in kv_atoms]
    if block.mask is Mask.TOKENS:
        if plan.tokens is None:
            raise PlanError(f"block masked from tokens in a plan without a token mask: {block}")
        allowed = _allowed_atoms(plan)
        return [(qa, ka, FULL) for qa in q_atoms for ka in kv_atoms if allowed[qa][ka]]
    if (block.q_owner, block.q_span) != (block.kv_owner, block.kv_span):
        raise PlanError(f"causal mask on a block that is not a local diagonal block: {block}")
    # Causal within the block's rows in local order: local row a sees local row b <= a.
    return [
        (qa, ka, FULL if a > b else DIAGONAL)
        for a, qa in enumerate(q_atoms)
        for b, ka in enumerate(kv_atoms)
        if a >= b
    ]


def _allowed_atoms(plan: Plan) -> list[list[bool]]:
    assert plan.tokens is not None
    return _allowed_pairs(plan.tokens)


@functools.lru_cache(maxsize=8)
def _allowed_pairs(tokens: TokenMask) -> list[list[bool]]:
    return full_sequence_mask(tokens.seq_len, tokens.boundaries, tokens.causal, tokens.window).tolist()


def required_pairs(plan: Plan, atoms: _Atoms | None = None) -> Counter:
    atoms = atoms or _Atoms(plan)
    total = atoms.total()
    pairs: Counter = Counter()
    if plan.tokens is not None:
        allowed = _allowed_atoms(plan)
        q_atoms = [qa for r in range(atoms.n) for qa in atoms.of(r, ALL)]
        kv_atoms = [ka for r in range(atoms.n) for ka in atoms.kv_of(r, ALL)]
        for qa in q_atoms:
            for ka in kv_atoms:
                if allowed[qa][ka]:
                    pairs[(qa, ka, FULL)] += 1
        return pairs
    for qa in range(total):
        for ka in range(total):
            if not plan.causal:
                pairs[(qa, ka, FULL)] += 1
            elif qa > ka:
                pairs[(qa, ka, FULL)] += 1
            elif qa == ka:
                pairs[(qa, ka, DIAGONAL)] += 1
    return pairs


_RESULT = {False: Payload.PARTIAL, True: Payload.GRAD_PARTIAL}
_QUERY = {False: Payload.QUERY, True: Payload.GRAD_QUERY}


class _Holdings:
    """Which spans of whose travelling tensors each rank holds."""

    def __init__(self, n: int, query: Payload) -> None:
        self._held: list[dict[tuple[Payload, int], list[Span]]] = [
            {(query, r): [ALL], (Payload.KEY_VALUE, r): [ALL]} for r in range(n)
        ]

    def has(self, rank: int, payload: Payload, owner: int, span: Span) -> bool:
        return any(piece.contains(span) for piece in self._held[rank].get((payload, owner), ()))

    def add(self, rank: int, payload: Payload, owner: int, span: Span) -> None:
        self._held[rank].setdefault((payload, owner), []).append(span)


def check_plan(plan: Plan, method: str = "auto") -> None:
    """Raise PlanError with the first thing the plan gets wrong.

    Forward plans: every query atom's output covers every visible key atom
    exactly once. Backward plans, in addition: every key atom's dk/dv
    receives each visible query atom's contribution exactly once, and the
    travelling dk/dv sums end at their owners.

    ``method``: "atoms" follows every (query atom, key atom) pair; "spans"
    follows rectangles of rows (`_check_spans`, for plans whose blocks are
    unmasked or causal diagonal blocks of their own rank, without a token
    mask; others fall back to atoms); "auto" uses atoms for plans of at most
    `_ATOMS_UP_TO` atoms in all and spans above, where they apply.
    """
    if method not in ("auto", "atoms", "spans"):
        raise ValueError(f"method must be 'auto', 'atoms' or 'spans', got {method!r}")
    if plan.replicated_queries:  # every rank holds the same queries: proven by tokenring.proofs.replicated
        return check_replicated_plan(plan)
    if method != "atoms":
        grid = _span_grid(plan)
        if grid is not None and (method == "spans" or plan.world_size * grid[0] > _ATOMS_UP_TO):
            return _check_spans(plan, *grid)
    n = plan.world_size
    atoms = _Atoms(plan)
    query, result = _QUERY[plan.backward], _RESULT[plan.backward]
    held = _Holdings(n, query)
    pending: list[dict[tuple[int, Span], list[Pair]]] = [{} for _ in range(n)]  # results not yet sent
    travelling_kv: list[dict[int, list[Pair]]] = [defaultdict(list) for _ in range(n)]  # dk/dv sums held
    covered_q: list[list[Pair]] = [[] for _ in range(n)]   # per query owner, what reached it
    covered_kv: list[list[Pair]] = [[] for _ in range(n)]  # per key owner (backward only)

    world = set(range(n))
    for position, step in enumerate(plan.steps):
        where = check_step(step, position, world)
        arriving: list[tuple[Transfer, list[Pair] | None]] = []
        for t in step.transfers:
            if t.payload is result:
                # A message carries the results held for rows within its span (several blocks' may share it).
                carried = [key for key in pending[t.src] if key[0] == t.owner and t.span.contains(key[1])]
                if not carried:
                    raise PlanError(f"{where}: rank {t.src} sends a result for rank {t.owner}.{t.span} it does not hold: {t}")
                waiting = [pair for key in carried for pair in pending[t.src].pop(key)]
                if t.dst != t.owner:
                    raise PlanError(f"{where}: result for rank {t.owner} sent to rank {t.dst}")
                arriving.append((t, waiting))
            elif t.payload is Payload.GRAD_KEY_VALUE and plan.backward:
                # A rank may hold sums for several pieces of one owner's keys; a message takes those in its span.
                held_sums = travelling_kv[t.src].get(t.owner, [])
                allowed = set(atoms.kv_of(t.owner, t.span))
                pairs = [p for p in held_sums if p[1] in allowed]
                if not pairs:
                    raise PlanError(f"{where}: rank {t.src} sends dk/dv for rank {t.owner}.{t.span} it does not hold")
                travelling_kv[t.src][t.owner] = [p for p in held_sums if p[1] not in allowed]
                arriving.append((t, pairs))
            elif t.payload in (query, Payload.KEY_VALUE):
                if not held.has(t.src, t.payload, t.owner, t.span):
                    raise PlanError(f"{where}: rank {t.src} sends {t.payload.value}[{t.owner}].{t.span} it does not hold")
                arriving.append((t, None))
            else:
                pass_name = "backward" if plan.backward else "forward"
                raise PlanError(f"{where}: payload {t.payload.value} does not belong in a {pass_name} plan")
        for block in step.blocks:
            r = block.rank
            for payload, owner, span in ((query, block.q_owner, block.q_span), (Payload.KEY_VALUE, block.kv_owner, block.kv_span)):
                if not held.has(r, payload, owner, span):
                    raise PlanError(f"{where}: rank {r} computes with {payload.value}[{owner}].{span} it does not hold")
            pairs = block_pairs(plan, block, atoms)
            if block.q_owner == r:
                covered_q[r].extend(pairs)
            else:
                # Several blocks for the same query span may be merged before they are sent.
                pending[r].setdefault((block.q_owner, block.q_span), []).extend(pairs)
            if plan.backward:
                if block.kv_owner == r:
                    covered_kv[r].extend(pairs)
                else:
                    travelling_kv[r][block.kv_owner].extend(pairs)
        for t, pairs in arriving:
            if t.payload is result:
                covered_q[t.dst].extend(pairs)
            elif t.payload is Payload.GRAD_KEY_VALUE:
                if t.dst == t.owner:
                    covered_kv[t.dst].extend(pairs)
                else:
                    travelling_kv[t.dst][t.owner].extend(pairs)
            else:
                held.add(t.dst, t.payload, t.owner, t.span)

    for r in range(n):
        if pending[r]:
            owners = sorted({owner for owner, _ in pending[r]})
            raise PlanError(f"rank {r} never sends its results for ranks {owners}")
        unsent = sorted(owner for owner, pairs in travelling_kv[r].items() if pairs)
        if unsent:
            raise PlanError(f"rank {r} never sends the dk/dv it holds for ranks {unsent}")
    _check_coverage(plan, atoms, covered_q, "query", 0)
    if plan.backward:
        _check_coverage(plan, atoms, covered_kv, "key", 1)


def _check_coverage(plan: Plan, atoms: _Atoms, covered: list[list[Pair]], what: str, index: int) -> None:
    got: Counter = Counter()
    for owner, pairs in enumerate(covered):
        mine = set(atoms.of(owner, ALL) if index == 0 else atoms.kv_of(owner, ALL))
        for pair in pairs:
            if pair[index] not in mine:
                raise PlanError(f"rank {owner} received a result for {what} atom {pair[index]}, which it does not own")
            got[pair] += 1
    required = required_pairs(plan, atoms)
    if got != required:
        missing = sorted((required - got).elements())[:5]
        extra = sorted((got - required).elements())[:5]
        raise PlanError(f"{what} side: atom pairs missing {missing} or extra/duplicated {extra}")


def work_per_rank(plan: Plan) -> list[list[float]]:
    """work[step][rank]: score entries computed, as a fraction of one shard-by-shard block."""
    return [
        [float(sum(b.work for b in step.blocks_of(r))) for r in range(plan.world_size)]
        for step in plan.steps
    ]


# ---------------------------------------------------------------------------------------------------------------
# The same proof on spans: for plans too large to cut into atom pairs.
#
# `check_plan` above follows every (query atom, key atom) pair: O((N * atoms)^2), minutes at N = 64. When every
# block is unmasked or the causal diagonal block of its own rank (all that the registered schedules build, and
# no token mask), the same walk can follow rectangles instead: each block covers, for one (query owner, key
# owner), the rows [qa, qb) x [ka, kb) of the two shards on the plan's atom grid (a causal diagonal block the
# triangle of [a, b) under its diagonal). Results carry rectangles home; dK/dV sums are cut to a message's rows.
# At the end, for every (query owner, key owner), the rectangles that reached each owner must tile what the
# layout lets those queries see, once: a sweep over query rows checks that, at each run of rows, the key
# intervals of the rectangles there chain from row 0 to the last visible key row without gap or overlap. The
# diagonal blocks of a causal plan must tile the diagonal of their rank once, and the unmasked rectangles of that
# rank with itself then see only keys before the diagonal block of their rows. `tests/test_plan_scale.py` checks
# that both proofs agree on every registered schedule and on plans broken on purpose.

_ATOMS_UP_TO = 128  # plans with at most this many atoms in all are proven pair by pair (`_check_atoms`)


_mask, _q_span, _kv_span = operator.attrgetter("mask"), operator.attrgetter("q_span"), operator.attrgetter("kv_span")
_span = operator.attrgetter("span")


def _span_grid(plan: Plan) -> tuple[int, dict[Span, tuple[int, int]]] | None:
    """(atoms per rank, {span: (first atom, stop atom)}) when the span proof applies to ``plan``, else None."""
    if plan.tokens is not None or getattr(plan, "replicated_queries", False):
        return None
    n = plan.world_size
    chunks = [rank_chunks(plan.layout, r, n) for r in range(n)]
    if any(list(c) != sorted(c) or len(c) != len(chunks[0]) for c in chunks):
        return None
    spans: set[Span] = set()
    none, causal = Mask.NONE, Mask.CAUSAL
    for step in plan.steps:
        blocks = step.blocks
        if any(map(operator.is_not, map(_mask, blocks), repeat(none))):  # (in C) some block is masked
            for b in blocks:
                if b.mask is not none and not (
                    b.mask is causal and b.rank == b.q_owner == b.kv_owner and b.q_span == b.kv_span
                ):
                    return None  # token masks, or a causal block the atom proof must judge
        spans.update(map(_q_span, blocks))
        spans.update(map(_kv_span, blocks))
        spans.update(map(_span, step.transfers))
    per_rank = math.lcm(len(chunks[0]) if chunks else 1, *{s[2] for s in spans})
    rows = {s: (s[0] * (per_rank // s[2]), s[1] * (per_rank // s[2])) for s in spans}
    return per_rank, rows


def _check_spans(plan: Plan, per_rank: int, rows: dict[Span, tuple[int, int]]) -> None:
    """`check_plan` on rectangles of rows instead of pairs of atoms (see above); the same errors, the same order."""
    n = plan.world_size
    query, result = _QUERY[plan.backward], _RESULT[plan.backward]
    backward = plan.backward
    # held[r][(is_kv, owner)]: the (first, stop) rows of owner's query or key/value shard that arrived at r.
    held: list[dict[tuple[bool, int], list[tuple[int, int]]]] = [{} for _ in range(n)]
    exact: list[set[tuple[bool, int, int, int]]] = [set() for _ in range(n)]  # the same, as a set, to ask first

    def has(rank: int, is_kv: bool, owner: int, a: int, b: int) -> bool:
        if owner == rank or (is_kv, owner, a, b) in exact[rank]:
            return True
        return any(pa <= a and b <= pb for pa, pb in held[rank].get((is_kv, owner), ()))

    # A shape is (other owner, qa, qb, ka, kb, triangle): rows of the query shard x rows of the key shard.
    pending: list[dict[int, dict[tuple[int, int], list]]] = [{} for _ in range(n)]  # [rank][q owner][(qa, qb)]
    # travelling_kv[rank][kv owner]: the dK/dV sums held, as (first key rows, groups, longest group) (`_hold`).
    travelling_kv: list[dict[int, tuple[list, list, int]]] = [{} for _ in range(n)]
    covered_q: list[dict[int, list]] = [defaultdict(list) for _ in range(n)]   # [q owner][kv owner]
    covered_kv: list[dict[int, list]] = [defaultdict(list) for _ in range(n)]  # [kv owner][q owner]
    world_set = set(range(n))
    causal_mask = Mask.CAUSAL
    key_value, grad_key_value = Payload.KEY_VALUE, Payload.GRAD_KEY_VALUE

    for position, step in enumerate(plan.steps):
        where = check_step(step, position, world_set)
        transfers = step.transfers
        arriving: list[tuple[Transfer, object]] = []  # with its shapes, dK/dV group or rows
        add_arriving = arriving.append
        for t in transfers:
            src, dst, owner, payload = t.src, t.dst, t.owner, t.payload
            a, b = rows[t.span]
            if payload is result:
                by_owner = pending[src]
                mine = by_owner.get(owner) or {}
                if len(mine) == 1:  # the common case: one run of rows waits for this owner
                    key = next(iter(mine))
                    if not (a <= key[0] and key[1] <= b):
                        raise PlanError(f"{where}: rank {t.src} sends a result for rank {t.owner}.{t.span} it does "
                                        f"not hold: {t}")
                    waiting = mine.pop(key)
                else:
                    carried = [key for key in mine if a <= key[0] and key[1] <= b]
                    if not carried:
                        raise PlanError(f"{where}: rank {t.src} sends a result for rank {t.owner}.{t.span} it does "
                                        f"not hold: {t}")
                    waiting = [shape for key in carried for shape in mine.pop(key)]
                if not mine:
                    del by_owner[owner]
                if dst != owner:
                    raise PlanError(f"{where}: result for rank {t.owner} sent to rank {t.dst}")
                add_arriving((t, waiting))
            elif payload is grad_key_value and backward:
                # Held sums are groups (first key row, stop key row, node): a group inside the message's rows
                # moves whole, one outside it stays, and only one across its edge is opened and cut.
                sums = travelling_kv[src].get(owner)
                if sums is not None and sums[0][0] >= a:
                    groups = sums[1]
                    stop = max([g[1] for g in groups])
                    if stop <= b:  # the common case: every group held for this owner lies in the rows and moves
                        del travelling_kv[src][owner]
                        add_arriving((t, (sums[0][0], stop, [g[2] for g in groups])))
                        continue
                inside, outside, cut_any = [], [], False
                lo = hi = 0
                if sums is not None:
                    keys, groups, longest = sums
                    lo, hi = bisect.bisect_left(keys, a - longest + 1), bisect.bisect_left(keys, b)
                    for group in groups[lo:hi]:  # only these can reach into [a, b)
                        ka, kb, node = group
                        if kb <= a:
                            outside.append(group)
                        elif a <= ka and kb <= b:
                            inside.append(group)
                        else:
                            cut_any = True
                            for shape in _shapes(node):
                                j, qa, qb, ka, kb, tri = shape
                                if kb <= a or b <= ka:
                                    outside.append((ka, kb, shape))
                                    continue
                                if ka < a:
                                    outside.append((ka, a, (j, qa, qb, ka, a, tri)))
                                if b < kb:
                                    outside.append((b, kb, (j, qa, qb, b, kb, tri)))
                                cut = (j, qa, qb, max(ka, a), min(kb, b), tri)
                                inside.append((cut[3], cut[4], cut))
                if not inside:
                    raise PlanError(f"{where}: rank {t.src} sends dk/dv for rank {t.owner}.{t.span} it does not hold")
                left = groups[:lo] + outside + groups[hi:]
                if cut_any:
                    left.sort(key=lambda g: g[0])
                if left:
                    travelling_kv[t.src][t.owner] = ([g[0] for g in left], left, longest)
                else:
                    del travelling_kv[t.src][t.owner]
                arriving.append((t, (min(g[0] for g in inside), max(g[1] for g in inside), [g[2] for g in inside])))
            elif payload is query or payload is key_value:
                is_kv = payload is key_value
                if owner != src and (is_kv, owner, a, b) not in exact[src] and not any(
                        pa <= a and b <= pb for pa, pb in held[src].get((is_kv, owner), ())):
                    raise PlanError(f"{where}: rank {t.src} sends {t.payload.value}[{t.owner}].{t.span} it does not hold")
                add_arriving((t, (is_kv, owner, a, b)))
            else:
                pass_name = "backward" if backward else "forward"
                raise PlanError(f"{where}: payload {t.payload.value} does not belong in a {pass_name} plan")
        for block in step.blocks:
            r, q_owner, kv_owner = block.rank, block.q_owner, block.kv_owner
            qa, qb = rows[block.q_span]
            ka, kb = rows[block.kv_span]
            if q_owner != r and (False, q_owner, qa, qb) not in exact[r] and not has(r, False, q_owner, qa, qb):
                raise PlanError(f"{where}: rank {r} computes with {query.value}[{q_owner}].{block.q_span} it does not hold")
            if kv_owner != r and (True, kv_owner, ka, kb) not in exact[r] and not has(r, True, kv_owner, ka, kb):
                raise PlanError(f"{where}: rank {r} computes with {Payload.KEY_VALUE.value}[{kv_owner}]"
                                f".{block.kv_span} it does not hold")
            tri = block.mask is causal_mask
            if q_owner == r:
                covered_q[r][kv_owner].append((kv_owner, qa, qb, ka, kb, tri))
            else:
                waiting = pending[r].get(q_owner)
                if waiting is None:
                    waiting = pending[r][q_owner] = {}
                shape = (kv_owner, qa, qb, ka, kb, tri)
                got = waiting.get((qa, qb))
                if got is None:
                    waiting[(qa, qb)] = [shape]
                else:
                    got.append(shape)
            if backward:
                if kv_owner == r:
                    covered_kv[r][q_owner].append((q_owner, qa, qb, ka, kb, tri))
                else:
                    group = (ka, kb, (q_owner, qa, qb, ka, kb, tri))
                    sums = travelling_kv[r].get(kv_owner)
                    if sums is not None and ka >= sums[0][-1] and kb - ka <= sums[2]:  # `_hold`'s common case
                        sums[0].append(ka)
                        sums[1].append(group)
                    else:
                        _hold(travelling_kv[r], kv_owner, group)
        for t, shapes in arriving:
            payload = t.payload
            if payload is result:
                mine = covered_q[t.dst]
                for shape in shapes:
                    mine[shape[0]].append(shape)
            elif payload is grad_key_value:
                if t.dst == t.owner:
                    mine = covered_kv[t.dst]
                    for shape in _shapes(shapes[2]):
                        mine[shape[0]].append(shape)
                else:
                    _hold(travelling_kv[t.dst], t.owner, shapes)
            else:  # shapes: (is_kv, owner, first row, stop row) of what arrives
                key = shapes[:2]
                got = held[t.dst].get(key)
                if got is None:
                    held[t.dst][key] = [shapes[2:]]
                else:
                    got.append(shapes[2:])
                exact[t.dst].add(shapes)

    for r in range(n):
        if pending[r]:
            raise PlanError(f"rank {r} never sends its results for ranks {sorted(pending[r])}")
        unsent = sorted(owner for owner, sums in travelling_kv[r].items() if sums[1])
        if unsent:
            raise PlanError(f"rank {r} never sends the dk/dv it holds for ranks {unsent}")
    visible = _VisibleRows(plan, per_rank)
    _check_tiling(visible, covered_q, "query", plan.causal)
    if backward:
        _check_tiling(visible, covered_kv, "key", plan.causal)


def _hold(held: dict[int, tuple[list, list, int]], owner: int, group: tuple) -> None:
    """Add a dK/dV group (first key row, stop key row, node) to those held for ``owner``, kept in order of first row.

    With the longest group's length, a message for rows [a, b) need only look at the groups that start in
    [a - longest + 1, b).
    """
    sums = held.get(owner)
    if sums is None:
        held[owner] = ([group[0]], [group], group[1] - group[0])
        return
    keys, groups, longest = sums
    if group[0] >= keys[-1]:  # the common case: in order
        keys.append(group[0])
        groups.append(group)
    else:
        at = bisect.bisect_right(keys, group[0])
        keys.insert(at, group[0])
        groups.insert(at, group)
    if group[1] - group[0] > longest:
        held[owner] = (keys, groups, group[1] - group[0])


def _shapes(node) -> list:
    """The shapes of a dK/dV group's node: a shape (a tuple) or a list of nodes."""
    if isinstance(node, tuple):
        return [node]
    found, stack = [], [node]
    while stack:
        for item in stack.pop():
            if isinstance(item, tuple):
                found.append(item)
            else:
                stack.append(item)
    return found


class _VisibleRows:
    """Which key rows each run of query rows may see, per (query owner, key owner), on the atom grid.

    Always a prefix of the key shard: a rank's chunks lie in sequence order, so the chunks of the key owner
    before a query chunk come first. Returns [(first q row, stop q row, visible key rows)], merged, those
    with none left out. A causal plan's diagonal (query owner = key owner) is judged with its diagonal blocks.
    """

    def __init__(self, plan: Plan, per_rank: int) -> None:
        n = plan.world_size
        self.per_rank = per_rank
        self.causal = plan.causal
        self.chunks = [rank_chunks(plan.layout, r, n) for r in range(n)]
        self._array = np.asarray(self.chunks, dtype=np.int64)  # (n, k)
        self._memo: dict[tuple[int, ...], list[tuple[int, int, int]]] = {}

    def __call__(self, j: int, r: int) -> list[tuple[int, int, int]]:
        size = self.per_rank
        if not self.causal:
            return [(0, size, size)]
        return self._rows(tuple(bisect.bisect_left(self.chunks[r], c) for c in self.chunks[j]))

    def _rows(self, before: tuple[int, ...]) -> list[tuple[int, int, int]]:
        """The visible rows when the key owner has ``before[c]`` chunks before the query owner's chunk c."""
        got = self._memo.get(before)
        if got is None:
            size = self.per_rank
            per_chunk = size // len(before)
            got = []
            for a, count in enumerate(before):
                p = count * per_chunk
                if p and got and got[-1][2] == p and got[-1][1] == a * per_chunk:
                    got[-1] = (got[-1][0], (a + 1) * per_chunk, p)
                elif p:
                    got.append((a * per_chunk, (a + 1) * per_chunk, p))
            self._memo[before] = got
        return got

    def against(self, owner: int, queries: bool) -> list[list[tuple[int, int, int]]]:
        """``self(owner, r)`` for every r (``queries``), else ``self(j, owner)`` for every j: one numpy pass."""
        n = len(self.chunks)
        if not self.causal:
            return [[(0, self.per_rank, self.per_rank)]] * n
        chunks = self._array  # every rank has k sorted chunks (`_span_grid`)
        k = chunks.shape[1]
        if queries:  # before[r, c]: chunks of r before the owner's chunk c
            before = (chunks[:, None, :] < chunks[owner][None, :, None]).sum(-1)
        else:        # before[j, c]: chunks of the owner before j's chunk c
            before = (chunks[owner][None, None, :] < chunks[:, :, None]).sum(-1)
        codes = (before @ ((k + 1) ** np.arange(k, dtype=np.int64))).tolist()
        found: dict[int, list[tuple[int, int, int]]] = {}
        for at, code in enumerate(codes):
            if code not in found:
                found[code] = self._rows(tuple(before[at].tolist()))
        return [found[code] for code in codes]


def _check_tiling(visible: _VisibleRows, covered: list[dict[int, list]], what: str, causal: bool) -> None:
    """Every (query owner, key owner) pair's shapes, as received by ``covered``'s owners, tile what it may see once."""
    n = len(covered)
    queries = what == "query"
    size = visible.per_rank
    for owner in range(n):
        received = covered[owner]
        wants = visible.against(owner, queries)
        for other in range(n):
            shapes = received.get(other, ())
            if other == owner:
                ok = _tiles_diagonal(shapes, size, causal)
            else:
                want = wants[other]
                if len(shapes) == 1 and len(want) == 1:  # the common case: one block, one visible rectangle
                    _, qa, qb, ka, kb, tri = shapes[0]
                    w = want[0]
                    ok = not tri and ka == 0 and qa == w[0] and qb == w[1] and kb == w[2]
                else:
                    ok = _tiles(shapes, want, size)
            if not ok:
                j, r = (owner, other) if queries else (other, owner)
                raise PlanError(f"{what} side: queries of rank {j} x keys of rank {r}: rows missing or "
                                f"extra/duplicated (shapes {sorted(s[1:] for s in shapes)[:5]})")


def _tiles_diagonal(shapes, size: int, causal: bool) -> bool:
    """A rank's queries against its own keys: the causal blocks tile the diagonal, the rest what lies before it."""
    triangles = sorted((s[1], s[2]) for s in shapes if s[5])
    rects = [s for s in shapes if not s[5]]
    if not causal:
        return not triangles and _tiles(rects, [(0, size, size)], size)
    edge = 0
    for a, b in triangles:
        if a != edge:
            return False
        edge = b
    if edge != size:
        return False
    want = [(a, b, a) for a, b in triangles if a > 0]  # rows of a diagonal block see the keys before it
    return _tiles(rects, want, size)


def _tiles(shapes, want: list[tuple[int, int, int]], size: int) -> bool:
    """The rectangles (no triangles) cover, at each query row, exactly key rows [0, p) of ``want``'s p there, once."""
    if any(s[5] for s in shapes):
        return False
    if not shapes or not want:
        return not shapes and not want
    if len(want) == 1:  # the common cases: pieces of the query rows, or of the key rows, of one rectangle
        x0, x1, p = want[0]
        first = shapes[0]
        if all(s[3] == first[3] and s[4] == first[4] for s in shapes):
            if (first[3], first[4]) != (0, p):
                return False
            return _chain(sorted((s[1], s[2]) for s in shapes), x0, x1)
        if all(s[1] == first[1] and s[2] == first[2] for s in shapes):
            if (first[1], first[2]) != (x0, x1):
                return False
            return _chain(sorted((s[3], s[4]) for s in shapes), 0, p)
    edges = {0, size}
    for a, b, _ in want:
        edges.update((a, b))
    for s in shapes:
        edges.update((s[1], s[2]))
    edges = sorted(edges)
    starts = sorted(shapes, key=lambda s: s[1])
    active: list = []
    at = 0  # the next shape to start
    w = 0   # the want entry at or after the current row
    for x, x_next in zip(edges, edges[1:]):
        active = [s for s in active if s[2] > x]
        while at < len(starts) and starts[at][1] == x:
            active.append(starts[at])
            at += 1
        while w < len(want) and want[w][1] <= x:
            w += 1
        p = want[w][2] if w < len(want) and want[w][0] <= x else 0
        reach = 0
        for s in sorted(active, key=lambda s: s[3]):
            if s[3] != reach:
                return False
            reach = s[4]
        if reach != p:
            return False
    return at == len(starts)


def _chain(intervals: list[tuple[int, int]], start: int, stop: int) -> bool:
    """Sorted intervals that follow one another from ``start`` to ``stop`` without gap or overlap."""
    for a, b in intervals:
        if a != start:
            return False
        start = b
    return start == stop
