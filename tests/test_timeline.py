"""Timeline events: recorded only when someone listens, one compute per block, ordered in time, on 1 to 3 ranks."""

import pytest
import torch

from tokenring.runtime import timeline
from tokenring.runtime.executor import Executor
from tokenring.interfaces import Comm
from tokenring.schedules.build import build_plan, schedule_names
from tokenring_cpu.kernel import CpuSdpaKernel

from threaded_world import run_plan


class _LoneComm(Comm):
    """The Comm of a world of one rank: a plan for N = 1 sends nothing."""

    rank, world_size, device = 0, 1, torch.device("cpu")

    def exchange(self, sends, recvs, *, channel, step):
        raise AssertionError("a one-rank plan must not send")

    def all_gather_bytes(self, payload, *, timeout_s):
        return [payload]


def _inputs():
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(1, 16, 2, 8, generator=gen) for _ in range(3)]


def test_nothing_is_recorded_without_a_listener(monkeypatch):
    monkeypatch.setattr(timeline, "_plugin_hook", lambda: None)
    assert timeline.recorder(0, 1, "tokenring", False) is timeline.NO_RECORDER
    calls = []
    monkeypatch.setattr(timeline, "_plugin_hook", lambda: lambda timeline: calls.append(timeline))
    recorder = timeline.recorder(0, 1, "tokenring", False)
    recorder.add(timeline.COMPUTE, 0, timeline.clock())
    recorder.finish()
    assert len(calls) == 1 and calls[0].events[0].kind == timeline.COMPUTE


def test_collect_receives_one_timeline_per_pass_with_ordered_events():
    q, k, v = _inputs()
    executor = Executor(_LoneComm(), CpuSdpaKernel())
    plan = build_plan("tokenring", "zigzag", True, 1)
    with timeline.collect() as got:
        out, lse = executor.forward(plan, q, k, v, scale=0.3, timeout_s=5)
        executor.backward(build_plan("tokenring", "zigzag", True, 1, backward=True), q, k, v, out, lse,
                          torch.randn_like(out), scale=0.3, timeout_s=5)
    assert [t.backward for t in got] == [False, True]
    for t in got:
        assert (t.rank, t.world_size, t.algorithm) == (0, 1, "tokenring")
        kinds = [e.kind for e in t.events]
        assert kinds.count(timeline.COMPUTE) == 1
        assert all(e.end_s >= e.start_s for e in t.events)
        assert t.total(timeline.COMPUTE) > 0
        assert timeline.Timeline.from_json(t.to_json()) == t
    # Outside the block nothing is collected, and quiet() silences even a collector.
    with timeline.collect() as silenced, timeline.quiet():
        executor.forward(plan, q, k, v, scale=0.3, timeout_s=5)
    assert silenced == []


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("algorithm", schedule_names())
def test_every_rank_records_its_posts_waits_and_arrivals(algorithm, world_size):
    plan = build_plan(algorithm, "zigzag", True, world_size)
    backward = build_plan(algorithm, "zigzag", True, world_size, backward=True)
    gen = torch.Generator().manual_seed(1)
    shards = [[torch.randn(1, 8, 2, 8, generator=gen) for _ in range(3)] for _ in range(world_size)]
    douts = [torch.randn(1, 8, 2, 8, generator=gen) for _ in range(world_size)]
    with timeline.collect() as got:
        run_plan(plan, shards, scale=0.3, backward_plan=backward, douts=douts)
    assert sorted((t.rank, t.backward) for t in got) == sorted((r, b) for r in range(world_size) for b in (False, True))
    for t in got:
        this_plan = backward if t.backward else plan
        assert (t.world_size, t.algorithm) == (world_size, algorithm)
        posts = [e for e in t.events if e.kind == timeline.POST]
        sending = [s.index for s in this_plan.steps if any(x.src == t.rank or x.dst == t.rank for x in s.transfers)]
        assert [e.step for e in posts] == sending
        assert [e.step for e in t.events if e.kind == timeline.WAIT] == sending
        for post in posts:
            step = this_plan.steps[post.step]
            assert post.detail["bytes_out"] + post.detail["bytes_in"] > 0
            assert post.detail["sends"] == [[x.dst, x.payload.value] for x in step.transfers if x.src == t.rank]
        arrived = [p for e in t.events if e.kind == timeline.MERGE for p in e.detail.get("arrived", ())]
        assert len(arrived) == sum(1 for _, x in this_plan.transfers() if x.dst == t.rank)
        computes = [e for e in t.events if e.kind == timeline.COMPUTE]
        assert len(computes) == sum(len(s.blocks_of(t.rank)) for s in this_plan.steps)
        # Within a step: the post comes before the compute, the compute before the wait.
        for post in posts:
            wait = next(e for e in t.events if e.kind == timeline.WAIT and e.step == post.step)
            for c in (c for c in computes if c.step == post.step):
                assert post.end_s <= c.start_s <= c.end_s <= wait.start_s
