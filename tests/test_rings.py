"""The edge-disjoint directed rings of a full mesh, and the multi-ring plans that ride them."""

from collections import Counter

import pytest

from tokenring.plan import Payload
from tokenring.plans import build_plan
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
    from tokenring.layout import shard, unshard

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
