"""The gradient pass of any forward plan.

The backward runs the forward's blocks at the same steps, with gradient
payloads in the same places: (q, dout, out, lse) travel where q did, each
block's dq goes back to its owner where the partial (out, lse) did, and
keys/values travel as before. What the forward has no counterpart for is the
dK/dV that holders of someone else's keys compute; `derive_backward` adds
their way home for every schedule in which keys/values travel:

* when an owner's keys/values went down chains, one per piece (each holder
  received a piece once and passed it to at most one other: one chain in the
  ring, one per direction or per ring in the two-way and multi-ring
  schedules), the running dK/dV sum of each piece starts at the first holder
  that contributes, follows its chain one hop behind the work, summed on the
  way, and goes home from the last contributor;
* otherwise each contributor sends its own sum straight home after its last
  block.

Either way a sum leaves a rank only once everything it carries is computed
and arrived, so `tokenring.plancheck` proves the result like any plan.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from .plan import Block, Payload, Plan, Span, Step, Transfer

_RENAMED = {
    Payload.QUERY: Payload.GRAD_QUERY,
    Payload.PARTIAL: Payload.GRAD_PARTIAL,
    Payload.KEY_VALUE: Payload.KEY_VALUE,
}


def derive_backward(forward: Plan) -> Plan:
    if forward.backward:
        raise ValueError("derive_backward needs a forward plan")
    # One pass over the plan: each owner's keys/values blocks away from home, and its key/value messages.
    away: dict[int, list[tuple[int, Block]]] = defaultdict(list)
    sent: dict[int, list[Transfer]] = defaultdict(list)
    for step in forward.steps:
        for b in step.blocks:
            if b.rank != b.kv_owner:
                away[b.kv_owner].append((step.index, b))
        for t in step.transfers:
            if t.payload is Payload.KEY_VALUE:
                sent[t.owner].append(t)
    spans = _Spans()
    extra: dict[int, list[Transfer]] = defaultdict(list)
    for owner in range(forward.world_size):
        for step, transfer in _grad_kv_route(owner, away.get(owner, []), sent.get(owner, []), spans):
            extra[step].append(transfer)
    last = max([s.index for s in forward.steps] + list(extra), default=-1)
    by_index = {s.index: s for s in forward.steps}
    steps = []
    for index in range(last + 1):
        step = by_index.get(index, Step(index, (), ()))
        renamed = tuple(_renamed(t) for t in step.transfers)
        steps.append(Step(index, step.blocks, renamed + tuple(extra.get(index, ()))))
    return dataclasses.replace(forward, steps=tuple(steps), backward=True)


def _renamed(t: Transfer) -> Transfer:
    payload = _RENAMED[t.payload]
    return t if payload is t.payload else Transfer(t.src, t.dst, payload, t.owner, t.span)


class _Spans:
    """``contains``, ``overlaps`` and ``hull`` of spans, remembered per pair of span objects.

    A plan reuses a few span objects for many blocks and messages; Fraction
    arithmetic on each of them would dominate at large N. The memos hold the
    spans they saw, so their ids stay theirs.
    """

    def __init__(self) -> None:
        self._contains: dict[tuple[int, int], tuple[Span, Span, bool]] = {}
        self._overlaps: dict[tuple[int, int], tuple[Span, Span, bool]] = {}
        self._hull: dict[tuple[int, int], tuple[Span, Span, Span]] = {}
        self._values: dict[tuple, Span] = {}  # one object per hull value, so the memos stay small

    def contains(self, a: Span, b: Span) -> bool:
        if a is b:
            return True
        hit = self._contains.get((id(a), id(b)))
        if hit is None:
            hit = self._contains[(id(a), id(b))] = (a, b, a.contains(b))
        return hit[2]

    def overlaps(self, a: Span, b: Span) -> bool:
        hit = self._overlaps.get((id(a), id(b)))
        if hit is None:
            hit = self._overlaps[(id(a), id(b))] = (a, b, a.intersection(b) is not None)
        return hit[2]

    def hull(self, a: Span, b: Span | None) -> Span:
        if b is None or a is b:
            return a
        hit = self._hull.get((id(a), id(b)))
        if hit is None:
            value = a.hull(b)
            hit = self._hull[(id(a), id(b))] = (a, b, self._values.setdefault((value.start, value.stop), value))
        return hit[2]


class _Pieces:
    """Which chain's piece holds a span: at most one, since the pieces of one owner's chains never overlap."""

    def __init__(self, chains: list[tuple[Span, list[int]]], spans: _Spans) -> None:
        self._chains = chains
        self._spans = spans
        self._memo: dict[int, tuple[int, Span, int | None]] = {}  # id(span) -> (chains then, span, chain)

    def holding(self, span: Span) -> int | None:
        hit = self._memo.get(id(span))
        if hit is None or hit[0] != len(self._chains):
            found = next((i for i, (piece, _) in enumerate(self._chains) if self._spans.contains(piece, span)), None)
            hit = self._memo[id(span)] = (len(self._chains), span, found)
        return hit[2]


def _grad_kv_route(owner: int, away: list[tuple[int, Block]], sent: list[Transfer],
                   spans: _Spans) -> list[tuple[int, Transfer]]:
    """(step, transfer) of every dK/dV message that brings ``owner``'s gradients home.

    ``away``: (step, block) of every block computed with ``owner``'s keys on
    another rank, in plan order; ``sent``: the messages of its keys/values,
    in plan order.
    """
    found = _chains(owner, sent, spans)
    if found is None:
        return _straight_home(owner, away, spans)
    chains, members = found
    pieces = _Pieces(chains, spans)
    on_chain: list[list[tuple[int, Block]]] = [[] for _ in chains]
    for step, b in away:
        i = pieces.holding(b.kv_span)
        if i is None or b.rank not in members[i]:  # a block on no chain: do not guess
            return _straight_home(owner, away, spans)
        on_chain[i].append((step, b))
    messages = []
    for (piece, chain), blocks in zip(chains, on_chain):
        messages += _along_chain(owner, chain, blocks, spans)
    return messages


def _straight_home(owner: int, away: list[tuple[int, Block]], spans: _Spans) -> list[tuple[int, Transfer]]:
    """Each contributor's own sum, straight home after its last block."""
    last_block, covered = _contributions(away, spans)
    return [
        (last_block[h] + 1, Transfer(h, owner, Payload.GRAD_KEY_VALUE, owner, covered[h]))
        for h in sorted(last_block)
    ]


