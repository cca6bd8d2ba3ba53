"""The conformance suite every TokenRing backend runs: ours and third parties', the same way.

Run it with ``tokenring conformance --backend NAME``, or import the test
classes into a test module of your own (with ``tokenring.testing.plugin``
loaded, see there)::

    from tokenring.testing.suite import *  # noqa: F401,F403

Whatever a backend does not declare in its `Capabilities` (a dtype, causal
masks, GQA, backward, world sizes) is skipped with a reason that names the
backend and the capability. Test names are API: renaming one is noted in
CHANGELOG.md, because backends select and deselect tests by name.

Four parts:

* `TestKernelContract`: one block at a time, in this process, against float64
  (docs/design.md, "Backend contracts": layout, lse, bottom-right causal mask, rows that see no key,
  GQA, block backward with final statistics).
* `TestCommContract`: point-to-point between local ranks: every peer
  distance, two channels at once, ordering, byte accounting, an absent peer.
* `TestEndToEnd`: `token_ring_attn` forward and backward, both algorithms,
  every world size the backend supports, exact against float64 and with
  traffic equal to the plan.
* `TestBadInput`: bad arguments fail on every rank, promptly, naming the
  argument and the rank.
"""

from __future__ import annotations

import time

import pytest
import torch

from tokenring.interfaces import AttentionKernel, Backend, LinkTraffic, Mask, accumulation_dtype
from tokenring.plan.model import sum_by_link
from tokenring.schedules.build import schedule_names
from tokenring.reference import reference_attention
from tokenring.testing.checks import assert_all_ranks_fail, check_attention, check_gradients
from tokenring.tools.problems import fitting_seq_local
from tokenring.testing.problems import DTYPES, GRAD_TOLERANCE, TOLERANCE, Problem, relative_error

__all__ = ["TestKernelContract", "TestCommContract", "TestEndToEnd", "TestBadInput"]

HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
# (query rows, key rows) of a block; "q-longer" under a causal mask has rows that see no key.
# The "tiles-" blocks are longer than a fused kernel's tiles (64/128 rows) and
# not a multiple of them, where a kernel wrong only at tile edges shows.
BLOCKS = {
    "square": (16, 16), "q-shorter": (8, 16), "q-longer": (16, 8),
    "tiles-square": (257, 257), "tiles-q-shorter": (200, 257), "tiles-q-longer": (257, 200),
}
# Head dims tried when a backend declares any (Capabilities.head_dims is None).
ANY_HEAD_DIMS = (16, 24, 64, 80, 128, 256)


# -- declared capabilities -> skips ------------------------------------------------


def require_dtype(backend: Backend, dtype: torch.dtype) -> None:
    if dtype not in backend.capabilities.dtypes:
        pytest.skip(f"backend {backend.name!r} does not declare dtype {str(dtype).removeprefix('torch.')}")


def require(backend: Backend, capability: str) -> None:
    """Skip unless ``capabilities.<capability>`` is true (causal, gqa, backward)."""
    if not getattr(backend.capabilities, capability):
        pytest.skip(f"backend {backend.name!r} does not declare {capability}")


def require_heads(backend: Backend, heads: str) -> tuple[int, int]:
    if heads != "mha":
        require(backend, "gqa")
    return HEADS[heads]


def usual_head_dim(backend: Backend) -> int:
    dims = backend.capabilities.head_dims
    return 64 if dims is None or 64 in dims else min(dims)


def usual_dtype(backend: Backend) -> torch.dtype:
    dtypes = backend.capabilities.dtypes
    if torch.float32 in dtypes:
        return torch.float32
    return max(dtypes, key=lambda d: (d.itemsize, str(d)))


def usual_heads(backend: Backend) -> tuple[int, int]:
    return HEADS["gqa"] if backend.capabilities.gqa else HEADS["mha"]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


DTYPE_PARAMS = pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))


# -- kernel contract -----------------------------------------------------------------


