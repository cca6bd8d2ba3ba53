"""tokenring calibrate: the profile it writes loads, describes the group, and the planner uses it;
tokenring bench --impl auto runs and names what the planner chose from that profile."""

import json

import pytest

from tokenring.planner import choose as planner
from tokenring.planner import topology
from tokenring.plan.model import ProblemShape
from tokenring.tools import benchmark, calibrate, cli


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("calibrate") / "profile.json"
    code = cli.main(["calibrate", "--world-size", "2", "--seq-len", "64", "--heads", "2", "--head-dim", "8",
                     "--message-bytes", "4096", "--rounds", "1", "--kernel-repeats", "1", "--output", str(path)])
    assert code == 0
    return path


def test_the_profile_loads_with_the_world_size_and_positive_rates(profile_path):
    profile = topology.load_profile(profile_path)
    assert profile.world_size == 2 and profile.kind in ("fullmesh", "switch")
    assert profile.link.bytes_per_s > 0 and profile.link.latency_s >= 0
    assert 0 < profile.compute.flop_per_s < float("inf") and profile.compute.call_overhead_s >= 0
    kernels = profile.compute.kernels
    assert {k.backward for k in kernels} == {False, True} and all(k.flop_per_s > 0 for k in kernels)
    assert {(k.q_rows, k.kv_rows) for k in kernels if not k.backward} >= {(32, 32)}  # S_local x S_local
    raw = json.loads(profile_path.read_text())["measured"]
    assert raw["world_size"] == 2 and raw["comm"]["message_bytes"] == 4096
    assert [f["links"] for f in raw["comm"]["fanout"]] == [1]


def test_the_planner_accepts_the_profile(profile_path):
    profile = topology.load_profile(profile_path)
    shape = ProblemShape(batch=1, seq_local=32, q_heads=2, kv_heads=2, head_dim=8, itemsize=4)
    choice = planner.choose(shape, False, "contiguous", 2, True, profile=profile)
    assert choice.algorithm in benchmark.engine_names() and choice.predicted_s > 0


def test_profile_from_measurements_tells_a_mesh_from_a_switch():
    def raw(aggregate_links):
        one = {"bytes_per_s": 1e8}
        return {
            "comm": {"latency_s": {"1": 1e-5, "2": 1e-5, "3": 1e-5}, "one_way": {"1": one, "2": one, "3": one},
                     "both_ways": {"bytes_per_s": 1e8},
                     "fanout": [{"links": 3, "aggregate_bytes_per_s": aggregate_links * 1e8}]},
            "compute": {"problem": {"batch": 1, "heads": 2, "head_dim": 8},
                        "tiny_block": {"forward_s": 1e-5, "backward_s": 2e-5},
                        "blocks": [{"q_rows": 32, "kv_rows": 32, "forward_s": 1e-3, "backward_s": 3e-3}],
                        "engine_tiny_call": {"forward_s": 4e-3, "forward_backward_s": 1e-2}},
        }

    mesh = calibrate.profile_from_measurements(raw(3.0), 4)
    assert mesh.kind == "fullmesh" and mesh.injection_bytes_per_s is None
    limited = calibrate.profile_from_measurements(raw(2.0), 4)
    assert limited.kind == "fullmesh" and limited.injection_bytes_per_s == pytest.approx(2e8)
    port = calibrate.profile_from_measurements(raw(1.0), 4)
    assert port.kind == "switch" and port.injection_bytes_per_s is None
    # 4 ms less 3 message steps' latency, over the ring's 4 blocks per rank
    assert port.compute.call_overhead_s == pytest.approx((4e-3 - 3e-5) / 4)


def test_auto_label():
    assert benchmark.auto_label("ring", "ring") == "auto (ring)"
    assert benchmark.auto_label("tokenring", "ring") == "auto (tokenring / ring)"


def test_bench_runs_auto_with_the_profile_and_names_the_choice(profile_path, tmp_path):
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "--world-size", "2", "--seq-len", "64", "--heads", "2", "--head-dim", "8",
                     "--repeats", "1", "--warmup", "0", "--impl", "auto", "--profile", str(profile_path),
                     "--json", str(out), "--chart", ""])
    assert code == 0
    (row,) = [r for r in json.loads(out.read_text())["results"] if r["impl"] == "auto"]
    assert row["passed"] and row["auto_fwd"] in benchmark.engine_names()
    assert row["label"] == benchmark.auto_label(row["auto_fwd"], row["auto_fwdbwd"])
    assert str(profile_path) in row["auto_choice"]


def test_engine_overheads_split_the_cost_per_block_from_the_cost_per_message():
    # ring at N = 4: 4 blocks, 6 messages (sent or received) on rank 0; tokenring-multi: 10 blocks, 28 messages
    calls = {"ring": {"forward_s": 4 * 1e-3 + 6 * 5e-4}, "tokenring-multi": {"forward_s": 10 * 1e-3 + 28 * 5e-4}}
    assert calibrate.engine_overheads(calls, 4, 0.0) == pytest.approx((1e-3, 5e-4))
    assert calibrate.engine_overheads({"ring": calls["ring"]}, 4, 0.0) == pytest.approx((7e-3 / 4, 0.0))


def test_the_simulator_charges_each_message_to_both_ends():
    import dataclasses

    from tokenring.schedules.build import build_plan
    from tokenring.planner.simulate import simulate

    shape = ProblemShape(batch=1, seq_local=32, q_heads=2, kv_heads=2, head_dim=8, itemsize=4)
    base = topology.fullmesh(4, 1e6, tflops=None)
    plan = build_plan("ring", "contiguous", False, 4)
    costly = dataclasses.replace(base, compute=dataclasses.replace(base.compute, message_overhead_s=1e-3))
    extra = simulate(plan, shape, costly).total - simulate(plan, shape, base).total
    assert extra == pytest.approx(6e-3, rel=0.01)  # 3 steps, each rank sends one message and receives one
    assert topology.profile_from_json(costly.to_json()) == costly
