"""Long-context inference: a sequence-sharded KV cache, chunked prefill and decode, exact against float64.

Most tests run N ranks as threads of this process (tests/threaded_world.py)
through the real executor and CPU kernel; generation also runs on gloo
processes.
"""

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tokenring.runtime.executor import Executor
from tokenring.inference import (
    ShardedKVCache,
    attend_with_cache,
    choose_prefill_algorithm,
    place_chunk,
    prefill_mask,
)
from tokenring.proofs.masked import check_masked_plan
from tokenring.schedules.masked import mask_plan
from tokenring.placement.masks import TokenMask
from tokenring.plan.model import ALL, Block, Payload, Plan, Step, Transfer
from tokenring.proofs.plancheck import PlanError, check_plan
from tokenring.schedules.build import build_plan
from tokenring.reference import reference_attention
from tokenring.plan.traffic import record_traffic
from tokenring.proofs.replicated import check_replicated_plan
from tokenring.schedules.replicated import decode_plan
from tokenring.interfaces import Mask
from tokenring.placement.layout import Layout
from tokenring_cpu.kernel import CpuSdpaKernel

from threaded_world import ThreadComm, _Mailboxes


class ThreadedCaches:
    """N caches whose executors talk through threads; ``run(fn)`` calls fn(rank, cache) on every rank at once."""

    def __init__(self, n, kernel=CpuSdpaKernel, **kwargs):
        mail = _Mailboxes()
        self.comms = [ThreadComm(r, n, mail) for r in range(n)]
        self.caches = [ShardedKVCache(executor=Executor(c, kernel()), **kwargs) for c in self.comms]
        self.n = n
        self.sent = []

    def run(self, fn):
        def one(rank):
            with record_traffic() as sent:  # per thread: the log is a context variable
                result = fn(rank, self.caches[rank])
            self.sent += sent
            return result

        with ThreadPoolExecutor(self.n) as pool:
            return list(pool.map(one, range(self.n)))

    def sent_bytes(self):
        return sum(m.bytes for m in self.sent)


def random_sequence(seed, batch, seq_len, q_heads, kv_heads, head_dim=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, seq_len, h, head_dim, generator=g, dtype=dtype)
                 for h in (q_heads, kv_heads, kv_heads))


def run_chunks(world, chunks, q, k, v, algorithm="auto"):
    """Feed the sequence chunk by chunk (T == 1: decode); return the full output, rank 0's, and every rank's decode."""
    outputs, start, decoded_everywhere = [], 0, []
    for size in chunks:
        rows = slice(start, start + size)
        chunk = [c.extend(size) for c in world.caches]

        def one(rank, cache):
            ch = chunk[rank]
            return attend_with_cache(ch.shard(q[:, rows]), ch.shard(k[:, rows]), ch.shard(v[:, rows]), cache,
                                     algorithm=algorithm)

        parts = world.run(one)
        if chunk[0].replicated:
            decoded_everywhere.append(parts)
            outputs.append(parts[0])
        else:
            outputs.append(chunk[0].unshard(parts))
        start += size
    return torch.cat(outputs, dim=1), decoded_everywhere


# -- placement ---------------------------------------------------------------------------


def test_new_tokens_are_dealt_zigzag_and_keep_shards_within_one_token():
    rng = random.Random(0)
    for n in (1, 2, 3, 4, 5):
        lengths, start = [0] * n, 0
        for _ in range(40):
            size = rng.choice([1, 1, 2, 3, 7, 16, 33])
            runs = place_chunk(tuple(lengths), start, size)
            covered = sorted(p for rank_runs in runs for a, b in rank_runs for p in range(a, b))
            assert covered == list(range(start, start + size))
            for rank, rank_runs in enumerate(runs):
                assert len(rank_runs) <= 2
                lengths[rank] += sum(b - a for a, b in rank_runs)
            assert max(lengths) - min(lengths) <= 1, (n, lengths)
            start += size
        if n > 1:  # zigzag: the first rank's pieces sit at both ends of an even chunk
            runs = place_chunk((0,) * n, 0, 4 * n)
            assert runs[0] == ((0, 2), (4 * n - 2, 4 * n))


