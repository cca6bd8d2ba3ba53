"""Agreement once per call signature, a changed call still caught on every rank, and no host sync per call."""

import time
from types import SimpleNamespace

import pytest
import torch

from tokenring.runtime.agreement import MARKER, Agreement, markers_reach_everyone
from tokenring.interfaces import Mask
from tokenring.placement.layout import Layout
from tokenring.plan.model import ALL, Block, Payload, Plan, ProblemShape, Step, Transfer
from tokenring.schedules.build import build_plan, schedule_names
from tokenring.testing.problems import Problem

B, S_LOCAL, HQ, HKV, D = 2, 8, 4, 2, 16


def problem(seed, world_size, **changes):
    return Problem(seed, batch=B, seq_len=S_LOCAL * world_size, q_heads=HQ, kv_heads=HKV, head_dim=D).with_(**changes)


# -- which plans can carry a stop ---------------------------------------------------------------

@pytest.mark.parametrize("algorithm", schedule_names())
@pytest.mark.parametrize("causal", [False, True])
def test_markers_from_any_rank_reach_every_rank_in_every_schedule(algorithm, causal):
    layout = Layout.ZIGZAG if causal else Layout.CONTIGUOUS
    for world_size in range(2, 9):
        assert markers_reach_everyone(build_plan(algorithm, layout, causal, world_size)), (algorithm, world_size)


def test_a_plan_whose_messages_stop_short_of_a_rank_is_not_trusted_to_carry_a_stop():
    # Three ranks, one step: 0 -> 1 -> 2 -> 0 at once. A stop from rank 0 reaches rank 1 only.
    blocks = tuple(Block(r, r, ALL, r, ALL, Mask.NONE) for r in range(3))
    transfers = tuple(Transfer(r, (r + 1) % 3, Payload.QUERY, r, ALL) for r in range(3))
    plan = Plan("one-hop", Layout.CONTIGUOUS, False, 3, (Step(0, blocks, transfers),))
    assert not markers_reach_everyone(plan)
    comm = SimpleNamespace(world_size=3, accepts_short_messages=True, device=torch.device("cpu"))
    agreement = Agreement()
    agreement.remember(comm, "key", plan, ProblemShape(B, S_LOCAL, HQ, HKV, D, 4), torch.float32)
    assert not agreement.covers("key"), "a plan that cannot carry a stop must gather on every call"


@pytest.mark.parametrize("comm", [
    SimpleNamespace(world_size=3, accepts_short_messages=False, device=torch.device("cpu")),  # e.g. NCCL
    SimpleNamespace(world_size=3, accepts_short_messages=True, device=torch.device("meta")),  # not host memory
])
def test_comms_that_cannot_carry_a_stop_gather_on_every_call(comm):
    plan = build_plan("tokenring", Layout.CONTIGUOUS, False, 3)
    agreement = Agreement()
    agreement.remember(comm, "key", plan, ProblemShape(B, S_LOCAL, HQ, HKV, D, 4), torch.float32)
    assert not agreement.covers("key")


def test_messages_shorter_than_the_marker_gather_on_every_call():
    plan = build_plan("tokenring", Layout.CONTIGUOUS, False, 2)
    comm = SimpleNamespace(world_size=2, accepts_short_messages=True, device=torch.device("cpu"))
    agreement = Agreement()
    agreement.remember(comm, "key", plan, ProblemShape(1, 2, 1, 1, 1, 2), torch.float16)  # 4-byte messages
    assert len(MARKER) > 4 and not agreement.covers("key")
    agreement.remember(comm, "key", plan, ProblemShape(B, S_LOCAL, HQ, HKV, D, 4), torch.float32)
    assert agreement.covers("key")


def test_the_marker_is_a_nan_in_every_float_format():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        head = torch.frombuffer(bytearray(MARKER[:8]), dtype=torch.uint8).view(dtype)
        assert torch.isnan(head).all(), dtype


# -- a rank that changes its call -------------------------------------------------------------------

SHAPE_CHANGE = {"q_shape": (B, S_LOCAL + 2, HQ, D), "k_shape": (B, S_LOCAL + 2, HKV, D),
                "v_shape": (B, S_LOCAL + 2, HKV, D)}
