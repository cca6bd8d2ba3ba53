"""The NPU backend's probe on machines without (working) torch_npu, and that it never breaks the others."""

import sys
import types

import pytest
import torch

from tokenring.interfaces import BackendError
from tokenring.registry import Registry
from tokenring_npu import NpuBackend

CANN_MISSING = "libhccl.so: cannot open shared object file: No such file or directory"


@pytest.fixture
def no_torch_npu(monkeypatch):
    # None in sys.modules makes import and find_spec behave as for a missing package.
    monkeypatch.setitem(sys.modules, "torch_npu", None)


@pytest.fixture
def torch_npu_without_cann(tmp_path, monkeypatch):
    """A torch_npu package that is installed (findable) but fails to import, as without CANN."""
    package = tmp_path / "torch_npu"
    package.mkdir()
    (package / "__init__.py").write_text(f"raise ImportError({CANN_MISSING!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)


def fake_torch_npu(monkeypatch, *, devices, ops=("npu_fusion_attention", "npu_fusion_attention_grad")):
    module = types.ModuleType("torch_npu")
    module.__version__ = "2.5.1.test"
    module.__spec__ = types.SimpleNamespace(name="torch_npu")
    for op in ops:
        setattr(module, op, lambda *a, **k: None)
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(device_count=lambda: devices), raising=False)


def test_without_torch_npu_the_backend_is_unavailable_and_says_so(no_torch_npu):
    probe = NpuBackend().probe()
    assert not probe.available and probe.reason == "torch_npu not installed"


def test_with_torch_npu_but_no_cann_the_import_error_is_quoted(torch_npu_without_cann):
    probe = NpuBackend().probe()
    assert not probe.available
    assert "torch_npu is installed but failed to import" in probe.reason and CANN_MISSING in probe.reason


@pytest.mark.parametrize("broken", ["no_torch_npu", "torch_npu_without_cann"])
def test_a_broken_npu_setup_never_breaks_tokenring_or_the_cpu_backend(broken, request):
    request.getfixturevalue(broken)
    registry = Registry()
    entries = {e.name: e for e in registry.entries()}
    assert entries["cpu"].available and registry.get("cpu").name == "cpu"
    assert not entries["npu"].available and entries["npu"].error is None  # registered, just unavailable
    with pytest.raises(BackendError, match="not available here: torch_npu"):
        registry.get("npu")


def test_torch_npu_without_the_fused_attention_ops_is_unavailable(monkeypatch):
    fake_torch_npu(monkeypatch, devices=8, ops=("npu_fusion_attention",))
    probe = NpuBackend().probe()
    assert not probe.available and "lacks npu_fusion_attention_grad" in probe.reason


def test_torch_npu_without_a_visible_npu_is_unavailable(monkeypatch):
    fake_torch_npu(monkeypatch, devices=0)
    probe = NpuBackend().probe()
    assert not probe.available and "no NPU is visible" in probe.reason


def test_working_torch_npu_makes_the_backend_available_with_details(monkeypatch):
    fake_torch_npu(monkeypatch, devices=8)
    probe = NpuBackend().probe()
    assert probe.available
    assert probe.details["comm"] == "hccl" and probe.details["kernel"] == "torch_npu.npu_fusion_attention"
    assert probe.details["devices"] == "8" and NpuBackend().device_count() == 8


def test_declared_capabilities():
    caps = NpuBackend.capabilities
    assert caps.dtypes == {torch.float16, torch.bfloat16, torch.float32}
    assert caps.gqa and caps.causal and caps.backward
    assert 64 in caps.head_dims and 128 in caps.head_dims and max(caps.head_dims) == 512
    assert NpuBackend.distributed_backend == "hccl" and NpuBackend.device_type == "npu"
