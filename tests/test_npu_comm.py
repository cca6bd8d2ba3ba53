"""The NPU Comm's transport rules: one message per peer and batch, tensors dense at storage offset 0.

The coalescing is tested in this process; the whole Comm (BatchedP2PComm, the
class HcclComm is made of) runs over gloo between two local ranks. HCCL
itself is not exercised here: that is for ci/npu on Ascend hardware.
"""

import pytest
import torch
import torch.distributed as dist

from tokenring.interfaces import Channel, Recv, Send
from tokenring_npu.comm import BatchedP2PComm, coalesce_recvs, coalesce_sends, scatter_received


def mixed_payloads(seed: int) -> list[torch.Tensor]:
    """Tensors of several dtypes, two of them views that do not start at storage offset 0."""
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(4, 6, generator=gen)[:, 3:],                            # strided, offset 3
        torch.randint(0, 1000, (5,), generator=gen, dtype=torch.int64),      # dense, offset 0
        torch.randn(4, generator=gen).to(torch.bfloat16)[1:],               # dense, offset 1 (2-byte dtype)
    ]


def receive_targets() -> list[torch.Tensor]:
    return [torch.empty(3, 4).t(), torch.empty(5, dtype=torch.int64), torch.empty(4, dtype=torch.bfloat16)[1:]]


def deliver(messages_out, messages_in):
    """What the wire does: the bytes of each sent buffer land in the peer's receive buffer."""
    for sent, received in zip(messages_out, messages_in):
        received.buffer.view(-1).view(torch.uint8).copy_(sent.buffer.reshape(-1).view(torch.uint8))


def test_several_sends_to_one_peer_become_one_dense_message_in_batch_order():
    payloads = mixed_payloads(1)
    extra = torch.randn(3)
    messages = coalesce_sends([Send(1, payloads[0]), Send(2, extra), Send(1, payloads[1]), Send(1, payloads[2])])
    assert [m.peer for m in messages] == [1, 2]
    merged = messages[0].buffer
    assert merged.is_contiguous() and merged.storage_offset() == 0 and merged.dtype == torch.uint8
    expected = torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in payloads])
    assert torch.equal(merged, expected)
    # a lone dense tensor at offset 0 goes as it is, uncopied, as bytes like every message
    assert messages[1].buffer.data_ptr() == extra.data_ptr() and messages[1].buffer.dtype == torch.uint8


def test_a_lone_view_is_copied_to_storage_offset_zero():
    view = torch.arange(10.0)[4:]
    (message,) = coalesce_sends([Send(3, view)])
    assert message.buffer.storage_offset() == 0 and message.buffer.is_contiguous()
    assert torch.equal(message.buffer, view.contiguous().view(torch.uint8)) and message.buffer.data_ptr() != view.data_ptr()


def test_received_message_is_split_into_the_callers_tensors_even_strided_or_offset():
    payloads = mixed_payloads(2)
    targets = receive_targets()
    outgoing = coalesce_sends([Send(0, t) for t in payloads])
    incoming = coalesce_recvs([Recv(1, t) for t in targets])
    assert len(outgoing) == len(incoming) == 1
    assert incoming[0].buffer.storage_offset() == 0 and incoming[0].buffer.numel() == outgoing[0].buffer.numel()
    deliver(outgoing, incoming)
    scatter_received(incoming[0])
    for got, want in zip(targets, payloads):
        assert torch.equal(got, want)


def test_a_lone_dense_receive_lands_in_place():
    target = torch.empty(6)
    (message,) = coalesce_recvs([Recv(0, target)])
    assert message.in_place and message.buffer.data_ptr() == target.data_ptr()


def test_both_ends_of_every_message_post_the_same_count_and_type():
    # HCCL, like NCCL, matches a send and its receive by element count and datatype:
    # a dense fp16 send must meet a staged (strided) receive as the same bytes.
    send = torch.randn(4, 6, dtype=torch.float16)
    strided_target = torch.empty(6, 4, dtype=torch.float16).t()
    for target in (strided_target, torch.empty(4, 6, dtype=torch.float16)):
        (out,) = coalesce_sends([Send(1, send)])
        (inc,) = coalesce_recvs([Recv(0, target)])
        assert (out.buffer.dtype, out.buffer.numel()) == (inc.buffer.dtype, inc.buffer.numel()) == (torch.uint8, 48)
        deliver([out], [inc])
        scatter_received(inc)
        assert torch.equal(target, send)


