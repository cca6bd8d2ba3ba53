"""Tasks the conformance suite and the core's tests run on every rank of a `tokenring.tools.launch.LocalWorld`.

Each is called as ``task(rank, world_size, *args)`` and returns plain data,
never live tensors. The tasks the tools run too (`attention`,
`attention_with_grads`, `timed_attention`) and the helpers `to_bytes`,
`from_bytes` and `peak_memory` live in `tokenring.tools.tasks`; they are
re-exported here under their old names, so ``"tokenring.testing.tasks.attention"``
still names a task.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import tokenring

from tokenring.tools.problems import Problem
from tokenring.tools.tasks import (  # noqa: F401  (re-exported: public names of this module)
    attention,
    attention_with_grads,
    from_bytes,
    peak_memory,
    rank_grad_output,
    rank_inputs,
    timed_attention,
    to_bytes,
)


def call_with(rank: int, world_size: int, problem: Problem, per_rank_changes: dict, report: str = "ok") -> str:
    """Call token_ring_attn with some ranks' arguments altered; returns "ok" or raises.

    ``per_rank_changes`` maps a rank (or "all") to changes: tensor edits
    ("q_shape", "k_shape", "v_shape" as new shapes; "<name>_dtype", "<name>_device",
    "<name>_fill" for a value put in its first element, "<name>_requires_grad")
    and keyword overrides ("causal", "layout", "algorithm", "softmax_scale",
    "backend"); "checks" sets TOKENRING_CHECKS for the call, "profile"
    TOKENRING_PROFILE (the planner's profile). With ``report``
    "finiteness" it returns whether this rank's output is all finite
    ("finite" or "not finite").
    """
    q, k, v = rank_inputs(problem, rank, world_size)
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
    checks = changes.pop("checks", None)  # TOKENRING_CHECKS for this call
    profile = changes.pop("profile", None)  # TOKENRING_PROFILE for this call (what algorithm="auto" reads)
    kwargs.update(changes)
    with _environment("TOKENRING_CHECKS", checks), _environment("TOKENRING_PROFILE", profile):
        out = tokenring.token_ring_attn(tensors["q"], tensors["k"], tensors["v"], **kwargs)
    if report == "finiteness":
        return "finite" if bool(torch.isfinite(out).all()) else "not finite"
    if report == "choice":
        choice = tokenring.last_choice()
        return choice.algorithm if choice is not None else "none"
    return "ok"


@contextlib.contextmanager
def _environment(name: str, value: str | None):
    saved = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def agreement_counts(rank: int, world_size: int, backend: str | None = None) -> dict:
    """The agreement's counters of this rank's default-group executor (tokenring.runtime.agreement.Agreement)."""
    from tokenring.runtime.executors import executors

    agreement = next(e.agreement for (name, group), e in executors().items()
                     if group is None and (backend is None or name == backend))
    return {"gathers": agreement.gathers, "skips": agreement.skips, "cached": agreement.agreed is not None}


def call_sequence(rank: int, world_size: int, problem: Problem, calls: list) -> list:
    """`call_with` once per entry of ``calls``; each outcome is "ok" or (error type name, message)."""
    outcomes = []
    for changes in calls:
        try:
            outcomes.append(call_with(rank, world_size, problem, changes))
        except tokenring.TokenRingError as error:
            outcomes.append((type(error).__name__, str(error)))
    return outcomes


def call_unless_absent(rank: int, world_size: int, problem: Problem, absent_rank: int, timeout_s: float) -> str:
    """Every rank but ``absent_rank`` calls token_ring_attn with a short timeout."""
    if rank == absent_rank:
        return "absent"
    with _environment("TOKENRING_TIMEOUT_S", str(timeout_s)):
        return call_with(rank, world_size, problem, {})


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
    q, k, v = (t.requires_grad_() for t in rank_inputs(problem, rank, world_size))
    out = tokenring.token_ring_attn(q, k, v, **problem.attention_kwargs())
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    dq.sum().backward()
    return "no error"


def pool_bytes_after_calls(rank: int, world_size: int, problem: Problem, calls: int) -> dict:
    """Bytes the executor keeps for reuse after ``calls`` forward+backward calls, and the shard's bytes."""
    from tokenring.runtime.executors import executors

    for _ in range(calls):
        q, k, v = (t.requires_grad_() for t in rank_inputs(problem, rank, world_size))
        out = tokenring.token_ring_attn(q, k, v, **problem.attention_kwargs())
        out.backward(torch.ones_like(out))
    pools = [e.pool.nbytes() for e in executors().values()]
    return {"pool_bytes": sum(pools), "shard_bytes": q.numel() * q.element_size()}


def lse_requires_grad(rank: int, world_size: int, problem: Problem) -> bool:
    q, k, v = (t.requires_grad_() for t in rank_inputs(problem, rank, world_size))
    out, lse = tokenring.token_ring_attn(q, k, v, **problem.attention_kwargs(), return_lse=True)
    out.sum().backward()
    return lse.requires_grad


class _CountOps(TorchDispatchMode):
    """Counts every operator that reaches the dispatcher, c10d's collectives and messages included.

    A mode does not see inside a custom operator's body on its own; the
    body of each of TokenRing's operators runs here under the counter too.
    """

    def __init__(self, counts: dict[str, int] | None = None) -> None:
        super().__init__()
        self.counts: dict[str, int] = {} if counts is None else counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.counts[name] = self.counts.get(name, 0) + 1
        body = _operator_bodies().get(name)
        if body is not None:
            with _CountOps(self.counts):
                return body(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_ops():
    """Yield a dict that counts, by name, every operator dispatched during the block, inside TokenRing's too."""
    counter = _CountOps()
    with counter:
        yield counter.counts


def _operator_bodies() -> dict:
    from tokenring import compiled

    operators = (compiled.agree_op, compiled.attention_op, compiled.attention_backward_op)
    return {f"{op._namespace}.{op._name}.default": op._init_fn for op in operators}


def steady_state_ops(rank: int, world_size: int, problem: Problem, calls: int, backward: bool) -> dict:
    """After one call (which may gather the agreement), ``calls`` more: the host syncs, c10d operators and bytes.

    Returns {"ops": counts of `aten._local_scalar_dense` (what .item(),
    bool() and int() of a tensor run) and of every c10d operator, "sent":
    the messages record_traffic saw, "agreement": the agreement's counters}.
    """
    q, k, v = (t.detach().requires_grad_(backward) for t in rank_inputs(problem, rank, world_size))
    dout = rank_grad_output(problem, rank, world_size)
    kwargs = problem.attention_kwargs()

    def once():
        out = tokenring.token_ring_attn(q, k, v, **kwargs)
        if backward:
            out.backward(dout)

    once()
    before = agreement_counts(rank, world_size)
    with tokenring.record_traffic() as sent, count_ops() as counts:
        for _ in range(calls):
            once()
    after = agreement_counts(rank, world_size)
    watched = {name: n for name, n in counts.items()
               if name.startswith("c10d.") or name.startswith("aten._local_scalar_dense")}
    return {
        "ops": watched,
        "sent": [t.to_json() for t in sent],
        "agreement": {name: after[name] - before[name] for name in ("gathers", "skips")},
    }


def executor_steady_state_ops(comm, kernel, rank: int, world_size: int, problem: Problem) -> dict:
    """What a Comm and kernel cost the executor in steady state: c10d operators and host reads.

    Runs a forward and backward, then counts (as `steady_state_ops` does) over
    a second forward and backward. For a backend's CPU-testable parts (the
    CUDA and NPU Comms over gloo, say) without going through the API.
    """
    from tokenring.runtime.executor import Executor
    from tokenring.schedules.build import build_plan

    executor = Executor(comm, kernel)
    layout = problem.resolved_layout
    q, k, v = rank_inputs(problem, rank, world_size)
    dout = rank_grad_output(problem, rank, world_size)
    scale = problem.head_dim ** -0.5
    plans = [build_plan(problem.algorithm, layout, problem.causal, world_size, backward=b) for b in (False, True)]

    def once():
        out, lse = executor.forward(plans[0], q, k, v, scale=scale, timeout_s=60)
        executor.backward(plans[1], q, k, v, out, lse, dout, scale=scale, timeout_s=60)

    once()
    with count_ops() as counts:
        once()
    return {name: n for name, n in counts.items() if name.startswith("c10d.") or "_local_scalar_dense" in name}
