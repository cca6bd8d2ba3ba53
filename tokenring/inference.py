"""Long-context inference: a sequence-sharded KV cache, chunked prefill and decode, through plans.

Each rank of the group holds about 1/N of every layer's cached keys/values
(`ShardedKVCache`). New tokens are attended to in one of two ways, both run
by the one executor on plans that are proven before they run:

* **chunked prefill** (`ShardedKVCache.extend(T)`): a chunk of T new tokens
  is dealt over the ranks zigzag-style (each rank an early and a late piece
  of the chunk; the extra tokens of an uneven chunk go to the ranks holding
  the fewest), each rank appends its new tokens' keys/values to its shard,
  and the new queries attend causally to every cached token and to each
  other. That is a masked plan (`tokenring.schedules.masked`) whose query
  tokens (the new ones) differ from its key/value tokens (the whole cache):
  `TokenMask.kv_runs`. Any schedule runs it: ``"tokenring"`` (pass-Q: the
  queries travel, partial results go home) or ``"ring"`` (pass-KV: the
  cache travels); ``"auto"`` takes the one whose plan moves fewer bytes on
  its busiest links, which is pass-Q when T·Hq is small next to
  (T + P)·2·Hkv.
* **decode** (``extend(1)``, one token per sequence, batch B >= 1): every
  rank runs the model on the new token, so every rank holds its query; the
  token's keys/values go to the rank holding the fewest. Each rank attends
  to its own shard of the cache and the partial results are merged on every
  rank (`tokenring.schedules.replicated`: straight to every rank, or a tree), so each
  rank reads 1/N of the cache and the bytes per token do not depend on the
  cache's length. Every rank ends with the exact output.

The cache records every cached token's global position, so masks and rotary
embeddings stay exact (`Chunk.positions`). Sequences of one batch share
their positions (prompts of one length, decoded in lockstep).

Usage, on every rank of the group (``attend_with_cache`` once per layer)::

    cache = ShardedKVCache(num_layers=L, batch=B, kv_heads=Hkv, head_dim=D, dtype=dtype)
    chunk = cache.extend(T)                 # the same call on every rank
    x = chunk.shard(prompt_chunk_ids)       # this rank's tokens of the chunk, (B, rows)
    pos = chunk.positions()                 # their global positions, for rotary
    out = attend_with_cache(q, k, v, cache, layer=l)  # this rank's rows; decode: every rank's (B, 1, Hq, D)

No agreement round precedes each call (a decode step cannot afford one per
layer): every rank must make the same calls with the same shapes, as in a
model's forward.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import torch

from tokenring.runtime.executor import Executor
from tokenring.runtime.finite import poison_of
from tokenring.runtime.groups import resolve_group
from tokenring.interfaces import Channel, Recv, Send
from tokenring.placement.masks import Runs, TokenMask, clear_tables
from tokenring.plan.model import Plan, ProblemShape
from tokenring.schedules.build import build_masked_plan, build_plan
from tokenring.schedules.replicated import decode_plan, default_merge
from tokenring.runtime.executors import open_executor, resolve_backend, timeout_s as default_timeout_s
from tokenring.sequence import rank_and_world_size
from tokenring.plan.traffic import recording

__all__ = ["Chunk", "ShardedKVCache", "attend_with_cache", "choose_prefill_algorithm", "place_chunk"]

PREFILL_ALGORITHMS = ("tokenring", "ring")


def place_chunk(lengths: tuple[int, ...], start: int, num_tokens: int) -> tuple[Runs, ...]:
    """Which of the new tokens [start, start + num_tokens) each rank takes, given the ranks' cache lengths.

    Every rank takes num_tokens // N; the rest go one each to the ranks
    holding the fewest (ties: the lowest rank), so shards never differ by
    more than one token. Each rank's tokens are an early and a late piece of
    the chunk (zigzag: rank r's pieces are r and 2N-1-r of the chunk), so
    the causal work within the chunk is even too.
    """
    n = len(lengths)
    counts = [num_tokens // n] * n
    for rank in sorted(range(n), key=lambda r: (lengths[r], r))[: num_tokens % n]:
        counts[rank] += 1
    first = [c // 2 for c in counts]
    second = [c - f for c, f in zip(counts, first)]
    runs: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    position = start
    for rank in list(range(n)):
        if first[rank]:
            runs[rank].append((position, position + first[rank]))
        position += first[rank]
    for rank in reversed(range(n)):
        if second[rank]:
            runs[rank].append((position, position + second[rank]))
        position += second[rank]
    return tuple(tuple(r) for r in runs)


@dataclass(frozen=True)
class Chunk:
    """New tokens [start, start + length) and where they went."""

    start: int                  # global position of the first new token (the cache's length before)
    length: int                 # T
    runs: tuple[Runs, ...]      # per rank: the new tokens whose keys/values it appends (and queries, unless replicated)
    rows_before: tuple[int, ...]  # per rank: its cache rows before this chunk
    replicated: bool            # decode: every rank holds every new token's query
    rank: int

    @property
    def world_size(self) -> int:
        return len(self.runs)

    def count(self, rank: int | None = None) -> int:
        """New tokens ``rank`` (default: this one) appends."""
        return sum(b - a for a, b in self.runs[self.rank if rank is None else rank])

    @property
    def query_rows(self) -> int:
        """Rows of this rank's new queries: its new tokens, or every new token when replicated."""
        return self.length if self.replicated else self.count()

    def positions(self, rank: int | None = None, device: Any = None) -> torch.Tensor:
        """Global positions of ``rank``'s query rows (int64): the rotary positions of its new tokens."""
        if self.replicated:
            return torch.arange(self.start, self.start + self.length, device=device)
        runs = self.runs[self.rank if rank is None else rank]
        if not runs:
            return torch.zeros(0, dtype=torch.int64, device=device)
        return torch.cat([torch.arange(a, b, device=device) for a, b in runs])

    def shard(self, x: torch.Tensor, dim: int = 1, rank: int | None = None) -> torch.Tensor:
        """``rank``'s rows of ``x``, which holds the whole chunk along ``dim`` (replicated: x itself)."""
        if x.shape[dim] != self.length:
            raise ValueError(f"argument 'x': expected the chunk's {self.length} tokens along dim {dim}, "
                             f"got {x.shape[dim]}")
        if self.replicated:
            return x
        runs = self.runs[self.rank if rank is None else rank]
        pieces = [x.narrow(dim, a - self.start, b - a) for a, b in runs]
        return torch.cat(pieces, dim=dim) if pieces else x.narrow(dim, 0, 0)

    def unshard(self, parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """The whole chunk from every rank's rows (the inverse of `shard`)."""
        if self.replicated:
            return parts[0]
        pieces: list[tuple[int, torch.Tensor]] = []
        for rank, part in enumerate(parts):
            row = 0
            for a, b in self.runs[rank]:
                pieces.append((a, part.narrow(dim, row, b - a)))
                row += b - a
        return torch.cat([p for _, p in sorted(pieces, key=lambda item: item[0])], dim=dim)

    def owner_of(self, position: int) -> int:
        """The rank that appended the token at ``position`` (and, unless replicated, holds its query)."""
        for rank, runs in enumerate(self.runs):
            if any(a <= position < b for a, b in runs):
                return rank
        raise ValueError(f"position {position} is not in this chunk [{self.start}, {self.start + self.length})")


class ShardedKVCache:
    """This rank's share of every layer's cached keys/values, and where every cached token sits.

    Args:
        num_layers, batch, kv_heads, head_dim: the cache's sizes; keys and
            values of layer l are (batch, rows, kv_heads, head_dim).
        dtype, device: of the cached tensors.
        max_tokens: the most tokens it will hold, all ranks together; each
            rank then allocates its 1/N share once (plus at most a row or
            two). Without it, shards grow by an eighth when full.
        group, backend: as for `tokenring.token_ring_attn` (default: the
            world group, the backend for the device).
        executor: an `Executor` to run on instead (tests: ranks as threads).
        merge: how decode merges partial results ("gather", "tree"; None: `replicated.default_merge`).

    Every rank builds its cache with the same arguments and makes the same
    `extend` calls, so every rank knows where every token is.
    """

    def __init__(self, *, num_layers: int, batch: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: Any = None, max_tokens: int | None = None,
                 group: Any = None, backend: str | None = None, executor: Executor | None = None,
                 merge: str | None = None) -> None:
        if num_layers < 1 or batch < 1 or kv_heads < 1 or head_dim < 1:
            raise ValueError("num_layers, batch, kv_heads and head_dim must be >= 1")
        self.group, self.backend = group, backend
        self._executor = executor
        if executor is not None:
            self.rank, self.world_size = executor.comm.rank, executor.comm.world_size
        else:
            self.rank, self.world_size = rank_and_world_size(group)
        self.num_layers, self.batch, self.kv_heads, self.head_dim = num_layers, batch, kv_heads, head_dim
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.merge = merge if merge is not None else default_merge(self.world_size)
        self.length = 0                                    # tokens cached, all ranks together
        self.lengths = [0] * self.world_size               # rows per rank
        self.runs: list[list[tuple[int, int]]] = [[] for _ in range(self.world_size)]  # positions per rank
        self.chunk: Chunk | None = None                    # the last extend
        self._written: set[int] = set()                    # layers whose rows of the last chunk are written
        capacity = 0 if max_tokens is None else -(-max_tokens // self.world_size) + 2
        self._keys = [self._zeros(capacity) for _ in range(num_layers)]
        self._values = [self._zeros(capacity) for _ in range(num_layers)]
        # Per layer: NaN once a non-finite key or value was cached (tokenring.runtime.finite), so no call re-reads the
        # cache for it.
        self._kv_poison = [torch.zeros((), device=self.device) for _ in range(num_layers)]
        self.last_algorithm: str | None = None             # the schedule of the last prefill attention

    # -- bookkeeping -------------------------------------------------------------

    def _zeros(self, rows: int) -> torch.Tensor:
        # Zeros, never garbage: rows past a rank's length are padding that a masked block may multiply by 0.
        return torch.zeros(self.batch, rows, self.kv_heads, self.head_dim, dtype=self.dtype, device=self.device)

    @property
    def capacity(self) -> int:
        return self._keys[0].shape[1]

    def _reserve(self, rows: int) -> None:
        if rows <= self.capacity:
            return
        grown = max(rows, self.capacity + self.capacity // 8 + 16)
        for store in (self._keys, self._values):
            for layer, old in enumerate(store):
                new = self._zeros(grown)
                new[:, : old.shape[1]] = old
                store[layer] = new

    def extend(self, num_tokens: int, *, replicated: bool | None = None) -> Chunk:
        """Place the next ``num_tokens`` tokens (the same call on every rank) and make them the current chunk.

        ``replicated`` (default: ``num_tokens == 1``) means every rank holds
        the new token's query (decode); only one token per sequence can be
        decoded that way.
        """
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"argument 'num_tokens': expected an integer >= 1, got {num_tokens!r}")
        replicated = num_tokens == 1 if replicated is None else bool(replicated)
        if replicated and num_tokens != 1:
            raise ValueError("replicated queries take one new token per sequence (decode); "
                             f"got {num_tokens}: use extend({num_tokens}, replicated=False)")
        if self.chunk is not None and not self.chunk.replicated:
            clear_tables()  # the last prefill chunk's mask tables (as long as the cache) are not needed again
        runs = place_chunk(tuple(self.lengths), self.length, num_tokens)
        chunk = Chunk(self.length, num_tokens, runs, tuple(self.lengths), replicated, self.rank)
        for rank, rank_runs in enumerate(runs):
            for a, b in rank_runs:
                if self.runs[rank] and self.runs[rank][-1][1] == a:
                    self.runs[rank][-1] = (self.runs[rank][-1][0], b)
                else:
                    self.runs[rank].append((a, b))
                self.lengths[rank] += b - a
        self.length += num_tokens
        self._reserve(self.lengths[self.rank])
        self.chunk = chunk
        self._written = set()
        return chunk

    def positions(self, rank: int | None = None) -> torch.Tensor:
        """Global positions of ``rank``'s cached rows, in row order."""
        runs = self.runs[self.rank if rank is None else rank]
        if not runs:
            return torch.zeros(0, dtype=torch.int64)
        return torch.cat([torch.arange(a, b) for a, b in runs])

    def keys(self, layer: int) -> torch.Tensor:
        """This rank's cached keys of ``layer``: (B, rows, Hkv, D)."""
        return self._keys[layer][:, : self.lengths[self.rank]]

    def values(self, layer: int) -> torch.Tensor:
        return self._values[layer][:, : self.lengths[self.rank]]

    def nbytes(self) -> int:
        """Bytes this rank allocates for the cache (every layer, keys and values)."""
        return sum(t.numel() * t.element_size() for store in (self._keys, self._values) for t in store)

    @property
    def executor(self) -> Executor:
        if self._executor is None:  # the executor token_ring_attn uses for this backend and group
            probe = torch.empty(0, device=self.device)
            self._executor = open_executor(resolve_backend(self.backend, probe), resolve_group(self.group))
        return self._executor

    def kv_poison(self, layer: int) -> torch.Tensor:
        """0-dim: 0 while this rank's cached keys and values of ``layer`` are finite, NaN after (no host sync)."""
        return self._kv_poison[layer]

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        chunk = self.chunk
        assert chunk is not None
        if layer in self._written:
            raise RuntimeError(f"layer {layer} already attended to the current chunk; call extend() first")
        count = chunk.count()
        row = chunk.rows_before[self.rank]
        if chunk.replicated:  # every rank computed the new token's k, v; its owner keeps them
            if count:
                self._keys[layer][:, row : row + 1] = k
                self._values[layer][:, row : row + 1] = v
        elif count:
            self._keys[layer][:, row : row + count] = k
            self._values[layer][:, row : row + count] = v
        if count:
            self._kv_poison[layer] = self._kv_poison[layer] + poison_of(k) + poison_of(v)
        self._written.add(layer)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


_granularity_lock = threading.Lock()
_granularities: dict[tuple[str, int], int] = {}


def _granularity(algorithm: str, world_size: int) -> int:
    key = (algorithm, world_size)
    with _granularity_lock:
        if key not in _granularities:
            _granularities[key] = build_plan(algorithm, "contiguous", False, world_size).granularity
        return _granularities[key]


def prefill_mask(cache: ShardedKVCache, chunk: Chunk, granularity: int) -> TokenMask:
    """The token mask of a prefill chunk: the new tokens' queries against every cached token, causal.

    Shards are padded to equal lengths (a multiple of ``granularity``) with
    padding tokens, placed after the last real position: they see nothing and
    nothing sees them.
    """
    n, end = cache.world_size, cache.length
    q_rows = _round_up(max(chunk.count(r) for r in range(n)), granularity)
    kv_rows = _round_up(max(cache.lengths), granularity)
    pad = end
    q_runs, kv_runs = [], []
    for rank in range(n):
        runs = list(chunk.runs[rank])
        missing = q_rows - chunk.count(rank)
        if missing:
            runs.append((pad, pad + missing))
            pad += missing
        q_runs.append(tuple(runs))
    for rank in range(n):
        runs = list(cache.runs[rank])
        missing = kv_rows - cache.lengths[rank]
        if missing:
            runs.append((pad, pad + missing))
            pad += missing
        kv_runs.append(tuple(runs))
    return TokenMask(pad, tuple(q_runs), (0, end), True, None, tuple(kv_runs))


def _busiest_link_bytes(plan: Plan, shape: ProblemShape) -> int:
    per_step: dict[int, int] = {}
    for traffic in plan.link_bytes(shape):
        per_step[traffic.step] = max(per_step.get(traffic.step, 0), traffic.bytes)
    return sum(per_step.values())


def choose_prefill_algorithm(cache: ShardedKVCache, chunk: Chunk, q_heads: int, itemsize: int) -> str:
    """Pass-Q ("tokenring") or pass-KV ("ring"), whichever plan moves fewer bytes on its busiest link per step.

    Roughly: queries travel when T·Hq is small next to (T + P)·2·Hkv.
    """
    best = None
    for algorithm in PREFILL_ALGORITHMS:
        granularity = math.lcm(*(_granularity(a, cache.world_size) for a in PREFILL_ALGORITHMS))
        tokens = prefill_mask(cache, chunk, granularity)
        plan = build_masked_plan(algorithm, tokens)
        acc = 8 if itemsize == 8 else 4
        shape = ProblemShape(cache.batch, tokens.rows_per_rank, q_heads, cache.kv_heads, cache.head_dim, itemsize,
                             acc, tokens.kv_rows_per_rank)
        cost = _busiest_link_bytes(plan, shape)
        if best is None or cost < best[0]:
            best = (cost, algorithm)
    assert best is not None
    return best[1]


_decode_plans: dict[tuple[int, str], Plan] = {}


def attend_with_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: ShardedKVCache,
    *,
    layer: int = 0,
    algorithm: str = "auto",
    softmax_scale: float | None = None,
    return_lse: bool = False,
    timeout_s: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of the current chunk's new queries to the cache and to themselves (causal).

    q is (B, rows, Hq, D) and k, v (B, rows, Hkv, D) with rows = this
    rank's new tokens (`Chunk.shard`), or in decode the one new token on
    every rank. Appends k and v to ``layer`` of the cache, then attends.
    Returns this rank's rows of the output (decode: the token's output, the
    same on every rank), with lse (B, Hq, rows) when ``return_lse``.

    ``algorithm`` for a prefill chunk: "tokenring" (pass-Q), "ring"
    (pass-KV), another registered schedule, or "auto"
    (`choose_prefill_algorithm`). Decode always runs the replicated-query
    plan (`tokenring.schedules.replicated`).
    """
    chunk = cache.chunk
    if chunk is None:
        raise RuntimeError("attend_with_cache: call cache.extend(num_tokens) first")
    if not 0 <= layer < cache.num_layers:
        raise ValueError(f"argument 'layer': expected 0 <= layer < {cache.num_layers}, got {layer}")
    rows = chunk.query_rows
    batch, hkv, d = cache.batch, cache.kv_heads, cache.head_dim
    if q.dim() != 4 or q.shape[0] != batch or q.shape[1] != rows or q.shape[3] != d or q.shape[2] % hkv:
        raise ValueError(f"argument 'q': expected ({batch}, {rows}, a multiple of {hkv}, {d}), got {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != (batch, rows, hkv, d):
            raise ValueError(f"argument '{name}': expected {(batch, rows, hkv, d)}, got {tuple(t.shape)}")
    if q.dtype != cache.dtype or k.dtype != cache.dtype or v.dtype != cache.dtype:
        raise ValueError(f"q, k and v must be {cache.dtype}, as the cache; got {q.dtype}, {k.dtype}, {v.dtype}")
    scale = float(softmax_scale) if softmax_scale is not None else d ** -0.5
    if timeout_s is None:
        timeout_s = default_timeout_s()
    # The cache keeps its keys' and values' poison as they enter (tokenring.runtime.finite): no call re-reads the
    # whole cache for it.
    cache._write(layer, k, v)
    executor = cache.executor
    if chunk.replicated:
        key = (cache.world_size, cache.merge)
        plan = _decode_plans.get(key)
        if plan is None:
            plan = _decode_plans[key] = decode_plan(cache.world_size, cache.merge)
        with recording(executor.comm):
            out, lse = executor.forward(plan, q, cache.keys(layer), cache.values(layer), scale=scale,
                                        timeout_s=timeout_s, kv_poison=cache.kv_poison(layer))
        return (out, lse) if return_lse else out
    if algorithm == "auto":
        algorithm = choose_prefill_algorithm(cache, chunk, q.shape[2], q.element_size())
    cache.last_algorithm = algorithm
    granularity = _granularity(algorithm, cache.world_size)
    if algorithm in PREFILL_ALGORITHMS:  # the same padding whichever was chosen: one mask, plans cached by it
        granularity = math.lcm(*(_granularity(a, cache.world_size) for a in PREFILL_ALGORITHMS))
    tokens = prefill_mask(cache, chunk, granularity)
    plan = build_masked_plan(algorithm, tokens)
    q_rows, kv_rows = tokens.rows_per_rank, tokens.kv_rows_per_rank
    cache._reserve(kv_rows)
    if q_rows != rows:
        padded = torch.zeros((batch, q_rows, *q.shape[2:]), dtype=q.dtype, device=q.device)
        padded[:, :rows] = q
        q = padded
    keys, values = cache._keys[layer][:, :kv_rows], cache._values[layer][:, :kv_rows]
    with recording(executor.comm):
        out, lse = executor.forward(plan, q, keys, values, scale=scale, timeout_s=timeout_s,
                                    kv_poison=cache.kv_poison(layer))
    out, lse = out[:, :rows], lse[:, :, :rows]
    return (out, lse) if return_lse else out


def agree_on_tokens(cache: ShardedKVCache, tokens: torch.Tensor, *, timeout_s: float | None = None) -> torch.Tensor:
    """Rank 0's ``tokens`` on every rank of the cache's group (one small message to each other rank).

    In decode every rank computes the same logits up to rounding (partial
    results merge in a different order on each rank); taking rank 0's choice
    keeps the ranks' sequences identical even on a near tie.
    """
    executor = cache.executor
    comm = executor.comm
    if comm.world_size == 1:
        return tokens
    if timeout_s is None:
        timeout_s = default_timeout_s()
    tokens = tokens.contiguous()
    comm.sent.clear()  # not attention traffic: not counted
    if comm.rank == 0:
        handle = comm.exchange([Send(r, tokens) for r in range(1, comm.world_size)], [],
                               channel=Channel.QUERY, step=0)
        handle.wait(timeout_s)
        return tokens
    received = torch.empty_like(tokens)
    comm.exchange([], [Recv(0, received)], channel=Channel.QUERY, step=0).wait(timeout_s)
    return received
