"""The CPU reference backend: gloo for messages, torch's CPU flash-attention op for blocks.

It registers through the ``tokenring.backends`` entry-point group, exactly as
a third-party backend does, and runs anywhere torch runs.
"""

from __future__ import annotations

import torch

import tokenring
from tokenring.interfaces import Backend, Capabilities, Probe


class CpuBackend(Backend):
    name = "cpu"
    device_type = "cpu"
    capabilities = Capabilities(
        dtypes=frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16}),
        head_dims=None,
        gqa=True,
        causal=True,
        backward=True,
        max_world_size=None,
        varlen=True,
        window=True,
    )

    def probe(self) -> Probe:
        import torch.distributed as dist

        if not dist.is_available():
            return Probe(False, "this torch build has no torch.distributed")
        if not dist.is_gloo_available():
            return Probe(False, "this torch build has no gloo support")
        if not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
            return Probe(False, f"torch {torch.__version__} lacks aten._scaled_dot_product_flash_attention_for_cpu")
        return Probe(True, details={"kernel": "aten._scaled_dot_product_flash_attention_for_cpu", "comm": "gloo"})

    def device(self, local_rank: int) -> torch.device:
        return torch.device("cpu")

    def create_comm(self, group=None):
        from .comm import GlooComm

        return GlooComm(group)

    def create_kernel(self):
        from .kernel import CpuSdpaKernel

        return CpuSdpaKernel()


@tokenring.hookimpl
def tokenring_register_backends(register):
    register(CpuBackend())