# -- plans: proven pair by pair ------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("algorithm", ["tokenring", "ring", "tokenring-2way", "ring-multi"])
def test_prefill_plans_against_a_cache_are_proven_pair_by_pair(world_size, algorithm):
    """Queries (the new tokens) and keys/values (the cache) are different tokens: TokenMask.kv_runs."""
    cache = ShardedKVCache(num_layers=1, batch=1, kv_heads=1, head_dim=4,
                           executor=Executor(ThreadComm(0, world_size, _Mailboxes()), CpuSdpaKernel()))
    full = build_plan(algorithm, "contiguous", False, world_size)
    for size in (5, 1, 1, 9, 2, 13):
        chunk = cache.extend(size, replicated=False)
        tokens = prefill_mask(cache, chunk, full.granularity)
        assert tokens.kv_runs is not None and tokens.kv_rows_per_rank * world_size >= cache.length
        plan = mask_plan(full, tokens)
        check_masked_plan(plan)
        check_plan(plan)


def test_a_mask_with_keys_of_other_tokens_counts_pairs_by_position():
    # rank 0 queries position 4, rank 1 position 5; keys 0..5 dealt unevenly with padding 6, 7
    tokens = TokenMask(8, (((4, 5),), ((5, 6),)), (0, 6), True, None,
                       (((0, 2), (4, 5)), ((2, 4), (5, 6))))
    assert (tokens.rows_per_rank, tokens.kv_rows_per_rank) == (1, 3)
    for algorithm in ("ring", "ring-2way"):  # plans whose spans fall on 1-row shards
        plan = mask_plan(build_plan(algorithm, "contiguous", False, 2), tokens)
        check_masked_plan(plan)
        check_plan(plan)
    with pytest.raises(ValueError, match="as many rows"):
        TokenMask(8, (((4, 5),), ((5, 7),)), (0, 6), True, None, (((0, 3),), ((3, 6),)))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("merge", ["gather", "tree"])
def test_decode_plans_are_proven(world_size, merge):
    if merge == "tree" and world_size & (world_size - 1):
        with pytest.raises(ValueError, match="power-of-two"):
            decode_plan(world_size, merge)
        return
    plan = decode_plan(world_size, merge)
    check_plan(plan)  # plancheck hands replicated-query plans to tokenring.schedules.replicated
    assert plan.replicated_queries and "replicated queries" in plan.describe()
    steps = 1 + (0 if world_size == 1 else (1 if merge == "gather" else world_size.bit_length() - 1))
    assert len(plan.steps) == steps


def test_the_replicated_checker_catches_missing_doubled_and_foreign_results():
    n = 4
    blocks = tuple(Block(r, r, ALL, r, ALL, Mask.NONE) for r in range(n))
    gather = tuple(Transfer(s, d, Payload.MERGED, s, ALL) for s in range(n) for d in range(n) if s != d)

    def plan(*steps):
        return Plan("hand", Layout.CONTIGUOUS, False, n, tuple(Step(i, *s) for i, s in enumerate(steps)),
                    replicated_queries=True)

    check_replicated_plan(plan((blocks, ()), ((), gather)))
    with pytest.raises(PlanError, match="missing"):
        check_replicated_plan(plan((blocks, ()), ((), gather[1:])))
    # gathering after a tree step counts rank r's partner twice
    tree_step = tuple(Transfer(r, r ^ 1, Payload.MERGED, r, ALL) for r in range(n))
    with pytest.raises(PlanError, match="duplicated"):
        check_replicated_plan(plan((blocks, ()), ((), tree_step), ((), gather)))
    with pytest.raises(PlanError, match="before it has any"):
        check_replicated_plan(plan(((), gather), (blocks, ())))
    with pytest.raises(PlanError, match="only its own"):
        check_replicated_plan(plan((blocks, ()), ((), (Transfer(0, 1, Payload.MERGED, 2, ALL),) + gather)))
    with pytest.raises(PlanError, match="another rank's"):
        check_replicated_plan(plan((blocks + (Block(0, 1, ALL, 1, ALL, Mask.NONE),), ()), ((), gather)))
    with pytest.raises(PlanError, match="does not belong"):
        check_replicated_plan(plan((blocks, ()), ((), gather + (Transfer(0, 1, Payload.QUERY, 0, ALL),))))


