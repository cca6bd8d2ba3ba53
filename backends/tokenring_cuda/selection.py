"""Choosing the block kernel, once, when the backend is first used.

``TOKENRING_CUDA_KERNEL`` picks one:

* ``auto`` (default): FlashAttention-3 on Hopper (compute capability 9.x)
  when ``flash_attn_interface`` is installed; else flash-attn 2.5-2.8 on
  Ampere or newer when ``flash_attn`` is installed; else torch's SDPA
  efficient-attention operators, which need nothing beyond torch.
* ``flash3``, ``flash2``, ``sdpa``: that kernel or nothing. A requested
  kernel that cannot load makes the backend unavailable, with the reason;
  it never falls back silently.

Every kernel that ``auto`` passed over is listed with its reason, so that
``tokenring backends`` says why flash-attn is not in use.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from tokenring.interfaces import AttentionKernel, Capabilities

KERNEL_ENV = "TOKENRING_CUDA_KERNEL"
KERNEL_NAMES = ("auto", "flash3", "flash2", "sdpa")

# Multiples of 8 up to 256: what flash-attn 2 and 3 compile kernels for (they
# round up inside), and the range the efficient-attention path is tested in.
HEAD_DIMS = tuple(range(8, 257, 8))

FLASH_CAPABILITIES = Capabilities(
    dtypes=frozenset({torch.float16, torch.bfloat16}),
    head_dims=HEAD_DIMS,
    gqa=True,
    causal=True,
    backward=True,
    max_world_size=None,
    varlen=True,  # token-masked blocks run through SDPA with an explicit mask
    window=True,
)

SDPA_CAPABILITIES = Capabilities(
    dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
    head_dims=HEAD_DIMS,
    gqa=True,
    causal=True,
    backward=True,
    max_world_size=None,
    varlen=True,  # token-masked blocks run through SDPA with an explicit mask
    window=True,
)

SDPA_NAME = "torch SDPA efficient attention (aten._scaled_dot_product_efficient_attention)"


@dataclass(frozen=True)
class KernelChoice:
    """The kernel this process uses, or why the requested one cannot be used."""

    name: str
    capabilities: Capabilities
    make: Callable[[], AttentionKernel] | None
    passed_over: tuple[str, ...] = field(default=())  # "<kernel>: <why not>", for auto
    error: str | None = None                           # set when a requested kernel cannot load

    def create(self) -> AttentionKernel:
        if self.make is None:
            raise RuntimeError(self.error or f"kernel {self.name} cannot be created")
        return self.make()


Importer = Callable[[str], object]

# Module-level so that tests can stand in for installed (or absent) flash-attn packages.
vendor_import: Importer = importlib.import_module


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def load_flash2(import_module: Importer) -> KernelChoice:
    """flash-attn 2.5-2.8; raises (ImportError, ValueError, TypeError, ...) with the reason it cannot be used."""
    from .flash import FlashInterface, FlashKernel, convention_for_flash2

    package = import_module("flash_attn")
    version = str(getattr(package, "__version__", ""))
    convention = convention_for_flash2(version)
    module = import_module("flash_attn.flash_attn_interface")
    try:
        interface = FlashInterface(
            f"flash-attn {version}", module._flash_attn_forward, module._flash_attn_backward, convention
        )
    except TypeError as exc:
        raise TypeError(
            f"flash-attn {version}: _flash_attn_forward/_flash_attn_backward do not take the "
            f"{convention.label} interface's arguments ({exc})"
        ) from None
    return KernelChoice(interface.name, FLASH_CAPABILITIES, lambda: FlashKernel(interface))


def load_flash3(import_module: Importer) -> KernelChoice:
    """FlashAttention-3 (the ``flash_attn_interface`` module built from hopper/)."""
    from .flash import FLASH_3, FLASH_3_CAUSAL_NAMED, FlashInterface, FlashKernel

    module = import_module("flash_attn_interface")
    version = _distribution_version(("flash_attn_3", "flash-attn-3", "flashattn-hopper"))
    name = f"FlashAttention-3{f' {version}' if version else ''}"
    problems = []
    for convention in (FLASH_3, FLASH_3_CAUSAL_NAMED):
        try:
            interface = FlashInterface(name, module._flash_attn_forward, module._flash_attn_backward, convention)
        except TypeError as exc:
            problems.append(str(exc))
            continue
        return KernelChoice(name, FLASH_CAPABILITIES, lambda: FlashKernel(interface))
    raise TypeError(f"{name}: flash_attn_interface's functions take none of the known argument lists ({problems[0]})")


def load_sdpa() -> KernelChoice:
    from .sdpa import SdpaEfficientKernel

    for op in ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward"):
        if not hasattr(torch.ops.aten, op):
            raise RuntimeError(f"torch {torch.__version__} has no aten.{op}")
    return KernelChoice(SDPA_NAME, SDPA_CAPABILITIES, SdpaEfficientKernel)


def _distribution_version(names: tuple[str, ...]) -> str:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


def requested_kernel() -> str:
    """The value of TOKENRING_CUDA_KERNEL, lower-cased; "auto" when unset."""
    return os.environ.get(KERNEL_ENV, "").strip().lower() or "auto"


def select_kernel(
    request: str | None = None,
    *,
    compute_capability: tuple[int, int] | None = None,
    import_module: Importer | None = None,
) -> KernelChoice:
    """Choose the kernel; never raises. ``compute_capability`` None means no device to ask."""
    request = requested_kernel() if request is None else request
    importer = import_module or vendor_import
    loaders: dict[str, Callable[[], KernelChoice]] = {
        "flash3": lambda: load_flash3(importer),
        "flash2": lambda: load_flash2(importer),
        "sdpa": load_sdpa,
    }
    if request not in KERNEL_NAMES:
        return KernelChoice(
            request, SDPA_CAPABILITIES, None,
            error=f"{KERNEL_ENV}={request!r} is not one of {', '.join(KERNEL_NAMES)}",
        )
    if request != "auto":
        try:
            return loaders[request]()
        except Exception as exc:  # an import of a compiled extension can fail in many ways
            return KernelChoice(request, SDPA_CAPABILITIES, None, error=f"{KERNEL_ENV}={request}: {_short(exc)}")

    passed_over = []
    for name, minimum, maximum in (("flash3", (9, 0), (9, 9)), ("flash2", (8, 0), None)):
        if compute_capability is not None and (
            compute_capability < minimum or (maximum is not None and compute_capability > maximum)
        ):
            passed_over.append(f"{name}: not for compute capability {compute_capability[0]}.{compute_capability[1]}")
            continue
        try:
            choice = loaders[name]()
        except Exception as exc:
            passed_over.append(f"{name}: {_short(exc)}")
            continue
        return KernelChoice(choice.name, choice.capabilities, choice.make, tuple(passed_over))
    try:
        choice = load_sdpa()
    except Exception as exc:
        return KernelChoice("sdpa", SDPA_CAPABILITIES, None, tuple(passed_over), error=_short(exc))
    return KernelChoice(choice.name, choice.capabilities, choice.make, tuple(passed_over))
