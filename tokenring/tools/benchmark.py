"""``tokenring bench``: one problem through several implementations, side by side.

Implementations (``--impl``, default all):

* every registered schedule (`tokenring.schedules.build.schedule_names`), through
  `token_ring_attn` with that ``algorithm``: ``tokenring`` (queries travel),
  ``ring`` (K and V travel), ...;
* ``torch-ring``: torch's own ring-attention engine, the internal
  ``_templated_ring_attention`` / ``_templated_ring_attention_backward`` of
  ``torch.distributed.tensor.experimental._attention``, driven with torch's CPU
  flash-attention operators (its public ``context_parallel`` does not run on
  CPU), rotating K/V with all-to-all (a true ring) and, when causal, its
  head-tail load balancing, which is our zigzag layout;
* ``sdpa``: the same CPU operator on the whole sequence in one process with as
  many threads as all ranks together: the limit a parallel run is compared with;
* ``auto`` (only when named): ``algorithm="auto"``, the schedule the planner
  (`tokenring.planner.choose.choose`) predicts fastest on the workers' profile
  (``--profile FILE`` sets ``TOKENRING_PROFILE`` for them); the row names what
  it ran, e.g. ``auto (ring)``, or ``auto (tokenring / ring)`` when the
  forward-only and the forward+backward calls chose differently.

Every implementation's output (and gradients) is checked against a float64
reference in the same run; a wrong one is marked and never counts as best.
With ``--network fullmesh|switch`` every rank runs in its own network
namespace and the implementations talk over rate-limited links
(`tokenring.tools.netem`); ``--link-gbps`` and ``--seq-len`` take comma-separated
lists to sweep, on one set of ranks.

Per implementation and configuration: forward and forward+backward medians
(slowest rank), the ratio to the best, parallel efficiency (the ``sdpa`` time
over the parallel time: 1.0 means N ranks with t threads each are as fast as
one process with N·t threads), framework overhead (wall time over the time
spent in block kernels, per rank, averaged), peak resident memory per rank,
and for TokenRing and Ring the share of communication hidden behind compute
(1 − time blocked waiting / time the same messages take with no compute).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

from tokenring.tools.table import format_table

OTHER_IMPLEMENTATIONS = ("torch-ring", "sdpa")  # beside the engine's schedules
AUTO = "auto"  # algorithm="auto": runs through the engine; not in the default --impl list


def engine_names() -> tuple[str, ...]:
    """The implementations that run through `token_ring_attn`: one per registered schedule."""
    from tokenring.schedules.build import schedule_names

    return schedule_names()


def implementation_names() -> tuple[str, ...]:
    """The default ``--impl`` list: the engine's schedules, then torch's ring engine and single-process SDPA."""
    return (*engine_names(), *OTHER_IMPLEMENTATIONS)


def runs_on_engine(impl: str) -> bool:
    """Whether ``impl`` runs through `token_ring_attn` (a registered schedule, or ``auto``)."""
    return impl == AUTO or impl in engine_names()


def resolve_auto(case: "Case", world_size: int, needs_grad: bool) -> str:
    """The schedule ``case.impl`` stands for: itself, or what `tokenring.planner.choose.choose` picks for the call.

    The profile is the planner's default (``TOKENRING_PROFILE``, which
    ``--profile`` sets for the workers).
    """
    if case.impl != AUTO:
        return case.impl
    from tokenring.planner.choose import choose

    problem = case.problem()
    return choose(problem.shape(world_size), case.causal, problem.resolved_layout, world_size, needs_grad).algorithm


# -- what runs on each rank ----------------------------------------------------------

_GROUP: Any = None  # the process group the implementations use (None: the world group, loopback)


def join_network(rank: int, world_size: int, settings: list[dict], timeout_s: float) -> str:
    """Enter this rank's namespace and make the gloo group that talks over the emulated links."""
    import torch.distributed as dist

    from tokenring.tools.netem import enter_namespace

    global _GROUP
    mine = settings[rank]
    enter_namespace(mine["namespace"], mine["interface"])
    _GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return mine["address"]


@dataclass(frozen=True)
class Case:
    """One problem for one implementation."""

    impl: str
    seed: int
    batch: int
    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    causal: bool
    repeats: int
    warmup: int

    def problem(self):
        from tokenring.tools.problems import Problem

        algorithm = self.impl if runs_on_engine(self.impl) else "tokenring"
        return Problem(
            seed=self.seed, batch=self.batch, seq_len=self.seq_len, q_heads=self.heads, kv_heads=self.kv_heads,
            head_dim=self.head_dim, dtype=self.dtype, causal=self.causal, algorithm=algorithm, backend="cpu",
        )

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5


