"""group= as a DeviceMesh: tokenring.runtime.groups.resolve_group, and data parallel x context parallel training under torchrun."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import tokenring
from tokenring import sequence
from tokenring.runtime.groups import CONTEXT_PARALLEL_DIM_NAMES, resolve_group

ROOT = Path(__file__).resolve().parents[1]


def test_anything_but_a_mesh_passes_through_unchanged():
    marker = object()
    assert resolve_group(None) is None
    assert resolve_group(marker) is marker
    assert CONTEXT_PARALLEL_DIM_NAMES == ("cp", "context_parallel")


# -- tasks run on every rank of a local world (tokenring.tools.launch.LocalWorld) --

def _refusal(mesh) -> str | None:
    """The InputError message resolve_group and token_ring_attn give for ``mesh``, or None if they accept it."""
    messages = []
    for call in (lambda: resolve_group(mesh),
                 lambda: tokenring.token_ring_attn(*(torch.zeros(1, 4, 2, 8) for _ in range(3)), group=mesh)):
        try:
            call()
        except tokenring.InputError as error:
            messages.append(str(error))
    if not messages:
        return None
    assert len(messages) == 2 and messages[0] == messages[1], messages
    return messages[0]


def two_dimensional_mesh_task(rank: int, world_size: int, seed: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    dp_rank, cp_rank = mesh.get_coordinate()
    group = resolve_group(mesh)
    spelled_out = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "context_parallel"))

    # Exact attention over the cp group, each dp replica on a problem of its own.
    generator = torch.Generator().manual_seed(seed + dp_rank)
    q, k, v = (torch.randn(2, 16, 4, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    mine = [tokenring.shard(t, cp_rank, 2, layout="zigzag") for t in (q, k, v)]
    out = tokenring.token_ring_attn(*mine, causal=True, group=mesh)
    full = sequence.gather_sequence(out, group=mesh, layout="zigzag")
    want, _ = tokenring.reference_attention(q, k, v, causal=True)

    return {
        "coordinate": (dp_rank, cp_rank),
        "cp_ranks": dist.get_process_group_ranks(group),
        "is_the_mesh_cp_group": group is mesh.get_group("cp"),
        "cached": resolve_group(mesh) is group,
        "spelled_out_ranks": dist.get_process_group_ranks(resolve_group(spelled_out)),
        "sub_mesh_dp_ranks": dist.get_process_group_ranks(resolve_group(mesh["dp"])),
        "rank_and_world_size": sequence.rank_and_world_size(mesh),
        "attention_error": (full - want).abs().max().item(),
        "no_cp": _refusal(init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))),
        "both_names": _refusal(init_device_mesh("cpu", (2, 2), mesh_dim_names=("cp", "context_parallel"))),
        "no_names": _refusal(init_device_mesh("cpu", (2, 2))),
    }


def one_dimensional_mesh_task(rank: int, world_size: int, seed: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    named = init_device_mesh("cpu", (world_size,), mesh_dim_names=("anything",))
    unnamed = init_device_mesh("cpu", (world_size,))
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 8 * world_size, 4, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    mine = [tokenring.shard(t, rank, world_size, layout="contiguous") for t in (q, k, v)]
    with_mesh = tokenring.nn.token_ring_attention(*mine, causal=False, group=named)
    with_world = tokenring.nn.token_ring_attention(*mine, causal=False, group=None)
    return {
        "named_ranks": dist.get_process_group_ranks(resolve_group(named)),
        "unnamed_ranks": dist.get_process_group_ranks(resolve_group(unnamed)),
        "same_as_world": torch.equal(with_mesh, with_world),
    }


# -- the tests --

@pytest.fixture(scope="module")
def two_dimensional(worlds):
    """(seed, per-rank results) of two_dimensional_mesh_task on 4 ranks, run once for the tests below."""
    seed = random.randrange(2**31)
    return seed, worlds.get(4).run_ok("test_mesh.two_dimensional_mesh_task", seed, timeout_s=120)


def test_a_two_dimensional_mesh_resolves_to_its_cp_dimension(two_dimensional):
    seed, results = two_dimensional
    for rank, result in enumerate(results):
        dp_rank, cp_rank = result["coordinate"]
        assert (dp_rank, cp_rank) == divmod(rank, 2)
        assert result["cp_ranks"] == [2 * dp_rank, 2 * dp_rank + 1], f"rank {rank}: {result}"
        assert result["is_the_mesh_cp_group"] and result["cached"], f"rank {rank}: {result}"
        assert result["spelled_out_ranks"] == result["cp_ranks"], f"rank {rank}: {result}"
        assert result["sub_mesh_dp_ranks"] == [cp_rank, 2 + cp_rank], f"rank {rank}: {result}"
        assert result["rank_and_world_size"] == (cp_rank, 2)
        assert result["attention_error"] < 1e-12, f"seed {seed}, rank {rank}: {result['attention_error']}"


def test_a_mesh_without_one_cp_dimension_is_refused_naming_group_and_the_dimensions(two_dimensional):
    _, results = two_dimensional
    for result in results:
        no_cp, both, unnamed = result["no_cp"], result["both_names"], result["no_names"]
        assert no_cp is not None and both is not None and unnamed is not None, result
        assert "argument 'group'" in no_cp and "'dp', 'tp'" in no_cp and "no context-parallel dimension" in no_cp
        assert "'cp' or 'context_parallel'" in no_cp, no_cp
        assert "argument 'group'" in both and "ambiguous" in both and "'cp', 'context_parallel'" in both, both
        assert "argument 'group'" in unnamed and "dimension names: none" in unnamed, unnamed


def test_a_one_dimensional_mesh_is_its_only_group_whatever_its_name(worlds, seed):
    results = worlds.get(4).run_ok("test_mesh.one_dimensional_mesh_task", seed, timeout_s=120)
    for result in results:
        assert result["named_ranks"] == [0, 1, 2, 3] and result["unnamed_ranks"] == [0, 1, 2, 3], result
        assert result["same_as_world"], result


def test_data_parallel_by_context_parallel_training_under_torchrun_matches_one_process():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # This checkout's tokenring, whatever an editable install elsewhere points at.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--standalone",
         str(ROOT / "examples" / "train_mesh.py"), "--steps", "2"],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("parity holds") and "dp x cp = 2 x 2" in last, last
