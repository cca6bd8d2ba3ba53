"""The NPU kernel adapter's translation, checked against the SPECIFICATION of torch_npu (not hardware).

Every call the adapter makes goes through a recorder in front of
`tokenring_npu.specification`, so the tests see both the arguments (layout,
head_num, masks, statistics) and the results against float64.
"""

import sys

import pytest
import torch

from tokenring.interfaces import Mask
from tokenring.reference import reference_attention
from tokenring.testing.problems import GRAD_TOLERANCE, TOLERANCE, relative_error
from tokenring_npu import specification as spec
from tokenring_npu.kernel import NpuFusionAttentionKernel


class Recorder:
    """Stands in for torch_npu: records each call, then runs the specification (or ``forward_override``)."""

    def __init__(self, forward_override=None):
        self.calls = []
        self.forward_override = forward_override

    def npu_fusion_attention(self, *args, **kwargs):
        self.calls.append(("forward", args, kwargs))
        return (self.forward_override or spec.npu_fusion_attention)(*args, **kwargs)

    def npu_fusion_attention_grad(self, *args, **kwargs):
        self.calls.append(("grad", args, kwargs))
        return spec.npu_fusion_attention_grad(*args, **kwargs)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def block(q_len, k_len, q_heads=4, kv_heads=2, dim=32, dtype=torch.float32):
    return (randn(2, q_len, q_heads, dim, dtype=dtype), randn(2, k_len, kv_heads, dim, dtype=dtype),
            randn(2, k_len, kv_heads, dim, dtype=dtype))


def test_full_block_call_uses_bsnd_head_num_scale_and_no_mask():
    ops = Recorder()
    q, k, v = block(8, 8)
    NpuFusionAttentionKernel(ops).forward(q, k, v, scale=0.3, mask=Mask.NONE)
    ((kind, args, kwargs),) = ops.calls
    assert kind == "forward" and args[3:] == (4, "BSND")
    assert kwargs["atten_mask"] is None and kwargs["sparse_mode"] == 0
    assert kwargs["scale"] == 0.3 and kwargs["keep_prob"] == 1.0


