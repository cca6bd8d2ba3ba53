"""TokenRing as a Hugging Face transformers attention implementation.

    import tokenring_transformers
    tokenring_transformers.register()          # once per process, before building the model
    model = LlamaForCausalLM(config)           # config.attn_implementation = "tokenring"

Then every rank calls the model on its own shard of the sequence, with the
true position ids of its tokens (`tokenring.sequence.shard_batch` gives both),
and the model's attention layers run `tokenring.token_ring_attn` across the
ranks. Everything else in the model is per token and runs unchanged.

Supported (tested against the model's own sdpa and eager attention in one
process, transformers 5.23.0):

* packed documents (batch size 1): position ids that restart at each
  document, or transformers' flattened-batch keyword arguments
  ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (``max_length_q`` / ``max_length_k``
  are accepted and unused). `shard_batch` turns either into this rank's shard
  plus the global boundaries, which the model must be given as
  ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (`tokenring.sequence.document_kwargs`):
  a rank cannot see from its own position ids where the other ranks'
  documents start;
* padding: ``shard_batch(batch, pack_padding=True)`` packs each row of a
  padded batch as one document of a single row with the padding at the end;
* sliding windows: a layer's ``sliding_window`` W becomes
  ``window=(W - 1, -1)`` (causal; ``(W - 1, W - 1)`` otherwise), transformers'
  rule that key j is visible to query i when i - j < W.

Generation: ``tokenring_transformers.generate(model, input_ids, **generate_kwargs)``,
called on every rank with the same full prompt, decodes greedily over a
sequence-sharded KV cache (`tokenring.inference.ShardedKVCache`): each rank
prefills only its share of the prompt and keeps about 1/N of every layer's
cached keys/values, every rank decodes the new token, and every rank returns
the same sequences, token for token those of ``model.generate`` in one
process (`tokenring_transformers.generation`). The model sees the cache as
``past_key_values``, a `TokenRingCache` (a ``transformers.Cache``), and the
registered attention function attends to it with
`tokenring.inference.attend_with_cache`.

Registration goes through transformers' public ``AttentionInterface.register``
and ``AttentionMaskInterface.register``. TokenRing masks by position and
document, so the mask hook builds no mask; it exists so that a padding
``attention_mask`` given to the model directly is seen and refused on every
rank (pointing at ``shard_batch(..., pack_padding=True)``), rather than
dropped by transformers. Logit softcapping and attention sinks are refused
too, never ignored.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch

import tokenring
from tokenring.placement.layout import default_layout, parse_layout, shard
from tokenring.sequence import document_positions, local_positions, rank_and_world_size

from ._state import registered_settings, take_pending

__all__ = ["DEFAULT_NAME", "TESTED_TRANSFORMERS_VERSIONS", "TokenRingCache", "generate", "make_attention_function",
           "make_mask_function", "register"]
__version__ = "0.1.0"

DEFAULT_NAME = "tokenring"
TESTED_TRANSFORMERS_VERSIONS = ("5.23.0",)


def make_attention_function(
    *,
    group: Any = None,
    layout: str | None = None,
    algorithm: str = "auto",
    backend: str | None = None,
    check_inputs: bool = True,
) -> Callable[..., tuple[torch.Tensor, None]]:
    """An attention function with the signature transformers calls, running `tokenring.token_ring_attn`.

    ``layout`` (default: zigzag for causal modules, contiguous otherwise) must
    be the layout the inputs were sharded with. Packed documents come from the
    ``cu_seq_lens_q`` / ``cu_seq_lens_k`` keyword arguments (global
    boundaries, as `tokenring.sequence.shard_batch` returns them), a layer's
    ``sliding_window`` W becomes ``window=(W - 1, -1)`` (causal) or
    ``(W - 1, W - 1)``: key j is visible to query i when |i - j| < W, as in
    transformers' masks.

    With ``check_inputs`` (the default) every call first checks, on every
    rank, that no mask, dropout or KV cache is in use and that
    ``position_ids`` are this rank's positions under ``layout`` (and the
    documents): global positions, or with documents positions restarting at
    0 in each document. All ranks raise together if any rank fails. The check
    adds no collective: a rank's problem goes into token_ring_attn's own
    agreement (``caller_problem``). Position ids and document boundaries are
    read once per tensor, not per layer: every layer of a forward pass gets
    the same tensors, so that is one host read each per forward pass.
    """
    if layout is not None:
        layout = parse_layout(layout).value
    verified = _VerifiedPositions()
    documents = _DocumentBoundaries()

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
        pending = take_pending(module)
        if pending is not None:  # past_key_values is a TokenRingCache: attend to the sharded cache
            from .generation import attend_cached

            unsupported = _unsupported_feature(kwargs)
            if unsupported is not None:
                raise tokenring.InputError(unsupported)
            return attend_cached(*pending, query, key, value, attention_mask, dropout, scaling, kwargs, algorithm)
        rank, world_size = rank_and_world_size(group)
        seq_len = query.shape[2] * world_size
        unsupported = _unsupported_feature(kwargs)
        if unsupported is not None:  # from the model's config: the same on every rank
            raise tokenring.InputError(unsupported)
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        used_layout = layout or default_layout(causal)
        bounds, problem = documents.read(kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k"), seq_len)
        problem = _mask_problems.get(_group_key(group)) or problem
        if check_inputs and problem is None:
            problem = _problem(query, key, attention_mask, dropout, kwargs.get("position_ids"), used_layout,
                               rank, world_size, bounds, verified)
        out = tokenring.token_ring_attn(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            causal=causal, softmax_scale=scaling, group=group, layout=used_layout,
            algorithm=algorithm, backend=backend, caller_problem=problem,
            cu_seqlens=None if problem is not None else bounds,
            window=_window(kwargs.get("sliding_window"), causal, seq_len),
        )
        return out, None

    return tokenring_attention_forward


def _unsupported_feature(kwargs: dict[str, Any]) -> str | None:
    """What the model asks of attention that TokenRing does not compute, or None."""
    for name, what in (("softcap", "logit softcapping"), ("s_aux", "attention sinks"), ("sinks", "attention sinks")):
        if kwargs.get(name) is not None:
            return f"argument '{name}': TokenRing does not support {what}"
    return None


def _window(sliding_window: int | None, causal: bool, seq_len: int) -> tuple[int, int] | None:
    """token_ring_attn's window for transformers' ``sliding_window`` W: key j visible to query i when |i - j| < W."""
    if sliding_window is None or sliding_window >= seq_len:  # the window holds the whole sequence: no mask
        return None
    return (sliding_window - 1, -1) if causal else (sliding_window - 1, sliding_window - 1)


class _DocumentBoundaries:
    """The boundaries of the ``cu_seq_lens_q`` / ``cu_seq_lens_k`` tensors last read, by reference.

    Every layer of a forward pass gets the same tensors: they are read on the
    host once, and token_ring_attn gets a tuple it needs not read again.
    """

    def __init__(self) -> None:
        self._seen: tuple = ()
        self._result: tuple[tuple[int, ...] | None, str | None] = (None, None)

    def read(self, cu_q: Any, cu_k: Any, seq_len: int) -> tuple[tuple[int, ...] | None, str | None]:
        if cu_q is None and cu_k is None:
            return None, None
        if not self._holds(cu_q, cu_k, seq_len):
            self._result = _read_boundaries(cu_q, cu_k, seq_len)
            # weak references: a freed tensor's id may come back for the next batch's boundaries
            self._seen = (*(_reference(x) for x in (cu_q, cu_k)), seq_len)
        return self._result

    def _holds(self, cu_q: Any, cu_k: Any, seq_len: int) -> bool:
        if not self._seen or self._seen[2] != seq_len:
            return False
        for value, seen in zip((cu_q, cu_k), self._seen):
            if isinstance(value, torch.Tensor):
                if not (isinstance(seen, tuple) and len(seen) == 2 and isinstance(seen[0], weakref.ref)
                        and seen[0]() is value and seen[1] == value._version):
                    return False
            elif not isinstance(value, (list, tuple)) or seen != ("values", tuple(value)):
                return False
        return True


def _reference(value: Any) -> tuple:
    if isinstance(value, torch.Tensor):
        return (weakref.ref(value), value._version)
    return ("values", tuple(value)) if isinstance(value, (list, tuple)) else ("other", None)


def _read_boundaries(cu_q: Any, cu_k: Any, seq_len: int) -> tuple[tuple[int, ...] | None, str | None]:
    if cu_q is None or cu_k is None:
        missing = "cu_seq_lens_k" if cu_k is None else "cu_seq_lens_q"
        return None, f"argument '{missing}': pass cu_seq_lens_q and cu_seq_lens_k together (packed documents)"
    bounds = {}
    for name, value in (("cu_seq_lens_q", cu_q), ("cu_seq_lens_k", cu_k)):
        if isinstance(value, torch.Tensor) and value.dim() == 1 and value.dtype in (torch.int32, torch.int64):
            values = value.tolist()
        elif isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
            values = list(value)
        else:
            return None, f"argument '{name}': expected a 1-D int32 or int64 tensor of document boundaries"
        if (len(values) < 2 or values[0] != 0 or any(b <= a for a, b in zip(values, values[1:]))
                or values[-1] > seq_len):
            return None, (f"argument '{name}': expected global document boundaries [0, l1, l1+l2, ...] up to the "
                          f"sequence length {seq_len} (the local length x world size), got {values[:8]}; "
                          f"pass tokenring.sequence.shard_batch(...)['{name}']")
        bounds[name] = tuple(values)
    if bounds["cu_seq_lens_k"] != bounds["cu_seq_lens_q"]:
        return None, ("argument 'cu_seq_lens_k': TokenRing computes self-attention within one packed sequence, so "
                      f"the key boundaries must equal the query boundaries; got {list(bounds['cu_seq_lens_k'])[:8]} "
                      f"and {list(bounds['cu_seq_lens_q'])[:8]}")
    return bounds["cu_seq_lens_q"], None


def make_mask_function(*, group: Any = None) -> Callable[..., None]:
    """transformers' mask hook for TokenRing: builds no mask, refuses padding on every rank.

    A padding mask found here is refused by the attention layers that follow,
    on every rank, through token_ring_attn's own agreement: no collective here.
    """

    def tokenring_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                       attention_mask=None, **kwargs) -> None:
        padded = attention_mask is not None and not bool(attention_mask.all())  # once per forward pass
        _mask_problems[_group_key(group)] = (
            "argument 'attention_mask': it marks padding, and TokenRing takes no padding mask; pass the full "
            "batch through tokenring.sequence.shard_batch(batch, pack_padding=True), which packs each row as one "
            "document, and call the model with what it returns (position_ids and cu_seq_lens_q/k)"
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


def _problem(query, key, attention_mask, dropout, position_ids, layout, rank, world_size, bounds,
             verified) -> str | None:
    if attention_mask is not None:
        return (
            f"argument 'attention_mask': TokenRing takes no mask (got a tensor of shape "
            f"{tuple(attention_mask.shape)}); for padding pass the full batch through "
            f"tokenring.sequence.shard_batch(batch, pack_padding=True) and call the model with what it returns"
        )
    if dropout:
        return f"attention dropout {dropout} is not supported; set config.attention_dropout = 0.0"
    if key.shape[2] != query.shape[2]:
        return (
            f"keys ({key.shape[2]}) outnumber queries ({query.shape[2]}): a KV cache is in use; "
            f"call the model with use_cache=False, or generate with tokenring_transformers.generate"
        )
    seq_local = query.shape[2]
    facts = (seq_local, world_size, rank, layout, bounds)
    if position_ids is not None and not verified.holds(position_ids, facts):
        seq_len = seq_local * world_size
        expected = [local_positions(seq_len, rank=rank, world_size=world_size, layout=layout, cu_seqlens=bounds,
                                    device=position_ids.device)]
        if bounds is not None:  # rotary embeddings see differences only: restarting per document is as exact
            expected.append(shard(document_positions(seq_len, bounds, device=position_ids.device), rank,
                                  world_size, layout=layout, dim=0, cu_seqlens=bounds))
        rows = position_ids.reshape(-1, position_ids.shape[-1])
        if position_ids.shape[-1] != seq_local or not any(bool((rows == e).all()) for e in expected):
            if bounds is None:
                wanted = (f"expected this rank's true positions under layout {layout!r} over {world_size} ranks, "
                          f"{_runs(expected[0])}")
                hint = ("; for packed documents also pass shard_batch's cu_seq_lens_q and cu_seq_lens_k "
                        "(tokenring.sequence.document_kwargs)")
            else:
                wanted = (f"expected this rank's positions under layout {layout!r} over {world_size} ranks with "
                          f"{len(bounds) - 1} documents, global ({_runs(expected[0])}) or restarting in each "
                          f"document ({_runs(expected[1])})")
                hint = ""
            return (f"argument 'position_ids': {wanted}, got {_runs(rows[0])}; "
                    f"pass tokenring.sequence.shard_batch(...)['position_ids']{hint}")
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
    registered_settings[name] = dict(settings)
    AttentionMaskInterface.register(name, make_mask_function(group=settings.get("group")))
    return name


def generate(model: Any, input_ids: torch.Tensor, **generate_kwargs: Any) -> torch.Tensor:
    """Greedy generation over a sequence-sharded KV cache, on every rank; see `tokenring_transformers.generation`."""
    from .generation import generate as _generate

    return _generate(model, input_ids, **generate_kwargs)


def __getattr__(name: str) -> Any:
    if name == "TokenRingCache":  # imports transformers' cache classes only when asked for
        from .generation import TokenRingCache

        return TokenRingCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
