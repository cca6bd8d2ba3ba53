"""Agreement across ranks: gathered once per call signature, and how a rank that changes is still caught.

Every rank of a group must make the same call (shapes, dtype, causal,
layout, algorithm, scale, whether a gradient is wanted). The first call with
a signature gathers every rank's description of its call (`gather`); calls
that repeat the signature the group last agreed on skip that gather and go
straight to the plan's own messages (`tokenring.call.agree` decides which,
from the call's record).

A rank whose call differs from the agreed one (or whose input is bad) cannot
just gather: the others are already in the plan, waiting on its messages.
So it first *plays the agreed plan with markers*: it posts every receive the
agreed plan gives it (buffers of the agreed sizes, so whatever its peers send
fits) and sends, in place of every message, a short `MARKER`. A rank that
receives a marker stops computing, sends markers for the rest of the plan
and receives what is still addressed to it, and then joins the gather. The
agreed plan must carry a marker from any one rank to every rank before it
ends (`markers_reach_everyone`); ring and TokenRing plans do, in N - 1 steps.
Then every rank is in the gather, which names the rank and the argument that
differ, and every rank raises. No rank waits for a message that never comes.

This needs a transport that completes a receive with a message shorter than
its buffer (`Comm.accepts_short_messages`, true for gloo) and received bytes
the host can read without a device sync (a CPU Comm). Other Comms gather on
every call, as before (docs/design.md, "Agreement").
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from tokenring.interfaces import Backend, BackendError, Comm, InputError, TokenRingError
from tokenring.plan.model import Plan, ProblemShape

_API = "token_ring_attn"

# All-ones bytes are a NaN in every float format, so no finite message starts so.
MARKER = bytes([0xFF] * 8) + b"TRabort!"


class PeerAborted(TokenRingError):
    """A peer sent a marker instead of its message: the call differs from the one agreed."""

    def __init__(self, rank: int, peer: int, step: int) -> None:
        super().__init__(
            f"{_API} on rank {rank}: rank {peer} stopped the call at step {step} because its arguments differ "
            "from the ones the ranks agreed on before, or it rejected its input"
        )
        self.peer, self.step = peer, step


def marker_tensor(device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(MARKER), dtype=torch.uint8).to(device)


def is_marker(buffer: torch.Tensor) -> bool:
    """Whether a received CPU buffer starts with the marker; reads the bytes without a device op."""
    head = buffer.reshape(-1).view(torch.uint8)[: len(MARKER)]
    return head.numpy().tobytes() == MARKER


def markers_readable(comm: Comm) -> bool:
    """Whether a marker can stand in for a message on ``comm`` and be found without a device sync."""
    return getattr(comm, "accepts_short_messages", False) and comm.device.type == "cpu"


def markers_reach_everyone(plan: Plan) -> bool:
    """Whether markers sent by any one rank from step 0 on reach every rank before the plan ends.

    A rank that received a marker at a step sends markers from the next step on.
    """
    for first in range(plan.world_size):
        stopped = {first: -1}  # rank -> the step after which it sends markers
        for step in plan.steps:
            for t in step.transfers:
                if stopped.get(t.src, step.index) < step.index and t.dst not in stopped:
                    stopped[t.dst] = step.index
        if len(stopped) < plan.world_size:
            return False
    return True


@dataclass(frozen=True)
class AgreedCall:
    """The call the ranks of a group last agreed on: enough to play its plan with markers."""

    key: str
    plan: Plan
    shape: ProblemShape
    dtype: torch.dtype


class Agreement:
    """One group's agreement state, kept beside its executor; the counters are for tests and users."""

    def __init__(self) -> None:
        self.agreed: AgreedCall | None = None
        self.gathers = 0  # calls that gathered every rank's signature
        self.skips = 0    # calls that repeated the agreed signature and skipped the gather

    def covers(self, key: str) -> bool:
        return self.agreed is not None and self.agreed.key == key

    def remember(self, comm: Comm, key: str, plan: Plan, shape: ProblemShape, dtype: torch.dtype) -> None:
        """After a successful gather: skip the next ones for ``key`` when a change can still be caught."""
        smallest = min((shape.payload_bytes(t.payload, t.span) for _, t in plan.transfers()), default=0)
        catchable = comm.world_size == 1 or (  # alone, nobody else can differ
            markers_readable(comm) and smallest >= len(MARKER) and markers_reach_everyone(plan)
        )
        self.agreed = AgreedCall(key, plan, shape, dtype) if catchable else None

    def forget(self) -> None:
        self.agreed = None


def signature_key(signature: dict) -> str:
    return json.dumps(signature)  # insertion order: call_signature fixes it, and error messages follow it


def call_signature(q, k, v, *, causal, softmax_scale, layout, algorithm, backend: Backend, needs_grad: bool) -> dict:
    """What every rank must agree on, as JSON-friendly values."""
    def shape(t):
        return list(t.shape) if isinstance(t, torch.Tensor) else None

    return {
        "shape of argument 'q'": shape(q),
        "shape of argument 'k'": shape(k),
        "shape of argument 'v'": shape(v),
        "dtype of argument 'q'": str(q.dtype) if isinstance(q, torch.Tensor) else None,
        "argument 'causal'": causal if isinstance(causal, bool) else repr(causal),
        "argument 'softmax_scale'": (
            softmax_scale if isinstance(softmax_scale, (int, float, type(None))) else repr(softmax_scale)
        ),
        "argument 'layout'": str(getattr(layout, "value", layout)),
        "argument 'algorithm'": str(getattr(algorithm, "value", algorithm)),
        "argument 'backend'": backend.name,
        "whether q, k or v require grad": needs_grad,
    }


def gather(
    comm: Comm, signature: dict, problem: str | None, *, timeout_s: float, error: type[Exception] = InputError,
    stopped_by: PeerAborted | None = None,
) -> None:
    """Gather every rank's call; raise on every rank if any rank is wrong or the ranks differ.

    A rank's ``problem`` is raised as ``error`` on that rank and as the same
    error type on every other rank; disagreement raises InputError. A rank
    that joins because a peer stopped the call (``stopped_by``) raises even
    when the gather shows nothing wrong.
    """
    rank = comm.rank
    payload = json.dumps({"signature": signature, "problem": problem, "error": error.__name__}).encode()
    if comm.world_size == 1:
        everyone = [payload]
    else:
        everyone = comm.all_gather_bytes(payload, timeout_s=timeout_s)
    calls = [json.loads(p) for p in everyone]
    if problem is not None:
        raise error(f"{_API} on rank {rank}: {problem}")
    for other, call in enumerate(calls):
        if call["problem"] is not None:
            their_error = BackendError if call["error"] == BackendError.__name__ else InputError
            raise their_error(
                f"{_API} on rank {rank}: cannot run because rank {other} rejected its input: "
                f"{_API} on rank {other}: {call['problem']}"
            )
    for field in signature:
        values = [call["signature"].get(field) for call in calls]
        if any(value != values[0] for value in values):
            listing = ", ".join(f"rank {r} has {value!r}" for r, value in enumerate(values))
            raise InputError(
                f"{_API} on rank {rank}: {field} differs across ranks ({listing}); "
                "every rank must pass the same"
            )
    if stopped_by is not None:
        raise stopped_by
