"""The CUDA backend's kernel adapters, on the CPU, against stand-ins of the vendor functions.

These are tests of OUR ADAPTERS' TRANSLATION, not of flash-attn or torch's
CUDA operators: each adapter calls functions from
`tokenring_cuda.specification`, which carry the exact signature and return
convention of flash-attn 2.5, 2.6, 2.7/2.8, FlashAttention-3 and torch's
``_scaled_dot_product_efficient_attention`` (+ backward) and compute what
they compute in plain torch. What the adapter gets wrong in names, result
positions, mask alignment, lse padding, head grouping or the +inf/-inf
marks shows up numerically against the float64 reference
(`tokenring.reference.reference_attention`). Whether the stand-ins tell the
truth about the real functions is checked on a GPU (tests/test_cuda_gpu.py).
"""

import math

import pytest
import torch

from tokenring.interfaces import Mask
from tokenring.reference import reference_attention
from tokenring.testing.problems import relative_error
from tokenring_cuda import specification as spec
from tokenring_cuda.flash import (
    FLASH_2_5,
    FLASH_2_6,
    FLASH_2_7,
    FLASH_3,
    FlashInterface,
    FlashKernel,
    convention_for_flash2,
)
from tokenring_cuda.sdpa import SdpaEfficientKernel

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
GRAD_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-2}

# (Sq, Sk): square, more keys than queries (bottom-right offset), more queries
# than keys (rows that see nothing when causal), odd and unaligned lengths.
BLOCK_SHAPES = [(16, 16), (8, 24), (24, 8), (13, 13), (5, 37)]
HEADS = [(4, 4), (4, 2), (6, 1)]  # (Hq, Hkv): MHA, GQA, MQA

FLASH_RELEASES = {
    "2.5": (spec.flash_2_5, FLASH_2_5),
    "2.6": (spec.flash_2_6, FLASH_2_6),
    "2.7": (spec.flash_2_7, FLASH_2_7),
    "2.8": (spec.flash_2_7, FLASH_2_7),
    "3": (spec.flash_3, FLASH_3),
}


def sdpa_kernel():
    return SdpaEfficientKernel(spec.efficient_attention_forward, spec.efficient_attention_backward)


def flash_kernel(release):
    functions, convention = FLASH_RELEASES[release]
    interface = FlashInterface(f"stand-in flash-attn {release}", functions._flash_attn_forward,
                               functions._flash_attn_backward, convention)
    return FlashKernel(interface)


