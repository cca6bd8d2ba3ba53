"""The public entry point: `token_ring_attn`."""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from typing import Any

import torch

from .executor import Executor
from .groups import resolve_group
from .interfaces import Backend, BackendError, InputError, TokenRingError
from .layout import Layout, default_layout
from .masks import mask_fingerprint, token_mask_for_call
from .planner import AUTO, Choice, choose
from .plans import build_masked_plan, build_plan
from .registry import registry
from .plancheck import PlanError
from .agreement import agree, call_signature, signature_key
from .compiled import attend, compiled_token_ring_attn, forget_states, use_eager_call
from .executor import problem_shape
from .validation import local_problem, mask_arguments, plan_problem

DEFAULT_TIMEOUT_S = 300.0


def timeout_s() -> float:
    """Seconds any wait may take before it raises; ``TOKENRING_TIMEOUT_S`` overrides."""
    return float(os.environ.get("TOKENRING_TIMEOUT_S", DEFAULT_TIMEOUT_S))


_executors: dict[tuple[str, Any], Executor] = {}
_executors_lock = threading.Lock()


@atexit.register
def _forget_executors() -> None:
    """Drop the cached executors, and with them their comms' process groups, while the interpreter
    still runs: a gloo group freed during interpreter shutdown can abort the process."""
    with _executors_lock:
        _executors.clear()
    forget_states()


def _executor(backend: Backend, group: Any) -> Executor:
    key = (backend.name, group)
    with _executors_lock:
        executor = _executors.get(key)
        if executor is None:
            executor = Executor(backend.create_comm(group), backend.create_kernel())
            _executors[key] = executor
        return executor


def _resolve_backend(backend: str | None, q: Any) -> Backend:
    if backend is not None:
        if not isinstance(backend, str):
            raise BackendError(f"argument 'backend': expected a backend name or None, got {backend!r}")
        return registry.get(backend)
    if not isinstance(q, torch.Tensor):
        raise BackendError(f"argument 'q': expected a torch.Tensor to choose a backend from, got {type(q).__name__}")
    return registry.for_device(q.device.type)


def _open(backend: Backend, group: Any) -> Executor:
    try:
        return _executor(backend, group)
    except TokenRingError:  # already ours and readable: a missing backend, a comm that timed out starting
        raise
    except Exception as error:  # torch's own complaint about the group, made readable
        raise InputError(f"token_ring_attn: argument 'group': {error}") from error


def _backend_and_executor(backend: str | None, q: Any, group: Any) -> tuple[Backend, Executor, str | None]:
    """The backend to run on, an executor to agree with the other ranks, and why not, if so.

    When the requested backend cannot be used on this rank, the rank still
    takes part in the agreement, through the Comm of another backend over the
    same group, so that every rank hears why at once instead of waiting for
    a rank that gave up.
    """
    try:
        chosen = _resolve_backend(backend, q)
        return chosen, _open(chosen, group), None
    except BackendError as error:
        problem = str(error)
    candidates = []
    if isinstance(q, torch.Tensor):
        with contextlib.suppress(BackendError):
            candidates.append(registry.for_device(q.device.type))
    candidates += [e.backend for e in registry.entries() if e.backend is not None and e.available]
    for candidate in candidates:
        with contextlib.suppress(TokenRingError):
            return candidate, _open(candidate, group), problem
    raise BackendError(problem)  # no way to tell the other ranks


