"""Inference tasks for `tokenring.tools.launch.LocalWorld`: greedy generation over a sharded KV cache.

Each task is called as ``task(rank, world_size, *args)`` on every rank of a
gloo world and returns plain data.
"""

from __future__ import annotations

import torch

from tokenring.inference import ShardedKVCache
from tokenring.tools.problems import DTYPES
from tokenring.testing.tiny_llama import TinyLlamaConfig, build_reference, greedy_reference, greedy_sharded, \
    sequence_parallel_copy


def prompt_ids(config: TinyLlamaConfig, seed: int, batch: int, length: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 7)
    return torch.randint(config.vocab_size, (batch, length), generator=generator)


def generate(rank: int, world_size: int, config: TinyLlamaConfig, seed: int, batch: int, prompt_len: int,
             new_tokens: int, chunk_size: int | None, dtype: str = "float64", algorithm: str = "auto") -> dict:
    """Greedy tokens generated on every rank of the world, with the cache's bytes on this rank."""
    reference = build_reference(config, seed, DTYPES[dtype])
    model = sequence_parallel_copy(reference, algorithm=algorithm)
    cache = ShardedKVCache(num_layers=config.num_layers, batch=batch, kv_heads=config.num_kv_heads,
                           head_dim=config.head_dim, dtype=DTYPES[dtype], max_tokens=prompt_len + new_tokens)
    tokens = greedy_sharded(model, prompt_ids(config, seed, batch, prompt_len), new_tokens, cache, chunk_size)
    return {"tokens": tokens.tolist(), "cache_bytes": cache.nbytes(), "lengths": list(cache.lengths)}


def generate_reference(config: TinyLlamaConfig, seed: int, batch: int, prompt_len: int, new_tokens: int,
                       dtype: str = "float64") -> list:
    """The same generation in one process with plain attention."""
    model = build_reference(config, seed, DTYPES[dtype])
    return greedy_reference(model, prompt_ids(config, seed, batch, prompt_len), new_tokens).tolist()


def _filled_cache(rank: int, world_size: int, cache_len: int, extra: int, kv_heads: int, head_dim: int,
                  dtype: torch.dtype) -> ShardedKVCache:
    """A one-layer cache holding ``cache_len`` random tokens, written straight in (no attention run)."""
    cache = ShardedKVCache(num_layers=1, batch=1, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
                           max_tokens=cache_len + extra)
    cache.extend(cache_len, replicated=False)
    rows = cache.lengths[rank]
    generator = torch.Generator().manual_seed(rank)
    cache._keys[0][:, :rows].normal_(generator=generator)  # in place: no temporary as large as the shard
    cache._values[0][:, :rows].normal_(generator=generator)
    return cache


