"""The CPU kernel adapter honours the kernel contract (DESIGN §2) in one process."""


import pytest
import torch

from tokenring.interfaces import Mask
from tokenring.reference import reference_attention
from tokenring.testing.problems import TOLERANCE, relative_error
from tokenring_cpu.kernel import CpuSdpaKernel

kernel = CpuSdpaKernel()


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("mask", [Mask.NONE, Mask.CAUSAL])
@pytest.mark.parametrize("q_len,k_len", [(12, 12), (5, 12), (12, 5)])
def test_block_forward_matches_float64(dtype, q_heads, kv_heads, mask, q_len, k_len):
    q, k, v = randn(2, q_len, q_heads, 32, dtype=dtype), randn(2, k_len, kv_heads, 32, dtype=dtype), randn(2, k_len, kv_heads, 32, dtype=dtype)
    out, lse = kernel.forward(q, k, v, scale=0.3, mask=mask)
    want_out, want_lse = reference_attention(q, k, v, causal=mask is Mask.CAUSAL, softmax_scale=0.3)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (2, q_heads, q_len)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tolerance = TOLERANCE[dtype]
    assert relative_error(out, want_out) <= tolerance
    assert relative_error(lse, want_lse) <= tolerance


def test_causal_mask_is_bottom_right_aligned_and_blind_rows_are_zero_and_minus_inf():
    # 7 queries against 3 keys: the first 4 query rows see no key at all.
    q, k, v = randn(1, 7, 2, 16), randn(1, 3, 2, 16), randn(1, 3, 2, 16)
    out, lse = kernel.forward(q, k, v, scale=1.0, mask=Mask.CAUSAL)
    assert torch.all(out[:, :4] == 0)
    assert torch.all(torch.isneginf(lse[:, :, :4]))
    assert torch.isfinite(lse[:, :, 4:]).all() and not torch.isnan(out).any()
    # the last query row sees every key
    full_out, _ = kernel.forward(q[:, -1:], k, v, scale=1.0, mask=Mask.NONE)
    torch.testing.assert_close(out[:, -1:], full_out)


def test_empty_key_block_gives_zero_and_minus_inf_without_calling_torch():
    q = randn(1, 4, 2, 16)
    empty = torch.empty(1, 0, 2, 16)
    out, lse = kernel.forward(q, empty, empty, scale=1.0, mask=Mask.NONE)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


def test_extreme_logits_stay_finite():
    q, k, v = randn(1, 8, 2, 64) * 30, randn(1, 8, 2, 64) * 30, randn(1, 8, 2, 64)
    out, lse = kernel.forward(q, k, v, scale=1.0, mask=Mask.CAUSAL)
    want_out, want_lse = reference_attention(q, k, v, causal=True, softmax_scale=1.0)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert relative_error(out, want_out) < 1e-5
    assert relative_error(lse, want_lse) < 1e-5
    assert lse.abs().max() > 100  # the test really is extreme


def test_strided_halves_of_a_shard_are_accepted():
    # The executor hands the kernel views such as the second half of a (B > 1) shard.
    q, k, v = randn(3, 16, 4, 32), randn(3, 16, 2, 32), randn(3, 16, 2, 32)
    q_half = q[:, 8:]
    assert not q_half.is_contiguous()
    out, lse = kernel.forward(q_half, k, v, scale=0.2, mask=Mask.NONE)
    want_out, want_lse = reference_attention(q_half, k, v, softmax_scale=0.2)
    assert relative_error(out, want_out) < 1e-5 and relative_error(lse, want_lse) < 1e-5
