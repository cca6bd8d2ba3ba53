"""Greedy generation over a sequence-sharded KV cache: `generate`, and the `TokenRingCache` it hands the model.

Call `generate(model, input_ids, **generate_kwargs)` on every rank of the
group with the same full prompt, on a model built with the attention
implementation `tokenring_transformers.register` returned. Each rank keeps
about 1/N of every layer's cached keys/values (`tokenring.inference.ShardedKVCache`)
and runs the model only on its share of the prompt's tokens:

* **prefill**: the prompt but its last token, in chunks of
  ``prefill_chunk_size`` tokens (default: all at once). Each rank runs the
  model's decoder (no vocabulary projection) on its tokens of the chunk
  (`Chunk.shard`: an early and a late piece), at their true positions
  (`Chunk.positions`), and the registered attention function attends to the
  cache with `tokenring.inference.attend_with_cache` (pass-Q or pass-KV,
  whichever plan moves fewer bytes). A chunk shorter than the number of
  ranks goes token by token as in decode;
* **decode**: every rank runs the whole model on the newest token (so every
  rank computes the next token's logits: the prompt's last token is the first
  one decoded), its keys/values go to the rank holding the fewest, each rank
  attends to its own shard and the partial results merge on every rank.
  Rank 0's greedy choice is sent to the others (`agree_on_tokens`), so the
  ranks never drift apart on a near tie.

The model sees the cache as ``past_key_values``: a `TokenRingCache`
(a ``transformers.Cache``) whose ``update(key, value, layer_idx)`` hands the
layer's new keys/values, unchanged, to the registered attention function,
which calls ``attend_with_cache(q, k, v, cache, layer=layer_idx)``; that
appends them to this rank's shard and attends.

Every rank returns the same ``(B, prompt + new)`` token ids, as
``model.generate`` does with ``return_dict_in_generate=False``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import Cache, GenerationConfig

import tokenring
from tokenring.inference import ShardedKVCache, agree_on_tokens

from ._state import pending, registered_settings

__all__ = ["TokenRingCache", "generate"]

# Generation settings that change which token greedy decoding picks, with their neutral values: a setting
# outside these is refused rather than ignored. (Sampling settings such as temperature or top_k are ignored
# under do_sample=False, as model.generate ignores them.)
_NEUTRAL: dict[str, tuple] = {
    "num_beams": (None, 1),
    "num_return_sequences": (None, 1),
    "num_beam_groups": (None, 1),
    "diversity_penalty": (None, 0.0),
    "penalty_alpha": (None,),
    "dola_layers": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "force_words_ids": (None,),
    "constraints": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "exponential_decay_length_penalty": (None,),
    "suppress_tokens": (None, []),
    "begin_suppress_tokens": (None, []),
    "sequence_bias": (None,),
    "token_healing": (None, False),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
    "stop_strings": (None,),
    "max_time": (None,),
    "prompt_lookup_num_tokens": (None,),
    "use_mtp": (None, False),
    "cache_implementation": (None,),
    "return_dict_in_generate": (None, False),
    "output_scores": (None, False),
    "output_logits": (None, False),
    "output_attentions": (None, False),
    "output_hidden_states": (None, False),
}

# Keyword arguments of model.generate that are not generation settings, accepted when they ask for nothing.
_EMPTY_OK = ("logits_processor", "stopping_criteria", "streamer", "assistant_model", "prefix_allowed_tokens_fn",
             "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate")


class TokenRingCache(Cache):
    """``past_key_values`` for a model whose attention is TokenRing's: a sequence-sharded KV cache.

    ``sharded`` is this rank's `tokenring.inference.ShardedKVCache`; the
    caller places each forward pass's tokens with ``sharded.extend(T)``
    (the same call on every rank) and runs the model on ``Chunk.shard`` of
    them at ``Chunk.positions``. ``update`` passes the layer's new keys and
    values on unchanged: the attention function stores them in this rank's
    shard (`attend_with_cache`) and attends to the cache.
    """

    def __init__(self, sharded: ShardedKVCache) -> None:
        super().__init__(layers=[])
        self.sharded = sharded
        self._seen = 0  # tokens that every layer has attended to

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sharded.chunk is None:
            raise RuntimeError("TokenRingCache: call cache.sharded.extend(num_tokens) before the forward pass")
        if getattr(pending, "value", None) is not None:  # the last layer's attention never took its keys/values
            pending.value = None
            raise RuntimeError("TokenRingCache needs the model's attention implementation to be the one "
                               "tokenring_transformers.register() returned (it attends to the sharded cache)")
        pending.value = (self, layer_idx)
        if layer_idx == self.sharded.num_layers - 1:
            self._seen = self.sharded.length
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._seen

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self._seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._seen + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def __len__(self) -> int:
        return self.sharded.num_layers

    def __repr__(self) -> str:
        s = self.sharded
        return (f"TokenRingCache({s.length} tokens, {s.lengths[s.rank]} on rank {s.rank} of {s.world_size}, "
                f"{s.num_layers} layers)")



def attend_cached(cache: Any, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Any, dropout: float, scaling: float | None, kwargs: dict[str, Any],
                  algorithm: str) -> tuple[torch.Tensor, None]:
    """The registered attention function's path with a `TokenRingCache`: (B, H, rows, D) in, (B, rows, H, D) out."""
    from tokenring.inference import attend_with_cache

    sharded = cache.sharded
    if attention_mask is not None:
        raise tokenring.InputError("argument 'attention_mask': TokenRing's cached attention takes no mask "
                                   "(tokenring_transformers.generate refuses padding)")
    if dropout:
        raise tokenring.InputError(f"attention dropout {dropout} is not supported; call model.eval()")
    window = kwargs.get("sliding_window")
    if window is not None and window < sharded.length:
        raise tokenring.InputError(f"argument 'sliding_window': a window of {window} tokens over a cache of "
                                   f"{sharded.length} is not supported by tokenring_transformers.generate")
    out = attend_with_cache(query.transpose(1, 2).contiguous(), key.transpose(1, 2), value.transpose(1, 2),
                            sharded, layer=layer, algorithm=algorithm, softmax_scale=scaling)
    return out, None


