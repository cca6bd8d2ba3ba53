"""shard and unshard are inverse, and the zigzag layout is the one docs/design.md, "Layouts", describes."""

import pytest
import torch

import tokenring


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("dim", [1, 2])
def test_unshard_inverts_shard(layout, world_size, dim):
    x = torch.randn(2, 24, 24, 3)
    parts = [tokenring.shard(x, r, world_size, layout=layout, dim=dim) for r in range(world_size)]
    assert all(p.shape[dim] == 24 // world_size for p in parts)
    assert torch.equal(tokenring.unshard(parts, layout=layout, dim=dim), x)


def test_zigzag_rank_holds_chunks_r_and_2n_minus_1_minus_r():
    x = torch.arange(16).view(1, 16)
    assert tokenring.shard(x, 0, 4, layout="zigzag").tolist() == [[0, 1, 14, 15]]
    assert tokenring.shard(x, 1, 4, layout="zigzag").tolist() == [[2, 3, 12, 13]]
    assert tokenring.shard(x, 3, 4, layout="zigzag").tolist() == [[6, 7, 8, 9]]
    assert tokenring.shard(x, 2, 4, layout="contiguous").tolist() == [[8, 9, 10, 11]]


def test_indivisible_lengths_and_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="divisible by 8"):
        tokenring.shard(torch.randn(1, 12), 0, 4, layout="zigzag")
    with pytest.raises(ValueError, match="unknown layout"):
        tokenring.shard(torch.randn(1, 12), 0, 4, layout="striped")
    with pytest.raises(ValueError, match="rank 4"):
        tokenring.shard(torch.randn(1, 12), 4, 4, layout="contiguous")