def decode_benchmark(rank: int, world_size: int, cache_len: int, steps: int, q_heads: int, kv_heads: int,
                     head_dim: int, mode: str, dtype: str = "float32") -> dict:
    """Seconds and bytes sent per decoded token (one layer's attention) against a cache of ``cache_len``.

    mode "replicated": every rank holds the token's query and attends to its
    own shard, partials merge on every rank (ours); "ring" / "tokenring": the
    token's query lives on one rank and the masked plan of that schedule runs
    (pass-KV: the cache travels; pass-Q: the query travels).
    """
    import time

    from tokenring.inference import attend_with_cache
    from tokenring.tools.tasks import peak_memory
    from tokenring.plan.traffic import record_traffic

    torch_dtype = DTYPES[dtype]
    warmup = 2
    generator = torch.Generator().manual_seed(1234)  # the same new tokens on every rank
    times, sent_bytes = [], 0
    with peak_memory() as peak:  # the rise over the process's start: the cache and every decode step
        cache = _filled_cache(rank, world_size, cache_len, steps + warmup, kv_heads, head_dim, torch_dtype)
        for step in range(steps + warmup):
            chunk = cache.extend(1, replicated=mode == "replicated")
            q = torch.randn(1, 1, q_heads, head_dim, generator=generator).to(torch_dtype)
            k, v = (torch.randn(1, 1, kv_heads, head_dim, generator=generator).to(torch_dtype) for _ in range(2))
            q, k, v = (chunk.shard(t) for t in (q, k, v))
            with record_traffic() as sent:
                start = time.perf_counter()
                attend_with_cache(q, k, v, cache, algorithm=mode if mode != "replicated" else "auto")
                seconds = time.perf_counter() - start
            if step >= warmup:
                times.append(seconds)
                sent_bytes += sum(m.bytes for m in sent)
    times.sort()
    return {"seconds": times[len(times) // 2], "bytes_per_token": sent_bytes / steps, "cache_bytes": cache.nbytes(),
            "peak_mem_bytes": peak["bytes"]}


def prefill_benchmark(rank: int, world_size: int, cache_len: int, chunk_len: int, q_heads: int, kv_heads: int,
                      head_dim: int, algorithm: str, repeats: int = 1, dtype: str = "float32") -> dict:
    """Seconds and bytes for one prefill chunk of ``chunk_len`` tokens against a cache of ``cache_len``."""
    import time

    from tokenring.inference import attend_with_cache
    from tokenring.plan.traffic import record_traffic

    torch_dtype = DTYPES[dtype]
    times, sent_bytes = [], 0
    for _ in range(repeats):
        cache = _filled_cache(rank, world_size, cache_len, chunk_len, kv_heads, head_dim, torch_dtype)
        chunk = cache.extend(chunk_len, replicated=False)
        generator = torch.Generator().manual_seed(99)
        q = torch.randn(1, chunk_len, q_heads, head_dim, generator=generator).to(torch_dtype)
        k, v = (torch.randn(1, chunk_len, kv_heads, head_dim, generator=generator).to(torch_dtype) for _ in range(2))
        q, k, v = (chunk.shard(t) for t in (q, k, v))
        with record_traffic() as sent:
            start = time.perf_counter()
            attend_with_cache(q, k, v, cache, algorithm=algorithm)
            times.append(time.perf_counter() - start)
        sent_bytes = sum(m.bytes for m in sent)
        chosen = cache.last_algorithm
    return {"seconds": min(times), "bytes": sent_bytes, "algorithm": chosen}


def prefill_planning_share(rank: int, world_size: int, cache_len: int, chunk_len: int, chunks: int, q_heads: int,
                           kv_heads: int, head_dim: int, algorithm: str, dtype: str = "float32") -> list[dict]:
    """Per chunk of a chunked prefill: the call's seconds and the seconds spent planning inside it.

    Every chunk meets a cache of a new length, so each needs a new plan, as a real prefill does.
    Planning is what happens before the first message: the chunk's token mask, the masked plan
    (built and proven), this rank's program, and the blocks' position masks; each is timed
    where it is called, by wrapping it for the length of this task.
    """
    import time

    from tokenring import inference
    from tokenring.runtime.executor import Executor

    seconds = {"plan": 0.0}

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds["plan"] += time.perf_counter() - start
        return wrapper

    originals = (inference.prefill_mask, inference.build_masked_plan, Executor.program, Executor.masks_for)
    inference.prefill_mask, inference.build_masked_plan = timed(originals[0]), timed(originals[1])
    Executor.program = timed(originals[2])
    made = originals[3]
    Executor.masks_for = lambda self, plan, device: timed(made(self, plan, device))
    try:
        torch_dtype = DTYPES[dtype]
        cache = _filled_cache(rank, world_size, cache_len, chunk_len * chunks, kv_heads, head_dim, torch_dtype)
        generator = torch.Generator().manual_seed(99)
        rows = []
        for _ in range(chunks):
            chunk = cache.extend(chunk_len, replicated=False)
            q = torch.randn(1, chunk_len, q_heads, head_dim, generator=generator).to(torch_dtype)
            k, v = (torch.randn(1, chunk_len, kv_heads, head_dim, generator=generator).to(torch_dtype)
                    for _ in range(2))
            q, k, v = (chunk.shard(t) for t in (q, k, v))
            seconds["plan"] = 0.0
            start = time.perf_counter()
            inference.attend_with_cache(q, k, v, cache, algorithm=algorithm)
            rows.append({"cache": cache.length - chunk_len, "seconds": time.perf_counter() - start,
                         "plan_seconds": seconds["plan"], "algorithm": cache.last_algorithm})
        return rows
    finally:
        inference.prefill_mask, inference.build_masked_plan, Executor.program, Executor.masks_for = originals
