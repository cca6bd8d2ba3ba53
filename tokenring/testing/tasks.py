"""Functions that run on every rank of a `tokenring.launch.LocalWorld`.

Each is called as ``task(rank, world_size, *args)`` and returns plain data
(numbers, lists, tensors serialised with `to_bytes`), never live tensors:
a tensor sent through a multiprocessing queue as is would be shared through
file descriptors that outlive the task.
"""

from __future__ import annotations

import io
import statistics
import time

import torch
import torch.distributed as dist

import tokenring

from .problems import Problem


def to_bytes(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensor.detach().cpu().clone(), buffer)
    return buffer.getvalue()


def from_bytes(blob: bytes) -> torch.Tensor:
    return torch.load(io.BytesIO(blob), weights_only=True)


def _my_inputs(problem: Problem, rank: int, world_size: int):
    return [
        tokenring.shard(t, rank, world_size, layout=problem.resolved_layout).contiguous()
        for t in problem.inputs()
    ]


def attention(rank: int, world_size: int, problem: Problem, backend: str | None = None) -> dict:
    """One token_ring_attn call on this rank's shard; returns out, lse and the bytes sent."""
    q, k, v = _my_inputs(problem, rank, world_size)
    with tokenring.record_traffic() as sent:
        out, lse = tokenring.token_ring_attn(
            q, k, v,
            causal=problem.causal,
            softmax_scale=problem.softmax_scale,
            backend=backend,
            layout=problem.layout,
            algorithm=problem.algorithm,
            return_lse=True,
        )
    return {
        "out": to_bytes(out),
        "lse": to_bytes(lse),
        "sent": [t.to_json() for t in sent],
    }


def attention_with_grads(rank: int, world_size: int, problem: Problem, backend: str | None = None) -> dict:
    """Forward and backward on this rank's shard; returns out, dq, dk, dv and the bytes of each pass."""
    q, k, v = (t.requires_grad_() for t in _my_inputs(problem, rank, world_size))
    dout = tokenring.shard(problem.grad_output(), rank, world_size, layout=problem.resolved_layout)
    with tokenring.record_traffic() as forward_sent:
        out = tokenring.token_ring_attn(
            q, k, v,
            causal=problem.causal,
            softmax_scale=problem.softmax_scale,
            backend=backend,
            layout=problem.layout,
            algorithm=problem.algorithm,
        )
    with tokenring.record_traffic() as backward_sent:
        out.backward(dout)
    return {
        "out": to_bytes(out),
        "dq": to_bytes(q.grad),
        "dk": to_bytes(k.grad),
        "dv": to_bytes(v.grad),
        "sent": [t.to_json() for t in forward_sent],
        "backward_sent": [t.to_json() for t in backward_sent],
    }


def timed_attention(rank: int, world_size: int, problem: Problem, repeats: int, backend: str | None = None) -> dict:
    """`attention` once for checking, then ``repeats`` timed calls, each started together."""
    result = attention(rank, world_size, problem, backend)
    q, k, v = _my_inputs(problem, rank, world_size)
    seconds = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        tokenring.token_ring_attn(
            q, k, v, causal=problem.causal, softmax_scale=problem.softmax_scale, backend=backend,
            layout=problem.layout, algorithm=problem.algorithm,
        )
        seconds.append(time.perf_counter() - start)
    result["seconds"] = seconds
    result["median_s"] = statistics.median(seconds) if seconds else None
    return result


def call_with(rank: int, world_size: int, problem: Problem, per_rank_changes: dict, backend: str | None = None) -> str:
    """Call token_ring_attn with some ranks' arguments altered; returns "ok" or raises.

    ``per_rank_changes`` maps a rank (or "all") to changes: tensor edits
    ("q_shape", "k_shape", "v_shape" as new shapes; "<name>_dtype", "<name>_device")
    and keyword overrides ("causal", "layout", "algorithm", "softmax_scale",
    "backend").
    """
    q, k, v = _my_inputs(problem, rank, world_size)
    changes = dict(per_rank_changes.get("all", {}))
    changes.update(per_rank_changes.get(rank, {}))
    tensors = {"q": q, "k": k, "v": v}
    for name in ("q", "k", "v"):
        if f"{name}_shape" in changes:
            tensors[name] = torch.randn(changes.pop(f"{name}_shape"), dtype=q.dtype)
        if f"{name}_dtype" in changes:
            tensors[name] = tensors[name].to(getattr(torch, changes.pop(f"{name}_dtype")))
        if f"{name}_device" in changes:
            tensors[name] = tensors[name].to(changes.pop(f"{name}_device"))
    kwargs = {
        "causal": problem.causal,
        "softmax_scale": problem.softmax_scale,
        "layout": problem.layout,
        "algorithm": problem.algorithm,
        "backend": backend,
    }
    kwargs.update(changes)
    tokenring.token_ring_attn(tensors["q"], tensors["k"], tensors["v"], **kwargs)
    return "ok"


def call_unless_absent(rank: int, world_size: int, problem: Problem, absent_rank: int, timeout_s: float) -> str:
    """Every rank but ``absent_rank`` calls token_ring_attn with a short timeout."""
    import os

    if rank == absent_rank:
        return "absent"
    os.environ["TOKENRING_TIMEOUT_S"] = str(timeout_s)
    try:
        return call_with(rank, world_size, problem, {})
    finally:
        del os.environ["TOKENRING_TIMEOUT_S"]
