"""A TokenRing backend written the way any third party writes one.

It brings its own kernel (attention in plain PyTorch matrix products, float32
and float64 only) and its own Comm (gloo, one batched call per exchange, one
process group per channel). TokenRing finds it through the entry point in
pyproject.toml and calls the hook below once per process.
"""

from __future__ import annotations

import torch

import tokenring
from tokenring import Backend, Capabilities, Probe


class TemplateBackend(Backend):
    name = "template-cpu"
    device_type = "cpu"
    distributed_backend = "gloo"
    # Declare only what the conformance suite proves: it skips the rest,
    # and TokenRing refuses undeclared dtypes with a clear error.
    capabilities = Capabilities(
        dtypes=frozenset({torch.float32, torch.float64}),
        head_dims=None,
        gqa=True,
        causal=True,
        backward=True,
    )

    def probe(self) -> Probe:
        # Cheap, and never raises: a missing piece is an answer, not an exception.
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_gloo_available()):
            return Probe(False, "this torch build has no gloo support")
        return Probe(True, details={"kernel": "torch matmul (math)", "comm": "gloo batch_isend_irecv"})

    def device(self, local_rank: int) -> torch.device:
        return torch.device("cpu")

    def create_comm(self, group=None):
        from .comm import BatchedGlooComm

        return BatchedGlooComm(group)

    def create_kernel(self):
        from .kernel import MathKernel

        return MathKernel()


@tokenring.hookimpl
def tokenring_register_backends(register):
    register(TemplateBackend())
