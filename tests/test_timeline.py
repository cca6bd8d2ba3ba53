"""Timeline events: recorded only when someone listens, one compute per block, ordered in time."""

import torch

from tokenring import timeline
from tokenring.executor import Executor
from tokenring.interfaces import Comm
from tokenring.plan import build_plan
from tokenring_cpu.kernel import CpuSdpaKernel


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
    assert timeline.recorder(0, 1, "tokenring", False) is None
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
