"""tokenring bench: argument errors, the float64 reference, ranking that ignores wrong answers, one small run."""

import json
import math
import os
import shutil

import pytest
import torch

from tokenring import reference_attention
from tokenring.schedules.build import schedule_names
from tokenring.tools import benchmark, cli
from tokenring.tools.problems import relative_error


def _case(**changes):
    base = dict(impl="tokenring", seed=5, batch=1, seq_len=48, heads=4, kv_heads=2, head_dim=8, dtype="float32",
                causal=True, repeats=1, warmup=0)
    base.update(changes)
    return benchmark.Case(**base)


@pytest.mark.parametrize("causal", [False, True])
def test_chunked_reference_matches_autograd_of_plain_attention(causal):
    case = _case(causal=causal)
    got = benchmark.reference(case, rows=7)  # uneven row blocks on purpose
    problem = case.problem()
    q, k, v = (t.to(torch.float64).requires_grad_() for t in problem.inputs())
    out, _ = reference_attention(q, k, v, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), problem.grad_output().to(torch.float64))
    for name, want in zip(("out", "dq", "dk", "dv"), (out, *grads)):
        assert relative_error(got[name], want) < 1e-12, name


def test_a_wrong_answer_is_never_the_best():
    rows = [
        {"impl": "tokenring", "seq_len": 64, "link_gbps": 1.0, "fwd_s": 2.0, "fwdbwd_s": 4.0, "passed": True},
        {"impl": "ring", "seq_len": 64, "link_gbps": 1.0, "fwd_s": 1.0, "fwdbwd_s": 3.0, "passed": False},
        {"impl": "torch-ring", "seq_len": 64, "link_gbps": 1.0, "fwd_s": 3.0, "fwdbwd_s": 2.0, "passed": True},
    ]
    benchmark._add_ratios(rows)
    assert rows[0]["ratio_fwd"] == 1.0 and rows[2]["ratio_fwd"] == 1.5
    assert rows[0]["ratio_fwdbwd"] == 2.0 and rows[2]["ratio_fwdbwd"] == 1.0
    assert rows[1]["ratio_fwd"] is None
    assert "WRONG" in benchmark._table_rows([dict(rows[1], network="x", parallel_efficiency=None, max_rel_err=1.0,
                                                  peak_mem_bytes=None)])[1][-1]


