"""algorithm="auto": the simulator's fastest schedule, the same on every rank, refused cleanly when ranks differ."""

import json

import pytest

from tokenring.plan.model import ProblemShape
from tokenring.planner.choose import PREFERENCE, TIE, choose
from tokenring.planner.simulate import predict_all
from tokenring.testing.problems import Problem
from tokenring.planner.topology import fullmesh, save_profile, switch


def shape(seq_local=512, q_heads=8, kv_heads=8):
    return ProblemShape(batch=1, seq_local=seq_local, q_heads=q_heads, kv_heads=kv_heads, head_dim=64,
                        itemsize=2, acc_itemsize=4)


@pytest.mark.parametrize("topology", ["fullmesh", "switch"])
@pytest.mark.parametrize("kv_heads", [8, 2])
@pytest.mark.parametrize("needs_grad", [False, True])
def test_auto_picks_a_schedule_predicted_within_the_tie_of_the_fastest(topology, kv_heads, needs_grad):
    profile = (fullmesh if topology == "fullmesh" else switch)(8, 1.0, 5, tflops=1.0)
    choice = choose(shape(kv_heads=kv_heads), True, "zigzag", 8, needs_grad, profile=profile)
    comparison = predict_all(shape(kv_heads=kv_heads), profile, True, "zigzag")
    times = {e.name: (e.training if needs_grad else e.forward.total) for e in comparison.estimates if e.error is None}
    assert times[choice.algorithm] <= min(times.values()) * (1 + TIE)
    assert choice.predicted_s == times[choice.algorithm]


def test_on_a_switch_the_fewest_bytes_win_and_ties_go_to_the_simpler_schedule():
    # Comm-bound GQA behind a switch: the ring moves a quarter of TokenRing's bytes.
    profile = switch(4, 0.1, 5, tflops=None)
    choice = choose(shape(kv_heads=2), False, "contiguous", 4, False, profile=profile)
    assert PREFERENCE.index(choice.algorithm) <= PREFERENCE.index("ring-2way"), choice
    assert "tokenring" not in choice.algorithm


def test_on_a_comm_bound_full_mesh_mha_a_schedule_using_more_links_wins():
    profile = fullmesh(8, 0.1, 5, tflops=None)
    choice = choose(shape(), False, "contiguous", 8, False, profile=profile)
    assert choice.algorithm != "ring", choice.describe()


def test_the_choice_is_cached_per_shape():
    profile = fullmesh(4, 1.0, 5)
    first = choose(shape(), True, "zigzag", 4, True, profile=profile)
    assert choose(shape(), True, "zigzag", 4, True, profile=profile) is first


def test_a_profile_for_another_world_size_is_not_used(tmp_path, monkeypatch):
    path = tmp_path / "profile.json"
    save_profile(fullmesh(8, 0.1, 5, tflops=None), path)
    monkeypatch.setenv("TOKENRING_PROFILE", str(path))
    from tokenring.planner.choose import group_profile

    assert "profile" in group_profile(8)[1] and str(path) in group_profile(8)[1]
    assert group_profile(4)[1].startswith("an assumed switch")


def test_auto_runs_exactly_and_reports_its_choice(worlds, seed):
    from tokenring.testing.checks import check_gradients

    problem = Problem(seed, batch=1, seq_len=32, q_heads=4, kv_heads=2, head_dim=16, causal=True, algorithm="auto")
    check_gradients(worlds.get(2), problem)
    results = worlds.get(2).run_ok("tokenring.testing.tasks.call_with", problem, {}, "choice")
    assert results == [problem.resolved_algorithm(2)] * 2


def test_ranks_whose_profiles_choose_differently_all_fail_naming_both_choices(worlds, seed, tmp_path):
    # Rank 1 describes a comm-bound full mesh (a multi-link schedule wins); rank 0 has no profile (a switch).
    path = tmp_path / "mesh.json"
    save_profile(fullmesh(4, 0.001, 5, tflops=None), path)
    problem = Problem(seed, batch=1, seq_len=128, q_heads=4, kv_heads=4, head_dim=16, algorithm="auto")
    missing = str(tmp_path / "none.json")
    on_switch = problem.resolved_algorithm(4)  # no profile here either
    on_mesh = choose(problem.shape(4), False, "contiguous", 4, False, profile=fullmesh(4, 0.001, 5, tflops=None))
    assert on_switch != on_mesh.algorithm, "the two profiles must choose differently for this test to mean anything"
    results = worlds.get(4).run("tokenring.testing.tasks.call_with", problem,
                                {"all": {"profile": missing}, 1: {"profile": str(path)}}, timeout_s=60)
    for r in results:
        assert not r.ok and "argument 'algorithm'" in r.error and "differs across ranks" in r.error, r.error
        assert "auto -> " in r.error


