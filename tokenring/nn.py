"""Sequence-parallel attention for transformer blocks: a module and its functional form.

`TokenRingAttention` replaces the attention module of a Llama-style block. It
takes this rank's shard of the hidden states (B, S_local, hidden), sharded
along the sequence with the layout the attention uses (zigzag for causal,
contiguous otherwise, unless told), and returns this rank's shard of the
output. Its parameters are named like Hugging Face Llama's (``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``), so a single-process attention module's
``state_dict`` loads into it.

Rotary position embeddings are applied at each token's TRUE position in the
full sequence. In the zigzag layout a rank holds two chunks that are far
apart, so positions 0 … S_local-1 would be wrong on every rank; the module
computes the right ones from its rank and layout when it is not given them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenring.api import token_ring_attn
from tokenring.runtime.groups import resolve_group
from tokenring.inference import attend_with_cache
from tokenring.placement.layout import default_layout, parse_layout
from tokenring.sequence import local_positions, rank_and_world_size

__all__ = ["TokenRingAttention", "apply_rotary", "token_ring_attention"]

DEFAULT_ROPE_BASE = 10000.0


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, position_ids: torch.Tensor, *, base: float = DEFAULT_ROPE_BASE) -> torch.Tensor:
    """Rotary position embedding of ``x`` (B, S, H, D) at ``position_ids`` ((S,) or (B, S)).

    The "rotate half" convention of Llama in Hugging Face transformers (pairs
    dimension i with i + D/2). Angles are computed in float32 (float64 for
    float64 inputs), as transformers does; in float32 the angle of position p
    is off by about p·6e-8 radians (0.06 at a million tokens).
    """
    if x.dim() != 4:
        raise ValueError(f"argument 'x': expected (B, S, H, D), got shape {tuple(x.shape)}")
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"argument 'x': rotary embedding needs an even head dim, got {head_dim}")
    if position_ids.shape not in ((x.shape[1],), (x.shape[0], x.shape[1])):
        raise ValueError(
            f"argument 'position_ids': expected shape ({x.shape[1]},) or ({x.shape[0]}, {x.shape[1]}) "
            f"to match x's (B, S), got {tuple(position_ids.shape)}"
        )
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    exponents = torch.arange(0, head_dim, 2, device=x.device, dtype=compute) / head_dim
    inverse_frequencies = 1.0 / (base ** exponents)
    angles = position_ids.to(device=x.device, dtype=compute)[..., None] * inverse_frequencies
    angles = torch.cat((angles, angles), dim=-1).unsqueeze(-2)  # (…, S, 1, D): one angle per head
    x_wide = x.to(compute)
    return (x_wide * angles.cos() + _rotate_half(x_wide) * angles.sin()).to(x.dtype)


def token_ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    position_ids: torch.Tensor | None = None,
    rope_base: float | None = DEFAULT_ROPE_BASE,
    softmax_scale: float | None = None,
    group: Any = None,
    layout: str | None = None,
    algorithm: str = "auto",
    backend: str | None = None,
) -> torch.Tensor:
    """Rotary embedding at the true positions, then exact attention over the sharded sequence.

    q (B, S_local, Hq, D), k and v (B, S_local, Hkv, D), Hq a multiple of Hkv
    (GQA). ``position_ids`` ((S_local,) or (B, S_local)) are the tokens' true
    positions; None computes them from this rank's place in ``group`` and the
    layout. ``rope_base=None`` applies no rotary embedding. The other
    arguments are `tokenring.token_ring_attn`'s. Returns (B, S_local, Hq, D).
    """
    group = resolve_group(group)  # a DeviceMesh: its context-parallel group
    if layout is None:
        layout = default_layout(causal)
    if rope_base is not None:
        if position_ids is None:
            rank, world_size = rank_and_world_size(group)
            position_ids = local_positions(q.shape[1] * world_size, rank=rank, world_size=world_size,
                                           layout=layout, device=q.device)
        q = apply_rotary(q, position_ids, base=rope_base)
        k = apply_rotary(k, position_ids, base=rope_base)
    return token_ring_attn(q, k, v, causal=causal, softmax_scale=softmax_scale, group=group, backend=backend,
                           layout=layout, algorithm=algorithm)


class TokenRingAttention(nn.Module):
    """Multi-head (GQA) self-attention over a sequence sharded across ranks, with rotary embeddings.

    Args:
        hidden_size: width of the hidden states.
        num_heads: query heads.
        causal: whether a token sees only itself and earlier tokens (keyword, required).
        num_kv_heads: key/value heads; ``num_heads`` must be a multiple (default: ``num_heads``).
        head_dim: default ``hidden_size // num_heads``.
        rope_base: rotary base (Llama's "rope_theta"); None for no rotary embedding.
        bias: whether the projections have biases.
        group, layout, algorithm, backend, softmax_scale: as for `tokenring.token_ring_attn`.

    ``forward(hidden_states, position_ids=None)``: hidden_states is this
    rank's shard (B, S_local, hidden_size); position_ids, the true positions
    of its tokens ((S_local,) or (B, S_local)), are computed from the rank
    and layout when None. Returns this rank's shard of the output, the shape
    of hidden_states.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        causal: bool,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        rope_base: float | None = DEFAULT_ROPE_BASE,
        bias: bool = False,
        softmax_scale: float | None = None,
        group: Any = None,
        layout: str | None = None,
        algorithm: str = "auto",
        backend: str | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(
                f"argument 'num_heads': expected a positive multiple of num_kv_heads = {num_kv_heads}, got {num_heads}"
            )
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(
                    f"argument 'hidden_size': {hidden_size} is not a multiple of num_heads = {num_heads}; pass head_dim"
                )
            head_dim = hidden_size // num_heads
        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = hidden_size, num_heads, num_kv_heads, head_dim
        self.causal = bool(causal)
        self.layout = parse_layout(layout if layout is not None else default_layout(self.causal)).value
        self.rope_base, self.softmax_scale = rope_base, softmax_scale
        self.group, self.algorithm, self.backend = group, algorithm, backend
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **factory)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias, **factory)

    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor | None = None, *,
                cache: Any = None, layer: int | None = None) -> torch.Tensor:
        """With ``cache`` (a `tokenring.inference.ShardedKVCache`) the rows are the current chunk's new
        tokens on this rank (`Chunk.shard`; decode: the new token on every rank): their keys/values go into
        ``layer`` of the cache and they attend causally to everything cached. ``position_ids`` default to
        the chunk's positions."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"argument 'hidden_states': expected (B, S_local, {self.hidden_size}), got shape "
                f"{tuple(hidden_states.shape)}"
            )
        batch, seq, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, seq, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(batch, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(batch, seq, self.num_kv_heads, self.head_dim)
        if cache is not None:
            out = self._attend_with_cache(q, k, v, position_ids, cache, layer)
            return self.o_proj(out.reshape(batch, seq, self.num_heads * self.head_dim))
        out = token_ring_attention(
            q, k, v, causal=self.causal, position_ids=position_ids, rope_base=self.rope_base,
            softmax_scale=self.softmax_scale, group=self.group, layout=self.layout, algorithm=self.algorithm,
            backend=self.backend,
        )
        return self.o_proj(out.reshape(batch, seq, self.num_heads * self.head_dim))

    def _attend_with_cache(self, q, k, v, position_ids, cache, layer) -> torch.Tensor:
        if not self.causal:
            raise ValueError("a KV cache needs causal attention (TokenRingAttention(causal=True))")
        if layer is None:
            raise ValueError("argument 'layer': required with a cache (which of its layers this module is)")
        if self.rope_base is not None:
            if position_ids is None:
                position_ids = cache.chunk.positions(device=q.device)
            q = apply_rotary(q, position_ids, base=self.rope_base)
            k = apply_rotary(k, position_ids, base=self.rope_base)
        return attend_with_cache(q, k, v, cache, layer=layer, algorithm=self.algorithm,
                                 softmax_scale=self.softmax_scale)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, causal={self.causal}, layout={self.layout!r}, rope_base={self.rope_base}, "
            f"algorithm={self.algorithm!r}"
        )
