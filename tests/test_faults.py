"""Faults: a rank killed, absent or slow; every survivor raises a TokenRing error in time, naming the culprit."""

import re
import time

import pytest

from tokenring.testing.fault_tasks import FAULTS
from tokenring.testing.problems import Problem
from tokenring.tools.launch import LocalWorld

WORLD_SIZE = 3
TIMEOUT_S = 4.0
BOUND_S = 10.0  # what a survivor may take beyond TOKENRING_TIMEOUT_S: setup, and a peer's own timeout first
BUILD_PATH = re.compile(r"\.(cc|cpp|h):\d+|/__w/")


def run_fault(fault, victim, algorithm="tokenring", causal=False, timeout_s=TIMEOUT_S):
    problem = Problem(0, batch=1, seq_len=8 * WORLD_SIZE, q_heads=4, kv_heads=2, head_dim=16, causal=causal,
                      algorithm=algorithm)
    started = time.monotonic()
    with LocalWorld(WORLD_SIZE, threads_per_rank=1, env={"TOKENRING_TIMEOUT_S": str(timeout_s)}) as world:
        results = world.run("tokenring.testing.fault_tasks.call_through_a_fault", problem, victim, fault, timeout_s,
                            timeout_s=timeout_s * 4 + BOUND_S * 2, allow_exits=True)
    return results, time.monotonic() - started


@pytest.mark.parametrize("fault", [f for f in FAULTS if f != "slow"])
def test_every_survivor_raises_a_tokenring_error_in_time_naming_a_rank(fault):
    victim = 1
    results, _ = run_fault(fault, victim)
    for result in results:
        if result.rank == victim:
            continue
        assert result.ok, f"rank {result.rank}: the task itself failed: {result.error_type}: {result.error}"
        report = result.value
        assert report["outcome"] != "ok", f"rank {result.rank} finished a call a rank never made"
        assert report["is_ours"], f"rank {result.rank} raised {report['outcome']}: {report['message']}"
        assert report["seconds"] <= TIMEOUT_S + BOUND_S, (result.rank, report)
        message = report["message"]
        assert f"rank {result.rank}" in message and not BUILD_PATH.search(message), message
        others = [r for r in range(WORLD_SIZE) if r != result.rank]
        assert any(f"rank {r}" in message or f"ranks {r}" in message for r in others), message


def test_a_rank_that_never_comes_is_named_by_every_survivor():
    results, _ = run_fault("never-calls", victim=2)
    for result in results[:2]:
        message = result.value["message"]
        assert result.value["outcome"] == "CommTimeout" and "rank 2 never came" in message, message


def test_a_dead_peer_is_reported_as_such():
    results, _ = run_fault("killed-between-calls", victim=1)
    messages = [r.value["message"] for r in results if r.rank != 1]
    assert any("rank 1" in m and "died" in m for m in messages), messages


def test_a_slow_rank_changes_nothing_but_time():
    """5 s late (fault_tasks' slow_s) under a 20 s timeout: only slower."""
    results, _ = run_fault("slow", victim=1, timeout_s=20.0)
    for result in results:
        assert result.ok and result.value["outcome"] == "ok", (result.rank, result.value)
