"""tokenring_transformers.generate on N ranks gives exactly the tokens of model.generate in one process."""

import pytest
import torch

from tokenring.tools.launch import WorkerError
from tokenring.tools.tasks import to_bytes
import tokenring_transformers
from tokenring_transformers.testing import generation_model, state_bytes, token_ids

MHA = {"num_attention_heads": 4, "num_key_value_heads": 4}
GQA = {"num_attention_heads": 8, "num_key_value_heads": 2}


def reference(seed: int, config: dict, implementation: str, prompt: torch.Tensor, **generate_kwargs):
    """model.generate in one process with the model's own attention; and the model's weights."""
    model = generation_model(seed, implementation, **config)
    return model.generate(prompt, do_sample=False, **generate_kwargs), state_bytes(model)


def sharded(worlds, world_size: int, state: bytes, config: dict, prompt: torch.Tensor, **generate_kwargs) -> list:
    generate_kwargs = {k: to_bytes(v) if isinstance(v, torch.Tensor) else v for k, v in generate_kwargs.items()}
    return worlds(world_size).run_ok("tokenring_transformers.testing.generate_tokens", state, config,
                                     to_bytes(prompt), dict(do_sample=False, **generate_kwargs), timeout_s=600)


@pytest.mark.parametrize("heads", [MHA, GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_a_4k_prompt_and_64_new_tokens_match_model_generate(worlds, seed, world_size, heads):
    prompt_len, new = 4096, 64
    prompt = token_ids(seed, 1, prompt_len)
    want, state = reference(seed, heads, "sdpa", prompt, max_new_tokens=new, eos_token_id=None)
    assert want.shape == (1, prompt_len + new)
    results = sharded(worlds, world_size, state, heads, prompt, max_new_tokens=new, eos_token_id=None)
    for rank, result in enumerate(results):
        assert result["sequences"] == want.tolist(), (seed, rank)
        # Each rank holds its share of the cache: prompt + new - 1 tokens (the last token is never attended to).
        assert sum(result["lengths"]) == prompt_len + new - 1
        assert max(result["lengths"]) - min(result["lengths"]) <= 1, result["lengths"]
    print(f"N={world_size} {heads}: {[round(r['seconds'], 2) for r in results]} s per rank")


@pytest.mark.parametrize("world_size, prompt_len, chunk", [(4, 1004, 500), (2, 301, 64), (3, 5, None)])
def test_chunked_prefill_and_short_prompts_match_model_generate(worlds, seed, world_size, prompt_len, chunk):
    # (4, 1004, 500): chunks of 500, 500 and 3 tokens, the last one fewer than the ranks (run token by token);
    # (3, 5, None): a prompt whose prefill (4 tokens) barely covers 3 ranks.
    prompt = token_ids(seed, 1, prompt_len)
    want, state = reference(seed, GQA, "eager", prompt, max_new_tokens=12, eos_token_id=None)
    results = sharded(worlds, world_size, state, GQA, prompt, max_new_tokens=12, eos_token_id=None,
                      prefill_chunk_size=chunk)
    assert all(r["sequences"] == want.tolist() for r in results), seed


def test_a_one_token_prompt_and_max_length(worlds, seed):
    prompt = token_ids(seed, 1, 1)
    want, state = reference(seed, MHA, "sdpa", prompt, max_length=9, eos_token_id=None)
    results = sharded(worlds, 2, state, MHA, prompt, max_length=9, eos_token_id=None)
    assert want.shape == (1, 9)
    assert all(r["sequences"] == want.tolist() for r in results), seed


def test_a_batch_of_equal_length_prompts(worlds, seed):
    prompt = token_ids(seed, 2, 256)
    want, state = reference(seed, GQA, "eager", prompt, max_new_tokens=16, eos_token_id=None)
    results = sharded(worlds, 2, state, GQA, prompt, max_new_tokens=16, eos_token_id=None)
    assert all(r["sequences"] == want.tolist() for r in results), seed


def test_eos_pads_finished_sequences_and_stops_when_all_have_finished(worlds, seed):
    prompt = token_ids(seed, 2, 128)
    free, state = reference(seed, MHA, "sdpa", prompt, max_new_tokens=24, eos_token_id=None)
    new = free[:, 128:]
    eos = int(new[0, 3])  # sequence 0 ends at its 4th new token (or sooner); sequence 1 where eos first appears
    # An explicit all-ones mask: model.generate would otherwise take prompt tokens equal to pad_token_id for padding.
    mask = torch.ones_like(prompt)
    for kwargs in ({"eos_token_id": eos, "pad_token_id": 0, "attention_mask": mask}, {"eos_token_id": [eos, 127]}):
        want, _ = reference(seed, MHA, "sdpa", prompt, max_new_tokens=24, **kwargs)
        results = sharded(worlds, 2, state, MHA, prompt, max_new_tokens=24, **kwargs)
        assert all(r["sequences"] == want.tolist() for r in results), (seed, kwargs)
    # One sequence that finishes: generation stops there, shorter than max_new_tokens.
    want, _ = reference(seed, MHA, "sdpa", prompt[:1], max_new_tokens=24, eos_token_id=eos)
    results = sharded(worlds, 2, state, MHA, prompt[:1], max_new_tokens=24, eos_token_id=eos)
    assert want.shape[1] <= 128 + 4
    assert all(r["sequences"] == want.tolist() for r in results), seed


@pytest.mark.parametrize("kwargs, words", [({"do_sample": True}, "do_sample"), ({"num_beams": 2}, "num_beams"),
                                           ({"repetition_penalty": 1.3}, "repetition_penalty")])
def test_sampling_and_other_decoding_modes_are_refused_on_every_rank(worlds, kwargs, words):
    model = generation_model(0, "sdpa")
    with pytest.raises(WorkerError) as caught:
        worlds(2).run_ok("tokenring_transformers.testing.generate_tokens", state_bytes(model), {},
                         to_bytes(token_ids(0, 1, 16)), dict({"max_new_tokens": 4}, **kwargs), timeout_s=120)
    assert len(caught.value.results) == 2
    for result in caught.value.results:
        assert result.error_type == "builtins.ValueError" and words in result.error, result


def test_refusals_before_any_communication():
    prompt = token_ids(0, 2, 16)
    with pytest.raises(ValueError, match="register"):
        tokenring_transformers.generate(generation_model(0, "sdpa"), prompt, max_new_tokens=2)
    model = generation_model(0, tokenring_transformers.register())
    padding = torch.ones_like(prompt)
    padding[0, :3] = 0
    with pytest.raises(ValueError, match="padding"):
        tokenring_transformers.generate(model, prompt, attention_mask=padding, max_new_tokens=2)
    with pytest.raises(ValueError, match="unsupported arguments"):
        tokenring_transformers.generate(model, prompt, max_new_tokens=2, no_such_setting=1)
    with pytest.raises(ValueError, match="logits_processor"):
        tokenring_transformers.generate(model, prompt, max_new_tokens=2, logits_processor=[object()])


def test_the_cache_is_a_transformers_cache():
    import transformers

    assert issubclass(tokenring_transformers.TokenRingCache, transformers.Cache)
