"""A NaN or an infinity in q, k or v never comes out finite, whatever the kernel does with it.

torch's CPU flash operator returns out 0 and lse 0 for all-NaN query rows in
short blocks on some CPUs (AVX-512), and 16 rows or more give NaN: so every
schedule runs here with blocks of 1 to 16 rows, on the CPU kernel as it is
and on a stand-in that turns every row it cannot compute into a finite 0.
The engine must carry the poison past the kernel (`tokenring.runtime.finite`).
"""

import pytest
import torch

from threaded_world import run_plan
from tokenring import registry
from tokenring.placement.layout import shard, unshard
from tokenring.schedules.build import build_plan
from tokenring.reference import reference_attention
from tokenring_cpu.kernel import CpuSdpaKernel

SCHEDULES = sorted(registry.schedule_names())
BLOCK_ROWS = [1, 2, 4, 8, 16]


class ZerosForNonFiniteRows(CpuSdpaKernel):
    """The worst a kernel may do: every row whose result is not finite comes out as out 0, lse 0."""

    def forward(self, q, k, v, *, scale, mask):
        out, lse = super().forward(q, k, v, scale=scale, mask=mask)
        bad_lse = torch.isnan(lse) | torch.isposinf(lse)  # lse -inf is a row that saw nothing: legitimate
        bad = ~torch.isfinite(out).all(-1) | bad_lse.transpose(1, 2)  # (B, S, H)
        out = out.masked_fill(bad.unsqueeze(-1), 0.0)
        lse = lse.masked_fill(bad.transpose(1, 2), 0.0)
        return out, lse


KERNELS = {"cpu": CpuSdpaKernel, "zeros-for-non-finite-rows": ZerosForNonFiniteRows}


def test_the_stand_in_does_what_the_failing_cpus_do():
    q = torch.full((1, 4, 2, 8), float("nan"), dtype=torch.float64)
    k, v = torch.randn(1, 4, 2, 8, dtype=torch.float64), torch.randn(1, 4, 2, 8, dtype=torch.float64)
    from tokenring.interfaces import Mask

    out, lse = ZerosForNonFiniteRows().forward(q, k, v, scale=0.3, mask=Mask.NONE)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(lse, torch.zeros_like(lse))


def _problem(world_size, s_local, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, world_size * s_local, 2, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, world_size * s_local, 1, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    return [tuple(shard(t, r, world_size, layout=layout) for t in (q, k, v)) for r in range(world_size)], (q, k, v)


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("rows", BLOCK_ROWS)
@pytest.mark.parametrize("layout, causal", [("contiguous", False), ("zigzag", True)])
@pytest.mark.parametrize("algorithm", SCHEDULES)
def test_non_finite_inputs_never_come_out_finite_on_any_schedule(algorithm, layout, causal, rows, kernel):
    """Rank 0's q spoils rank 0's output and no other; its k or v spoils every output row (each sees them)."""
    for world_size in (2, 3):
        plan = build_plan(algorithm, layout, causal, world_size)
        s_local = rows * plan.granularity
        block_rows = {min(span.rows(s_local)[1] for span in (b.q_span, b.kv_span))
                      for step in plan.steps for b in step.blocks}
        assert min(block_rows) == rows, block_rows  # the smallest blocks: `rows` queries or keys
        shards, (q, k, v) = _problem(world_size, s_local, layout, seed=rows)
        want, _ = reference_attention(q, k, v, causal=causal, softmax_scale=0.3)
        for name, index in (("q", 0), ("k", 1), ("v", 2)):
            for value in (float("nan"), float("inf"), float("-inf")):
                bad = [list(s) for s in shards]
                spoiled = bad[0][index].clone()
                spoiled[0, -1, 0, 3] = value  # one element, in the last row: not where a witness would look
                bad[0][index] = spoiled
                results, _ = run_plan(plan, [tuple(s) for s in bad], scale=0.3, kernel=KERNELS[kernel])
                case = (name, value, world_size)
                assert torch.isnan(results[0][0]).all() and torch.isnan(results[0][1]).all(), case
                for rank, (out, lse) in enumerate(results[1:], start=1):
                    if name == "q":
                        torch.testing.assert_close(out, shard(want, rank, world_size, layout=layout),
                                                   rtol=1e-9, atol=1e-9, msg=str(case))
                    else:
                        assert torch.isnan(out).all() and torch.isnan(lse).all(), (case, rank)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_a_rank_alone_is_spoiled_too(kernel):
    """N = 1: the one block's result is taken as it is, without a merge; the poison still reaches it."""
    for rows in BLOCK_ROWS:
        plan = build_plan("tokenring", "contiguous", False, 1)
        shards, _ = _problem(1, rows, "contiguous", seed=rows)
        for index in range(3):
            bad = list(shards[0])
            bad[index] = bad[index].clone()
            bad[index][0, 0, 0, 0] = float("nan")
            (out, lse), = run_plan(plan, [tuple(bad)], scale=0.3, kernel=KERNELS[kernel])[0]
            assert torch.isnan(out).all() and torch.isnan(lse).all(), (rows, index)
