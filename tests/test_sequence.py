"""tokenring.sequence: sharding a batch, the loss at shard boundaries, gathering, and summing gradients."""

import pytest
import torch
import torch.nn.functional as F

import tokenring
from tokenring import sequence
from tokenring.tools.launch import WorkerError
from tokenring.testing.model_tasks import _random_logits_and_labels
from tokenring.testing.problems import relative_error
from tokenring.testing.tasks import from_bytes


def test_local_positions_are_the_true_positions():
    assert sequence.local_positions(8, rank=1, world_size=2, layout="zigzag").tolist() == [2, 3, 4, 5]
    assert sequence.local_positions(8, rank=0, world_size=2, layout="zigzag").tolist() == [0, 1, 6, 7]
    assert sequence.local_positions(6, rank=2, world_size=3, layout="contiguous").tolist() == [4, 5]


def test_shift_labels_takes_the_next_token_and_ignores_the_last():
    labels = torch.tensor([[5, 6, 7, 8]])
    assert sequence.shift_labels(labels).tolist() == [[6, 7, 8, -100]]
    assert sequence.shift_labels(labels, ignore_index=-1).tolist() == [[6, 7, 8, -1]]


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shard_batch_shifts_on_the_full_sequence_then_shards(layout, world_size):
    seq_len = 4 * world_size
    ids = torch.randint(100, (2, seq_len))
    full = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones(2, seq_len), "step": 7,
            "lengths": torch.tensor([seq_len, seq_len])}
    shards = [sequence.shard_batch(full, rank=r, world_size=world_size, layout=layout) for r in range(world_size)]
    assert all("labels" not in s and "attention_mask" not in s and s["step"] == 7 for s in shards)
    assert all(torch.equal(s["lengths"], full["lengths"]) for s in shards)
    whole = {key: tokenring.unshard([s[key] for s in shards], layout=layout)
             for key in ("input_ids", "shift_labels", "position_ids")}
    assert torch.equal(whole["input_ids"], ids)
    assert torch.equal(whole["shift_labels"][:, :-1], ids[:, 1:]) and (whole["shift_labels"][:, -1] == -100).all()
    assert torch.equal(whole["position_ids"], torch.arange(seq_len).expand(2, -1))


def test_shard_batch_refuses_what_it_cannot_do():
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="padding"):
        sequence.shard_batch({"input_ids": ids, "attention_mask": torch.tensor([[1] * 7 + [0]])}, rank=0, world_size=2)
    with pytest.raises(ValueError, match="'input_ids'.*divisible by 6"):
        sequence.shard_batch({"input_ids": ids}, rank=0, world_size=3)
    with pytest.raises(ValueError, match="not both"):
        sequence.shard_batch({"input_ids": ids, "labels": ids, "shift_labels": ids}, rank=0, world_size=1)
    with pytest.raises(ValueError, match="rank"):
        sequence.shard_batch({"input_ids": ids}, rank=2, world_size=2)
    with pytest.raises(ValueError, match="input_ids"):
        sequence.shard_batch({"tokens": ids}, rank=0, world_size=1)


@pytest.mark.parametrize("world_size, layout", [(1, "zigzag"), (2, "zigzag"), (3, "zigzag"), (2, "contiguous")])
def test_loss_is_the_single_process_mean_and_its_gradient_matches(worlds, seed, world_size, layout):
    results = worlds.get(world_size).run_ok("tokenring.testing.model_tasks.sharded_loss", seed, layout)
    logits, labels = _random_logits_and_labels(seed, 2, 4 * world_size, 11)
    logits.requires_grad_()
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))  # the usual in-sequence shift
    want.backward()
    assert all(abs(r["loss"] - want.item()) < 1e-12 for r in results), (seed, [r["loss"] for r in results], want.item())
    got_grad = tokenring.unshard([from_bytes(r["dlogits"]) for r in results], layout=layout)
    assert relative_error(got_grad, logits.grad) < 1e-12


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_gather_sequence_reassembles_and_returns_each_shard_its_gradient(worlds, seed, layout):
    results = worlds.get(3).run_ok("tokenring.testing.model_tasks.gathered_sequence", seed, layout)
    generator = torch.Generator().manual_seed(seed)
    full, weights = torch.randn(2, 6, 3, generator=generator), torch.randn(2, 6, 3, generator=generator)
    assert all(torch.equal(from_bytes(r["gathered"]), full) for r in results)
    assert torch.equal(tokenring.unshard([from_bytes(r["grad"]) for r in results], layout=layout), weights)


def test_all_reduce_gradients_sums_over_ranks(worlds):
    results = worlds.get(3).run_ok("tokenring.testing.model_tasks.summed_gradients")
    for grads in results:
        assert torch.equal(from_bytes(grads[0]), torch.full((3,), 6.0))
        assert torch.equal(from_bytes(grads[1]), torch.full((2, 2), 60.0, dtype=torch.float64))


def test_all_reduce_gradients_raises_on_every_rank_when_ranks_disagree(worlds):
    with pytest.raises(WorkerError) as caught:
        worlds.get(2).run_ok("tokenring.testing.model_tasks.summed_gradients", 1)
    results = caught.value.results
    assert all(not r.ok and "parameter 1" in r.error and "1 of 2 ranks" in r.error for r in results), results
