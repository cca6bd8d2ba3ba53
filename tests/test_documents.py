"""Balanced layouts for packed documents (tokenring.placement.documents): exact inverse shards, equal counts, balanced work."""

import math
import random

import pytest
import torch

from tokenring.placement import documents


def boundaries(lengths):
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    return bounds


def fill(total, draw):
    lengths, used = [], 0
    while used < total:
        length = min(draw(), total - used)
        lengths.append(length)
        used += length
    return lengths


def random_lengths(rng, total):
    """A mix of tiny, short and long documents summing to ``total``."""
    kind = rng.randrange(4)
    if kind == 0:
        return fill(total, lambda: rng.randint(1, 5))
    if kind == 1:
        return fill(total, lambda: max(1, int(rng.lognormvariate(math.log(max(total / 16, 1)), 1.2))))
    if kind == 2:
        return fill(total, lambda: rng.randint(1, total))
    return [total]


def explicit_visible(cu_seqlens, causal, window):
    """The S x S mask of which keys each query scores, built from document ids and positions."""
    document_ids, positions = documents.document_ids_and_positions(cu_seqlens)
    same = document_ids[:, None] == document_ids[None, :]
    offset = positions[None, :] - positions[:, None]  # key minus query
    left, right = window if window is not None else (-1, -1)
    visible = same
    if causal:
        visible = visible & (offset <= 0)
    if left >= 0:
        visible = visible & (offset >= -left)
    if right >= 0:
        visible = visible & (offset <= right)
    return visible


# ------------------------------------------------------------ shard / unshard


@pytest.mark.parametrize("world_size", range(1, 9))
def test_unshard_inverts_shard_on_random_mixes(world_size):
    rng = random.Random(world_size)
    for trial in range(12):
        total = world_size * rng.randint(1, 40)
        bounds = boundaries(random_lengths(rng, total))
        causal = trial % 3 != 2
        window = None if trial % 2 else (rng.randint(-1, 6), rng.randint(-1, 6))
        dtype = torch.int32 if trial % 2 else torch.int64
        cu_seqlens = torch.tensor(bounds, dtype=dtype)
        dim = 1 + trial % 2
        x = torch.randn(2, total, 3) if dim == 1 else torch.randn(2, 3, total)
        parts = [
            documents.shard_documents(x, r, world_size, cu_seqlens, dim=dim, causal=causal, window=window)
            for r in range(world_size)
        ]
        assert all(p.shape[dim] == total // world_size for p in parts)
        assert torch.equal(documents.unshard_documents(parts, cu_seqlens, dim=dim, causal=causal, window=window), x)


@pytest.mark.parametrize("world_size", range(1, 9))
def test_every_rank_holds_s_over_n_tokens_in_increasing_order_and_each_token_once(world_size):
    rng = random.Random(100 + world_size)
    for trial in range(20):
        total = world_size * rng.randint(1, 60)
        bounds = boundaries(random_lengths(rng, total))
        layout = documents.balanced_assignment(bounds, world_size, causal=trial % 2 == 0)
        rows = [layout.rank_positions(r) for r in range(world_size)]
        assert all(r.numel() == total // world_size for r in rows)
        assert all(bool((r[1:] > r[:-1]).all()) for r in rows)
        assert sorted(torch.cat(rows).tolist()) == list(range(total))
        forward = documents.permutation(layout)
        assert torch.equal(forward, torch.cat(rows))
        assert torch.equal(documents.inverse_permutation(layout)[forward], torch.arange(total))


def test_a_shard_is_the_rows_at_its_positions():
    bounds = [0, 5, 6, 20, 24]
    x = torch.arange(24).view(1, 24)
    for rank in range(4):
        positions = documents.balanced_assignment(bounds, 4, causal=True).rank_positions(rank)
        assert documents.shard_documents(x, rank, 4, bounds).view(-1).tolist() == positions.tolist()


def test_shard_keeps_gradients_flowing():
    x = torch.randn(1, 12, 2, requires_grad=True)
    parts = [documents.shard_documents(x, r, 3, [0, 7, 12]) for r in range(3)]
    documents.unshard_documents(parts, [0, 7, 12]).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_int32_and_int64_boundaries_give_the_same_layout():
    bounds = [0, 3, 50, 51, 96]
    layouts = [
        documents.balanced_assignment(torch.tensor(bounds, dtype=dtype), 4, causal=True)
        for dtype in (torch.int32, torch.int64)
    ]
    assert layouts[0] == layouts[1] == documents.balanced_assignment(bounds, 4, causal=True)


def test_one_rank_holds_everything_in_one_run():
    layout = documents.balanced_assignment([0, 3, 10], 1, causal=True)
    assert layout.runs == (((0, 10),),)


# ------------------------------------------------------------------ work model


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, (0, 0), (2, -1), (-1, 3), (3, 1), (1, 5)])
def test_work_per_rank_counts_the_entries_the_mask_scores(causal, window):
    rng = random.Random(7)
    for world_size in (1, 2, 3, 4):
        total = world_size * rng.randint(3, 12)
        bounds = boundaries(random_lengths(rng, total))
        layout = documents.balanced_assignment(bounds, world_size, causal=causal, window=window)
        visible = explicit_visible(bounds, causal, window)
        expected = [int(visible[layout.rank_positions(r)].sum()) for r in range(world_size)]
        assert documents.work_per_rank(layout, bounds, causal, window) == expected


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, (0, 0), (3, -1), (-1, 2), (4, 6), (9, 1)])
def test_linear_segments_are_linear(causal, window):
    model = documents.WorkModel([0, 13], causal=causal, window=window)
    for length in (1, 2, 5, 13, 40):
        segments = model.linear_segments(length)
        assert segments[0][0] == 0 and segments[-1][1] == length
        for start, stop, flat in segments:
            seen = [model.document_prefix(length, o + 1) - model.document_prefix(length, o) for o in range(start, stop)]
            steps = {b - a for a, b in zip(seen, seen[1:])}
            assert len(steps) <= 1
            assert flat == (steps <= {0})