class _NullKernel:
    """A kernel that computes nothing: runs a plan's messages alone, to time communication."""

    def forward(self, q, k, v, *, scale, mask):
        import torch

        from tokenring.interfaces import accumulation_dtype

        lse = torch.zeros(q.shape[0], q.shape[2], q.shape[1], dtype=accumulation_dtype(q.dtype))
        return q.new_zeros(*q.shape[:3], v.shape[-1]), lse

    def backward(self, dout, q, k, v, out, lse, *, scale, mask):
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)


class _TorchRing:
    """torch's templated ring attention on CPU; tensors in torch's (B, H, S, D) layout."""

    def __init__(self, group, causal: bool, scale: float) -> None:
        import torch
        import torch.distributed as dist
        # torch 2.13 keeps the engine here (``experimental._attention`` re-exports only part of it).
        from torch.distributed.tensor.experimental._context_parallel import _attention as cp

        self.cp = cp
        self.group = group if group is not None else dist.group.WORLD
        self.causal, self.scale = causal, scale
        self.kernel_s = 0.0
        forward_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
        backward_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default

        def timed(op):
            def call(*args, **kwargs):
                started = time.perf_counter()
                result = op(*args, **kwargs)
                self.kernel_s += time.perf_counter() - started
                return result
            return call

        self.forward_op, self.backward_op = timed(forward_op), timed(backward_op)

    def _options(self):
        # The head-tail load balancer of torch's CP is our zigzag layout; all-to-all makes it a ring.
        self.cp._cp_options.enable_load_balance = self.causal
        self.cp._cp_options.rotate_method = self.cp._RotateMethod.ALL_TO_ALL

    def forward(self, q, k, v):
        self._options()
        out, lse = self.cp._templated_ring_attention(
            self.group, 2, self.forward_op, q, k, v, is_causal=self.causal, scale=self.scale
        )
        return out.to(q.dtype), lse

    def backward(self, dout, q, k, v, out, lse):
        self._options()
        dq, dk, dv, *_ = self.cp._templated_ring_attention_backward(
            self.group, 2, self.backward_op, grad_out=dout, grad_out_name="grad_out", query=q, key=k, value=v,
            out=out, logsumexp=lse, is_causal=self.causal, dropout_p=0.0, scale=self.scale,
        )
        return dq, dk, dv


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def measure(rank: int, world_size: int, case: Case, timeout_s: float) -> dict:
    """Check one implementation once, then time its forward and forward+backward; this rank's figures."""
    import torch
    import torch.distributed as dist

    import tokenring

    from tokenring.runtime import timeline
    from tokenring.tools.tasks import from_bytes, peak_memory, to_bytes

    problem = case.problem()
    layout = problem.resolved_layout
    q, k, v = (tokenring.shard(t, rank, world_size, layout=layout).contiguous() for t in problem.inputs())
    dout = tokenring.shard(problem.grad_output(), rank, world_size, layout=layout).contiguous()
    os.environ["TOKENRING_TIMEOUT_S"] = str(timeout_s)

    if runs_on_engine(case.impl):
        kwargs = dict(causal=case.causal, group=_GROUP, algorithm=case.impl, backend="cpu")

        def forward():
            with torch.no_grad():
                return tokenring.token_ring_attn(q, k, v, **kwargs)

        def forward_backward():
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            out = tokenring.token_ring_attn(qg, kg, vg, **kwargs)
            out.backward(dout)
            return out.detach(), qg.grad, kg.grad, vg.grad
    elif case.impl == "torch-ring":
        if case.heads != case.kv_heads:
            raise ValueError("torch-ring: torch's CPU flash-attention operator needs Hq == Hkv here")
        ring = _TorchRing(_GROUP, case.causal, case.scale)
        qt, kt, vt, doutt = (t.transpose(1, 2).contiguous() for t in (q, k, v, dout))

        def forward():
            return ring.forward(qt, kt, vt)[0].transpose(1, 2)

        def forward_backward():
            out, lse = ring.forward(qt, kt, vt)
            grads = ring.backward(doutt, qt, kt, vt, out, lse)
            return (out.transpose(1, 2), *(g.transpose(1, 2) for g in grads))
    else:
        raise ValueError(f"argument 'impl': {case.impl!r} does not run on ranks")

    out, dq, dk, dv = forward_backward()  # the checked call (and warm-up)
    checked = {name: to_bytes(t) for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv))}
    del out, dq, dk, dv
    for _ in range(case.warmup):
        forward()

    last: dict[str, Any] = {}

    def timed(fn, repeats):
        seconds = []
        for _ in range(repeats):
            dist.barrier()  # the world group: loopback, never the emulated links
            started = time.perf_counter()
            last[fn.__name__] = fn()
            seconds.append(time.perf_counter() - started)
        return seconds

    fwd = timed(forward, case.repeats)
    with peak_memory() as peak:
        fwdbwd = timed(forward_backward, case.repeats)
    # The timed calls reuse what the checked one left behind (pooled buffers,
    # caches): their last answers must still be the checked ones.
    repeat_drift = 0.0
    if "forward" in last:
        repeat_drift = _rel_err(last["forward"], from_bytes(checked["out"]))
    if "forward_backward" in last:
        for name, tensor in zip(("out", "dq", "dk", "dv"), last["forward_backward"]):
            repeat_drift = max(repeat_drift, _rel_err(tensor, from_bytes(checked[name])))
    del last

    # One instrumented call of each kind: time in kernels, waits, and messages alone.
    extra: dict[str, Any] = {}
    if case.impl == AUTO:  # what the calls ran: the forward-only call's choice may differ from the training one's
        n = dist.get_world_size(_GROUP)
        extra["auto_fwd"] = resolve_auto(case, n, needs_grad=False)
        extra["auto_fwdbwd"] = resolve_auto(case, n, needs_grad=True)
        chosen = tokenring.last_choice()
        extra["auto_choice"] = chosen.describe() if chosen is not None else None
    if runs_on_engine(case.impl):
        with timeline.collect() as fwd_lines:
            dist.barrier()
            forward()
        with timeline.collect() as fb_lines:
            dist.barrier()
            forward_backward()
        extra["kernel_fwd_s"] = sum(t.total(timeline.COMPUTE) for t in fwd_lines)
        extra["kernel_fwdbwd_s"] = sum(t.total(timeline.COMPUTE) for t in fb_lines)
        extra["wait_fwd_s"] = sum(t.total(timeline.WAIT) for t in fwd_lines)
        extra["wait_bwd_s"] = sum(t.total(timeline.WAIT) for t in fb_lines if t.backward)
        extra.update(_comm_alone(case, q, k, v, dout, timeout_s))
    else:
        ring.kernel_s = 0.0
        dist.barrier()
        forward()
        extra["kernel_fwd_s"] = ring.kernel_s
        ring.kernel_s = 0.0
        dist.barrier()
        forward_backward()
        extra["kernel_fwdbwd_s"] = ring.kernel_s
    return {
        **checked,
        "repeat_drift": repeat_drift,
        "fwd_s": fwd,
        "fwdbwd_s": fwdbwd,
        "peak_mem_bytes": peak["bytes"],
        "threads": torch.get_num_threads(),
        **extra,
    }


