"""Choosing the CUDA backend's kernel, and its probe's answers, on a CPU-only machine.

flash-attn, FlashAttention-3 and CUDA are replaced by stand-ins (modules
from `tokenring_cuda.specification.flash_attn_modules`, monkeypatched torch
functions): these test our selection logic and our reasons, not the vendors.
"""

import subprocess
import sys

import pytest
import torch

import tokenring_cuda
from tokenring_cuda import selection
from tokenring_cuda.flash import FlashKernel
from tokenring_cuda.sdpa import SdpaEfficientKernel
from tokenring_cuda.specification import flash_attn_modules


def importer(*versions):
    """An import function that finds the stand-in modules of ``versions`` and nothing else."""
    modules = {}
    for version in versions:
        modules.update(flash_attn_modules(version))

    def import_module(name):
        if name not in modules:
            raise ModuleNotFoundError(f"No module named {name!r}")
        return modules[name]

    return import_module


@pytest.mark.parametrize("version,label", [("2.5.8", "2.5"), ("2.6.3", "2.6"), ("2.7.4.post1", "2.7"), ("2.8.3", "2.7")])
def test_auto_chooses_installed_flash_attn_with_the_convention_of_its_release(version, label):
    choice = selection.select_kernel("auto", compute_capability=(8, 0), import_module=importer(version))
    assert choice.error is None
    assert choice.name == f"flash-attn {version}"
    assert choice.capabilities.dtypes == frozenset({torch.float16, torch.bfloat16})
    kernel = choice.create()
    assert isinstance(kernel, FlashKernel) and kernel.interface.convention.label == label
    assert any(reason.startswith("flash3:") for reason in choice.passed_over)


def test_auto_prefers_flash_attention_3_on_hopper_and_flash_attn_2_elsewhere():
    both = importer("3", "2.8.3")
    hopper = selection.select_kernel("auto", compute_capability=(9, 0), import_module=both)
    assert hopper.name.startswith("FlashAttention-3") and hopper.create().interface.convention.label == "3"
    ampere = selection.select_kernel("auto", compute_capability=(8, 6), import_module=both)
    assert ampere.name == "flash-attn 2.8.3"
    assert "flash3: not for compute capability 8.6" in ampere.passed_over


def test_auto_falls_back_to_sdpa_with_every_reason_listed():
    turing = selection.select_kernel("auto", compute_capability=(7, 5), import_module=importer("2.6.3"))
    assert turing.name == selection.SDPA_NAME and isinstance(turing.create(), SdpaEfficientKernel)
    assert turing.capabilities.dtypes == frozenset({torch.float32, torch.float16, torch.bfloat16})
    assert "flash2: not for compute capability 7.5" in turing.passed_over
    old = selection.select_kernel("auto", compute_capability=(8, 0), import_module=importer("2.4.2"))
    assert old.name == selection.SDPA_NAME
    assert any("flash-attn 2.4.2 is not supported" in reason for reason in old.passed_over)
    none = selection.select_kernel("auto", compute_capability=(9, 0), import_module=importer())
    assert none.name == selection.SDPA_NAME and none.error is None
    assert [r.split(":")[0] for r in none.passed_over] == ["flash3", "flash2"]


def test_a_requested_kernel_that_cannot_load_is_an_error_not_a_silent_fallback():
    choice = selection.select_kernel("flash2", compute_capability=(8, 0), import_module=importer())
    assert choice.make is None
    assert "TOKENRING_CUDA_KERNEL=flash2" in choice.error and "flash_attn" in choice.error
    with pytest.raises(RuntimeError, match="flash2"):
        choice.create()
    bogus = selection.select_kernel("flash4", import_module=importer())
    assert bogus.make is None and "'flash4' is not one of auto, flash3, flash2, sdpa" in bogus.error


def test_a_release_whose_functions_do_not_fit_its_version_is_refused_with_the_reason():
    modules = flash_attn_modules("2.7.0")
    modules["flash_attn"].__version__ = "2.6.3"  # 2.7 functions under a 2.6 version string
    choice = selection.select_kernel("flash2", import_module=modules.__getitem__)
    assert choice.make is None and "2.6 interface" in choice.error