def _settings_of(model: Any) -> dict[str, Any]:
    name = getattr(model.config, "_attn_implementation", None)
    if name not in registered_settings:
        raise ValueError(
            f"tokenring_transformers.generate: the model's attention implementation is {name!r}, not one that "
            f"tokenring_transformers.register() made ({sorted(registered_settings)}); call register() and build the "
            f"model with attn_implementation=<the name it returns>"
        )
    return registered_settings[name]


def _generation_config(model: Any, generate_kwargs: dict[str, Any]) -> Any:
    """model.generate's settings (the model's generation config updated with the keyword arguments), checked."""
    base = generate_kwargs.pop("generation_config", None)
    config = copy.deepcopy(base if base is not None else getattr(model, "generation_config", None) or GenerationConfig())
    unused = config.update(**generate_kwargs)
    for name in _EMPTY_OK:
        value = unused.pop(name, None)
        if value is not None and not (isinstance(value, (list, tuple)) and not value):
            raise ValueError(f"tokenring_transformers.generate: argument {name!r} is not supported "
                             f"(greedy decoding only, without extra logits processors or stopping criteria)")
    unused.pop("use_model_defaults", None)
    unused.pop("synced_gpus", None)
    if unused:
        raise ValueError(f"tokenring_transformers.generate: unsupported arguments {sorted(unused)}")
    if config.do_sample:
        raise ValueError("tokenring_transformers.generate decodes greedily: sampling (do_sample=True) is not "
                         "supported; pass do_sample=False (the model's generation config may set do_sample=True)")
    for name, neutral in _NEUTRAL.items():
        value = getattr(config, name, None)
        if not any(value == n if n is not None else value is None for n in neutral):
            raise ValueError(f"tokenring_transformers.generate: {name}={value!r} is not supported (greedy "
                             f"decoding with max_new_tokens / max_length and eos_token_id / pad_token_id only)")
    return config


