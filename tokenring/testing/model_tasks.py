"""Whole-model tasks for `tokenring.tools.launch.LocalWorld`: training parity and long-context prefill.

Each task is called as ``task(rank, world_size, *args)`` on every rank and
returns plain data (tensors as bytes, see `tokenring.tools.tasks.to_bytes`).
The single-process references run in the calling process, with no process
group at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import tokenring
from tokenring import sequence
from tokenring.tools.problems import DTYPES
from tokenring.tools.tasks import from_bytes, peak_memory, to_bytes
from tokenring.testing.tiny_llama import (
    TinyLlama,
    TinyLlamaConfig,
    build_reference,
    random_batches,
    sequence_parallel_copy,
)


@dataclass(frozen=True)
class TrainingRun:
    """Several optimizer steps of a tiny Llama on random tokens, rebuilt from the seed on every process."""

    config: TinyLlamaConfig = field(default_factory=TinyLlamaConfig)
    seed: int = 0
    steps: int = 4
    batch: int = 2
    seq_len: int = 32          # the full sequence; divisible by 2N for zigzag
    dtype: str = "float32"
    layout: str = "zigzag"
    algorithm: str = "tokenring"
    # The layout the batch is sharded with; a different one than the
    # attention's is a bug, which the parity check must catch.
    batch_layout: str | None = None
    # Plain SGD with momentum: Adam's first steps divide by |g|, which turns
    # rounding-level differences in tiny gradients into full-size updates.
    lr: float = 0.2
    momentum: float = 0.9

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _optimizer(run: TrainingRun, model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=run.lr, momentum=run.momentum)


def reference_training(run: TrainingRun) -> dict:
    """The single-process model trained on the full sequences: per-step loss and flat gradient.

    The loss is written the usual single-process way (shift inside the
    sequence, mean over the tokens), not with `tokenring.sequence`.
    """
    model = build_reference(run.config, run.seed, run.torch_dtype)
    optimizer = _optimizer(run, model)
    losses, grads = [], []
    for input_ids in random_batches(run.config, run.seed, run.steps, run.batch, run.seq_len):
        logits = model(input_ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        grads.append(_flat_grad(model).clone())
        optimizer.step()
    return {"losses": losses, "grads": grads}


def sequence_parallel_training(rank: int, world_size: int, run: TrainingRun) -> dict:
    """The same training, each rank holding its shard of every sequence; per-step loss and summed gradient."""
    reference = build_reference(run.config, run.seed, run.torch_dtype)
    model = sequence_parallel_copy(reference, layout=run.layout, algorithm=run.algorithm)
    optimizer = _optimizer(run, model)
    losses, grads = [], []
    for input_ids in random_batches(run.config, run.seed, run.steps, run.batch, run.seq_len):
        batch = sequence.shard_batch({"input_ids": input_ids, "labels": input_ids},
                                     layout=run.batch_layout or run.layout)
        logits = model(batch["input_ids"], batch["position_ids"])
        loss = sequence.causal_lm_loss(logits, batch["shift_labels"])
        optimizer.zero_grad()
        loss.backward()
        # Every rank holds every parameter, but its backward only saw its own
        # tokens: the full gradient is the sum over ranks.
        sequence.all_reduce_gradients(model.parameters())
        losses.append(loss.item())
        grads.append(to_bytes(_flat_grad(model)))
        optimizer.step()
    return {"losses": losses, "grads": grads}


@dataclass
class ParityReport:
    world_size: int
    max_loss_diff: float       # max over steps and ranks of |loss - reference loss|
    max_grad_diff: float       # max over steps and ranks of max|g - g_ref| / max|g_ref|
    nan_seen: bool

    def holds(self, loss_tolerance: float, grad_tolerance: float) -> bool:
        return not self.nan_seen and self.max_loss_diff <= loss_tolerance and self.max_grad_diff <= grad_tolerance


def compare_training(world_size: int, reference: dict, per_rank: list[dict]) -> ParityReport:
    max_loss, max_grad, nan_seen = 0.0, 0.0, False
    for result in per_rank:
        for step, (loss, blob) in enumerate(zip(result["losses"], result["grads"])):
            grad, want = from_bytes(blob).double(), reference["grads"][step].double()
            loss_diff = abs(loss - reference["losses"][step])
            grad_diff = ((grad - want).abs().max() / want.abs().max()).item()
            nan_seen |= loss_diff != loss_diff or grad_diff != grad_diff
            max_loss, max_grad = max(max_loss, loss_diff), max(max_grad, grad_diff)
    return ParityReport(world_size, max_loss, max_grad, nan_seen)


# Long-context prefill -------------------------------------------------------

PREFILL_CONFIG = TinyLlamaConfig(vocab_size=1024, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2,
                                 intermediate_size=768)


def _last_token_owner(seq_len: int, world_size: int, layout: str) -> tuple[int, int]:
    """(rank, local index) of the sequence's last token."""
    for rank in range(world_size):
        positions = sequence.local_positions(seq_len, rank=rank, world_size=world_size, layout=layout)
        hits = (positions == seq_len - 1).nonzero()
        if len(hits):
            return rank, int(hits[0])
    raise AssertionError("no rank holds the last token")