# -- exactness: chunked prefill and decode against float64 ------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("algorithm", ["auto", "tokenring", "ring"])
def test_chunked_prefill_and_decode_are_exact(world_size, heads, algorithm):
    chunks = [13, 1, 1, 7, 1, 20, 2, 1, 1, 1]
    q, k, v = random_sequence(world_size * 10 + heads[1], 2, sum(chunks), *heads)
    world = ThreadedCaches(world_size, num_layers=1, batch=2, kv_heads=heads[1], head_dim=8, dtype=torch.float64)
    got, decoded = run_chunks(world, chunks, q, k, v, algorithm)
    want, _ = reference_attention(q, k, v, causal=True)
    assert (got - want).abs().max() < 1e-12
    for parts in decoded:  # every rank ends with the decoded token's output
        for part in parts:
            assert (part - parts[0]).abs().max() < 1e-12
    lengths = world.caches[0].lengths
    assert sum(lengths) == sum(chunks) and max(lengths) - min(lengths) <= 1
    for cache in world.caches:  # every rank holds its own tokens' keys, at their positions
        positions = cache.positions()
        assert torch.equal(cache.keys(0), k[:, positions])


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("merge", ["gather", "tree"])
def test_decode_in_float32_matches_float64_and_lse_is_returned(world_size, merge):
    q, k, v = random_sequence(3, 3, 41, 4, 2, dtype=torch.float32)
    world = ThreadedCaches(world_size, num_layers=2, batch=3, kv_heads=2, head_dim=8, merge=merge)
    want, want_lse = reference_attention(q, k, v, causal=True)
    start = 0  # two layers share the placement, each with its own keys
    for size in (40, 1):
        chunk = [c.extend(size) for c in world.caches]
        for layer in range(2):
            def one(rank, cache, layer=layer):
                ch = chunk[rank]
                rows = slice(start, start + size)
                return attend_with_cache(ch.shard(q[:, rows]), ch.shard(k[:, rows]), ch.shard(v[:, rows]), cache,
                                         layer=layer, return_lse=True)
            results = world.run(one)
        start += size
    for out, lse in results:
        assert out.dtype == torch.float32 and lse.dtype == torch.float32
        assert (out.double() - want[:, -1:]).abs().max() < 1e-5
        assert (lse.double() - want_lse[:, :, -1:]).abs().max() < 1e-5


def test_a_rank_without_cached_tokens_still_gets_the_exact_output():
    q, k, v = random_sequence(5, 1, 2, 2, 2)
    world = ThreadedCaches(4, num_layers=1, batch=1, kv_heads=2, head_dim=8, dtype=torch.float64)
    got, _ = run_chunks(world, [1, 1], q, k, v)
    want, _ = reference_attention(q, k, v, causal=True)
    assert (got - want).abs().max() < 1e-12
    assert world.caches[0].lengths == [1, 1, 0, 0]


@pytest.mark.parametrize("kernel", ["cpu", "zeros-for-non-finite-rows"])
@pytest.mark.parametrize("algorithm", ["tokenring", "ring"])
@pytest.mark.parametrize("name", ["k", "v"])
def test_non_finite_keys_give_nan_not_a_finite_wrong_answer(name, algorithm, kernel):
    """Whatever the kernel does with the rows it cannot compute (tests/test_non_finite.py): later chunks and
    decoded tokens that see a cached non-finite key or value come out NaN."""
    from test_non_finite import KERNELS

    q, k, v = random_sequence(6, 1, 14, 2, 2)
    {"k": k, "v": v}[name][0, 3, 0, 0] = float("inf")
    world = ThreadedCaches(2, kernel=KERNELS[kernel], num_layers=1, batch=1, kv_heads=2, head_dim=8,
                           dtype=torch.float64)
    got, _ = run_chunks(world, [8, 4, 1, 1], q, k, v, algorithm=algorithm)
    assert torch.isnan(got[:, 8:]).all()