def inputs(q_len, k_len, q_heads, kv_heads, dtype, dim=16, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, q_heads, dim, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(batch, k_len, kv_heads, dim, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(batch, k_len, kv_heads, dim, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v


def assert_forward_matches_reference(kernel, q, k, v, mask, scale=0.3):
    out, lse = kernel.forward(q, k, v, scale=scale, mask=mask)
    want_out, want_lse = reference_attention(q, k, v, causal=mask is Mask.CAUSAL, softmax_scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    # relative_error is inf unless -inf rows (nothing seen) match exactly
    assert relative_error(lse, want_lse) < TOLERANCE[q.dtype]
    assert relative_error(out, want_out) < TOLERANCE[q.dtype]
    blind = torch.isneginf(want_lse)
    assert torch.all(out.transpose(1, 2)[blind] == 0), "rows that see no key must have out exactly 0"
    return out, lse


def reference_grads(q, k, v, dout, mask, scale):
    q64, k64, v64 = (t.to(torch.float64).requires_grad_() for t in (q, k, v))
    out, _ = reference_attention(q64, k64, v64, causal=mask is Mask.CAUSAL, softmax_scale=scale)
    return torch.autograd.grad(out, (q64, k64, v64), dout.to(torch.float64))


def assert_backward_matches_reference(kernel, q, k, v, mask, scale=0.3):
    want_out, want_lse = reference_attention(q, k, v, causal=mask is Mask.CAUSAL, softmax_scale=scale)
    dout = torch.randn(q.shape, dtype=torch.float64).to(q.dtype)
    got = kernel.backward(dout, q, k, v, want_out.to(q.dtype), want_lse.to(torch.float32), scale=scale, mask=mask)
    want = reference_grads(q, k, v, dout, mask, scale)
    for name, g, w, like in zip(("dq", "dk", "dv"), got, want, (q, k, v)):
        assert g.shape == like.shape and g.dtype == like.dtype, name
        assert not torch.isnan(g).any(), name
        assert relative_error(g, w) < GRAD_TOLERANCE[q.dtype], name


# -- the stand-ins themselves ------------------------------------------------


def test_efficient_stand_in_pads_lse_like_the_real_operator_shape_function():
    # torch's meta implementation of the real operator runs anywhere: compare shapes.
    for q_len in (1, 31, 32, 33, 70):
        q = torch.empty(2, 3, q_len, 16, device="meta", dtype=torch.float16)
        k = torch.empty(2, 3, 9, 16, device="meta", dtype=torch.float16)
        real = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, k, None, True, 0.0, False, scale=0.5)
        stand_in = spec.efficient_attention_forward(
            *(torch.zeros(t.shape, dtype=t.dtype) for t in (q, k, k)), None, True, 0.0, False, scale=0.5
        )
        for r, s in zip(real[:2], stand_in[:2]):
            assert tuple(r.shape) == tuple(s.shape) and r.dtype == s.dtype
        assert stand_in[1].shape[-1] == math.ceil(q_len / 32) * 32


def test_efficient_stand_in_backward_returns_what_the_real_operator_shape_function_does():
    q = torch.empty(2, 3, 40, 16, device="meta", dtype=torch.bfloat16)
    k = torch.empty(2, 3, 9, 16, device="meta", dtype=torch.bfloat16)
    out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, k, None, True)
    real = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        out, q, k, k, None, out, lse, seed, offset, 0.0, [True, True, True, False], False)
    cpu = [torch.randn(t.shape).to(t.dtype) for t in (q, k)]
    s_out, s_lse, s_seed, s_offset = spec.efficient_attention_forward(cpu[0], cpu[1], cpu[1], None, True)
    stand_in = spec.efficient_attention_backward(
        s_out, cpu[0], cpu[1], cpu[1], None, s_out, s_lse, s_seed, s_offset, 0.0, [True, True, True, False])
    assert [tuple(t.shape) for t in real[:3]] == [tuple(t.shape) for t in stand_in[:3]]
    assert real[3] is None and stand_in[3] is None


def test_efficient_operator_is_causal_is_top_left_so_non_square_blocks_differ_from_the_contract():
    q, k, v = inputs(8, 24, 2, 2, torch.float32)
    out, lse, _, _ = spec.efficient_attention_forward(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, True, scale=0.3)
    want_out, _ = reference_attention(q, k, v, causal=True, softmax_scale=0.3)  # bottom-right
    assert relative_error(out.transpose(1, 2), want_out) > 0.1


@pytest.mark.parametrize("release", ["2.5", "3"])
def test_flash_stand_ins_are_bottom_right_and_mark_empty_rows_plus_inf(release):
    functions, _ = FLASH_RELEASES[release]
    q, k, v = inputs(12, 4, 2, 2, torch.bfloat16)
    if release == "3":
        out, lse, *_ = functions._flash_attn_forward(q, k, v, softmax_scale=0.3, causal=True)
    else:
        out, _, _, _, _, lse, _, _ = functions._flash_attn_forward(q, k, v, 0.0, 0.3, True, (-1, -1), None, False)
    want_out, want_lse = reference_attention(q, k, v, causal=True, softmax_scale=0.3)
    assert torch.all(torch.isposinf(lse[..., :8])) and torch.all(out[:, :8] == 0)
    assert relative_error(lse[..., 8:], want_lse[..., 8:]) < 2e-2
    assert relative_error(out, want_out) < 2e-2


# -- the SDPA efficient-attention adapter ----------------------------------------


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}")
@pytest.mark.parametrize("mask", [Mask.NONE, Mask.CAUSAL], ids=lambda m: m.value)
@pytest.mark.parametrize("shape", BLOCK_SHAPES, ids=lambda s: f"Sq{s[0]}-Sk{s[1]}")
def test_sdpa_adapter_meets_the_kernel_contract(shape, mask, heads):
    # float32 here; every dtype runs in the shared suite (test_cuda_spec_conformance.py)
    q, k, v = inputs(*shape, *heads, torch.float32)
    assert_forward_matches_reference(sdpa_kernel(), q, k, v, mask)
    assert_backward_matches_reference(sdpa_kernel(), q, k, v, mask)


def test_sdpa_adapter_accepts_strided_and_heads_major_views():
    q, k, v = inputs(16, 16, 4, 2, torch.float32)
    wide = torch.stack((q, torch.full_like(q, float("nan"))), dim=-1).flatten(-2)[..., ::2]  # last-dim stride 2
    heads_major = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert_forward_matches_reference(sdpa_kernel(), wide, heads_major, v, Mask.CAUSAL)