def test_imbalance_is_largest_over_mean():
    assert documents.imbalance([1, 1, 2]) == pytest.approx(1.5)
    assert documents.imbalance([0, 0]) == 1.0


# --------------------------------------------------------------------- balance


def lognormal_tail(total, rng):
    return fill(total, lambda: max(1, int(rng.lognormvariate(math.log(total / 256), 1.3))))


def one_longer_than_a_shard(total, rng):
    long_length = int(total * 0.6)
    shorts = fill(total - long_length, lambda: rng.randint(16, 1024))
    at = rng.randint(0, len(shorts))
    return shorts[:at] + [long_length] + shorts[at:]


def equal_lengths(total, rng):
    count = rng.choice([5, 7, 12, 16])
    return [total // count] * (count - 1) + [total - (total // count) * (count - 1)]


def short_indivisible(total, rng):
    """Lengths 1..1500, most shorter than a zigzag chunk and none chosen to divide by N."""
    return fill(total, lambda: rng.randint(1, 1500))


MIXES = [lognormal_tail, one_longer_than_a_shard, equal_lengths, short_indivisible]


@pytest.mark.parametrize("mix", MIXES, ids=lambda m: m.__name__)
@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_causal_work_is_balanced_on_realistic_mixes(mix, world_size):
    total = 3 * 2**14  # divides by 2, 3, 4 and 8
    for seed in range(3):
        bounds = boundaries(mix(total, random.Random(seed)))
        layout = documents.balanced_assignment(bounds, world_size, causal=True)
        assert documents.imbalance(documents.work_per_rank(layout, bounds, True)) <= 1.10
        naive = documents.contiguous_assignment(total, world_size)
        assert documents.imbalance(documents.work_per_rank(layout, bounds, True)) <= documents.imbalance(
            documents.work_per_rank(naive, bounds, True)
        )


@pytest.mark.parametrize("mix", MIXES, ids=lambda m: m.__name__)
@pytest.mark.parametrize("causal, window", [(True, (1024, 0)), (False, None), (False, (512, 512))])
def test_windowed_and_unmasked_work_is_balanced_too(mix, causal, window):
    total = 3 * 2**14
    bounds = boundaries(mix(total, random.Random(11)))
    for world_size in (3, 8):
        layout = documents.balanced_assignment(bounds, world_size, causal=causal, window=window)
        assert documents.imbalance(documents.work_per_rank(layout, bounds, causal, window)) <= 1.10


def test_a_layout_that_ignores_documents_is_what_the_balanced_one_fixes():
    total = 3 * 2**14
    bounds = boundaries(lognormal_tail(total, random.Random(0)))
    zigzag = documents.global_zigzag_assignment(total, 4)
    assert documents.imbalance(documents.work_per_rank(zigzag, bounds, True)) > 1.2


def test_small_documents_stay_whole_and_runs_stay_few():
    bounds = boundaries([100] * 96)  # 96 equal documents over 4 ranks: 24 whole ones each
    layout = documents.balanced_assignment(bounds, 4, causal=True)
    assert documents.imbalance(documents.work_per_rank(layout, bounds, True)) == 1.0
    assert max(layout.runs_per_rank()) == 1
    bounds = boundaries(lognormal_tail(3 * 2**14, random.Random(0)))
    assert max(documents.balanced_assignment(bounds, 8, causal=True).runs_per_rank()) <= 40


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "cu_seqlens, message",
    [
        ([1, 4, 8], "start at 0"),
        ([0, 4, 4, 8], "increase strictly"),
        ([0, 5, 3, 8], "increase strictly"),
        ([0], "at least two"),
        ([0, 4.0, 8], r"cu_seqlens\[1\] must be an int"),
        (torch.tensor([0.0, 8.0]), "int32 or int64"),
        (torch.tensor([[0, 8]]), "1-D"),
        (torch.tensor([0, 8], dtype=torch.int16), "int32 or int64"),
        (8, "sequence of ints"),
    ],
)
def test_bad_cu_seqlens_are_explained(cu_seqlens, message):
    with pytest.raises(ValueError, match="cu_seqlens") as caught:
        documents.balanced_assignment(cu_seqlens, 2, causal=True)
    assert caught.match(message)


