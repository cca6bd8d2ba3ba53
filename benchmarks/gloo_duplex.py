"""Does gloo move a pair's messages both ways at full rate? Two ranks over an emulated 0.1 Gbit/s link.

Rank 0 sends 4 MiB to rank 1 (one way), then both send 4 MiB to each other
at once (both ways), with plain torch.distributed isend/irecv on a gloo group
made over the emulated link; three times each, milliseconds per rank.
Needs root (network namespaces). Used in docs/BENCHMARKS.md.

    python benchmarks/gloo_duplex.py
"""

import sys


def exchange(rank: int, world_size: int, both: bool) -> list[int]:
    import torch
    import torch.distributed as dist

    from emulated import timed_rounds
    from tokenring.tools import benchmark

    peer = 1 - rank
    outgoing, incoming = torch.ones((4 << 20) // 4), torch.empty((4 << 20) // 4)

    def post():
        works = []
        if both or rank == 0:
            works.append(dist.isend(outgoing, group=benchmark._GROUP, group_dst=peer, tag=0))
        if both or rank == 1:
            works.append(dist.irecv(incoming, group=benchmark._GROUP, group_src=peer, tag=0))
        return works

    return timed_rounds(post)


def main() -> None:
    from emulated import emulated_world

    with emulated_world(2) as world:
        print("one way, ms per rank:  ", world.run_ok("gloo_duplex.exchange", False))
        print("both ways, ms per rank:", world.run_ok("gloo_duplex.exchange", True))


if __name__ == "__main__":
    sys.exit(main())
