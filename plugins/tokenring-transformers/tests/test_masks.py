"""Packed documents, padding and sliding windows through the plugin match the model's own attention in one process.

The reference is the same model, on the whole batch, in one process, with
transformers' own sdpa or eager attention: it masks packed documents from
position ids that restart, padding from the attention mask, and windows from
the config. Its loss is computed here from labels shifted within each
document, independently of `tokenring.sequence`.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import DataCollatorWithFlattening

import tokenring
from tokenring import sequence
from tokenring.tools.problems import relative_error
from tokenring.tools.tasks import from_bytes, to_bytes
from tokenring_transformers import _window
from tokenring_transformers.testing import SMALL_LLAMA, build_model, state_bytes

IGNORE = sequence.IGNORE_INDEX
STEP = "tokenring_transformers.testing.sharded_step"


def document_lengths(seed: int, seq_len: int, world_size: int) -> list[int]:
    """Lengths summing to ``seq_len``, shuffled: one document longer than a shard, the others of 1 to 7 tokens."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [seq_len // world_size + 3]
    while sum(lengths) < seq_len:
        lengths.append(min(int(torch.randint(1, 8, (1,), generator=generator)), seq_len - sum(lengths)))
    return [lengths[i] for i in torch.randperm(len(lengths), generator=generator).tolist()]


def random_ids(seed: int, *shape: int) -> torch.Tensor:
    return torch.randint(SMALL_LLAMA["vocab_size"], shape, generator=torch.Generator().manual_seed(seed + 1))


