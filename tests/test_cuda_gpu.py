"""The CUDA backend on real GPUs: run by ci/gpu; skipped (with the reason) on a machine without CUDA.

* The kernel contract for every kernel this machine has (torch's SDPA
  efficient-attention operators always, flash-attn / FlashAttention-3 when
  installed), against the float64 reference.
* The stand-ins of `tokenring_cuda.specification` against the real
  functions, so that the CPU tests' yardstick is known to tell the truth.
* NCCL end to end at world size 1 and, with two or more GPUs, 2: exact
  results, bytes as planned, and a step loop that never synchronises the
  host (CUDA sync-debug mode set to "error").
"""

import importlib

import pytest
import torch

import tokenring
from tokenring.interfaces import Mask
from tokenring.tools.launch import LocalWorld
from tokenring.plan.model import sum_by_link
from tokenring.reference import reference_attention
from tokenring.testing.problems import GRAD_TOLERANCE, TOLERANCE, Problem, relative_error
from tokenring.testing.tasks import from_bytes

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device: run ci/gpu on a GPU machine"
)

SHAPES = [(128, 128), (64, 192), (192, 64), (77, 77)]
HEADS = [(8, 8), (8, 2)]


def sdpa():
    from tokenring_cuda.selection import load_sdpa

    return load_sdpa()


def installed_flash():
    """(name, KernelChoice) of each flash kernel that loads here."""
    from tokenring_cuda import selection

    found = []
    for name, load in (("flash2", selection.load_flash2), ("flash3", selection.load_flash3)):
        try:
            found.append((name, load(importlib.import_module)))
        except Exception:
            continue
    return found


KERNELS = [("sdpa", sdpa)] + [(name, (lambda c=choice: c)) for name, choice in installed_flash()]


def cuda_inputs(q_len, k_len, q_heads, kv_heads, dtype, dim=64, batch=2):
    make = lambda s, h: torch.randn(batch, s, h, dim, dtype=torch.float64).to(dtype).cuda()  # noqa: E731
    return make(q_len, q_heads), make(k_len, kv_heads), make(k_len, kv_heads)


@pytest.mark.parametrize("kernel_name,load", KERNELS, ids=[k for k, _ in KERNELS])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}")
@pytest.mark.parametrize("mask", [Mask.NONE, Mask.CAUSAL], ids=lambda m: m.value)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"Sq{s[0]}-Sk{s[1]}")
def test_kernel_contract_on_the_gpu(kernel_name, load, shape, mask, heads):
    choice = load()
    kernel = choice.create()
    for dtype in sorted(choice.capabilities.dtypes, key=str):
        q, k, v = cuda_inputs(*shape, *heads, dtype)
        scale = 0.125
        out, lse = kernel.forward(q, k, v, scale=scale, mask=mask)
        want_out, want_lse = reference_attention(q.cpu(), k.cpu(), v.cpu(), causal=mask is Mask.CAUSAL, softmax_scale=scale)
        assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
        assert lse.shape == (2, heads[0], shape[0]) and lse.dtype == torch.float32
        assert relative_error(out.cpu(), want_out) < TOLERANCE[dtype], dtype
        assert relative_error(lse.cpu(), want_lse) < TOLERANCE[dtype], dtype
        dout = torch.randn(q.shape, dtype=torch.float64).to(dtype).cuda()
        grads = kernel.backward(dout, q, k, v, want_out.to(dtype).cuda(), want_lse.float().cuda(), scale=scale, mask=mask)
        q64, k64, v64 = (t.cpu().double().requires_grad_() for t in (q, k, v))
        ref_out, _ = reference_attention(q64, k64, v64, causal=mask is Mask.CAUSAL, softmax_scale=scale)
        want = torch.autograd.grad(ref_out, (q64, k64, v64), dout.cpu().double())
        for name, g, w in zip(("dq", "dk", "dv"), grads, want):
            assert relative_error(g.cpu(), w) < GRAD_TOLERANCE[dtype], f"{name} {dtype}"


