"""The edge-disjoint directed rings of a full mesh, and the multi-ring plans that ride them."""

from collections import Counter

import pytest

from tokenring.plan.model import Payload
from tokenring.schedules.build import build_plan
from tokenring.schedules.multi_ring import ring_count
from tokenring.schedules.rings import directed_rings


@pytest.mark.parametrize("n", range(1, 17))
def test_every_ring_visits_every_rank_once_and_no_directed_link_is_in_two_rings(n):
    rings = directed_rings(n)
    links = Counter()
    for ring in rings:
        assert sorted(ring) == list(range(n)), ring
        if n > 1:
            links.update(zip(ring, ring[1:] + ring[:1]))
    assert all(count == 1 for count in links.values()), [link for link, c in links.items() if c > 1]


@pytest.mark.parametrize("n, count", [(2, 1), (3, 2), (4, 2), (5, 4), (6, 4), (7, 6), (8, 7), (9, 8)])
def test_as_many_rings_as_a_full_mesh_allows(n, count):
    """N - 1 directed Hamiltonian rings for every N but 4 and 6, where N - 2 is the most (Tillson, 1980)."""
    assert len(directed_rings(n)) == count


def test_the_rings_are_the_same_on_every_call():
    """Every rank builds its plan alone: the rings must not depend on time or chance."""
    directed_rings.cache_clear()
    first = directed_rings(8)
    directed_rings.cache_clear()
    assert directed_rings(8) == first


@pytest.mark.parametrize("algorithm", ["tokenring-multi", "ring-multi"])
@pytest.mark.parametrize("n", [3, 4, 5, 8])
@pytest.mark.parametrize("layout, causal", [("contiguous", False), ("zigzag", True)])
def test_multi_ring_plans_put_each_piece_on_links_of_its_own(algorithm, n, layout, causal):
    """At every step each directed link carries travelling pieces of one ring only, and k rings are in use."""
    plan = build_plan(algorithm, layout, causal, n)
    travelling = (Payload.QUERY, Payload.KEY_VALUE)
    used = set()
    for step in plan.steps:
        owners_per_link = Counter((t.src, t.dst) for t in step.transfers if t.payload in travelling)
        # a ring carries one owner's piece per link per step (with zigzag: the piece's two halves)
        assert max(owners_per_link.values(), default=0) <= (2 if layout == "zigzag" else 1), step.index
        used.update(owners_per_link)
    assert len(used) == ring_count(n) * n


@pytest.mark.parametrize("n", [2, 3, 4, 5])
@pytest.mark.parametrize("algorithm", ["ring-multi", "ring-2way"])
def test_dkv_sums_follow_each_piece_home_and_are_exact(n, algorithm):
    """Backward of the K/V schedules: each piece's dK/dV sum rides its own chain (messages a piece long,
    so a rank holds pieces, not whole shards, of others' sums) and the gradients equal float64's."""
    import torch

    from test_plan_model import _expected, _problem
    from threaded_world import run_plan
    from tokenring.placement.layout import shard, unshard

    plan, backward = (build_plan(algorithm, "contiguous", False, n, backward=b) for b in (False, True))
    pieces = {t.span for _, t in plan.transfers() if t.payload is Payload.KEY_VALUE}
    sums = [t for _, t in backward.transfers() if t.payload is Payload.GRAD_KEY_VALUE]
    assert sums and all(t.span in pieces for t in sums), (pieces, {t.span for t in sums})
    (q, k, v, dout), _, _ = _problem(n, 8, 8)
    shards = [tuple(shard(t, r, n, layout="contiguous") for t in (q, k, v)) for r in range(n)]
    douts = [shard(dout, r, n, layout="contiguous") for r in range(n)]
    results, _ = run_plan(plan, shards, scale=0.4, backward_plan=backward, douts=douts)
    for index, grad in zip((2, 3, 4), _expected(q, k, v, dout, 0.4)[2]):
        torch.testing.assert_close(unshard([r[index] for r in results], layout="contiguous"), grad, rtol=1e-9, atol=1e-9)


PASS_Q = ["tokenring", "tokenring-2way", "tokenring-multi"]


def _whole_tail_plan(algorithm, layout, causal, n):
    """The same schedule before `hide_tail`: each last block computed whole, its partial sent whole."""
    from tokenring.placement.layout import Layout
    from tokenring.plan.model import Plan
    from tokenring.schedules.hops import cheaper_direction
    from tokenring.schedules.multi_ring import multi_ring_routes
    from tokenring.schedules.routes import route_steps, two_way_routes

    layout = Layout(layout)
    if algorithm == "tokenring":
        steps = cheaper_direction(True, layout, causal, n)[1]
    else:
        routes = two_way_routes(n) if algorithm == "tokenring-2way" else multi_ring_routes(n, layout)
        steps = route_steps(True, layout, causal, n, routes)
    return Plan(algorithm, layout, causal, n, steps)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("layout, causal", [("contiguous", False), ("contiguous", True), ("zigzag", True)])