def _comm_alone(case: Case, q, k, v, dout, timeout_s: float) -> dict:
    """Median seconds the forward and the backward plan take with a kernel that computes nothing."""
    import torch.distributed as dist

    from tokenring.runtime import timeline
    from tokenring.runtime.executor import Executor
    from tokenring.schedules.build import build_plan
    from tokenring.registry import registry

    executor = Executor(registry.get("cpu").create_comm(_GROUP), _NullKernel())
    layout = case.problem().resolved_layout
    n = dist.get_world_size(_GROUP)
    # "auto": the forward-only call's choice forward, the training call's choice backward.
    plan = build_plan(resolve_auto(case, n, needs_grad=False), layout, case.causal, n)
    backward_plan = build_plan(resolve_auto(case, n, needs_grad=True), layout, case.causal, n, backward=True)
    fwd, bwd = [], []
    with timeline.quiet():  # not the user's calls: keep them out of traces
        for _ in range(max(case.repeats, 1)):
            fwd_s, bwd_s = _comm_alone_once(executor, plan, backward_plan, case, q, k, v, dout, timeout_s)
            fwd.append(fwd_s)
            bwd.append(bwd_s)
    return {"comm_alone_fwd_s": _median(fwd), "comm_alone_bwd_s": _median(bwd)}