def _randn(shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


class TestKernelContract:
    """`AttentionKernel` against float64 plain attention, one block in this process."""

    # Class-scoped fixtures are classmethods: pytest deprecates (and pytest 10
    # refuses) them as instance methods, whose `self` is no test's instance.
    @pytest.fixture(scope="class")
    @classmethod
    def kernel(cls, tokenring_backend) -> AttentionKernel:
        return tokenring_backend.create_kernel()

    @pytest.fixture(scope="class")
    @classmethod
    def device(cls, tokenring_backend) -> torch.device:
        return tokenring_backend.device(0)

    def _forward(self, backend, kernel, device, dtype, *, q_len, k_len, heads, head_dim, mask, scale, spread=1.0):
        q_heads, kv_heads = heads
        q = _randn((2, q_len, q_heads, head_dim), dtype, device, spread)
        k = _randn((2, k_len, kv_heads, head_dim), dtype, device, spread)
        v = _randn((2, k_len, kv_heads, head_dim), dtype, device)
        out, lse = kernel.forward(q, k, v, scale=scale, mask=mask)
        want_out, want_lse = reference_attention(q.cpu(), k.cpu(), v.cpu(), causal=mask is Mask.CAUSAL, softmax_scale=scale)
        where = f"backend {backend.name!r}, {dtype_name(dtype)}, {q_len}x{k_len} block, heads {heads}, D={head_dim}, {mask.value}"
        assert out.shape == q.shape[:3] + (head_dim,) and out.dtype == dtype, f"{where}: out {tuple(out.shape)} {out.dtype}"
        assert lse.shape == (2, q_heads, q_len), f"{where}: lse shape {tuple(lse.shape)}, want (B, Hq, Sq)"
        assert lse.dtype == accumulation_dtype(dtype), f"{where}: lse is {lse.dtype}, want {accumulation_dtype(dtype)}"
        assert not torch.isnan(out).any() and not torch.isnan(lse).any(), f"{where}: NaN in the result"
        tolerance = TOLERANCE[dtype]
        err_out, err_lse = relative_error(out.cpu(), want_out), relative_error(lse.cpu(), want_lse)
        assert err_out <= tolerance and err_lse <= tolerance, (
            f"{where}: rel err out {err_out:.3g}, lse {err_lse:.3g} > {tolerance:g}"
        )
        return out, lse

    @DTYPE_PARAMS
    @pytest.mark.parametrize("mask", [Mask.NONE, Mask.CAUSAL], ids=["full", "causal"])
    @pytest.mark.parametrize("heads", list(HEADS))
    @pytest.mark.parametrize("block", list(BLOCKS))
    def test_block_forward_matches_float64(self, tokenring_backend, kernel, device, dtype, mask, heads, block):
        require_dtype(tokenring_backend, dtype)
        if mask is Mask.CAUSAL:
            require(tokenring_backend, "causal")
        q_len, k_len = BLOCKS[block]
        self._forward(
            tokenring_backend, kernel, device, dtype, q_len=q_len, k_len=k_len, heads=require_heads(tokenring_backend, heads),
            head_dim=usual_head_dim(tokenring_backend), mask=mask, scale=0.3,
        )

    @DTYPE_PARAMS
    def test_causal_mask_is_bottom_right_aligned_and_blind_rows_are_zero_with_minus_inf_lse(
        self, tokenring_backend, kernel, device, dtype
    ):
        require_dtype(tokenring_backend, dtype)
        require(tokenring_backend, "causal")
        # 12 query rows against 5 keys: rows 0..6 see no key; the last row sees all five.
        out, lse = self._forward(
            tokenring_backend, kernel, device, dtype, q_len=12, k_len=5, heads=HEADS["mha"],
            head_dim=usual_head_dim(tokenring_backend), mask=Mask.CAUSAL, scale=0.5,
        )
        assert torch.all(out[:, :7] == 0), "rows that see no key must have out exactly 0"
        assert torch.all(torch.isneginf(lse[:, :, :7])), "rows that see no key must have lse -inf"
        assert torch.isfinite(lse[:, :, 7:]).all()

    @DTYPE_PARAMS
    def test_extreme_logits_stay_finite_and_exact(self, tokenring_backend, kernel, device, dtype):
        require_dtype(tokenring_backend, dtype)
        mask = Mask.CAUSAL if tokenring_backend.capabilities.causal else Mask.NONE
        _, lse = self._forward(
            tokenring_backend, kernel, device, dtype, q_len=16, k_len=16, heads=HEADS["mha"],
            head_dim=usual_head_dim(tokenring_backend), mask=mask, scale=1.0, spread=6.0,
        )
        assert torch.isfinite(lse).all()
        assert lse.abs().max() > 100, "the logits of this test must really be extreme"

    @DTYPE_PARAMS
    def test_every_declared_head_dim(self, tokenring_backend, kernel, device, dtype):
        require_dtype(tokenring_backend, dtype)
        dims = tokenring_backend.capabilities.head_dims or ANY_HEAD_DIMS
        masks = [Mask.NONE, Mask.CAUSAL] if tokenring_backend.capabilities.causal else [Mask.NONE]
        for head_dim in dims:
            for mask in masks:
                self._forward(
                    tokenring_backend, kernel, device, dtype, q_len=8, k_len=8, heads=usual_heads(tokenring_backend),
                    head_dim=head_dim, mask=mask, scale=head_dim**-0.5,
                )

    def test_views_of_a_shard_are_accepted(self, tokenring_backend, kernel, device):
        # The executor hands the kernel halves of a shard (zigzag) and users hand it heads-major views.
        dtype = usual_dtype(tokenring_backend)
        head_dim = usual_head_dim(tokenring_backend)
        q_heads, kv_heads = usual_heads(tokenring_backend)
        q = _randn((3, 16, q_heads, head_dim), dtype, device)[:, 8:]
        k = _randn((3, kv_heads, 8, head_dim), dtype, device).transpose(1, 2)
        v = _randn((3, kv_heads, 8, head_dim), dtype, device).transpose(1, 2)
        assert not q.is_contiguous() and not k.is_contiguous()
        out, lse = kernel.forward(q, k, v, scale=0.2, mask=Mask.NONE)
        want_out, want_lse = reference_attention(q.cpu(), k.cpu(), v.cpu(), softmax_scale=0.2)
        tolerance = TOLERANCE[dtype]
        assert relative_error(out.cpu(), want_out) <= tolerance and relative_error(lse.cpu(), want_lse) <= tolerance

    # -- block backward --

    def _backward_against_float64(self, backend, kernel, device, dtype, *, q_len, key_blocks, heads, mask, scale):
        """Gradients of attention over several key blocks, summed from per-block backward calls.

        Each call gets the *final* out and lse over all blocks, as the
        executor passes them; dq sums over the blocks, dk and dv concatenate.
        """
        q_heads, kv_heads = heads
        head_dim = usual_head_dim(backend)
        k_len = sum(key_blocks)
        q = _randn((2, q_len, q_heads, head_dim), dtype, device)
        k = _randn((2, k_len, kv_heads, head_dim), dtype, device)
        v = _randn((2, k_len, kv_heads, head_dim), dtype, device)
        dout = _randn((2, q_len, q_heads, head_dim), dtype, device)
        leaves = [t.cpu().to(torch.float64).requires_grad_() for t in (q, k, v)]
        want_out, want_lse = reference_attention(*leaves, causal=mask is Mask.CAUSAL, softmax_scale=scale)
        want = torch.autograd.grad(want_out, leaves, dout.cpu().to(torch.float64))
        out = want_out.detach().to(dtype=dtype, device=device)
        lse = want_lse.detach().to(dtype=accumulation_dtype(dtype), device=device)
        dq = torch.zeros(q.shape, dtype=accumulation_dtype(dtype))
        dks, dvs = [], []
        start = 0
        for length in key_blocks:
            block_mask = mask if start + length == k_len else Mask.NONE  # causal blocks end at the diagonal
            grads = kernel.backward(
                dout, q, k[:, start : start + length], v[:, start : start + length], out, lse, scale=scale, mask=block_mask
            )
            for grad, like in zip(grads, (q, k, v)):
                assert grad.dtype == like.dtype, f"backend {backend.name!r}: gradient dtype {grad.dtype}, want {like.dtype}"
            assert grads[1].shape == (2, length, kv_heads, head_dim), "dk must be summed over each group of query heads"
            dq += grads[0].cpu()
            dks.append(grads[1].cpu())
            dvs.append(grads[2].cpu())
            start += length
        got = (dq, torch.cat(dks, 1), torch.cat(dvs, 1))
        where = f"backend {backend.name!r}, {dtype_name(dtype)}, heads {heads}, {mask.value}, key blocks {key_blocks}"
        tolerance = GRAD_TOLERANCE[dtype]
        for name, g, w in zip(("dq", "dk", "dv"), got, want):
            assert not torch.isnan(g).any(), f"{where}: NaN in {name}"
            err = relative_error(g, w)
            assert err <= tolerance, f"{where}: rel err {name} {err:.3g} > {tolerance:g}"
        return got

    @DTYPE_PARAMS
    @pytest.mark.parametrize("mask", [Mask.NONE, Mask.CAUSAL], ids=["full", "causal"])
    @pytest.mark.parametrize("heads", list(HEADS))
    def test_block_backward_matches_float64(self, tokenring_backend, kernel, device, dtype, mask, heads):
        require(tokenring_backend, "backward")
        require_dtype(tokenring_backend, dtype)
        if mask is Mask.CAUSAL:
            require(tokenring_backend, "causal")
        self._backward_against_float64(
            tokenring_backend, kernel, device, dtype, q_len=16, key_blocks=[16],
            heads=require_heads(tokenring_backend, heads), mask=mask, scale=0.3,
        )

    @DTYPE_PARAMS
    def test_block_backward_uses_the_final_statistics_of_all_blocks(self, tokenring_backend, kernel, device, dtype):
        require(tokenring_backend, "backward")
        require_dtype(tokenring_backend, dtype)
        mask = Mask.CAUSAL if tokenring_backend.capabilities.causal else Mask.NONE
        # Two earlier full blocks, then the last (the diagonal one when causal),
        # as a rank meets a query's keys over three steps.
        self._backward_against_float64(
            tokenring_backend, kernel, device, dtype, q_len=8, key_blocks=[8, 8, 8],
            heads=usual_heads(tokenring_backend), mask=mask, scale=0.4,
        )

    @DTYPE_PARAMS
    def test_block_backward_gives_zero_gradients_to_rows_that_saw_no_key(self, tokenring_backend, kernel, device, dtype):
        require(tokenring_backend, "backward")
        require(tokenring_backend, "causal")
        require_dtype(tokenring_backend, dtype)
        dq, _, _ = self._backward_against_float64(
            tokenring_backend, kernel, device, dtype, q_len=12, key_blocks=[5], heads=HEADS["mha"], mask=Mask.CAUSAL,
            scale=0.5,
        )
        assert torch.all(dq[:, :7] == 0), "rows with lse -inf must get dq exactly 0"


# -- comm contract -------------------------------------------------------------------


def _require_peers(world_size: int) -> None:
    if world_size < 2:
        pytest.skip("world size 1 has no peer to message")


class TestCommContract:
    """The backend's `Comm` between local ranks, through its own transport."""

    TIMEOUT_S = 20.0

    def _run(self, tokenring_worlds, world_size, task, *args):
        world = tokenring_worlds.get(world_size)
        return world.run_ok(f"tokenring.testing.comm_tasks.{task}", tokenring_worlds.backend_name, *args)

    def test_point_to_point_reaches_every_peer_distance(self, tokenring_worlds, tokenring_seed, world_size):
        _require_peers(world_size)
        results = self._run(tokenring_worlds, world_size, "every_peer_distance", tokenring_seed, self.TIMEOUT_S)
        for rank, result in enumerate(results):
            assert result["mismatches"] == [], f"rank {rank}: wrong payload at distances {result['mismatches']}"

    def test_bytes_sent_are_counted_per_step_and_link(self, tokenring_worlds, tokenring_seed, world_size):
        _require_peers(world_size)
        results = self._run(tokenring_worlds, world_size, "every_peer_distance", tokenring_seed, self.TIMEOUT_S)
        measured = sum_by_link(LinkTraffic(**m) for r in results for m in r["sent"])
        expected = sum_by_link(
            LinkTraffic(step=d, src=src, dst=(src + d) % world_size, bytes=(64 + d) * 4)
            for src in range(world_size)
            for d in range(1, world_size)
        )
        assert measured == expected

    def test_two_channels_in_flight_together(self, tokenring_worlds, tokenring_seed, world_size):
        _require_peers(world_size)
        results = self._run(tokenring_worlds, world_size, "two_channels_in_flight", tokenring_seed, self.TIMEOUT_S)
        for rank, result in enumerate(results):
            assert result["mismatches"] == [], f"rank {rank}: channels mixed up: {result['mismatches']}"

    def test_several_messages_to_one_peer_arrive_in_order(self, tokenring_worlds, tokenring_seed, world_size):
        _require_peers(world_size)
        results = self._run(tokenring_worlds, world_size, "ordered_messages", tokenring_seed, self.TIMEOUT_S)
        for rank, result in enumerate(results):
            assert result["mismatches"] == [], f"rank {rank}: out of order or wrong: {result['mismatches']}"

    def test_a_short_message_fills_the_start_of_a_longer_buffer_when_declared(
        self, tokenring_worlds, world_size
    ):
        """`Comm.accepts_short_messages` lets the agreement be skipped; it must hold where declared."""
        _require_peers(world_size)
        results = self._run(tokenring_worlds, world_size, "short_message", self.TIMEOUT_S)
        if not results[0]["declared"]:
            pytest.skip("the Comm does not declare accepts_short_messages: the ranks gather on every call")
        for rank, result in enumerate(results):
            preceding = (rank - 1) % world_size
            assert result["start"] == [preceding + i for i in range(16)], (rank, result)

    def test_a_peer_that_dies_between_posting_and_waiting_raises_a_tokenring_error(
        self, tokenring_worlds, world_size
    ):
        """The rank after the dead one cannot receive: it must raise our error, in time; nobody a raw one."""
        _require_peers(world_size)
        timeout_s, victim = 5.0, world_size - 1
        world = tokenring_worlds.get(world_size)
        try:
            results = world.run("tokenring.testing.comm_tasks.peer_dies_after_posting", tokenring_worlds.backend_name,
                                victim, timeout_s, timeout_s=60, allow_exits=True)
        finally:
            tokenring_worlds.discard(world_size)  # a dead rank: start afresh
        for result in results:
            if result.rank == victim:
                continue
            assert result.ok, f"rank {result.rank}: {result.error_type}: {result.error}"
            report = result.value
            assert report["outcome"] == "ok" or report["is_ours"], (result.rank, report)
            assert report["seconds"] < timeout_s + 10, (result.rank, report)
        waiting = results[(victim + 1) % world_size].value
        assert waiting["outcome"] != "ok", "a receive from a dead rank completed"
        assert f"rank {victim}" in waiting["message"], waiting["message"]

    def test_an_absent_peer_raises_instead_of_hanging(self, tokenring_worlds, world_size):
        _require_peers(world_size)
        timeout_s = 2.0
        world = tokenring_worlds.get(world_size)
        started = time.monotonic()
        try:
            results = world.run_ok(
                "tokenring.testing.comm_tasks.wait_for_absent_peer", tokenring_worlds.backend_name, 1, timeout_s,
                timeout_s=60,
            )
        finally:
            # A receive that never completed may linger in the transport: start afresh.
            tokenring_worlds.discard(world_size)
        waiter = results[0]
        assert waiter["raised"] is not None, f"waiting for an absent peer returned after {waiter['seconds']:.1f} s"
        assert waiter["seconds"] < timeout_s + 10, f"the error took {waiter['seconds']:.1f} s for a {timeout_s} s timeout"
        assert waiter["seconds"] >= timeout_s * 0.5, (
            f"{waiter['raised']} after {waiter['seconds']:.2f} s: an error this early is not the timeout: {waiter['message']}"
        )
        assert time.monotonic() - started < 60
        assert waiter["raised"].endswith("CommTimeout"), f"expected CommTimeout, got {waiter['raised']}: {waiter['message']}"
        assert "rank 0" in waiter["message"], f"the timeout must name the rank: {waiter['message']}"


# -- end to end ----------------------------------------------------------------------


# Every registered schedule, a third party's included: a backend conforms on all of them.
ALGORITHMS = pytest.mark.parametrize("algorithm", schedule_names())
CAUSAL = pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])


