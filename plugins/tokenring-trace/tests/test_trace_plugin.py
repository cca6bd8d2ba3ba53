"""The trace plugin: switched by the environment, writes per-rank lines, renders a valid trace and chart."""

import json

import pytest

import tokenring_trace
from tokenring.runtime.timeline import Event, Timeline
from tokenring_trace import chrome_trace, load_timelines


def _timeline(rank, start, backward=False):
    events = (
        Event("post", 1, start, start + 0.001, {"bytes_out": 10}),
        Event("compute", 1, start + 0.001, start + 0.010),
        Event("wait", 1, start + 0.010, start + 0.012),
        Event("merge", 1, start + 0.012, start + 0.013),
    )
    return Timeline(rank, 2, "tokenring", backward, events)


def test_off_without_the_environment_variable(monkeypatch):
    monkeypatch.delenv(tokenring_trace.ENV, raising=False)
    assert not hasattr(tokenring_trace._plugin(), "tokenring_timeline")


def test_tracer_appends_one_line_per_pass_and_chrome_trace_is_consistent(tmp_path):
    tracer = tokenring_trace.Tracer(str(tmp_path))
    for rank in (0, 1):
        tracer.tokenring_timeline(timeline=_timeline(rank, 100.0 + rank * 0.002))
        tracer.tokenring_timeline(timeline=_timeline(rank, 100.1, backward=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.jsonl", "rank1.jsonl"]
    timelines = load_timelines(str(tmp_path))
    assert [(t.rank, t.backward) for t in timelines] == [(0, False), (0, True), (1, False), (1, True)]
    trace = json.loads(json.dumps(chrome_trace(timelines, last_calls=1)))
    complete = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(complete) == 2 * 4  # last pass of each rank, four events each
    assert min(e["ts"] for e in complete) == pytest.approx(0.0)
    compute = [e for e in complete if e["cat"] == "compute"]
    assert all(e["dur"] == pytest.approx(9000.0) for e in compute)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="TOKENRING_TRACE_DIR"):
        load_timelines(str(tmp_path))


def test_gantt_png_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    from tokenring_trace import gantt_png

    path = tmp_path / "gantt.png"
    gantt_png([_timeline(0, 1.0), _timeline(1, 1.0)], str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
