"""``tokenring calibrate``: measure the group's links and kernel, write the profile the planner reads.

It starts ``--world-size`` local ranks (`tokenring.tools.launch.LocalWorld`),
optionally over the bench's emulated network (``--network fullmesh|switch``,
``--link-gbps``, ``--latency-us``; `tokenring.tools.benchmark.open_network`),
and measures on that group, every figure the slowest participating rank's
median over ``--rounds``:

* per pair (rank 0 with every other rank, one pair at a time): the one-way
  latency of a small message (ping-pong, half the round trip) and the
  bandwidth one direction. Bandwidth is the slope between two message sizes
  (``s/4`` and ``s``), so that a fixed cost per message, or a burst a token
  bucket lets through at once, does not count as bandwidth; ``s`` grows until
  one transfer takes about ``--target-ms`` (or is ``--message-bytes``);
* both directions of one pair at once (rate per direction);
* many pairs at once: every rank sends ``s`` to its next ``j`` ranks and
  receives from its previous ``j``, for j = 1, 2, 4, ..., N - 1 (the
  aggregate per rank, in single links). On a full mesh the aggregate grows
  with j; behind a switch it does not. That decides the profile's ``kind``
  (``--kind`` overrides it), and an aggregate at j = N - 1 below what the
  kind carries (N - 1 links on a mesh, one port behind a switch) becomes the
  per-device ``injection_bytes_per_s``;
* the kernel (``--backend``): forward and backward time of blocks of
  S_local x S_local for ``--seq-len/--heads/--kv-heads/--head-dim/--dtype``,
  and of the pieces the multi-ring and two-way plans use (S_local / k rows
  of queries, or of keys, for k = 2, 4, ... up to N), on every rank at once
  (ranks sharing a machine's cores slow each other, as they do in a call);
  the time of a tiny block is the kernel's fixed cost, and the engine's cost
  per block beyond the kernel is a tiny ``token_ring_attn`` ring call's time
  over its blocks: ``compute.call_overhead_s``.

The profile (`tokenring.planner.topology.save_profile`; schema in docs/planner.md)
goes to ``--output`` (default `tokenring.planner.topology.default_profile_path`),
with every raw figure under its ``measured`` field; a summary is printed.
`calibrate` is the same from Python, on a world the caller started.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from typing import Any

# -- on each rank ---------------------------------------------------------------------------------


def _group():
    from tokenring.tools import benchmark

    return benchmark._GROUP  # the emulated links' group after join_network; None: the world group


def _slowest(seconds: float) -> float:
    """The largest of every rank's ``seconds`` (over the world group, loopback)."""
    import torch
    import torch.distributed as dist

    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value.item())


def _rounds(rank: int, sends: list[tuple[int, int]], recvs: list[tuple[int, int]], rounds: int, tag: int) -> list[float]:
    """Post this rank's sends and receives at once, ``rounds`` times; each round's slowest rank's seconds.

    ``sends``/``recvs``: (peer, bytes). Every rank calls this (an empty list
    for ranks that take no part), so that the barriers and the reduction match.
    """
    import torch
    import torch.distributed as dist

    group = _group()
    out = [torch.ones(size, dtype=torch.uint8) for _, size in sends]
    into = [torch.empty(size, dtype=torch.uint8) for _, size in recvs]
    times = []
    for _ in range(rounds):
        dist.barrier()
        started = time.perf_counter()
        works = [dist.irecv(t, group=group, group_src=peer, tag=tag) for (peer, _), t in zip(recvs, into)]
        works += [dist.isend(t, group=group, group_dst=peer, tag=tag) for (peer, _), t in zip(sends, out)]
        for work in works:
            work.wait()
        mine = time.perf_counter() - started if works else 0.0
        times.append(_slowest(mine))
    return times


