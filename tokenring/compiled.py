"""`token_ring_attn` as `torch.library` custom ops, so that `torch.compile` traces around it.

Every call of `tokenring.token_ring_attn`, compiled or not, runs the
attention as one operator, ``torch.ops.tokenring.attention``; its gradient
is a second one, ``torch.ops.tokenring.attention_backward``, tied to the
first with `torch.library.register_autograd`. Both have fake
implementations (`register_fake`), so a compiler learns the shapes of what
they return without running them. Neither is ever traced into.

An operator takes only tensors and primitives. The rest of a call's state
(the executor with its Comm, the forward and backward plans, the softmax
scale, the timeout) waits in a process-local table, and the operators take
the handle of its entry, an int64 scalar tensor on the CPU. Calls alike
(the same executor, plans, scale and timeout) share an entry, so the table
stays small and an entry outlives any backward pass that needs it.

Eagerly, `token_ring_attn` checks its arguments and agrees with the other
ranks as it always has, then hands the agreed call to `attend`. Under
`torch.compile` (`torch.compiler.is_dynamo_compiling()`: Dynamo traces it), it
hands the call to `compiled_token_ring_attn` instead, which puts a third
operator in the graph before the attention: ``torch.ops.tokenring.agree``,
whose real implementation runs `token_ring_attn`'s own checks and agreement
(when the graph runs, with the real tensors) and returns the handle. So a
compiled model keeps every check and every cross-rank agreement, with no
graph break: ``torch.compile(model, fullgraph=True)`` works. The arguments
that are not tensors reach the agree operator as primitives. Calls on an
explicit group, or with arguments the schemas cannot take, run eagerly
instead (see `_in_graph`). See docs/compile.md.
"""

import contextvars
import dataclasses
import json
import threading
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .agreement import PeerAborted, agree
from .interfaces import TokenRingError, accumulation_dtype
from .plan import Plan
from .traffic import recording

# token_ring_attn, handed over by tokenring.api when it loads: the operators sit
# below the API (which routes calls through them) and call back into it.
_eager_call: Any = None


def use_eager_call(function: Any) -> None:
    global _eager_call
    _eager_call = function

__all__ = ["agree_op", "attention_op", "attention_backward_op", "attend", "compiled_token_ring_attn"]


# -- the process-local table of call states --------------------------------------------------

@dataclass(frozen=True)
class _CallState:
    """What an attention call needs besides its tensors."""

    executor: Any               # one per backend and group
    plan: Plan
    backward_plan: Optional[Plan]  # None when no input required grad when the ranks agreed
    scale: float
    wait_s: float
    signature: str  # the agreed call's signature (tokenring.agreement.signature_key)


_states: list = []
_handles: dict = {}
_states_lock = threading.Lock()


def forget_states() -> None:
    """Drop every call state (and the executors it keeps alive); see `tokenring.api._forget_executors`."""
    with _states_lock:
        _states.clear()
        _handles.clear()


def _plan_key(plan: Optional[Plan]) -> tuple:
    """What a plan was built from: its compared fields but its steps, which those determine.

    Hashing or comparing the steps themselves costs more than the rest of a
    call at a few ranks; `tokenring.plans.build_plan` is a function of these.
    """
    if plan is None:
        return ()
    return tuple(getattr(plan, f.name) for f in dataclasses.fields(plan) if f.compare and f.name != "steps")


def _register(state: _CallState) -> Tensor:
    """The handle of ``state``, as the int64 CPU scalar the operators take; equal calls share one."""
    key = (id(state.executor), _plan_key(state.plan), _plan_key(state.backward_plan), state.scale, state.wait_s,
           state.signature)
    with _states_lock:
        handle = _handles.get(key)
        if handle is None:
            handle = len(_states)
            _states.append(state)  # keeps the executor alive, so its id stays its own
            _handles[key] = handle
    return torch.tensor(handle, dtype=torch.int64)