@pytest.mark.parametrize("n", range(2, 9))
@pytest.mark.parametrize("algorithm", PASS_Q)
def test_pass_q_plans_send_the_last_partials_home_in_halves_as_they_finish(algorithm, n, layout, causal, backward):
    """Hide the tail: each last block is computed in two halves of its query rows, the first half's partial
    travels while the second half is computed, and the final step carries only the second half's partial
    (at most half the bytes the whole last block's partial had on any link), while every rank computes
    half of its own block, which needs nothing that travels."""
    from tokenring.plan.backward import derive_backward
    from tokenring.plan.model import ProblemShape

    shape = ProblemShape(batch=1, seq_local=64, q_heads=4, kv_heads=2, head_dim=16, itemsize=2)
    plan = build_plan(algorithm, layout, causal, n, backward=backward)
    whole = _whole_tail_plan(algorithm, layout, causal, n)
    whole = derive_backward(whole) if backward else whole
    assert len(plan.steps) == len(whole.steps) + 1
    result = Payload.GRAD_PARTIAL if backward else Payload.PARTIAL

    def final_link_bytes(p):
        final = p.steps[-1].index
        return {(t.src, t.dst): t.bytes for t in p.link_bytes(shape) if t.step == final}

    final = plan.steps[-1]
    assert final.transfers and {t.payload for t in final.transfers} == {result}
    assert all(b.rank == b.q_owner for b in final.blocks)  # nothing computed there has to travel
    before = final_link_bytes(whole)
    assert final_link_bytes(plan).keys() == before.keys()
    for link, nbytes in final_link_bytes(plan).items():
        assert nbytes <= before[link] // 2 + 8, (link, nbytes, before[link])  # + the lse's alignment padding
    # the step before computes the second halves while the first halves' partials travel home
    penultimate = plan.steps[-2]
    tail_pieces = {(b.rank, b.q_owner) for b in penultimate.blocks if b.rank != b.q_owner}
    assert tail_pieces == {(t.src, t.owner) for t in final.transfers}
    assert tail_pieces <= {(t.src, t.owner) for t in penultimate.transfers if t.payload is result}
    # same total work per rank, and nothing more on the wire than the lse padding of the extra messages
    assert sum(b.work for s in plan.steps for b in s.blocks) == sum(b.work for s in whole.steps for b in s.blocks)
    total = sum(t.bytes for t in plan.link_bytes(shape))
    assert 0 <= total - sum(t.bytes for t in whole.link_bytes(shape)) <= 8 * len(final.transfers)


@pytest.mark.parametrize("algorithm", PASS_Q)
@pytest.mark.parametrize("n", [5, 6, 7, 8])
@pytest.mark.parametrize("layout, causal", [("contiguous", False), ("zigzag", True)])
def test_pass_q_plans_with_a_hidden_tail_are_exact_and_send_what_they_plan(algorithm, n, layout, causal):
    """Forward and backward against float64 at the world sizes the exactness suite leaves out, with the
    travelling queries held across the extra step, and the bytes sent equal to the plan's."""
    import torch

    from threaded_world import run_plan
    from tokenring.plan.backward import derive_backward
    from tokenring.runtime.executor import problem_shape
    from tokenring.placement.layout import shard, unshard
    from tokenring.plan.model import sum_by_link
    from tokenring.reference import reference_attention

    plan = build_plan(algorithm, layout, causal, n)
    backward = derive_backward(plan)
    gen = torch.Generator().manual_seed(n)
    seq_local = plan.granularity * 2
    q = torch.randn(1, n * seq_local, 4, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, n * seq_local, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(1, n * seq_local, 4, 8, generator=gen, dtype=torch.float64)
    shards = [tuple(shard(t, r, n, layout=layout) for t in (q, k, v)) for r in range(n)]
    douts = [shard(dout, r, n, layout=layout) for r in range(n)]
    results, sent = run_plan(plan, shards, scale=0.4, backward_plan=backward, douts=douts)

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, _ = reference_attention(*leaves, causal=causal, softmax_scale=0.4)
    out.backward(dout)
    torch.testing.assert_close(unshard([r[0] for r in results], layout=layout), out.detach(), rtol=1e-9, atol=1e-9)
    for index, leaf in zip((2, 3, 4), leaves):
        got = unshard([r[index] for r in results], layout=layout)
        torch.testing.assert_close(got, leaf.grad, rtol=1e-9, atol=1e-9)
    shape = problem_shape(*shards[0][:2])
    assert sum_by_link(sent) == sum_by_link(plan.link_bytes(shape) + backward.link_bytes(shape))