def test_a_bad_profile_is_an_error_naming_the_file(worlds, seed, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"version": 1, "kind": "hypercube"}))
    problem = Problem(seed, batch=1, seq_len=32, q_heads=2, kv_heads=2, head_dim=16, algorithm="auto")
    results = worlds.get(2).run("tokenring.testing.tasks.call_with", problem, {"all": {"profile": str(path)}},
                                timeout_s=60)
    for r in results:
        assert not r.ok and str(path) in r.error, r.error


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_the_closed_form_bounds_never_exceed_the_simulated_time(n):
    # Pruning is exact only if every bound is below its schedule's prediction: check it on every kind of profile.
    from tokenring.planner.choose import lower_bound
    from tokenring.planner.topology import ring, two_level

    profiles = [fullmesh(n, 1.0, 5, tflops=1.0), switch(n, 0.1, 5, tflops=None), ring(n, 1, 0, tflops=None),
                fullmesh(n, 1, 0, tflops=None, injection_gbps=2), switch(n, 100, 2, tflops=150)]
    if n % 2 == 0:
        profiles += [two_level(2, n // 2, 10, 1, nic_gbps=1, tflops=None),
                     two_level(2, n // 2, 10, 1, intra="switch", nic="node", nic_gbps=1, tflops=10)]
    for profile in profiles:
        for causal, layout in ((False, "contiguous"), (True, "contiguous"), (True, "zigzag")):
            for kv_heads in (8, 2):
                problem = shape(seq_local=16 * n, kv_heads=kv_heads)
                for estimate in predict_all(problem, profile, causal, layout).estimates:
                    if estimate.error is not None:
                        continue
                    for needs_grad, seconds in ((False, estimate.forward.total), (True, estimate.training)):
                        bound = lower_bound(estimate.name, problem, profile, causal, layout, needs_grad)
                        assert 0 <= bound <= seconds, (estimate.name, profile.describe(), causal, layout, kv_heads)


@pytest.mark.parametrize("kind", ["fullmesh", "switch"])
@pytest.mark.parametrize("needs_grad", [False, True])
@pytest.mark.parametrize("tflops", [None, 1.0, 1000.0])
def test_pruning_chooses_what_replaying_every_schedule_chooses(kind, needs_grad, tflops):
    from tokenring.planner.choose import _choose

    profile = (fullmesh if kind == "fullmesh" else switch)(8, 1.0, 5, tflops=tflops)
    for kv_heads in (8, 2):
        problem = shape(kv_heads=kv_heads)
        comparison = predict_all(problem, profile, True, "zigzag")
        times = {e.name: (e.training if needs_grad else e.forward.total)
                 for e in comparison.estimates if e.error is None}
        best = min(times.values())
        rank = {name: i for i, name in enumerate(PREFERENCE)}
        expected = min((name for name, t in times.items() if t <= best * (1 + TIE)),
                       key=lambda name: (rank.get(name, len(PREFERENCE)), name))
        _choose.cache_clear()
        choice = choose(problem, True, "zigzag", 8, needs_grad, profile=profile)
        assert choice.algorithm == expected and choice.predicted_s == times[expected]


def test_a_plugin_schedule_without_a_closed_form_is_still_built_and_considered(monkeypatch):
    import types

    import tokenring
    from tokenring.planner import simulate
    from tokenring.plan.model import Plan, Schedule
    from tokenring.planner.choose import _choose
    from tokenring.registry import registry
    from tokenring.schedules.hops import one_hop_steps

    def queries_backwards(layout, causal, n):
        return Plan("tokenring-reverse", layout, causal, n, one_hop_steps(True, layout, causal, n, -1))

    module = types.ModuleType("planner_test_plugin")
    module.tokenring_register_schedules = tokenring.hookimpl(lambda register: register(
        Schedule("tokenring-reverse", "queries travel r -> r-1", queries_backwards)))
    saved = list(registry._extra_plugins)
    registry.register_plugin(module, "planner-test-plugin 0.1")
    try:
        built = []
        predict = simulate.predict
        monkeypatch.setattr(simulate, "predict", lambda name, *a, **k: built.append(name) or predict(name, *a, **k))
        profile = fullmesh(4, 0.1, 5, tflops=None)  # comm-bound: compute rules nothing out
        _choose.cache_clear()
        choice = choose(shape(), False, "contiguous", 4, False, profile=profile)
        assert "tokenring-reverse" in built
        times = {e.name: e.forward.total for e in predict_all(shape(), profile, False, "contiguous").estimates
                 if e.error is None}
        assert "tokenring-reverse" in times and times[choice.algorithm] <= min(times.values()) * (1 + TIE)
    finally:
        registry._extra_plugins[:] = saved
        registry.reset()
        _choose.cache_clear()