def _comm_alone_once(executor, plan, backward_plan, case, q, k, v, dout, timeout_s) -> tuple[float, float]:
    import torch.distributed as dist

    dist.barrier()
    started = time.perf_counter()
    out, lse = executor.forward(plan, q, k, v, scale=case.scale, timeout_s=timeout_s)
    fwd_s = time.perf_counter() - started
    dist.barrier()
    started = time.perf_counter()
    executor.backward(backward_plan, q, k, v, out, lse, dout, scale=case.scale, timeout_s=timeout_s)
    return fwd_s, time.perf_counter() - started


# -- in the calling process ------------------------------------------------------------


def single_process(case: Case, threads: int) -> dict:
    """The ``sdpa`` limit: the whole sequence in this process with ``threads`` threads."""
    import torch

    from tokenring.tools.tasks import peak_memory

    problem = case.problem()
    if case.heads != case.kv_heads:
        raise ValueError("sdpa: the CPU flash-attention operator needs Hq == Hkv here")
    q, k, v, dout = (t.transpose(1, 2).contiguous() for t in (*problem.inputs(), problem.grad_output()))
    forward_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    backward_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        def forward():
            return forward_op(q, k, v, 0.0, case.causal, scale=case.scale)

        def forward_backward():
            out, lse = forward()
            return (out, *backward_op(dout, q, k, v, out, lse, 0.0, case.causal, scale=case.scale))

        out, dq, dk, dv = forward_backward()
        for _ in range(case.warmup):
            forward()
        fwd = []
        for _ in range(case.repeats):
            started = time.perf_counter()
            forward()
            fwd.append(time.perf_counter() - started)
        fwdbwd = []
        with peak_memory() as peak:
            for _ in range(case.repeats):
                started = time.perf_counter()
                forward_backward()
                fwdbwd.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(saved)
    outputs = {name: t.transpose(1, 2) for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv))}
    return {"outputs": outputs, "fwd_s": _median(fwd), "fwdbwd_s": _median(fwdbwd), "peak_mem_bytes": peak["bytes"]}


def single_process_task(rank: int, world_size: int, case: Case, threads: int) -> dict:
    """`single_process` in a fresh process of its own, so its memory rise is its own; tensors as bytes."""
    from tokenring.tools.tasks import to_bytes

    result = single_process(case, threads)
    result["outputs"] = {name: to_bytes(t) for name, t in result["outputs"].items()}
    return result


def reference(case: Case, rows: int = 1024) -> dict:
    """out, dq, dk, dv of the full problem in float64, a block of query rows at a time (memory O(rows·S))."""
    import torch

    problem = case.problem()
    q, k, v = (t.to(torch.float64) for t in problem.inputs())
    dout = problem.grad_output().to(torch.float64)
    group = case.heads // case.kv_heads
    k, v = (t.repeat_interleave(group, dim=2).transpose(1, 2) for t in (k, v))  # (B, H, S, D)
    q, dout = (t.transpose(1, 2) for t in (q, dout))
    seq = q.shape[2]
    out = torch.empty_like(q)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    keys = torch.arange(seq)
    for start in range(0, seq, rows):
        stop = min(start + rows, seq)
        scores = q[:, :, start:stop] @ k.transpose(-1, -2) * case.scale
        if case.causal:
            scores = scores.masked_fill(keys[None, :] > torch.arange(start, stop)[:, None], float("-inf"))
        p = torch.softmax(scores, dim=-1)
        o = p @ v
        out[:, :, start:stop] = o
        d = dout[:, :, start:stop]
        dv += p.transpose(-1, -2) @ d
        ds = p * (d @ v.transpose(-1, -2) - (d * o).sum(-1, keepdim=True))
        dq[:, :, start:stop] = ds @ k * case.scale
        dk += ds.transpose(-1, -2) @ q[:, :, start:stop] * case.scale
    b, h, s, dim = dk.shape
    dk, dv = (t.reshape(b, case.kv_heads, group, s, dim).sum(2) for t in (dk, dv))
    return {name: t.transpose(1, 2) for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv))}


def _rel_err(got, want) -> float:
    from tokenring.tools.problems import relative_error

    return relative_error(got, want)