def test_causal_block_uses_sparse_mode_3_with_the_compressed_upper_triangle():
    ops = Recorder()
    q, k, v = block(8, 8)
    NpuFusionAttentionKernel(ops).forward(q, k, v, scale=0.3, mask=Mask.CAUSAL)
    (_, _, kwargs), = ops.calls
    assert kwargs["sparse_mode"] == 3
    mask = kwargs["atten_mask"]
    assert mask.dtype == torch.bool and mask.shape == (2048, 2048)
    assert torch.equal(mask, torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", [Mask.NONE, Mask.CAUSAL])
@pytest.mark.parametrize("q_len,k_len", [(12, 12), (5, 12), (12, 5)])
def test_forward_matches_float64(dtype, mask, q_len, k_len):
    q, k, v = block(q_len, k_len, dtype=dtype)
    out, lse = NpuFusionAttentionKernel(spec).forward(q, k, v, scale=0.3, mask=mask)
    want_out, want_lse = reference_attention(q, k, v, causal=mask is Mask.CAUSAL, softmax_scale=0.3)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (2, 4, q_len)
    assert relative_error(out, want_out) <= TOLERANCE[dtype]
    assert relative_error(lse, want_lse) <= TOLERANCE[dtype]


def test_rows_that_see_no_key_never_reach_the_operator():
    # The specification poisons such rows with NaN (their value is undocumented);
    # the adapter must answer them itself: out 0, lse -inf, and send only a square block.
    ops = Recorder()
    q, k, v = block(12, 5)
    out, lse = NpuFusionAttentionKernel(ops).forward(q, k, v, scale=0.5, mask=Mask.CAUSAL)
    (_, args, _), = ops.calls
    assert args[0].shape[1] == 5 and torch.equal(args[0], q[:, 7:])
    assert torch.all(out[:, :7] == 0) and torch.isneginf(lse[:, :, :7]).all()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()


def test_no_visible_key_at_all_answers_without_calling_the_operator():
    ops = Recorder()
    q = randn(1, 4, 2, 16)
    empty = torch.empty(1, 0, 2, 16)
    kernel = NpuFusionAttentionKernel(ops)
    out, lse = kernel.forward(q, empty, empty, scale=1.0, mask=Mask.NONE)
    assert ops.calls == [] and torch.all(out == 0) and torch.isneginf(lse).all()
    dq, dk, dv = kernel.backward(q, q, empty, empty, out, lse, scale=1.0, mask=Mask.NONE)
    assert ops.calls == [] and torch.all(dq == 0) and dk.shape == empty.shape


def test_lse_is_max_plus_log_sum_of_column_zero():
    # Any (max, sum) pair with the same max + log(sum) is the same lse; columns 1..7 are ignored.
    def shifted(*args, **kwargs):
        out, smax, ssum, *rest = spec.npu_fusion_attention(*args, **kwargs)
        smax, ssum = smax - 3.0, ssum * torch.exp(torch.tensor(3.0))
        smax[..., 1:], ssum[..., 1:] = 1e30, -1.0
        return (out, smax, ssum, *rest)

    q, k, v = block(6, 6)
    _, lse = NpuFusionAttentionKernel(Recorder(forward_override=shifted)).forward(q, k, v, scale=0.3, mask=Mask.NONE)
    _, want = reference_attention(q, k, v, softmax_scale=0.3)
    assert relative_error(lse, want) < 1e-5


def test_strided_views_are_made_dense_before_the_operator():
    ops = Recorder()
    q = randn(3, 16, 4, 32)[:, 8:]
    k = randn(3, 2, 8, 32).transpose(1, 2)
    v = randn(3, 2, 8, 32).transpose(1, 2)
    NpuFusionAttentionKernel(ops).forward(q, k, v, scale=0.2, mask=Mask.NONE)
    (_, args, _), = ops.calls
    assert all(t.is_contiguous() for t in args[:3])


def backward_case(q_len, k_len, mask, dtype=torch.float32):
    q, k, v = block(q_len, k_len, dtype=dtype)
    dout = randn(*q.shape, dtype=dtype)
    leaves = [t.to(torch.float64).requires_grad_() for t in (q, k, v)]
    out, lse = reference_attention(*leaves, causal=mask is Mask.CAUSAL, softmax_scale=0.3)
    want = torch.autograd.grad(out, leaves, dout.to(torch.float64))
    return (q, k, v, dout, out.detach().to(dtype), lse.detach().float()), want


def test_grad_gets_the_merged_lse_as_max_and_one_as_sum_replicated_to_8_columns():
    ops = Recorder()
    (q, k, v, dout, out, lse), _ = backward_case(8, 8, Mask.CAUSAL)
    NpuFusionAttentionKernel(ops).backward(dout, q, k, v, out, lse, scale=0.3, mask=Mask.CAUSAL)
    ((kind, args, kwargs),) = ops.calls
    assert kind == "grad" and args[4:] == (4, "BSND")
    assert torch.equal(args[3], dout) and torch.equal(kwargs["attention_in"], out)
    assert kwargs["softmax_max"].shape == (2, 4, 8, 8) and kwargs["softmax_max"].dtype == torch.float32
    assert torch.equal(kwargs["softmax_max"], lse.unsqueeze(-1).expand(2, 4, 8, 8))
    assert torch.all(kwargs["softmax_sum"] == 1)
    assert kwargs["scale_value"] == 0.3 and kwargs["sparse_mode"] == 3 and kwargs["atten_mask"].shape == (2048, 2048)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask", [Mask.NONE, Mask.CAUSAL])
@pytest.mark.parametrize("q_len,k_len", [(8, 8), (5, 12), (12, 5)])
def test_backward_matches_float64_in_the_inputs_dtypes(dtype, mask, q_len, k_len):
    (q, k, v, dout, out, lse), want = backward_case(q_len, k_len, mask, dtype)
    grads = NpuFusionAttentionKernel(spec).backward(dout, q, k, v, out, lse, scale=0.3, mask=mask)
    for got, like, expected in zip(grads, (q, k, v), want):
        assert got.dtype == like.dtype and got.shape == like.shape
        assert relative_error(got, expected) <= GRAD_TOLERANCE[dtype]


def test_rows_whose_lse_is_minus_infinity_get_zero_gradients_and_a_finite_max():
    ops = Recorder()
    (q, k, v, dout, out, lse), _ = backward_case(8, 8, Mask.NONE)
    lse[:, 1, :3] = float("-inf")  # these rows saw no key anywhere (they come from another block's blind rows)
    out[:, :3, 1] = 0
    dq, dk, dv = NpuFusionAttentionKernel(ops).backward(dout, q, k, v, out, lse, scale=0.3, mask=Mask.NONE)
    (_, _, kwargs), = ops.calls
    assert torch.isfinite(kwargs["softmax_max"]).all()
    assert torch.all(dq[:, :3, 1] == 0)
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


def test_torch_npu_is_imported_on_first_use_not_at_construction(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # "not installed"
    kernel = NpuFusionAttentionKernel()
    q, k, v = block(4, 4)
    with pytest.raises(ImportError):
        kernel.forward(q, k, v, scale=1.0, mask=Mask.NONE)
