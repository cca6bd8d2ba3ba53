"""The backend kit: helpers for writing a TokenRing backend, so that no backend writes them again.

A backend implements two interfaces of the core, `tokenring.Comm` and
`tokenring.AttentionKernel` (see docs/writing-a-backend.md). What every
implementation over torch.distributed, and every adapter of a fused
attention operator, does the same way is here, in plain torch:

Comms over torch.distributed (`tokenring.kit.comms`):

* `wait_work(work, timeout_s, where)`: block on one work for at most
  ``timeout_s``; a timeout becomes `tokenring.CommTimeout` naming ``where``,
  any other failure `tokenring.TokenRingError`;
* `wait_works(works, timeout_s, where, labels=)`: several works within one
  deadline (what `Handle.wait` needs); ``labels`` name each work's peer;
* `transport_errors(where)`: a context manager that turns a transport
  failure while posting (or anything else) into ours, as a sentence;
  `transport_message(error)` is that sentence;
* `RollCall(what, group)`: which ranks reached a collective, through the
  default store, so that a timeout names the ranks that never came;
* `all_gather_bytes(payload, group=, world_size=, timeout_s=, where=,
  device=, dtype=)`: every rank's byte string in rank order, bounded by the
  timeout (what `Comm.all_gather_bytes` needs);
* `is_timeout(error)`: whether a torch.distributed error reports a timeout
  (gloo, NCCL and HCCL wordings).

Kernel adapters (`tokenring.kit.kernels`):

* `nothing_seen(q, v)` and `no_gradients(q, k, v)`: the exact answers for a
  block with no queries or no keys (out 0, lse -inf; zero gradients);
* `lse_for_backward(lse)`: the final lse as fused backwards read it (+inf
  where the contract has -inf, so blind rows get probability 0, not NaN);
* `unit_stride(x)`: ``x`` with stride 1 in its last dimension;
* `HeadGroups`: a block's (B, S, H, D) tensors as an operator that wants
  (B, H, S, D) and equal head counts sees them (GQA folded into the rows or
  K/V repeated), and the results back;
* `accumulation_dtype(dtype)`: the dtype lse and gradient sums use
  (float64 for float64 inputs, float32 otherwise).

The kit depends only on the core's interfaces (`tokenring.interfaces`);
`tests/test_layers.py` checks that.
"""

from tokenring.interfaces import accumulation_dtype
from tokenring.kit.comms import RollCall, all_gather_bytes, is_timeout, transport_errors, transport_message, wait_work, wait_works
from tokenring.kit.kernels import HeadGroups, lse_for_backward, no_gradients, nothing_seen, unit_stride

__all__ = [
    "HeadGroups",
    "RollCall",
    "accumulation_dtype",
    "all_gather_bytes",
    "is_timeout",
    "lse_for_backward",
    "no_gradients",
    "nothing_seen",
    "transport_errors",
    "transport_message",
    "unit_stride",
    "wait_work",
    "wait_works",
]
