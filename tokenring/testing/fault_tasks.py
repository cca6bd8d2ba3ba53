"""Fault injection: a rank that dies, never calls or is slow, and what every other rank sees.

`call_through_a_fault` runs on every rank of a fresh `LocalWorld` (run with
``allow_exits=True``); the victim fails at the chosen point, the survivors
report what they raised and how long after the faulty call began.
"""

from __future__ import annotations

import os
import signal
import time

import tokenring

from tokenring.tools.problems import Problem
from tokenring.tools.tasks import rank_grad_output, rank_inputs

FAULTS = ("killed-before-first-call", "killed-between-calls", "killed-mid-forward", "killed-mid-backward",
          "never-calls", "slow")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _die_at_block(method: str, block: int) -> None:
    """Make this process die inside its ``block``-th kernel call of ``method`` ("forward" or "backward")."""
    from tokenring.registry import registry

    kernel_type = type(registry.get("cpu").create_kernel())
    original = getattr(kernel_type, method)
    calls = [0]

    def dying(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == block:
            _die()
        return original(self, *args, **kwargs)

    setattr(kernel_type, method, dying)


def call_through_a_fault(rank: int, world_size: int, problem: Problem, victim: int, fault: str,
                         timeout_s: float, slow_s: float = 5.0) -> dict:
    """Forward and backward calls with ``fault`` on rank ``victim``.

    Returns {"outcome": "ok" or the error's class name, "message", "seconds":
    from the start of the call that met the fault to its end}.
    """
    os.environ["TOKENRING_TIMEOUT_S"] = str(timeout_s)
    q, k, v = (t.detach().requires_grad_() for t in rank_inputs(problem, rank, world_size))
    dout = rank_grad_output(problem, rank, world_size)
    kwargs = problem.attention_kwargs()

    def call() -> None:
        out = tokenring.token_ring_attn(q, k, v, **kwargs)
        out.backward(dout)

    me = rank == victim
    if fault == "killed-before-first-call" and me:
        _die()
    if fault == "never-calls" and me:
        return {"outcome": "did not call"}
    if fault == "slow" and me:
        time.sleep(slow_s)
    if fault in ("killed-between-calls", "killed-mid-forward", "killed-mid-backward"):
        call()  # a call every rank makes
        if me and fault == "killed-between-calls":
            _die()
        if me and fault == "killed-mid-forward":
            _die_at_block("forward", 2)
        if me and fault == "killed-mid-backward":
            _die_at_block("backward", 2)
    started = time.monotonic()
    try:
        call()
    except Exception as error:  # what a user's except clause would meet
        return {"outcome": type(error).__name__, "is_ours": isinstance(error, tokenring.TokenRingError),
                "message": str(error), "seconds": time.monotonic() - started}
    return {"outcome": "ok", "seconds": time.monotonic() - started}
