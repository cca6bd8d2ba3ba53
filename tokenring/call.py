"""A `token_ring_attn` call in three parts: prepare, agree, run.

* `prepare(q, k, v, ...)` -> `CallRecord`: the one place where a call's
  arguments are checked (`tokenring.validation`, without raising), its
  backend and executor are found (`tokenring.runtime.executors`), ``"auto"`` is
  resolved (`tokenring.planner.choose`), the documents and window become a token
  mask, and the forward and backward plans are built and proven. The record
  is immutable and holds no tensor: the problem shape, the plans, the scale,
  the timeout, the executor, and the signature every rank must agree on
  (with this rank's problem, if it has one).
* `agree(record)`: the cross-rank agreement (`tokenring.runtime.agreement`), only
  when the signature is not the one the group last agreed on; raises on
  every rank when any rank has a problem or the ranks differ.
* `run(record, q, k, v)` (`tokenring.compiled`): the attention, as the
  custom operator ``tokenring::attention``.

`tokenring.api.token_ring_attn` runs the three eagerly; under torch.compile
the ``tokenring::agree`` operator runs the first two when the graph runs
(`tokenring.compiled`).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Optional

import torch

from tokenring.runtime.agreement import call_signature, gather, signature_key
from tokenring.runtime.executor import Executor, problem_shape
from tokenring.runtime.groups import resolve_group
from tokenring.interfaces import Backend, BackendError, InputError, TokenRingError
from tokenring.placement.layout import Layout, default_layout
from tokenring.placement.masks import TokenMask, mask_fingerprint, token_mask_for_call
from tokenring.plan.model import Plan, ProblemShape
from tokenring.proofs.plancheck import PlanError
from tokenring.planner.choose import AUTO, Choice, choose
from tokenring.schedules.build import build_masked_plan, build_plan
from tokenring.runtime.executors import backend_and_executor, timeout_s
from tokenring.validation import local_problem, mask_arguments, plan_problem

__all__ = ["CallRecord", "agree", "last_choice", "prepare"]

# Runs in place of "auto" when auto cannot choose; only ever with a problem, which the checks name first.
_AUTO_FALLBACK = "tokenring"


@dataclass(frozen=True)
class CallRecord:
    """One rank's call, checked and planned: everything the agreement and the operators need but the tensors."""

    backend: Backend
    executor: Executor
    shape: Optional[ProblemShape]   # None when the call has a problem
    dtype: Optional[torch.dtype]
    layout: Any                     # the layout's name ("zigzag", "contiguous"), or what was passed when invalid
    algorithm: str                  # the schedule that runs: "auto" resolved
    choice: Optional[Choice]        # what "auto" chose, and why; None when not asked
    needs_grad: bool
    tokens: Optional[TokenMask]     # the documents and window as a token mask; None without them
    plan: Optional[Plan]            # None when the call has a problem
    backward_plan: Optional[Plan]   # None unless needs_grad
    scale: Optional[float]          # None when the call has a problem
    timeout_s: float
    key: str                        # the signature every rank must agree on (`agreement.signature_key`)
    problem: Optional[str]          # what is wrong with this rank's call, or None
    error: type                     # what the problem raises on every rank: InputError, or BackendError

    @property
    def signature(self) -> dict:
        return json.loads(self.key)


