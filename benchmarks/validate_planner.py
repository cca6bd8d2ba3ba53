"""Validate the planner's model against measurements (issue 16, part 4).

For every cell (emulated ``fullmesh`` and ``switch``; N = 4 and 8; MHA, 8
heads, and GQA g = 4, 8 query and 2 K/V heads; links of 0.1, 1 and 10 Gbit/s;
forward and forward + backward; non-causal, float32, head dim 64):

(a) calibrate: the kernel once per N and head configuration, with every rank
    computing at once (`tokenring.tools.calibrate.kernel_probe`), and the
    links at every rate on the emulated group (`calibrate.comm_probe`). Two
    profiles are built from these: "calibrated" (everything measured: the
    kind the fan-out says, the per-pair rate and latency, the injection limit)
    and "nominal" (the emulation's own parameters: its kind and link rate,
    with the measured latency, injection limit and compute);
(b) predict every registered schedule with `tokenring.planner.simulate` on both;
(c) measure every schedule and ``auto`` with the bench's own worker
    (`tokenring.tools.benchmark.measure`: each output checked against float64,
    slowest rank's median of --repeats), on one LocalWorld per N and network,
    the workers planning ``auto`` with the calibrated profile
    (``TOKENRING_PROFILE``).

Writes OUT/validate_planner.json (every cell: both profiles, predictions and
measurements), OUT/validate_planner.md (the tables) and OUT/validate_planner.png
(predicted against measured, and auto against the best fixed schedule).
Needs root (network namespaces) and iproute2.

    python benchmarks/validate_planner.py [--world-sizes 4,8] [--out build/validate-planner]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

HEADS = {"MHA": (8, 8), "GQA": (8, 2)}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def nominal_profile(calibrated, network: str, gbps: float):
    """The emulation's own parameters (kind, link rate), with the measured latency, injection and compute."""
    from tokenring.planner import topology

    return dataclasses.replace(calibrated, kind=network, link=topology.Link(topology.gbps_to_bytes(gbps),
                                                                            calibrated.link.latency_s),
                               name=f"nominal {network} {gbps:g} Gbit/s")


def predict(shape, profile, schedules):
    from tokenring.planner.simulate import predict_all

    comparison = predict_all(shape, profile, causal=False, layout="contiguous", schedules=schedules)
    out = {}
    for e in comparison.estimates:
        if e.error is None:
            out[e.name] = {"fwd_s": e.forward.total, "fwdbwd_s": e.training,
                           "hidden_fwd": e.forward.hidden_share, "hidden_fwdbwd": e.training_hidden_share}
    return out


