"""What the plain-messaging benchmarks share: timed rounds of posted messages, on a world over emulated links."""

import os
import time


def timed_rounds(post, rounds: int = 3) -> list[int]:
    """Milliseconds of each round: all ranks start together, ``post()`` returns works, all are waited on."""
    import torch.distributed as dist

    times = []
    for _ in range(rounds):
        dist.barrier()
        started = time.perf_counter()
        for work in post():
            work.wait()
        times.append(round((time.perf_counter() - started) * 1e3))
    return times


def emulated_world(n: int, topology: str = "fullmesh", gbps: float = 0.1):
    """A context: n ranks (this folder importable) joined over emulated links; yields the LocalWorld."""
    import contextlib

    from tokenring.tools.launch import LocalWorld
    from tokenring.tools.netem import Network

    @contextlib.contextmanager
    def world():
        here = os.path.dirname(os.path.abspath(__file__))
        with Network(topology, n, gbps) as net, LocalWorld(n, threads_per_rank=1, env={"PYTHONPATH": here}) as w:
            w.run_ok("tokenring.tools.benchmark.join_network", [net.rank_settings(r) for r in range(n)], 60.0)
            yield w

    return world()