def aligned_bias(q_len, k_len, heads, dtype):
    """A finite additive bias in the layout the operator accepts (row stride a multiple of 16), CPU and GPU."""
    storage = torch.randn(q_len, (k_len + 15) // 16 * 16, dtype=torch.float64).to(dtype)
    shape = (2, heads, q_len, k_len)
    return storage[:, :k_len].expand(shape), storage.cuda()[:, :k_len].expand(shape)


def test_efficient_attention_stand_in_tells_the_truth():
    from tokenring_cuda import specification as spec

    op = torch.ops.aten._scaled_dot_product_efficient_attention
    backward_op = torch.ops.aten._scaled_dot_product_efficient_attention_backward
    mask = [True, True, True, False]
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        q, k, v = (t.transpose(1, 2) for t in cuda_inputs(70, 50, 4, 4, dtype))
        cpu_bias, gpu_bias = aligned_bias(70, 50, 4, dtype)
        for causal, bias in ((False, None), (True, None), (False, (cpu_bias, gpu_bias))):
            real = op(q, k, v, bias and bias[1], True, 0.0, causal, scale=0.2)
            stand_in = spec.efficient_attention_forward(q.cpu(), k.cpu(), v.cpu(), bias and bias[0],
                                                        True, 0.0, causal, scale=0.2)
            assert real[1].shape == stand_in[1].shape  # padded to a multiple of 32
            assert torch.all(torch.isposinf(real[1][..., 70:].cpu())), "the padding past Sq holds +inf"
            assert relative_error(real[0].cpu(), stand_in[0]) < tolerance
            assert relative_error(real[1][..., :70].cpu(), stand_in[1][..., :70]) < 1e-5
            dout = torch.randn_like(real[0])
            real_grads = backward_op(dout, q, k, v, bias and bias[1], real[0], real[1], real[2], real[3], 0.0,
                                     mask, causal, scale=0.2)
            spec_grads = spec.efficient_attention_backward(
                dout.cpu(), q.cpu(), k.cpu(), v.cpu(), bias and bias[0], real[0].cpu(), real[1].cpu(),
                real[2], real[3], 0.0, mask, causal, scale=0.2)
            for r, g in zip(real_grads[:3], spec_grads[:3]):
                assert relative_error(r.cpu(), g) < 3 * tolerance


@pytest.mark.parametrize("kernel_name,load", KERNELS[1:], ids=[k for k, _ in KERNELS[1:]])
def test_flash_stand_in_of_the_installed_release_tells_the_truth(kernel_name, load):
    from tokenring_cuda import specification as spec

    choice = load()
    interface = choice.create().interface
    label = interface.convention.label
    stand_in = {"2.5": spec.flash_2_5, "2.6": spec.flash_2_6, "2.7": spec.flash_2_7, "3": spec.flash_3}[label]
    q, k, v = cuda_inputs(96, 32, 8, 2, torch.bfloat16)  # causal with Sq > Sk: 64 rows see nothing
    keywords = interface.convention.forward_keywords(0.125, True)
    real = interface.forward(q, k, v, **keywords)
    fake = stand_in._flash_attn_forward(q.cpu(), k.cpu(), v.cpu(), **keywords)
    index = interface.convention.lse_index
    assert len(real) == len(fake) == interface.convention.forward_results
    assert relative_error(real[0].cpu(), fake[0]) < 2e-2
    assert torch.equal(torch.isposinf(real[index].cpu()), torch.isposinf(fake[index]))  # +inf marks
    assert torch.all(real[0][:, :64] == 0)


# -- NCCL, end to end ------------------------------------------------------------------


def step_loop_without_host_sync(rank, world_size, problem):
    """Warm up through token_ring_attn, then run the executor's passes with host syncs forbidden."""
    from tokenring.runtime.executors import executor_for
    from tokenring.registry import registry

    device = torch.device("cuda", torch.cuda.current_device())
    layout = problem.resolved_layout
    q, k, v = (tokenring.shard(t, rank, world_size, layout=layout).to(device) for t in problem.inputs())
    dout = tokenring.shard(problem.grad_output(), rank, world_size, layout=layout).to(device)
    tokenring.token_ring_attn(q, k, v, **problem.attention_kwargs())
    executor = executor_for(registry.get("cuda"), None)
    plan = tokenring.build_plan(problem.algorithm, layout, problem.causal, world_size)
    backward_plan = tokenring.build_plan(problem.algorithm, layout, problem.causal, world_size, backward=True)
    scale = problem.head_dim ** -0.5
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, lse = executor.forward(plan, q, k, v, scale=scale, timeout_s=120)
        grads = executor.backward(backward_plan, q, k, v, out, lse, dout, scale=scale, timeout_s=120)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in grads)


@pytest.fixture(scope="module", params=sorted({1, min(2, torch.cuda.device_count() or 1)}), ids=lambda n: f"N{n}")
def cuda_world(request):
    with LocalWorld(request.param, tokenring_backend="cuda", threads_per_rank=1,
                    env={"TOKENRING_TIMEOUT_S": "120"}) as world:
        yield world


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nccl_end_to_end_is_exact_and_moves_the_planned_bytes(cuda_world, dtype, causal):
    n = cuda_world.world_size
    problem = Problem(seed=3, batch=1, seq_len=512 * n, q_heads=8, kv_heads=2, head_dim=64, dtype=dtype,
                      causal=causal, backend="cuda")
    results = cuda_world.run_ok("tokenring.testing.tasks.attention_with_grads", problem, timeout_s=300)
    layout = problem.resolved_layout
    want_out, want_lse = problem.reference()
    out = tokenring.unshard([from_bytes(r["out"]) for r in results], layout=layout)
    lse = tokenring.unshard([from_bytes(r["lse"]) for r in results], layout=layout, dim=2)
    assert relative_error(out, want_out) < TOLERANCE[problem.torch_dtype]
    assert relative_error(lse, want_lse) < TOLERANCE[problem.torch_dtype]
    for name, want in zip(("dq", "dk", "dv"), problem.reference_grads()):
        got = tokenring.unshard([from_bytes(r[name]) for r in results], layout=layout)
        assert relative_error(got, want) < GRAD_TOLERANCE[problem.torch_dtype], name
    for key, backward in (("sent", False), ("backward_sent", True)):
        measured = sum_by_link(tokenring.LinkTraffic(**m) for r in results for m in r[key])
        plan = tokenring.build_plan(problem.algorithm, layout, causal, n, backward=backward)
        assert measured == plan.link_bytes(problem.shape(n)), key


def test_the_step_loop_never_synchronises_the_host(cuda_world):
    n = cuda_world.world_size
    problem = Problem(seed=5, batch=1, seq_len=256 * n, q_heads=4, kv_heads=4, head_dim=64, dtype="bfloat16",
                      causal=True, backend="cuda")
    assert all(cuda_world.run_ok(f"{__name__}.step_loop_without_host_sync", problem, timeout_s=300))
