"""The ``tokenring`` command: list backends, or run and check one attention call.

``tokenring backends`` shows every discovered backend and why an unavailable
one cannot run. ``tokenring run`` starts local ranks, runs one sequence-parallel
call against the float64 reference, times it, and compares the bytes each
directed link carried with the bytes the plan says it should carry.

Exit status: 0 on success; 1 when a run is wrong (error above tolerance,
traffic off plan) or a worker fails; 2 for bad arguments or no usable backend.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import secrets
import sys
from typing import Any, Sequence

from tokenring.tools.table import format_table

# Multi-rank runs execute in spawned workers that re-import the main module;
# this module therefore does nothing at import time beyond definitions.

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

# Library errors that mean "this cannot run as asked", reported without a traceback.
_USER_ERROR_TYPES = ("tokenring.interfaces.InputError", "tokenring.interfaces.BackendError")


def main(argv: Sequence[str] | None = None) -> int:
    parser, subparsers = _build_parser()
    try:
        args = parser.parse_args(argv)
        validate = _VALIDATORS.get(args.command)
        if validate is not None:
            validate(subparsers[args.command], args)
    except SystemExit as stop:
        # argparse has printed the usage and the error naming the flag (or the help).
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    from tokenring.interfaces import BackendError, InputError
    from tokenring.tools.launch import WorkerError

    try:
        return args.handler(args)
    except (BackendError, InputError) as exc:
        _error(str(exc))
        return EXIT_USAGE
    except WorkerError as exc:
        user_error = _user_error_of(exc)
        if user_error is not None:
            _error(user_error)
            return EXIT_USAGE
        print(str(exc), file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader (e.g. `| head`) stopped early. Point stdout at devnull so
        # the interpreter's final flush does not raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


# -- argument parsing -----------------------------------------------------------


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser, and each command's subparser (whose usage goes with its errors)."""
    from tokenring.schedules.build import schedule_names
    from tokenring.tools import benchmark, calibrate, conformance, plan_command
    from tokenring.tools.options import positive_float, positive_int

    parser = argparse.ArgumentParser(
        prog="tokenring", description="TokenRing: exact sequence-parallel attention."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    backends = commands.add_parser("backends", help="list the discovered backends and whether each can run here")
    backends.add_argument("--json", action="store_true", help="print the list as JSON")
    backends.set_defaults(handler=_backends_command)

    run = commands.add_parser(
        "run",
        help="run one attention call on local ranks, check it against float64 and its traffic against the plan",
    )
    run.add_argument("--backend", default="cpu", help="backend name (default: %(default)s)")
    run.add_argument("--world-size", type=positive_int, default=4, help="number of ranks (default: %(default)s)")
    run.add_argument("--batch", type=positive_int, default=1, help="batch size (default: %(default)s)")
    run.add_argument(
        "--seq-len", type=positive_int, default=4096,
        help="global sequence length, all ranks together (default: %(default)s)",
    )
    run.add_argument("--heads", type=positive_int, default=8, help="query heads (default: %(default)s)")
    run.add_argument("--kv-heads", type=positive_int, help="key/value heads (default: --heads)")
    run.add_argument("--head-dim", type=positive_int, default=64, help="head dimension (default: %(default)s)")
    run.add_argument(
        "--dtype", choices=("float32", "float64", "bfloat16", "float16"), default="float32",
        help="dtype of q, k and v (default: %(default)s)",
    )
    run.add_argument("--causal", action="store_true", help="apply a causal mask")
    run.add_argument(
        "--backward", action="store_true",
        help="run forward plus backward, and check the gradients too",
    )
    run.add_argument(
        "--layout", choices=("contiguous", "zigzag"),
        help="shard layout (default: zigzag when causal, contiguous otherwise)",
    )
    run.add_argument(
        "--algorithm", choices=("auto", *schedule_names()), default="auto",
        help="schedule, or auto: the one the simulator predicts fastest on this machine's profile "
             "(default: %(default)s)"
    )
    run.add_argument(
        "--repeats", type=positive_int, default=5, help="timed calls after the checked one (default: %(default)s)"
    )
    run.add_argument("--scale", type=positive_float, help="softmax scale (default: head_dim ** -0.5)")
    run.add_argument("--seed", type=int, help="seed of the random inputs (default: random)")
    run.add_argument(
        "--threads-per-rank", type=positive_int,
        help="torch threads per rank (default: CPU count // world size, at least 1)",
    )
    run.add_argument(
        "--timeout", type=positive_float, default=300.0,
        help="seconds any wait inside a call may take before it fails (default: %(default)s)",
    )
    run.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    run.set_defaults(handler=_run_command)

    bench = commands.add_parser(
        "bench", help="run one problem through several implementations side by side and compare them"
    )
    benchmark.add_arguments(bench)
    bench.set_defaults(handler=benchmark.command)

    suite = commands.add_parser(
        "conformance",
        help="run the shared conformance suite against an installed backend",
        description=conformance.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    conformance.add_arguments(suite)
    suite.set_defaults(handler=conformance.command)

    plan = commands.add_parser(
        "plan", help="list the registered schedules, or print one plan step by step with its bytes per link",
        description=plan_command.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan_command.add_arguments(plan)
    plan.set_defaults(handler=plan_command.command)

    measure = commands.add_parser(
        "calibrate", help="measure this group's links and kernel and write the profile the planner reads",
        description=calibrate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    calibrate.add_arguments(measure)
    measure.set_defaults(handler=calibrate.command)
    return parser, {"backends": backends, "run": run, "bench": bench, "conformance": suite, "plan": plan,
                    "calibrate": measure}


def _validate_run_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject impossible problems before starting any process."""
    from tokenring.tools.options import check_problem

    check_problem(parser, args, seq_lens=[args.seq_len], layout=args.layout)
    if args.seed is None:
        args.seed = secrets.randbelow(2**31)


def _validate_bench_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from tokenring.tools import benchmark

    benchmark.validate_arguments(parser, args)


def _validate_plan_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from tokenring.tools import plan_command

    plan_command.validate(parser, args)


def _validate_calibrate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from tokenring.tools import calibrate

    calibrate.validate_arguments(parser, args)


_VALIDATORS = {"run": _validate_run_args, "bench": _validate_bench_args, "plan": _validate_plan_args,
               "calibrate": _validate_calibrate_args}


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _user_error_of(exc: Any) -> str | None:
    """The message of a library input/backend error raised on the ranks, if that is what failed."""
    failed = [r for r in exc.results if not r.ok]
    if failed and all(r.error_type in _USER_ERROR_TYPES for r in failed):
        return failed[0].error
    return None


# -- tokenring backends ---------------------------------------------------------


def _backends_command(args: argparse.Namespace) -> int:
    from tokenring.registry import registry

    entries = registry.entries()
    if args.json:
        print(json.dumps([entry.to_json() for entry in entries], indent=2))
        return EXIT_OK
    rows = [("NAME", "DISTRIBUTION", "AVAILABLE", "DEVICE", "DETAILS")]
    for entry in entries:
        info = entry.to_json()
        if info["available"]:
            notes = ", ".join(f"{key}={value}" for key, value in info["details"].items())
        else:
            notes = info["reason"]
        rows.append(
            (info["name"], info["distribution"], "yes" if info["available"] else "no", info["device_type"] or "-", notes)
        )
    print(format_table(rows))
    if not entries:
        print("no backends found (is a backend distribution installed, or plugin autoload disabled?)")
    return EXIT_OK


# -- tokenring run --------------------------------------------------------------


def _run_command(args: argparse.Namespace) -> int:
    import torch

    from tokenring import __version__, unshard
    from tokenring.tools.launch import LocalWorld
    from tokenring.interfaces import LinkTraffic
    from tokenring.plan.model import sum_by_link
    from tokenring.registry import registry
    from tokenring.tools.problems import GRAD_TOLERANCE, GRADIENTS, TOLERANCE, Problem, relative_error
    from tokenring.tools.tasks import from_bytes

    # Fail fast, before starting processes, when the backend cannot run here.
    registry.get(args.backend)
    distribution = next(e.distribution for e in registry.entries() if e.name == args.backend)

    problem = Problem(
        seed=args.seed,
        batch=args.batch,
        seq_len=args.seq_len,
        q_heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        dtype=args.dtype,
        causal=args.causal,
        layout=args.layout,
        algorithm=args.algorithm,
        softmax_scale=args.scale,
        backend=args.backend,
    )
    layout = problem.resolved_layout
    world_size = args.world_size

    threads = f"{args.threads_per_rank} thread{'s' if args.threads_per_rank != 1 else ''}"
    print(f"starting {world_size} ranks ({threads} each)...", file=sys.stderr)
    env = {
        "TOKENRING_TIMEOUT_S": str(args.timeout),
        # Let glibc hand freed memory back at once, so that resident memory
        # tracks what is live and its peak measures one call's working set.
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "0",
    }
    with LocalWorld(
        world_size, tokenring_backend=args.backend, threads_per_rank=args.threads_per_rank, env=env
    ) as world:
        print(f"running 1 checked + {args.repeats} timed calls...", file=sys.stderr)
        # Each wait inside a call is bounded by --timeout in the workers; this
        # bound only catches a world that stopped answering altogether.
        results = world.run_ok(
            "tokenring.tools.tasks.timed_attention", problem, args.repeats, args.backward,
            timeout_s=args.timeout * (args.repeats + 1) * (3 if args.backward else 1),
        )

    print("checking against the float64 reference...", file=sys.stderr)
    got = {"out": unshard([from_bytes(r["out"]) for r in results], layout=layout, dim=1),
           "lse": unshard([from_bytes(r["lse"]) for r in results], layout=layout, dim=2)}
    want = dict(zip(("out", "lse"), problem.reference()))
    if args.backward:
        got.update({name: unshard([from_bytes(r[name]) for r in results], layout=layout) for name in GRADIENTS})
        want.update(zip(GRADIENTS, problem.reference_grads()))
    rel_errs = {name: relative_error(got[name], want[name]) for name in got}
    max_rel_err = max(rel_errs.values())
    tolerance = (GRAD_TOLERANCE if args.backward else TOLERANCE)[problem.torch_dtype]
    passed = max_rel_err <= tolerance

    def link_totals(key: str) -> dict[tuple[int, int, int], int]:
        sent = sum_by_link(LinkTraffic(**message) for result in results for message in result[key])
        return {(t.step, t.src, t.dst): t.bytes for t in sent}

    def planned_totals(backward: bool) -> dict[tuple[int, int, int], int]:
        plan = problem.plan(world_size, backward=backward, needs_grad=args.backward)
        return {(t.step, t.src, t.dst): t.bytes for t in plan.link_bytes(problem.shape(world_size))}

    measured, planned = link_totals("sent"), planned_totals(False)
    traffic_matches_plan = measured == planned
    if args.backward:
        measured_backward, planned_backward = link_totals("backward_sent"), planned_totals(True)
        traffic_matches_plan = traffic_matches_plan and measured_backward == planned_backward

    seconds_per_rank = [r["median_s"] for r in results]
    # Ranks start each call together and the call ends when the slowest finishes.
    seconds = max(seconds_per_rank)

    peak_per_rank = [r["peak_mem_bytes"] for r in results]
    report = {
        "max_rel_err": max_rel_err,
        **{f"rel_err_{name}": error for name, error in rel_errs.items()},
        "backward": args.backward,
        "peak_mem_bytes": max(peak_per_rank) if None not in peak_per_rank else None,
        "peak_mem_bytes_per_rank": peak_per_rank,
        "tolerance": tolerance,
        "passed": passed,
        "seconds": seconds,
        "seconds_per_rank": seconds_per_rank,
        "repeats": args.repeats,
        "link_bytes": _link_list(measured),
        "planned_link_bytes": _link_list(planned),
        **(
            {
                "backward_link_bytes": _link_list(measured_backward),
                "planned_backward_link_bytes": _link_list(planned_backward),
            }
            if args.backward
            else {}
        ),
        "traffic_matches_plan": traffic_matches_plan,
        "plan_note": problem.plan(world_size, needs_grad=args.backward).note,
        "algorithm_chosen": problem.resolved_algorithm(world_size, needs_grad=args.backward),
        "auto_choice": _auto_choice(problem, world_size, args.backward),
        "problem": problem.to_json(),
        "layout": layout,
        "backend": args.backend,
        "backend_distribution": distribution,
        "world_size": world_size,
        "threads_per_rank": args.threads_per_rank,
        "tokenring_version": __version__,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(report, file, indent=2)
            file.write("\n")
    print(_summary(report, measured, planned))
    if args.backward:
        print(_traffic_table("backward traffic", measured_backward, planned_backward))
    return EXIT_OK if passed and traffic_matches_plan else EXIT_FAILED


def _link_list(totals: dict[tuple[int, int, int], int]) -> list[dict[str, int]]:
    return [{"step": s, "src": src, "dst": dst, "bytes": n} for (s, src, dst), n in sorted(totals.items())]


def _auto_choice(problem, world_size: int, needs_grad: bool) -> str | None:
    from tokenring.planner.choose import AUTO, choose

    if problem.algorithm != AUTO:
        return None
    return choose(problem.shape(world_size), problem.causal, problem.resolved_layout, world_size, needs_grad).describe()


def _summary(
    report: dict[str, Any], measured: dict[tuple[int, int, int], int], planned: dict[tuple[int, int, int], int]
) -> str:
    p = report["problem"]
    heads = f"Hq={p['q_heads']}" + (f" Hkv={p['kv_heads']}" if p["kv_heads"] != p["q_heads"] else "")
    scale = f", scale {p['softmax_scale']}" if p["softmax_scale"] is not None else ""
    verdict = "PASS" if report["passed"] else "FAIL"
    per_rank = " ".join(f"{s * 1e3:.2f}" for s in report["seconds_per_rank"])
    each_error = ", ".join(f"{k.removeprefix('rel_err_')} {v:.3g}" for k, v in report.items() if k.startswith("rel_err_"))
    what = "forward+backward" if report["backward"] else "call"
    peaks = report["peak_mem_bytes_per_rank"]
    memory = (
        "not measurable on this platform" if None in peaks
        else "peak rise per rank MiB: " + " ".join(f"{b / 2**20:.1f}" for b in peaks)
    )
    lines = [
        f"problem    B={p['batch']} S={p['seq_len']} {heads} D={p['head_dim']} {p['dtype']}"
        f" {'causal' if p['causal'] else 'non-causal'}{scale}, seed {p['seed']}",
        f"backend    {report['backend']} ({report['backend_distribution']}), torch {report['torch']}",
        f"algorithm  {report['auto_choice'] or p['algorithm']}, {report['layout']} layout, {report['world_size']} ranks"
        f" x {report['threads_per_rank']} thread{'s' if report['threads_per_rank'] != 1 else ''}",
        f"error      {report['max_rel_err']:.3g} max relative error ({each_error}),"
        f" tolerance {report['tolerance']:.0e}: {verdict}",
        f"time       {report['seconds'] * 1e3:.2f} ms per {what} (slowest rank's median of {report['repeats']});"
        f" per rank ms: {per_rank}",
        f"memory     {memory} (resident memory, over the timed calls)",
        f"traffic    measured {'matches' if report['traffic_matches_plan'] else 'DIFFERS FROM'} the plan",
        _traffic_table("forward traffic", measured, planned),
    ]
    return "\n".join(lines)


def _traffic_table(title: str, measured: dict[tuple[int, int, int], int], planned: dict[tuple[int, int, int], int]) -> str:
    rows: list[tuple[Any, ...]] = [("step", "link", "measured", "planned", "")]
    for step, src, dst in sorted(set(measured) | set(planned)):
        got, want = measured.get((step, src, dst), 0), planned.get((step, src, dst), 0)
        rows.append((step, f"{src}->{dst}", got, want, "" if got == want else "<-- differs"))
    table = format_table(rows, right_aligned=(0, 2, 3)).replace("\n", "\n  ")
    return f"{title}: {sum(measured.values())} bytes in all\n  {table}"