def prepare(
    q: Any, k: Any, v: Any, *, causal: Any = False, softmax_scale: Any = None, group: Any = None,
    backend: Optional[str] = None, layout: Any = None, algorithm: Any = AUTO, caller_problem: Optional[str] = None,
    cu_seqlens: Any = None, window: Any = None, needs_grad: Optional[bool] = None,
) -> CallRecord:
    """This rank's call checked and planned (see the module); raises only when no rank can be told.

    ``needs_grad`` (default: whether grad mode is on and q, k or v requires
    grad) decides the backward plan and goes into the signature.
    """
    group = resolve_group(group)  # a DeviceMesh: its context-parallel group
    chosen, executor, backend_problem = backend_and_executor(backend, q, group)
    world_size = executor.comm.world_size
    if layout is None:
        layout = default_layout(causal)
    grad_inputs = [name for name, t in (("q", q), ("k", k), ("v", v)) if getattr(t, "requires_grad", False)]
    if needs_grad is None:
        needs_grad = torch.is_grad_enabled() and bool(grad_inputs)
    signed_algorithm, choice, auto_problem = algorithm, None, None
    if algorithm == AUTO:
        choice, auto_problem = _choose_for(q, k, causal, layout, world_size, needs_grad)
        algorithm = choice.algorithm if choice is not None else _AUTO_FALLBACK
        signed_algorithm = f"auto -> {algorithm}"
        if choice is not None:
            executor.auto_choice = choice
            _last_choice.value = choice
    problem = backend_problem or caller_problem or auto_problem or local_problem(
        q, k, v, causal=causal, softmax_scale=softmax_scale, layout=layout, algorithm=algorithm, backend=chosen,
        documents=cu_seqlens is not None,
    )
    if problem is None and needs_grad and not chosen.capabilities.backward:
        problem = (f"argument '{(grad_inputs or ['q'])[0]}': requires grad, but backend {chosen.name!r} "
                   "has no backward pass")
    max_world_size = chosen.capabilities.max_world_size
    if problem is None and max_world_size is not None and world_size > max_world_size:
        problem = f"argument 'group': backend {chosen.name!r} supports at most {max_world_size} ranks, got {world_size}"
    boundaries = masked_window = None
    if problem is None:
        boundaries, masked_window, problem = mask_arguments(cu_seqlens, window, q, world_size, chosen)
    tokens = plan = backward_plan = None
    if problem is None:
        layout = Layout(layout).value
        try:
            if boundaries is not None or masked_window is not None:
                tokens = token_mask_for_call(q.shape[1] * world_size, world_size, layout, causal, masked_window,
                                             boundaries)
            plan, backward_plan = _plans(algorithm, layout, causal, world_size, tokens, needs_grad)
        except (ValueError, PlanError) as error:  # a plugin's schedule that cannot build this call
            problem = f"argument 'algorithm': {error}"
        else:
            problem = plan_problem(plan, q, k)
    signature = call_signature(
        q, k, v, causal=causal, softmax_scale=softmax_scale, layout=layout, algorithm=signed_algorithm,
        backend=chosen, needs_grad=needs_grad,
    )
    if boundaries is not None or masked_window is not None:
        signature["documents and window"] = mask_fingerprint(boundaries, masked_window)
    ok = problem is None
    return CallRecord(
        backend=chosen, executor=executor, shape=problem_shape(q, k) if ok else None, dtype=q.dtype if ok else None,
        layout=getattr(layout, "value", layout), algorithm=algorithm, choice=choice, needs_grad=needs_grad,
        tokens=tokens, plan=plan if ok else None, backward_plan=backward_plan if ok else None,
        scale=(float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5) if ok else None,
        timeout_s=timeout_s(), key=signature_key(signature), problem=problem,
        error=BackendError if backend_problem else InputError,
    )


def _plans(algorithm: str, layout: str, causal: bool, world_size: int, tokens: Optional[TokenMask],
           needs_grad: bool) -> tuple[Plan, Optional[Plan]]:
    """The forward plan, and the backward plan when ``needs_grad``; built and proven (`tokenring.schedules.build`)."""
    if tokens is not None:
        forward = build_masked_plan(algorithm, tokens)
        return forward, (build_masked_plan(algorithm, tokens, backward=True) if needs_grad else None)
    forward = build_plan(algorithm, Layout(layout), causal, world_size)
    return forward, (build_plan(algorithm, Layout(layout), causal, world_size, backward=True) if needs_grad else None)


def agree(record: CallRecord) -> None:
    """Agree on ``record`` with the other ranks, unless it repeats the call they last agreed on.

    Raises on every rank (`InputError`, or `BackendError` for a backend that
    cannot be used) when any rank has a problem or the ranks' calls differ.
    A rank whose call changes first stops its peers' agreed call with
    markers (`Executor.stop_agreed_call`; docs/design.md, "Agreement").
    """
    executor = record.executor
    agreement = executor.agreement
    if record.problem is None and agreement.covers(record.key):  # the call the ranks last agreed on: no gather
        agreement.skips += 1
        return
    agreement.gathers += 1
    agreed = agreement.agreed
    agreement.forget()  # until this gather succeeds, no call is agreed
    if agreed is not None:  # peers may be running the agreed call: stop them (tokenring/runtime/agreement.py)
        executor.stop_agreed_call(agreed, timeout_s=record.timeout_s)
    gather(executor.comm, record.signature, record.problem, timeout_s=record.timeout_s, error=record.error)
    if record.plan is None or record.shape is None or record.dtype is None:  # gather raises on any problem
        raise TokenRingError("token_ring_attn: the ranks agreed on a call without a plan")
    agreement.remember(executor.comm, record.key, record.plan, record.shape, record.dtype)


def _choose_for(q: Any, k: Any, causal: Any, layout: Any, world_size: int,
                needs_grad: bool) -> tuple[Optional[Choice], Optional[str]]:
    """What "auto" stands for in this call, or (None, the problem) when it cannot choose.

    Inputs that cannot be described (no 4-d tensors, a bad ``causal`` or
    layout) give (None, None): the local checks name what is wrong.
    """
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k)) or not isinstance(causal, bool):
        return None, None
    try:
        layout = Layout(layout).value
    except ValueError:
        return None, None
    try:
        return choose(problem_shape(q, k), causal, layout, world_size, needs_grad), None
    except ValueError as error:  # a bad layout or profile, or no schedule fits this shape
        return None, f"argument 'algorithm': auto: {error}"


_last_choice = threading.local()


def last_choice() -> Optional[Choice]:
    """What the last ``algorithm="auto"`` call on this thread chose, and why (`tokenring.planner.choose.Choice`)."""
    return getattr(_last_choice, "value", None)