# -- the command -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` subcommand's options to ``parser`` (check them with `validate_arguments`)."""
    from tokenring.tools.options import (
        comma_separated,
        non_negative_float,
        non_negative_int,
        positive_float,
        positive_int,
    )

    parser.add_argument("--impl", default=",".join(implementation_names()),
                        help="comma-separated implementations, and 'auto' (the planner's choice; only when named) "
                             "(default: %(default)s)")
    parser.add_argument("--world-size", type=positive_int, default=4, help="ranks (default: %(default)s)")
    parser.add_argument("--seq-len", type=comma_separated(positive_int), default=[4096],
                        help="full sequence length(s), comma-separated to sweep (default: 4096)")
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--heads", type=positive_int, default=8)
    parser.add_argument("--kv-heads", type=positive_int, help="key/value heads (default: --heads)")
    parser.add_argument("--head-dim", type=positive_int, default=64)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--causal", action="store_true", help="causal mask (zigzag layout)")
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="timed calls per measurement (default: %(default)s)")
    parser.add_argument("--warmup", type=non_negative_int, default=1,
                        help="untimed forward calls first (default: %(default)s)")
    parser.add_argument("--network", choices=("loopback", "fullmesh", "switch"), default="loopback",
                        help="loopback, or emulated links between per-rank network namespaces (root)")
    parser.add_argument("--link-gbps", type=comma_separated(positive_float), default=[10.0],
                        help="emulated link rate(s) per direction in Gbit/s, comma-separated to sweep (default: 10)")
    parser.add_argument("--latency-us", type=non_negative_float, default=0.0,
                        help="added one-way latency per link (needs netem)")
    parser.add_argument("--threads-per-rank", type=positive_int,
                        help="torch threads per rank (default: CPU count // world size, at least 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=positive_float, default=300.0,
                        help="seconds any wait may take before it fails, naming rank and step (default: %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument("--trace", metavar="DIR",
                        help="record every engine call's timeline under DIR (needs the tokenring-trace plugin; "
                             "timings then include tracing); render with `tokenring-trace DIR`")
    parser.add_argument("--profile", metavar="FILE",
                        help="the profile --impl auto plans with: sets TOKENRING_PROFILE for the ranks "
                             "(default: the planner's default profile, see `tokenring calibrate`)")
    parser.add_argument("--chart", metavar="PATH", default="tokenring-bench.png",
                        help="PNG chart path, '' for none (default: %(default)s; needs matplotlib)")


class _Progress:
    """A one-line progress bar on stderr (a line per item when stderr is not a terminal)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.started = total, 0, time.monotonic()
        self.tty = sys.stderr.isatty()

    def show(self, label: str) -> None:
        width = 24
        filled = width * self.done // max(self.total, 1)
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {time.monotonic() - self.started:5.0f} s  {label}"
        if self.tty:
            print(f"\r{line:<100}", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def step(self, label: str) -> None:
        self.done += 1
        self.show(label)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


# torch's CPU flash-attention operator (torch's ring engine, the single-process limit) needs Hq == Hkv.
_NEED_EQUAL_HEADS = ("torch-ring", "sdpa")


def validate_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject what cannot run before starting any process, through ``parser.error`` (exit status 2).

    The problem itself is checked by the same code as ``tokenring run``'s
    (`tokenring.tools.options.check_problem`); ``args.impl`` becomes a list.
    """
    from tokenring.tools.options import check_problem

    known = (*implementation_names(), AUTO)
    impls = [name.strip() for name in args.impl.split(",") if name.strip()]
    unknown = [name for name in impls if name not in known]
    if unknown or not impls:
        parser.error(f"argument --impl: unknown {unknown}; choose from {', '.join(known)}")
    args.impl = impls
    check_problem(parser, args, seq_lens=args.seq_len)
    if args.kv_heads != args.heads and all(name in _NEED_EQUAL_HEADS for name in impls):
        parser.error(
            f"argument --impl: {', '.join(impls)} need --kv-heads equal to --heads; "
            f"add one of {', '.join(engine_names())} to run GQA"
        )