def test_empty_blocks_give_out_zero_lse_minus_inf_without_a_kernel_call():
    def refuse(*args, **kwargs):
        raise AssertionError("no kernel call expected for an empty block")

    kernels = [SdpaEfficientKernel(refuse, refuse), FlashKernel(FlashInterface("refusing", refuse, refuse, FLASH_2_7))]
    for kernel in kernels:
        for (q_len, k_len), mask in zip(((0, 8), (8, 0)), (Mask.CAUSAL, Mask.NONE)):
            q, k, v = inputs(q_len, k_len, 4, 2, torch.bfloat16)
            out, lse = kernel.forward(q, k, v, scale=0.3, mask=mask)
            assert out.shape == q.shape and torch.all(out == 0)
            assert lse.shape == (2, 4, q_len) and lse.dtype == torch.float32 and torch.all(torch.isneginf(lse))
            final_lse = torch.full((2, 4, q_len), -math.inf)
            grads = kernel.backward(torch.zeros_like(q), q, k, v, torch.zeros_like(q), final_lse, scale=0.3, mask=mask)
            assert all(g.shape == t.shape and torch.all(g == 0) for g, t in zip(grads, (q, k, v)))


# -- the flash-attn adapters, one per release ------------------------------------


@pytest.mark.parametrize("release", list(FLASH_RELEASES))
@pytest.mark.parametrize("heads", [(6, 2)], ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}")
@pytest.mark.parametrize("mask", [Mask.NONE, Mask.CAUSAL], ids=lambda m: m.value)
@pytest.mark.parametrize("shape", [(16, 16), (8, 24), (24, 8)], ids=lambda s: f"Sq{s[0]}-Sk{s[1]}")
def test_flash_adapter_forward_and_backward_meet_the_kernel_contract(release, shape, mask, heads):
    dtype = torch.float16 if release in ("2.6", "3") else torch.bfloat16
    q, k, v = inputs(*shape, *heads, dtype)
    kernel = flash_kernel(release)
    assert_forward_matches_reference(kernel, q, k, v, mask)
    assert_backward_matches_reference(kernel, q, k, v, mask)


# -- what a block backward means inside TokenRing ---------------------------------


@pytest.mark.parametrize("make", [sdpa_kernel, lambda: flash_kernel("2.7"), lambda: flash_kernel("3")],
                         ids=["sdpa", "flash-2.7", "flash-3"])
def test_block_backwards_with_the_final_lse_sum_to_the_full_gradient(make):
    # Keys split in two blocks; each block's backward gets the FINAL out and lse.
    dtype = torch.float32 if make is sdpa_kernel else torch.bfloat16
    q, k, v = inputs(16, 32, 4, 2, dtype)
    kernel = make()
    out, lse = reference_attention(q, k, v, softmax_scale=0.3)
    dout = torch.randn(q.shape, dtype=torch.float64).to(dtype)
    parts = [kernel.backward(dout, q, k[:, s], v[:, s], out.to(dtype), lse.to(torch.float32), scale=0.3, mask=Mask.NONE)
             for s in (slice(0, 16), slice(16, 32))]
    want = reference_grads(q, k, v, dout, Mask.NONE, 0.3)
    dq = parts[0][0].to(torch.float64) + parts[1][0].to(torch.float64)
    dk = torch.cat([parts[0][1], parts[1][1]], dim=1)
    dv = torch.cat([parts[0][2], parts[1][2]], dim=1)
    for got, w in zip((dq, dk, dv), want):
        assert relative_error(got, w) < GRAD_TOLERANCE[dtype]


@pytest.mark.parametrize("make", [sdpa_kernel, lambda: flash_kernel("2.6")], ids=["sdpa", "flash-2.6"])
def test_rows_whose_final_lse_is_minus_inf_get_zero_gradients_not_nan(make):
    dtype = torch.float32 if make is sdpa_kernel else torch.float16
    q, k, v = inputs(24, 8, 4, 4, dtype)  # causal, Sq > Sk: the first 16 rows see nothing
    out, lse = reference_attention(q, k, v, causal=True, softmax_scale=0.3)
    assert torch.isneginf(lse[..., :16]).all()
    dout = torch.randn(q.shape, dtype=torch.float64).to(dtype)
    dq, dk, dv = make().backward(dout, q, k, v, out.to(dtype), lse.to(torch.float32), scale=0.3, mask=Mask.CAUSAL)
    assert not any(torch.isnan(g).any() for g in (dq, dk, dv))
    assert torch.all(dq[:, :16] == 0)


# -- one convention per release, checked when it loads ----------------------------


@pytest.mark.parametrize("version,label", [("2.5.9.post1", "2.5"), ("2.6.3", "2.6"), ("2.7.4.post1", "2.7"), ("2.8.3", "2.7")])
def test_each_flash_attn_release_maps_to_its_interface(version, label):
    assert convention_for_flash2(version).label == label


