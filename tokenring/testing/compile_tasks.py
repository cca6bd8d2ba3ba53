"""torch.compile tasks for `tokenring.tools.launch.LocalWorld`: the same work eagerly and compiled.

Each task is called as ``task(rank, world_size, *args)`` on every rank and
returns plain data (tensors as bytes). The compiled runs count what Dynamo
made with `torch._dynamo.testing.CompileCounterWithBackend`: the frames it
compiled (1 for a whole run: one graph, no graph break, no recompilation)
and the tokenring operators in its graphs. See docs/compile.md and
tests/test_compile.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator
from unittest import mock

import torch
import torch.distributed as dist

import tokenring
from tokenring import sequence
from tokenring.compiled import agree_op, attention_backward_op, attention_op
from tokenring.tools.problems import Problem
from tokenring.tools.tasks import attention_with_grads, rank_grad_output, rank_inputs
from tokenring.testing import model_tasks
from tokenring.testing.model_tasks import TrainingRun
from tokenring.testing.tasks import call_with
from tokenring.testing.tiny_llama import build_reference, random_batches, sequence_parallel_copy

OPS = ("tokenring.agree.default", "tokenring.attention.default")


def _counter(backend: str):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()  # nothing compiled by an earlier task is reused
    return CompileCounterWithBackend(backend)


def _what_dynamo_made(counter) -> dict:
    """Frames compiled, and how many calls of each tokenring operator their graphs hold."""
    targets = [str(n.target) for graph in counter.graphs for n in graph.graph.nodes if n.op == "call_function"]
    return {"frames": counter.frame_count, "ops": {op: targets.count(op) for op in OPS}}


# The tiny Llama, trained --------------------------------------------------------------------------

@dataclass(frozen=True)
class CompiledRun:
    """A `TrainingRun` done on every rank eagerly, then through ``torch.compile(model, backend=b)`` for each b."""

    training: TrainingRun = field(default_factory=lambda: TrainingRun(steps=2, seq_len=16))
    backends: tuple[str, ...] = ("eager", "aot_eager")  # torch.compile backends; "inductor" needs a C++ compiler
    fullgraph: bool = True      # a graph break anywhere fails the compiled run


@contextlib.contextmanager
def _models_wrapped(wrap: Callable[[torch.nn.Module], torch.nn.Module]) -> Iterator[None]:
    """For the block, the model `model_tasks.sequence_parallel_training` builds passes through ``wrap``."""
    build = model_tasks.sequence_parallel_copy
    with mock.patch.object(model_tasks, "sequence_parallel_copy", lambda *a, **kw: wrap(build(*a, **kw))):
        yield


def compiled_training(rank: int, world_size: int, run: CompiledRun) -> dict:
    """`model_tasks.sequence_parallel_training` eagerly and compiled, and what Dynamo made of the model.

    Returns ``eager`` (per-step losses and gradients); per backend, the same
    with ``frames`` and ``ops`` (see `_what_dynamo_made`); and ``explain``,
    what `torch._dynamo.explain` says of one forward pass: graph and break
    counts and the break reasons.
    """
    training = run.training
    results: dict[str, Any] = {"eager": model_tasks.sequence_parallel_training(rank, world_size, training)}
    model = sequence_parallel_copy(build_reference(training.config, training.seed, training.torch_dtype),
                                   layout=training.layout, algorithm=training.algorithm)
    input_ids = random_batches(training.config, training.seed, 1, training.batch, training.seq_len)[0]
    batch = sequence.shard_batch({"input_ids": input_ids}, layout=training.layout)
    explained = torch._dynamo.explain(model)(batch["input_ids"], batch["position_ids"])
    results["explain"] = {
        "graph_count": explained.graph_count,
        "graph_break_count": explained.graph_break_count,
        "break_reasons": [reason.reason for reason in explained.break_reasons],
    }
    for backend in run.backends:
        counter = _counter(backend)
        with _models_wrapped(lambda m: torch.compile(m, backend=counter, fullgraph=run.fullgraph)):
            trained = model_tasks.sequence_parallel_training(rank, world_size, training)
        results[backend] = {**trained, **_what_dynamo_made(counter)}
    torch._dynamo.reset()
    return results


# One token_ring_attn call, compiled -----------------------------------------------------------------

@contextlib.contextmanager
def _entry(compiled: bool, fullgraph: bool = True, **bound: Any) -> Iterator[Any]:
    """For the block, `tokenring.token_ring_attn` called with ``bound`` too, and compiled if ``compiled``.

    Yields the compile counter (backend "eager"), or None.
    """
    original = tokenring.token_ring_attn

    def call(q, k, v, **kwargs):
        return original(q, k, v, **bound, **kwargs)

    counter = _counter("eager") if compiled else None
    entry = torch.compile(call, backend=counter, fullgraph=fullgraph) if compiled else call
    with mock.patch.object(tokenring, "token_ring_attn", entry):
        yield counter


def _group(kind: str | None, world_size: int) -> Any:
    if kind is None:
        return None
    if kind == "process group":
        return dist.new_group(list(range(world_size)))
    if kind == "device mesh":
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    raise ValueError(f"unknown group kind {kind!r}")


def compiled_attention_with_grads(rank: int, world_size: int, problem: Problem, group: str | None = None) -> dict:
    """`tokenring.tools.tasks.attention_with_grads` eagerly and compiled (backend "eager").

    ``group``: None (the default group; compiled with fullgraph=True),
    "process group" (a new one over every rank) or "device mesh" (a 1-D
    mesh, dimension "cp"); an explicit group runs eagerly inside the
    compiled function (fullgraph=False). Returns ``eager`` and ``compiled``
    (each that task's result), ``frames`` and ``ops``.
    """
    group_object = _group(group, world_size)
    with _entry(False, group=group_object):
        eager = attention_with_grads(rank, world_size, problem)
    with _entry(True, fullgraph=group is None, group=group_object) as counter:
        compiled = attention_with_grads(rank, world_size, problem)
    torch._dynamo.reset()
    return {"eager": eager, "compiled": compiled, **_what_dynamo_made(counter)}


def compiled_call_with(rank: int, world_size: int, problem: Problem, per_rank_changes: dict) -> str:
    """`tokenring.testing.tasks.call_with`, its token_ring_attn compiled (fullgraph=False): "ok" or raises."""
    try:
        with _entry(True, fullgraph=False):
            return call_with(rank, world_size, problem, per_rank_changes)
    finally:
        torch._dynamo.reset()


def opcheck(rank: int, world_size: int, problem: Problem) -> dict:
    """`torch.library.opcheck` of the three operators on this rank's shard: {operator: {test: result}}.

    opcheck calls each operator several times, as every rank does, in the same order.
    """
    q, k, v = (t.requires_grad_() for t in rank_inputs(problem, rank, world_size))
    agree_args = (q, k, v, True, problem.causal, problem.softmax_scale, problem.layout, problem.algorithm,
                  problem.backend)
    handle = agree_op(*agree_args)
    out, lse = attention_op(q, k, v, handle)
    dout = rank_grad_output(problem, rank, world_size)
    backward_args = (q.detach(), k.detach(), v.detach(), out.detach(), lse, dout, handle)
    checks = {"agree": (agree_op, agree_args), "attention": (attention_op, (q, k, v, handle)),
              "attention_backward": (attention_backward_op, backward_args)}
    return {name: torch.library.opcheck(op, args) for name, (op, args) in checks.items()}
