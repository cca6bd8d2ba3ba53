"""The NVIDIA backend: NCCL for messages, flash-attn (or torch's SDPA operators) for blocks.

It registers through the ``tokenring.backends`` entry-point group, exactly as
a third-party backend does. Importing it needs neither CUDA nor flash-attn:
the kernel is chosen (and flash-attn imported) the first time the backend is
asked for its probe, capabilities or kernel, once per process; see
`tokenring_cuda.selection` for the choice and ``TOKENRING_CUDA_KERNEL``.
Messages go over NCCL, queries and partial results on separate
communicators so that they run concurrently; see `tokenring_cuda.comm`.
"""

from __future__ import annotations

import threading

import torch

import tokenring
from tokenring.interfaces import Backend, Capabilities, Probe

from .selection import KernelChoice, select_kernel


def _cuda_problem() -> str | None:
    """Why CUDA cannot be used in this process, or None."""
    if getattr(torch.version, "hip", None):
        return f"torch {torch.__version__} is a ROCm build; this backend is written and tested for NVIDIA CUDA"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device (check the driver and CUDA_VISIBLE_DEVICES)"
    return None


class CudaBackend(Backend):
    name = "cuda"
    device_type = "cuda"
    distributed_backend = "nccl"

    def __init__(self) -> None:
        self._choice: KernelChoice | None = None
        self._lock = threading.Lock()

    def kernel_choice(self) -> KernelChoice:
        """The block kernel of this process, chosen on first use and then fixed."""
        with self._lock:
            if self._choice is None:
                capability = None
                if _cuda_problem() is None:
                    capability = torch.cuda.get_device_capability(torch.cuda.current_device())
                self._choice = select_kernel(compute_capability=capability)
            return self._choice

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        """Those of the chosen kernel: flash-attn takes fp16/bf16, the SDPA operators fp32 too."""
        return self.kernel_choice().capabilities

    def probe(self) -> Probe:
        problem = _cuda_problem()
        if problem is not None:
            return Probe(False, problem)
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_nccl_available():
            return Probe(False, f"torch {torch.__version__} is built without NCCL support in torch.distributed")
        choice = self.kernel_choice()
        if choice.error is not None:
            return Probe(False, choice.error)
        count = torch.cuda.device_count()
        details = {
            "kernel": choice.name,
            "comm": "nccl (query and partial channels on separate communicators)",
            "devices": f"{count} x {torch.cuda.get_device_name(0)}",
        }
        if choice.passed_over:
            details["not chosen"] = "; ".join(choice.passed_over)
        return Probe(True, details=details)

    def device_count(self) -> int | None:
        # NCCL cannot put two ranks on one GPU: one rank per visible device.
        return torch.cuda.device_count() if _cuda_problem() is None else 0

    def prepare_process(self, local_rank: int) -> None:
        torch.cuda.set_device(local_rank)

    def create_comm(self, group=None):
        from .comm import NcclComm

        return NcclComm(group)

    def create_kernel(self):
        return self.kernel_choice().create()


@tokenring.hookimpl
def tokenring_register_backends(register):
    register(CudaBackend())
