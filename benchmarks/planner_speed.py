"""How long ``algorithm="auto"`` takes to choose, and how long the simulator takes at scale.

    python benchmarks/planner_speed.py                          # auto at N = 32, simulate at N = 1024
    python benchmarks/planner_speed.py --auto-n 32 --simulate-n 256
    python benchmarks/planner_speed.py --simulate-n 64 --compare-with a67b4b8   # predictions before and after

Two figures, each printed in seconds (wall, and CPU of this process):

* auto's first call: `tokenring.planner.choose.choose` for one causal, zigzag layer
  shaped like Llama-3-8B's (32 query heads, 8 K/V heads, head dim 128,
  bfloat16, 4096 tokens per rank), forward-only and forward + backward, on
  the planner's assumed switch and on a full mesh, each in a fresh process
  (no plan built yet: the first call pays for every plan it builds). The
  schedules it built are named.
* the simulator: `tokenring.planner.simulate.simulate` of the TokenRing and ring
  forward plans (zigzag, causal) on a full mesh and on a switch; the time to
  build each plan is printed apart (plan building is not the simulator's).

``--compare-with REV`` also runs the simulator of git revision REV
(``tokenring/planner/simulate.py`` as it was there) on the same plans and prints
both predictions, to show that a change to the simulator keeps them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

AUTO_CASE = r"""
import json, sys, time
from tokenring.planner import topology as T
from tokenring.plan.model import ProblemShape
from tokenring.planner import choose as planner
from tokenring.planner import simulate

n, kind, needs_grad = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
shape = ProblemShape(batch=1, seq_local=4096, q_heads=32, kv_heads=8, head_dim=128, itemsize=2)
profile = (T.switch(n, planner.ASSUMED_GBPS, planner.ASSUMED_LATENCY_US, name="assumed") if kind == "switch"
           else T.fullmesh(n, 400, 3, tflops=400))
built = []
predict = simulate.predict
def spy(name, *args, **kwargs):
    built.append(name)
    return predict(name, *args, **kwargs)
simulate.predict = spy
import tokenring.schedules.build  # the registry and its plugins load here, not in the timed call
tokenring.schedules.build.schedule_names()
wall, cpu = time.perf_counter(), time.process_time()
choice = planner.choose(shape, True, "zigzag", n, needs_grad, profile=profile)
print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
                  "chose": choice.algorithm, "built": built}))
"""


def auto_first_call(n: int) -> None:
    print(f"auto's first call, N = {n} (Llama-3-8B layer, 4096 tokens per rank, causal zigzag)")
    for kind in ("switch", "fullmesh"):
        for needs_grad in (False, True):
            done = subprocess.run([sys.executable, "-c", AUTO_CASE, str(n), kind, "1" if needs_grad else "0"],
                                  capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                print(done.stderr, file=sys.stderr)
                raise SystemExit(done.returncode)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            what = "forward + backward" if needs_grad else "forward"
            print(f"  {kind:8s} {what:18s} {result['wall']:6.2f} s (cpu {result['cpu']:.2f} s) -> {result['chose']:10s}"
                  f" built: {', '.join(result['built'])}")


def old_simulator(revision: str):
    source = subprocess.run(["git", "show", f"{revision}:tokenring/planner/simulate.py"], capture_output=True, text=True,
                            cwd=ROOT, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "simulate_then.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("tokenring.simulate_then", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def simulator_at_scale(n: int, compare_with: str | None) -> None:
    from tokenring.planner import topology as T
    from tokenring.plan.model import ProblemShape
    from tokenring.schedules.build import build_plan
    from tokenring.planner.simulate import simulate

    then = old_simulator(compare_with) if compare_with else None
    shape = ProblemShape(batch=1, seq_local=1024, q_heads=32, kv_heads=8, head_dim=128, itemsize=2)
    print(f"the simulator, N = {n} (forward plans, causal zigzag)")
    for name in ("tokenring", "ring"):
        started = time.perf_counter()
        plan = build_plan(name, "zigzag", True, n)
        print(f"  {name}: built in {time.perf_counter() - started:.1f} s "
              f"({sum(len(s.transfers) for s in plan.steps)} messages, {sum(len(s.blocks) for s in plan.steps)} blocks)")
        for profile in (T.fullmesh(n, 400, 2), T.switch(n, 100, 5, tflops=150)):
            wall, cpu = time.perf_counter(), time.process_time()
            now = simulate(plan, shape, profile)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            line = f"    {profile.kind:8s} simulated in {wall:6.2f} s (cpu {cpu:.2f} s): {now.total!r} s"
            if then is not None:
                started = time.perf_counter()
                before = then.simulate(plan, shape, profile)
                same = (before.total, before.comm, before.exposed, before.compute, before.resource_bytes,
                        [tuple(vars(s).values()) for s in before.steps]) == (
                    now.total, now.comm, now.exposed, now.compute, now.resource_bytes,
                    [tuple(vars(s).values()) for s in now.steps])
                line += (f"; at {compare_with}: {before.total!r} s in {time.perf_counter() - started:.2f} s"
                         f" ({'identical' if same else 'DIFFERENT'} in every step and resource)")
            print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--auto-n", type=int, default=32, help="ranks for auto's first call (0: skip)")
    parser.add_argument("--simulate-n", type=int, default=1024, help="ranks for the simulator (0: skip)")
    parser.add_argument("--compare-with", metavar="REV", help="also run the simulator of git revision REV")
    args = parser.parse_args()
    if args.auto_n:
        auto_first_call(args.auto_n)
    if args.simulate_n:
        simulator_at_scale(args.simulate_n, args.compare_with)


if __name__ == "__main__":
    main()