def test_bad_sizes_ranks_and_windows_are_explained():
    with pytest.raises(ValueError, match="divisible by world_size 3"):
        documents.balanced_assignment([0, 4, 8], 3, causal=True)
    with pytest.raises(ValueError, match="end at the sequence length 9"):
        documents.shard_documents(torch.randn(1, 9), 0, 3, [0, 4, 8])
    with pytest.raises(ValueError, match="rank 3"):
        documents.shard_documents(torch.randn(1, 9), 3, 3, [0, 4, 9])
    with pytest.raises(ValueError, match="world_size"):
        documents.balanced_assignment([0, 4, 8], 0, causal=True)
    with pytest.raises(ValueError, match="window left"):
        documents.balanced_assignment([0, 4, 8], 2, causal=True, window=(-2, 0))
    with pytest.raises(ValueError, match="window must be"):
        documents.balanced_assignment([0, 4, 8], 2, causal=True, window=3)
    with pytest.raises(ValueError, match="expected S / N = 4"):
        documents.unshard_documents([torch.randn(1, 4), torch.randn(1, 3)], [0, 4, 8])
    with pytest.raises(ValueError, match="at least one part"):
        documents.unshard_documents([], [0, 4, 8])


def test_document_ids_and_positions():
    ids, positions = documents.document_ids_and_positions(torch.tensor([0, 2, 5], dtype=torch.int32))
    assert ids.tolist() == [0, 0, 1, 1, 1]
    assert positions.tolist() == [0, 1, 0, 1, 2]
    ids, positions = documents.document_ids_and_positions([0, 2, 5], torch.tensor([4, 1]))
    assert ids.tolist() == [1, 0] and positions.tolist() == [2, 1]
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        documents.document_ids_and_positions([0, 2, 5], torch.tensor([5]))