CHANGES = {
    # name: (the change on one rank, what every rank's error names)
    "softmax_scale": ({"softmax_scale": 0.5}, "argument 'softmax_scale' differs"),
    # Longer messages than its peers' buffers: sent before the agreement they would abort a gloo peer.
    "longer shards": (SHAPE_CHANGE, "shape of argument 'q' differs"),
    "causal": ({"causal": True, "layout": "contiguous"}, "argument 'causal' differs"),
    "layout": ({"layout": "zigzag"}, "argument 'layout' differs"),
    "dtype": ({"q_dtype": "float64", "k_dtype": "float64", "v_dtype": "float64"}, "dtype of argument 'q' differs"),
    "requires grad": ({"q_requires_grad": True}, "whether q, k or v require grad differs"),
    "bad input": ({"v_dtype": "bfloat16"}, "argument 'v': expected dtype torch.float32"),
}


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("algorithm", ["tokenring", "ring"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_rank_whose_call_changes_makes_every_rank_raise_at_once(worlds, seed, world_size, algorithm, change):
    """Two agreed calls (the second skips the gather), then one rank changes, then all agree again."""
    changed, fragment = CHANGES[change]
    culprit = world_size - 1 if change != "causal" else 1
    base = {"all": {"algorithm": algorithm}}
    calls = [base, base, {**base, culprit: changed}, base]
    world = worlds.get(world_size)  # started before the clock: starting ranks is not what is timed
    started = time.monotonic()
    per_rank = world.run_ok("tokenring.testing.tasks.call_sequence", problem(seed, world_size), calls, timeout_s=60)
    assert time.monotonic() - started < 10, "the errors took too long to surface"
    for rank, outcomes in enumerate(per_rank):
        assert outcomes[0] == outcomes[1] == outcomes[3] == "ok", (rank, outcomes)
        error_type, message = outcomes[2]
        assert error_type == "InputError", (rank, outcomes[2])
        assert message.startswith(f"token_ring_attn on rank {rank}: ") and fragment in message, message
        assert rank == culprit or f"rank {culprit}" in message, message


def test_every_rank_changing_at_once_is_a_new_agreement_not_an_error(worlds, seed):
    world_size = 3
    calls = [{}, {}, {"all": {"softmax_scale": 0.5}}, {"all": {"softmax_scale": 0.5}}, {}]
    per_rank = worlds.get(world_size).run_ok("tokenring.testing.tasks.call_sequence", problem(seed, world_size),
                                             calls, timeout_s=60)
    assert per_rank == [["ok"] * len(calls)] * world_size


# -- steady state: no gather, no host sync, only the plan's messages --------------------------------------

@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("algorithm", ["tokenring", "ring"])
@pytest.mark.parametrize("causal", [False, True])
def test_repeated_calls_run_no_host_sync_no_collective_and_only_the_plans_messages(
    worlds, seed, world_size, algorithm, causal
):
    """Forward and backward, after the first call: aten._local_scalar_dense (what .item(), bool() and
    int() of a tensor run) is never called, no c10d collective runs, and the messages are the plans'."""
    calls = 3
    shared = problem(seed, world_size, algorithm=algorithm, causal=causal)
    per_rank = worlds.get(world_size).run_ok("tokenring.testing.tasks.steady_state_ops", shared, calls, True,
                                             timeout_s=120)
    layout = shared.resolved_layout
    plans = [build_plan(algorithm, Layout(layout), causal, world_size, backward=b) for b in (False, True)]
    shape = ProblemShape(B, S_LOCAL, HQ, HKV, D, 4)
    for rank, result in enumerate(per_rank):
        assert result["agreement"] == {"gathers": 0, "skips": calls}, (rank, result["agreement"])
        sends = sum(1 for plan in plans for _, t in plan.transfers() if t.src == rank)
        recvs = sum(1 for plan in plans for _, t in plan.transfers() if t.dst == rank)
        expected = {"c10d.send.default": calls * sends, "c10d.recv_.default": calls * recvs}
        assert result["ops"] == {name: n for name, n in expected.items() if n}, (rank, result["ops"])
        predicted = [shape.payload_bytes(t.payload, t.span) for plan in plans for _, t in plan.transfers() if t.src == rank]
        assert sorted(m["bytes"] for m in result["sent"]) == sorted(predicted * calls), rank

