"""ring-reverse: the ring whose keys/values travel r -> r-1 (the demonstration schedule)."""

import pytest

from tokenring.plan.model import Payload, ProblemShape
from tokenring.schedules.build import build_plan, schedule_names


def test_it_is_registered_like_every_schedule():
    assert "ring-reverse" in schedule_names()


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
@pytest.mark.parametrize("layout,causal", [("contiguous", False), ("contiguous", True), ("zigzag", True)])
def test_keys_values_and_their_gradients_travel_r_to_r_minus_1(world_size, layout, causal):
    for backward in (False, True):
        plan = build_plan("ring-reverse", layout, causal, world_size, backward=backward)
        hops = [(t.src - t.dst) % world_size for _, t in plan.transfers()]
        payloads = {t.payload for _, t in plan.transfers()}
        assert payloads <= {Payload.KEY_VALUE, Payload.GRAD_KEY_VALUE}
        if not (causal and layout == "contiguous"):
            assert set(hops) == {1}, "every message goes one hop down"


@pytest.mark.parametrize("world_size", [3, 4, 8])
def test_it_moves_the_rings_bytes_except_where_the_ring_turns_round(world_size):
    shape = ProblemShape(batch=1, seq_local=64, q_heads=8, kv_heads=8, head_dim=64, itemsize=2)

    def total(name, layout, causal):
        return sum(t.bytes for t in build_plan(name, layout, causal, world_size).link_bytes(shape))

    assert total("ring-reverse", "contiguous", False) == total("ring", "contiguous", False)
    assert total("ring-reverse", "zigzag", True) == total("ring", "zigzag", True)
    assert total("ring-reverse", "contiguous", True) > total("ring", "contiguous", True)
