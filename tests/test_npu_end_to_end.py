"""token_ring_attn end to end on the NPU backend's code paths, on the CPU: the executor, the NPU
kernel adapter over the SPECIFICATION of torch_npu's operators, and the NPU Comm's batching
code (BatchedP2PComm) over gloo instead of HCCL. NOT hardware: ci/npu runs the real thing.
Only N = 2 here (one shared world, cheap on a loaded machine); the core tests odd sizes."""

import pytest

from npu_spec.backend import NpuSpecificationBackend, WorldWithSpecificationBackend
from tokenring.testing.checks import check_attention, check_gradients
from tokenring.testing.problems import Problem


@pytest.mark.parametrize("world_size,algorithm", [(2, "tokenring"), (2, "ring")])
def test_forward_and_backward_match_float64_and_traffic_equals_the_plan(worlds, seed, world_size, algorithm):
    world = WorldWithSpecificationBackend(worlds.get(world_size))
    problem = Problem(seed=seed, seq_len=48, q_heads=4, kv_heads=2, head_dim=32, causal=True,
                      algorithm=algorithm, backend=NpuSpecificationBackend.name)
    check_attention(world, problem)
    check_gradients(world, problem.with_(dtype="bfloat16"))
