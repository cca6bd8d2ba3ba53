"""A test backend: the NPU backend's kernel adapter bound to the SPECIFICATION of torch_npu's
operators, and the NPU Comm's batching code over gloo, all on the CPU. NOT hardware."""

import importlib

import torch

import tokenring
from tokenring.interfaces import Backend, Probe
from tokenring_npu import NpuBackend, specification
from tokenring_npu.comm import BatchedP2PComm


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
        return BatchedP2PComm(group, expected_backend="gloo", device=torch.device("cpu"))

    def create_kernel(self):
        return NpuBackend().create_kernel(ops=specification)


class _Plugin:
    @staticmethod
    @tokenring.hookimpl
    def tokenring_register_backends(register):
        register(NpuSpecificationBackend())


def with_specification_backend(rank, world_size, task, *args):
    """Run ``task`` on a rank after registering the specification backend there (once per process)."""
    from tokenring.registry import registry

    if not any(e.name == NpuSpecificationBackend.name for e in registry.entries()):
        registry.register_plugin(_Plugin, distribution="tests (npu specification)")
    module, _, name = task.rpartition(".")
    return getattr(importlib.import_module(module), name)(rank, world_size, *args)


class WorldWithSpecificationBackend:
    """A LocalWorld whose tasks run with the specification backend registered."""

    def __init__(self, world):
        self.world = world
        self.world_size = world.world_size

    def run_ok(self, task, *args, **kwargs):
        return self.world.run_ok("npu_spec.backend.with_specification_backend", task, *args, **kwargs)
