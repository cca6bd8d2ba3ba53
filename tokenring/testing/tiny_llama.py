"""A small Llama-style decoder from plain torch modules: the single-process reference for sequence parallelism.

Random weights from a fixed seed, nothing downloaded. Its attention is plain
torch (scaled_dot_product_attention on the whole sequence, rotary embedding
written out here independently of `tokenring.nn`), so comparing it with the
same model whose attention modules are `tokenring.nn.TokenRingAttention`
checks the sequence-parallel path end to end: sharding, true positions,
rotary, GQA, the loss at shard boundaries and the gradient sum.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TinyLlamaConfig:
    vocab_size: int = 96
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 64
    rope_base: float = 10000.0
    rms_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class PlainAttention(nn.Module):
    """Causal GQA self-attention on the whole sequence, one process; parameter names as Llama's."""

    def __init__(self, config: TinyLlamaConfig) -> None:
        super().__init__()
        self.config = config
        d = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * d, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(config.num_heads * d, config.hidden_size, bias=False)

    def _rotary(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # x (B, H, S, D); rotate dimension i together with i + D/2 by angle position / base^(2i/D).
        half = x.shape[-1] // 2
        frequencies = self.config.rope_base ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
        angle = (position_ids.double()[..., None] * frequencies).to(x.dtype)
        if angle.dim() == 3:  # (B, S, D/2): per-sample positions
            angle = angle[:, None]
        cos, sin = angle.cos(), angle.sin()
        low, high = x[..., :half], x[..., half:]
        return torch.cat((low * cos - high * sin, high * cos + low * sin), dim=-1)

    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        c = self.config
        batch, seq, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, seq, c.num_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, seq, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, seq, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q, k = self._rotary(q, position_ids), self._rotary(k, position_ids)
        group = c.num_heads // c.num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, c.num_heads * c.head_dim))


class MLP(nn.Module):
    def __init__(self, config: TinyLlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: TinyLlamaConfig, attention: nn.Module) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.self_attn = attention
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.mlp = MLP(config)

    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor, cache: Any = None,
                layer: int | None = None) -> torch.Tensor:
        extra = {} if cache is None else {"cache": cache, "layer": layer}
        hidden_states = hidden_states + self.self_attn(self.input_norm(hidden_states), position_ids, **extra)
        return hidden_states + self.mlp(self.post_attention_norm(hidden_states))


class TinyLlama(nn.Module):
    """Token ids (B, S) and their positions → logits (B, S, vocab)."""

    def __init__(self, config: TinyLlamaConfig, attention: Callable[[TinyLlamaConfig], nn.Module] = PlainAttention):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, attention(config)) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      cache: Any = None) -> torch.Tensor:
        """The final normalised hidden states (B, S, hidden): everything but the vocabulary projection.

        With ``cache`` (`tokenring.inference.ShardedKVCache`, attention modules
        `TokenRingAttention`): input_ids are this rank's tokens of the cache's
        current chunk, and position_ids default to theirs.
        """
        if cache is not None:
            if position_ids is None:
                position_ids = cache.chunk.positions(device=input_ids.device)
            hidden_states = self.embed_tokens(input_ids)
            for index, layer in enumerate(self.layers):
                hidden_states = layer(hidden_states, position_ids, cache, index)
            return self.norm(hidden_states)
        if position_ids is None:
            if not all(isinstance(layer.self_attn, PlainAttention) for layer in self.layers):
                # A shard's own arange would be the wrong positions on every rank but the first.
                raise ValueError(
                    "argument 'position_ids': required for the sequence-parallel model; "
                    "pass tokenring.sequence.shard_batch(...)['position_ids']"
                )
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden_states = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_ids)
        return self.norm(hidden_states)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                cache: Any = None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, position_ids, cache))


def build_reference(config: TinyLlamaConfig, seed: int, dtype: torch.dtype = torch.float32) -> TinyLlama:
    """The single-process model, its weights drawn from ``seed`` (the same on every process)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = TinyLlama(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.to(dtype)


def sequence_parallel_copy(reference: TinyLlama, **attention_kwargs: Any) -> TinyLlama:
    """The same model with every attention module a `tokenring.nn.TokenRingAttention`, same weights.

    ``attention_kwargs`` go to TokenRingAttention (group, layout, algorithm, backend).
    """
    from tokenring.nn import TokenRingAttention

    config = reference.config

    def attention(c: TinyLlamaConfig) -> nn.Module:
        return TokenRingAttention(c.hidden_size, c.num_heads, causal=True, num_kv_heads=c.num_kv_heads,
                                  rope_base=c.rope_base, **attention_kwargs)

    dtype = next(reference.parameters()).dtype
    model = TinyLlama(config, attention).to(dtype)
    model.load_state_dict(copy.deepcopy(reference.state_dict()))
    return model


def random_batches(config: TinyLlamaConfig, seed: int, steps: int, batch: int, seq_len: int) -> list[torch.Tensor]:
    """``steps`` batches of token ids (batch, seq_len), the same on every process."""
    generator = torch.Generator().manual_seed(seed + 1)
    return [torch.randint(config.vocab_size, (batch, seq_len), generator=generator) for _ in range(steps)]


def greedy_reference(model: TinyLlama, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding in one process, the whole sequence recomputed each step: (B, new_tokens) token ids."""
    ids = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            next_token = model(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat((ids, next_token), dim=1)
    return ids[:, prompt.shape[1]:]


def greedy_sharded(model: TinyLlama, prompt: torch.Tensor, new_tokens: int, cache: Any,
                   chunk_size: int | None = None) -> torch.Tensor:
    """Greedy decoding on every rank of the cache's group: (B, new_tokens), the same on every rank.

    The prompt but its last token is prefilled in chunks of ``chunk_size``
    (default: all at once) into ``cache`` (`tokenring.inference.ShardedKVCache`),
    each rank running its share of each chunk; then every rank decodes one
    token at a time, starting from the prompt's last token. Each new token is
    rank 0's choice, sent to the others, so the ranks never drift apart on a
    near tie.
    """
    from tokenring.inference import agree_on_tokens

    batch, length = prompt.shape
    chunk_size = chunk_size or max(1, length - 1)
    with torch.no_grad():
        for start in range(0, length - 1, chunk_size):
            stop = min(start + chunk_size, length - 1)
            chunk = cache.extend(stop - start, replicated=False)
            model.hidden_states(chunk.shard(prompt[:, start:stop]), cache=cache)
        token = prompt[:, length - 1:]
        generated = []
        for _ in range(new_tokens):
            cache.extend(1)
            token = agree_on_tokens(cache, model(token, cache=cache)[:, -1].argmax(-1, keepdim=True))
            generated.append(token)
    return torch.cat(generated, dim=1)