# -- the whole Comm between two gloo ranks -----------------------------------------


def exchange_task(rank, world_size, seed):
    """On each rank: 3 mixed tensors to the next rank on QUERY and 1 on PARTIAL, both in flight at once."""
    posted = []

    def recording_batch(ops):
        posted.append([(op.op.__name__, op.group_peer, op.tensor.storage_offset(), op.tensor.is_contiguous()) for op in ops])
        return dist.batch_isend_irecv(ops)

    comm = BatchedP2PComm(expected_backend="gloo", device=torch.device("cpu"), batch_isend_irecv=recording_batch)
    after, before = (rank + 1) % world_size, (rank - 1) % world_size
    targets = receive_targets()
    partial_target = torch.empty(7, dtype=torch.float64)
    query = comm.exchange(
        [Send(after, t) for t in mixed_payloads(seed + rank)], [Recv(before, t) for t in targets],
        channel=Channel.QUERY, step=3,
    )
    partial = comm.exchange(
        [Send(after, torch.arange(7, dtype=torch.float64) + rank)], [Recv(before, partial_target)],
        channel=Channel.PARTIAL, step=3,
    )
    partial.wait(20)
    query.wait(20)
    received_right = all(torch.equal(got, want) for got, want in zip(targets, mixed_payloads(seed + before)))
    agreed = comm.all_gather_bytes(f"rank {rank} says hi".encode(), timeout_s=20)
    return {
        "received_right": received_right,
        "partial_right": torch.equal(partial_target, torch.arange(7, dtype=torch.float64) + before),
        "posted": posted,
        "sent": [t.to_json() for t in comm.sent],
        "agreed": [a.decode() for a in agreed],
    }


def test_the_comm_over_two_ranks_sends_one_message_per_peer_and_counts_every_byte(worlds, seed):
    results = worlds.get(2).run_ok("test_npu_comm.exchange_task", seed, timeout_s=60)
    payload_bytes = sum(t.numel() * t.element_size() for t in mixed_payloads(0))
    for rank, result in enumerate(results):
        assert result["received_right"] and result["partial_right"], f"rank {rank}: {result}"
        query_batch, partial_batch = result["posted"]
        for batch in (query_batch, partial_batch):
            sends = [op for op in batch if op[0] == "isend"]
            assert len(sends) == 1, f"rank {rank}: several sends to one peer in one batch: {batch}"
            assert all(offset == 0 and dense for _, _, offset, dense in batch), f"rank {rank}: {batch}"
        other = 1 - rank
        assert result["sent"] == [
            {"step": 3, "src": rank, "dst": other, "bytes": payload_bytes},
            {"step": 3, "src": rank, "dst": other, "bytes": 7 * 8},
        ]
        assert result["agreed"] == ["rank 0 says hi", "rank 1 says hi"]


def steady_state_ops_over_this_comm(rank, world_size, problem):
    from tokenring_cpu.kernel import CpuSdpaKernel
    from tokenring.testing.tasks import executor_steady_state_ops

    comm = BatchedP2PComm(expected_backend="gloo", device=torch.device("cpu"))
    return executor_steady_state_ops(comm, CpuSdpaKernel(), rank, world_size, problem)


@pytest.mark.parametrize("algorithm", ["tokenring", "ring"])
def test_steady_state_calls_over_this_comm_read_nothing_on_the_host_and_run_no_collective(worlds, algorithm):
    """The Comm's own path (coalescing, staging, waits) adds no aten._local_scalar_dense and no collective."""
    from tokenring.testing.problems import Problem

    problem = Problem(seed=7, batch=1, seq_len=24, q_heads=4, kv_heads=2, head_dim=16, causal=True,
                      algorithm=algorithm)
    for rank, ops in enumerate(worlds.get(3).run_ok("test_npu_comm.steady_state_ops_over_this_comm", problem,
                                                    timeout_s=120)):
        assert set(ops) <= {"c10d.send.default", "c10d.recv_.default"}, (rank, ops)
