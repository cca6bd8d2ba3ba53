"""``tokenring plan``: the registered schedules, or one plan step by step.

``tokenring plan --list [--json [PATH]]`` lists every registered schedule (and any
plugin's refused one, with the reason). ``tokenring plan --algorithm A
--world-size N [--causal] [--layout L] [--backward] [--json PATH]`` prints
the plan: who computes which block under which mask at each step, which
message goes where with its bytes, and the bytes per directed link, for the
problem given by --seq-len, --heads, --kv-heads, --head-dim and --dtype.

``tokenring plan --simulate --topology T [--link-gbps G] [--latency-us U]``
(or ``--profile FILE``; with neither, the default profile, see
`tokenring.planner.topology.default_profile_path`) predicts every schedule's forward
and forward + backward time for that problem on that interconnect
(`tokenring.planner.simulate`), with the share of communication hidden behind
compute, and names the fastest. T is ``fullmesh``, ``switch``, ``ring`` (of
--world-size devices) or ``NODESxDEVICES[:fullmesh|:switch][:device-nic|:node-nic]``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from tokenring.tools.options import non_negative_float, positive_float, positive_int

_ITEMSIZE = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tokenring.schedules.build import schedule_names

    parser.add_argument("--list", action="store_true", help="list the registered schedules")
    parser.add_argument("--algorithm", choices=schedule_names(), default="tokenring",
                        help="schedule to print (default: %(default)s)")
    parser.add_argument("--world-size", type=positive_int,
                        help="ranks (default: the profile's devices with --profile, else 4)")
    parser.add_argument("--causal", action="store_true", help="causal mask")
    parser.add_argument("--layout", choices=("contiguous", "zigzag"),
                        help="shard layout (default: zigzag when causal, contiguous otherwise)")
    parser.add_argument("--backward", action="store_true", help="the gradient pass's plan")
    parser.add_argument("--seq-len", type=positive_int, default=4096,
                        help="global sequence length, for bytes (default: %(default)s)")
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--heads", type=positive_int, default=8, help="query heads (default: %(default)s)")
    parser.add_argument("--kv-heads", type=positive_int, help="key/value heads (default: --heads)")
    parser.add_argument("--head-dim", type=positive_int, default=64)
    parser.add_argument("--dtype", choices=tuple(_ITEMSIZE), default="float32")
    parser.add_argument("--json", metavar="PATH", nargs="?", const="-",
                        help="write JSON to PATH (no PATH or '-': standard output) instead of the text form")
    simulation = parser.add_argument_group("prediction (--simulate)")
    simulation.add_argument("--simulate", action="store_true",
                            help="predict every schedule's time on an interconnect and name the fastest")
    simulation.add_argument("--topology", metavar="T",
                            help="fullmesh, switch, ring, or NODESxDEVICES[:fullmesh|:switch][:device-nic|:node-nic]")
    simulation.add_argument("--profile", metavar="FILE", help="a profile (JSON) instead of --topology")
    simulation.add_argument("--link-gbps", type=positive_float, default=100.0,
                            help="each link or port, Gbit/s per direction (default: %(default)s)")
    simulation.add_argument("--latency-us", type=non_negative_float, default=5.0,
                            help="latency of a link, port to port through a switch (default: %(default)s)")
    simulation.add_argument("--nic-gbps", type=positive_float,
                            help="each NIC between nodes, Gbit/s per direction (default: --link-gbps)")
    simulation.add_argument("--nic-latency-us", type=non_negative_float, help="NIC latency (default: --latency-us)")
    simulation.add_argument("--injection-gbps", type=positive_float,
                            help="the most one device sends (and receives) in all, Gbit/s (default: no limit)")
    simulation.add_argument("--tflops", type=positive_float,
                            help="attention compute rate of a device, TFLOP/s (default: "
                                 "%(default)s, or the profile's)")
    simulation.add_argument("--comm-only", action="store_true", help="compute takes no time: links alone")


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from tokenring.placement.layout import chunks_per_rank, default_layout, parse_layout

    if args.list:
        return
    for flag in ("topology", "profile"):
        if getattr(args, flag) is not None and not args.simulate:
            parser.error(f"argument --{flag}: only with --simulate")
    args.topology_model = None
    if args.simulate:
        args.topology_model = _topology(parser, args)
        if args.world_size is None:
            args.world_size = args.topology_model.world_size
        elif args.world_size != args.topology_model.world_size:
            parser.error(f"argument --world-size: {args.world_size} ranks, but the topology has "
                         f"{args.topology_model.world_size} devices")
    if args.world_size is None:
        args.world_size = 4
    kv_heads = args.kv_heads or args.heads
    if args.heads % kv_heads:
        parser.error(f"argument --kv-heads: must divide --heads = {args.heads}, got {kv_heads}")
    layout = parse_layout(args.layout or default_layout(args.causal))
    cut = args.world_size * chunks_per_rank(layout)
    if args.seq_len % cut:
        parser.error(f"argument --seq-len: must be divisible by {cut} for the {layout.value} layout over "
                     f"{args.world_size} ranks, got {args.seq_len}")


def command(args: argparse.Namespace) -> int:
    from tokenring.placement.layout import chunks_per_rank, default_layout
    from tokenring.registry import registry
    from tokenring.schedules.build import build_plan

    if args.list:
        entries = registry.schedule_entries()
        if args.json:
            _write(args.json, [e.to_json() for e in entries])
            return 0
        for e in entries:
            if e.schedule is not None:
                layouts = ",".join(x.value for x in e.schedule.layouts)
                print(f"{e.name:<14} {e.distribution:<24} {layouts:<18} {e.schedule.summary}")
            else:
                print(f"{e.name:<14} {e.distribution:<24} REFUSED: {e.error}")
        return 0
    layout = args.layout or default_layout(args.causal)
    shape = _shape(args)
    if args.simulate:
        return _simulate(args, shape, layout)
    plan = build_plan(args.algorithm, layout, args.causal, args.world_size, backward=args.backward)
    assert args.seq_len % (args.world_size * chunks_per_rank(plan.layout)) == 0
    if args.json:
        _write(args.json, plan.to_json(shape))
    else:
        print(plan.describe(shape))
    return 0


def _shape(args: argparse.Namespace):
    from tokenring.plan.model import ProblemShape

    return ProblemShape(
        batch=args.batch, seq_local=args.seq_len // args.world_size, q_heads=args.heads,
        kv_heads=args.kv_heads or args.heads, head_dim=args.head_dim, itemsize=_ITEMSIZE[args.dtype],
        acc_itemsize=8 if args.dtype == "float64" else 4,
    )


def _topology(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The profile to simulate on: --profile, --topology with the link options, or the default profile."""
    import dataclasses

    from tokenring.planner import topology

    if args.profile is not None and args.topology is not None:
        parser.error("argument --profile: give --profile or --topology, not both")
    if args.profile is not None or args.topology is None:
        path = args.profile or topology.default_profile_path()
        if args.profile is None and not path.exists():
            parser.error(f"argument --simulate: give --topology or --profile (no default profile at {path})")
        try:
            model = topology.load_profile(path)
        except topology.ProfileError as error:
            parser.error(f"argument --profile: {error}")
        if args.comm_only or args.tflops is not None:
            rate = math.inf if args.comm_only else args.tflops * 1e12
            model = dataclasses.replace(model, compute=dataclasses.replace(model.compute, flop_per_s=rate, kernels=()))
        return model
    tflops = None if args.comm_only else (args.tflops or topology.DEFAULT_TFLOPS)
    try:
        return topology.parse_topology(
            args.topology, args.world_size, args.link_gbps, args.latency_us, tflops=tflops,
            injection_gbps=args.injection_gbps, nic_gbps=args.nic_gbps, nic_latency_us=args.nic_latency_us)
    except ValueError as error:
        parser.error(f"argument --topology: {error}")


