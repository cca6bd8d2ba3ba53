"""Small LlamaForCausalLM and MistralForCausalLM models (random weights, no hub) and the tasks that run them sequence-parallel.

Tasks are called on every rank of a `tokenring.tools.launch.LocalWorld` as
``task(rank, world_size, *args)``; tensors go back as bytes.
"""

from __future__ import annotations

import io

import torch

from tokenring import sequence
from tokenring.tools.tasks import from_bytes, to_bytes

SMALL_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, attention_dropout=0.0)


def build_llama(seed: int, attn_implementation: str, state: bytes | None = None):
    """LlamaForCausalLM from SMALL_LLAMA, weights drawn from ``seed`` or loaded from ``state`` bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SMALL_LLAMA, attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if state is not None:
        model.load_state_dict(torch.load(io.BytesIO(state), weights_only=True))
    return model


def build_model(kind: str, seed: int, attn_implementation: str, state: bytes | None = None, **config):
    """``kind`` "llama" or "mistral" from SMALL_LLAMA updated with ``config``; weights from ``seed`` or ``state``."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "mistral": (MistralConfig, MistralForCausalLM)}[kind]
    torch.manual_seed(seed)
    model = model_class(config_class(**dict(SMALL_LLAMA, **config), attn_implementation=attn_implementation))
    if state is not None:
        model.load_state_dict(torch.load(io.BytesIO(state), weights_only=True))
    return model


