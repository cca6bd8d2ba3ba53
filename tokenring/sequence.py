"""Shard a training batch along the sequence; bring logits, losses and gradients back together.

A single-process training step becomes sequence-parallel by changing a few
lines, never its structure::

    batch = tokenring.sequence.shard_batch({"input_ids": ids, "labels": ids})
    logits = model(batch["input_ids"], position_ids=batch["position_ids"])
    loss = tokenring.sequence.causal_lm_loss(logits, batch["shift_labels"])
    loss.backward()
    tokenring.sequence.all_reduce_gradients(model.parameters())
    optimizer.step()

Every rank holds the whole model (its parameters are replicated) and its own
shard of every sequence. Three things need care, and these helpers do them:

* Labels are shifted on the FULL sequence, before sharding: the label of a
  token is the next token of the sequence, which may live on another rank
  (always so at a shard boundary, and in the zigzag layout a rank's two
  chunks are not even neighbours). The shifted labels are returned under the
  key ``"shift_labels"`` (the name Hugging Face models use for labels that
  are already shifted), so nothing shifts them a second time.
* Each rank's tokens sit at their true positions in the sequence, which the
  zigzag layout makes non-contiguous: ``"position_ids"`` holds them, for the
  rotary embedding.
* Packed documents (batch size 1) and padded batches (``pack_padding=True``)
  go through the same call: labels are shifted within each document, tokens
  are placed per document, and the result carries the global boundaries as
  ``"cu_seq_lens_q"`` / ``"cu_seq_lens_k"`` for the model's attention
  (`document_kwargs`). See `shard_batch`.
* The loss is the mean over all tokens of all ranks. Each rank's backward
  gives only its own share of each parameter's gradient, so the gradients of
  the replicated parameters must be summed across ranks, explicitly, before
  the optimizer step (`all_reduce_gradients`).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tokenring.runtime.groups import resolve_group
from tokenring.placement.layout import Layout, parse_layout, shard, unshard

IGNORE_INDEX = -100  # what torch's cross_entropy and Hugging Face models skip

__all__ = [
    "IGNORE_INDEX",
    "all_reduce_gradients",
    "DOCUMENT_KWARGS",
    "causal_lm_loss",
    "document_kwargs",
    "document_positions",
    "gather_sequence",
    "local_positions",
    "rank_and_world_size",
    "shard_batch",
    "shift_labels",
]


def rank_and_world_size(group: Any = None) -> tuple[int, int]:
    """This process's rank in ``group`` (default: the world group) and the group's size."""
    group = resolve_group(group)  # a DeviceMesh: its context-parallel group
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "argument 'group': torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first, or pass rank= and world_size="
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _resolve_rank(rank: int | None, world_size: int | None, group: Any) -> tuple[int, int]:
    if (rank is None) != (world_size is None):
        raise ValueError(f"pass both rank and world_size or neither; got rank={rank}, world_size={world_size}")
    if rank is None:
        return rank_and_world_size(group)
    if not 0 <= rank < world_size:
        raise ValueError(f"argument 'rank': expected 0 <= rank < world_size = {world_size}, got {rank}")
    return rank, world_size


def local_positions(
    seq_len: int, *, rank: int, world_size: int, layout: "Layout | str", device: Any = None,
    cu_seqlens: Sequence[int] | None = None,
) -> torch.Tensor:
    """The true positions (int64, shape (seq_len / world_size,)) of ``rank``'s tokens in a sequence of ``seq_len``.

    Contiguous: one run of positions. Zigzag: two runs, chunk ``rank`` then
    chunk ``2N-1-rank`` of the 2N chunks; with ``cu_seqlens`` (packed
    documents) the runs `tokenring.shard` places per document.
    """
    return shard(torch.arange(seq_len, device=device), rank, world_size, layout=layout, dim=0, cu_seqlens=cu_seqlens)


def shift_labels(labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Labels of the next token, for a full (unsharded) sequence along dim 1: ``out[:, t] = labels[:, t + 1]``.

    The last position has no next token and gets ``ignore_index``.
    """
    if labels.dim() < 2:
        raise ValueError(f"argument 'labels': expected (batch, seq, ...), got shape {tuple(labels.shape)}")
    last = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat((labels[:, 1:], last), dim=1)