def _simulate(args: argparse.Namespace, shape, layout: str) -> int:
    from tokenring.planner.simulate import predict_all

    model = args.topology_model
    comparison = predict_all(shape, model, args.causal, layout)
    if args.json:
        _write(args.json, {"topology": model.to_json(), "problem": _problem_json(args, shape, layout),
                           **comparison.to_json()})
        return 0
    print(f"profile: {model.describe()}")
    print(f"problem: S={args.seq_len} ({shape.seq_local} per rank), batch {shape.batch}, heads {shape.q_heads}/"
          f"{shape.kv_heads}, head dim {shape.head_dim}, {args.dtype}, "
          f"{'causal' if args.causal else 'non-causal'}, {layout} layout")
    print(f"{'schedule':<16} {'forward':>11} {'hidden':>7} {'fwd+bwd':>11} {'hidden':>7}")
    for e in comparison.estimates:
        if e.error is not None:
            print(f"{e.name:<16} {'-':>11} {'':>7} {'-':>11} {'':>7}  ({e.error})")
            continue
        print(f"{e.name:<16} {_seconds(e.forward.total):>11} {e.forward.hidden_share:>7.0%} "
              f"{_seconds(e.training):>11} {e.training_hidden_share:>7.0%}")
    if comparison.fastest is None:
        print("choice: none (no schedule can run this problem)")
        return 1
    print(f"choice: {comparison.fastest} (fastest forward+backward); fastest forward alone: "
          f"{comparison.fastest_forward}")
    return 0


def _problem_json(args: argparse.Namespace, shape, layout: str) -> dict:
    return {"seq_len": args.seq_len, "seq_local": shape.seq_local, "batch": shape.batch, "q_heads": shape.q_heads,
            "kv_heads": shape.kv_heads, "head_dim": shape.head_dim, "dtype": args.dtype, "causal": args.causal,
            "layout": layout}


def _seconds(value: float) -> str:
    if value >= 1:
        return f"{value:.3f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.3f} ms"
    return f"{value * 1e6:.1f} us"


def _write(path: str, data) -> None:
    text = json.dumps(data, indent=2)
    if path == "-":
        sys.stdout.write(text + "\n")
    else:
        with open(path, "w") as f:
            f.write(text + "\n")