def generate(model: Any, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
             **generate_kwargs: Any) -> torch.Tensor:
    """Greedy generation on every rank of the group over a sequence-sharded KV cache; returns (B, prompt + new).

    Call it on every rank with the same arguments: the same full prompt
    ``input_ids`` (B, P) (sequences of one batch share their length; an
    ``attention_mask`` may be given only if it marks no padding) and
    generation settings as for ``model.generate``: ``max_new_tokens`` (or
    ``max_length``; neither: 20 new tokens), ``do_sample=False`` (sampling
    and beam search are refused), ``eos_token_id`` / ``pad_token_id``
    (finished sequences are padded, generation stops when every sequence
    has finished), ``prefill_chunk_size``, or ``generation_config``. The
    model must use the attention implementation `register` returned; the
    group, backend and prefill schedule are those given to `register`.
    """
    settings = _settings_of(model)
    config = _generation_config(model, dict(generate_kwargs))
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"argument 'input_ids': expected a (batch, prompt_length) tensor of token ids, got "
                         f"{getattr(input_ids, 'shape', type(input_ids))}")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("argument 'attention_mask': it marks padding; tokenring_transformers.generate takes "
                         "prompts of one length (no padding) in a batch")
    batch, prompt_len = input_ids.shape
    model_config = model.config
    if config.max_new_tokens is not None:
        max_length = prompt_len + config.max_new_tokens
    elif config.max_length is not None:
        max_length = config.max_length
    else:  # model.generate's default: 20 new tokens, within the model's positions
        max_length = prompt_len + 20
        limit = getattr(model_config, "max_position_embeddings", None)
        if limit is not None:
            max_length = min(max_length, limit)
    if max_length <= prompt_len:
        raise ValueError(f"max_length {max_length} leaves no room for new tokens after a prompt of {prompt_len}; "
                         f"pass max_new_tokens")
    device = input_ids.device
    eos = config.eos_token_id
    eos = None if eos is None else torch.tensor([eos] if isinstance(eos, int) else list(eos), device=device)
    pad = config.pad_token_id
    if pad is None and eos is not None:
        pad = int(eos[0])  # as model.generate does

    parameter = next(model.parameters())
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    sharded = ShardedKVCache(
        num_layers=model_config.num_hidden_layers, batch=batch,
        kv_heads=getattr(model_config, "num_key_value_heads", None) or heads, head_dim=head_dim,
        dtype=parameter.dtype, device=device, max_tokens=max_length, group=settings.get("group"),
        backend=settings.get("backend"),
    )
    cache = TokenRingCache(sharded)
    chunk_size = getattr(config, "prefill_chunk_size", None) or max(1, prompt_len - 1)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    sequences = input_ids
    pending.value = None
    try:
        with torch.no_grad():
            start = 0
            while start < prompt_len - 1:  # prefill: every prompt token but the last, sharded
                stop = min(start + chunk_size, prompt_len - 1)
                if stop - start >= sharded.world_size:
                    chunk = sharded.extend(stop - start, replicated=False)
                    positions = chunk.positions(device=device).unsqueeze(0).expand(batch, -1)
                    decoder(input_ids=chunk.shard(input_ids[:, start:stop]), position_ids=positions,
                            past_key_values=cache, use_cache=True)
                else:  # fewer tokens than ranks: one at a time, every rank running each
                    for position in range(start, stop):
                        sharded.extend(1)
                        decoder(input_ids=input_ids[:, position:position + 1],
                                position_ids=torch.full((batch, 1), position, device=device),
                                past_key_values=cache, use_cache=True)
                start = stop
            token = input_ids[:, prompt_len - 1:]
            unfinished = torch.ones(batch, dtype=torch.long, device=device)
            while sequences.shape[1] < max_length:  # decode: the newest token on every rank
                position = sharded.length
                sharded.extend(1)
                logits = model(input_ids=token, position_ids=torch.full((batch, 1), position, device=device),
                               past_key_values=cache, use_cache=True, logits_to_keep=1).logits
                # as model.generate: the greedy choice in float32
                next_tokens = logits[:, -1].to(dtype=torch.float32).argmax(-1)
                next_tokens = agree_on_tokens(sharded, next_tokens)
                if eos is not None:
                    next_tokens = next_tokens * unfinished + pad * (1 - unfinished)
                sequences = torch.cat((sequences, next_tokens[:, None]), dim=1)
                if eos is not None:
                    unfinished = unfinished & ~torch.isin(next_tokens, eos)
                    if not bool(unfinished.any()):
                        break
                token = next_tokens[:, None]
    finally:
        pending.value = None
    return sequences