def document_positions(seq_len: int, cu_seqlens: Sequence[int], *, device: Any = None) -> torch.Tensor:
    """Each token's position within its document (int64, shape (seq_len,)): 0, 1, ... from every boundary.

    Tokens after the last boundary (padding) are numbered from 0 too, as one
    more document: no query sees them, so their positions change nothing.
    """
    bounds = [int(b) for b in cu_seqlens]
    if bounds[-1] < seq_len:
        bounds.append(seq_len)
    starts = torch.tensor(bounds[:-1], dtype=torch.int64)
    lengths = torch.tensor([b - a for a, b in zip(bounds, bounds[1:])], dtype=torch.int64)
    return (torch.arange(seq_len, dtype=torch.int64) - starts.repeat_interleave(lengths, output_size=seq_len)).to(device)


# The keyword arguments transformers passes to attention for a flattened (varlen) batch.
DOCUMENT_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def document_kwargs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The packed-document keyword arguments of a `shard_batch` result, for the model call ({} when none).

    ``model(input_ids=..., position_ids=..., **document_kwargs(batch))``: the
    attention layers read the global document boundaries from them.
    """
    return {key: batch[key] for key in DOCUMENT_KWARGS if key in batch}


def shard_batch(
    batch: Mapping[str, Any],
    *,
    group: Any = None,
    layout: "Layout | str" = Layout.ZIGZAG,
    rank: int | None = None,
    world_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    cu_seqlens: Any = None,
    pack_padding: bool = False,
) -> dict[str, Any]:
    """This rank's shard of a batch of full sequences (sequence along dim 1).

    ``batch`` must hold ``"input_ids"`` (B, S). Every tensor of at least two
    dimensions whose dim 1 has length S is sharded with ``layout``; anything
    else passes through unchanged. Besides:

    * ``"labels"`` (unshifted, as a single-process script would pass them) is
      shifted on the full sequence, then sharded, and returned as
      ``"shift_labels"``; ``"labels"`` is dropped so that no model shifts it again.
    * ``"position_ids"`` defaults to 0 … S-1; it comes back as each token's
      true position (shape (B, S_local) or as given).
    * ``"attention_mask"`` is dropped. Zeros in it (padding) are refused
      unless ``pack_padding`` (below).

    **Packed documents** (batch size 1; attention stays within each document)
    are found in one of these, in this order:

    * ``cu_seqlens``, or the batch's ``"cu_seq_lens_q"`` / ``"cu_seq_lens_k"``
      (as transformers' ``DataCollatorWithFlattening`` returns them): global
      boundaries ``[0, l1, l1+l2, ..., end]``; tokens after ``end`` are padding;
    * ``"position_ids"`` that restart: a document starts wherever a position
      is not its predecessor + 1 (the documents transformers' own sdpa and
      eager masks find in such position ids).

    For packed documents the labels are shifted within each document (the last
    token of a document, and every padding token, gets ``ignore_index``), every
    sequence tensor is sharded with these boundaries (``tokenring.shard(...,
    cu_seqlens=...)``: with zigzag, tokens are placed per document so every
    rank gets the same work), ``"position_ids"`` come back as positions within
    each document (0, 1, ... from each boundary; given ones must be consecutive
    within each document, and rotary embeddings only see differences, so no
    attention score changes), and the result holds the model's attention
    keyword arguments: ``"cu_seq_lens_q"`` and ``"cu_seq_lens_k"`` (the global
    boundaries, int32, on the CPU: they are read on the host) and
    ``"max_length_q"`` / ``"max_length_k"`` (the longest document). Pass them to
    the model (`document_kwargs`). The full sequence length must divide by the
    world size; no document length must divide by anything.

    **Padding** (``pack_padding=True``; B >= 1, left or right padding, each
    row's tokens contiguous): each row's tokens become one document (or
    several, where its position ids restart), the rows are concatenated in
    order and all padding tokens moved to the end. The result therefore has
    batch size 1 and B * S tokens, of which the trailing padding sees nothing
    and has ``ignore_index`` labels; use ``unshard(..., cu_seqlens=
    result["cu_seq_lens_q"])`` to reassemble it in that packed order.

    ``rank`` and ``world_size`` default to this process's place in ``group``;
    pass them to shard without a process group (a data loader, a test).
    ``layout`` must be the layout the attention uses: zigzag is its default
    for causal attention.
    """
    rank, world_size = _resolve_rank(rank, world_size, group)
    layout = parse_layout(layout)
    if "input_ids" not in batch:
        raise ValueError(f"argument 'batch': expected an 'input_ids' entry, got keys {sorted(batch)}")
    input_ids = batch["input_ids"]
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"argument 'batch': 'input_ids' must be a (batch, seq) tensor, got {_describe(input_ids)}")
    batch_size, seq_len = input_ids.shape
    full = dict(batch)
    mask = full.pop("attention_mask", None)
    if "labels" in full and "shift_labels" in full:
        raise ValueError("argument 'batch': give 'labels' or 'shift_labels', not both")
    bounds = _given_boundaries(full, cu_seqlens, seq_len)
    padded = mask is not None and not bool(torch.as_tensor(mask).bool().all())
    if padded:
        if not pack_padding:
            raise ValueError(
                "argument 'batch': 'attention_mask' has zeros (padding); sequence-parallel attention takes no "
                "padding mask: pass pack_padding=True to pack each row's tokens as one document of a single "
                "row (batch size 1, B * S tokens, the padding moved to the end), or pack sequences yourself"
            )
        if bounds is not None:
            raise ValueError("argument 'batch': give document boundaries (cu_seqlens) or a padding "
                             "'attention_mask', not both")
        full, bounds = _pack_padded_rows(full, torch.as_tensor(mask), batch_size, seq_len)
        seq_len = batch_size * seq_len
    elif bounds is None and full.get("position_ids") is not None:
        bounds = _restarts(full["position_ids"], batch_size, seq_len)
    elif bounds is not None and batch_size != 1:
        raise ValueError(f"argument 'batch': packed documents (cu_seqlens) need batch size 1, got {batch_size}")
    if bounds is None:
        if "labels" in full:
            full["shift_labels"] = shift_labels(full.pop("labels"), ignore_index=ignore_index)
        if full.get("position_ids") is None:
            full["position_ids"] = torch.arange(seq_len, device=input_ids.device).expand(batch_size, seq_len)
        return _shard_entries(full, seq_len, rank, world_size, layout, None)

    if "labels" in full:
        full["shift_labels"] = _shift_within_documents(full.pop("labels"), bounds, ignore_index)
    elif padded and "shift_labels" in full:
        full["shift_labels"] = full["shift_labels"].clone()
        full["shift_labels"][:, bounds[-1]:] = ignore_index
    given = full.get("position_ids")
    if given is not None:
        _check_consecutive_within_documents(given.expand(1, seq_len)[0], bounds)
    full["position_ids"] = document_positions(seq_len, bounds, device=input_ids.device).unsqueeze(0)
    sharded = _shard_entries(full, seq_len, rank, world_size, layout, bounds)
    boundaries = torch.tensor(bounds, dtype=torch.int32)
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    sharded.update(cu_seq_lens_q=boundaries, cu_seq_lens_k=boundaries, max_length_q=longest, max_length_k=longest)
    return sharded


def _shard_entries(full: dict, seq_len: int, rank: int, world_size: int, layout: Layout,
                   bounds: tuple[int, ...] | None) -> dict[str, Any]:
    sharded = {}
    for key, value in full.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == seq_len:
            try:
                sharded[key] = shard(value, rank, world_size, layout=layout, dim=1, cu_seqlens=bounds)
            except ValueError as error:
                raise ValueError(f"argument 'batch': entry {key!r}: {error}") from None
        else:
            sharded[key] = value
    return sharded


def _as_boundaries(value: Any, what: str, seq_len: int) -> tuple[int, ...]:
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{what}: expected a 1-D int32 or int64 tensor, got {_describe(value)}")
        values = value.tolist()
    else:
        values = list(value)
    if (len(values) < 2 or values[0] != 0 or any(b <= a for a, b in zip(values, values[1:]))
            or values[-1] > seq_len):
        raise ValueError(f"{what}: expected document boundaries [0, l1, l1+l2, ...], strictly increasing and at "
                         f"most the sequence length {seq_len}, got {values[:16]}")
    return tuple(int(v) for v in values)


def _given_boundaries(full: dict, cu_seqlens: Any, seq_len: int) -> tuple[int, ...] | None:
    """The boundaries from ``cu_seqlens`` or the batch's flash-attention entries (removed from ``full``)."""
    found: dict[str, tuple[int, ...]] = {}
    if cu_seqlens is not None:
        found["cu_seqlens"] = _as_boundaries(cu_seqlens, "argument 'cu_seqlens'", seq_len)
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        value = full.pop(key, None)
        if value is not None:
            found[key] = _as_boundaries(value, f"argument 'batch': entry {key!r}", seq_len)
    for key in ("max_length_q", "max_length_k"):  # recomputed from the boundaries
        full.pop(key, None)
    if len(set(found.values())) > 1:
        raise ValueError("argument 'batch': the document boundaries disagree: "
                         + ", ".join(f"{k} = {list(v)[:8]}" for k, v in found.items()))
    return next(iter(found.values()), None)


def _restarts(position_ids: torch.Tensor, batch_size: int, seq_len: int) -> tuple[int, ...] | None:
    """Documents where position ids restart (None for one run); only a batch of one row may restart."""
    positions = torch.as_tensor(position_ids).expand(batch_size, seq_len)
    breaks = positions[:, 1:] != positions[:, :-1] + 1
    if not bool(breaks.any()):
        return None
    if batch_size != 1:
        raise ValueError(
            f"argument 'batch': 'position_ids' restart within a row of a batch of {batch_size} rows; packed "
            f"documents need batch size 1: concatenate the rows, or mark padding in 'attention_mask' and pass "
            f"pack_padding=True"
        )
    starts = (breaks[0].nonzero().flatten() + 1).tolist()
    return (0, *starts, seq_len)


def _pack_padded_rows(full: dict, mask: torch.Tensor, batch_size: int,
                      seq_len: int) -> tuple[dict, tuple[int, ...]]:
    """One packed row: each row's tokens (split where its position ids restart), then all padding."""
    if mask.shape != (batch_size, seq_len):
        raise ValueError(f"argument 'batch': 'attention_mask' must have the shape of 'input_ids' "
                         f"{(batch_size, seq_len)}, got {tuple(mask.shape)}")
    valid = mask.bool().cpu()
    given = full.get("position_ids")
    positions = None if given is None else torch.as_tensor(given).expand(batch_size, seq_len).cpu()
    order, bounds = [], [0]
    for row in range(batch_size):
        tokens = valid[row].nonzero().flatten()
        if not len(tokens):
            continue
        start, stop = int(tokens[0]), int(tokens[-1]) + 1
        if stop - start != len(tokens):
            raise ValueError(f"argument 'batch': row {row} of 'attention_mask' has padding between its tokens; "
                             f"only left or right padding packs into documents")
        starts = [start]
        if positions is not None:
            run = positions[row, start:stop]
            starts += (start + 1 + (run[1:] != run[:-1] + 1).nonzero().flatten()).tolist()
        for a, b in zip(starts, starts[1:] + [stop]):
            bounds.append(bounds[-1] + b - a)
        order.append(row * seq_len + torch.arange(start, stop))
    if len(bounds) == 1:
        raise ValueError("argument 'batch': 'attention_mask' marks every token as padding")
    order.append((~valid).flatten().nonzero().flatten())
    order = torch.cat(order)
    packed = {}
    for key, value in full.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == seq_len:
            if key == "position_ids":
                value = value.expand(batch_size, seq_len)
            if value.shape[0] != batch_size:
                raise ValueError(f"argument 'batch': entry {key!r} has {value.shape[0]} rows, 'input_ids' "
                                 f"{batch_size}")
            flat = value.reshape(1, batch_size * seq_len, *value.shape[2:])
            packed[key] = flat.index_select(1, order.to(value.device))
        else:
            packed[key] = value
    return packed, tuple(bounds)


def _shift_within_documents(labels: torch.Tensor, bounds: tuple[int, ...], ignore_index: int) -> torch.Tensor:
    """``shift_labels`` that never crosses a boundary: a document's last token and all padding are ignored."""
    shifted = shift_labels(labels, ignore_index=ignore_index)
    shifted[:, [b - 1 for b in bounds[1:]]] = ignore_index
    shifted[:, bounds[-1]:] = ignore_index
    return shifted


def _check_consecutive_within_documents(positions: torch.Tensor, bounds: tuple[int, ...]) -> None:
    steps = (positions[1:bounds[-1]] - positions[:bounds[-1] - 1]).cpu()
    inside = torch.ones_like(steps, dtype=torch.bool)
    inside[[b - 1 for b in bounds[1:-1]]] = False  # the step into the next document may be anything
    broken = (inside & (steps != 1)).nonzero().flatten()
    if len(broken):
        token = int(broken[0]) + 1
        raise ValueError(
            f"argument 'batch': 'position_ids' jump at token {token}, inside a document of the boundaries "
            f"{list(bounds)[:8]}; positions must be consecutive within each document"
        )


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__


class _GatherSequence(torch.autograd.Function):
    """The full sequence from every rank's shard, on every rank.

    Backward: every rank is taken to compute the same function of the full
    tensor, so each rank keeps only the gradient of its own shard; summing the
    replicated parameters' gradients across ranks afterwards counts each
    shard once.
    """

    @staticmethod
    def forward(ctx, local, dim, layout, group):
        rank, world_size = rank_and_world_size(group)
        ctx.rank, ctx.world_size, ctx.dim, ctx.layout = rank, world_size, dim, layout
        parts = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(parts, local.contiguous(), group=group)
        return unshard(parts, layout=layout, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        return shard(grad, ctx.rank, ctx.world_size, layout=ctx.layout, dim=ctx.dim), None, None, None


def gather_sequence(
    local: torch.Tensor, *, group: Any = None, layout: "Layout | str" = Layout.ZIGZAG, dim: int = 1
) -> torch.Tensor:
    """The full-sequence tensor (e.g. logits) on every rank, from each rank's shard along ``dim``.

    Every rank must pass a shard of the same shape. Differentiable: the
    gradient reaching each rank is the gradient of its own shard.
    """
    dim = dim % local.dim()
    return _GatherSequence.apply(local, dim, parse_layout(layout), resolve_group(group))


class _SumOfShares(torch.autograd.Function):
    """Sum a scalar over ranks; the backward gives each rank the gradient of its own share only.

    d(sum of shares)/d(own share) is 1, so the backward passes the gradient
    through unchanged. Each rank's parameters then hold its share's gradient,
    and the full gradient is their sum across ranks (`all_reduce_gradients`).
    """

    @staticmethod
    def forward(ctx, share, group):
        total = share.detach().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def causal_lm_loss(
    logits: torch.Tensor, shift_labels: torch.Tensor, *, group: Any = None, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Mean cross entropy over every labelled token of every rank: the single-process loss.

    ``logits`` (B, S_local, V) and ``shift_labels`` (B, S_local) are this
    rank's shards (labels already shifted on the full sequence: see
    `shard_batch`). Computed in float32 at least. Returns the same value on
    every rank. Its backward gives each rank's parameters only that rank's
    share of the gradient: call `all_reduce_gradients` after ``backward()``.
    """
    group = resolve_group(group)  # a DeviceMesh: its context-parallel group
    if logits.shape[:-1] != shift_labels.shape:
        raise ValueError(
            f"argument 'shift_labels': expected shape {tuple(logits.shape[:-1])} (the logits' without the "
            f"vocabulary), got {tuple(shift_labels.shape)}"
        )
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    local_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).to(compute_dtype),
        shift_labels.reshape(-1).to(logits.device),
        ignore_index=ignore_index,
        reduction="sum",
    )
    count = (shift_labels != ignore_index).sum().to(device=logits.device, dtype=compute_dtype)
    dist.all_reduce(count, group=group)
    if count.item() == 0:
        raise ValueError(f"argument 'shift_labels': every label on every rank is ignore_index ({ignore_index})")
    return _SumOfShares.apply(local_sum / count, group)


def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter], *, group: Any = None) -> None:
    """Sum every parameter's gradient over the ranks of ``group``, in place.

    Needed for parameters every rank holds whole (all of them, in plain
    sequence parallelism): each rank's backward only saw its own tokens. Ranks
    must agree on which parameters have a gradient; if they do not, every rank
    raises, naming the first parameter that differs.
    """
    parameters = list(parameters)
    group = resolve_group(group)  # a DeviceMesh: its context-parallel group
    _, world_size = rank_and_world_size(group)
    if not parameters:
        return
    device = parameters[0].device
    has_grad = torch.tensor([p.grad is not None for p in parameters], dtype=torch.int32, device=device)
    dist.all_reduce(has_grad, group=group)
    disagree = ((has_grad != 0) & (has_grad != world_size)).nonzero()
    if len(disagree):
        index = int(disagree[0])
        raise RuntimeError(
            f"all_reduce_gradients: parameter {index} (shape {tuple(parameters[index].shape)}) has a gradient "
            f"on {int(has_grad[index])} of {world_size} ranks; every rank must run the same backward"
        )
    # One collective per dtype and device, not one per parameter.
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
