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

import functools
import math
from collections import Counter, defaultdict

from .interfaces import Mask
from .layout import rank_chunks
from .masks import TokenMask, full_sequence_mask
from .plan import ALL, Block, Payload, Plan, Span, Transfer

FULL = "full"
DIAGONAL = "diagonal"
Pair = tuple[int, int, str]  # (global query atom, global key atom, how they meet)


class PlanError(AssertionError):
    """The plan would compute something other than exact attention."""


class _Atoms:
    """Global atom numbers of the spans of each rank's shard, in sequence order."""

    def __init__(self, plan: Plan) -> None:
        self.n = plan.world_size
        self.tokens = plan.tokens
        if self.tokens is not None:  # a masked plan: one atom per row, numbered by global position
            self.per_rank = self.tokens.rows_per_rank
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
    kv_atoms = atoms.of(block.kv_owner, block.kv_span)
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
        for qa in range(total):
            for ka in range(total):
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


def check_plan(plan: Plan) -> None:
    """Raise PlanError with the first thing the plan gets wrong.

    Forward plans: every query atom's output covers every visible key atom
    exactly once. Backward plans, in addition: every key atom's dk/dv
    receives each visible query atom's contribution exactly once, and the
    travelling dk/dv sums end at their owners.
    """
    n = plan.world_size
    atoms = _Atoms(plan)
    query, result = _QUERY[plan.backward], _RESULT[plan.backward]
    held = _Holdings(n, query)
    pending: list[dict[tuple[int, Span], list[Pair]]] = [{} for _ in range(n)]  # results not yet sent
    travelling_kv: list[dict[int, list[Pair]]] = [defaultdict(list) for _ in range(n)]  # dk/dv sums held
    covered_q: list[list[Pair]] = [[] for _ in range(n)]   # per query owner, what reached it
    covered_kv: list[list[Pair]] = [[] for _ in range(n)]  # per key owner (backward only)

    for position, step in enumerate(plan.steps):
        where = f"step {step.index}"
        if step.index != position:
            raise PlanError(f"{where} stands at position {position}: steps must be numbered 0, 1, 2, ... in order")
        for b in step.blocks:
            if not all(0 <= r < n for r in (b.rank, b.q_owner, b.kv_owner)):
                raise PlanError(f"{where}: block outside the world: {b}")
        arriving: list[tuple[Transfer, list[Pair] | None]] = []
        for t in step.transfers:
            if not (0 <= t.src < n and 0 <= t.dst < n and 0 <= t.owner < n):
                raise PlanError(f"{where}: transfer outside the world: {t}")
            if t.src == t.dst:
                raise PlanError(f"{where}: rank {t.src} sends to itself")
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
                allowed = set(atoms.of(t.owner, t.span))
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
        mine = set(atoms.of(owner, ALL))
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
