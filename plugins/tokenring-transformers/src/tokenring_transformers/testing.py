"""A small LlamaForCausalLM (random weights, no hub) and the tasks that run it sequence-parallel.

Tasks are called on every rank of a `tokenring.tools.launch.LocalWorld` as
``task(rank, world_size, *args)``; tensors go back as bytes.
"""

from __future__ import annotations

import io

import torch

from tokenring import sequence
from tokenring.tools.tasks import to_bytes

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


def refused_forward(rank: int, world_size: int, seed: int, case: str, seq_len: int = 16) -> str:
    """A forward that asks for what TokenRing does not compute; it must raise on every rank.

    ``case``: "padding" (a padding attention_mask on rank 0's shard only) or
    "sliding-window" (a Mistral whose window is shorter than the sequence).
    """
    import tokenring_transformers
    from transformers import MistralConfig, MistralForCausalLM

    name = tokenring_transformers.register()
    ids = token_ids(seed, 1, seq_len)
    shard = sequence.shard_batch({"input_ids": ids, "labels": ids})
    arguments = {"input_ids": shard["input_ids"], "position_ids": shard["position_ids"], "use_cache": False}
    if case == "padding":
        model = build_llama(seed, name)
        mask = torch.ones_like(shard["input_ids"])
        if rank == 0:
            mask[:, :2] = 0
        arguments["attention_mask"] = mask
    else:
        config = dict(SMALL_LLAMA, sliding_window=4)
        torch.manual_seed(seed)
        model = MistralForCausalLM(MistralConfig(**config, attn_implementation=name))
    model(**arguments)
    return "ran"


def layer_call_costs(rank: int, world_size: int, seed: int, seq_len: int = 16) -> dict:
    """c10d operators and host syncs of the model's forward passes, after a first one.

    The second forward reuses the position-ids tensor, the third gets a new
    one (as each training step does). Counts come from a TorchDispatchMode
    that sees inside TokenRing's operators (tokenring.testing.tasks).
    """
    import tokenring_transformers
    from tokenring.testing.tasks import count_ops

    name = tokenring_transformers.register()
    model = build_llama(seed, name)
    ids = token_ids(seed, 1, seq_len)
    shard = sequence.shard_batch({"input_ids": ids, "labels": ids})
    arguments = {"input_ids": shard["input_ids"], "position_ids": shard["position_ids"],
                 "attention_mask": torch.ones_like(shard["input_ids"]), "use_cache": False}
    model(**arguments)
    costs = {}
    for case in ("same positions", "new positions"):
        if case == "new positions":
            arguments["position_ids"] = arguments["position_ids"].clone()
        with count_ops() as counts:
            model(**arguments)
        costs[case] = {n: c for n, c in counts.items() if n.startswith("c10d.") or "_local_scalar_dense" in n}
    return costs