def _problem(backend_name: str, backend: Backend, seed: int, world_size: int, **changes) -> Problem:
    q_heads, kv_heads = usual_heads(backend)
    # 8 rows per rank, or the least multiple of 8 the schedule's pieces divide (tokenring-multi at N = 8 cuts 16).
    rows = fitting_seq_local(8, changes.get("algorithm", "tokenring"), bool(changes.get("causal", False)), world_size)
    base = Problem(
        seed, batch=2, seq_len=rows * world_size, q_heads=q_heads, kv_heads=kv_heads,
        head_dim=usual_head_dim(backend), dtype=dtype_name(usual_dtype(backend)), backend=backend_name,
    )
    return base.with_(**changes)


class TestEndToEnd:
    """`token_ring_attn` over local ranks against float64 attention on the full sequence."""

    @ALGORITHMS
    @CAUSAL
    def test_forward_matches_float64(self, tokenring_worlds, tokenring_backend, tokenring_seed, world_size, algorithm, causal):
        if causal:
            require(tokenring_backend, "causal")
        world = tokenring_worlds.get(world_size)
        problem = _problem(tokenring_worlds.backend_name, tokenring_backend, tokenring_seed, world_size,
                           causal=causal, algorithm=algorithm)
        check_attention(world, problem)

    @ALGORITHMS
    @CAUSAL
    def test_backward_matches_float64(self, tokenring_worlds, tokenring_backend, tokenring_seed, world_size, algorithm, causal):
        require(tokenring_backend, "backward")
        if causal:
            require(tokenring_backend, "causal")
        world = tokenring_worlds.get(world_size)
        problem = _problem(tokenring_worlds.backend_name, tokenring_backend, tokenring_seed, world_size,
                           causal=causal, algorithm=algorithm, softmax_scale=0.3)
        check_gradients(world, problem)

    @ALGORITHMS
    def test_long_shards_match_float64(self, tokenring_worlds, tokenring_backend, tokenring_seed, world_size, algorithm):
        # 256 tokens per rank: every block is longer than a fused kernel's tiles.
        world = tokenring_worlds.get(world_size)
        causal = tokenring_backend.capabilities.causal
        problem = _problem(tokenring_worlds.backend_name, tokenring_backend, tokenring_seed, world_size,
                           batch=1, seq_len=256 * world_size, causal=causal, algorithm=algorithm)
        if tokenring_backend.capabilities.backward:
            check_gradients(world, problem)
        else:
            check_attention(world, problem)

    @DTYPE_PARAMS
    @ALGORITHMS
    def test_every_declared_dtype(self, tokenring_worlds, tokenring_backend, tokenring_seed, world_size, dtype, algorithm):
        require_dtype(tokenring_backend, dtype)
        world = tokenring_worlds.get(world_size)
        causal = tokenring_backend.capabilities.causal
        problem = _problem(tokenring_worlds.backend_name, tokenring_backend, tokenring_seed, world_size,
                           dtype=dtype_name(dtype), causal=causal, algorithm=algorithm)
        if tokenring_backend.capabilities.backward:
            check_gradients(world, problem)
        else:
            check_attention(world, problem)


    @ALGORITHMS
    def test_packed_documents_and_padding_match_float64(self, tokenring_worlds, tokenring_backend, tokenring_seed,
                                                        world_size, algorithm):
        """cu_seqlens with lengths that divide by nothing, a document longer than a shard, and padding."""
        require(tokenring_backend, "varlen")
        causal = tokenring_backend.capabilities.causal
        pieces = fitting_seq_local(8, algorithm, False, world_size)  # masked plans cut the full plan's pieces
        seq_len = pieces * world_size
        boundaries = tuple(sorted({0, 1, 3, seq_len // 2 + 1, seq_len - 2}))
        world = tokenring_worlds.get(world_size)
        problem = _problem(tokenring_worlds.backend_name, tokenring_backend, tokenring_seed, world_size,
                           batch=1, seq_len=seq_len, causal=causal, algorithm=algorithm,
                           cu_seqlens=boundaries + (seq_len - 1,))
        if tokenring_backend.capabilities.backward:
            check_gradients(world, problem)
        else:
            check_attention(world, problem)

    @ALGORITHMS
    def test_sliding_window_matches_float64(self, tokenring_worlds, tokenring_backend, tokenring_seed, world_size,
                                            algorithm):
        require(tokenring_backend, "varlen")
        require(tokenring_backend, "window")
        causal = tokenring_backend.capabilities.causal
        seq_len = fitting_seq_local(8, algorithm, False, world_size) * world_size
        world = tokenring_worlds.get(world_size)
        problem = _problem(tokenring_worlds.backend_name, tokenring_backend, tokenring_seed, world_size,
                           seq_len=seq_len, causal=causal, algorithm=algorithm, window=(5, -1 if causal else 2))
        if tokenring_backend.capabilities.backward:
            check_gradients(world, problem)
        else:
            check_attention(world, problem)


# -- bad input -----------------------------------------------------------------------

BAD_INPUT_WORLD_SIZE = 2

# name: (changes per rank, fragments every error holds, culprit rank or None when all ranks are at fault)
BAD_INPUTS = {
    "q-has-3-dims-on-one-rank": ({1: {"q_shape": (2, 8, 4)}}, ["argument 'q'", "4 dimensions"], 1),
    "k-dtype-differs-from-q": ({"all": {"k_dtype": "float64"}}, ["argument 'k'", "dtype"], None),
    # Values are read (a device sync) only with TOKENRING_CHECKS=full; see test_non_finite_input_comes_out_not_finite.
    "nan-in-q-on-one-rank": ({"all": {"checks": "full"}, 0: {"q_fill": float("nan")}}, ["argument 'q'", "finite"], 0),
    "unknown-algorithm": ({"all": {"algorithm": "ulysses"}}, ["argument 'algorithm'", "'tokenring'"], None),
}


class TestBadInput:
    """Bad arguments: a clear error on every rank, promptly, never a hang or a wrong answer."""

    def _call(self, tokenring_worlds, tokenring_backend, seed, changes):
        world_size = min(BAD_INPUT_WORLD_SIZE, tokenring_worlds.limit()[0] or BAD_INPUT_WORLD_SIZE)
        world = tokenring_worlds.get(world_size)
        problem = _problem(tokenring_worlds.backend_name, tokenring_backend, seed, world_size)
        started = time.monotonic()
        results = world.run("tokenring.testing.tasks.call_with", problem, changes, timeout_s=60)
        assert time.monotonic() - started < 20, "the errors took too long to surface"
        return results

    @pytest.mark.parametrize("case", list(BAD_INPUTS))
    def test_bad_input_fails_on_every_rank(self, tokenring_worlds, tokenring_backend, tokenring_seed, case):
        changes, fragments, culprit = BAD_INPUTS[case]
        results = self._call(tokenring_worlds, tokenring_backend, tokenring_seed, changes)
        if culprit is not None and culprit >= len(results):
            pytest.skip("the culprit rank is beyond this backend's world size")
        assert_all_ranks_fail(results, *fragments, culprit=culprit)

    def test_packed_documents_are_refused_where_not_declared(self, tokenring_worlds, tokenring_backend, tokenring_seed):
        if tokenring_backend.capabilities.varlen:
            pytest.skip(f"backend {tokenring_backend.name!r} declares varlen")
        changes = {"all": {"cu_seqlens": [0, 3, 8 * BAD_INPUT_WORLD_SIZE]}}
        results = self._call(tokenring_worlds, tokenring_backend, tokenring_seed, changes)
        assert_all_ranks_fail(results, "argument 'cu_seqlens'", "varlen")

    def test_an_undeclared_dtype_is_refused_naming_the_capability(self, tokenring_worlds, tokenring_backend, tokenring_seed):
        undeclared = [d for d in DTYPES.values() if d not in tokenring_backend.capabilities.dtypes]
        if not undeclared:
            pytest.skip(f"backend {tokenring_backend.name!r} declares every dtype the suite knows")
        name = dtype_name(undeclared[0])
        changes = {"all": {"q_dtype": name, "k_dtype": name, "v_dtype": name}}
        results = self._call(tokenring_worlds, tokenring_backend, tokenring_seed, changes)
        assert_all_ranks_fail(results, name, error_type="Error")

    def test_the_world_still_works_after_bad_input(self, tokenring_worlds, tokenring_backend, tokenring_seed):
        self._call(tokenring_worlds, tokenring_backend, tokenring_seed, {0: {"q_dtype": "int64"}})
        results = self._call(tokenring_worlds, tokenring_backend, tokenring_seed, {})
        assert all(r.ok and r.value == "ok" for r in results), [r.error for r in results if not r.ok]

    @pytest.mark.parametrize("name", ["q", "k", "v"])
    @pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
    def test_non_finite_input_comes_out_not_finite(self, tokenring_worlds, tokenring_backend, tokenring_seed,
                                                   name, value):
        """By default values are not read (no device sync), but a NaN or infinity never gives a finite answer.

        A non-finite q of one rank spoils that rank's output; a non-finite k
        or v spoils every rank's, since every rank's queries see some of them.
        """
        world_size = min(BAD_INPUT_WORLD_SIZE, tokenring_worlds.limit()[0] or BAD_INPUT_WORLD_SIZE)
        problem = _problem(tokenring_worlds.backend_name, tokenring_backend, tokenring_seed, world_size)
        # The first element's sign decides whether an infinity meets +inf or -inf scores; try both.
        for sign in (1.0, -1.0):
            changes = {0: {f"{name}_fill": value * sign}}
            results = tokenring_worlds.get(world_size).run_ok("tokenring.testing.tasks.call_with", problem, changes,
                                                              "finiteness", timeout_s=60)
            expected = ["not finite"] + (["finite" if name == "q" else "not finite"] * (world_size - 1))
            assert results == expected, (changes, results)

    def test_a_rank_whose_call_changes_stops_every_rank(self, tokenring_worlds, tokenring_backend, tokenring_seed):
        """After calls the ranks agreed on (which may skip the gather), one rank changes: every rank raises."""
        world_size = min(3, tokenring_worlds.limit()[0] or 3)
        if world_size < 2:
            pytest.skip("needs two ranks")
        problem = _problem(tokenring_worlds.backend_name, tokenring_backend, tokenring_seed, world_size)
        changed = {"softmax_scale": 0.5}
        calls = [{}, {}, {world_size - 1: changed}, {}]
        started = time.monotonic()
        per_rank = tokenring_worlds.get(world_size).run_ok("tokenring.testing.tasks.call_sequence", problem, calls,
                                                           timeout_s=60)
        assert time.monotonic() - started < 20, "the errors took too long to surface"
        for rank, outcomes in enumerate(per_rank):
            assert outcomes[:2] == ["ok", "ok"] and outcomes[3] == "ok", (rank, outcomes)
            error_type, message = outcomes[2]
            assert error_type == "InputError", (rank, outcomes[2])
            assert f"on rank {rank}:" in message and "argument 'softmax_scale' differs" in message, message
            assert f"rank {world_size - 1} has 0.5" in message, message

