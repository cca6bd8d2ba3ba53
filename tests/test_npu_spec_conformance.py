"""The conformance suite's kernel contract, run on the CPU against the NPU adapter bound to the
SPECIFICATION of torch_npu's operators (tokenring_npu.specification), NOT against hardware.

It shows that the adapter's translation (BSND layout, lse from softmax_max and
softmax_sum, sparse_mode 3 masks, rows that see no key, the backward's
statistics, GQA) meets the kernel contract *if* the operators behave as
documented. `ci/npu` runs the same suite against the real operators.
"""

import pytest
import torch

from tokenring.interfaces import Backend, Probe
from tokenring.testing.suite import TestKernelContract  # noqa: F401  (collected here)
from tokenring_npu import NpuBackend
from tokenring_npu import specification


class NpuSpecificationBackend(Backend):
    """The NPU backend's kernel and capabilities, with the specification standing in for torch_npu, on the CPU."""

    name = "npu-specification"
    device_type = "cpu"
    capabilities = NpuBackend.capabilities

    def probe(self) -> Probe:
        return Probe(True, details={"kernel": "NPU adapter over tokenring_npu.specification (not hardware)"})

    def device(self, local_rank: int) -> torch.device:
        return torch.device("cpu")

    def create_comm(self, group=None):
        raise NotImplementedError("the specification backend is for the kernel contract only")

    def create_kernel(self):
        return NpuBackend().create_kernel(ops=specification)


@pytest.fixture(scope="module")
def tokenring_backend():
    return NpuSpecificationBackend()
