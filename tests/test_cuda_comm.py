"""The CUDA backend's Comm, on the CPU: NcclComm with gloo standing in for NCCL.

`tokenring_cuda.comm.NcclComm` takes the per-channel transport as an
argument, so these tests run its real code (one process group per channel
created with local synchronisation, a gloo agreement group, batched
isend/irecv, peer translation, byte counting, timeouts) on a local world of
CPU processes. What only NCCL can show (stream ordering without host
waits, concurrency of the two communicators) is checked by ci/gpu
(tests/test_cuda_gpu.py).
"""

import pytest
import torch
import torch.distributed as dist

import tokenring
from tokenring.runtime.executor import Executor
from tokenring.interfaces import Channel, CommTimeout, Recv, Send
from tokenring.tools.launch import LocalWorld
from tokenring.plan.model import sum_by_link
from tokenring.testing.problems import GRAD_TOLERANCE, TOLERANCE, Problem, relative_error
from tokenring.testing.tasks import from_bytes, to_bytes

WORLD_SIZE = 3
TIMEOUT_S = 30.0


# -- tasks, run on every rank -------------------------------------------------------


def exchange_on_both_channels(rank, world_size):
    from tokenring_cuda.comm import NcclComm

    comm = NcclComm(None, transport="gloo", blocking_wait=True, timeout_s=TIMEOUT_S)
    query_group, partial_group = comm._channel_groups[Channel.QUERY], comm._channel_groups[Channel.PARTIAL]
    following, preceding = (rank + 1) % world_size, (rank - 1) % world_size
    # Two messages to the same peer on one channel and step arrive in batch order.
    queries = [torch.full((3,), 10.0 * rank + i) for i in range(2)]
    arrived_queries = [torch.empty(3) for _ in range(2)]
    partial = torch.arange(5, dtype=torch.float64) + rank
    arrived_partial = torch.empty(5, dtype=torch.float64)
    query_handle = comm.exchange(
        [Send(following, t) for t in queries], [Recv(preceding, t) for t in arrived_queries],
        channel=Channel.QUERY, step=1,
    )
    partial_handle = comm.exchange([Send(preceding, partial)], [Recv(following, arrived_partial)],
                                   channel=Channel.PARTIAL, step=1)
    partial_handle.wait(TIMEOUT_S)  # the later-posted channel completes without the other being waited on
    query_handle.wait(TIMEOUT_S)
    return {
        "queries": [t.tolist() for t in arrived_queries],
        "partial": arrived_partial.tolist(),
        "sent": [t.to_json() for t in comm.sent],
        "gathered": comm.all_gather_bytes(b"r" * rank, timeout_s=TIMEOUT_S),
        "distinct_groups": len({id(query_group), id(partial_group), id(comm._agreement_group), id(dist.group.WORLD)}),
        "channel_ranks": dist.get_process_group_ranks(partial_group),
    }


def executor_with_nccl_comm_and_sdpa_kernel(rank, world_size, problem):
    """One forward and backward through the real executor, over NcclComm(gloo) and the SDPA adapter."""
    from tokenring_cuda import specification as spec
    from tokenring_cuda.comm import NcclComm
    from tokenring_cuda.sdpa import SdpaEfficientKernel

    comm = NcclComm(None, transport="gloo", timeout_s=TIMEOUT_S)
    kernel = SdpaEfficientKernel(spec.efficient_attention_forward, spec.efficient_attention_backward)
    executor = Executor(comm, kernel)
    layout = problem.resolved_layout
    q, k, v = (tokenring.shard(t, rank, world_size, layout=layout) for t in problem.inputs())
    dout = tokenring.shard(problem.grad_output(), rank, world_size, layout=layout)
    scale = problem.head_dim ** -0.5
    plan = tokenring.build_plan(problem.algorithm, layout, problem.causal, world_size)
    out, lse = executor.forward(plan, q, k, v, scale=scale, timeout_s=TIMEOUT_S)
    forward_sent = [t.to_json() for t in comm.sent]
    comm.sent.clear()
    backward_plan = tokenring.build_plan(problem.algorithm, layout, problem.causal, world_size, backward=True)
    dq, dk, dv = executor.backward(backward_plan, q, k, v, out, lse, dout, scale=scale, timeout_s=TIMEOUT_S)
    return {
        "out": to_bytes(out), "lse": to_bytes(lse), "dq": to_bytes(dq), "dk": to_bytes(dk), "dv": to_bytes(dv),
        "sent": forward_sent, "backward_sent": [t.to_json() for t in comm.sent],
    }


def exchange_in_a_subgroup(rank, world_size):
    """Ranks 1 and 2 form a group (rank 0 takes no part in creating anything) and swap one tensor."""
    from tokenring_cuda.comm import NcclComm

    if rank == 0:
        return "outside"
    group = dist.new_group([1, 2], use_local_synchronization=True)
    comm = NcclComm(group, transport="gloo", blocking_wait=True, timeout_s=TIMEOUT_S)
    peer = 1 - comm.rank
    arrived = torch.empty(4)
    comm.exchange([Send(peer, torch.full((4,), float(rank)))], [Recv(peer, arrived)],
                  channel=Channel.QUERY, step=0).wait(TIMEOUT_S)
    return {"group_rank": comm.rank, "world_size": comm.world_size, "arrived": arrived.tolist(),
            "sent": [t.to_json() for t in comm.sent],
            "gathered": comm.all_gather_bytes(bytes([rank]), timeout_s=TIMEOUT_S)}


