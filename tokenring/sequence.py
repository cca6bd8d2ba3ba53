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
* The loss is the mean over all tokens of all ranks. Each rank's backward
  gives only its own share of each parameter's gradient, so the gradients of
  the replicated parameters must be summed across ranks, explicitly, before
  the optimizer step (`all_reduce_gradients`).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .groups import resolve_group
from .layout import Layout, parse_layout, shard, unshard

IGNORE_INDEX = -100  # what torch's cross_entropy and Hugging Face models skip

__all__ = [
    "IGNORE_INDEX",
    "all_reduce_gradients",
    "causal_lm_loss",
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
    seq_len: int, *, rank: int, world_size: int, layout: "Layout | str", device: Any = None
) -> torch.Tensor:
    """The true positions (int64, shape (seq_len / world_size,)) of ``rank``'s tokens in a sequence of ``seq_len``.

    Contiguous: one run of positions. Zigzag: two runs, chunk ``rank`` then
    chunk ``2N-1-rank`` of the 2N chunks.
    """
    return shard(torch.arange(seq_len, device=device), rank, world_size, layout=layout, dim=0)


def shift_labels(labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Labels of the next token, for a full (unsharded) sequence along dim 1: ``out[:, t] = labels[:, t + 1]``.

    The last position has no next token and gets ``ignore_index``.
    """
    if labels.dim() < 2:
        raise ValueError(f"argument 'labels': expected (batch, seq, ...), got shape {tuple(labels.shape)}")
    last = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat((labels[:, 1:], last), dim=1)


def shard_batch(
    batch: Mapping[str, Any],
    *,
    group: Any = None,
    layout: "Layout | str" = Layout.ZIGZAG,
    rank: int | None = None,
    world_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
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
    * ``"attention_mask"`` may only be all ones (TokenRing attends to the
      whole sequence; pack sequences instead of padding) and is dropped.

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
    if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
        raise ValueError(
            "argument 'batch': 'attention_mask' has zeros (padding); sequence-parallel attention attends to "
            "every token of the sequence: pack sequences to full length instead of padding"
        )
    if "labels" in full:
        if "shift_labels" in full:
            raise ValueError("argument 'batch': give 'labels' or 'shift_labels', not both")
        full["shift_labels"] = shift_labels(full.pop("labels"), ignore_index=ignore_index)
    if full.get("position_ids") is None:
        full["position_ids"] = torch.arange(seq_len, device=input_ids.device).expand(batch_size, seq_len)
    sharded = {}
    for key, value in full.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == seq_len:
            try:
                sharded[key] = shard(value, rank, world_size, layout=layout, dim=1)
            except ValueError as error:
                raise ValueError(f"argument 'batch': entry {key!r}: {error}") from None
        else:
            sharded[key] = value
    return sharded


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
