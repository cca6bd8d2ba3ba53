"""The conformance suite's kernel contract, run on the CPU against the NPU kernel adapter bound to
the SPECIFICATION of torch_npu's operators (tokenring_npu.specification), NOT against hardware.

It shows that the adapter's translation (BSND layout, lse from softmax_max and
softmax_sum, sparse_mode 3 masks, rows that see no key, the backward's
statistics, GQA) meets the contract *if* the operators behave as documented.
`ci/npu` runs the whole suite against the real operators.
"""

import pytest

from npu_spec.backend import NpuSpecificationBackend
from tokenring.testing.suite import TestKernelContract  # noqa: F401  (collected here)


@pytest.fixture(scope="module")
def tokenring_backend():
    return NpuSpecificationBackend()
