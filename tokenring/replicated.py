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

`check_replicated_plan` proves on symbols, as `tokenring.plancheck` does for
other plans, that each rank's result covers every (query atom, key atom)
pair exactly once, that every message is sent by the rank whose result it
is and that a rank computes only with its own queries and keys/values.
"""

from __future__ import annotations

import math
from collections import Counter

from .interfaces import Mask
from .layout import Layout
from .plan import ALL, Block, Payload, Plan, PlanError, Span, Step, Transfer

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


def check_replicated_plan(plan: Plan) -> None:
    """Raise `PlanError` unless every rank's result covers every (query, key) pair exactly once."""
    if not plan.replicated_queries:
        raise PlanError("check_replicated_plan needs a plan with replicated queries")
    if plan.backward or plan.causal or plan.tokens is not None:
        raise PlanError("a replicated-query plan is a forward plan of full attention (no causal or token mask)")
    n = plan.world_size
    spans = [s for step in plan.steps for b in step.blocks for s in (b.q_span, b.kv_span)]
    spans += [t.span for step in plan.steps for t in step.transfers]
    atoms = math.lcm(1, *(s.denominator for s in spans))

    def q_atoms(span: Span) -> range:
        first, count = span.rows(atoms)
        return range(first, first + count)

    covered = [Counter() for _ in range(n)]  # per rank: (query atom, (key owner, key atom)) -> times
    for position, step in enumerate(plan.steps):
        where = f"step {step.index}"
        if step.index != position:
            raise PlanError(f"{where} stands at position {position}: steps must be numbered 0, 1, 2, ... in order")
        arriving = []
        for t in step.transfers:
            if not (0 <= t.src < n and 0 <= t.dst < n and 0 <= t.owner < n):
                raise PlanError(f"{where}: transfer outside the world: {t}")
            if t.src == t.dst:
                raise PlanError(f"{where}: rank {t.src} sends to itself")
            if t.payload is not Payload.MERGED:
                raise PlanError(f"{where}: payload {t.payload.value} does not belong in a replicated-query plan")
            if t.owner != t.src:
                raise PlanError(f"{where}: rank {t.src} sends rank {t.owner}'s merged result: only its own")
            rows = set(q_atoms(t.span))
            carried = Counter({pair: c for pair, c in covered[t.src].items() if pair[0] in rows})
            if not carried:
                raise PlanError(f"{where}: rank {t.src} sends a merged result for {t.span} before it has any")
            arriving.append((t.dst, carried))
        for b in step.blocks:
            if not all(0 <= r < n for r in (b.rank, b.q_owner, b.kv_owner)):
                raise PlanError(f"{where}: block outside the world: {b}")
            if b.q_owner != b.rank or b.kv_owner != b.rank:
                raise PlanError(f"{where}: rank {b.rank} computes with another rank's queries or keys: {b}")
            if b.mask is not Mask.NONE:
                raise PlanError(f"{where}: masked block in a replicated-query plan: {b}")
            first, count = b.kv_span.rows(atoms)
            for qa in q_atoms(b.q_span):
                for ka in range(first, first + count):
                    covered[b.rank][(qa, (b.kv_owner, ka))] += 1
        for dst, carried in arriving:
            covered[dst].update(carried)
    required = Counter({(qa, (owner, ka)): 1 for qa in range(atoms) for owner in range(n) for ka in range(atoms)})
    for rank, got in enumerate(covered):
        if got != required:
            missing = sorted((required - got).elements())[:5]
            extra = sorted((got - required).elements())[:5]
            raise PlanError(f"rank {rank}'s result: (query atom, (key owner, key atom)) pairs missing {missing} "
                            f"or extra/duplicated {extra}")
