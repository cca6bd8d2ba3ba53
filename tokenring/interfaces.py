"""The contracts between the scheduler and a backend.

The scheduler (plans, executor, public API) is written against these classes
only; it never imports a vendor library. A backend supplies one `Comm` per
process group, one `AttentionKernel`, and a `Backend` record that says whether
it can run here and what it supports.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of lse, of merges and of gradient sums for inputs of ``dtype``.

    float32, except float64 for float64 inputs, so that float64 runs (and
    gradcheck) stay exact to float64 rounding.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


class Mask(str, enum.Enum):
    """The mask a kernel applies to one block.

    ``CAUSAL`` is aligned to the bottom-right corner of the block (query i of
    Sq sees key j of Sk when ``j <= i + Sk - Sq``), as flash-attn does. On the
    square diagonal blocks the scheduler uses, this is the same as top-left
    alignment: a token sees itself and the earlier tokens of the block.
    """

    NONE = "none"
    CAUSAL = "causal"
    TOKENS = "tokens"  # from the tokens' global positions and documents: the kernel gets a `PositionMask`


@dataclass(frozen=True, eq=False)
class PositionMask:
    """The mask of one block from its tokens: query i sees key j when

    ``q_documents[i] == k_documents[j] >= 0``, ``k_positions[j] <= q_positions[i]``
    when ``causal``, and ``q_positions[i] - left <= k_positions[j] <= q_positions[i] + right``
    for ``window = (left, right)`` (-1: unbounded on that side; flash-attn's
    ``window_size``). Positions are global token positions, increasing along
    each side's rows; document -1 is padding, which sees and is seen by nothing.
    Kernels of backends that declare ``varlen`` (and ``window`` for a window)
    receive one as ``mask`` for blocks the plan marks `Mask.TOKENS`; a row
    that sees no key has out 0 and lse -inf, as always.
    """

    q_positions: torch.Tensor  # (Sq,) int64
    k_positions: torch.Tensor  # (Sk,) int64
    q_documents: torch.Tensor  # (Sq,) int64
    k_documents: torch.Tensor  # (Sk,) int64
    causal: bool
    window: tuple[int, int] | None = None


class Channel(str, enum.Enum):
    """Independent message streams: traffic on one never waits behind the other."""

    QUERY = "query"        # travelling queries (TokenRing) or keys/values (Ring)
    PARTIAL = "partial"    # partial results on their way back to the query's owner


@dataclass(frozen=True)
class Capabilities:
    """What a backend supports. Conservative defaults: declare what you test.

    The core checks these before doing any work and raises a readable error
    naming the backend and the missing capability.
    """

    dtypes: frozenset[torch.dtype] = frozenset({torch.float32})
    head_dims: tuple[int, ...] | None = (64, 128)  # None: any head dim
    gqa: bool = False              # Hq a multiple of Hkv > 1 handled by the kernel
    causal: bool = False
    backward: bool = False
    max_world_size: int | None = None
    max_q_heads: int | None = None  # most query heads one kernel call takes (None: no limit)
    varlen: bool = False           # kernels take a `PositionMask` (packed documents, padding)
    window: bool = False           # ... with a sliding window

    def to_json(self) -> dict[str, Any]:
        return {
            "dtypes": sorted(str(d).removeprefix("torch.") for d in self.dtypes),
            "head_dims": None if self.head_dims is None else list(self.head_dims),
            "gqa": self.gqa,
            "causal": self.causal,
            "backward": self.backward,
            "max_world_size": self.max_world_size,
            "max_q_heads": self.max_q_heads,
            "varlen": self.varlen,
            "window": self.window,
        }


@dataclass(frozen=True)
class Probe:
    """Answer of `Backend.probe`: can this backend run on this machine?"""

    available: bool
    reason: str = ""
    details: dict[str, str] = field(default_factory=dict)  # e.g. {"kernel": "flash-attn 2.7"}


class AttentionKernel(abc.ABC):
    """Attention on one block of queries against one block of keys/values.

    Layout is (B, S, H, D) for q, k, v and out. ``lse`` is (B, Hq, Sq), the
    natural-log sum of exponentials of the scaled scores of each query row, in
    `accumulation_dtype` (float32; float64 when the inputs are float64). A row with no visible key
    has out 0 and lse -inf, never NaN. Hq is a multiple of Hkv; query head h
    attends with key/value head ``h // (Hq // Hkv)``.
    """

    @abc.abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        mask: "Mask | PositionMask",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (out, lse); out has q's shape and dtype."""

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        *,
        scale: float,
        mask: "Mask | PositionMask",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients (dq, dk, dv) of one block, in the dtypes of q, k and v.

        ``out`` and ``lse`` are the *final* output and log-sum-exp of these
        query rows over all keys (not this block's), so that the block's
        probabilities are exp(scores - lse) and delta = rowsum(dout * out).
        dk and dv are summed over each group of query heads (GQA). A row with
        lse = -inf (it saw no key anywhere) gets zero gradients, never NaN.
        Backends that declare ``Capabilities.backward`` implement this.
        """
        raise NotImplementedError(f"{type(self).__name__} has no block backward")


@dataclass(frozen=True)
class Send:
    peer: int            # rank within the Comm's group
    tensor: torch.Tensor


@dataclass(frozen=True)
class Recv:
    peer: int
    tensor: torch.Tensor  # filled in place once the handle completes


class Handle(abc.ABC):
    """Completion of a batch of point-to-point operations."""

    @abc.abstractmethod
    def wait(self, timeout_s: float) -> None:
        """Block until every operation of the batch is complete.

        Raise `CommTimeout` (naming the rank and step) when ``timeout_s``
        passes first, and the transport's own error when a peer fails.

        A backend whose transport orders device streams (NCCL, HCCL) may
        instead make the current stream wait for the batch, so that the host
        never blocks inside the step loop, and leave timeouts to its
        transport's watchdog; it must then document how a timeout surfaces.
        """


@dataclass(frozen=True)
class LinkTraffic:
    """Bytes that moved over one directed link during one step."""

    step: int
    src: int
    dst: int
    bytes: int

    def to_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class Comm(abc.ABC):
    """Point-to-point messaging among the ranks of one process group.

    Implementations must count the bytes they actually hand to the transport
    by calling `_record_sent` from their send path.
    """

    rank: int
    world_size: int
    device: torch.device
    # Whether a receive completes with a message shorter than its buffer, filling the buffer's start.
    # With it (and host buffers) the agreement gathers once per call signature, not on every call:
    # a rank whose call changed stops its peers with short markers (tokenring.runtime.agreement).
    accepts_short_messages: bool = False

    def __init__(self) -> None:
        self.sent: list[LinkTraffic] = []

    @abc.abstractmethod
    def exchange(
        self,
        sends: Sequence[Send],
        recvs: Sequence[Recv],
        *,
        channel: Channel,
        step: int,
    ) -> Handle:
        """Post a batch of sends and receives; return at once.

        Messages on different channels may be in flight together. Several
        messages between the same pair on the same channel and step are
        delivered in the order they appear in the batch.
        """

    @abc.abstractmethod
    def all_gather_bytes(self, payload: bytes, *, timeout_s: float) -> list[bytes]:
        """Every rank contributes a small byte string; return all, in rank order.

        Used for cheap agreement checks before any point-to-point traffic.
        Must raise (not hang) if a rank does not take part within ``timeout_s``.
        """

    def _record_sent(self, step: int, dst: int, nbytes: int) -> None:
        self.sent.append(LinkTraffic(step, self.rank, dst, nbytes))


class Backend(abc.ABC):
    """A device family: how to talk between ranks and how to compute a block.

    Subclasses set the class attributes and implement the three methods.
    ``probe`` must be cheap and must not raise: a missing library or device
    is an answer (``Probe(False, reason)``), not an exception.
    """

    name: str = ""
    device_type: str = ""          # torch device type this backend serves
    capabilities: Capabilities = Capabilities()
    # The torch.distributed backend that local worlds (CLI, conformance suite)
    # start this backend's ranks with: "gloo", "nccl", "hccl", ...
    distributed_backend: str = "gloo"

    @abc.abstractmethod
    def probe(self) -> Probe:
        ...

    @abc.abstractmethod
    def create_comm(self, group: Any) -> Comm:
        """A Comm over ``group`` (a torch.distributed group; None = world)."""

    @abc.abstractmethod
    def create_kernel(self) -> AttentionKernel:
        ...

    def device(self, local_rank: int) -> torch.device:
        """The device a process with this node-local rank keeps its tensors on.

        Test harnesses and the CLI call it to place each rank's inputs. The
        default is ``device_type:local_rank``; a backend whose devices are
        numbered otherwise (or not at all, like the CPU) overrides it.
        """
        return torch.device(self.device_type, local_rank)

    def device_count(self) -> int | None:
        """How many ranks one machine can host with this backend; None: no fixed limit.

        The conformance suite skips world sizes above it (NCCL, for one,
        cannot put two ranks on one GPU).
        """
        return None

    def prepare_process(self, local_rank: int) -> None:
        """Called in each local rank's process before its process group starts.

        A backend whose transport must know the device first (NCCL needs
        ``torch.cuda.set_device``) does that here. The default does nothing.
        """


class TokenRingError(RuntimeError):
    """Base of the errors TokenRing raises itself."""


class InputError(TokenRingError, ValueError):
    """Arguments that cannot be computed on, on this rank or another."""


class BackendError(TokenRingError):
    """No usable backend: unknown name, unavailable, or missing a capability."""


class CommTimeout(TokenRingError, TimeoutError):
    """A peer did not answer in time."""
