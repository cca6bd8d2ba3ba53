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
and arrived, so `tokenring.proofs.plancheck` proves the result like any plan.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from tokenring.plan.model import Block, Payload, Plan, Span, Step, Transfer


def derive_backward(forward: Plan) -> Plan:
    if forward.backward:
        raise ValueError("derive_backward needs a forward plan")
    # One pass over the plan: each owner's keys/values blocks away from home, and its key/value messages.
    away: dict[int, list[tuple[int, Block]]] = defaultdict(list)
    sent: dict[int, list[Transfer]] = defaultdict(list)
    key_value = Payload.KEY_VALUE
    for step in forward.steps:
        index = step.index
        for b in step.blocks:
            if b.rank != b.kv_owner:
                away[b.kv_owner].append((index, b))
        for t in step.transfers:
            if t.payload is key_value:
                sent[t.owner].append(t)
    extra: dict[int, list[Transfer]] = defaultdict(list)
    for owner in range(forward.world_size):
        for step, transfer in _grad_kv_route(owner, away.get(owner, []), sent.get(owner, [])):
            extra[step].append(transfer)
    last = max([s.index for s in forward.steps] + list(extra), default=-1)
    by_index = {s.index: s for s in forward.steps}
    steps = []
    for index in range(last + 1):
        step = by_index.get(index, Step(index, (), ()))
        renamed = [t if t.payload is key_value else _renamed(t) for t in step.transfers]
        steps.append(Step(index, step.blocks, tuple(renamed + extra.get(index, []))))
    return dataclasses.replace(forward, steps=tuple(steps), backward=True)


def _renamed(t: Transfer) -> Transfer:
    payload = t.payload  # compared by identity: hashing a str enum costs a Python call
    if payload is Payload.KEY_VALUE:
        return t
    if payload is Payload.QUERY:
        return Transfer(t.src, t.dst, Payload.GRAD_QUERY, t.owner, t.span)
    if payload is Payload.PARTIAL:
        return Transfer(t.src, t.dst, Payload.GRAD_PARTIAL, t.owner, t.span)
    raise KeyError(payload)


def _hull(a: Span, b: Span | None) -> Span:
    if b is None or a == b:
        return a
    return a.hull(b)


class _Pieces:
    """Which chain's piece holds a span: at most one, since the pieces of one owner's chains never overlap."""

    def __init__(self, chains: list[tuple[Span, list[int]]]) -> None:
        self._chains = chains
        self._memo: dict[Span, int | None] = {}
        self._known = 0  # how many chains the memo has seen

    def holding(self, span: Span) -> int | None:
        if self._known != len(self._chains):
            self._memo.clear()
            self._known = len(self._chains)
        try:
            return self._memo[span]
        except KeyError:
            found = next((i for i, (piece, _) in enumerate(self._chains) if piece.contains(span)), None)
            self._memo[span] = found
            return found


def _grad_kv_route(owner: int, away: list[tuple[int, Block]], sent: list[Transfer]) -> list[tuple[int, Transfer]]:
    """(step, transfer) of every dK/dV message that brings ``owner``'s gradients home.

    ``away``: (step, block) of every block computed with ``owner``'s keys on
    another rank, in plan order; ``sent``: the messages of its keys/values,
    in plan order.
    """
    found = _chains(owner, sent)
    if found is None:
        return _straight_home(owner, away)
    chains, members = found
    pieces = _Pieces(chains)
    on_chain: list[list[tuple[int, Block]]] = [[] for _ in chains]
    holding: dict[Span, int | None] = {}  # the chains are final here
    for item in away:
        b = item[1]
        span = b.kv_span
        i = holding[span] if span in holding else holding.setdefault(span, pieces.holding(span))
        if i is None or b.rank not in members[i]:  # a block on no chain: do not guess
            return _straight_home(owner, away)
        on_chain[i].append(item)
    messages = []
    for (piece, chain), blocks in zip(chains, on_chain):
        messages += _along_chain(owner, chain, blocks)
    return messages


def _straight_home(owner: int, away: list[tuple[int, Block]]) -> list[tuple[int, Transfer]]:
    """Each contributor's own sum, straight home after its last block."""
    last_block, covered = _contributions(away)
    return [
        (last_block[h] + 1, Transfer(h, owner, Payload.GRAD_KEY_VALUE, owner, covered[h]))
        for h in sorted(last_block)
    ]


def _contributions(blocks: list[tuple[int, Block]]) -> tuple[dict[int, int], dict[int, Span]]:
    """Per holder of the keys of these blocks: its last block's step and the hull of its rows."""
    last_block: dict[int, int] = {}
    covered: dict[int, Span] = {}
    for step, b in blocks:
        rank, span = b.rank, b.kv_span
        last_block[rank] = step
        had = covered.get(rank)
        covered[rank] = span if had is None or had == span else span.hull(had)
    return last_block, covered


def _along_chain(owner: int, chain: list[int], blocks: list[tuple[int, Block]]) -> list[tuple[int, Transfer]]:
    """The running sum of one piece starts at its first contributor, follows the chain, goes home from the last."""
    last_block, covered = _contributions(blocks)
    contributors = [h for h in chain if h in last_block]
    if not contributors:
        return []
    route = chain[chain.index(contributors[0]) : chain.index(contributors[-1]) + 1] + [owner]
    messages = []
    add = messages.append
    grad_kv = Payload.GRAD_KEY_VALUE
    carried: Span | None = None
    ready = -1  # the step after which the sum held at route[i] is complete
    for here, there in zip(route, route[1:]):
        last = last_block.get(here)
        if last is not None:
            carried = _hull(covered[here], carried)
            if last > ready:
                ready = last
        assert carried is not None
        add((ready + 1, Transfer(here, there, grad_kv, owner, carried)))
        ready += 1
    return messages


def _chains(owner: int, sent: list[Transfer]) -> tuple[list[tuple[Span, list[int]]], list[set[int]]] | None:
    """The chains ``owner``'s keys/values went down, one per piece: (the piece, the ranks in order), and their ranks.

    Each message of the owner's keys either leaves the owner (a new chain,
    its span the piece) or extends the one chain that ends at its sender and
    whose piece holds its span. None when they did not go down chains like
    that (then each holder's sum goes straight home).
    """
    chains: list[tuple[Span, list[int]]] = []
    visited: list[set[int]] = []
    pieces = _Pieces(chains)
    for t in sent:
        src, dst = t.src, t.dst
        if src == owner:
            if any(piece.intersection(t.span) is not None for piece, _ in chains):
                return None
            chains.append((t.span, [dst]))
            visited.append({dst})
            continue
        # The pieces never overlap: the one chain whose piece holds the span must end at the sender.
        i = pieces.holding(t.span)
        if i is None:
            return None
        ranks, seen = chains[i][1], visited[i]
        if ranks[-1] != src or dst in seen or dst == owner:
            return None
        ranks.append(dst)
        seen.add(dst)
    return chains, visited