def test_gqa_skips_what_needs_equal_heads_and_runs_the_rest(tmp_path, capsys):
    out = tmp_path / "gqa.json"
    code = cli.main(["bench", "--world-size", "2", "--seq-len", "32", "--heads", "2", "--kv-heads", "1",
                     "--head-dim", "8", "--repeats", "1", "--warmup", "0", "--json", str(out), "--chart", ""])
    assert code == 0
    assert "torch-ring, sdpa skipped" in capsys.readouterr().err
    rows = json.loads(out.read_text())["results"]
    assert [r["impl"] for r in rows] == list(schedule_names()) and all(r["passed"] for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["--impl", "tokenring,flash"], "--impl"),
    (["--impl", ","], "--impl"),
    (["--world-size", "3", "--seq-len", "100"], "--seq-len"),
    (["--world-size", "2", "--seq-len", "64,66", "--causal"], "--seq-len"),  # zigzag: 2N = 4 chunks
    (["--heads", "6", "--kv-heads", "4"], "--heads"),
    (["--heads", "2", "--kv-heads", "1", "--impl", "sdpa,torch-ring"], "--impl"),
    (["--world-size", "0"], "--world-size"),
    (["--world-size", "-2"], "--world-size"),
    (["--seq-len", "0"], "--seq-len"),
    (["--seq-len", "4096,x"], "--seq-len"),
    (["--batch", "0"], "--batch"),
    (["--heads", "0"], "--heads"),
    (["--kv-heads", "0"], "--kv-heads"),
    (["--head-dim", "-8"], "--head-dim"),
    (["--repeats", "0"], "--repeats"),
    (["--warmup", "-1"], "--warmup"),
    (["--threads-per-rank", "0"], "--threads-per-rank"),
    (["--timeout", "0"], "--timeout"),
    (["--timeout", "nan"], "--timeout"),
    (["--link-gbps", "0"], "--link-gbps"),
    (["--link-gbps", "10,inf"], "--link-gbps"),
    (["--latency-us", "-5"], "--latency-us"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_bad_arguments_fail_before_starting_ranks(argv, message, capsys, monkeypatch):
    from tokenring.tools import launch

    def no_world(*args, **kwargs):
        raise AssertionError("ranks started for bad arguments")

    monkeypatch.setattr(launch, "LocalWorld", no_world)
    assert cli.main(["bench", *argv, "--chart", ""]) == 2
    err = capsys.readouterr().err
    assert f"error: argument {message}" in err, err
    assert "Traceback" not in err


def test_bench_and_run_check_the_problem_with_the_same_code(monkeypatch):
    from tokenring.tools import options

    calls = []
    real = options.check_problem

    def spy(parser, args, **kwargs):
        calls.append(parser.prog)
        return real(parser, args, **kwargs)

    monkeypatch.setattr(options, "check_problem", spy)
    assert cli.main(["bench", "--world-size", "3", "--seq-len", "100", "--chart", ""]) == 2
    assert cli.main(["run", "--world-size", "3", "--seq-len", "100"]) == 2
    assert calls == ["tokenring bench", "tokenring run"]


def _small_run(tmp_path, *extra):
    out = tmp_path / "bench.json"
    chart = tmp_path / "bench.png"
    code = cli.main(["bench", "--world-size", "2", "--seq-len", "64", "--heads", "2", "--head-dim", "8",
                     "--repeats", "1", "--warmup", "0", "--causal", "--json", str(out), "--chart", str(chart), *extra])
    return code, json.loads(out.read_text()), chart


def test_small_run_checks_every_implementation_and_writes_json_and_chart(tmp_path):
    code, report, chart = _small_run(tmp_path)
    assert code == 0
    rows = report["results"]
    assert [r["impl"] for r in rows] == ["sdpa", *schedule_names(), "torch-ring"]
    for r in rows:
        for key in ("impl", "network", "world_size", "seq_len", "fwd_s", "fwdbwd_s", "max_rel_err", "peak_mem_bytes"):
            assert key in r
        assert r["passed"] and r["max_rel_err"] < 1e-5 and r["fwd_s"] > 0 and r["fwdbwd_s"] > 0
        if r["impl"] != "sdpa":  # the last timed calls gave the checked answers again
            assert r["rel_err"]["timed_vs_checked"] <= 1e-6
    for r in rows[1:-1]:  # the engine's rows carry the overlap figures, computed as documented
        for kind in ("fwd", "bwd"):
            waits, alone = r[f"wait_{kind}_s_per_rank"], r[f"comm_alone_{kind}_s_per_rank"]
            assert len(waits) == len(alone) == 2 and all(a > 0 for a in alone)
            want = sum(min(max(1 - w / a, 0.0), 1.0) for w, a in zip(waits, alone)) / 2
            assert r[f"hidden_comm_{kind}"] == pytest.approx(want)
    if shutil.which("python") and _has_matplotlib():
        assert chart.read_bytes()[:4] == b"\x89PNG"


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0 or not shutil.which("tc"), reason="needs root and iproute2")
def test_small_run_over_an_emulated_full_mesh(tmp_path):
    code, report, _ = _small_run(tmp_path, "--impl", "tokenring,ring", "--network", "fullmesh", "--link-gbps", "2")
    assert code == 0 and report["network_fallback_reason"] is None
    assert {(r["network"], r["link_gbps"]) for r in report["results"]} == {("fullmesh", 2.0)}
    from tokenring.tools import netem

    assert not [n for n in netem.list_namespaces() if n.startswith(f"{netem.PREFIX}{os.getpid()}")]