def test_the_environment_variable_selects_the_kernel(monkeypatch):
    monkeypatch.setenv(selection.KERNEL_ENV, " SDPA ")
    assert selection.requested_kernel() == "sdpa"
    assert selection.select_kernel(import_module=importer("2.8.3")).name == selection.SDPA_NAME
    monkeypatch.delenv(selection.KERNEL_ENV)
    assert selection.requested_kernel() == "auto"


# -- the probe ---------------------------------------------------------------------


@pytest.fixture
def cuda_machine(monkeypatch):
    """Pretend this process sees two A100s, with NCCL, and no flash-attn."""
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    return monkeypatch


def test_no_cuda_build_is_unavailable_with_the_reason():
    if torch.version.cuda is not None:
        pytest.skip("this torch is built with CUDA")
    backend = tokenring_cuda.CudaBackend()
    probe = backend.probe()
    assert not probe.available and "built without CUDA" in probe.reason
    assert backend.device_count() == 0


def test_no_visible_device_and_rocm_builds_are_unavailable_with_their_reasons(cuda_machine):
    cuda_machine.setattr(torch.cuda, "is_available", lambda: False)
    probe = tokenring_cuda.CudaBackend().probe()
    assert not probe.available and "sees no CUDA device" in probe.reason and "CUDA_VISIBLE_DEVICES" in probe.reason
    cuda_machine.setattr(torch.version, "hip", "6.2")
    probe = tokenring_cuda.CudaBackend().probe()
    assert not probe.available and "ROCm" in probe.reason


def test_no_nccl_is_unavailable_with_the_reason(cuda_machine):
    cuda_machine.setattr(torch.distributed, "is_nccl_available", lambda: False)
    probe = tokenring_cuda.CudaBackend().probe()
    assert not probe.available and "NCCL" in probe.reason


def test_without_flash_attn_the_backend_is_available_on_sdpa_and_says_why(cuda_machine):
    cuda_machine.setattr(selection, "vendor_import", importer())
    backend = tokenring_cuda.CudaBackend()
    probe = backend.probe()
    assert probe.available, probe.reason
    assert probe.details["kernel"] == selection.SDPA_NAME
    assert "flash2: ModuleNotFoundError" in probe.details["not chosen"]
    assert probe.details["devices"] == "2 x NVIDIA A100-SXM4-80GB"
    assert "nccl" in probe.details["comm"]
    assert torch.float32 in backend.capabilities.dtypes and backend.capabilities.backward
    assert backend.device_count() == 2
    assert isinstance(backend.create_kernel(), SdpaEfficientKernel)


def test_with_flash_attn_the_probe_names_it_and_capabilities_follow_it(cuda_machine):
    cuda_machine.setattr(selection, "vendor_import", importer("2.6.3"))
    backend = tokenring_cuda.CudaBackend()
    assert backend.probe().details["kernel"] == "flash-attn 2.6.3"
    assert backend.capabilities.dtypes == frozenset({torch.float16, torch.bfloat16})
    assert backend.capabilities.gqa and backend.capabilities.causal and backend.capabilities.backward
    # chosen once: uninstalling flash-attn now changes nothing for this backend object
    cuda_machine.setattr(selection, "vendor_import", importer())
    assert backend.kernel_choice().name == "flash-attn 2.6.3"


def test_a_requested_kernel_that_is_missing_makes_the_backend_unavailable(cuda_machine):
    cuda_machine.setattr(selection, "vendor_import", importer())
    cuda_machine.setenv(selection.KERNEL_ENV, "flash3")
    probe = tokenring_cuda.CudaBackend().probe()
    assert not probe.available and "TOKENRING_CUDA_KERNEL=flash3" in probe.reason


def test_importing_the_core_and_backends_needs_neither_cuda_nor_flash_attn():
    script = (
        "import sys\n"
        "attempts = []\n"
        "class Watch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('flash_attn', 'flash_attn_interface'):\n"
        "            attempts.append(name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Watch())\n"
        "import torch, tokenring, tokenring_cpu, tokenring_cuda\n"
        "assert attempts == [], attempts\n"
        "assert not torch.cuda.is_initialized()\n"
        "from tokenring.registry import registry\n"
        "entry = {e.name: e for e in registry.entries()}['cuda']\n"
        "assert entry.error is None, entry.error\n"
        "print(entry.probe.available, entry.probe.reason)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    if torch.version.cuda is None:
        assert result.stdout.startswith("False") and "without CUDA" in result.stdout