def state_bytes(model: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def token_ids(seed: int, batch: int, seq_len: int) -> torch.Tensor:
    return torch.randint(SMALL_LLAMA["vocab_size"], (batch, seq_len), generator=torch.Generator().manual_seed(seed + 1))


def llama_step(rank: int, world_size: int, state: bytes, seed: int, batch: int, seq_len: int,
               layout: str = "zigzag", pass_positions: bool = True) -> dict:
    """Forward and backward of the model on this rank's shard: logits shard, loss, summed gradients."""
    import tokenring_transformers

    name = tokenring_transformers.register(layout=layout)
    model = build_llama(seed, name, state)
    ids = token_ids(seed, batch, seq_len)
    shard = sequence.shard_batch({"input_ids": ids, "labels": ids}, layout=layout)
    position_ids = shard["position_ids"] if pass_positions else None
    logits = model(input_ids=shard["input_ids"], position_ids=position_ids, use_cache=False).logits
    loss = sequence.causal_lm_loss(logits, shard["shift_labels"])
    loss.backward()
    sequence.all_reduce_gradients(model.parameters())
    return {
        "logits": to_bytes(logits),
        "loss": loss.item(),
        "grads": {n: to_bytes(p.grad) for n, p in model.named_parameters() if p.grad is not None},
    }


def sharded_step(rank: int, world_size: int, kind: str, state: bytes, config: dict, batch: dict,
                 shard_options: dict | None = None, pass_documents: bool = True) -> dict:
    """Forward and backward of a whole batch given to `shard_batch` (tensors as bytes) on this rank.

    ``shard_options`` go to `shard_batch` (``pack_padding``, ``cu_seqlens``,
    ``layout``); the model gets the result's position ids and, with
    ``pass_documents``, its document keyword arguments. Returns the logits
    shard, the loss, the summed gradients and the boundaries used.
    """
    import tokenring_transformers

    shard_options = dict(shard_options or {})
    name = tokenring_transformers.register(layout=shard_options.get("layout"))
    model = build_model(kind, 0, name, state, **config)
    full = {key: from_bytes(value) if isinstance(value, bytes) else value for key, value in batch.items()}
    shard = sequence.shard_batch(full, **shard_options)
    documents = sequence.document_kwargs(shard) if pass_documents else {}
    logits = model(input_ids=shard["input_ids"], position_ids=shard["position_ids"], use_cache=False,
                   **documents).logits
    loss = sequence.causal_lm_loss(logits, shard["shift_labels"])
    loss.backward()
    sequence.all_reduce_gradients(model.parameters())
    boundaries = shard.get("cu_seq_lens_q")
    return {
        "logits": to_bytes(logits),
        "loss": loss.item(),
        "grads": {n: to_bytes(p.grad) for n, p in model.named_parameters() if p.grad is not None},
        "cu_seqlens": None if boundaries is None else boundaries.tolist(),
    }


def refused_forward(rank: int, world_size: int, seed: int, case: str, seq_len: int = 16) -> str:
    """A forward that asks for what TokenRing does not compute; it must raise on every rank.

    ``case``: "padding" (a padding attention_mask on rank 0's shard only),
    "restarting positions" (position ids of packed documents without their
    cu_seq_lens), "unequal boundaries" (cu_seq_lens_k differs from
    cu_seq_lens_q on rank 1 only).
    """
    import tokenring_transformers

    name = tokenring_transformers.register()
    model = build_llama(seed, name)
    ids = token_ids(seed, 1, seq_len)
    positions = torch.cat([torch.arange(5), torch.arange(seq_len - 5)]).unsqueeze(0)
    shard = sequence.shard_batch({"input_ids": ids, "labels": ids, "position_ids": positions})
    arguments = {"input_ids": shard["input_ids"], "position_ids": shard["position_ids"], "use_cache": False,
                 **sequence.document_kwargs(shard)}
    if case == "padding":
        mask = torch.ones_like(shard["input_ids"])
        if rank == 0:
            mask[:, :2] = 0
        arguments["attention_mask"] = mask
    elif case == "restarting positions":
        for key in sequence.DOCUMENT_KWARGS:
            del arguments[key]
    elif case == "unequal boundaries":
        if rank == 1:
            arguments["cu_seq_lens_k"] = torch.tensor([0, 3, seq_len], dtype=torch.int32)
    else:
        raise ValueError(f"unknown case {case!r}")
    model(**arguments)
    return "ran"


def layer_call_costs(rank: int, world_size: int, seed: int, seq_len: int = 16, packed: bool = False) -> dict:
    """c10d operators and host syncs of the model's forward passes, after a first one.

    The second forward reuses the position-ids tensor, the third gets a new
    one (as each training step does). Counts come from a TorchDispatchMode
    that sees inside TokenRing's operators (tokenring.testing.tasks). With
    ``packed`` the batch holds three documents, given as cu_seq_lens.
    """
    import tokenring_transformers
    from tokenring.testing.tasks import count_ops

    name = tokenring_transformers.register()
    model = build_llama(seed, name)
    ids = token_ids(seed, 1, seq_len)
    full = {"input_ids": ids, "labels": ids}
    if packed:
        full["cu_seq_lens_q"] = full["cu_seq_lens_k"] = torch.tensor([0, 3, 10, seq_len], dtype=torch.int32)
    shard = sequence.shard_batch(full)
    arguments = {"input_ids": shard["input_ids"], "position_ids": shard["position_ids"],
                 "attention_mask": torch.ones_like(shard["input_ids"]), "use_cache": False,
                 **sequence.document_kwargs(shard)}
    model(**arguments)
    costs = {}
    for case in ("same positions", "new positions"):
        if case == "new positions":
            arguments["position_ids"] = arguments["position_ids"].clone()
        with count_ops() as counts:
            model(**arguments)
        costs[case] = {n: c for n, c in counts.items() if n.startswith("c10d.") or "_local_scalar_dense" in n}
    return costs


def generation_model(seed: int, attn_implementation: str, state: bytes | None = None, **config):
    """A LlamaForCausalLM for generation tests: SMALL_LLAMA with ``config`` (e.g. num_key_value_heads), float64.

    float64 (on both sides of the comparison) keeps rounding far below the gaps between a random model's logits,
    so greedy tokens compare exactly; positions reach 8192.
    """
    config = dict(dict(max_position_embeddings=8192, initializer_range=0.2), **config)
    return build_model("llama", seed, attn_implementation, state, **config).to(torch.float64).eval()


def generate_tokens(rank: int, world_size: int, state: bytes, config: dict, prompt: bytes,
                    generate_kwargs: dict) -> dict:
    """`tokenring_transformers.generate` on this rank: the sequences, and this rank's share of the cache."""
    import time

    import tokenring_transformers
    from tokenring_transformers import generation

    name = tokenring_transformers.register()
    model = generation_model(0, name, state, **config)
    created = []
    original = generation.ShardedKVCache

    def recording(*args, **kwargs):
        cache = original(*args, **kwargs)
        created.append(cache)
        return cache

    generation.ShardedKVCache = recording
    try:
        start = time.perf_counter()
        generate_kwargs = {k: from_bytes(v) if isinstance(v, bytes) else v for k, v in generate_kwargs.items()}
        sequences = tokenring_transformers.generate(model, from_bytes(prompt), **generate_kwargs)
        seconds = time.perf_counter() - start
    finally:
        generation.ShardedKVCache = original
    cache = created[-1]
    return {"sequences": sequences.tolist(), "seconds": seconds, "lengths": list(cache.lengths),
            "cache_bytes": cache.nbytes()}
