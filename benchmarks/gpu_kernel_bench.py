#!/usr/bin/env python
"""Throughput of the CUDA backend's block kernel and merge, against the raw kernels, on one GPU.

    python benchmarks/gpu_kernel_bench.py                  # default shapes, bf16, causal and not
    python benchmarks/gpu_kernel_bench.py --quick          # a short run (what ci/gpu does)
    python benchmarks/gpu_kernel_bench.py --seq-len 8192 --heads 32 --kv-heads 8 --dtype float16 --json out.json

For each shape it reports, with CUDA-event timings (median of --repeats
after warm-up):

* block forward and backward through each kernel adapter this machine has
  (SDPA efficient attention always, flash-attn / FlashAttention-3 when
  installed), next to the raw call they wrap on the same tensors
  (``flash_attn_func``, ``F.scaled_dot_product_attention``), in TFLOP/s:
  the adapter's overhead is the difference;
* the lse merge (`tokenring.runtime.merge.merge_partial_`) in GB/s of memory traffic;
* ``token_ring_attn`` at world size 1 over NCCL (the whole call: agreement,
  plan, executor, kernel), forward and forward+backward, against the raw
  kernel on the same full sequence.

On a machine without CUDA it says so and exits with status 0, measuring nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from typing import Callable


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=8192, help="query and key length of one block")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if args.quick:
        args.seq_len, args.repeats = min(args.seq_len, 2048), min(args.repeats, 5)
    if args.heads % args.kv_heads:
        parser.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    return args


def cuda_problem() -> str | None:
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def attention_flops(batch, q_len, k_len, heads, dim, causal) -> float:
    """Forward FLOPs of one block (two matmuls); a causal square block does half."""
    flops = 4.0 * batch * heads * q_len * k_len * dim
    return flops / 2 if causal else flops


def kernels():
    """(name, AttentionKernel, dtypes) of every kernel adapter that loads here."""
    import importlib

    from tokenring_cuda import selection

    found = []
    for name, load in (("sdpa", selection.load_sdpa),
                       ("flash2", lambda: selection.load_flash2(importlib.import_module)),
                       ("flash3", lambda: selection.load_flash3(importlib.import_module))):
        try:
            choice = load()
        except Exception as exc:  # not installed, or not for this GPU
            print(f"  ({name}: not measured, {type(exc).__name__}: {exc})", file=sys.stderr)
            continue
        found.append((name, choice.create(), choice.capabilities.dtypes))
    return found


def raw_calls(q, k, v, scale, causal):
    """(name, forward-only callable) of the unwrapped kernels on the same (B, S, H, D) tensors."""
    import torch
    import torch.nn.functional as F

    calls = []
    group = q.shape[2] // k.shape[2]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if group > 1:
        kt, vt = kt.repeat_interleave(group, 1), vt.repeat_interleave(group, 1)
    calls.append(("F.scaled_dot_product_attention", lambda: F.scaled_dot_product_attention(
        qt, kt, vt, is_causal=causal, scale=scale)))
    if q.dtype in (torch.float16, torch.bfloat16):
        try:
            from flash_attn import flash_attn_func

            calls.append(("flash_attn_func", lambda: flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)))
        except Exception:
            pass
    return calls


def bench_blocks(args, dtype, causal, results):
    import torch

    from tokenring.interfaces import Mask

    b, s, hq, hkv, d = args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim
    q = torch.randn(b, s, hq, d, dtype=dtype, device="cuda")
    k = torch.randn(b, s, hkv, d, dtype=dtype, device="cuda")
    v = torch.randn(b, s, hkv, d, dtype=dtype, device="cuda")
    scale = d ** -0.5
    mask = Mask.CAUSAL if causal else Mask.NONE
    fwd_flops = attention_flops(b, s, s, hq, d, causal)
    label = f"{'causal' if causal else 'full'} B={b} S={s} Hq={hq} Hkv={hkv} D={d} {args.dtype}"
    print(f"\nblock {label}")
    for name, kernel, dtypes in kernels():
        if dtype not in dtypes:
            continue
        out, lse = kernel.forward(q, k, v, scale=scale, mask=mask)
        dout = torch.randn_like(out)
        forward_ms = median_ms(lambda: kernel.forward(q, k, v, scale=scale, mask=mask), args.repeats)
        backward_ms = median_ms(
            lambda: kernel.backward(dout, q, k, v, out, lse, scale=scale, mask=mask), args.repeats)
        row = {"what": f"adapter {name}", "shape": label, "forward_ms": forward_ms, "backward_ms": backward_ms,
               "forward_tflops": fwd_flops / forward_ms / 1e9, "backward_tflops": 2.5 * fwd_flops / backward_ms / 1e9}
        results.append(row)
        print(f"  adapter {name:<8} fwd {forward_ms:8.3f} ms {row['forward_tflops']:7.1f} TFLOP/s   "
              f"bwd {backward_ms:8.3f} ms {row['backward_tflops']:7.1f} TFLOP/s")
    for name, call in raw_calls(q, k, v, scale, causal):
        forward_ms = median_ms(call, args.repeats)
        row = {"what": f"raw {name}", "shape": label, "forward_ms": forward_ms,
               "forward_tflops": fwd_flops / forward_ms / 1e9}
        results.append(row)
        print(f"  raw {name:<31} fwd {forward_ms:8.3f} ms {row['forward_tflops']:7.1f} TFLOP/s")


def bench_merge(args, dtype, results):
    import torch

    from tokenring.interfaces import accumulation_dtype
    from tokenring.runtime.merge import merge_partial_

    b, s, hq, d = args.batch, args.seq_len, args.heads, args.head_dim
    acc = accumulation_dtype(dtype)
    acc_out = torch.randn(b, s, hq, d, dtype=acc, device="cuda")
    acc_lse = torch.randn(b, hq, s, dtype=acc, device="cuda")
    out = torch.randn(b, s, hq, d, dtype=dtype, device="cuda")
    lse = torch.randn(b, hq, s, dtype=acc, device="cuda")
    ms = median_ms(lambda: merge_partial_(acc_out, acc_lse, out, lse), args.repeats)
    # read acc_out, out, both lse; write acc_out and acc_lse: the least traffic a merge can make
    nbytes = 2 * acc_out.nbytes + out.nbytes + 2 * acc_lse.nbytes + lse.nbytes
    row = {"what": "merge_partial_", "forward_ms": ms, "gb_per_s": nbytes / ms / 1e6}
    results.append(row)
    print(f"\nmerge B={b} S={s} Hq={hq} D={d} {args.dtype}: {ms:.3f} ms, {row['gb_per_s']:.1f} GB/s")


def bench_end_to_end(args, dtype, causal, results):
    """token_ring_attn at world size 1 over NCCL against the raw kernel on the same sequence."""
    import torch
    import torch.distributed as dist

    import tokenring

    if not dist.is_initialized():
        store = os.path.join(tempfile.mkdtemp(prefix="tokenring-bench-"), "rendezvous")
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
    b, s, hq, hkv, d = args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim
    q, k, v = (torch.randn(b, s, h, d, dtype=dtype, device="cuda", requires_grad=True) for h in (hq, hkv, hkv))
    scale = d ** -0.5

    def forward():
        with torch.no_grad():
            return tokenring.token_ring_attn(q, k, v, causal=causal, backend="cuda")

    def forward_backward():
        tokenring.token_ring_attn(q, k, v, causal=causal, backend="cuda").sum().backward()

    forward_ms = median_ms(forward, args.repeats)
    both_ms = median_ms(forward_backward, args.repeats)
    raw = raw_calls(q.detach(), k.detach(), v.detach(), scale, causal)[-1]
    raw_ms = median_ms(raw[1], args.repeats)
    label = f"{'causal' if causal else 'full'} S={s} {args.dtype}"
    row = {"what": "token_ring_attn N=1", "shape": label, "forward_ms": forward_ms,
           "forward_backward_ms": both_ms, "raw": raw[0], "raw_forward_ms": raw_ms}
    results.append(row)
    print(f"\ntoken_ring_attn, world size 1, {label}: forward {forward_ms:.3f} ms "
          f"(raw {raw[0]}: {raw_ms:.3f} ms), forward+backward {both_ms:.3f} ms")


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = cuda_problem()
    if problem is not None:
        print(f"gpu_kernel_bench: {problem}; this benchmark needs an NVIDIA GPU, nothing was measured.",
              file=sys.stderr)
        return 0
    import torch

    from tokenring.registry import registry

    dtype = getattr(torch, args.dtype)
    backend = registry.get("cuda")
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"the backend's kernel: {backend.probe().details.get('kernel')}")
    results: list[dict] = []
    for causal in (False, True):
        bench_blocks(args, dtype, causal, results)
    bench_merge(args, dtype, results)
    if dtype in backend.capabilities.dtypes:
        for causal in (False, True):
            bench_end_to_end(args, dtype, causal, results)
    else:
        print(f"\n(token_ring_attn not timed: the backend's kernel does not take {args.dtype})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "args": vars(args),
                       "results": results}, file, indent=2)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