def _state(handle: Tensor) -> _CallState:
    # The handle lives in host memory (the fakes say so): read it through numpy, no device op, no sync.
    index = int(handle.numpy())
    with _states_lock:
        if not 0 <= index < len(_states):
            raise TokenRingError(f"tokenring custom op: no call state with handle {index} in this process")
        return _states[index]


# -- the operators ------------------------------------------------------------------------------

# Set while the agree operator runs token_ring_attn: `attend` then leaves the
# handle of the agreed call here instead of running the attention.
_agreeing: contextvars.ContextVar = contextvars.ContextVar("tokenring_agreeing", default=None)


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
    token_ring_attn = _eager_call
    if needs_grad:  # token_ring_attn reads it off the tensors and the grad mode
        q = q.detach().requires_grad_()
    waiting: list = []
    token = _agreeing.set(waiting)
    try:
        with torch.set_grad_enabled(needs_grad):
            token_ring_attn(q, k, v, causal=causal, softmax_scale=softmax_scale, backend=backend, layout=layout,
                            algorithm=algorithm)
    finally:
        _agreeing.reset(token)
    (handle,) = waiting
    return handle


@agree_op.register_fake
def _agree_fake(q, k, v, needs_grad, causal, softmax_scale, layout, algorithm, backend):
    return torch.empty((), dtype=torch.int64, device="cpu")


@torch.library.custom_op("tokenring::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, handle: Tensor) -> tuple[Tensor, Tensor]:
    """(out, lse) of this rank's queries, for the agreed call registered as ``handle``."""
    state = _state(handle)
    executor = state.executor
    with recording(executor.comm):
        try:
            out, lse = executor.forward(state.plan, q, k, v, scale=state.scale, timeout_s=state.wait_s)
        except PeerAborted as stopped:  # a peer's call differs: join the gather it went to, which says how
            executor.agreement.forget()
            executor.agreement.gathers += 1
            agree(executor.comm, json.loads(state.signature), None, timeout_s=state.wait_s, stopped_by=stopped)
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
    state = _state(handle)
    if state.backward_plan is None:
        raise TokenRingError(
            "token_ring_attn: backward of a call whose inputs did not require grad when the ranks agreed on it"
        )
    with recording(state.executor.comm):
        dq, dk, dv = state.executor.backward(
            state.backward_plan, q, k, v, out, lse, dout.contiguous(), scale=state.scale, timeout_s=state.wait_s
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

def attend(q: Tensor, k: Tensor, v: Tensor, executor: Any, plan: Plan, backward_plan: Optional[Plan], *,
           scale: float, wait_s: float, signature: str) -> tuple:
    """token_ring_attn's last step: run the agreed call through the attention operator; (out, lse).

    Inside the agree operator it only registers the call and leaves its
    handle for the graph, returning (None, None).
    """
    handle = _register(_CallState(executor, plan, backward_plan, float(scale), float(wait_s), signature))
    waiting = _agreeing.get()
    if waiting is not None:
        waiting.append(handle)
        return None, None
    return attention_op(q, k, v, handle)


def _in_graph(q, k, v, causal, softmax_scale, group, layout, algorithm, backend) -> bool:
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
    group: Any = None, backend: Optional[str] = None, layout: Optional[str] = None, algorithm: str = "auto",
    return_lse: bool = False, caller_problem: Optional[str] = None,
):
    """token_ring_attn while torch.compile traces: the agree operator, then the attention operator."""
    layout = getattr(layout, "value", layout)  # a tokenring.Layout: its name
    if caller_problem is not None or not _in_graph(q, k, v, causal, softmax_scale, group, layout, algorithm, backend):
        return torch.compiler.disable(_eager_call)(
            q, k, v, causal=causal, softmax_scale=softmax_scale, group=group, backend=backend, layout=layout,
            algorithm=algorithm, return_lse=return_lse, caller_problem=caller_problem,
        )
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    handle = agree_op(q, k, v, needs_grad, causal, softmax_scale, layout, algorithm, backend)
    out, lse = attention_op(q, k, v, handle)
    return (out, lse) if return_lse else out
