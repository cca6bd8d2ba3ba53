"""Functions that run on every rank of a `tokenring.tools.launch.LocalWorld`.

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

from .problems import Problem


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


def _my_inputs(problem: Problem, rank: int, world_size: int, memory: str = "contiguous"):
    device = problem.device(rank)
    return [
        _as_view(tokenring.shard(t, rank, world_size, layout=problem.resolved_layout).to(device), memory)
        for t in problem.inputs()
    ]


def _my_grad_output(problem: Problem, rank: int, world_size: int) -> torch.Tensor:
    dout = tokenring.shard(problem.grad_output(), rank, world_size, layout=problem.resolved_layout)
    return dout.to(problem.device(rank))


def attention(rank: int, world_size: int, problem: Problem, memory: str = "contiguous") -> dict:
    """One token_ring_attn call on this rank's shard; returns out, lse and the bytes sent.

    ``memory`` lays the inputs out as "contiguous", "strided" or "heads-major" views.
    """
    q, k, v = _my_inputs(problem, rank, world_size, memory)
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
    q, k, v = (t.detach().requires_grad_() for t in _my_inputs(problem, rank, world_size, memory))
    dout = _my_grad_output(problem, rank, world_size)
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
    q, k, v = _my_inputs(problem, rank, world_size)
    if backward:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        dout = _my_grad_output(problem, rank, world_size)
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


def call_with(rank: int, world_size: int, problem: Problem, per_rank_changes: dict) -> str:
    """Call token_ring_attn with some ranks' arguments altered; returns "ok" or raises.

    ``per_rank_changes`` maps a rank (or "all") to changes: tensor edits
    ("q_shape", "k_shape", "v_shape" as new shapes; "<name>_dtype", "<name>_device",
    "<name>_fill" for a value put in its first element, "<name>_requires_grad")
    and keyword overrides ("causal", "layout", "algorithm", "softmax_scale",
    "backend").
    """
    q, k, v = _my_inputs(problem, rank, world_size)
    changes = dict(per_rank_changes.get("all", {}))
    changes.update(per_rank_changes.get(rank, {}))
    tensors = {"q": q, "k": k, "v": v}
    for name in ("q", "k", "v"):
        if f"{name}_shape" in changes:
            tensors[name] = torch.randn(changes.pop(f"{name}_shape"), dtype=q.dtype, device=q.device)
        if f"{name}_dtype" in changes:
            tensors[name] = tensors[name].to(getattr(torch, changes.pop(f"{name}_dtype")))
        if f"{name}_device" in changes:
            tensors[name] = tensors[name].to(changes.pop(f"{name}_device"))
        if f"{name}_fill" in changes:
            tensors[name].view(-1)[0] = changes.pop(f"{name}_fill")
        if changes.pop(f"{name}_requires_grad", False):
            tensors[name].requires_grad_()
    kwargs = problem.attention_kwargs()
    kwargs.update(changes)
    tokenring.token_ring_attn(tensors["q"], tensors["k"], tensors["v"], **kwargs)
    return "ok"


def call_unless_absent(rank: int, world_size: int, problem: Problem, absent_rank: int, timeout_s: float) -> str:
    """Every rank but ``absent_rank`` calls token_ring_attn with a short timeout."""
    import os

    if rank == absent_rank:
        return "absent"
    saved = os.environ.get("TOKENRING_TIMEOUT_S")
    os.environ["TOKENRING_TIMEOUT_S"] = str(timeout_s)
    try:
        return call_with(rank, world_size, problem, {})
    finally:
        if saved is None:
            del os.environ["TOKENRING_TIMEOUT_S"]
        else:
            os.environ["TOKENRING_TIMEOUT_S"] = saved


class _ShardOfReplicated(torch.autograd.Function):
    """This rank's shard of a tensor every rank holds whole; the gradient is summed over ranks."""

    @staticmethod
    def forward(ctx, full, rank, world_size, layout):
        ctx.rank, ctx.world_size, ctx.layout = rank, world_size, layout
        return tokenring.shard(full, rank, world_size, layout=layout).contiguous()

    @staticmethod
    def backward(ctx, grad):
        parts = [torch.zeros_like(grad) for _ in range(ctx.world_size)]
        parts[ctx.rank] = grad
        full = tokenring.unshard(parts, layout=ctx.layout).contiguous()
        dist.all_reduce(full)
        return full, None, None, None


class _GatherToReplicated(torch.autograd.Function):
    """The whole tensor from every rank's shard, on every rank."""

    @staticmethod
    def forward(ctx, part, rank, world_size, layout):
        ctx.rank, ctx.world_size, ctx.layout = rank, world_size, layout
        parts = [torch.empty_like(part) for _ in range(world_size)]
        dist.all_gather(parts, part.contiguous())
        return tokenring.unshard(parts, layout=layout)

    @staticmethod
    def backward(ctx, grad):
        return tokenring.shard(grad, ctx.rank, ctx.world_size, layout=ctx.layout).contiguous(), None, None, None


def gradcheck(rank: int, world_size: int, problem: Problem) -> bool:
    """torch.autograd.gradcheck of the whole sequence-parallel function, run in lockstep on every rank.

    Every rank evaluates the same function of the full inputs (shard, attend,
    gather), so the numerical perturbations agree across ranks and the
    analytical gradient includes every rank's contribution.
    """
    layout = problem.resolved_layout
    device = problem.device(rank)
    inputs = tuple(t.to(torch.float64).to(device).requires_grad_() for t in problem.inputs())

    def sequence_parallel(q_full, k_full, v_full):
        q, k, v = (_ShardOfReplicated.apply(t, rank, world_size, layout) for t in (q_full, k_full, v_full))
        out = tokenring.token_ring_attn(q, k, v, **problem.attention_kwargs())
        return _GatherToReplicated.apply(out, rank, world_size, layout)

    return torch.autograd.gradcheck(sequence_parallel, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def double_backward(rank: int, world_size: int, problem: Problem) -> str:
    q, k, v = (t.requires_grad_() for t in _my_inputs(problem, rank, world_size))
    out = tokenring.token_ring_attn(q, k, v, **problem.attention_kwargs())
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    dq.sum().backward()
    return "no error"


def pool_bytes_after_calls(rank: int, world_size: int, problem: Problem, calls: int) -> dict:
    """Bytes the executor keeps for reuse after ``calls`` forward+backward calls, and the shard's bytes."""
    from tokenring.api import _executors

    for _ in range(calls):
        q, k, v = (t.requires_grad_() for t in _my_inputs(problem, rank, world_size))
        out = tokenring.token_ring_attn(q, k, v, **problem.attention_kwargs())
        out.backward(torch.ones_like(out))
    pools = [e.pool.nbytes() for e in _executors.values()]
    return {"pool_bytes": sum(pools), "shard_bytes": q.numel() * q.element_size()}


def lse_requires_grad(rank: int, world_size: int, problem: Problem) -> bool:
    q, k, v = (t.requires_grad_() for t in _my_inputs(problem, rank, world_size))
    out, lse = tokenring.token_ring_attn(q, k, v, **problem.attention_kwargs(), return_lse=True)
    out.sum().backward()
    return lse.requires_grad