def token_ring_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    group: Any = None,
    backend: str | None = None,
    layout: str | None = None,
    algorithm: str = "auto",
    return_lse: bool = False,
    caller_problem: str | None = None,
    cu_seqlens: Any = None,
    window: Any = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over a sequence sharded across the ranks of ``group``.

    Every rank of ``group`` (default: the world group) calls this with its own
    shard: q is (B, S_local, Hq, D), k and v are (B, S_local, Hkv, D), with Hq
    a multiple of Hkv. Shards follow ``layout``: "zigzag" (the default when
    causal) or "contiguous" (the default otherwise); see `tokenring.shard`.

    ``algorithm`` names a registered schedule (`tokenring.schedule_names`):
    ``"tokenring"`` keeps K and V still and moves queries and partial
    results; ``"ring"`` runs the Ring-Attention baseline (K and V travel);
    all run through the same engine. ``"auto"`` (the default) runs the one
    the simulator predicts fastest for this call's shape on the group's
    profile (`tokenring.planner`; ``tokenring calibrate`` writes the profile);
    every rank makes the same choice, and `tokenring.last_choice` tells which.

    Returns out, with q's shape and dtype, or (out, lse) with ``return_lse``,
    lse being (B, Hq, S_local) float32 (float64 for float64 inputs), the
    natural-log normaliser of each query row.

    Differentiable in q, k and v (when the backend declares ``backward``):
    the backward pass runs the same schedule with K and V still kept in
    place. lse is not differentiable. Every rank must run the backward, as it
    ran the forward. Double backward is not supported.

    ``cu_seqlens`` packs documents along the sequence (batch size 1, as in
    flash-attn's varlen functions): ``[0, l1, l1+l2, ..., S]`` over the whole
    global sequence, the same on every rank, int32 or int64 (a CPU tensor or a
    list: it is read on the host). Attention stays within each document, and
    is causal within it with ``causal``. Any lengths work; tokens after the
    last boundary are padding, with out 0 and zero gradients. Shard with
    `tokenring.shard(..., cu_seqlens=cu_seqlens)`: with the zigzag layout
    tokens are placed per document so that every rank gets the same work.
    ``window=(left, right)`` is flash-attn's ``window_size`` in global
    positions: query i sees keys i - left ... i + right (-1: unbounded). Blocks
    and messages that no query needs are not computed and not sent.

    ``caller_problem`` is a wrapper's own reason to refuse this rank's call
    (say, a check of its inputs that token_ring_attn cannot see): every rank
    then raises `tokenring.InputError` naming it and this rank, as for a bad
    argument, without a collective of the wrapper's own.

    Raises `tokenring.InputError` on every rank when any rank's arguments are
    invalid or the ranks disagree, `tokenring.BackendError` when no backend
    fits, and `tokenring.CommTimeout` when a peer stops answering.
    """
    # -- torch.compile route (tokenring/compiled.py): checks, agreement and attention as custom ops --
    if torch.compiler.is_dynamo_compiling():  # Dynamo is tracing this call
        if cu_seqlens is not None or window is not None:
            raise InputError("tokenring.token_ring_attn: cu_seqlens and window are not supported under "
                             "torch.compile yet; call it outside the compiled region (torch.compiler.disable)")
        return compiled_token_ring_attn(q, k, v, causal=causal, softmax_scale=softmax_scale, group=group,
                                        backend=backend, layout=layout, algorithm=algorithm, return_lse=return_lse,
                                        caller_problem=caller_problem)
    # -- end of the torch.compile route --
    group = resolve_group(group)  # a DeviceMesh: its context-parallel group
    chosen, executor, backend_problem = _backend_and_executor(backend, q, group)
    comm = executor.comm
    if layout is None:
        layout = default_layout(causal)
    grad_inputs = [name for name, t in (("q", q), ("k", k), ("v", v)) if getattr(t, "requires_grad", False)]
    needs_grad = torch.is_grad_enabled() and bool(grad_inputs)
    signed_algorithm = algorithm
    auto_problem = None
    if algorithm == AUTO:
        algorithm, auto_problem = _resolve_auto(q, k, causal, layout, comm.world_size, needs_grad, executor)
        signed_algorithm = f"auto -> {algorithm}"
    problem = backend_problem or caller_problem or auto_problem or local_problem(
        q, k, v, causal=causal, softmax_scale=softmax_scale, layout=layout, algorithm=algorithm, backend=chosen,
        documents=cu_seqlens is not None,
    )
    if problem is None and needs_grad and not chosen.capabilities.backward:
        problem = f"argument '{grad_inputs[0]}': requires grad, but backend {chosen.name!r} has no backward pass"
    max_world_size = chosen.capabilities.max_world_size
    if problem is None and max_world_size is not None and comm.world_size > max_world_size:
        problem = (
            f"argument 'group': backend {chosen.name!r} supports at most {max_world_size} ranks, "
            f"got {comm.world_size}"
        )
    boundaries = masked_window = None
    if problem is None:
        boundaries, masked_window, problem = mask_arguments(cu_seqlens, window, q, comm.world_size, chosen)
    plan = backward_plan = None
    if problem is None:
        try:
            if boundaries is not None or masked_window is not None:
                tokens = token_mask_for_call(q.shape[1] * comm.world_size, comm.world_size, Layout(layout).value,
                                             causal, masked_window, boundaries)
                plan = build_masked_plan(algorithm, tokens)
                if needs_grad:
                    backward_plan = build_masked_plan(algorithm, tokens, backward=True)
            else:
                plan = build_plan(algorithm, Layout(layout), causal, comm.world_size)
                if needs_grad:
                    backward_plan = build_plan(algorithm, Layout(layout), causal, comm.world_size, backward=True)
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
    key = signature_key(signature)
    wait_s = timeout_s()
    agreement = executor.agreement
    if problem is None and agreement.covers(key):  # the call the ranks last agreed on: no gather
        agreement.skips += 1
    else:
        agreement.gathers += 1
        agreed = agreement.agreed
        agreement.forget()  # until this gather succeeds, no call is agreed
        if agreed is not None:  # peers may be running the agreed call: stop them (tokenring/agreement.py)
            executor.stop_agreed_call(agreed, timeout_s=wait_s)
        agree(comm, signature, problem, timeout_s=wait_s, error=BackendError if backend_problem else InputError)
        assert plan is not None
        agreement.remember(comm, key, plan, problem_shape(q, k), q.dtype)

    assert plan is not None
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    # -- the custom op tokenring::attention (tokenring/compiled.py) runs the agreed call --
    out, lse = attend(q, k, v, executor, plan, backward_plan, scale=scale, wait_s=wait_s, signature=key)
    # -- end of the custom op route --
    return (out, lse) if return_lse else out


def _resolve_auto(q, k, causal, layout, world_size: int, needs_grad: bool, executor) -> tuple[str, str | None]:
    """The schedule "auto" stands for in this call, or a stand-in and the problem when it cannot choose."""
    fallback = "tokenring"  # only ever run with a problem: local checks name what is wrong first
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k)) or not isinstance(causal, bool):
        return fallback, None
    try:
        layout = Layout(layout).value
    except ValueError:
        return fallback, None
    try:
        shape = problem_shape(q, k)
        choice = choose(shape, causal, layout, world_size, needs_grad)
    except ValueError as error:  # a bad layout or profile, or no schedule fits this shape
        return fallback, f"argument 'algorithm': auto: {error}"
    executor.auto_choice = choice
    _last_choice.value = choice
    return choice.algorithm, None


_last_choice = threading.local()


def last_choice() -> "Choice | None":
    """What the last ``algorithm="auto"`` call on this thread chose, and why (`tokenring.planner.Choice`)."""
    return getattr(_last_choice, "value", None)


use_eager_call(token_ring_attn)  # the custom operators sit below this API and call back into it