def prefill(rank: int, world_size: int, config: TinyLlamaConfig, seed: int, seq_len: int, layout: str = "zigzag") -> dict:
    """One no-grad forward pass over a long prompt, sharded; the next-token logits and this rank's peak memory.

    ``peak_mem_bytes`` is how far this rank's resident memory rose during the
    pass, above the model, the rank's shard of the token ids and what a short
    warm-up pass left behind.
    """
    model = sequence_parallel_copy(build_reference(config, seed), layout=layout)
    input_ids = random_batches(config, seed, 1, 1, seq_len)[0]
    batch = sequence.shard_batch({"input_ids": input_ids}, layout=layout)
    del input_ids
    owner, index = _last_token_owner(seq_len, world_size, layout)
    with torch.no_grad():  # one short pass first, so one-time set-up (gloo, kernels) is not counted
        warm_up = sequence.shard_batch({"input_ids": torch.zeros(1, 32 * world_size, dtype=torch.long)}, layout=layout)
        model.hidden_states(warm_up["input_ids"], warm_up["position_ids"])
    torch.distributed.barrier()
    start = time.perf_counter()
    with torch.no_grad(), peak_memory() as peak:
        hidden = model.hidden_states(batch["input_ids"], batch["position_ids"])
        # A prefill only needs the next token's logits, not the whole sequence's.
        next_logits = model.lm_head(hidden[:, index]) if rank == owner else None
        del hidden
    seconds = time.perf_counter() - start
    return {
        "peak_mem_bytes": peak["bytes"],
        "seconds": seconds,
        "next_logits": to_bytes(next_logits) if next_logits is not None else None,
    }


# tokenring.nn.TokenRingAttention against plain float64 attention ----------------

@dataclass(frozen=True)
class AttentionModuleCase:
    """One TokenRingAttention layer on random hidden states, rebuilt from the seed on every process."""

    seed: int
    batch: int = 2
    seq_len: int = 24
    hidden_size: int = 32
    num_heads: int = 4
    num_kv_heads: int = 2
    causal: bool = True
    layout: str | None = None            # None: the default for ``causal``
    rope_base: float | None = 10000.0
    per_sample_positions: bool = False   # pass position_ids (B, S_local) instead of leaving them to the module

    @property
    def resolved_layout(self) -> str:
        return tokenring.placement.layout.default_layout(self.causal) if self.layout is None else self.layout

    def module(self) -> "torch.nn.Module":
        from tokenring.nn import TokenRingAttention

        generator_state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)
        try:
            return TokenRingAttention(self.hidden_size, self.num_heads, causal=self.causal,
                                      num_kv_heads=self.num_kv_heads, rope_base=self.rope_base, layout=self.layout)
        finally:
            torch.random.set_rng_state(generator_state)

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-sequence hidden states and the gradient of the output, (B, S, hidden) each."""
        generator = torch.Generator().manual_seed(self.seed + 1)
        shape = (self.batch, self.seq_len, self.hidden_size)
        return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def _complex_rotary(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding written as complex multiplication: (x_i + i·x_{i+D/2})·e^{i·pos·base^(-2i/D)}."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half], x[..., half:])
    frequencies = base ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    turn = torch.polar(torch.ones((), dtype=torch.float64), positions.double()[:, None] * frequencies)[None, :, None, :]
    rotated = z * turn
    return torch.cat((rotated.real, rotated.imag), dim=-1)


def reference_attention_module(case: AttentionModuleCase) -> dict[str, torch.Tensor]:
    """The layer on the full sequence in float64: out, d(hidden) and the weights' gradients."""
    module = case.module()
    weights = {name: p.detach().double().requires_grad_() for name, p in module.named_parameters()}
    hidden, dout = (t.double() for t in case.inputs())
    hidden.requires_grad_()
    batch, seq, _ = hidden.shape
    head_dim = case.hidden_size // case.num_heads

    def project(name: str, heads: int) -> torch.Tensor:
        return F.linear(hidden, weights[f"{name}.weight"]).view(batch, seq, heads, head_dim)

    q, k, v = project("q_proj", case.num_heads), project("k_proj", case.num_kv_heads), project("v_proj", case.num_kv_heads)
    if case.rope_base is not None:
        positions = torch.arange(seq)
        q, k = _complex_rotary(q, positions, case.rope_base), _complex_rotary(k, positions, case.rope_base)
    attended, _ = tokenring.reference_attention(q, k, v, causal=case.causal)
    out = F.linear(attended.reshape(batch, seq, -1), weights["o_proj.weight"])
    out.backward(dout)
    return {"out": out.detach(), "dhidden": hidden.grad, **{name: w.grad for name, w in weights.items()}}