def command(args: argparse.Namespace) -> int:
    """Run ``tokenring bench`` with arguments checked by `validate_arguments`."""
    impls = list(args.impl)
    n = args.world_size
    kv_heads = args.kv_heads
    if kv_heads != args.heads:
        dropped = [name for name in impls if name in _NEED_EQUAL_HEADS]
        impls = [name for name in impls if name not in dropped]
        if dropped:
            print(f"note: {', '.join(dropped)} skipped: they need --kv-heads equal to --heads (GQA given)", file=sys.stderr)
    threads = args.threads_per_rank
    rates = args.link_gbps if args.network != "loopback" else [None]

    network, fallback = _open_network(args, n)
    try:
        rows = _run_all(args, impls, n, kv_heads, threads, network, rates)
    finally:
        if network is not None:
            network.teardown()

    report = {
        "results": rows,
        "network_requested": args.network,
        "network_fallback_reason": fallback,
        "machine": {"cpus": os.cpu_count(), "threads_per_rank": threads, "python": sys.version.split()[0]},
        "torch": __import__("torch").__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "tokenring bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None,
    }
    print(format_table(_table_rows(rows), right_aligned=tuple(range(3, 13))))
    if fallback:
        print(f"note: --network {args.network} was not available ({fallback}); ran over loopback", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(report, file, indent=2)
            file.write("\n")
    if args.chart:
        problem = _chart(rows, args.chart)
        print(problem or f"chart written to {args.chart}", file=sys.stderr)
    return 0 if all(row["passed"] for row in rows) else 1


def _open_network(args, n):
    return open_network(args.network, n, args.link_gbps[0], args.latency_us)


def open_network(kind: str, world_size: int, link_gbps: float, latency_us: float = 0.0):
    """Set up the emulated network ``kind`` (`tokenring.tools.netem`) for ``world_size`` ranks.

    Returns (network, None), or (None, why) when it cannot be emulated here
    and the run may fall back to loopback; ``kind`` "loopback" gives (None,
    None). Asking for latency where it cannot be emulated stops with an
    error. Tear the network down with ``network.teardown()``; give each
    rank ``network.rank_settings(rank)`` through `join_network`.
    """
    if kind == "loopback":
        return None, None
    from tokenring.tools.netem import Network, NetworkUnavailable

    network = Network(kind, world_size, link_gbps, latency_us)
    try:
        network.setup()
    except NetworkUnavailable as reason:
        if latency_us > 0:
            raise SystemExit(f"error: {reason}") from None
        print(f"warning: cannot emulate {kind}: {reason}; falling back to loopback", file=sys.stderr)
        return None, str(reason)
    print(f"network: {network.describe()}", file=sys.stderr)
    return network, None


def _run_all(args, impls, n, kv_heads, threads, network, rates) -> list[dict]:
    from tokenring.tools.launch import LocalWorld
    from tokenring.tools.tasks import from_bytes

    base = Case(impl="tokenring", seed=args.seed, batch=args.batch, seq_len=args.seq_len[0], heads=args.heads,
                kv_heads=kv_heads, head_dim=args.head_dim, dtype=args.dtype, causal=args.causal,
                repeats=args.repeats, warmup=args.warmup)
    ranked = [i for i in impls if i != "sdpa"]
    progress = _Progress(len(args.seq_len) * (len(rates) * len(ranked) + 2))
    progress.show(f"starting {n} ranks x {threads} threads")
    env = {"TOKENRING_TIMEOUT_S": str(args.timeout), "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    if args.trace:
        env["TOKENRING_TRACE_DIR"] = os.path.abspath(args.trace)
    if getattr(args, "profile", None):
        env["TOKENRING_PROFILE"] = os.path.abspath(args.profile)
    rows: list[dict] = []
    # Each wait inside a call is bounded by --timeout and names its rank and step; this outer
    # bound only catches a world that stopped answering altogether.
    task_timeout = args.timeout * (4 * args.repeats + 8)
    try:
        with LocalWorld(n, tokenring_backend="cpu", threads_per_rank=threads, env=env) as world:
            if network is not None:
                settings = [network.rank_settings(r) for r in range(n)]
                world.run_ok("tokenring.tools.benchmark.join_network", settings, args.timeout, timeout_s=args.timeout)
            for seq_len in args.seq_len:
                case = replace(base, seq_len=seq_len)
                progress.show(f"S={seq_len}: float64 reference")
                want = reference(case)
                progress.step(f"S={seq_len}: reference done")
                # The single-process limit is always measured: every efficiency is relative to it.
                limit = None
                if case.heads == case.kv_heads:
                    with LocalWorld(1, threads_per_rank=n * threads, env=env) as alone:
                        (limit,) = alone.run_ok("tokenring.tools.benchmark.single_process_task", case, n * threads,
                                                timeout_s=task_timeout)
                    limit["outputs"] = {name: from_bytes(blob) for name, blob in limit["outputs"].items()}
                if "sdpa" in impls and limit is not None:
                    rows.append(_row(replace(case, impl="sdpa"), "single-process", None, n, threads, limit, want))
                progress.step(f"S={seq_len}: single-process limit")
                for rate in rates:
                    if network is not None and rate != network.link_gbps:
                        network.set_rate(rate)
                    label = network.topology if network is not None else "loopback"
                    for impl in ranked:
                        progress.show(f"S={seq_len} {label} {rate or ''} {impl}")
                        per_rank = world.run_ok(
                            "tokenring.tools.benchmark.measure", replace(case, impl=impl), args.timeout, timeout_s=task_timeout
                        )
                        rows.append(_row(replace(case, impl=impl), label, rate, n, threads, per_rank, want, limit))
                        progress.step(f"S={seq_len} {label} {rate or ''} {impl}")
    finally:
        progress.close()
    _add_ratios(rows)
    return rows


def _row(case: Case, network: str, rate, n: int, threads: int, measured, want: dict, limit: dict | None = None) -> dict:
    from tokenring import unshard
    from tokenring.tools.problems import GRAD_TOLERANCE
    from tokenring.tools.tasks import from_bytes

    problem = case.problem()
    if case.impl == "sdpa":
        got = measured["outputs"]
        fwd, fwdbwd = measured["fwd_s"], measured["fwdbwd_s"]
        peak = measured["peak_mem_bytes"]
        extra: dict[str, Any] = {"overhead": 1.0, "ranks": 1, "threads": n * threads}
    else:
        layout = problem.resolved_layout
        got = {name: unshard([from_bytes(r[name]) for r in measured], layout=layout) for name in want}
        fwd = max(_median(r["fwd_s"]) for r in measured)         # a call ends when its slowest rank does
        fwdbwd = max(_median(r["fwdbwd_s"]) for r in measured)
        peaks = [r["peak_mem_bytes"] for r in measured]
        peak = max(peaks) if None not in peaks else None
        kernel = [r["kernel_fwdbwd_s"] for r in measured]
        extra = {
            "ranks": n,
            "threads": threads,
            "peak_mem_bytes_per_rank": peaks,
            "kernel_fwd_s_per_rank": [r["kernel_fwd_s"] for r in measured],
            "kernel_fwdbwd_s_per_rank": kernel,
            "overhead": statistics.mean(fwdbwd / k for k in kernel) if all(k > 0 for k in kernel) else None,
        }
        if runs_on_engine(case.impl):
            extra["comm_alone_fwd_s"] = max(r["comm_alone_fwd_s"] for r in measured)
            extra["comm_alone_bwd_s"] = max(r["comm_alone_bwd_s"] for r in measured)
            extra["wait_fwd_s_per_rank"] = [r["wait_fwd_s"] for r in measured]
            extra["wait_bwd_s_per_rank"] = [r["wait_bwd_s"] for r in measured]
            extra["comm_alone_fwd_s_per_rank"] = [r["comm_alone_fwd_s"] for r in measured]
            extra["comm_alone_bwd_s_per_rank"] = [r["comm_alone_bwd_s"] for r in measured]
            extra["hidden_comm_fwd"] = _hidden(extra["wait_fwd_s_per_rank"], extra["comm_alone_fwd_s_per_rank"])
            extra["hidden_comm_bwd"] = _hidden(extra["wait_bwd_s_per_rank"], extra["comm_alone_bwd_s_per_rank"])
        if case.impl == AUTO:
            first = measured[0]
            extra["auto_fwd"], extra["auto_fwdbwd"] = first["auto_fwd"], first["auto_fwdbwd"]
            extra["auto_choice"] = first.get("auto_choice")
            extra["label"] = auto_label(first["auto_fwd"], first["auto_fwdbwd"])
    errors = {name: _rel_err(got[name], want[name]) for name in want}
    if case.impl != "sdpa":
        # Timed calls that drifted from the checked one make the row wrong too.
        errors["timed_vs_checked"] = max(r["repeat_drift"] for r in measured)
    max_err = max(errors.values())
    tolerance = GRAD_TOLERANCE[problem.torch_dtype]
    efficiency = None
    if limit is not None and case.impl != "sdpa":
        efficiency = limit["fwdbwd_s"] / fwdbwd
    elif case.impl == "sdpa":
        efficiency = 1.0
    return {
        "impl": case.impl,
        "network": network,
        "link_gbps": rate,
        "world_size": n if case.impl != "sdpa" else 1,
        "seq_len": case.seq_len,
        "seq_local": case.seq_len // n if case.impl != "sdpa" else case.seq_len,
        "batch": case.batch, "heads": case.heads, "kv_heads": case.kv_heads, "head_dim": case.head_dim,
        "dtype": case.dtype, "causal": case.causal,
        "fwd_s": fwd,
        "fwdbwd_s": fwdbwd,
        "max_rel_err": max_err,
        "rel_err": errors,
        "tolerance": tolerance,
        "passed": max_err <= tolerance,
        "peak_mem_bytes": peak,
        "parallel_efficiency": efficiency,
        **extra,
    }


def auto_label(forward: str, training: str) -> str:
    """How a row of ``auto`` reads: "auto (ring)", or "auto (tokenring / ring)": forward-only / training choice."""
    return f"auto ({forward})" if forward == training else f"auto ({forward} / {training})"


def _hidden(waits: list[float], alone: list[float]) -> float | None:
    """Mean over ranks of the share of communication time not spent blocked waiting.

    Each rank's share is clamped to [0, 1]: a rank that waited longer than
    the messages alone take (for a slower peer, say) hid nothing.
    """
    shares = [min(max(1.0 - w / a, 0.0), 1.0) for w, a in zip(waits, alone) if a > 0]
    return statistics.mean(shares) if shares else None


def _add_ratios(rows: list[dict]) -> None:
    """ratio_fwd / ratio_fwdbwd: time over the best correct parallel implementation of the same configuration."""
    def config(row):
        return (row["seq_len"], row["link_gbps"] if row["impl"] != "sdpa" else "limit")

    best: dict[Any, dict[str, float]] = {}
    for row in rows:
        if row["passed"] and row["impl"] != "sdpa":
            entry = best.setdefault(config(row), {"fwd_s": math.inf, "fwdbwd_s": math.inf})
            for key in entry:
                entry[key] = min(entry[key], row[key])
    for row in rows:
        entry = best.get(config(row))
        for key in ("fwd_s", "fwdbwd_s"):
            row[f"ratio_{key[:-2]}"] = row[key] / entry[key] if entry and row["passed"] else None


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _table_rows(rows: list[dict]) -> list[tuple]:
    table = [("impl", "network", "Gbit/s", "S", "fwd ms", "x best", "fwd+bwd ms", "x best", "efficiency",
              "overhead", "hidden f/b", "peak MiB", "max rel err")]
    for r in rows:
        hidden = (
            f"{_fmt(r.get('hidden_comm_fwd'), '.0%')}/{_fmt(r.get('hidden_comm_bwd'), '.0%')}"
            if runs_on_engine(r["impl"]) else "-"
        )
        table.append((
            r.get("label", r["impl"]), r["network"], _fmt(r["link_gbps"], "g"), r["seq_len"],
            _fmt(r["fwd_s"] * 1e3, ".1f"), _fmt(r.get("ratio_fwd"), ".2f"),
            _fmt(r["fwdbwd_s"] * 1e3, ".1f"), _fmt(r.get("ratio_fwdbwd"), ".2f"),
            _fmt(r["parallel_efficiency"], ".2f"), _fmt(r.get("overhead"), ".2f"), hidden,
            _fmt(None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**20, ".0f"),
            f"{r['max_rel_err']:.1e}" + ("" if r["passed"] else " WRONG"),
        ))
    return table


def _chart(rows: list[dict], path: str) -> str | None:
    """A grouped bar chart of forward and forward+backward time; returns why not, if it cannot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart skipped: matplotlib is not installed (pip install 'tokenring-attn[bench]')"
    configs: list[tuple] = []
    for r in rows:
        if r["impl"] != "sdpa" and (r["seq_len"], r["link_gbps"]) not in configs:
            configs.append((r["seq_len"], r["link_gbps"]))
    impls = [i for i in (*implementation_names(), AUTO) if any(r["impl"] == i for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(configs) + 4), 4.5), squeeze=False)
    width = 0.8 / max(len(impls), 1)
    network = next((r["network"] for r in rows if r["impl"] != "sdpa"), "loopback")
    for ax, key, title in zip(axes[0], ("fwd_s", "fwdbwd_s"), ("forward", "forward + backward")):
        for index, impl in enumerate(impls):
            heights = []
            for seq_len, rate in configs:
                match = [r for r in rows if r["impl"] == impl and r["seq_len"] == seq_len
                         and (impl == "sdpa" or r["link_gbps"] == rate)]
                heights.append(match[0][key] * 1e3 if match and match[0]["passed"] else 0.0)
            label = impl if impl != AUTO else next((r.get("label", impl) for r in rows if r["impl"] == impl), impl)
            ax.bar([c + (index - (len(impls) - 1) / 2) * width for c in range(len(configs))], heights, width, label=label)
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels([f"S={s}" + (f"\n{g:g} Gbit/s" if g else "") for s, g in configs], fontsize=8)
        ax.set_ylabel("ms (slowest rank's median)")
        ax.set_title(f"{title} ({network})")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
