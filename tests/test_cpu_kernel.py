"""What is particular to the CPU kernel adapter.

The kernel contract itself (docs/design.md, "Backend contracts") is tested for every backend, this one
included, by the conformance suite: `tokenring conformance --backend cpu`.
"""

import torch

from tokenring.interfaces import Mask
from tokenring_cpu.kernel import CpuSdpaKernel


def test_empty_key_block_gives_zero_and_minus_inf_without_calling_torch():
    # torch's CPU operator crashes on zero keys; the adapter answers without it.
    q = torch.randn(1, 4, 2, 16)
    empty = torch.empty(1, 0, 2, 16)
    out, lse = CpuSdpaKernel().forward(q, empty, empty, scale=1.0, mask=Mask.NONE)
    assert out.shape == q.shape and torch.all(out == 0) and torch.all(torch.isneginf(lse))
