"""Random attention problems and how to judge an answer against float64."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from tokenring.interfaces import LinkTraffic, accumulation_dtype
from tokenring.placement.layout import default_layout
from tokenring.plan.model import ProblemShape
from tokenring.schedules.build import build_plan
from tokenring.reference import reference_attention

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

GRADIENTS = ("dq", "dk", "dv")

# Relative error ‖out − ref‖ / ‖ref‖ allowed per input dtype.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 2e-2,
}

# ... and for the gradients, which pass through one more kernel and merge.
GRAD_TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 3e-2,
    torch.float16: 3e-2,
}


@dataclass(frozen=True)
class Problem:
    """A full-sequence attention problem; every rank rebuilds it from the seed."""

    seed: int
    batch: int = 2
    seq_len: int = 64          # the full sequence, all ranks together
    q_heads: int = 4
    kv_heads: int = 4
    head_dim: int = 32
    dtype: str = "float32"
    causal: bool = False
    layout: str | None = None  # None: the API default for `causal`
    algorithm: str = "tokenring"
    softmax_scale: float | None = None
    backend: str | None = None  # None: chosen from the tensors' device (the CPU)
    cu_seqlens: tuple[int, ...] | None = None  # packed documents (batch 1); see token_ring_attn
    window: tuple[int, int] | None = None      # sliding window (left, right), -1 unbounded

    def __post_init__(self) -> None:
        # JSON brings these back as lists; plans are cached by them, so keep them hashable.
        if self.cu_seqlens is not None:
            object.__setattr__(self, "cu_seqlens", tuple(int(b) for b in self.cu_seqlens))
        if self.window is not None:
            object.__setattr__(self, "window", tuple(int(w) for w in self.window))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def resolved_layout(self) -> str:
        return self.layout or default_layout(self.causal)

    def attention_kwargs(self) -> dict:
        """The keyword arguments of token_ring_attn for this problem."""
        return {
            "causal": self.causal,
            "softmax_scale": self.softmax_scale,
            "backend": self.backend,
            "layout": self.layout,
            "algorithm": self.algorithm,
            **self.mask_kwargs(),
        }

    def mask_kwargs(self) -> dict:
        """cu_seqlens and window, only when set (callers that predate them keep working)."""
        extra: dict = {}
        if self.cu_seqlens is not None:
            extra["cu_seqlens"] = torch.tensor(self.cu_seqlens, dtype=torch.int32)
        if self.window is not None:
            extra["window"] = self.window
        return extra

    def shard(self, x: torch.Tensor, rank: int, world_size: int, dim: int = 1) -> torch.Tensor:
        from tokenring.placement.layout import shard

        return shard(x, rank, world_size, layout=self.resolved_layout, dim=dim, cu_seqlens=self.cu_seqlens)

    def unshard(self, parts, dim: int = 1) -> torch.Tensor:
        from tokenring.placement.layout import unshard

        return unshard(parts, layout=self.resolved_layout, dim=dim, cu_seqlens=self.cu_seqlens)

    def resolved_algorithm(self, world_size: int, needs_grad: bool = False) -> str:
        """The schedule token_ring_attn runs: ``algorithm``, or what "auto" chooses on this machine's profile."""
        from tokenring.planner.choose import AUTO, choose

        if self.algorithm != AUTO:
            return self.algorithm
        return choose(self.shape(world_size), self.causal, self.resolved_layout, world_size, needs_grad).algorithm

    def plan(self, world_size: int, backward: bool = False, needs_grad: bool | None = None):
        """The plan token_ring_attn runs for this problem on ``world_size`` ranks.

        ``needs_grad`` (default: ``backward``) is whether the call computes
        gradients, which "auto" weighs in its choice.
        """
        algorithm = self.resolved_algorithm(world_size, needs_grad=backward if needs_grad is None else needs_grad)
        if self.cu_seqlens is None and self.window is None:
            return build_plan(algorithm, self.resolved_layout, self.causal, world_size, backward=backward)
        from tokenring.placement.masks import token_mask_for_call
        from tokenring.schedules.build import build_masked_plan

        window = None if self.window in (None, (-1, -1)) else tuple(self.window)
        tokens = token_mask_for_call(self.seq_len, world_size, self.resolved_layout, self.causal, window,
                                     self.cu_seqlens)
        return build_masked_plan(algorithm, tokens, backward=backward)

    def device(self, rank: int) -> torch.device:
        """Where rank ``rank`` keeps its tensors: its backend's device."""
        if self.backend is None:
            return torch.device("cpu")
        from tokenring.registry import registry

        return registry.get(self.backend).device(rank)

    def with_(self, **changes) -> "Problem":
        return replace(self, **changes)

    def to_json(self) -> dict:
        return asdict(self)

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fresh standard-normal q, k, v of the full sequence, cast to the dtype."""
        gen = torch.Generator().manual_seed(self.seed)
        shapes = [
            (self.batch, self.seq_len, self.q_heads, self.head_dim),
            (self.batch, self.seq_len, self.kv_heads, self.head_dim),
            (self.batch, self.seq_len, self.kv_heads, self.head_dim),
        ]
        return tuple(torch.randn(s, generator=gen, dtype=torch.float64).to(self.torch_dtype) for s in shapes)

    def shape(self, world_size: int) -> ProblemShape:
        """Per-rank sizes of this problem split over ``world_size`` ranks."""
        return ProblemShape(
            batch=self.batch,
            seq_local=self.seq_len // world_size,
            q_heads=self.q_heads,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            itemsize=self.torch_dtype.itemsize,
            acc_itemsize=accumulation_dtype(self.torch_dtype).itemsize,
        )

    def planned_link_bytes(self, world_size: int, needs_grad: bool = False) -> list[LinkTraffic]:
        return self.plan(world_size, needs_grad=needs_grad).link_bytes(self.shape(world_size))

    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = self.inputs()
        return reference_attention(q, k, v, causal=self.causal, softmax_scale=self.softmax_scale,
                                   cu_seqlens=self.cu_seqlens, window=self.window)

    def grad_output(self) -> torch.Tensor:
        """A fresh random gradient of the full-sequence output, in the dtype."""
        gen = torch.Generator().manual_seed(self.seed + 1)
        shape = (self.batch, self.seq_len, self.q_heads, self.head_dim)
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(self.torch_dtype)

    def reference_grads(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dq, dk, dv) of the full sequence in float64 by autograd, for `grad_output`."""
        q, k, v = (t.to(torch.float64).requires_grad_() for t in self.inputs())
        out, _ = reference_attention(q, k, v, causal=self.causal, softmax_scale=self.softmax_scale,
                                     cu_seqlens=self.cu_seqlens, window=self.window)
        return torch.autograd.grad(out, (q, k, v), self.grad_output().to(torch.float64))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64; inf when got has NaN or inf where want is finite."""
    got64, want64 = got.detach().to(torch.float64), want.detach().to(torch.float64)
    if got64.shape != want64.shape:
        raise AssertionError(f"shape {tuple(got64.shape)} != expected {tuple(want64.shape)}")
    finite = torch.isfinite(want64)
    if not torch.equal(torch.isfinite(got64), finite) or not torch.equal(got64[~finite], want64[~finite]):
        return math.inf
    diff = torch.linalg.vector_norm(got64[finite] - want64[finite]).item()
    norm = torch.linalg.vector_norm(want64[finite]).item()
    return diff / norm if norm > 0 else diff


def fitting_seq_local(wanted: int, algorithm: str, causal: bool, world_size: int) -> int:
    """``wanted`` rows per rank, or the least multiple of it that the schedule's pieces divide."""
    plan = build_plan(algorithm, default_layout(causal), causal, world_size)
    return math.lcm(wanted, plan.granularity)
