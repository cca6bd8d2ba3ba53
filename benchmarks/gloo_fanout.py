"""Can the emulated full mesh carry several of a rank's links at once? Eight ranks, 0.1 Gbit/s links.

Each rank sends 1 MiB to each of its next j ranks and receives 1 MiB from
each of its previous j ranks, all posted at once (plain torch.distributed
isend/irecv on the gloo group made over the emulated links), for j = 1, 2,
4 and 7; three times each, the slowest rank's milliseconds. With independent
links the time would not grow with j. Needs root (network namespaces). Used
in docs/BENCHMARKS.md.

    python benchmarks/gloo_fanout.py
"""

import sys


def fan_out(rank: int, world_size: int, peers: int) -> list[int]:
    import torch
    import torch.distributed as dist

    from emulated import timed_rounds
    from tokenring.tools import benchmark

    outgoing = [torch.ones((1 << 20) // 4) for _ in range(peers)]
    incoming = [torch.empty((1 << 20) // 4) for _ in range(peers)]

    def post():
        works = []
        for d in range(1, peers + 1):
            works.append(dist.isend(outgoing[d - 1], group=benchmark._GROUP, group_dst=(rank + d) % world_size, tag=d))
            works.append(dist.irecv(incoming[d - 1], group=benchmark._GROUP, group_src=(rank - d) % world_size, tag=d))
        return works

    return timed_rounds(post)


def main() -> None:
    from emulated import emulated_world

    n = 8
    with emulated_world(n) as world:
        for peers in (1, 2, 4, 7):
            per_rank = world.run_ok("gloo_fanout.fan_out", peers, timeout_s=600)
            slowest = [max(r[i] for r in per_rank) for i in range(3)]
            print(f"{peers} links at once, 1 MiB each: slowest rank ms {slowest} (one link alone would take 84 ms)")


if __name__ == "__main__":
    sys.exit(main())
