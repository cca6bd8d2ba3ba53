"""Local multi-process worlds: start N ranks once, run many tasks on them.

The CLI and the test suites use this to run sequence-parallel calls on one
machine. Workers are started once per world and reused, because starting a
process that imports torch costs seconds. A task is a module-level function
named by its import path, called on every rank with ``(rank, world_size,
*args)``; results come back in rank order. A worker that dies or a task that
outlives its timeout fails the call (naming the rank) and shuts the world
down; it never hangs the caller.
"""

from __future__ import annotations

import datetime
import importlib
import multiprocessing as mp
import os
import queue
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any

from tokenring.runtime.executors import DEFAULT_TIMEOUT_S, TIMEOUT_ENV


@dataclass
class RankResult:
    rank: int
    value: Any = None
    error_type: str | None = None    # qualified name of the exception class
    error: str | None = None         # str(exception)
    traceback: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_type is None


class WorkerError(RuntimeError):
    """A task failed on one or more ranks, or a worker stopped answering."""

    def __init__(self, message: str, results: list[RankResult] | None = None):
        super().__init__(message)
        self.results = results or []


def _resolve(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _failure(rank: int, exc: BaseException) -> RankResult:
    return RankResult(
        rank,
        error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
        error=str(exc),
        traceback=traceback.format_exc(),
    )


def _worker_main(rank, world_size, backend, tokenring_backend, init_file, threads, env, tasks, results):
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    if threads:
        torch.set_num_threads(threads)
    try:
        if tokenring_backend is not None:
            from tokenring.registry import registry

            registry.get(tokenring_backend).prepare_process(rank)
        dist.init_process_group(
            backend,
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=float(env.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))),
        )
    except BaseException as exc:
        results.put(_failure(rank, exc))
        return
    results.put(RankResult(rank, value="ready"))
    while True:
        task = tasks.get()
        if task is None:
            break
        task_id, path, args, kwargs = task
        try:
            value = _resolve(path)(rank, world_size, *args, **kwargs)
            outcome = RankResult(rank, value=value)
        except BaseException as exc:
            outcome = _failure(rank, exc)
        results.put((task_id, outcome))
    dist.destroy_process_group()


def loopback_interface() -> str:
    """The name of this machine's loopback interface ("lo" on Linux, "lo0" on macOS)."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        names = []
    return next((name for name in ("lo", "lo0") if name in names), "lo")


class LocalWorld:
    """N local ranks joined in one torch.distributed process group."""

    def __init__(
        self,
        world_size: int,
        *,
        backend: str | None = None,
        tokenring_backend: str | None = None,
        threads_per_rank: int | None = None,
        env: dict[str, str] | None = None,
        start_timeout_s: float = 120.0,
    ) -> None:
        """Start ``world_size`` ranks joined over ``backend`` (a torch.distributed backend).

        With ``tokenring_backend`` (a TokenRing backend's name), each rank
        calls that backend's `Backend.prepare_process` before joining, and
        ``backend`` defaults to its `Backend.distributed_backend`; without
        either, ranks join over gloo.
        """
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if backend is None:
            if tokenring_backend is None:
                backend = "gloo"
            else:
                from tokenring.registry import registry

                backend = registry.get(tokenring_backend).distributed_backend
        self.world_size = world_size
        if threads_per_rank is None:
            threads_per_rank = max(1, (os.cpu_count() or 1) // world_size)
        self.threads_per_rank = threads_per_rank
        ctx = mp.get_context("spawn")
        self._dir = tempfile.TemporaryDirectory(prefix="tokenring-world-")
        init_file = os.path.join(self._dir.name, "rendezvous")
        # gloo listens on the address the hostname resolves to, which on many machines (Docker, cloud VMs)
        # is reachable from the network; a world of this machine's processes needs only loopback.
        worker_env = {"OMP_NUM_THREADS": str(threads_per_rank), "GLOO_SOCKET_IFNAME": loopback_interface(),
                      **(env or {})}
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        self._next_id = 0
        self._procs = [
            ctx.Process(
                target=_worker_main,
                args=(r, world_size, backend, tokenring_backend, init_file, threads_per_rank, worker_env, self._tasks[r], self._results),
                daemon=True,
                name=f"tokenring-rank{r}",
            )
            for r in range(world_size)
        ]
        # Spawned children inherit os.environ as it is at start; some settings
        # (the allocator's, for one) are read before any of our code runs.
        saved = {name: os.environ.get(name) for name in worker_env}
        os.environ.update(worker_env)
        try:
            for p in self._procs:
                p.start()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        ready = self._collect(lambda item: isinstance(item, RankResult), start_timeout_s, "start")
        failed = [r for r in ready if not r.ok]
        if failed:
            self.close()
            raise WorkerError(f"rank {failed[0].rank} failed to start: {failed[0].error}", failed)

    def _collect(self, accept, timeout_s: float, what: str, allow_exits: bool = False) -> list:
        deadline = time.monotonic() + timeout_s
        got: dict[int, Any] = {}
        while len(got) < self.world_size:
            try:
                item = self._results.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in got]
                if dead and allow_exits:
                    for r in dead:
                        got[r] = RankResult(r, error_type="exited", error=f"exit code {self._procs[r].exitcode}")
                    continue
                if dead:
                    code = self._procs[dead[0]].exitcode
                    self.close()
                    raise WorkerError(f"{what}: rank {dead[0]} exited (exit code {code})")
                if time.monotonic() > deadline:
                    missing = sorted(set(range(self.world_size)) - set(got))
                    self.close()
                    raise WorkerError(f"{what}: ranks {missing} gave no answer within {timeout_s:.0f} s")
                continue
            if accept(item):
                result = item if isinstance(item, RankResult) else item[1]
                got[result.rank] = result
        return [got[r] for r in range(self.world_size)]

    def run(self, task: str, *args: Any, timeout_s: float = 300.0, allow_exits: bool = False,
            **kwargs: Any) -> list[RankResult]:
        """Call the function at import path ``task`` on every rank; results in rank order.

        With ``allow_exits`` a rank whose process ends gets a result with
        error_type "exited" and the others' results are still collected
        (fault injection); the world is then unusable: close it.
        """
        if self.closed:
            raise WorkerError("this world is closed")
        task_id = self._next_id
        self._next_id += 1
        for q in self._tasks:
            q.put((task_id, task, args, kwargs))
        return self._collect(
            lambda item: isinstance(item, tuple) and item[0] == task_id, timeout_s, f"task {task}", allow_exits
        )

    def run_ok(self, task: str, *args: Any, timeout_s: float = 300.0, **kwargs: Any) -> list[Any]:
        """Like `run`, but raise WorkerError if any rank raised; return the values."""
        results = self.run(task, *args, timeout_s=timeout_s, **kwargs)
        failed = [r for r in results if not r.ok]
        if failed:
            first = failed[0]
            raise WorkerError(
                f"task {task} failed on rank(s) {[r.rank for r in failed]}; rank {first.rank}: "
                f"{first.error_type}: {first.error}\n{first.traceback}",
                results,
            )
        return [r.value for r in results]

    @property
    def closed(self) -> bool:
        return not self._procs

    def close(self) -> None:
        for q in self._tasks:
            try:
                q.put(None)
            except Exception:
                pass
        deadline = time.monotonic() + 5
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs = []
        self._dir.cleanup()

    def __enter__(self) -> "LocalWorld":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