def create_unless_absent(rank, world_size, absent_rank, timeout_s):
    from tokenring_cuda.comm import NcclComm

    if rank == absent_rank:
        return "absent"
    try:
        NcclComm(None, transport="gloo", timeout_s=timeout_s)
    except CommTimeout as error:
        return f"CommTimeout: {error}"
    return "created"


# -- tests ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world():
    with LocalWorld(WORLD_SIZE, threads_per_rank=1, env={"TOKENRING_TIMEOUT_S": str(TIMEOUT_S)}) as w:
        yield w


def test_channels_are_separate_groups_and_deliver_in_batch_order(world):
    results = world.run_ok(f"{__name__}.exchange_on_both_channels", timeout_s=120)
    for rank, result in enumerate(results):
        preceding, following = (rank - 1) % WORLD_SIZE, (rank + 1) % WORLD_SIZE
        assert result["queries"] == [[10.0 * preceding + i] * 3 for i in range(2)]
        assert result["partial"] == [float(following + i) for i in range(5)]
        assert result["gathered"] == [b"", b"r", b"rr"]
        assert result["distinct_groups"] == 4
        assert result["channel_ranks"] == list(range(WORLD_SIZE))
        # bytes counted per message, as handed to the transport
        assert result["sent"] == [
            {"step": 1, "src": rank, "dst": following, "bytes": 12},
            {"step": 1, "src": rank, "dst": following, "bytes": 12},
            {"step": 1, "src": rank, "dst": preceding, "bytes": 40},
        ]


@pytest.mark.parametrize("algorithm", ["tokenring", "ring"])
def test_the_executor_over_this_comm_and_kernel_is_exact_and_moves_the_planned_bytes(world, algorithm):
    problem = Problem(seed=7, batch=1, seq_len=48, q_heads=4, kv_heads=2, head_dim=16, causal=True,
                      algorithm=algorithm)
    results = world.run_ok(f"{__name__}.executor_with_nccl_comm_and_sdpa_kernel", problem, timeout_s=120)
    layout = problem.resolved_layout
    want_out, want_lse = problem.reference()
    got = {name: tokenring.unshard([from_bytes(r[name]) for r in results], layout=layout, dim=1 if name != "lse" else 2)
           for name in ("out", "lse", "dq", "dk", "dv")}
    assert relative_error(got["out"], want_out) < TOLERANCE[torch.float32]
    assert relative_error(got["lse"], want_lse) < TOLERANCE[torch.float32]
    for name, want in zip(("dq", "dk", "dv"), problem.reference_grads()):
        assert relative_error(got[name], want) < GRAD_TOLERANCE[torch.float32], name
    for key, backward in (("sent", False), ("backward_sent", True)):
        measured = sum_by_link(tokenring.LinkTraffic(**m) for r in results for m in r[key])
        plan = tokenring.build_plan(algorithm, layout, True, WORLD_SIZE, backward=backward)
        assert measured == plan.link_bytes(problem.shape(WORLD_SIZE)), key


@pytest.mark.parametrize("algorithm", ["tokenring", "ring"])
def test_steady_state_calls_over_this_comm_read_nothing_on_the_host_and_run_no_collective(world, algorithm):
    """The Comm's own path (batching, waits) adds no aten._local_scalar_dense and no collective."""
    problem = Problem(seed=7, batch=1, seq_len=48, q_heads=4, kv_heads=2, head_dim=16, causal=True,
                      algorithm=algorithm)
    for rank, ops in enumerate(world.run_ok(f"{__name__}.steady_state_ops_over_this_comm", problem, timeout_s=120)):
        assert set(ops) <= {"c10d.send.default", "c10d.recv_.default"}, (rank, ops)


def test_a_subgroup_needs_only_its_members_and_peers_are_group_ranks(world):
    outside, first, second = world.run_ok(f"{__name__}.exchange_in_a_subgroup", timeout_s=120)
    assert outside == "outside"
    assert (first["group_rank"], second["group_rank"]) == (0, 1) and first["world_size"] == 2
    assert first["arrived"] == [2.0] * 4 and second["arrived"] == [1.0] * 4
    assert first["sent"] == [{"step": 0, "src": 0, "dst": 1, "bytes": 16}]
    assert first["gathered"] == second["gathered"] == [b"\x01", b"\x02"]


def test_a_rank_that_never_creates_its_comm_gives_a_timeout_not_a_hang(world):
    # Last in this module: the ranks' group bookkeeping diverges, so the world is closed after.
    results = world.run(f"{__name__}.create_unless_absent", 1, 2.0, timeout_s=60)
    world.close()
    assert results[1].value == "absent"
    for rank in (0, 2):
        assert results[rank].ok and results[rank].value.startswith("CommTimeout"), results[rank]
        assert f"rank {rank}" in results[rank].value


def steady_state_ops_over_this_comm(rank, world_size, problem):
    from tokenring_cpu.kernel import CpuSdpaKernel
    from tokenring_cuda.comm import NcclComm
    from tokenring.testing.tasks import executor_steady_state_ops

    comm = NcclComm(None, transport="gloo", timeout_s=TIMEOUT_S)
    return executor_steady_state_ops(comm, CpuSdpaKernel(), rank, world_size, problem)
