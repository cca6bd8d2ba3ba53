"""Plans whose queries every rank already holds: decode against a sequence-sharded KV cache.

In decode every rank runs the model on the new token, so every rank holds
the same queries, and the cached keys/values are spread over the ranks. Each
rank computes its queries against its own share of the cache (one local
block, reading 1/N of it) and the partial results (out, lse) are merged so
that every rank ends with the exact output. Only results travel, and their
size does not depend on the cache's length.

A plan with ``Plan.replicated_queries`` says so. Its messages are
`Payload.MERGED`: what the sender has merged so far for its own copy of the
queries (its accumulator as the step began), which the receiver merges into
its own. Two merge paths:

* ``"gather"`` (straight): step 0 computes, step 1 sends every rank's
  partial to every other rank; N - 1 messages out of each rank, one step;
* ``"tree"`` (recursive doubling, N a power of two): in step k each rank
  swaps its merged result with rank r XOR 2^(k-1); log2 N messages out of
  each rank, log2 N steps.

`tokenring.proofs.replicated.check_replicated_plan` proves such plans.
"""

from __future__ import annotations

from tokenring.interfaces import Mask
from tokenring.placement.layout import Layout
from tokenring.plan.model import ALL, Block, Payload, Plan, Step, Transfer
from tokenring.proofs.replicated import check_replicated_plan

MERGES = ("gather", "tree")


def decode_plan(world_size: int, merge: str = "gather") -> Plan:
    """The replicated-query plan: each rank attends to its own keys/values, then results merge on every rank."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if merge not in MERGES:
        raise ValueError(f"argument 'merge': expected one of {MERGES}, got {merge!r}")
    n = world_size
    blocks = tuple(Block(r, r, ALL, r, ALL, Mask.NONE) for r in range(n))
    steps = [Step(0, blocks, ())]
    if merge == "gather" or n == 1:
        if n > 1:
            steps.append(Step(1, (), tuple(Transfer(src, dst, Payload.MERGED, src, ALL)
                                           for src in range(n) for dst in range(n) if dst != src)))
        note = "every rank sends its partial to every other rank"
    else:
        if n & (n - 1):
            raise ValueError(f"merge='tree' needs a power-of-two number of ranks, got {n}")
        for k in range(n.bit_length() - 1):
            steps.append(Step(k + 1, (), tuple(Transfer(r, r ^ (1 << k), Payload.MERGED, r, ALL) for r in range(n))))
        note = "partials merge by recursive doubling"
    plan = Plan(f"decode-{merge}", Layout.CONTIGUOUS, False, n, tuple(steps), note=note, replicated_queries=True)
    check_replicated_plan(plan)
    return plan


def default_merge(world_size: int) -> str:
    """Straight to every rank in one step for small groups; a tree once N - 1 messages cost more than log2 N steps."""
    return "tree" if world_size > 4 and not world_size & (world_size - 1) else "gather"