def _ping_pong(rank: int, a: int, b: int, rounds: int) -> float:
    """One-way latency between ranks a and b: half the median round trip of a one-byte message."""
    import torch
    import torch.distributed as dist

    group = _group()
    one = torch.ones(1, dtype=torch.uint8)
    trips = []
    dist.barrier()
    if rank in (a, b):
        other = b if rank == a else a
        for i in range(rounds + 2):  # two warm-up trips
            started = time.perf_counter()
            if rank == a:
                dist.send(one, group=group, group_dst=other, tag=7)
                dist.recv(one, group=group, group_src=other, tag=8)
            else:
                dist.recv(one, group=group, group_src=other, tag=7)
                dist.send(one, group=group, group_dst=other, tag=8)
            if i >= 2:
                trips.append(time.perf_counter() - started)
    mine = statistics.median(trips) / 2 if rank == a else 0.0
    return _slowest(mine)


def _rate(small: float, large: float, small_bytes: int, large_bytes: int) -> float:
    """Bytes/s from the times of two sizes: the slope, or the large size's plain rate when noise inverts them."""
    if large > small:
        return (large_bytes - small_bytes) / (large - small)
    return large_bytes / large


def _timed_pair(rank: int, plan, size: int, rounds: int, tag: int) -> dict:
    """Run ``plan(size)`` and ``plan(size // 4)`` (each a rank's sends and receives); medians and the slope rate."""
    small = max(size // 4, 1)
    sends, recvs = plan(small)
    t_small = statistics.median(_rounds(rank, sends, recvs, rounds, tag))
    sends, recvs = plan(size)
    t_large = statistics.median(_rounds(rank, sends, recvs, rounds, tag + 1))
    return {"small_bytes": small, "large_bytes": size, "small_s": t_small, "large_s": t_large,
            "bytes_per_s": _rate(t_small, t_large, small, size)}


def comm_probe(rank: int, world_size: int, spec: dict) -> dict:
    """Latency, one-way and two-way bandwidth, and fan-out aggregates on this group (every rank calls it)."""
    n = world_size
    rounds = spec["rounds"]
    result: dict[str, Any] = {}
    # Message size: fixed, or grown until one transfer 0 -> 1 takes about target_s.
    size = spec.get("message_bytes")
    if size is None:
        size = 1 << 16
        while size < spec["max_bytes"]:
            sends, recvs = ([(1, size)], []) if rank == 0 else (([], [(0, size)]) if rank == 1 else ([], []))
            took = statistics.median(_rounds(rank, sends, recvs, 1, 1))
            if took >= spec["target_s"]:
                break
            size = min(spec["max_bytes"], size * max(2, min(16, int(spec["target_s"] / max(took, 1e-6)) + 1)))
    result["message_bytes"] = size

    result["latency_s"] = {str(j): _ping_pong(rank, 0, j, spec["latency_rounds"]) for j in range(1, n)}

    def one_way(j):
        def plan(nbytes):
            if rank == 0:
                return [(j, nbytes)], []
            return ([], [(0, nbytes)]) if rank == j else ([], [])
        return plan

    result["one_way"] = {str(j): _timed_pair(rank, one_way(j), size, rounds, 10 + 2 * j) for j in range(1, n)}

    def both_ways(nbytes):
        if rank in (0, 1):
            peer = 1 - rank
            return [(peer, nbytes)], [(peer, nbytes)]
        return [], []

    result["both_ways"] = _timed_pair(rank, both_ways, size, rounds, 100)

    fanouts = sorted({min(1 << i, n - 1) for i in range(max(1, (n - 1).bit_length()) + 1)} | {n - 1})
    result["fanout"] = []
    for links in fanouts:
        def spread(nbytes, links=links):
            return ([((rank + d) % n, nbytes) for d in range(1, links + 1)],
                    [((rank - d) % n, nbytes) for d in range(1, links + 1)])

        timed = _timed_pair(rank, spread, size, rounds, 200 + 2 * links)
        timed["links"] = links
        timed["aggregate_bytes_per_s"] = timed.pop("bytes_per_s") * links
        result["fanout"].append(timed)
    return result


def _kernel_shapes(seq_local: int, world_size: int) -> list[tuple[int, int]]:
    """S_local x S_local, and the pieces of it the plans use: S_local / k rows of queries or of keys."""
    shapes = [(seq_local, seq_local)]
    k = 2
    while k <= max(world_size, 2) and seq_local % k == 0:
        shapes += [(seq_local // k, seq_local), (seq_local, seq_local // k)]
        k *= 2
    return shapes


def kernel_probe(rank: int, world_size: int, spec: dict) -> dict:
    """Forward and backward seconds per block shape, every rank at once; and a tiny block's (the fixed cost)."""
    import torch
    import torch.distributed as dist

    from tokenring.interfaces import Mask
    from tokenring.registry import registry
    from tokenring.tools.problems import DTYPES

    kernel = registry.get(spec["backend"]).create_kernel()
    dtype = DTYPES[spec["dtype"]]
    b, hq, hkv, d = spec["batch"], spec["heads"], spec["kv_heads"], spec["head_dim"]
    scale = d ** -0.5
    gen = torch.Generator().manual_seed(rank)
    rows = []
    for q_rows, kv_rows in [(spec["tiny_rows"], spec["tiny_rows"]), *[tuple(s) for s in spec["shapes"]]]:
        q = torch.randn(b, q_rows, hq, d, generator=gen).to(dtype)
        k = torch.randn(b, kv_rows, hkv, d, generator=gen).to(dtype)
        v = torch.randn(b, kv_rows, hkv, d, generator=gen).to(dtype)
        dout = torch.randn(b, q_rows, hq, d, generator=gen).to(dtype)
        out, lse = kernel.forward(q, k, v, scale=scale, mask=Mask.NONE)  # warm-up
        kernel.backward(dout, q, k, v, out, lse, scale=scale, mask=Mask.NONE)
        fwd, bwd = [], []
        repeats = spec["repeats"] * (5 if q_rows == spec["tiny_rows"] else 1)
        dist.barrier()
        for _ in range(repeats):
            started = time.perf_counter()
            kernel.forward(q, k, v, scale=scale, mask=Mask.NONE)
            fwd.append(time.perf_counter() - started)
        dist.barrier()
        for _ in range(repeats):
            started = time.perf_counter()
            kernel.backward(dout, q, k, v, out, lse, scale=scale, mask=Mask.NONE)
            bwd.append(time.perf_counter() - started)
        rows.append({"q_rows": q_rows, "kv_rows": kv_rows, "forward_s": statistics.median(fwd),
                     "backward_s": statistics.median(bwd)})
    return {"blocks": rows, "threads": torch.get_num_threads()}


def engine_probe(rank: int, world_size: int, spec: dict) -> dict:
    """Seconds of tiny ``token_ring_attn`` calls, forward alone and forward + backward, on this group.

    One call per schedule in ``spec["engine_schedules"]`` ({name: rows per rank}); the ring, with one
    message per block, and a schedule with many messages per block tell the cost per block from the cost
    per message.
    """
    return {name: _engine_call(rank, spec, name, rows) for name, rows in spec["engine_schedules"].items()}


def _engine_call(rank: int, spec: dict, algorithm: str, rows: int) -> dict:
    import torch
    import torch.distributed as dist

    import tokenring

    from tokenring.tools.problems import DTYPES

    dtype = DTYPES[spec["dtype"]]
    gen = torch.Generator().manual_seed(rank)
    q = torch.randn(spec["batch"], rows, spec["heads"], spec["head_dim"], generator=gen).to(dtype)
    k, v = (torch.randn(spec["batch"], rows, spec["kv_heads"], spec["head_dim"], generator=gen).to(dtype)
            for _ in range(2))
    kwargs = dict(group=_group(), algorithm=algorithm, backend=spec["backend"])

    def forward():
        with torch.no_grad():
            tokenring.token_ring_attn(q, k, v, **kwargs)

    def forward_backward():
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        tokenring.token_ring_attn(qg, kg, vg, **kwargs).sum().backward()

    times = {}
    for name, fn in (("forward_s", forward), ("forward_backward_s", forward_backward)):
        fn()
        fn()
        seconds = []
        for _ in range(spec["engine_repeats"]):
            dist.barrier()
            started = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - started)
        times[name] = statistics.median(seconds)
    return times


# -- in the calling process -------------------------------------------------------------------------


def _median(values):
    return statistics.median(values)


def calibrate(world, *, seq_len: int, heads: int = 8, kv_heads: int | None = None, head_dim: int = 64,
              dtype: str = "float32", batch: int = 1, backend: str = "cpu", rounds: int = 3,
              message_bytes: int | None = None, target_ms: float = 60.0, max_bytes: int = 16 << 20,
              kernel_repeats: int = 3, kind: str | None = None, name: str = "", comm: bool = True,
              compute: bool = True, measured: dict | None = None, timeout_s: float = 600.0):
    """Measure ``world`` (a `LocalWorld`, joined to the emulated links if any); return (Topology, measured).

    ``comm=False`` or ``compute=False`` skips that half and reuses the figures
    under ``measured`` (a previous call's second value) for it: compute does
    not depend on the links, so a sweep over link rates measures it once.
    """
    n = world.world_size
    kv_heads = kv_heads or heads
    if seq_len % n:
        raise ValueError(f"--seq-len {seq_len} must be divisible by --world-size {n}")
    seq_local = seq_len // n
    raw: dict[str, Any] = dict(measured or {})
    raw.update({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "world_size": n, "backend": backend})
    if comm and n > 1:
        spec = {"rounds": rounds, "latency_rounds": 20, "message_bytes": message_bytes, "target_s": target_ms / 1e3,
                "max_bytes": max_bytes}
        raw["comm"] = world.run_ok("tokenring.tools.calibrate.comm_probe", spec, timeout_s=timeout_s)[0]
    if compute:
        tiny = max(8, min(16, seq_local))
        spec = {"backend": backend, "dtype": dtype, "batch": batch, "heads": heads, "kv_heads": kv_heads,
                "head_dim": head_dim, "shapes": _kernel_shapes(seq_local, n), "repeats": kernel_repeats,
                "tiny_rows": tiny, "engine_repeats": max(5, 2 * kernel_repeats),
                "engine_schedules": _engine_schedules(n)}
        per_rank = world.run_ok("tokenring.tools.calibrate.kernel_probe", spec, timeout_s=timeout_s)
        engine = world.run_ok("tokenring.tools.calibrate.engine_probe", spec, timeout_s=timeout_s)
        blocks = []
        for i, block in enumerate(per_rank[0]["blocks"]):
            blocks.append({"q_rows": block["q_rows"], "kv_rows": block["kv_rows"],
                           "forward_s": _median([r["blocks"][i]["forward_s"] for r in per_rank]),
                           "backward_s": _median([r["blocks"][i]["backward_s"] for r in per_rank])})
        calls = {name: {"rows": rows, **{key: _median([e[name][key] for e in engine])
                                         for key in ("forward_s", "forward_backward_s")}}
                 for name, rows in spec["engine_schedules"].items()}
        raw["compute"] = {"problem": {"seq_len": seq_len, "seq_local": seq_local, "batch": batch, "heads": heads,
                                      "kv_heads": kv_heads, "head_dim": head_dim, "dtype": dtype},
                          "tiny_block": blocks[0], "blocks": blocks[1:], "threads_per_rank": per_rank[0]["threads"],
                          "engine_tiny_call": calls["ring"], "engine_tiny_calls": calls}
    if "compute" not in raw:
        raise ValueError("calibrate: compute=False needs the compute figures of an earlier call in `measured`")
    return profile_from_measurements(raw, n, kind=kind, name=name), raw


MANY_MESSAGES = "tokenring-multi"  # the registered schedule with the most messages per block


def _engine_schedules(n: int) -> dict[str, int]:
    """The tiny engine calls to time: the ring, and a schedule with many messages per block, with rows per rank."""
    from tokenring.schedules.build import build_plan, schedule_names

    calls = {"ring": 16}
    if n > 1 and MANY_MESSAGES in schedule_names():
        pieces = build_plan(MANY_MESSAGES, "contiguous", False, n).granularity
        calls[MANY_MESSAGES] = pieces * max(1, -(-16 // pieces))
    return calls


def _plan_counts(name: str, n: int, rank: int = 0) -> tuple[int, int, int]:
    """A forward plan's blocks of ``rank``, messages it sends or receives, and steps in which it has any."""
    from tokenring.schedules.build import build_plan

    plan = build_plan(name, "contiguous", False, n)
    blocks = sum(1 for step in plan.steps for b in step.blocks if b.rank == rank)
    messages = sum(1 for step in plan.steps for t in step.transfers if rank in (t.src, t.dst))
    steps = sum(1 for step in plan.steps if any(rank in (t.src, t.dst) for t in step.transfers))
    return blocks, messages, steps


def engine_overheads(calls: dict, n: int, latency: float) -> tuple[float, float]:
    """Cost per block and per message (sent or received) from tiny engine calls, less their steps' latency.

    With the ring alone (or figures that do not solve to two costs >= 0), all of it is per block.
    """
    def net(name):
        blocks, messages, steps = _plan_counts(name, n)
        return blocks, messages, max(calls[name]["forward_s"] - steps * latency, 0.0)

    b1, m1, y1 = net("ring")
    fallback = (y1 / max(b1, 1), 0.0)
    if MANY_MESSAGES not in calls:
        return fallback
    b2, m2, y2 = net(MANY_MESSAGES)
    det = b1 * m2 - b2 * m1
    if det == 0:
        return fallback
    per_block = (y1 * m2 - y2 * m1) / det
    per_message = (b1 * y2 - b2 * y1) / det
    if per_block < 0 or per_message < 0:
        return fallback
    return per_block, per_message


def profile_from_measurements(raw: dict, world_size: int, *, kind: str | None = None, name: str = ""):
    """The `Topology` the raw figures of `calibrate` describe (see the module's docstring for the rules)."""
    from tokenring.planner.topology import BACKWARD_FLOP_RATIO, Compute, KernelRate, Link, Topology
    from tokenring.planner.simulate import FORWARD_FLOPS_PER_ENTRY

    n = world_size
    comm = raw.get("comm")
    if comm is not None:
        latency = _median(list(comm["latency_s"].values()))
        link_rate = _median([p["bytes_per_s"] for p in comm["one_way"].values()])
        aggregate = comm["fanout"][-1]["aggregate_bytes_per_s"]
        fanned = aggregate / link_rate
        detected = "fullmesh" if n == 2 or fanned >= 1.5 else "switch"
    else:  # one rank: nothing to measure; a nominal fast link
        latency, link_rate, aggregate, fanned, detected = 0.0, 1e12, None, None, "fullmesh"
    kind = kind or detected
    capacity = link_rate * (n - 1) if kind == "fullmesh" else link_rate
    injection = aggregate if aggregate is not None and n > 2 and aggregate < 0.9 * capacity else None

    c = raw["compute"]
    p = c["problem"]
    fixed_fwd, fixed_bwd = c["tiny_block"]["forward_s"], c["tiny_block"]["backward_s"]
    per_entry = FORWARD_FLOPS_PER_ENTRY * p["batch"] * p["heads"] * p["head_dim"]
    by_size: dict[tuple[bool, int], list[float]] = {}
    for block in c["blocks"]:
        flops = per_entry * block["q_rows"] * block["kv_rows"]
        size = block["q_rows"] * block["kv_rows"]
        for backward, seconds, fixed, factor in ((False, block["forward_s"], fixed_fwd, 1.0),
                                                 (True, block["backward_s"], fixed_bwd, BACKWARD_FLOP_RATIO)):
            # The fixed cost per call is counted once, in call_overhead_s: the rate is of what grows.
            busy = max(seconds - fixed, 0.25 * seconds)
            by_size.setdefault((backward, size), []).append(flops * factor / busy)
    kernels = []
    for (backward, size), rates in sorted(by_size.items()):
        q_rows = next(b["q_rows"] for b in c["blocks"] if b["q_rows"] * b["kv_rows"] == size)
        kernels.append(KernelRate(backward, q_rows, size // q_rows, statistics.mean(rates)))
    largest = max((k for k in kernels if not k.backward), key=lambda k: k.q_rows * k.kv_rows)
    # The engine's cost per block and per message beyond the kernel's work: tiny calls, less the latency of
    # their message steps (the simulator adds that per message).
    calls = c.get("engine_tiny_calls") or {"ring": c["engine_tiny_call"]}
    overhead, per_message = engine_overheads(calls, n, latency)
    compute = Compute(flop_per_s=largest.flop_per_s, backward_ratio=BACKWARD_FLOP_RATIO, call_overhead_s=overhead,
                      message_overhead_s=per_message, kernels=tuple(kernels))
    raw["derived"] = {"kind_detected": detected, "fanout_in_links": fanned, "link_bytes_per_s": link_rate,
                      "latency_s": latency, "injection_bytes_per_s": injection, "call_overhead_s": overhead,
                      "message_overhead_s": per_message}
    if comm is not None:
        both = comm["both_ways"]["bytes_per_s"]
        raw["derived"]["both_ways_over_one_way"] = both / link_rate
    return Topology(kind=kind, devices_per_node=n, link=Link(link_rate, latency), injection_bytes_per_s=injection,
                    compute=compute, name=name or f"calibrated {kind} of {n}")


def summary(topology, raw: dict) -> str:
    """A few lines: what was measured and what the profile says."""
    d = raw["derived"]
    lines = [f"profile    {topology.describe()}"]
    comm = raw.get("comm")
    if comm is not None:
        gbit = 8 / 1e9
        lines.append(f"latency    {d['latency_s'] * 1e6:.1f} us one way (median over rank 0's pairs)")
        rates = [p["bytes_per_s"] * gbit for p in comm["one_way"].values()]
        lines.append(f"one way    {min(rates):.3g} .. {max(rates):.3g} Gbit/s per pair "
                     f"({comm['message_bytes']} byte messages)")
        lines.append(f"both ways  {d['both_ways_over_one_way']:.2f} x one way, per direction")
        fan = ", ".join(f"{f['links']}: {f['aggregate_bytes_per_s'] / d['link_bytes_per_s']:.2f}" for f in comm["fanout"])
        lines.append(f"fan-out    links at once: aggregate per rank in single links = {fan}")
        lines.append(f"kind       {topology.kind} (detected {d['kind_detected']}); injection limit "
                     + ("none" if d["injection_bytes_per_s"] is None
                        else f"{d['injection_bytes_per_s'] * gbit:.3g} Gbit/s per device"))
        if d["both_ways_over_one_way"] < 0.8:
            lines.append("note       both directions of a pair at once run below full rate; the simulator does "
                         "not model that (docs/planner.md, Limits)")
    c = raw["compute"]
    rates = ", ".join(f"{b['q_rows']}x{b['kv_rows']} {b['forward_s'] * 1e3:.2f}/{b['backward_s'] * 1e3:.2f} ms"
                      for b in c["blocks"])
    lines.append(f"kernel     fwd/bwd per block, every rank at once: {rates}")
    lines.append(f"           {topology.compute.flop_per_s / 1e9:.3g} GFLOP/s forward on the largest block; fixed "
                 f"{c['tiny_block']['forward_s'] * 1e6:.0f} us per kernel call; engine "
                 f"{d['call_overhead_s'] * 1e6:.0f} us per block, {d['message_overhead_s'] * 1e6:.0f} us per message")
    return "\n".join(lines)


# -- the command ------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tokenring.tools.options import non_negative_float, positive_float, positive_int

    parser.add_argument("--world-size", type=positive_int, default=4, help="ranks (default: %(default)s)")
    parser.add_argument("--backend", default="cpu", help="backend whose kernel to time (default: %(default)s)")
    parser.add_argument("--network", choices=("loopback", "fullmesh", "switch"), default="loopback",
                        help="loopback, or the bench's emulated links between per-rank network namespaces (root)")
    parser.add_argument("--link-gbps", type=positive_float, default=10.0,
                        help="emulated link rate per direction, Gbit/s (default: %(default)s)")
    parser.add_argument("--latency-us", type=non_negative_float, default=0.0,
                        help="emulated one-way latency per link (needs netem)")
    parser.add_argument("--seq-len", type=positive_int, default=4096,
                        help="full sequence length the kernel blocks are cut from: S_local = it / --world-size "
                             "(default: %(default)s)")
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--heads", type=positive_int, default=8)
    parser.add_argument("--kv-heads", type=positive_int, help="key/value heads (default: --heads)")
    parser.add_argument("--head-dim", type=positive_int, default=64)
    parser.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"), default="float32")
    parser.add_argument("--kind", choices=("fullmesh", "switch"),
                        help="the profile's kind, instead of what the fan-out measurement says")
    parser.add_argument("--rounds", type=positive_int, default=3, help="timed rounds per measurement (default: 3)")
    parser.add_argument("--message-bytes", type=positive_int,
                        help="bandwidth message size (default: grown until one transfer takes --target-ms)")
    parser.add_argument("--target-ms", type=positive_float, default=60.0,
                        help="how long one bandwidth transfer should take (default: %(default)s)")
    parser.add_argument("--kernel-repeats", type=positive_int, default=3, help="timed calls per block (default: 3)")
    parser.add_argument("--threads-per-rank", type=positive_int,
                        help="torch threads per rank (default: CPU count // world size, at least 1)")
    parser.add_argument("--name", default="", help="the profile's name (default: what was measured)")
    parser.add_argument("--output", metavar="FILE",
                        help="where to write the profile (default: $TOKENRING_PROFILE, else "
                             "$XDG_CONFIG_HOME/tokenring/profile.json)")
    parser.add_argument("--timeout", type=positive_float, default=300.0,
                        help="seconds any wait may take before it fails (default: %(default)s)")


def validate_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.kv_heads is None:
        args.kv_heads = args.heads
    if args.heads % args.kv_heads:
        parser.error(f"argument --heads: {args.heads} must be a multiple of --kv-heads ({args.kv_heads})")
    if args.seq_len % args.world_size:
        parser.error(f"argument --seq-len: {args.seq_len} must be divisible by --world-size ({args.world_size})")
    if args.network != "loopback" and args.world_size < 2:
        parser.error("argument --network: an emulated network needs --world-size >= 2")
    if args.threads_per_rank is None:
        args.threads_per_rank = max(1, (os.cpu_count() or 1) // args.world_size)


def command(args: argparse.Namespace) -> int:
    from tokenring.registry import registry
    from tokenring.planner.topology import default_profile_path
    from tokenring.tools import benchmark
    from tokenring.tools.launch import LocalWorld

    registry.get(args.backend)  # fail fast when the backend cannot run here
    n = args.world_size
    network, fallback = benchmark.open_network(args.network, n, args.link_gbps, args.latency_us)
    env = {"TOKENRING_TIMEOUT_S": str(args.timeout)}
    try:
        print(f"starting {n} ranks x {args.threads_per_rank} threads...", file=sys.stderr)
        with LocalWorld(n, tokenring_backend=args.backend, threads_per_rank=args.threads_per_rank, env=env) as world:
            if network is not None:
                settings = [network.rank_settings(r) for r in range(n)]
                world.run_ok("tokenring.tools.benchmark.join_network", settings, args.timeout, timeout_s=args.timeout)
            print("measuring links and kernel...", file=sys.stderr)
            topology, raw = calibrate(
                world, seq_len=args.seq_len, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                dtype=args.dtype, batch=args.batch, backend=args.backend, rounds=args.rounds,
                message_bytes=args.message_bytes, target_ms=args.target_ms, kernel_repeats=args.kernel_repeats,
                kind=args.kind, name=args.name, timeout_s=args.timeout * 4)
    finally:
        if network is not None:
            network.teardown()
    raw["network"] = {"requested": args.network, "fallback_reason": fallback,
                      "link_gbps": args.link_gbps if network is not None or args.network != "loopback" else None,
                      "latency_us": args.latency_us}
    raw["command"] = "tokenring calibrate " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["calibrate"] else None
    path = args.output or default_profile_path()
    save(topology, raw, path)
    print(summary(topology, raw))
    print(f"profile written to {path}")
    return 0


def _write_measured(path, raw: dict) -> None:
    """Put the raw figures under the profile's free ``measured`` field."""
    import json
    from pathlib import Path

    data = json.loads(Path(path).read_text())
    data["measured"] = raw
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def save(topology, raw: dict, path) -> None:
    """`tokenring.planner.topology.save_profile`, with ``raw`` under ``measured``."""
    from tokenring.planner.topology import save_profile

    save_profile(topology, path)
    _write_measured(path, raw)