def run(args) -> dict:
    from tokenring.schedules.build import schedule_names
    from tokenring.tools import benchmark, calibrate
    from tokenring.tools.launch import LocalWorld, WorkerError

    schedules = list(args.schedules or schedule_names())
    os.makedirs(args.out, exist_ok=True)
    result_path = os.path.join(args.out, "validate_planner.json")
    report = {"settings": {"seq_local": dict(zip(map(str, args.world_sizes), args.seq_local)), "repeats": args.repeats, "warmup": args.warmup,
                           "head_dim": 64, "dtype": "float32", "causal": False, "schedules": schedules,
                           "cpus": os.cpu_count(), "load_before": os.getloadavg()},
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "cells": []}
    compute_raw: dict[tuple, dict] = {}
    references: dict[tuple, dict] = {}
    if len(args.seq_local) not in (1, len(args.world_sizes)):
        raise SystemExit("--seq-local: one value, or one per --world-sizes entry")
    for index, n in enumerate(args.world_sizes):
        seq_len = n * args.seq_local[min(index, len(args.seq_local) - 1)]
        threads = max(1, (os.cpu_count() or 1) // n)
        for network_kind in args.networks:
            network, why = benchmark.open_network(network_kind, n, args.rates[0], 0.0)
            if network is None:
                raise SystemExit(f"cannot emulate {network_kind}: {why}")
            profile_path = os.path.abspath(os.path.join(args.out, f"profile-{network_kind}-{n}.json"))
            env = {"TOKENRING_TIMEOUT_S": str(args.timeout), "TOKENRING_PROFILE": profile_path,
                   "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
            try:
                log(f"N={n} {network_kind}: starting {n} ranks")
                with LocalWorld(n, tokenring_backend="cpu", threads_per_rank=threads, env=env) as world:
                    world.run_ok("tokenring.tools.benchmark.join_network",
                                 [network.rank_settings(r) for r in range(n)], args.timeout, timeout_s=args.timeout)
                    for label, (hq, hkv) in HEADS.items():
                        if (n, label) not in compute_raw and label in args.heads:
                            log(f"N={n} {label}: calibrating the kernel (every rank at once)")
                            _, raw = calibrate.calibrate(world, seq_len=seq_len, heads=hq, kv_heads=hkv, head_dim=64,
                                                         comm=False, kernel_repeats=5, timeout_s=args.timeout)
                            compute_raw[(n, label)] = raw["compute"]
                    for gbps in args.rates:
                        network.set_rate(gbps)
                        log(f"N={n} {network_kind} {gbps:g} Gbit/s: calibrating the links")
                        first = next(label for label in HEADS if label in args.heads)
                        _, comm_raw = calibrate.calibrate(world, seq_len=seq_len, comm=True, compute=False,
                                                          measured={"compute": compute_raw[(n, first)]},
                                                          target_ms=args.target_ms, max_bytes=8 << 20,
                                                          timeout_s=args.timeout)
                        for label, (hq, hkv) in HEADS.items():
                            if label not in args.heads:
                                continue
                            cell = measure_cell(world, args, network_kind, n, gbps, label, hq, hkv, seq_len, threads,
                                                comm_raw["comm"], compute_raw[(n, label)], profile_path, schedules,
                                                references)
                            report["cells"].append(cell)
                            with open(result_path, "w") as f:
                                json.dump(report, f, indent=1)
            except WorkerError as error:
                log(f"N={n} {network_kind}: the world failed: {error}")
                report.setdefault("failures", []).append({"world_size": n, "network": network_kind,
                                                          "error": str(error)[:2000]})
            finally:
                network.teardown()
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    with open(result_path, "w") as f:
        json.dump(report, f, indent=1)
    return report


def measure_cell(world, args, network_kind, n, gbps, label, hq, hkv, seq_len, threads, comm, compute, profile_path,
                 schedules, references) -> dict:
    from tokenring.planner import choose as planner
    from tokenring.tools import benchmark, calibrate
    from tokenring.tools.launch import WorkerError

    raw = {"comm": comm, "compute": compute, "world_size": n}
    calibrated = calibrate.profile_from_measurements(raw, n, name=f"calibrated {network_kind} {gbps:g} Gbit/s")
    calibrate.save(calibrated, raw, profile_path)
    nominal = nominal_profile(calibrated, network_kind, gbps)
    case = benchmark.Case(impl="ring", seed=0, batch=1, seq_len=seq_len, heads=hq, kv_heads=hkv, head_dim=64,
                          dtype="float32", causal=False, repeats=args.repeats, warmup=args.warmup)
    shape = case.problem().shape(n)
    cell = {"network": network_kind, "world_size": n, "heads": label, "q_heads": hq, "kv_heads": hkv,
            "link_gbps": gbps, "seq_len": seq_len, "seq_local": seq_len // n,
            "profile": {"calibrated": calibrated.to_json(), "derived": raw["derived"], "nominal": nominal.to_json()},
            "predicted": {"calibrated": predict(shape, calibrated, schedules),
                          "nominal": predict(shape, nominal, schedules)},
            "auto_predicted": {"fwd": planner.choose(shape, False, "contiguous", n, False, calibrated).algorithm,
                               "fwdbwd": planner.choose(shape, False, "contiguous", n, True, calibrated).algorithm},
            "measured": {}}
    key = (n, label)
    if key not in references:
        references[key] = benchmark.reference(case)
    want = references[key]
    for impl in [*schedules, "auto"]:
        started = time.monotonic()
        try:
            per_rank = world.run_ok("tokenring.tools.benchmark.measure", dataclasses.replace(case, impl=impl),
                                    args.timeout, timeout_s=args.timeout * (4 * args.repeats + 8))
        except WorkerError as error:
            if world.closed:
                raise
            cell["measured"][impl] = {"error": str(error)[:2000]}
            log(f"  {impl}: FAILED {str(error).splitlines()[0]}")
            continue
        row = benchmark._row(dataclasses.replace(case, impl=impl), network_kind, gbps, n, threads, per_rank, want)
        keep = ("fwd_s", "fwdbwd_s", "passed", "max_rel_err", "comm_alone_fwd_s", "comm_alone_bwd_s",
                "hidden_comm_fwd", "hidden_comm_bwd", "auto_fwd", "auto_fwdbwd", "auto_choice", "label")
        cell["measured"][impl] = {k: row[k] for k in keep if k in row}
        cell["measured"][impl]["kernel_fwd_s_per_rank"] = row.get("kernel_fwd_s_per_rank")
        cell["measured"][impl]["kernel_fwdbwd_s_per_rank"] = row.get("kernel_fwdbwd_s_per_rank")
        p = cell["predicted"]["calibrated"].get(impl)
        guess = f" (predicted {p['fwd_s'] * 1e3:.0f} / {p['fwdbwd_s'] * 1e3:.0f})" if p else ""
        log(f"  N={n} {network_kind} {gbps:g} {label} {row.get('label', impl)}: fwd {row['fwd_s'] * 1e3:.0f} ms, "
            f"fwd+bwd {row['fwdbwd_s'] * 1e3:.0f} ms{guess}{'' if row['passed'] else ' WRONG'}"
            f" [{time.monotonic() - started:.0f} s]")
    return cell


def repredict(report: dict, overheads: dict | None = None) -> None:
    """Replace every cell's predictions by the current simulator's, on the profiles stored with it.

    ``overheads``: {world size: a profile}; its engine costs (per block, per message) replace the
    cells' for that world size (a later calibration, when the stored one predates a model's field).
    """
    from tokenring.planner import topology
    from tokenring.plan.model import ProblemShape

    for cell in report["cells"]:
        shape = ProblemShape(batch=1, seq_local=cell["seq_local"], q_heads=cell["q_heads"], kv_heads=cell["kv_heads"],
                             head_dim=64, itemsize=4)
        schedules = [name for name in cell["measured"] if name != "auto"]
        for model in ("calibrated", "nominal"):
            profile = topology.profile_from_json(cell["profile"][model])
            source = (overheads or {}).get(cell["world_size"])
            if source is not None:
                profile = dataclasses.replace(profile, compute=dataclasses.replace(
                    profile.compute, call_overhead_s=source.compute.call_overhead_s,
                    message_overhead_s=source.compute.message_overhead_s))
                cell["profile"][model] = profile.to_json()
            cell["predicted"][model] = predict(shape, profile, schedules)


# -- tables and chart --------------------------------------------------------------------------------


def analyse(report: dict, model: str = "calibrated") -> dict:
    """Per cell: each schedule's predicted and measured times and errors, and auto against the best fixed."""
    rows, autos = [], []
    for cell in report["cells"]:
        measured = cell["measured"]
        predicted = cell["predicted"][model]
        fixed = {name: m for name, m in measured.items() if name != "auto" and "error" not in m and m["passed"]}
        for name, m in measured.items():
            if name == "auto" or "error" in m:
                continue
            p = predicted.get(name)
            if p is None:
                continue
            rows.append({**_where(cell), "schedule": name,
                         **{f"{k}_pred": p[f"{k}_s"] for k in ("fwd", "fwdbwd")},
                         **{f"{k}_meas": m[f"{k}_s"] for k in ("fwd", "fwdbwd")},
                         **{f"{k}_err": p[f"{k}_s"] / m[f"{k}_s"] - 1 for k in ("fwd", "fwdbwd")}})
        auto = measured.get("auto")
        if auto and "error" not in auto and fixed:
            entry = {**_where(cell), "label": auto.get("label", "auto"),
                     "auto_fwd": auto.get("auto_fwd"), "auto_fwdbwd": auto.get("auto_fwdbwd")}
            for k in ("fwd", "fwdbwd"):
                best = min(fixed, key=lambda name: fixed[name][f"{k}_s"])
                entry[f"{k}_auto"] = auto[f"{k}_s"]
                entry[f"{k}_best"], entry[f"{k}_best_name"] = fixed[best][f"{k}_s"], best
                entry[f"{k}_ratio"] = auto[f"{k}_s"] / fixed[best][f"{k}_s"]
                chosen = auto.get(f"auto_{k}")
                entry[f"{k}_chosen_fixed"] = fixed[chosen][f"{k}_s"] if chosen in fixed else None
            autos.append(entry)
    return {"rows": rows, "autos": autos}


def _where(cell: dict) -> dict:
    return {"network": cell["network"], "world_size": cell["world_size"], "heads": cell["heads"],
            "link_gbps": cell["link_gbps"]}


def markdown(report: dict) -> str:
    lines = []
    for model in ("calibrated", "nominal"):
        a = analyse(report, model)
        errors = [abs(r[f"{k}_err"]) for r in a["rows"] for k in ("fwd", "fwdbwd")]
        within = sum(e <= 0.15 for e in errors)
        lines.append(f"Profile `{model}`: {within} of {len(errors)} predictions within 15 %"
                     + (f"; median |error| {sorted(errors)[len(errors) // 2]:.0%}, worst {max(errors):.0%}"
                        if errors else ""))
    lines.append("")
    a = analyse(report, "calibrated")
    b = {(r["network"], r["world_size"], r["heads"], r["link_gbps"], r["schedule"]): r
         for r in analyse(report, "nominal")["rows"]}
    lines.append("| network | N | heads | Gbit/s | schedule | fwd pred ms | fwd meas ms | err | fwd+bwd pred ms "
                 "| fwd+bwd meas ms | err | nominal err fwd / fwd+bwd |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in a["rows"]:
        n = b.get((r["network"], r["world_size"], r["heads"], r["link_gbps"], r["schedule"]))
        nominal = f"{n['fwd_err']:+.0%} / {n['fwdbwd_err']:+.0%}" if n else "-"
        lines.append(f"| {r['network']} | {r['world_size']} | {r['heads']} | {r['link_gbps']:g} | {r['schedule']} | "
                     f"{r['fwd_pred'] * 1e3:.0f} | {r['fwd_meas'] * 1e3:.0f} | {r['fwd_err']:+.0%} | "
                     f"{r['fwdbwd_pred'] * 1e3:.0f} | {r['fwdbwd_meas'] * 1e3:.0f} | {r['fwdbwd_err']:+.0%} | {nominal} |")
    lines.append("")
    lines.append("auto's own run and its schedule's fixed run are the same plan: their difference is the noise "
                 "of one measurement (as is ring against ring-reverse, its mirror image). \"chosen / best\" is the "
                 "fixed run of the schedule auto chose over the best fixed run: the choice without auto's own noise.")
    lines.append("")
    lines.append("| network | N | heads | Gbit/s | auto ran | fwd: auto / best fixed ms | x best | within 5 % "
                 "| chosen / best | fwd+bwd: auto / best fixed ms | x best | within 5 % | chosen / best "
                 "| noise: auto / same fixed, fwd, fwd+bwd |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in a["autos"]:
        lines.append(
            f"| {r['network']} | {r['world_size']} | {r['heads']} | {r['link_gbps']:g} | {r['label']} | "
            f"{r['fwd_auto'] * 1e3:.0f} / {r['fwd_best'] * 1e3:.0f} ({r['fwd_best_name']}) | {r['fwd_ratio']:.2f} | "
            f"{'yes' if r['fwd_ratio'] <= 1.05 else 'NO'} | {_ratio(r, 'fwd')} | "
            f"{r['fwdbwd_auto'] * 1e3:.0f} / {r['fwdbwd_best'] * 1e3:.0f} ({r['fwdbwd_best_name']}) | "
            f"{r['fwdbwd_ratio']:.2f} | {'yes' if r['fwdbwd_ratio'] <= 1.05 else 'NO'} | {_ratio(r, 'fwdbwd')} | "
            f"{_noise(r, 'fwd')}, {_noise(r, 'fwdbwd')} |")
    a_rows = a["autos"]
    if a_rows:
        lines.append("")
        for k, what in (("fwd", "forward"), ("fwdbwd", "forward + backward")):
            hits = sum(r[f"{k}_ratio"] <= 1.05 for r in a_rows)
            chosen = [r for r in a_rows if r[f"{k}_chosen_fixed"] is not None]
            good = sum(r[f"{k}_chosen_fixed"] / r[f"{k}_best"] <= 1.05 for r in chosen)
            noise = sorted(abs(r[f"{k}_auto"] / r[f"{k}_chosen_fixed"] - 1) for r in chosen)
            lines.append(f"{what}: auto within 5 % of the best fixed schedule in {hits} of {len(a_rows)} cells; its "
                         f"choice's fixed run within 5 % of the best in {good} of {len(chosen)}; auto against the "
                         f"same schedule's fixed run differs by {noise[len(noise) // 2]:.0%} (median), "
                         f"{noise[-1]:.0%} (worst)" if noise else "")
    return "\n".join(lines) + "\n"


def _ratio(r: dict, k: str) -> str:
    chosen = r[f"{k}_chosen_fixed"]
    return "-" if chosen is None else f"{chosen / r[f'{k}_best']:.2f}"


def _noise(r: dict, k: str) -> str:
    chosen = r[f"{k}_chosen_fixed"]
    return "-" if chosen is None else f"{r[f'{k}_auto'] / chosen - 1:+.0%}"


def chart(report: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart skipped: matplotlib is not installed"
    a = analyse(report, "calibrated")
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6))
    for k, marker in (("fwd", "o"), ("fwdbwd", "s")):
        for network, color in (("fullmesh", "tab:blue"), ("switch", "tab:orange")):
            xs = [r[f"{k}_meas"] * 1e3 for r in a["rows"] if r["network"] == network]
            ys = [r[f"{k}_pred"] * 1e3 for r in a["rows"] if r["network"] == network]
            left.scatter(xs, ys, s=14, marker=marker, color=color, alpha=0.7,
                         label=f"{network}, {'forward' if k == 'fwd' else 'fwd+bwd'}")
    values = [r[f"{k}_{w}"] * 1e3 for r in a["rows"] for k in ("fwd", "fwdbwd") for w in ("pred", "meas")]
    if values:
        lo, hi = min(values) / 1.3, max(values) * 1.3
        left.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        left.plot([lo, hi], [lo * 1.15, hi * 1.15], "k:", lw=0.8)
        left.plot([lo, hi], [lo / 1.15, hi / 1.15], "k:", lw=0.8)
        left.set_xscale("log")
        left.set_yscale("log")
    left.set_xlabel("measured ms (slowest rank's median)")
    left.set_ylabel("predicted ms (calibrated profile)")
    left.set_title("every schedule, every cell (dotted: ±15 %)")
    left.legend(fontsize=7)
    autos = a["autos"]
    labels = [f"{r['network'][:4]} N{r['world_size']} {r['heads']}\n{r['link_gbps']:g}G" for r in autos]
    xs = range(len(autos))
    right.bar([x - 0.2 for x in xs], [r["fwd_ratio"] for r in autos], 0.4, label="forward")
    right.bar([x + 0.2 for x in xs], [r["fwdbwd_ratio"] for r in autos], 0.4, label="forward + backward")
    right.axhline(1.0, color="k", lw=0.8)
    right.axhline(1.05, color="r", lw=0.8, ls=":")
    ratios = [r[f"{k}_ratio"] for r in autos for k in ("fwd", "fwdbwd")]
    if ratios:
        right.set_ylim(min(0.8, min(ratios) - 0.05), max(1.3, max(ratios) + 0.05))
    right.set_xticks(list(xs))
    right.set_xticklabels(labels, fontsize=6, rotation=90)
    right.set_ylabel("auto's measured time / best fixed schedule's")
    right.set_title("auto against the best fixed schedule (dotted: +5 %)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv=None) -> int:
    from tokenring.tools.options import comma_separated, positive_float, positive_int

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=comma_separated(positive_int), default=[4, 8])
    parser.add_argument("--networks", type=lambda t: t.split(","), default=["fullmesh", "switch"])
    parser.add_argument("--heads", type=lambda t: t.split(","), default=list(HEADS))
    parser.add_argument("--rates", type=comma_separated(positive_float), default=[0.1, 1.0, 10.0])
    parser.add_argument("--schedules", type=lambda t: t.split(","), help="default: every registered one")
    parser.add_argument("--seq-local", type=comma_separated(positive_int), default=[256, 128],
                        help="rows per rank, one value or one per --world-sizes entry (default: 256,128: about a "
                             "minute per cell on 2 vCPUs)")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--target-ms", type=positive_float, default=60.0)
    parser.add_argument("--timeout", type=positive_float, default=120.0)
    parser.add_argument("--out", default="build/validate-planner")
    parser.add_argument("--report-only", action="store_true", help="rewrite the table and chart from OUT's JSON")
    parser.add_argument("--repredict", action="store_true",
                        help="with --report-only: predict again from the stored profiles with the current simulator")
    parser.add_argument("--overheads", type=lambda t: t.split(","), metavar="N=PROFILE,...",
                        help="with --repredict: take the engine's costs per block and per message for N ranks "
                             "from PROFILE (a later `tokenring calibrate`)")
    args = parser.parse_args(argv)
    result_path = os.path.join(args.out, "validate_planner.json")
    if args.report_only:
        with open(result_path) as f:
            report = json.load(f)
        if args.repredict:
            overheads = {}
            for item in args.overheads or []:
                size, _, path = item.partition("=")
                overheads[int(size)] = __import__("tokenring.planner.topology", fromlist=["x"]).load_profile(path)
            repredict(report, overheads)
            report["repredicted"] = {"overheads": args.overheads}
    else:
        report = run(args)
    table = markdown(report)
    if args.repredict:
        with open(result_path.replace(".json", "-repredicted.json"), "w") as f:
            json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "validate_planner.md"), "w") as f:
        f.write(table)
    print(table)
    problem = chart(report, os.path.join(args.out, "validate_planner.png"))
    log(problem or f"wrote {args.out}/validate_planner.json, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