def _contributions(blocks: list[tuple[int, Block]], spans: _Spans) -> tuple[dict[int, int], dict[int, Span]]:
    """Per holder of the keys of these blocks: its last block's step and the hull of its rows."""
    last_block: dict[int, int] = {}
    covered: dict[int, Span] = {}
    for step, b in blocks:
        last_block[b.rank] = step
        covered[b.rank] = spans.hull(b.kv_span, covered.get(b.rank))
    return last_block, covered


def _along_chain(owner: int, chain: list[int], blocks: list[tuple[int, Block]],
                 spans: _Spans) -> list[tuple[int, Transfer]]:
    """The running sum of one piece starts at its first contributor, follows the chain, goes home from the last."""
    last_block, covered = _contributions(blocks, spans)
    contributors = [h for h in chain if h in last_block]
    if not contributors:
        return []
    route = chain[chain.index(contributors[0]) : chain.index(contributors[-1]) + 1] + [owner]
    messages = []
    carried: Span | None = None
    ready = -1  # the step after which the sum held at route[i] is complete
    for here, there in zip(route, route[1:]):
        if here in last_block:
            carried = spans.hull(covered[here], carried)
            ready = max(ready, last_block[here])
        assert carried is not None
        messages.append((ready + 1, Transfer(here, there, Payload.GRAD_KEY_VALUE, owner, carried)))
        ready += 1
    return messages


def _chains(owner: int, sent: list[Transfer],
            spans: _Spans) -> tuple[list[tuple[Span, list[int]]], list[set[int]]] | None:
    """The chains ``owner``'s keys/values went down, one per piece: (the piece, the ranks in order), and their ranks.

    Each message of the owner's keys either leaves the owner (a new chain,
    its span the piece) or extends the one chain that ends at its sender and
    whose piece holds its span. None when they did not go down chains like
    that (then each holder's sum goes straight home).
    """
    chains: list[tuple[Span, list[int]]] = []
    visited: list[set[int]] = []
    pieces = _Pieces(chains, spans)
    for t in sent:
        if t.src == owner:
            if any(spans.overlaps(piece, t.span) for piece, _ in chains):
                return None
            chains.append((t.span, [t.dst]))
            visited.append({t.dst})
            continue
        # The pieces never overlap: the one chain whose piece holds the span must end at the sender.
        i = pieces.holding(t.span)
        if i is None or chains[i][1][-1] != t.src or t.dst in visited[i] or t.dst == owner:
            return None
        chains[i][1].append(t.dst)
        visited[i].add(t.dst)
    return chains, visited
