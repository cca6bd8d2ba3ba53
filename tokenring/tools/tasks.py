"""Functions the tools run on every rank of a `tokenring.tools.launch.LocalWorld`.

Each is called as ``task(rank, world_size, *args)`` and returns plain data
(numbers, lists, tensors serialised with `to_bytes`), never live tensors:
a tensor sent through a multiprocessing queue as is would be shared through
file descriptors that outlive the task.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time

import torch
import torch.distributed as dist

import tokenring

from tokenring.tools.problems import Problem


def to_bytes(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensor.detach().cpu().clone(), buffer)
    return buffer.getvalue()


def from_bytes(blob: bytes) -> torch.Tensor:
    return torch.load(io.BytesIO(blob), weights_only=True)


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def peak_memory():
    """Measure how far this process's resident memory rose above its level at entry.

    Linux only (the kernel's high-water mark VmHWM, reset through
    /proc/self/clear_refs); elsewhere the yielded dict's "bytes" stays None.
    This counts every allocation of the process, torch's included.
    """
    measured: dict[str, int | None] = {"bytes": None}
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
        before = _status_bytes("VmRSS")
    except OSError:
        before = None
    yield measured
    peak = _status_bytes("VmHWM")
    if before is not None and peak is not None:
        measured["bytes"] = max(peak - before, 0)


def _as_view(t: torch.Tensor, memory: str) -> torch.Tensor:
    """The same values laid out in memory as users' tensors often are."""
    if memory == "contiguous":
        return t.contiguous()
    if memory == "strided":  # every other element of a wider tensor: last-dim stride 2
        wide = torch.stack((t, torch.full_like(t, float("nan"))), dim=-1).flatten(-2)
        return wide[..., ::2]
    if memory == "heads-major":  # stored as (B, H, S, D), viewed as (B, S, H, D)
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    raise ValueError(f"unknown memory layout {memory!r}")


def rank_inputs(problem: Problem, rank: int, world_size: int, memory: str = "contiguous"):
    device = problem.device(rank)
    return [
        _as_view(problem.shard(t, rank, world_size).to(device), memory)
        for t in problem.inputs()
    ]


def rank_grad_output(problem: Problem, rank: int, world_size: int) -> torch.Tensor:
    dout = problem.shard(problem.grad_output(), rank, world_size)
    return dout.to(problem.device(rank))


def attention(rank: int, world_size: int, problem: Problem, memory: str = "contiguous") -> dict:
    """One token_ring_attn call on this rank's shard; returns out, lse and the bytes sent.

    ``memory`` lays the inputs out as "contiguous", "strided" or "heads-major" views.
    """
    q, k, v = rank_inputs(problem, rank, world_size, memory)
    with peak_memory() as peak, tokenring.record_traffic() as sent:
        out, lse = tokenring.token_ring_attn(q, k, v, **problem.attention_kwargs(), return_lse=True)
    return {
        "peak_mem_bytes": peak["bytes"],
        "out": to_bytes(out),
        "lse": to_bytes(lse),
        "sent": [t.to_json() for t in sent],
    }


def attention_with_grads(rank: int, world_size: int, problem: Problem, memory: str = "contiguous") -> dict:
    """Forward and backward on this rank's shard; returns out, dq, dk, dv and the bytes of each pass."""
    q, k, v = (t.detach().requires_grad_() for t in rank_inputs(problem, rank, world_size, memory))
    dout = rank_grad_output(problem, rank, world_size)
    with peak_memory() as peak:
        with tokenring.record_traffic() as forward_sent:
            out, lse = tokenring.token_ring_attn(q, k, v, **problem.attention_kwargs(), return_lse=True)
        with tokenring.record_traffic() as backward_sent:
            out.backward(dout)
    return {
        "peak_mem_bytes": peak["bytes"],
        "out": to_bytes(out),
        "lse": to_bytes(lse),
        "dq": to_bytes(q.grad),
        "dk": to_bytes(k.grad),
        "dv": to_bytes(v.grad),
        "sent": [t.to_json() for t in forward_sent],
        "backward_sent": [t.to_json() for t in backward_sent],
    }


def timed_attention(rank: int, world_size: int, problem: Problem, repeats: int, backward: bool = False) -> dict:
    """One checked call (with its gradients if ``backward``), then ``repeats`` timed calls started together.

    "peak_mem_bytes" is the rise in resident memory over the timed calls, which
    (unlike the first call) carry no one-time initialisation of torch or gloo.
    """
    check = attention_with_grads if backward else attention
    result = check(rank, world_size, problem)
    q, k, v = rank_inputs(problem, rank, world_size)
    if backward:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        dout = rank_grad_output(problem, rank, world_size)
    seconds = []
    with peak_memory() as peak:
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            out = tokenring.token_ring_attn(q, k, v, **problem.attention_kwargs())
            if backward:
                out.backward(dout)
            seconds.append(time.perf_counter() - start)
            del out
    if repeats:
        result["peak_mem_bytes"] = peak["bytes"]
    result["seconds"] = seconds
    result["median_s"] = statistics.median(seconds) if seconds else None
    return result