def next_token_labels(ids: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
    """The next token where it is in the same document, else IGNORE; ``documents`` is -1 on padding."""
    labels = torch.full_like(ids, IGNORE)
    same = (documents[:, 1:] == documents[:, :-1]) & (documents[:, :-1] >= 0)
    labels[:, :-1] = torch.where(same, ids[:, 1:], IGNORE)
    return labels


def reference(kind: str, config: dict, seed: int, implementation: str, ids, position_ids, attention_mask, labels):
    """One process, the whole batch, the model's own attention: model, logits, loss and gradients."""
    model = build_model(kind, seed, implementation, **config)
    logits = model(input_ids=ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return model, logits.detach(), loss.item(), grads


def assert_matches(results, want_logits, want_loss, want_grads, seed, layout="zigzag"):
    """``want_logits`` (1, tokens, V) in packed order: compared with the tokens before the trailing padding."""
    boundaries = results[0]["cu_seqlens"]
    assert all(r["cu_seqlens"] == boundaries for r in results)
    logits = tokenring.unshard([from_bytes(r["logits"]) for r in results], layout=layout, cu_seqlens=boundaries)
    assert relative_error(logits[:, :want_logits.shape[1]], want_logits) < 1e-5, seed
    assert all(abs(r["loss"] - want_loss) < 1e-5 for r in results), (seed, want_loss, [r["loss"] for r in results])
    assert set(results[0]["grads"]) == set(want_grads)
    errors = {n: relative_error(from_bytes(results[0]["grads"][n]), g) for n, g in want_grads.items()}
    assert max(errors.values()) < 1e-4, (seed, errors)


def as_message(batch: dict) -> dict:
    return {key: to_bytes(value) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def packed_batch(seed: int, seq_len: int, world_size: int, source: str) -> tuple[dict, list[int]]:
    """A flattened batch from transformers' DataCollatorWithFlattening; documents as position ids or cu_seq_lens."""
    lengths = document_lengths(seed, seq_len, world_size)
    features = [{"input_ids": ids.tolist()} for ids in random_ids(seed, seq_len).split(lengths)]
    collator = DataCollatorWithFlattening(return_position_ids=source == "position_ids",
                                          return_flash_attn_kwargs=source == "cu_seq_lens")
    return collator(features, return_tensors="pt"), lengths


def packed_reference(kind, config, seed, implementation, batch, lengths):
    documents = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).unsqueeze(0)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    ids = batch["input_ids"]
    return reference(kind, config, seed, implementation, ids, positions, None, next_token_labels(ids, documents))


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("source", ["position_ids", "cu_seq_lens"])
def test_the_plugin_trains_a_packed_batch_with_loss_and_gradients_equal_to_one_process(worlds, seed, world_size,
                                                                                       source):
    seq_len = 16 * world_size
    batch, lengths = packed_batch(seed, seq_len, world_size, source)
    model, want_logits, want_loss, want_grads = packed_reference("llama", {}, seed, "sdpa", batch, lengths)
    results = worlds(world_size).run_ok(STEP, "llama", state_bytes(model), {}, as_message(batch), timeout_s=120)
    assert results[0]["cu_seqlens"] == torch.tensor([0] + lengths).cumsum(0).tolist()
    assert_matches(results, want_logits, want_loss, want_grads, seed)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_batch_is_packed_and_matches_the_padded_model(worlds, seed, side, implementation):
    batch_size, seq_len = 2, 24
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch_size, seq_len, dtype=torch.long)
    for row, length in enumerate(torch.randint(seq_len // 2, seq_len, (batch_size,), generator=generator).tolist()):
        (mask[row, seq_len - length:] if side == "left" else mask[row, :length]).fill_(1)
    ids = random_ids(seed, batch_size, seq_len)
    labels = ids.masked_fill(mask == 0, IGNORE)  # as a tokenizer's padded labels
    documents = torch.where(mask.bool(), torch.arange(batch_size).unsqueeze(1), -1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    model, want_logits, want_loss, want_grads = reference(
        "llama", {}, seed, implementation, ids, positions, mask, next_token_labels(ids, documents))
    results = worlds(2).run_ok(STEP, "llama", state_bytes(model), {},
                               as_message({"input_ids": ids, "labels": labels, "attention_mask": mask}),
                               {"pack_padding": True}, timeout_s=120)
    lengths = mask.sum(1).tolist()
    assert results[0]["cu_seqlens"] == [0, lengths[0], sum(lengths)]
    assert_matches(results, want_logits[mask.bool()].unsqueeze(0), want_loss, want_grads, seed)


@pytest.mark.parametrize("packed", [False, True])
def test_a_sliding_window_shorter_than_the_sequence_matches_mistral(worlds, seed, packed):
    world_size, seq_len, config = 2, 32, {"sliding_window": 5}
    if packed:
        batch, lengths = packed_batch(seed, seq_len, world_size, "position_ids")
        model, want_logits, want_loss, want_grads = packed_reference("mistral", config, seed, "sdpa", batch, lengths)
    else:
        ids = random_ids(seed, 1, seq_len)
        batch = {"input_ids": ids, "labels": ids}
        model, want_logits, want_loss, want_grads = reference(
            "mistral", config, seed, "sdpa", ids, None, None, next_token_labels(ids, torch.zeros_like(ids)))
    results = worlds(world_size).run_ok(STEP, "mistral", state_bytes(model), config, as_message(batch),
                                        timeout_s=120)
    assert_matches(results, want_logits, want_loss, want_grads, seed)


@pytest.mark.parametrize("case, fragments", [
    ("padding", ("argument 'attention_mask'", "shard_batch", "pack_padding=True")),
    ("restarting positions", ("argument 'position_ids'", "cu_seq_lens_q")),
    ("unequal boundaries", ("argument 'cu_seq_lens_k'",)),
])
def test_what_the_plugin_cannot_compute_is_refused_on_every_rank(worlds, seed, case, fragments):
    results = worlds(2).run("tokenring_transformers.testing.refused_forward", seed, case, timeout_s=120)
    for result in results:
        assert not result.ok, f"rank {result.rank} ran a forward that silently ignored {case}"
        assert result.error_type == "tokenring.interfaces.InputError", result
        assert all(fragment in result.error for fragment in fragments), result.error


def test_packed_layer_calls_add_no_collective_and_read_boundaries_once_per_tensor(worlds, seed):
    for rank, costs in enumerate(worlds(2).run_ok("tokenring_transformers.testing.layer_call_costs", seed, 16, True,
                                                 timeout_s=120)):
        assert not any(n.startswith("c10d.") and n not in ("c10d.send.default", "c10d.recv_.default")
                       for case in costs.values() for n in case), (rank, costs)
        assert costs["same positions"].get("aten._local_scalar_dense.default", 0) == 1, (rank, costs)


# ------------------------------------------------------------------ no workers


def test_shard_batch_packs_padded_rows_into_documents_and_shifts_labels_within_them():
    ids = torch.arange(1, 17).reshape(2, 8)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="pack_padding=True"):
        sequence.shard_batch({"input_ids": ids, "attention_mask": mask}, rank=0, world_size=2)
    shards = [sequence.shard_batch({"input_ids": ids, "labels": ids, "attention_mask": mask}, rank=r, world_size=2,
                                   pack_padding=True) for r in range(2)]
    boundaries = shards[0]["cu_seq_lens_q"]
    assert boundaries.dtype == torch.int32 and boundaries.device.type == "cpu"
    assert boundaries.tolist() == [0, 5, 11] and shards[0]["max_length_q"] == 6
    whole = {key: tokenring.unshard([s[key] for s in shards], layout="zigzag", cu_seqlens=boundaries)
             for key in ("input_ids", "shift_labels", "position_ids")}
    assert whole["input_ids"].tolist() == [[4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 1, 2, 3, 15, 16]]
    assert whole["shift_labels"].tolist() == [[5, 6, 7, 8, IGNORE, 10, 11, 12, 13, 14] + [IGNORE] * 6]
    assert whole["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]]


def test_shard_batch_finds_documents_in_restarting_positions_or_flash_attention_entries():
    ids = torch.arange(12).unsqueeze(0)
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 5, 6]])
    by_positions = sequence.shard_batch({"input_ids": ids, "labels": ids, "position_ids": positions}, rank=1,
                                        world_size=2, layout="contiguous")
    by_entries = sequence.shard_batch({"input_ids": ids, "labels": ids, "cu_seq_lens_q": [0, 3, 5, 12],
                                       "cu_seq_lens_k": [0, 3, 5, 12], "max_length_q": 99}, rank=1, world_size=2,
                                      layout="contiguous")
    for shard in (by_positions, by_entries):
        assert shard["cu_seq_lens_q"].tolist() == shard["cu_seq_lens_k"].tolist() == [0, 3, 5, 12]
        assert shard["max_length_q"] == shard["max_length_k"] == 7
        assert shard["position_ids"].tolist() == [[1, 2, 3, 4, 5, 6]]
        assert shard["shift_labels"].tolist() == [[7, 8, 9, 10, 11, IGNORE]]
    with pytest.raises(ValueError, match="disagree"):
        sequence.shard_batch({"input_ids": ids, "cu_seq_lens_q": [0, 3, 12], "cu_seq_lens_k": [0, 4, 12]},
                             rank=0, world_size=2)
    with pytest.raises(ValueError, match="batch size 1"):
        sequence.shard_batch({"input_ids": ids.expand(2, -1), "position_ids": positions}, rank=0, world_size=2)
    with pytest.raises(ValueError, match="consecutive within each document"):
        sequence.shard_batch({"input_ids": ids, "position_ids": positions}, rank=0, world_size=2,
                             cu_seqlens=[0, 4, 12])


def test_sliding_window_maps_to_flash_attention_window_size():
    # transformers: key j is visible to query i when i - j < W (and j <= i when causal)
    assert _window(4, True, 32) == (3, -1)
    assert _window(4, False, 32) == (3, 3)
    assert _window(32, True, 32) is None and _window(None, True, 32) is None
