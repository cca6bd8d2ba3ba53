"""The executable SPECIFICATION of torch_npu's fused attention (not hardware) against float64.

The NPU adapter is tested against `tokenring_npu.specification`; these tests
make sure that yardstick itself computes what the documentation describes.
"""

import pytest
import torch

from tokenring.reference import reference_attention
from tokenring.testing.problems import relative_error
from tokenring_npu import specification as spec


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def bsnd(q_len=6, k_len=6, q_heads=4, kv_heads=2, dim=16, dtype=torch.float32):
    return randn(2, q_len, q_heads, dim, dtype=dtype), randn(2, k_len, kv_heads, dim, dtype=dtype), randn(2, k_len, kv_heads, dim, dtype=dtype)


def test_forward_outputs_have_the_documented_shapes_dtypes_and_replicated_statistics():
    q, k, v = bsnd(dtype=torch.bfloat16)
    out, smax, ssum, reserved, seed, offset, numels = spec.npu_fusion_attention(q, k, v, 4, "BSND", scale=0.3)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    for stat in (smax, ssum):
        assert stat.shape == (2, 4, 6, 8) and stat.dtype == torch.float32
        assert torch.equal(stat, stat[..., :1].expand_as(stat))
    assert reserved.numel() == 0 and (seed, offset, numels) == (0, 0, 0)
    # max is the row max of the scaled scores, sum the row sum of exp(score - max): lse = max + log(sum)
    _, want_lse = reference_attention(q, k, v, softmax_scale=0.3)
    assert relative_error(smax[..., 0] + torch.log(ssum[..., 0]), want_lse) < 1e-6
    assert torch.all(ssum >= 1)


@pytest.mark.parametrize("layout", ["BSND", "BNSD", "BSH", "SBH"])
def test_every_layout_computes_the_same_attention(layout):
    q, k, v = bsnd()
    to = {
        "BSND": lambda x: x,
        "BNSD": lambda x: x.transpose(1, 2),
        "BSH": lambda x: x.flatten(2),
        "SBH": lambda x: x.flatten(2).transpose(0, 1),
    }[layout]
    out, smax, ssum, *_ = spec.npu_fusion_attention(to(q), to(k), to(v), 4, layout, scale=0.25)
    want_out, want_lse = reference_attention(q, k, v, softmax_scale=0.25)
    assert relative_error(out, to(want_out)) < 1e-6
    assert relative_error(smax[..., 0] + torch.log(ssum[..., 0]), want_lse) < 1e-6


@pytest.mark.parametrize("q_len,k_len", [(6, 6), (4, 9)])
def test_sparse_mode_3_is_bottom_right_and_mode_2_top_left_causal(q_len, k_len):
    q, k, v = bsnd(q_len, k_len)
    mask = spec.compressed_causal_mask()
    out3, *_ = spec.npu_fusion_attention(q, k, v, 4, "BSND", atten_mask=mask, sparse_mode=3, scale=0.5)
    want3, _ = reference_attention(q, k, v, causal=True, softmax_scale=0.5)  # bottom-right
    assert relative_error(out3, want3) < 1e-6
    out2, *_ = spec.npu_fusion_attention(q, k, v, 4, "BSND", atten_mask=mask, sparse_mode=2, scale=0.5)
    top_left = torch.triu(torch.ones(q_len, k_len, dtype=torch.bool), diagonal=1)
    want2, _ = reference_attention(q[:, :, :, :], k[:, :q_len], v[:, :q_len], causal=True, softmax_scale=0.5)
    out0, *_ = spec.npu_fusion_attention(q, k, v, 4, "BSND", atten_mask=top_left, sparse_mode=0, scale=0.5)
    assert relative_error(out2, out0) < 1e-12
    assert relative_error(out2, want2) < 1e-6  # keys after the first q_len are never visible top-left


def test_a_mask_that_is_not_the_compressed_2048_triangle_is_refused_for_sparse_mode_3():
    q, k, v = bsnd()
    small = torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1)
    with pytest.raises(spec.SpecificationError, match="compressed 2048x2048"):
        spec.npu_fusion_attention(q, k, v, 4, "BSND", atten_mask=small, sparse_mode=3)
    lower = ~spec.compressed_causal_mask()
    with pytest.raises(spec.SpecificationError, match="compressed 2048x2048"):
        spec.npu_fusion_attention(q, k, v, 4, "BSND", atten_mask=lower, sparse_mode=3)


def test_without_a_mask_sparse_mode_does_not_apply():
    q, k, v = bsnd()
    full, *_ = spec.npu_fusion_attention(q, k, v, 4, "BSND", sparse_mode=3, scale=0.3)
    want, _ = reference_attention(q, k, v, softmax_scale=0.3)
    assert relative_error(full, want) < 1e-6


