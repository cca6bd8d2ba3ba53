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

from .plan import Payload, Plan, Span, Step, Transfer

_RENAMED = {
    Payload.QUERY: Payload.GRAD_QUERY,
    Payload.PARTIAL: Payload.GRAD_PARTIAL,
    Payload.KEY_VALUE: Payload.KEY_VALUE,
}


def derive_backward(forward: Plan) -> Plan:
    if forward.backward:
        raise ValueError("derive_backward needs a forward plan")
    extra: dict[int, list[Transfer]] = defaultdict(list)
    for owner in range(forward.world_size):
        for step, transfer in _grad_kv_route(forward, owner):
            extra[step].append(transfer)
    last = max([s.index for s in forward.steps] + list(extra), default=-1)
    by_index = {s.index: s for s in forward.steps}
    steps = []
    for index in range(last + 1):
        step = by_index.get(index, Step(index, (), ()))
        renamed = tuple(dataclasses.replace(t, payload=_RENAMED[t.payload]) for t in step.transfers)
        steps.append(Step(index, step.blocks, renamed + tuple(extra.get(index, ()))))
    return dataclasses.replace(forward, steps=tuple(steps), backward=True)


def _grad_kv_route(forward: Plan, owner: int) -> list[tuple[int, Transfer]]:
    """(step, transfer) of every dK/dV message that brings ``owner``'s gradients home."""
    chains = _chains(forward, owner)
    if chains is None:
        return _straight_home(forward, owner)
    for step in forward.steps:
        for b in step.blocks:
            if b.kv_owner == owner and b.rank != owner and not any(
                piece.contains(b.kv_span) and b.rank in ranks for piece, ranks in chains
            ):  # a block on no chain: do not guess
                return _straight_home(forward, owner)
    messages = []
    for piece, chain in chains:
        messages += _along_chain(forward, owner, piece, chain)
    return messages


def _straight_home(forward: Plan, owner: int) -> list[tuple[int, Transfer]]:
    """Each contributor's own sum, straight home after its last block."""
    last_block, covered = _contributions(forward, owner, None)
    return [
        (last_block[h] + 1, Transfer(h, owner, Payload.GRAD_KEY_VALUE, owner, covered[h]))
        for h in sorted(last_block)
    ]


def _contributions(forward: Plan, owner: int, piece: Span | None) -> tuple[dict[int, int], dict[int, Span]]:
    """Per holder of ``owner``'s keys (within ``piece``, if given): its last block's step and its rows."""
    last_block: dict[int, int] = {}
    covered: dict[int, Span] = {}
    for step in forward.steps:
        for b in step.blocks:
            if b.kv_owner == owner and b.rank != owner and (piece is None or piece.contains(b.kv_span)):
                last_block[b.rank] = step.index
                covered[b.rank] = b.kv_span.hull(covered.get(b.rank))
    return last_block, covered


def _along_chain(forward: Plan, owner: int, piece: Span, chain: list[int]) -> list[tuple[int, Transfer]]:
    """The running sum of one piece starts at its first contributor, follows the chain, goes home from the last."""
    last_block, covered = _contributions(forward, owner, piece)
    contributors = [h for h in chain if h in last_block]
    if not contributors:
        return []
    route = chain[chain.index(contributors[0]) : chain.index(contributors[-1]) + 1] + [owner]
    messages = []
    carried: Span | None = None
    ready = -1  # the step after which the sum held at route[i] is complete
    for here, there in zip(route, route[1:]):
        if here in last_block:
            carried = covered[here].hull(carried)
            ready = max(ready, last_block[here])
        assert carried is not None
        messages.append((ready + 1, Transfer(here, there, Payload.GRAD_KEY_VALUE, owner, carried)))
        ready += 1
    return messages


def _chains(forward: Plan, owner: int) -> list[tuple[Span, list[int]]] | None:
    """The chains ``owner``'s keys/values went down, one per piece: (the piece, the ranks in order).

    Each message of the owner's keys either leaves the owner (a new chain,
    its span the piece) or extends the one chain that ends at its sender and
    whose piece holds its span. None when they did not go down chains like
    that (then each holder's sum goes straight home).
    """
    chains: list[tuple[Span, list[int]]] = []
    for _, t in forward.transfers():
        if t.payload is not Payload.KEY_VALUE or t.owner != owner:
            continue
        if t.src == owner:
            if any(piece.intersection(t.span) for piece, _ in chains):
                return None
            chains.append((t.span, [t.dst]))
            continue
        ends = [(piece, ranks) for piece, ranks in chains if ranks[-1] == t.src and piece.contains(t.span)]
        if len(ends) != 1 or t.dst in ends[0][1] or t.dst == owner:
            return None
        ends[0][1].append(t.dst)
    return chains