@pytest.mark.parametrize("version", ["2.4.2", "1.0.9", "3.0.0", "dev"])
def test_unsupported_or_unreadable_flash_attn_versions_are_refused(version):
    with pytest.raises(ValueError, match="flash-attn"):
        convention_for_flash2(version)


@pytest.mark.parametrize("functions,convention", [
    (spec.flash_2_7, FLASH_2_6),  # 2.7 functions, 2.6 call: window_size tuple no longer taken
    (spec.flash_2_5, FLASH_2_6),  # 2.5 functions have no softcap
    (spec.flash_2_6, FLASH_2_7),
    (spec.flash_2_7, FLASH_3),
])
def test_a_convention_that_does_not_fit_the_installed_functions_is_refused_at_load(functions, convention):
    with pytest.raises(TypeError):
        FlashInterface("mismatch", functions._flash_attn_forward, functions._flash_attn_backward, convention)


def test_a_forward_returning_an_unexpected_number_of_values_is_reported_with_the_release():
    def five_values(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
                    alibi_slopes, return_softmax):
        return (q,) * 5

    kernel = FlashKernel(FlashInterface("flash-attn 2.7.0", five_values, spec.flash_2_7._flash_attn_backward, FLASH_2_7))
    q, k, v = inputs(8, 8, 2, 2, torch.bfloat16)
    with pytest.raises(RuntimeError, match="flash-attn 2.7.0.*returned 5 values"):
        kernel.forward(q, k, v, scale=0.3, mask=Mask.NONE)


def _position_mask_case(seed):
    """Two documents, a window, a padding row, and a row that sees nothing in this block."""
    from tokenring.interfaces import PositionMask

    gen = torch.Generator().manual_seed(seed)
    q_pos = torch.tensor([0, 1, 2, 7, 8, 9, 20, 21])
    k_pos = torch.tensor([0, 1, 6, 7, 8, 9, 15])
    q_doc = torch.tensor([0, 0, 0, 1, 1, 1, -1, 2])
    k_doc = torch.tensor([0, 0, 1, 1, 1, 1, 1])
    return PositionMask(q_pos, k_pos, q_doc, k_doc, causal=True, window=(2, -1)), gen


def _masked_reference(q, k, v, mask, scale):
    from tokenring.placement.masks import dense_allowed

    group = q.shape[2] // k.shape[2]
    q64, k64, v64 = (t.to(torch.float64) for t in (q, k, v))
    k64, v64 = k64.repeat_interleave(group, dim=2), v64.repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q64, k64) * scale
    s = s.masked_fill(~dense_allowed(mask), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse).unsqueeze(-1))
    return torch.einsum("bhqk,bkhd->bqhd", p, v64), lse


@pytest.mark.parametrize("kernel_name", ["sdpa", "flash 2.7 (masked blocks through sdpa)"])
@pytest.mark.parametrize("heads", HEADS)
def test_position_masks_forward_and_backward(kernel_name, heads):
    mask, gen = _position_mask_case(0)
    dtype = torch.float32 if kernel_name == "sdpa" else torch.bfloat16
    kernel = sdpa_kernel() if kernel_name == "sdpa" else FlashKernel(
        FlashInterface("stand-in flash-attn 2.7", spec.flash_2_7._flash_attn_forward,
                       spec.flash_2_7._flash_attn_backward, FLASH_2_7), masked=sdpa_kernel())
    hq, hkv = heads
    q = torch.randn(2, 8, hq, 16, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(2, 7, hkv, 16, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(2, 7, hkv, 16, generator=gen).to(dtype).requires_grad_()
    out, lse = kernel.forward(q.detach(), k.detach(), v.detach(), scale=0.25, mask=mask)
    want_out, want_lse = _masked_reference(q, k, v, mask, 0.25)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.isneginf(lse[:, :, 6]).all() and (out[:, 6] == 0).all()  # the padding row
    assert relative_error(out, want_out) <= TOLERANCE[dtype] and relative_error(lse, want_lse) <= TOLERANCE[dtype]
    dout = torch.randn(out.shape, generator=gen).to(dtype)
    grads = kernel.backward(dout, q.detach(), k.detach(), v.detach(), out, lse, scale=0.25, mask=mask)
    want = torch.autograd.grad(want_out, (q, k, v), dout.to(torch.float64))
    for name, got, expected in zip(("dq", "dk", "dv"), grads, want):
        assert not torch.isnan(got).any(), name
        assert relative_error(got, expected) <= GRAD_TOLERANCE[dtype], name
