"""LlamaForCausalLM with attn_implementation="tokenring" matches the model's own attention, forward and backward."""

import pytest
import torch
import transformers

import tokenring
from tokenring.tools.launch import WorkerError
from tokenring.tools.problems import relative_error
from tokenring.tools.tasks import from_bytes
import tokenring_transformers
from tokenring_transformers.testing import build_llama, llama_step, state_bytes, token_ids

BATCH = 2


def reference(seed: int, implementation: str, seq_len: int):
    """One process, the whole sequence, the model's own attention: logits, loss and gradients."""
    model = build_llama(seed, implementation)
    ids = token_ids(seed, BATCH, seq_len)
    out = model(input_ids=ids, labels=ids, use_cache=False)  # transformers shifts the labels itself here
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return model, out.logits.detach(), out.loss.item(), grads


def test_the_pinned_transformers_version_is_the_tested_one():
    assert transformers.__version__ in tokenring_transformers.TESTED_TRANSFORMERS_VERSIONS, transformers.__version__


def test_registered_through_the_public_attention_interface():
    name = tokenring_transformers.register("tokenring-test-name")
    assert name in transformers.AttentionInterface()


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("world_size, layout", [(2, "zigzag"), (3, "zigzag"), (2, "contiguous")])
def test_forward_and_backward_match_the_models_own_attention(worlds, seed, implementation, world_size, layout):
    seq_len = 8 * world_size
    model, want_logits, want_loss, want_grads = reference(seed, implementation, seq_len)
    results = worlds(world_size).run_ok(
        "tokenring_transformers.testing.llama_step", state_bytes(model), seed, BATCH, seq_len, layout, timeout_s=120
    )
    logits = tokenring.unshard([from_bytes(r["logits"]) for r in results], layout=layout)
    assert relative_error(logits, want_logits) < 1e-5
    assert all(abs(r["loss"] - want_loss) < 1e-5 for r in results), (seed, want_loss, [r["loss"] for r in results])
    assert set(results[0]["grads"]) == set(want_grads)
    errors = {n: relative_error(from_bytes(results[0]["grads"][n]), g) for n, g in want_grads.items()}
    assert max(errors.values()) < 1e-4, (seed, errors)


def test_missing_position_ids_raise_on_every_rank(worlds, seed):
    model = build_llama(seed, "sdpa")
    with pytest.raises(WorkerError) as caught:
        worlds(2).run_ok("tokenring_transformers.testing.llama_step", state_bytes(model), seed, BATCH, 16,
                         "zigzag", False, timeout_s=120)
    for result in caught.value.results:
        assert result.error_type == "tokenring.interfaces.InputError", result
        # Each rank names its own expected positions: rank 0 holds chunks 0 and 3 of 4, rank 1 chunks 1 and 2.
        expected = {0: "0…3, 12…15", 1: "4…11"}[result.rank]
        assert "position_ids" in result.error and expected in result.error, result.error


def test_layer_calls_add_no_collective_and_position_ids_are_read_once_per_tensor(worlds, seed):
    """Steady state: no collective in any layer (the checks ride on token_ring_attn's agreement, which is
    skipped for repeated calls); one host read per new position-ids tensor and one for the all-ones mask."""
    for rank, costs in enumerate(worlds(2).run_ok("tokenring_transformers.testing.layer_call_costs", seed,
                                                 timeout_s=120)):
        assert not any(n.startswith("c10d.") and n not in ("c10d.send.default", "c10d.recv_.default")
                       for case in costs.values() for n in case), (rank, costs)
        scalar = "aten._local_scalar_dense.default"
        assert costs["same positions"].get(scalar, 0) == 1, (rank, costs)  # the mask hook's padding check
        assert costs["new positions"].get(scalar, 0) == 2, (rank, costs)   # and the new positions, once