def test_rows_that_see_no_key_are_poisoned_because_the_documentation_leaves_them_open():
    q, k, v = bsnd(q_len=7, k_len=3)
    out, smax, ssum, *_ = spec.npu_fusion_attention(q, k, v, 4, "BSND", atten_mask=spec.compressed_causal_mask(), sparse_mode=3)
    assert torch.isnan(out[:, :4]).all() and torch.isnan(smax[:, :, :4]).all()
    assert torch.isfinite(out[:, 4:]).all() and torch.isfinite(smax[:, :, 4:]).all()


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda q, k, v: (q.double(), k.double(), v.double(), 4), "float16, bfloat16, float32"),
        (lambda q, k, v: (q, torch.cat([k, k[:, :, :1]], 2), torch.cat([v, v[:, :, :1]], 2), 4), "non-zero integer"),
        (lambda q, k, v: (q, k, v, 3), "head_num 3 differs"),
        (lambda q, k, v: (q, k, v, 300), r"1\.\.256"),
        (lambda q, k, v: (q, k[..., :8], v[..., :8], 4), "Dq == Dk"),
    ],
    ids=["float64", "heads-not-a-multiple", "head-num-mismatch", "too-many-heads", "head-dim-mismatch"],
)
def test_documented_constraints_are_enforced(change, message):
    q, k, v = bsnd(k_len=6, kv_heads=2)
    q, k, v, heads = change(q, k, v)
    with pytest.raises(spec.SpecificationError, match=message):
        spec.npu_fusion_attention(q, k, v, heads, "BSND")


def test_what_tokenring_does_not_use_is_refused_not_guessed():
    q, k, v = bsnd()
    with pytest.raises(NotImplementedError, match="dropout"):
        spec.npu_fusion_attention(q, k, v, 4, "BSND", keep_prob=0.9)
    with pytest.raises(NotImplementedError, match="sparse_mode 4"):
        spec.npu_fusion_attention(q, k, v, 4, "BSND", atten_mask=spec.compressed_causal_mask(), sparse_mode=4)


def forward_backward_reference(q, k, v, dout, causal, scale):
    leaves = [t.to(torch.float64).requires_grad_() for t in (q, k, v)]
    out, lse = reference_attention(*leaves, causal=causal, softmax_scale=scale)
    return out.detach(), lse.detach(), torch.autograd.grad(out, leaves, dout.to(torch.float64))


@pytest.mark.parametrize("causal", [False, True])
def test_grad_from_forward_statistics_matches_autograd(causal):
    q, k, v = bsnd(q_len=5, k_len=8)
    dout = randn(*q.shape)
    extra = {"atten_mask": spec.compressed_causal_mask(), "sparse_mode": 3} if causal else {}
    out, smax, ssum, *_ = spec.npu_fusion_attention(q, k, v, 4, "BSND", scale=0.3, **extra)
    dq, dk, dv, dpse = spec.npu_fusion_attention_grad(
        q, k, v, dout, 4, "BSND", softmax_max=smax, softmax_sum=ssum, attention_in=out, scale_value=0.3, **extra
    )
    _, _, want = forward_backward_reference(q, k, v, dout, causal, 0.3)
    assert dk.shape == k.shape and dv.shape == v.shape and dpse.numel() == 0  # dk/dv summed over query groups
    for got, expected in zip((dq, dk, dv), want):
        assert relative_error(got, expected) < 1e-5


def test_grad_statistics_only_matter_through_max_plus_log_sum():
    # The property the adapter relies on: (lse, 1) gives the same gradients as (max, sum).
    q, k, v = bsnd()
    dout = randn(*q.shape)
    out, smax, ssum, *_ = spec.npu_fusion_attention(q, k, v, 4, "BSND", scale=0.3)
    lse = smax + torch.log(ssum)
    first = spec.npu_fusion_attention_grad(q, k, v, dout, 4, "BSND", softmax_max=smax, softmax_sum=ssum, attention_in=out, scale_value=0.3)
    second = spec.npu_fusion_attention_grad(
        q, k, v, dout, 4, "BSND", softmax_max=lse, softmax_sum=torch.ones_like(ssum), attention_in=out, scale_value=0.3
    )
    for a, b in zip(first[:3], second[:3]):
        assert relative_error(a, b) < 1e-5


def test_grad_refuses_statistics_of_the_wrong_shape_dtype_or_not_replicated():
    q, k, v = bsnd()
    dout = randn(*q.shape)
    out, smax, ssum, *_ = spec.npu_fusion_attention(q, k, v, 4, "BSND")
    bad = {
        "shape": (smax[..., 0], ssum[..., 0]),
        "dtype": (smax.double(), ssum.double()),
        "columns": (smax + torch.arange(8.0), ssum),
    }
    for name, (m, s) in bad.items():
        with pytest.raises(spec.SpecificationError, match="softmax_max"):
            spec.npu_fusion_attention_grad(q, k, v, dout, 4, "BSND", softmax_max=m, softmax_sum=s, attention_in=out)
