"""`token_ring_attn` as `torch.library` custom ops, so that `torch.compile` traces around it.

Every call of `tokenring.token_ring_attn`, compiled or not, runs the
attention as one operator, ``torch.ops.tokenring.attention``; its gradient
is a second one, ``torch.ops.tokenring.attention_backward``, tied to the
first with `torch.library.register_autograd`. Both have fake
implementations (`register_fake`), so a compiler learns the shapes of what
they return without running them. Neither is ever traced into.

An operator takes only tensors and primitives. The rest of a call (its
`tokenring.call.CallRecord`: the executor with its Comm, the forward and
backward plans, the softmax scale, the timeout) waits in a process-local
table, and the operators take the handle of its entry, an int64 scalar
tensor on the CPU. Calls alike (the same executor, plans, scale, timeout and
signature) share an entry, so the table stays small and an entry outlives
any backward pass that needs it.

Eagerly, `token_ring_attn` prepares its call and agrees on it with the other
ranks (`tokenring.call.prepare`, `tokenring.call.agree`), then `run` hands
the record to the attention operator. Under `torch.compile`
(`torch.compiler.is_dynamo_compiling()`: Dynamo traces it), it calls
`compiled_token_ring_attn` instead, which puts a third operator in the graph
before the attention: ``torch.ops.tokenring.agree``, whose real
implementation runs the same `prepare` and `agree` (when the graph runs,
with the real tensors) and returns the handle. So a compiled model keeps
every check and every cross-rank agreement, with no graph break:
``torch.compile(model, fullgraph=True)`` works. The arguments that are not
tensors reach the agree operator as primitives. Calls on an explicit group,
or with arguments the schemas cannot take, run eagerly instead, outside the
graph (`in_graph`; `tokenring.api` decides). See docs/compile.md.
"""

import atexit
import dataclasses
import threading
from typing import Optional

import torch
from torch import Tensor

from tokenring.runtime.agreement import PeerAborted, gather
from tokenring.call import CallRecord, agree, prepare
from tokenring.interfaces import TokenRingError, accumulation_dtype
from tokenring.plan.model import Plan
from tokenring.plan.traffic import recording

__all__ = ["agree_op", "attention_op", "attention_backward_op", "compiled_token_ring_attn", "in_graph", "run"]


# -- the process-local table of calls ------------------------------------------------------------

_records: list = []
_handles: dict = {}
_records_lock = threading.Lock()


@atexit.register
def forget_records() -> None:
    """Drop every call record (and the executors it keeps alive) while the interpreter still runs; see
    `tokenring.runtime.executors.forget_executors`."""
    with _records_lock:
        _records.clear()
        _handles.clear()


def _plan_key(plan: Optional[Plan]) -> tuple:
    """What a plan was built from: its compared fields but its steps, which those determine.

    Hashing or comparing the steps themselves costs more than the rest of a
    call at a few ranks; `tokenring.schedules.build.build_plan` is a function of these.
    """
    if plan is None:
        return ()
    return tuple(getattr(plan, f.name) for f in dataclasses.fields(plan) if f.compare and f.name != "steps")


def _register(record: CallRecord) -> Tensor:
    """The handle of ``record``, as the int64 CPU scalar the operators take; equal calls share one."""
    key = (id(record.executor), _plan_key(record.plan), _plan_key(record.backward_plan), record.scale,
           record.timeout_s, record.key)
    with _records_lock:
        handle = _handles.get(key)
        if handle is None:
            handle = len(_records)
            _records.append(record)  # keeps the executor alive, so its id stays its own
            _handles[key] = handle
    return torch.tensor(handle, dtype=torch.int64)


def _record(handle: Tensor) -> CallRecord:
    # The handle lives in host memory (the fakes say so): read it through numpy, no device op, no sync.
    index = int(handle.numpy())
    with _records_lock:
        if not 0 <= index < len(_records):
            raise TokenRingError(f"tokenring custom op: no call state with handle {index} in this process")
        return _records[index]


# -- the operators ------------------------------------------------------------------------------

@torch.library.custom_op("tokenring::agree", mutates_args=())
def agree_op(
    q: Tensor, k: Tensor, v: Tensor, needs_grad: bool, causal: bool, softmax_scale: Optional[float],
    layout: Optional[str], algorithm: str, backend: Optional[str],
) -> Tensor:
    """token_ring_attn's checks and cross-rank agreement, on every rank; the handle of the agreed call.

    ``needs_grad`` is whether the traced call had an input requiring grad in
    grad mode (inside an operator no tensor requires grad): the agreement and
    the backward plan follow it. The group is the default (world) group.
    """
    record = prepare(q, k, v, causal=causal, softmax_scale=softmax_scale, backend=backend, layout=layout,
                     algorithm=algorithm, needs_grad=needs_grad)
    agree(record)
    return _register(record)


