"""The Ascend NPU backend: HCCL for messages, torch_npu.npu_fusion_attention for blocks.

Importing this module never imports torch_npu: a machine without it (or with
torch_npu but without a working CANN toolkit) still imports `tokenring` and
every other backend; `NpuBackend.probe` says why this one is unavailable.

Note for such machines: torch >= 2.5 imports installed device extensions
(entry-point group ``torch.backends``, which torch_npu registers) inside
``import torch`` itself. If torch_npu is installed but CANN is not usable,
``import torch`` then fails before TokenRing runs at all; set
``TORCH_DEVICE_BACKEND_AUTOLOAD=0`` to switch that autoloading off. See
docs/ascend.md.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

import tokenring
from tokenring.interfaces import Backend, Capabilities, Probe

# Documented by torch_npu (Ascend/op-plugin docs, torch_npu-npu_fusion_attention.md):
# float16, bfloat16 and float32 (CANN 7.0.0's documentation: float16 and bfloat16
# only); any D in 1..768 there, 1..512 in MindSpeed's copy of the constraints.
# Nothing has run on hardware yet, so we declare the multiples of 16 up to 512,
# the head dims models use; widening needs a hardware run (ci/npu).
_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
HEAD_DIMS = tuple(range(16, 513, 16))


class NpuBackend(Backend):
    name = "npu"
    device_type = "npu"
    distributed_backend = "hccl"
    capabilities = Capabilities(
        dtypes=_DTYPES,
        head_dims=HEAD_DIMS,
        gqa=True,          # Hq must be a multiple of Hkv (checked by the core before any work)
        causal=True,
        backward=True,
        max_world_size=None,
        max_q_heads=256,   # npu_fusion_attention's documented head_num limit
    )

    def probe(self) -> Probe:
        try:
            if importlib.util.find_spec("torch_npu") is None:
                return Probe(False, "torch_npu not installed")
        except (ImportError, ValueError) as error:
            return Probe(False, f"torch_npu not installed ({error})")
        try:
            torch_npu = importlib.import_module("torch_npu")
        except ImportError as error:
            return Probe(
                False,
                f"torch_npu is installed but failed to import (is the CANN toolkit installed and its "
                f"set_env.sh sourced?): {type(error).__name__}: {error}",
            )
        except Exception as error:  # torch_npu raises RuntimeError too when the driver is missing
            return Probe(False, f"torch_npu is installed but failed to import: {type(error).__name__}: {error}")
        missing = [op for op in ("npu_fusion_attention", "npu_fusion_attention_grad") if not hasattr(torch_npu, op)]
        if missing:
            version = getattr(torch_npu, "__version__", "?")
            return Probe(False, f"torch_npu {version} lacks {', '.join(missing)}")
        try:
            count = torch.npu.device_count()
        except Exception as error:
            return Probe(False, f"torch_npu imported but cannot count NPUs: {type(error).__name__}: {error}")
        if count < 1:
            return Probe(False, "torch_npu imported but no NPU is visible (check ASCEND_RT_VISIBLE_DEVICES and the driver)")
        return Probe(
            True,
            details={
                "kernel": "torch_npu.npu_fusion_attention",
                "comm": "hccl",
                "torch_npu": str(getattr(torch_npu, "__version__", "?")),
                "devices": str(count),
            },
        )

    def device_count(self) -> int | None:
        # HCCL, like NCCL, cannot put two ranks on one device.
        try:
            import torch_npu  # noqa: F401  (torch.npu exists only once it is imported)

            return int(torch.npu.device_count())
        except Exception:
            return 0

    def prepare_process(self, local_rank: int) -> None:
        import torch_npu  # noqa: F401  (registers torch.npu)

        torch.npu.set_device(local_rank)

    def create_comm(self, group=None):
        from .comm import HcclComm

        return HcclComm(group)

    def create_kernel(self, ops=None):
        """The block kernel; ``ops`` replaces torch_npu (tests pass the specification)."""
        from .kernel import NpuFusionAttentionKernel

        return NpuFusionAttentionKernel(ops)


@tokenring.hookimpl
def tokenring_register_backends(register):
    register(NpuBackend())
