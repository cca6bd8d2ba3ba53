"""torch.compile: token_ring_attn is a custom op, traced around with no graph break, and computes what eager does."""

import os

import pytest
import torch

from tokenring.testing import model_tasks
from tokenring.testing.checks import assert_all_ranks_fail
from tokenring.testing.compile_tasks import OPS, CompiledRun
from tokenring.testing.model_tasks import TrainingRun
from tokenring.testing.problems import Problem
from tokenring.testing.tasks import from_bytes

WORLD_SIZE = 2
# (loss: absolute, gradient: max |g - g_eager| / max |g_eager|). The "eager"
# and "aot_eager" backends run the same kernels as eager: equal to rounding
# at most. Inductor fuses the code around the attention, so it rounds differently.
TOLERANCE = {"eager": (1e-6, 1e-6), "aot_eager": (1e-6, 1e-6), "inductor": (1e-5, 1e-5)}


def eager_as_reference(result: dict) -> dict:
    return {"losses": result["losses"], "grads": [from_bytes(g) for g in result["grads"]]}


def check_compiled_training(worlds, run: CompiledRun) -> None:
    per_rank = worlds.get(WORLD_SIZE).run_ok("tokenring.testing.compile_tasks.compiled_training", run, timeout_s=240)
    layers = run.training.config.num_layers
    # The eager run itself is the single-process model's (tests/test_train_parity.py checks it more).
    eager = model_tasks.compare_training(WORLD_SIZE, model_tasks.reference_training(run.training),
                                         [r["eager"] for r in per_rank])
    assert eager.holds(1e-5, 1e-5), eager
    for rank, result in enumerate(per_rank):
        explain = result["explain"]
        assert (explain["graph_count"], explain["graph_break_count"]) == (1, 0), f"rank {rank}: {explain}"
        for backend in run.backends:
            compiled = result[backend]
            # One frame for all steps: one graph, no break, no recompilation; every layer's attention in it.
            assert compiled["frames"] == 1 and compiled["ops"] == dict.fromkeys(OPS, layers), (rank, backend, compiled)
    for backend in run.backends:
        report = model_tasks.compare_training(WORLD_SIZE, eager_as_reference(per_rank[0]["eager"]),
                                              [r[backend] for r in per_rank])
        assert report.holds(*TOLERANCE[backend]), f"{backend}: {report}"


def test_compiled_tiny_llama_trains_like_eager_in_one_graph(worlds, seed):
    """torch.compile(model, fullgraph=True), backends "eager" and "aot_eager" (its backward uses the fakes)."""
    check_compiled_training(worlds, CompiledRun(TrainingRun(seed=seed, steps=2, seq_len=16)))


# Inductor compiles C++: about 40 s on 2 idle cores with a cold cache, minutes on a loaded machine.
@pytest.mark.skipif(os.environ.get("TOKENRING_TEST_INDUCTOR") != "1",
                    reason="inductor compiles C++ for 40 s to minutes; set TOKENRING_TEST_INDUCTOR=1 to run it")
def test_inductor_trains_like_eager(worlds, seed):
    check_compiled_training(worlds, CompiledRun(TrainingRun(seed=seed, steps=2, seq_len=16), backends=("inductor",)))


def test_operators_pass_opcheck(worlds, seed):
    """Schemas, fake implementations (against the real ones), autograd registration, AOT dispatch."""
    problem = Problem(seed, batch=2, seq_len=8 * WORLD_SIZE, q_heads=4, kv_heads=2, head_dim=16, causal=True)
    for rank, checks in enumerate(worlds.get(WORLD_SIZE).run_ok("tokenring.testing.compile_tasks.opcheck", problem,
                                                                timeout_s=120)):
        for name, results in checks.items():
            assert set(results.values()) == {"SUCCESS"}, f"rank {rank}: {name}: {results}"


@pytest.mark.parametrize("group", [None, "process group", "device mesh"])
def test_compiled_call_gives_eager_outputs_gradients_and_traffic(worlds, seed, group):
    """On the default group the call is in the graph; on an explicit group it runs eagerly (a graph break)."""
    problem = Problem(seed, batch=2, seq_len=8 * WORLD_SIZE, q_heads=4, kv_heads=2, head_dim=16, causal=True)
    per_rank = worlds.get(WORLD_SIZE).run_ok("tokenring.testing.compile_tasks.compiled_attention_with_grads",
                                             problem, group, timeout_s=120)
    in_graph = 1 if group is None else 0
    for rank, result in enumerate(per_rank):
        assert result["ops"] == dict.fromkeys(OPS, in_graph), (rank, result["frames"], result["ops"])
        eager, compiled = result["eager"], result["compiled"]
        for name in ("out", "lse", "dq", "dk", "dv"):
            assert torch.equal(from_bytes(compiled[name]), from_bytes(eager[name])), f"rank {rank}: {name}"
        assert compiled["sent"] == eager["sent"] and compiled["backward_sent"] == eager["backward_sent"]


BAD_CALLS = {
    # name: (changes per rank, expected fragments, culprit rank or None for all ranks)
    # Checked when the graph runs, by the agree operator:
    "NaN in q on one rank": ({"all": {"checks": "full"}, 1: {"q_fill": float("nan")}}, ["argument 'q'", "finite"], 1),
    "ranks disagree on causal": ({1: {"causal": True, "layout": "contiguous"}}, ["argument 'causal'"], None),
    # Not fit for the operators' schemas: token_ring_attn runs eagerly (a graph break), and raises as ever:
    "q has 3 dims on one rank": ({1: {"q_shape": (2, 8, 16)}}, ["argument 'q'", "4 dimensions"], 1),
    "causal not a bool": ({"all": {"causal": "yes"}}, ["argument 'causal'", "True or False"], None),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_compiled_calls_check_and_agree_on_every_rank(worlds, seed, case):
    changes, fragments, culprit = BAD_CALLS[case]
    problem = Problem(seed, batch=2, seq_len=8 * WORLD_SIZE, q_heads=4, kv_heads=2, head_dim=16)
    results = worlds.get(WORLD_SIZE).run("tokenring.testing.compile_tasks.compiled_call_with", problem, changes,
                                         timeout_s=120)
    assert_all_ranks_fail(results, *fragments, culprit=culprit)
