"""The gradient pass of any forward plan.

The backward runs the forward's blocks at the same steps, with gradient
payloads in the same places: (q, dout, out, lse) travel where q did, each
block's dq goes back to its owner where the partial (out, lse) did, and
keys/values travel as before. What the forward has no counterpart for is the
dK/dV that holders of someone else's keys compute; `derive_backward` adds
their way home for every schedule in which keys/values travel:

* when an owner's keys/values went down a chain (each holder received them
  once and passed them to at most one other), the running dK/dV sum starts at
  the first holder that contributes, follows the chain one hop behind the
  work, summed on the way, and goes home from the last contributor;
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
    last_block: dict[int, int] = {}   # holder -> last step it computes with owner's keys
    covered: dict[int, Span] = {}     # holder -> the hull of the key spans it contributes
    for step in forward.steps:
        for b in step.blocks:
            if b.kv_owner == owner and b.rank != owner:
                last_block[b.rank] = step.index
                covered[b.rank] = b.kv_span.hull(covered.get(b.rank))
    if not last_block:
        return []
    chain = _chain(forward, owner)
    if chain is None:
        return [
            (last_block[h] + 1, Transfer(h, owner, Payload.GRAD_KEY_VALUE, owner, covered[h]))
            for h in sorted(last_block)
        ]
    contributors = [h for h in chain if h in last_block]
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


def _chain(forward: Plan, owner: int) -> list[int] | None:
    """The ranks ``owner``'s keys/values visited, in order, if they went down a single chain."""
    chain = [owner]
    for _, t in forward.transfers():
        if t.payload is not Payload.KEY_VALUE or t.owner != owner:
            continue
        if t.src != chain[-1] or t.dst in chain:
            return None
        chain.append(t.dst)
    return chain[1:]
