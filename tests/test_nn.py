"""tokenring.nn: rotary embedding at true positions, and TokenRingAttention against float64 attention."""

import math

import pytest
import torch

from tokenring.nn import TokenRingAttention, apply_rotary
from tokenring.testing import model_tasks
from tokenring.testing.model_tasks import AttentionModuleCase
from tokenring.testing.problems import relative_error
from tokenring.testing.tasks import from_bytes
from tokenring.testing.tiny_llama import PlainAttention, TinyLlamaConfig

import tokenring


def test_rotary_matches_complex_multiplication_at_arbitrary_positions(seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 3, 8, generator=generator, dtype=torch.float64)
    positions = torch.tensor([0, 1, 2, 9, 10, 11])  # a zigzag-like shard: two runs
    got = apply_rotary(x, positions, base=500.0)
    want = model_tasks._complex_rotary(x, positions, 500.0)
    assert relative_error(got, want) < 1e-12


def test_rotary_scores_depend_only_on_the_distance_between_positions(seed):
    generator = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, 1, 2, 16, generator=generator, dtype=torch.float64) for _ in range(2))
    score = lambda m, n: (apply_rotary(q, torch.tensor([m])) * apply_rotary(k, torch.tensor([n]))).sum()
    assert math.isclose(score(5, 2), score(1003, 1000), rel_tol=1e-9)
    assert not math.isclose(score(5, 2), score(5, 3), rel_tol=1e-3)


def test_rotary_per_sample_positions_and_dtype():
    x = torch.randn(2, 4, 1, 4, dtype=torch.bfloat16)
    positions = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    got = apply_rotary(x, positions)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got[1], apply_rotary(x[1:], positions[1])[0])


@pytest.mark.parametrize("x_shape, positions_shape, message", [
    ((2, 4, 1, 4), (3,), "position_ids"),
    ((2, 4, 1, 5), (4,), "even head dim"),
    ((2, 4, 4), (4,), "argument 'x'"),
])
def test_rotary_errors_name_the_argument(x_shape, positions_shape, message):
    with pytest.raises(ValueError, match=message):
        apply_rotary(torch.randn(x_shape), torch.zeros(positions_shape, dtype=torch.long))


def test_module_arguments_are_checked():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        TokenRingAttention(32, 4, causal=True, num_kv_heads=3)
    with pytest.raises(ValueError, match="hidden_size"):
        TokenRingAttention(30, 4, causal=True)
    with pytest.raises(ValueError, match="layout"):
        TokenRingAttention(32, 4, causal=True, layout="spiral")
    with pytest.raises(ValueError, match="hidden_states"):
        TokenRingAttention(32, 4, causal=True)(torch.randn(1, 4, 16))


def test_module_takes_the_state_dict_of_a_plain_llama_attention():
    config = TinyLlamaConfig()
    plain = PlainAttention(config)
    ring = TokenRingAttention(config.hidden_size, config.num_heads, causal=True, num_kv_heads=config.num_kv_heads)
    ring.load_state_dict(plain.state_dict())  # strict: same names, same shapes
    assert ring.layout == "zigzag" and TokenRingAttention(32, 4, causal=False).layout == "contiguous"


def check_module(worlds, case: AttentionModuleCase, world_size: int) -> None:
    results = worlds.get(world_size).run_ok("tokenring.testing.model_tasks.attention_module", case)
    want = model_tasks.reference_attention_module(case)
    layout = case.resolved_layout
    got = {name: tokenring.unshard([from_bytes(r[name]) for r in results], layout=layout) for name in ("out", "dhidden")}
    for name in want:
        if name not in got:  # weight gradients: summed over ranks, so the same on every rank
            per_rank = [from_bytes(r[name]) for r in results]
            assert all(torch.equal(g, per_rank[0]) for g in per_rank), f"{name} differs between ranks"
            got[name] = per_rank[0]
    errors = {name: relative_error(got[name], want[name]) for name in want}
    assert all(e < 1e-5 for e in errors.values()), f"N={world_size} {case}: {errors}"


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_module_matches_float64_attention_with_rotary_and_gqa(worlds, seed, world_size, causal):
    check_module(worlds, AttentionModuleCase(seed, seq_len=8 * world_size, causal=causal), world_size)


@pytest.mark.parametrize("case_kwargs", [
    {"per_sample_positions": True},
    {"rope_base": None, "num_kv_heads": 4},
    {"layout": "contiguous", "num_kv_heads": 1},
    {"causal": False, "layout": "zigzag"},
], ids=["positions-given", "no-rotary-mha", "causal-contiguous-mqa", "full-zigzag"])
def test_module_variants(worlds, seed, case_kwargs):
    check_module(worlds, AttentionModuleCase(seed, seq_len=24, **case_kwargs), 3)