@agree_op.register_fake
def _agree_fake(q, k, v, needs_grad, causal, softmax_scale, layout, algorithm, backend):
    return torch.empty((), dtype=torch.int64, device="cpu")


@torch.library.custom_op("tokenring::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, handle: Tensor) -> tuple[Tensor, Tensor]:
    """(out, lse) of this rank's queries, for the agreed call registered as ``handle``."""
    record = _record(handle)
    executor = record.executor
    with recording(executor.comm):
        try:
            out, lse = executor.forward(record.plan, q, k, v, scale=record.scale, timeout_s=record.timeout_s)
        except PeerAborted as stopped:  # a peer's call differs: join the gather it went to, which says how
            executor.agreement.forget()
            executor.agreement.gathers += 1
            gather(executor.comm, record.signature, None, timeout_s=record.timeout_s, stopped_by=stopped)
            raise
    # Fresh, contiguous tensors, as the fake implementation promises.
    return out.contiguous(), lse.contiguous()


@attention_op.register_fake
def _attention_fake(q, k, v, handle):
    batch, seq, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, seq), dtype=accumulation_dtype(q.dtype))


@torch.library.custom_op("tokenring::attention_backward", mutates_args=())
def attention_backward_op(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, handle: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of this rank's shard: the backward plan of the call registered as ``handle``."""
    record = _record(handle)
    if record.backward_plan is None:
        raise TokenRingError(
            "token_ring_attn: backward of a call whose inputs did not require grad when the ranks agreed on it"
        )
    with recording(record.executor.comm):
        dq, dk, dv = record.executor.backward(
            record.backward_plan, q, k, v, out, lse, dout.contiguous(), scale=record.scale,
            timeout_s=record.timeout_s,
        )
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@attention_backward_op.register_fake
def _attention_backward_fake(q, k, v, out, lse, dout, handle):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, handle = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, handle)
    ctx.mark_non_differentiable(lse)  # lse is returned, but gradients flow through out only


def _backward(ctx, dout, _dlse):
    if torch.is_grad_enabled():
        raise TokenRingError(
            "token_ring_attn does not support double backward (create_graph=True): "
            "its backward is not itself differentiable"
        )
    q, k, v, out, lse, handle = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(q, k, v, out, lse, dout, handle)
    return dq, dk, dv, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


# -- the ways in from token_ring_attn -----------------------------------------------------------

def run(record: CallRecord, q: Tensor, k: Tensor, v: Tensor) -> tuple:
    """The last step of an agreed call: the attention operator on ``record``; (out, lse)."""
    return attention_op(q, k, v, _register(record))


def in_graph(q, k, v, causal, softmax_scale, group, layout, algorithm, backend) -> bool:
    """Whether the call can go into the graph: the arguments are what the operators' schemas take.

    That is tensors on one real device, primitives, and the default group.
    Arguments that fail the schemas fail token_ring_attn's checks anyway.
    An explicit group (ProcessGroup or DeviceMesh) cannot be a primitive
    soundly: in torch 2.13 Dynamo guards such objects by type only, so a
    group baked into a graph would outlive a change of group. Such calls run
    token_ring_attn eagerly, outside the graph (a graph break), with the
    group given at run time; every rank then raises what it raises eagerly.
    """
    tensors = (q, k, v)
    if group is not None or not all(isinstance(t, Tensor) and t.dim() == 4 for t in tensors):
        return False
    if not (q.device == k.device == v.device) or q.device.type == "meta":  # meta would run the fakes
        return False
    number = isinstance(softmax_scale, (int, float)) and not isinstance(softmax_scale, bool)
    return (isinstance(causal, bool) and (softmax_scale is None or number) and isinstance(algorithm, str)
            and all(x is None or isinstance(x, str) for x in (layout, backend)))


def compiled_token_ring_attn(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, softmax_scale: Optional[float] = None,
    backend: Optional[str] = None, layout: Optional[str] = None, algorithm: str = "auto", return_lse: bool = False,
):
    """token_ring_attn while torch.compile traces a call that `in_graph` admits: the agree operator, then the
    attention operator, on the default group."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    handle = agree_op(q, k, v, needs_grad, causal, softmax_scale, layout, algorithm, backend)
    out, lse = attention_op(q, k, v, handle)
    return (out, lse) if return_lse else out
