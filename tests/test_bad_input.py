"""Bad input: a clear error on every rank, at once, naming the argument, the rank and the expectation."""

import time

import pytest

from tokenring.tools.launch import LocalWorld
from tokenring.testing.checks import assert_all_ranks_fail
from tokenring.testing.problems import Problem

WORLD_SIZE = 3
B, S_LOCAL, HQ, HKV, D = 2, 8, 4, 2, 16


def problem(seed, **changes):
    base = Problem(seed, batch=B, seq_len=S_LOCAL * WORLD_SIZE, q_heads=HQ, kv_heads=HKV, head_dim=D)
    return base.with_(**changes)


def call_everywhere(worlds, problem, changes):
    world = worlds.get(WORLD_SIZE)
    start = time.monotonic()
    results = world.run("tokenring.testing.tasks.call_with", problem, changes, timeout_s=60)
    elapsed = time.monotonic() - start
    assert elapsed < 20, f"errors took {elapsed:.1f} s to surface"
    return results


CASES = {
    # name: (changes per rank, expected fragments, culprit rank or None for all ranks)
    "q has 3 dims on one rank": ({1: {"q_shape": (B * S_LOCAL, HQ, D)}}, ["argument 'q'", "4 dimensions"], 1),
    "k has 5 dims": ({"all": {"k_shape": (B, S_LOCAL, HKV, D, 1)}}, ["argument 'k'", "4 dimensions"], None),
    "k dtype differs from q": ({"all": {"k_dtype": "float64"}}, ["argument 'k'", "expected dtype torch.float32"], None),
    "k on another device": ({"all": {"k_device": "meta"}}, ["argument 'k'", "expected device cpu"], None),
    "v dtype differs on one rank": ({2: {"v_dtype": "bfloat16"}}, ["argument 'v'", "dtype"], 2),
    "head dim differs": ({"all": {"k_shape": (B, S_LOCAL, HKV, D + 1), "v_shape": (B, S_LOCAL, HKV, D + 1)}},
                         ["argument 'k'", f"head dim {D}"], None),
    "v shape differs from k": ({"all": {"v_shape": (B, S_LOCAL, HKV, D * 2)}}, ["argument 'v'", "shape of k"], None),
    "Hq not a multiple of Hkv": ({"all": {"k_shape": (B, S_LOCAL, 3, D), "v_shape": (B, S_LOCAL, 3, D)}},
                                 ["argument 'q'", "multiple of Hkv = 3"], None),
    "k shorter than q": ({0: {"k_shape": (B, S_LOCAL - 2, HKV, D), "v_shape": (B, S_LOCAL - 2, HKV, D)}},
                         ["argument 'k'", f"sequence length {S_LOCAL}"], 0),
    "batch differs between q and k": ({"all": {"k_shape": (B + 1, S_LOCAL, HKV, D), "v_shape": (B + 1, S_LOCAL, HKV, D)}},
                                      ["argument 'k'", "batch size"], None),
    "odd S_local with zigzag": ({"all": {"q_shape": (B, 7, HQ, D), "k_shape": (B, 7, HKV, D), "v_shape": (B, 7, HKV, D),
                                          "causal": True}}, ["zigzag", "even S_local", "S_local = 7"], None),
    "unknown layout": ({"all": {"layout": "striped"}}, ["argument 'layout'", "'zigzag'"], None),
    "unknown algorithm": ({"all": {"algorithm": "ulysses"}}, ["argument 'algorithm'", "'tokenring'"], None),
    "negative softmax_scale": ({"all": {"softmax_scale": -1.0}}, ["argument 'softmax_scale'", "> 0"], None),
    "causal not a bool": ({"all": {"causal": "yes"}}, ["argument 'causal'", "True or False"], None),
    # Values are read (a device sync) only when TOKENRING_CHECKS=full; by default they come out as NaN.
    "NaN in q on one rank": ({"all": {"checks": "full"}, 1: {"q_fill": float("nan")}}, ["argument 'q'", "finite"], 1),
    "infinity in v": ({"all": {"checks": "full", "v_fill": float("inf")}}, ["argument 'v'", "finite"], None),
    "integer tensors": ({"all": {"q_dtype": "int64", "k_dtype": "int64", "v_dtype": "int64"}}, ["argument 'q'", "floating-point"], None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_on_every_rank(worlds, seed, case):
    changes, fragments, culprit = CASES[case]
    results = call_everywhere(worlds, problem(seed), changes)
    assert_all_ranks_fail(results, *fragments, culprit=culprit)


DISAGREEMENTS = {
    "sequence length": ({1: {"q_shape": (B, S_LOCAL + 2, HQ, D), "k_shape": (B, S_LOCAL + 2, HKV, D),
                             "v_shape": (B, S_LOCAL + 2, HKV, D)}}, "shape of argument 'q'"),
    "dtype": ({0: {"q_dtype": "bfloat16", "k_dtype": "bfloat16", "v_dtype": "bfloat16"}}, "dtype of argument 'q'"),
    "causal": ({2: {"causal": True, "layout": "contiguous"}}, "argument 'causal'"),
    "layout": ({1: {"layout": "zigzag"}}, "argument 'layout'"),
    "algorithm": ({1: {"algorithm": "ring"}}, "argument 'algorithm'"),
    "softmax_scale": ({0: {"softmax_scale": 0.5}}, "argument 'softmax_scale'"),
    "requires grad": ({1: {"k_requires_grad": True}}, "require grad"),
}


@pytest.mark.parametrize("case", list(DISAGREEMENTS))
def test_ranks_that_disagree_all_fail_before_any_traffic(worlds, seed, case):
    changes, fragment = DISAGREEMENTS[case]
    results = call_everywhere(worlds, problem(seed), changes)
    for r in results:
        assert not r.ok and r.error_type.endswith("InputError"), f"rank {r.rank}: {r.error_type} {r.error}"
        assert f"on rank {r.rank}" in r.error and fragment in r.error and "differs across ranks" in r.error, r.error


@pytest.mark.parametrize("who", ["all", 1])
def test_unknown_backend_lists_the_available_ones(worlds, seed, who):
    results = call_everywhere(worlds, problem(seed), {who: {"backend": "tpu"}})
    for r in results:
        assert not r.ok and r.error_type.endswith("BackendError"), r
        assert "unknown backend 'tpu'" in r.error and "'cpu'" in r.error, r.error
        assert f"on rank {r.rank}" in r.error


def test_tensors_on_a_device_no_backend_serves_on_one_rank(worlds, seed):
    on_meta = {"q_device": "meta", "k_device": "meta", "v_device": "meta"}
    results = call_everywhere(worlds, problem(seed), {2: on_meta})
    for r in results:
        assert not r.ok and r.error_type.endswith("BackendError"), r
        assert "device type 'meta'" in r.error, r.error


def test_an_invalid_group_is_named(worlds, seed):
    results = call_everywhere(worlds, problem(seed), {"all": {"group": "world"}})
    for r in results:
        assert not r.ok and r.error_type.endswith("InputError") and "argument 'group'" in r.error, r


def test_world_still_works_after_bad_input(worlds, seed):
    call_everywhere(worlds, problem(seed), {1: {"q_shape": (B, S_LOCAL, HQ)}})
    results = call_everywhere(worlds, problem(seed), {})
    assert [r.value for r in results] == ["ok"] * WORLD_SIZE


def test_a_rank_that_never_calls_gives_a_timeout_naming_the_rank_not_a_hang(seed):
    with LocalWorld(2, threads_per_rank=1, env={"TOKENRING_TIMEOUT_S": "30"}) as world:
        start = time.monotonic()
        results = world.run("tokenring.testing.tasks.call_unless_absent", problem(seed), 1, 2.0, timeout_s=60)
        assert time.monotonic() - start < 20
    assert results[1].value == "absent"
    assert results[0].error_type.endswith("CommTimeout"), results[0]
    assert "rank 0" in results[0].error and "2.0 s" in results[0].error