# -- traffic and memory ------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_decode_bytes_per_token_do_not_grow_with_the_cache(world_size):
    per_token = []
    for prompt in (16, 64, 256):
        q, k, v = random_sequence(7, 2, prompt + 1, 4, 2, dtype=torch.float32)
        world = ThreadedCaches(world_size, num_layers=1, batch=2, kv_heads=2, head_dim=8)
        run_chunks(world, [prompt], q, k, v)
        before = world.sent_bytes()
        run_chunks(world, [1], q[:, prompt:], k[:, prompt:], v[:, prompt:])
        per_token.append(world.sent_bytes() - before)
    assert len(set(per_token)) == 1, per_token
    # each rank sends its partial (out + lse) of the token to every other rank, nothing else
    partial = 2 * 4 * 8 * 4 + 2 * 4 * 4
    assert per_token[0] == world_size * (world_size - 1) * partial


def test_pass_q_is_chosen_for_a_small_chunk_against_a_long_cache_and_pass_kv_for_a_long_first_chunk():
    world = ThreadedCaches(4, num_layers=1, batch=1, kv_heads=2, head_dim=8)
    cache = world.caches[0]
    first = [c.extend(256, replicated=False) for c in world.caches][0]
    assert choose_prefill_algorithm(cache, first, q_heads=16, itemsize=2) == "ring"  # T*Hq > (T+P)*2*Hkv
    chunk = [c.extend(16, replicated=False) for c in world.caches][0]
    assert choose_prefill_algorithm(cache, chunk, q_heads=16, itemsize=2) == "tokenring"


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("max_tokens", [1000, None])
def test_each_rank_holds_about_one_nth_of_the_cache(world_size, max_tokens):
    def filled(n):
        caches = [ShardedKVCache(num_layers=2, batch=1, kv_heads=2, head_dim=8, max_tokens=max_tokens,
                                 executor=Executor(ThreadComm(r, n, _Mailboxes()), CpuSdpaKernel()))
                  for r in range(n)]
        for size in [300, 1, 1, 1, 200, 1, 1, 497]:
            for c in caches:
                c.extend(size, replicated=False if size > 1 else None)
                c._reserve(c.lengths[c.rank])
        return [c.nbytes() for c in caches]

    single = filled(1)[0]
    for nbytes in filled(world_size):
        assert nbytes <= 1.1 * single / world_size, (nbytes, single)


# -- the model: prefill + greedy decode -----------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_tiny_llama_generates_the_tokens_of_one_process(world_size, kv_heads):
    from tokenring.testing.inference_tasks import prompt_ids
    from tokenring.testing.tiny_llama import TinyLlamaConfig, build_reference, greedy_reference, greedy_sharded, \
        sequence_parallel_copy

    config = TinyLlamaConfig(num_kv_heads=kv_heads)
    reference = build_reference(config, 0, torch.float64)
    prompt = prompt_ids(config, 0, 2, 37)
    want = greedy_reference(reference, prompt, 12)
    world = ThreadedCaches(world_size, num_layers=config.num_layers, batch=2, kv_heads=kv_heads,
                           head_dim=config.head_dim, dtype=torch.float64, max_tokens=37 + 12)
    models = [sequence_parallel_copy(reference) for _ in range(world_size)]
    got = world.run(lambda rank, cache: greedy_sharded(models[rank], prompt, 12, cache, chunk_size=10))
    for tokens in got:
        assert torch.equal(tokens, want)


@pytest.mark.parametrize("world_size", [2, 4])
def test_generation_on_processes_matches_one_process(worlds, world_size):
    from tokenring.testing.inference_tasks import generate_reference
    from tokenring.testing.tiny_llama import TinyLlamaConfig

    config = TinyLlamaConfig(num_kv_heads=2)
    want = generate_reference(config, 1, 2, 50, 10)
    results = worlds.get(world_size).run_ok("tokenring.testing.inference_tasks.generate", config, 1, 2, 50, 10, 16,
                                            timeout_s=240)
    for result in results:
        assert result["tokens"] == want
    assert sum(sum(r["lengths"]) for r in results[:1]) == 59
