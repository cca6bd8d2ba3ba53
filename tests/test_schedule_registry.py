"""Schedules from plugins go through the same hook as the first-party ones, and bad ones are refused."""

import types

import pytest
import torch

import tokenring
from tokenring.plan.model import Plan, Schedule, Step
from tokenring.proofs.plancheck import PlanError
from tokenring.registry import registry
from tokenring.schedules.build import build_plan, schedule_names
from tokenring.schedules.hops import one_hop_steps

from threaded_world import run_plan


@pytest.fixture
def plugins():
    """Register plugin modules for one test, then forget them."""
    saved = list(registry._extra_plugins)

    def add(**hooks):
        module = types.ModuleType(f"schedule_plugin_{len(registry._extra_plugins)}")
        for name, function in hooks.items():
            setattr(module, name, tokenring.hookimpl(function))
        registry.register_plugin(module, "schedule-plugin 0.1")

    yield add
    registry._extra_plugins[:] = saved
    registry.reset()


def _queries_backwards(layout, causal, n):
    return Plan("tokenring-reverse", layout, causal, n, one_hop_steps(True, layout, causal, n, -1))


def test_a_plugin_schedule_is_listed_built_proven_and_runs(plugins):
    plugins(tokenring_register_schedules=lambda register: register(
        Schedule("tokenring-reverse", "queries travel r -> r-1", _queries_backwards)))
    assert "tokenring-reverse" in schedule_names()
    assert schedule_names()[: len(schedule_names()) - 1] == tuple(
        e.name for e in registry.schedule_entries() if e.distribution.startswith("tokenring-attn"))
    plan = build_plan("tokenring-reverse", "contiguous", False, 3)
    gen = torch.Generator().manual_seed(0)
    shards = [[torch.randn(1, 4, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3)] for _ in range(3)]
    results, _ = run_plan(plan, shards, scale=0.5)
    q, k, v = (torch.cat([s[i] for s in shards], dim=1) for i in range(3))
    want, _ = tokenring.reference_attention(q, k, v, softmax_scale=0.5)
    torch.testing.assert_close(torch.cat([r[0] for r in results], dim=1), want)


def test_a_plugin_schedule_that_is_not_exact_is_refused_when_built(plugins):
    def drops_last_step(layout, causal, n):
        plan = _queries_backwards(layout, causal, n)
        return Plan("lossy", layout, causal, n, plan.steps[:-1])

    plugins(tokenring_register_schedules=lambda register: register(Schedule("lossy", "loses partials", drops_last_step)))
    with pytest.raises(PlanError, match="schedule 'lossy' .* is not exact: rank .* never sends"):
        build_plan("lossy", "contiguous", False, 3)


def test_a_plan_for_the_wrong_call_is_refused(plugins):
    plugins(tokenring_register_schedules=lambda register: register(
        Schedule("liar", "builds for N=1", lambda layout, causal, n: Plan("liar", layout, causal, 1, (Step(0, (), ()),)))))
    with pytest.raises(PlanError, match="built a plan for something else"):
        build_plan("liar", "contiguous", False, 2)


def test_taken_names_and_invalid_records_are_reported_and_the_rest_still_count(plugins):
    def register_all(register):
        register(Schedule("ring", "a second ring", _queries_backwards))
        register("not a schedule")
        register(Schedule("has,comma", "bad name", _queries_backwards))
        register(Schedule("fine", "a good one", _queries_backwards))

    plugins(tokenring_register_schedules=register_all)
    refused = {e.name: e.error for e in registry.schedule_entries() if e.schedule is None}
    assert "already registered by tokenring-attn" in refused["ring"]
    assert any("expected a tokenring.Schedule" in error for error in refused.values())
    assert "without commas" in refused["has,comma"]
    assert "fine" in schedule_names()
    with pytest.raises(ValueError, match="schedule 'has,comma' from schedule-plugin 0.1 is broken: .*commas"):
        build_plan("has,comma", "contiguous", False, 2)


def test_a_plugin_whose_registration_raises_is_reported(plugins):
    def explode(register):
        raise RuntimeError("boom")

    plugins(tokenring_register_schedules=explode)
    refused = [e for e in registry.schedule_entries() if e.schedule is None]
    assert refused and "registration raised RuntimeError: boom" in refused[0].error
    assert "tokenring" in schedule_names()
