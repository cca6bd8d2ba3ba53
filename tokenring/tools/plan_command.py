"""``tokenring plan``: the registered schedules, or one plan step by step.

``tokenring plan --list [--json [PATH]]`` lists every registered schedule (and any
plugin's refused one, with the reason). ``tokenring plan --algorithm A
--world-size N [--causal] [--layout L] [--backward] [--json PATH]`` prints
the plan: who computes which block under which mask at each step, which
message goes where with its bytes, and the bytes per directed link, for the
problem given by --seq-len, --heads, --kv-heads, --head-dim and --dtype.
"""

from __future__ import annotations

import argparse
import json
import sys

from .options import positive_int

_ITEMSIZE = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..plans import schedule_names

    parser.add_argument("--list", action="store_true", help="list the registered schedules")
    parser.add_argument("--algorithm", choices=schedule_names(), default="tokenring",
                        help="schedule to print (default: %(default)s)")
    parser.add_argument("--world-size", type=positive_int, default=4, help="ranks (default: %(default)s)")
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


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from ..layout import chunks_per_rank, default_layout, parse_layout

    if args.list:
        return
    kv_heads = args.kv_heads or args.heads
    if args.heads % kv_heads:
        parser.error(f"argument --kv-heads: must divide --heads = {args.heads}, got {kv_heads}")
    layout = parse_layout(args.layout or default_layout(args.causal))
    cut = args.world_size * chunks_per_rank(layout)
    if args.seq_len % cut:
        parser.error(f"argument --seq-len: must be divisible by {cut} for the {layout.value} layout over "
                     f"{args.world_size} ranks, got {args.seq_len}")


def command(args: argparse.Namespace) -> int:
    from ..layout import chunks_per_rank, default_layout
    from ..plan import ProblemShape
    from ..registry import registry
    from ..plans import build_plan

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
    plan = build_plan(args.algorithm, layout, args.causal, args.world_size, backward=args.backward)
    itemsize = _ITEMSIZE[args.dtype]
    shape = ProblemShape(
        batch=args.batch, seq_local=args.seq_len // args.world_size, q_heads=args.heads,
        kv_heads=args.kv_heads or args.heads, head_dim=args.head_dim, itemsize=itemsize,
        acc_itemsize=8 if args.dtype == "float64" else 4,
    )
    assert args.seq_len % (args.world_size * chunks_per_rank(plan.layout)) == 0
    if args.json:
        _write(args.json, plan.to_json(shape))
    else:
        print(plan.describe(shape))
    return 0


def _write(path: str, data) -> None:
    text = json.dumps(data, indent=2)
    if path == "-":
        sys.stdout.write(text + "\n")
    else:
        with open(path, "w") as f:
            f.write(text + "\n")
