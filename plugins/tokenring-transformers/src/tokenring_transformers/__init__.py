"""TokenRing as a Hugging Face transformers attention implementation.

    import tokenring_transformers
    tokenring_transformers.register()          # once per process, before building the model
    model = LlamaForCausalLM(config)           # config.attn_implementation = "tokenring"

Then every rank calls the model on its own shard of the sequence, with the
true position ids of its tokens (`tokenring.sequence.shard_batch` gives both),
and the model's attention layers run `tokenring.token_ring_attn` across the
ranks. Everything else in the model is per token and runs unchanged.

Registration goes through transformers' public ``AttentionInterface.register``
and ``AttentionMaskInterface.register``. TokenRing masks by position (causal
over the whole sequence, or full for a module whose ``is_causal`` is False),
so the mask hook builds no mask; it exists so that a padding
``attention_mask`` given to the model is seen and refused on every rank,
rather than dropped by transformers. Features TokenRing does not compute
(sliding windows shorter than the sequence, logit softcapping, attention
sinks, varlen/packed ``cu_seq_lens``) are refused too, never ignored.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch

import tokenring
from tokenring.layout import default_layout, parse_layout
from tokenring.sequence import local_positions, rank_and_world_size

__all__ = ["DEFAULT_NAME", "TESTED_TRANSFORMERS_VERSIONS", "make_attention_function", "make_mask_function", "register"]
__version__ = "0.1.0"

DEFAULT_NAME = "tokenring"
TESTED_TRANSFORMERS_VERSIONS = ("5.23.0",)


def make_attention_function(
    *,
    group: Any = None,
    layout: str | None = None,
    algorithm: str = "tokenring",
    backend: str | None = None,
    check_inputs: bool = True,
) -> Callable[..., tuple[torch.Tensor, None]]:
    """An attention function with the signature transformers calls, running `tokenring.token_ring_attn`.

    ``layout`` (default: zigzag for causal modules, contiguous otherwise) must
    be the layout the inputs were sharded with. With ``check_inputs`` (the
    default) every call first checks, on every rank, that no mask, dropout or
    KV cache is in use and that ``position_ids`` are this rank's true
    positions under ``layout``, and all ranks raise together if any rank
    fails. The check adds no collective: a rank's problem goes into
    token_ring_attn's own agreement (``caller_problem``). Position ids are
    compared once per tensor, not per layer: every layer of a forward pass
    gets the same tensor, so that is one host sync per forward pass.
    """
    if layout is not None:
        layout = parse_layout(layout).value
    verified = _VerifiedPositions()

    def tokenring_attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        # transformers hands over (B, H, S, D) and expects (B, S, H, D) back.
        unsupported = _unsupported_feature(kwargs, query.shape[2] * rank_and_world_size(group)[1])
        if unsupported is not None:  # from the model's config: the same on every rank
            raise tokenring.InputError(unsupported)
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        used_layout = layout or default_layout(bool(causal))
        problem = _mask_problems.get(_group_key(group))
        if check_inputs and problem is None:
            problem = _problem(query, key, attention_mask, dropout, kwargs.get("position_ids"), used_layout, group,
                               verified)
        out = tokenring.token_ring_attn(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            causal=bool(causal), softmax_scale=scaling, group=group, layout=used_layout,
            algorithm=algorithm, backend=backend, caller_problem=problem,
        )
        return out, None

    return tokenring_attention_forward


def _unsupported_feature(kwargs: dict[str, Any], seq_len: int) -> str | None:
    """What the model asks of attention that TokenRing does not compute, or None."""
    window = kwargs.get("sliding_window")
    if window is not None and window < seq_len:
        return (
            f"argument 'sliding_window': TokenRing attends to the whole sequence, but this layer asks for a "
            f"window of {window} tokens over a sequence of {seq_len}"
        )
    for name, what in (("softcap", "logit softcapping"), ("s_aux", "attention sinks"), ("sinks", "attention sinks"),
                       ("cu_seq_lens_q", "packed (varlen) sequences"), ("cu_seq_lens_k", "packed (varlen) sequences")):
        if kwargs.get(name) is not None:
            return f"argument '{name}': TokenRing does not support {what}"
    return None


def make_mask_function(*, group: Any = None) -> Callable[..., None]:
    """transformers' mask hook for TokenRing: builds no mask, refuses padding on every rank.

    A padding mask found here is refused by the attention layers that follow,
    on every rank, through token_ring_attn's own agreement: no collective here.
    """

    def tokenring_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                       attention_mask=None, **kwargs) -> None:
        padded = attention_mask is not None and not bool(attention_mask.all())  # once per forward pass
        _mask_problems[_group_key(group)] = (
            "argument 'attention_mask': it marks padding, and TokenRing attends to every token "
            "of the sequence; pack sequences to full length instead of padding"
        ) if padded else None
        return None

    return tokenring_mask


class _VerifiedPositions:
    """The position-ids tensor last found right, by reference: the layers of one forward pass share it."""

    def __init__(self) -> None:
        self._tensor: Any = None
        self._facts: tuple = ()

    def holds(self, position_ids: torch.Tensor, facts: tuple) -> bool:
        return (self._tensor is not None and self._tensor() is position_ids
                and self._facts == (position_ids._version, *facts))

    def add(self, position_ids: torch.Tensor, facts: tuple) -> None:
        self._tensor, self._facts = weakref.ref(position_ids), (position_ids._version, *facts)


def _problem(query, key, attention_mask, dropout, position_ids, layout, group, verified) -> str | None:
    rank, world_size = rank_and_world_size(group)
    if attention_mask is not None:
        return (
            f"argument 'attention_mask': TokenRing attends to the whole sequence and takes no mask "
            f"(got a tensor of shape {tuple(attention_mask.shape)}); pack sequences to full length instead of padding"
        )
    if dropout:
        return f"attention dropout {dropout} is not supported; set config.attention_dropout = 0.0"
    if key.shape[2] != query.shape[2]:
        return (
            f"keys ({key.shape[2]}) outnumber queries ({query.shape[2]}): a KV cache is in use; "
            f"call the model with use_cache=False"
        )
    seq_local = query.shape[2]
    facts = (seq_local, world_size, rank, layout)
    if position_ids is not None and not verified.holds(position_ids, facts):
        expected = local_positions(seq_local * world_size, rank=rank, world_size=world_size, layout=layout,
                                   device=position_ids.device)
        if position_ids.shape[-1] != seq_local or not bool((position_ids == expected).all()):
            return (
                f"argument 'position_ids': expected this rank's true positions under layout {layout!r} "
                f"over {world_size} ranks, {_runs(expected)}, got {_runs(position_ids.reshape(-1, position_ids.shape[-1])[0])}; "
                f"pass tokenring.sequence.shard_batch(...)['position_ids']"
            )
        verified.add(position_ids, facts)
    return None


def _runs(positions: torch.Tensor) -> str:
    """Positions as runs, e.g. '0…3, 12…15', so a message stays short for long sequences."""
    values = positions.tolist()
    runs, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            runs.append(f"{values[start]}…{values[i - 1]}" if i - 1 > start else f"{values[start]}")
            start = i
    return ", ".join(runs[:4]) + (", …" if len(runs) > 4 else "")


# What the mask hook of a forward pass found wrong on this rank, per group, for its attention layers to refuse.
_mask_problems: dict[Any, str | None] = {}


def _group_key(group: Any) -> Any:
    return None if group is None else id(group)


def register(name: str = DEFAULT_NAME, **settings: Any) -> str:
    """Register TokenRing with transformers under ``name``; returns ``name``.

    ``settings`` go to `make_attention_function` (group, layout, algorithm,
    backend, check_inputs). Build the model with
    ``attn_implementation=name`` (or call ``model.set_attn_implementation(name)``).
    """
    from transformers import AttentionInterface

    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, make_attention_function(**settings))
    AttentionMaskInterface.register(name, make_mask_function(group=settings.get("group")))
    return name
