"""Does gloo move a pair's messages both ways at full rate? Two ranks over an emulated 0.1 Gbit/s link.

Rank 0 sends 4 MiB to rank 1 (one way), then both send 4 MiB to each other
at once (both ways), with plain torch.distributed isend/irecv on a gloo group
made over the emulated link; three times each, milliseconds per rank.
Needs root (network namespaces). Used in docs/BENCHMARKS.md.

    python benchmarks/gloo_duplex.py
"""

import os
import sys
import time


def exchange(rank: int, world_size: int, both: bool) -> list[int]:
    import torch
    import torch.distributed as dist

    from tokenring.tools import benchmark

    peer = 1 - rank
    outgoing, incoming = torch.ones((4 << 20) // 4), torch.empty((4 << 20) // 4)
    times = []
    for _ in range(3):
        dist.barrier()
        started = time.perf_counter()
        works = []
        if both or rank == 0:
            works.append(dist.isend(outgoing, group=benchmark._GROUP, group_dst=peer, tag=0))
        if both or rank == 1:
            works.append(dist.irecv(incoming, group=benchmark._GROUP, group_src=peer, tag=0))
        for work in works:
            work.wait()
        times.append(round((time.perf_counter() - started) * 1e3))
    return times


def main() -> None:
    from tokenring.tools.launch import LocalWorld
    from tokenring.tools.netem import Network

    here = os.path.dirname(os.path.abspath(__file__))
    with Network("fullmesh", 2, 0.1) as net, LocalWorld(2, threads_per_rank=1, env={"PYTHONPATH": here}) as world:
        world.run_ok("tokenring.tools.benchmark.join_network", [net.rank_settings(r) for r in range(2)], 60.0)
        print("one way, ms per rank:  ", world.run_ok("gloo_duplex.exchange", False))
        print("both ways, ms per rank:", world.run_ok("gloo_duplex.exchange", True))


if __name__ == "__main__":
    sys.exit(main())
