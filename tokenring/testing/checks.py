"""Judging a multi-rank run: outputs, gradients and traffic against float64 and the plan.

Shared by the conformance suite and the core's own tests, so that both hold
every backend to exactly the same standard.
"""

from __future__ import annotations

from tokenring.interfaces import LinkTraffic, accumulation_dtype
from tokenring.tools.launch import LocalWorld
from tokenring.plan.model import sum_by_link
from tokenring.tools.problems import GRAD_TOLERANCE, TOLERANCE, Problem, relative_error
from tokenring.tools.tasks import from_bytes


def _gathered(results: list[dict], name: str, problem: Problem, dim: int = 1):
    return problem.unshard([from_bytes(r[name]).cpu() for r in results], dim=dim)


def check_attention(world: LocalWorld, problem: Problem, memory: str = "contiguous") -> list[dict]:
    """Run one forward on every rank of ``world``; assert out and lse match float64 and traffic its plan."""
    world_size = world.world_size
    results = world.run_ok("tokenring.tools.tasks.attention", problem, memory)
    out, lse = _gathered(results, "out", problem), _gathered(results, "lse", problem, dim=2)
    want_out, want_lse = problem.reference()
    tolerance = TOLERANCE[problem.torch_dtype]
    err_out, err_lse = relative_error(out, want_out), relative_error(lse, want_lse)
    assert err_out <= tolerance and err_lse <= tolerance, (
        f"N={world_size} {problem}: rel err out {err_out:.3g}, lse {err_lse:.3g} > {tolerance:g}"
    )
    seq_local = problem.seq_len // world_size
    for rank, result in enumerate(results):
        rank_out, rank_lse = from_bytes(result["out"]), from_bytes(result["lse"])
        assert rank_out.dtype == problem.torch_dtype, f"rank {rank}: out is {rank_out.dtype}"
        assert rank_out.shape == (problem.batch, seq_local, problem.q_heads, problem.head_dim), (
            f"rank {rank}: out has shape {tuple(rank_out.shape)}"
        )
        assert rank_lse.shape == (problem.batch, problem.q_heads, seq_local), f"rank {rank}: lse {tuple(rank_lse.shape)}"
        assert rank_lse.dtype == accumulation_dtype(problem.torch_dtype), f"rank {rank}: lse is {rank_lse.dtype}"
    measured = sum_by_link(LinkTraffic(**m) for r in results for m in r["sent"])
    assert measured == problem.planned_link_bytes(world_size), "bytes sent differ from the forward plan"
    return results


def check_gradients(world: LocalWorld, problem: Problem, memory: str = "contiguous") -> list[dict]:
    """Run forward and backward on every rank; assert out, dq, dk, dv match float64 autograd and traffic its plans."""
    world_size = world.world_size
    results = world.run_ok("tokenring.tools.tasks.attention_with_grads", problem, memory)
    got = {name: _gathered(results, name, problem) for name in ("out", "dq", "dk", "dv")}
    want_out, _ = problem.reference()
    want = dict(zip(("dq", "dk", "dv"), problem.reference_grads()), out=want_out)
    tolerance = GRAD_TOLERANCE[problem.torch_dtype]
    errors = {name: relative_error(got[name], want[name]) for name in got}
    assert all(e <= tolerance for e in errors.values()), f"N={world_size} {problem}: {errors} > {tolerance:g}"
    for name, tensor in got.items():
        assert tensor.dtype == problem.torch_dtype, f"{name} came back as {tensor.dtype}"
    forward = sum_by_link(LinkTraffic(**m) for r in results for m in r["sent"])
    backward = sum_by_link(LinkTraffic(**m) for r in results for m in r["backward_sent"])
    backward_plan = problem.plan(world_size, backward=True)
    assert forward == problem.planned_link_bytes(world_size, needs_grad=True), "bytes sent differ from the forward plan"
    assert backward == backward_plan.link_bytes(problem.shape(world_size)), "bytes sent differ from the backward plan"
    return results


def assert_all_ranks_fail(results, *fragments: str, culprit: int | None = None, error_type: str = "InputError") -> None:
    """Every rank raised ``error_type`` naming itself; the culprit's message (or everyone's) holds ``fragments``.

    Ranks other than the culprit must say which rank rejected its input.
    """
    for r in results:
        assert not r.ok, f"rank {r.rank} did not raise"
        assert r.error_type.endswith(error_type), f"rank {r.rank}: {r.error_type}: {r.error}"
        assert f"on rank {r.rank}" in r.error, r.error
        if culprit is not None and r.rank != culprit:
            assert f"rank {culprit} rejected its input" in r.error, r.error
        for fragment in fragments:
            assert fragment in r.error, f"rank {r.rank}: {fragment!r} not in {r.error!r}"
