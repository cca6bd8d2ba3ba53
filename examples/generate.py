"""Greedy generation on N ranks over a sequence-sharded KV cache, checked token for token against one process.

Every rank holds the (tiny, random) Llama whole and about 1/N of every
layer's KV cache (`tokenring.inference.ShardedKVCache`). The prompt is
prefilled in chunks (each rank runs its share of each chunk's tokens; the
new queries attend to the cache through pass-Q or pass-KV plans, whichever
moves fewer bytes), then tokens are decoded one at a time: every rank runs
the model on the new token, attends to its own shard of the cache, and the
partial results are merged on every rank. The tokens must equal those of one
process running plain attention on the whole sequence.

    python examples/generate.py                          # 2 ranks, 512-token prompt, 32 new tokens
    python examples/generate.py --world-size 4 --prompt-len 4096 --new-tokens 64 --chunk 1024
    torchrun --nproc-per-node 4 examples/generate.py --prompt-len 4096

Exit status 0 when every rank's tokens equal the one-process tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from tokenring.testing.tiny_llama import TinyLlamaConfig
from tokenring.tools.launch import LocalWorld

CONFIG = {
    "mha": TinyLlamaConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                           intermediate_size=128),
    "gqa": TinyLlamaConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2,
                           intermediate_size=128),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=None, help="ranks to start (default 2); under torchrun, torchrun's")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=None, help="prefill chunk (default: the whole prompt)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", choices=sorted(CONFIG), default="gqa")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    config = CONFIG[args.heads]
    task_args = (config, args.seed, args.batch, args.prompt_len, args.new_tokens, args.chunk, args.dtype)

    if all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")):
        return generate_in_torchrun_world(args, task_args)
    args.world_size = args.world_size or 2
    start = time.perf_counter()
    with LocalWorld(args.world_size, tokenring_backend="cpu",
                    threads_per_rank=max(1, (os.cpu_count() or 1) // args.world_size)) as world:
        ranks = world.run_ok("tokenring.testing.inference_tasks.generate", *task_args, timeout_s=args.timeout)
    seconds = time.perf_counter() - start
    return report(args, ranks, seconds)


def generate_in_torchrun_world(args: argparse.Namespace, task_args: tuple) -> int:
    import torch.distributed as dist

    from tokenring.testing.inference_tasks import generate

    os.environ.setdefault("TOKENRING_BACKEND", "cpu")
    dist.init_process_group("gloo")  # env://
    rank, args.world_size = dist.get_rank(), dist.get_world_size()
    try:
        start = time.perf_counter()
        mine = generate(rank, args.world_size, *task_args)
        seconds = time.perf_counter() - start
        ranks = [None] * args.world_size if rank == 0 else None
        dist.gather_object(mine, ranks, dst=0)
        status = [report(args, ranks, seconds) if rank == 0 else None]
        dist.broadcast_object_list(status, src=0)
        return status[0]
    finally:
        dist.destroy_process_group()


def report(args: argparse.Namespace, ranks: list[dict], seconds: float) -> int:
    from tokenring.testing.inference_tasks import generate_reference

    config = CONFIG[args.heads]
    want = generate_reference(config, args.seed, args.batch, args.prompt_len, args.new_tokens, args.dtype)
    same = all(r["tokens"] == want for r in ranks)
    print(f"model: {config.num_layers} layers, {config.num_heads} heads ({config.num_kv_heads} KV), "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new, chunk {args.chunk or args.prompt_len - 1}, "
          f"{args.dtype}")
    for rank, r in enumerate(ranks):
        print(f"rank {rank}/{args.world_size}: {sum(r['lengths'])} tokens cached, {r['lengths'][rank]} here, "
              f"cache {r['cache_bytes'] / 2**20:.2f} MiB")
    print(f"first tokens: {want[0][:16]}")
    print(f"{'OK' if same else 'FAILED'}: {args.world_size} ranks generated "
          f"{'the same tokens as' if same else 'other tokens than'} one process ({seconds:.1f} s)", flush=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
