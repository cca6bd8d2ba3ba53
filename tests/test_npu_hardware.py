"""The specification of torch_npu's fused attention against the REAL operators (Ascend hardware only).

Skipped unless the NPU backend's probe says it is available (ci/npu runs it).
Each test checks one claim that tokenring_npu.specification and the adapter
rely on; docs/ascend.md lists them in its verification table.
"""

import pytest
import torch

from tokenring.testing.problems import relative_error
from tokenring_npu import NpuBackend
from tokenring_npu import specification as spec

_probe = NpuBackend().probe()
pytestmark = pytest.mark.skipif(not _probe.available, reason=f"no usable Ascend NPU: {_probe.reason}")

TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float32: 1e-4}


@pytest.fixture(scope="module")
def torch_npu():
    import torch_npu

    torch.npu.set_device(0)
    return torch_npu


def inputs(q_len, k_len, dtype, q_heads=8, kv_heads=2, dim=128):
    shapes = [(2, q_len, q_heads, dim), (2, k_len, kv_heads, dim), (2, k_len, kv_heads, dim), (2, q_len, q_heads, dim)]
    return [torch.randn(*s, dtype=torch.float64).to(dtype) for s in shapes]


def causal_args(device):
    return {"atten_mask": spec.compressed_causal_mask(device), "sparse_mode": 3, "pre_tockens": 2147483647, "next_tockens": 0}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_len,k_len", [(256, 256), (128, 384)])
def test_forward_outputs_match_the_specification(torch_npu, dtype, causal, q_len, k_len):
    q, k, v, _ = inputs(q_len, k_len, dtype)
    extra = causal_args("npu") if causal else {}
    got = torch_npu.npu_fusion_attention(q.npu(), k.npu(), v.npu(), 8, "BSND", scale=0.088, **extra)
    extra = causal_args("cpu") if causal else {}
    want = spec.npu_fusion_attention(q, k, v, 8, "BSND", scale=0.088, **extra)
    assert got[1].shape == want[1].shape == (2, 8, q_len, 8) and got[1].dtype == torch.float32
    for stat in (got[1].cpu(), got[2].cpu()):
        assert torch.equal(stat, stat[..., :1].expand_as(stat)), "softmax statistics are not replicated over the last dim"
    lse_got = got[1].cpu()[..., 0] + torch.log(got[2].cpu()[..., 0])
    lse_want = want[1][..., 0] + torch.log(want[2][..., 0])
    assert relative_error(got[0].cpu(), want[0]) <= TOLERANCE[dtype]
    assert relative_error(lse_got, lse_want) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grad_with_lse_as_max_and_one_as_sum_equals_grad_with_the_forward_statistics(torch_npu, dtype):
    q, k, v, dout = (t.npu() for t in inputs(256, 256, dtype))
    out, smax, ssum, *_ = torch_npu.npu_fusion_attention(q, k, v, 8, "BSND", scale=0.088, **causal_args("npu"))
    common = dict(attention_in=out, scale_value=0.088, **causal_args("npu"))
    first = torch_npu.npu_fusion_attention_grad(q, k, v, dout, 8, "BSND", softmax_max=smax, softmax_sum=ssum, **common)
    lse = smax + torch.log(ssum)
    second = torch_npu.npu_fusion_attention_grad(
        q, k, v, dout, 8, "BSND", softmax_max=lse, softmax_sum=torch.ones_like(ssum), **common
    )
    want = spec.npu_fusion_attention_grad(
        q.cpu(), k.cpu(), v.cpu(), dout.cpu(), 8, "BSND", softmax_max=smax.cpu(), softmax_sum=ssum.cpu(),
        attention_in=out.cpu(), scale_value=0.088, **causal_args("cpu"),
    )
    for a, b, w in zip(first[:3], second[:3], want[:3]):
        assert relative_error(b.cpu(), a.cpu()) <= TOLERANCE[dtype]
        assert relative_error(a.cpu(), w) <= 3e-2
        assert b.shape == w.shape  # dk, dv have Hkv heads: summed over query groups


def test_grad_with_a_huge_finite_max_gives_zero_gradient_rows(torch_npu):
    # The adapter's answer to rows with lse = -inf: max = float32 max, sum = 1.
    q, k, v, dout = (t.npu() for t in inputs(128, 128, torch.bfloat16))
    out, smax, ssum, *_ = torch_npu.npu_fusion_attention(q, k, v, 8, "BSND", scale=0.088)
    lse = smax + torch.log(ssum)
    lse[:, :, :16] = torch.finfo(torch.float32).max
    dq, dk, dv, *_ = torch_npu.npu_fusion_attention_grad(
        q, k, v, dout, 8, "BSND", softmax_max=lse, softmax_sum=torch.ones_like(ssum), attention_in=out, scale_value=0.088
    )
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert torch.all(dq[:, :16] == 0)
