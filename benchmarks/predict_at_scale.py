"""Predicted forward + backward time of every schedule at N = 8 ... 1024 on three named systems.

Pure simulation (tokenring.planner.simulate): no device is used. The systems and
every figure they assume are in SYSTEMS below and in docs/planner.md,
"Predictions at scale", with their sources. The problem is a Llama-3-8B-like
attention layer: 32 query heads, 8 K/V heads, head dim 128, bfloat16,
causal, S_local tokens per device (default 4096, so S = 4096·N).

    python benchmarks/predict_at_scale.py [--max-n 1024] [--seq-local 4096] [--json out.json] [--charts DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from tokenring.plan.model import ProblemShape
from tokenring.planner.choose import choose
from tokenring.planner.simulate import predict_all
from tokenring.planner.topology import two_level

# name: (intra-node kind, per-direction Gbit/s of one intra-node link or port, intra latency us,
#        NIC Gbit/s per device, NIC latency us, attention TFLOP/s)
SYSTEMS = {
    # DGX/HGX H100: 8 GPUs on NVSwitch, NVLink 4 at 900 GB/s bidirectional per GPU (450 GB/s = 3600 Gbit/s
    # each way through the GPU's switch ports); one ConnectX-7 NDR 400 Gbit/s NIC per GPU.
    # Attention at 400 TFLOP/s: between FlashAttention-2 and -3's reported H100 bf16 forward rates.
    "8x H100 NVSwitch node x InfiniBand NDR": ("switch", 3600.0, 2.0, 400.0, 5.0, 400.0),
    # Atlas 800T A2-class board: 8 Ascend 910B NPUs in an HCCS full mesh, assumed 28 GB/s (224 Gbit/s)
    # each way per pair (7 links per NPU); one 200 GbE RoCE port per NPU. Attention at 200 TFLOP/s assumed.
    "8x Ascend 910B HCCS full mesh x RoCE 200G": ("fullmesh", 224.0, 3.0, 200.0, 8.0, 200.0),
    # 8 MI300X on Infinity Fabric (xGMI): 7 links per GPU, 128 GB/s bidirectional each (64 GB/s = 512 Gbit/s
    # each way), a direct full mesh; one 400 Gbit/s NIC per GPU. Attention at 400 TFLOP/s assumed.
    "8x MI300X xGMI full mesh x 400G": ("fullmesh", 512.0, 3.0, 400.0, 5.0, 400.0),
}


def system_topology(name: str, world_size: int):
    intra, gbps, latency_us, nic_gbps, nic_latency_us, tflops = SYSTEMS[name]
    devices = min(8, world_size)
    return two_level(world_size // devices, devices, gbps, latency_us, intra=intra, nic_gbps=nic_gbps,
                     nic_latency_us=nic_latency_us, nic="device", tflops=tflops, name=name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-n", type=int, default=1024)
    parser.add_argument("--seq-local", type=int, default=4096)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--charts", metavar="DIR", help="write one PNG per system")
    parser.add_argument("--schedules", default="ring,tokenring,ring-2way,tokenring-2way,ring-multi,tokenring-multi")
    parser.add_argument("--multi-max-n", type=int, default=64,
                        help="the multi-ring plans grow as N^3 blocks: predict them up to this N only")
    args = parser.parse_args()
    shape = ProblemShape(batch=1, seq_local=args.seq_local, q_heads=32, kv_heads=8, head_dim=128,
                         itemsize=2, acc_itemsize=4)
    schedules = args.schedules.split(",")
    sizes = [n for n in (8, 16, 32, 64, 128, 256, 512, 1024) if n <= args.max_n]
    report: dict = {"shape": shape.__dict__, "systems": {}}
    for system in SYSTEMS:
        rows = {}
        print(f"\n{system}: predicted forward + backward ms per layer (S_local = {args.seq_local}, causal, "
              f"Hq 32, Hkv 8, D 128, bf16)")
        print("| N | " + " | ".join(schedules) + " | auto | hidden (auto) | simulate s |")
        print("|---|" + "---|" * (len(schedules) + 3))
        for n in sizes:
            started = time.perf_counter()
            topology = system_topology(system, n)
            candidates = [s for s in schedules if "multi" not in s or n <= args.multi_max_n]
            comparison = predict_all(shape, topology, True, "zigzag", candidates)
            best = comparison.fastest
            choice = choose(shape, True, "zigzag", n, True, profile=topology) if n <= args.multi_max_n else None
            elapsed = time.perf_counter() - started
            cells = {name: None for name in schedules}
            for estimate in comparison.estimates:
                cells[estimate.name] = None if estimate.error else estimate.training
            # Above --multi-max-n, auto's choice is the fastest of the schedules that could be built.
            chosen = choice.algorithm if choice is not None else best
            hidden = comparison.estimate(chosen).training_hidden_share
            rows[n] = {"ms": {k: (v * 1e3 if v is not None else None) for k, v in cells.items()},
                       "auto": chosen, "hidden_share": hidden, "simulate_s": elapsed}
            shown = " | ".join("-" if cells[s] is None else f"{cells[s] * 1e3:.1f}" for s in schedules)
            print(f"| {n} | {shown} | {chosen} | {hidden:.0%} | {elapsed:.1f} |", flush=True)
        report["systems"][system] = rows
        if args.charts:
            _chart(system, rows, schedules, args.charts)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(report, file, indent=2)


def _chart(system: str, rows: dict, schedules: list[str], directory: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return
    import os

    figure, axis = plt.subplots(figsize=(7, 4.5))
    sizes = sorted(rows)
    for name in schedules:
        points = [(n, rows[n]["ms"].get(name)) for n in sizes if rows[n]["ms"].get(name) is not None]
        if points:
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("ranks N (8 per node)")
    axis.set_ylabel("predicted fwd+bwd ms per layer")
    axis.set_title(system, fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    os.makedirs(directory, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in system.lower()).strip("-")
    path = os.path.join(directory, f"predict-{slug}.png")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"chart: {path}")


if __name__ == "__main__":
    main()
