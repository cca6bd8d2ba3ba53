"""The conformance suite's kernel contract, run on the CPU against the CUDA backend's kernel
adapters bound to STAND-INS of the vendor functions (tokenring_cuda.specification), NOT hardware.

It shows that each adapter's translation meets the shared contract *if* the
vendor functions behave as their stand-ins do; tests/test_cuda_gpu.py (run by
ci/gpu) checks the stand-ins against the real functions, and ci/gpu runs the
whole suite on GPUs.
"""

import pytest
import torch

from tokenring.interfaces import Backend, Probe
from tokenring.testing.suite import TestKernelContract  # noqa: F401  (collected here)
from tokenring_cuda import specification as spec
from tokenring_cuda.flash import FLASH_2_7, FLASH_3, FlashInterface, FlashKernel
from tokenring_cuda.sdpa import SdpaEfficientKernel
from tokenring_cuda.selection import FLASH_CAPABILITIES, SDPA_CAPABILITIES


class CudaSpecificationBackend(Backend):
    """One CUDA kernel adapter over stand-ins, on the CPU; only the kernel contract uses it."""

    device_type = "cpu"

    def __init__(self, name, capabilities, make_kernel):
        self.name = name
        self.capabilities = capabilities
        self._make_kernel = make_kernel

    def probe(self) -> Probe:
        return Probe(True, details={"kernel": f"{self.name} (stand-ins, not hardware)"})

    def device(self, local_rank: int) -> torch.device:
        return torch.device("cpu")

    def create_comm(self, group=None):
        raise NotImplementedError("only the kernel contract runs against stand-ins")

    def create_kernel(self):
        return self._make_kernel()


def _flash(release, convention):
    interface = FlashInterface(f"stand-in {release}", release._flash_attn_forward, release._flash_attn_backward, convention)
    return lambda: FlashKernel(interface)


BACKENDS = {
    "sdpa": (SDPA_CAPABILITIES, lambda: SdpaEfficientKernel(spec.efficient_attention_forward,
                                                            spec.efficient_attention_backward)),
    "flash-2.7": (FLASH_CAPABILITIES, _flash(spec.flash_2_7, FLASH_2_7)),
    "flash-3": (FLASH_CAPABILITIES, _flash(spec.flash_3, FLASH_3)),
}


@pytest.fixture(scope="module", params=list(BACKENDS))
def tokenring_backend(request):
    capabilities, make_kernel = BACKENDS[request.param]
    return CudaSpecificationBackend(f"cuda-{request.param}-specification", capabilities, make_kernel)