def attention_module(rank: int, world_size: int, case: AttentionModuleCase) -> dict[str, bytes]:
    """The layer on this rank's shard, forward and backward; out and d(hidden) shards, summed weight gradients."""
    module = case.module()
    layout = case.resolved_layout
    hidden, dout = (tokenring.shard(t, rank, world_size, layout=layout) for t in case.inputs())
    hidden.requires_grad_()
    position_ids = None
    if case.per_sample_positions:
        mine = sequence.local_positions(case.seq_len, rank=rank, world_size=world_size, layout=layout)
        position_ids = mine.expand(case.batch, -1)
    out = module(hidden, position_ids)
    out.backward(dout)
    sequence.all_reduce_gradients(module.parameters())
    return {"out": to_bytes(out), "dhidden": to_bytes(hidden.grad),
            **{name: to_bytes(p.grad) for name, p in module.named_parameters()}}


# tokenring.sequence across ranks -----------------------------------------------

def _random_logits_and_labels(seed: int, batch: int, seq_len: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq_len, vocab, generator=generator, dtype=torch.float64)
    labels = torch.randint(vocab, (batch, seq_len), generator=generator)
    labels[torch.rand(batch, seq_len, generator=generator) < 0.25] = sequence.IGNORE_INDEX  # some unlabelled tokens
    return logits, labels


def sharded_loss(rank: int, world_size: int, seed: int, layout: str) -> dict:
    """causal_lm_loss on this rank's shard of random logits; the loss and this shard's logit gradient."""
    logits, labels = _random_logits_and_labels(seed, 2, 4 * world_size, 11)
    batch = sequence.shard_batch({"input_ids": labels.clamp(min=0), "labels": labels}, layout=layout)
    mine = tokenring.shard(logits, rank, world_size, layout=layout).requires_grad_()
    loss = sequence.causal_lm_loss(mine, batch["shift_labels"])
    loss.backward()
    return {"loss": loss.item(), "dlogits": to_bytes(mine.grad)}


def gathered_sequence(rank: int, world_size: int, seed: int, layout: str) -> dict:
    """gather_sequence of this rank's shard, and the shard's gradient of <gathered, weights>."""
    generator = torch.Generator().manual_seed(seed)
    full, weights = torch.randn(2, 2 * world_size, 3, generator=generator), torch.randn(2, 2 * world_size, 3, generator=generator)
    mine = tokenring.shard(full, rank, world_size, layout=layout).requires_grad_()
    gathered = sequence.gather_sequence(mine, layout=layout)
    (gathered * weights).sum().backward()
    return {"gathered": to_bytes(gathered), "grad": to_bytes(mine.grad)}


def summed_gradients(rank: int, world_size: int, missing_on_rank: int | None = None) -> list[bytes]:
    """all_reduce_gradients of gradients rank + 1 (float32) and 10·(rank + 1) (float64)."""
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))]
    params[0].grad = torch.full((3,), rank + 1.0)
    if rank != missing_on_rank:
        params[1].grad = torch.full((2, 2), 10.0 * (rank + 1), dtype=torch.float64)
    sequence.all_reduce_gradients(params)
    return [to_bytes(p.grad) for p in params]
