"""The ``tokenring`` command, run the way a user runs it: in its own process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

RUN_REPORT_KEYS = {
    "max_rel_err",
    "rel_err_out",
    "rel_err_lse",
    "passed",
    "seconds",
    "seconds_per_rank",
    "link_bytes",
    "planned_link_bytes",
    "traffic_matches_plan",
    "problem",
    "backend",
    "world_size",
    "threads_per_rank",
    "torch",
    "date",
}

SMALL_PROBLEM = ["--heads", "2", "--head-dim", "16", "--repeats", "1", "--timeout", "60"]


def tokenring(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tokenring", *args], capture_output=True, text=True, timeout=timeout
    )


def test_backends_json_lists_the_cpu_backend_as_available():
    done = tokenring("backends", "--json")
    assert done.returncode == 0, done.stderr
    entries = json.loads(done.stdout)
    cpu = next(e for e in entries if e["name"] == "cpu")
    assert cpu["available"] is True
    assert cpu["distribution"].startswith("tokenring-attn")
    assert {"reason", "capabilities"} <= cpu.keys()


def test_backends_table_names_the_cpu_backend():
    done = tokenring("backends")
    assert done.returncode == 0, done.stderr
    cpu_rows = [line.split() for line in done.stdout.splitlines() if line.startswith("cpu ")]
    assert cpu_rows and "yes" in cpu_rows[0]


@pytest.mark.parametrize(
    "world_size, seq_len, extra",
    # Causal runs default to the zigzag layout: 2 chunks per rank, so 6 must divide the length.
    [(2, 64, []), (3, 96, ["--causal", "--algorithm", "ring"])],
    ids=["tokenring-2-ranks", "ring-causal-3-ranks"],
)
def test_run_is_exact_and_moves_the_planned_bytes(tmp_path, world_size, seq_len, extra):
    report_path = tmp_path / "report.json"
    done = tokenring(
        "run", "--world-size", str(world_size), "--seq-len", str(seq_len), *SMALL_PROBLEM, *extra,
        "--json", str(report_path),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_path.read_text())
    assert RUN_REPORT_KEYS <= report.keys()
    assert report["max_rel_err"] < 1e-5
    assert report["passed"] is True
    assert report["traffic_matches_plan"] is True
    assert report["link_bytes"] == report["planned_link_bytes"]
    assert report["link_bytes"], "a multi-rank call must move some bytes"
    assert report["world_size"] == world_size
    assert len(report["seconds_per_rank"]) == world_size
    assert report["seconds"] == max(report["seconds_per_rank"])
    assert report["problem"]["causal"] is ("--causal" in extra)
    assert "PASS" in done.stdout


def test_run_rejects_a_sequence_that_does_not_split_across_ranks():
    done = tokenring("run", "--world-size", "2", "--seq-len", "63")
    assert done.returncode != 0
    assert "--seq-len" in done.stderr and "divisible" in done.stderr
    assert "Traceback" not in done.stderr


def test_run_reports_an_unknown_backend_in_one_line():
    done = tokenring("run", "--backend", "no-such-backend", *SMALL_PROBLEM)
    assert done.returncode == 2
    # torch itself may warn on stderr (e.g. when numpy is absent); ours is one line, no traceback.
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no-such-backend" in errors[0] and "'cpu'" in errors[0]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", ["run", "bench"])
@pytest.mark.parametrize("argv, flag", [
    (["--world-size", "0"], "--world-size"),
    (["--heads", "6", "--kv-heads", "4"], "--heads"),
    (["--timeout", "-1"], "--timeout"),
])
def test_run_and_bench_refuse_bad_arguments_alike(command, argv, flag):
    done = tokenring(command, *argv, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"tokenring {command}: error: argument {flag}" in done.stderr
    assert "Traceback" not in done.stderr


# -- tokenring plan ----------------------------------------------------------------------


def test_plan_list_names_every_registered_schedule():
    from tokenring.schedules.build import schedule_names

    listed = tokenring("plan", "--list")
    assert listed.returncode == 0, listed.stderr
    for name in schedule_names():
        assert name in listed.stdout
    as_json = tokenring("plan", "--list", "--json")
    assert [e["name"] for e in json.loads(as_json.stdout)] == list(schedule_names())


def test_plan_prints_blocks_messages_and_bytes_per_link(tmp_path):
    shown = tokenring("plan", "--algorithm", "ring", "--world-size", "3", "--seq-len", "96", "--backward")
    assert shown.returncode == 0, shown.stderr
    assert "ring plan, contiguous layout, non-causal, N=3, backward" in shown.stdout
    assert "rank 2 computes q[2].all x kv[1].all mask=none" in shown.stdout
    assert "grad_key_value[0].all" in shown.stdout and "bytes per directed link:" in shown.stdout
    path = tmp_path / "plan.json"
    written = tokenring("plan", "--algorithm", "tokenring", "--world-size", "4", "--causal", "--seq-len", "64",
                      "--json", str(path))
    assert written.returncode == 0, written.stderr
    data = json.loads(path.read_text())
    assert (data["algorithm"], data["layout"], data["world_size"]) == ("tokenring", "zigzag", 4)
    assert sum(t["bytes"] for t in data["link_bytes"]) == sum(
        t["bytes"] for s in data["steps"] for t in s["transfers"])


@pytest.mark.parametrize("args,flag", [
    (["--world-size", "0"], "--world-size"),
    (["--algorithm", "ulysses"], "--algorithm"),
    (["--world-size", "3", "--seq-len", "64"], "--seq-len"),
    (["--heads", "4", "--kv-heads", "3"], "--kv-heads"),
])
def test_plan_refuses_bad_arguments_naming_the_flag(args, flag):
    refused = tokenring("plan", *args)
    assert refused.returncode == 2 and flag in refused.stderr, refused.stderr
