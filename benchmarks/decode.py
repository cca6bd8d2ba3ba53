"""Decode and chunked prefill over a sequence-sharded KV cache, on CPU ranks (gloo): time, bytes, memory.

Decode (one token, one layer's attention, B = 1) against caches of 16K ... 128K
tokens, on N = 2 and 4 ranks and on one process holding the whole cache:

* ``replicated`` (ours): every rank holds the token's query, attends to its
  own 1/N of the cache, and the partials (out, lse) merge on every rank;
* ``ring`` (pass-KV through the same engine): the query lives on one rank
  and the cache shards travel round the ring.

Chunked prefill: chunks of 1K ... 8K tokens against a 64K cache, pass-Q
("tokenring") against pass-KV ("ring"), and what "auto" picks.

    python benchmarks/decode.py decode [--cache 16384 32768 65536 131072] [--world-sizes 2 4]
    python benchmarks/decode.py prefill [--cache 65536] [--chunks 1024 2048 4096 8192] [--world-sizes 2]

Prints one line per run; ``--json PATH`` writes them too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tokenring.tools.launch import LocalWorld

MIB = 2**20


def world(n: int) -> LocalWorld:
    threads = max(1, (os.cpu_count() or 1) // n)
    return LocalWorld(n, tokenring_backend="cpu", threads_per_rank=threads,
                      env={"TOKENRING_BACKEND": "cpu", "MALLOC_MMAP_THRESHOLD_": str(MIB)})


def decode(args) -> list[dict]:
    rows = []
    for n in [1, *args.world_sizes]:
        with world(n) as w:
            for mode in (["replicated"] if n == 1 else ["replicated", "ring"]):
                for cache in args.cache:
                    if mode == "ring" and cache > args.ring_max_cache:
                        continue
                    results = w.run_ok("tokenring.testing.inference_tasks.decode_benchmark", cache, args.steps,
                                       args.q_heads, args.kv_heads, args.head_dim, mode, timeout_s=1800)
                    row = {"kind": "decode", "N": n, "mode": mode if n > 1 else "one process", "cache": cache,
                           "ms_per_token": 1e3 * max(r["seconds"] for r in results),
                           "bytes_per_token": sum(r["bytes_per_token"] for r in results),
                           "cache_mib_per_rank": max(r["cache_bytes"] for r in results) / MIB,
                           "peak_mib_per_rank": max((r["peak_mem_bytes"] or 0) for r in results) / MIB}
                    print(f"decode N={n} {row['mode']:>11} cache {cache:>6}: {row['ms_per_token']:8.2f} ms/token, "
                          f"{row['bytes_per_token']:>11.0f} B/token (all ranks), cache {row['cache_mib_per_rank']:7.2f} "
                          f"MiB/rank, peak rise {row['peak_mib_per_rank']:7.1f} MiB/rank", flush=True)
                    rows.append(row)
    return rows


def prefill(args) -> list[dict]:
    rows = []
    for n in args.world_sizes:
        with world(n) as w:
            for chunk in args.chunks:
                for algorithm in ("tokenring", "ring", "auto"):
                    results = w.run_ok("tokenring.testing.inference_tasks.prefill_benchmark", args.cache[0], chunk,
                                       args.q_heads, args.kv_heads, args.head_dim, algorithm, args.repeats,
                                       timeout_s=3600)
                    row = {"kind": "prefill", "N": n, "algorithm": algorithm, "chosen": results[0]["algorithm"],
                           "cache": args.cache[0], "chunk": chunk,
                           "seconds": max(r["seconds"] for r in results), "bytes": sum(r["bytes"] for r in results)}
                    print(f"prefill N={n} cache {args.cache[0]} chunk {chunk:>5} {algorithm:>9} "
                          f"({row['chosen']}): {row['seconds']:7.3f} s, {row['bytes'] / MIB:8.2f} MiB sent", flush=True)
                    rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["decode", "prefill"])
    parser.add_argument("--cache", type=int, nargs="+", default=None)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=20, help="decode steps timed (median)")
    parser.add_argument("--repeats", type=int, default=1, help="prefill runs (best)")
    parser.add_argument("--ring-max-cache", type=int, default=131072, help="skip pass-KV decode above this cache")
    parser.add_argument("--q-heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.what == "decode":
        args.cache = args.cache or [16384, 32768, 65536, 131072]
        args.world_sizes = args.world_sizes or [2, 4]
        rows = decode(args)
    else:
        args.cache = args.cache or [65536]
        args.world_sizes = args.world_sizes or [2]
        rows = prefill(args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(rows, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
