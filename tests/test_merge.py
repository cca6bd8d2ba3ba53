"""Merging partial results by log-sum-exp, including rows that have seen nothing."""

import torch

from tokenring.runtime.merge import merge_partial_
from tokenring.reference import reference_attention


def test_merging_two_key_halves_gives_attention_over_all_keys():
    q, k, v = (torch.randn(2, 6, 3, 8, dtype=torch.float64) for _ in range(3))
    out_a, lse_a = reference_attention(q, k[:, :3], v[:, :3])
    out_b, lse_b = reference_attention(q, k[:, 3:], v[:, 3:])
    want_out, want_lse = reference_attention(q, k, v)
    merge_partial_(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out_a, want_out)
    torch.testing.assert_close(lse_a, want_lse)


def test_rows_that_saw_nothing_stay_finite():
    out = torch.randn(1, 4, 1, 2)
    lse = torch.tensor([[[0.5, float("-inf"), float("-inf"), 1.0]]])
    out[:, 1:3] = 0
    other_out = torch.randn(1, 4, 1, 2)
    other_lse = torch.tensor([[[float("-inf"), float("-inf"), 2.0, float("-inf")]]])
    other_out[:, [0, 1, 3]] = 0
    expected_row0, expected_row2, expected_row3 = out[0, 0].clone(), other_out[0, 2].clone(), out[0, 3].clone()
    merge_partial_(out, lse, other_out, other_lse)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.isneginf(lse[0, 0, 1]) and torch.all(out[0, 1] == 0)
    torch.testing.assert_close(out[0, 0], expected_row0)
    torch.testing.assert_close(out[0, 2], expected_row2)
    torch.testing.assert_close(out[0, 3], expected_row3)
    torch.testing.assert_close(lse, torch.tensor([[[0.5, float("-inf"), 2.0, 1.0]]]))


def test_low_precision_partials_merge_in_the_accumulator_dtype():
    acc = torch.zeros(1, 2, 1, 4)
    acc_lse = torch.full((1, 1, 2), float("-inf"))
    part = torch.randn(1, 2, 1, 4).to(torch.bfloat16)
    merge_partial_(acc, acc_lse, part, torch.zeros(1, 1, 2))
    assert acc.dtype == torch.float32
    torch.testing.assert_close(acc, part.float())
