"""Backend discovery through the tokenring.backends entry points, and selection."""

import pytest

from tokenring.interfaces import BackendError
from tokenring.registry import Registry


def test_cpu_backend_is_discovered_through_its_entry_point():
    registry = Registry()
    (cpu,) = [e for e in registry.entries() if e.name == "cpu"]
    assert cpu.distribution.startswith("tokenring-attn")
    assert cpu.available
    assert registry.for_device("cpu").name == "cpu"


def test_broken_plugins_are_reported_and_the_rest_keeps_working(plugin_path):
    registry = Registry()
    entries = {(e.name, e.distribution.split()[0]): e for e in registry.entries()}
    broken = entries[("broken", "broken_plugin")]
    assert not broken.available and "CANN toolkit not found" in broken.probe.reason
    clash = [e for e in registry.entries() if e.name == "cpu" and e.distribution.startswith("broken_plugin")]
    assert clash and "already registered" in clash[0].error
    incomplete = entries[("incomplete", "broken_plugin")]
    assert "lacks required" in incomplete.error and "create_kernel" in incomplete.error
    assert registry.get("cpu").name == "cpu"
    with pytest.raises(BackendError, match="CANN toolkit not found"):
        registry.get("broken")


def test_plugin_loading_can_be_restricted_or_switched_off(plugin_path, monkeypatch):
    monkeypatch.setenv("TOKENRING_PLUGINS", "cpu")
    assert [e.name for e in Registry().entries()] == ["cpu"]
    monkeypatch.setenv("TOKENRING_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert Registry().entries() == []


def test_unknown_backend_names_the_available_ones():
    with pytest.raises(BackendError, match=r"unknown backend 'tpu'; available backends: 'cpu'"):
        Registry().get("tpu")


def test_no_backend_for_a_device_type_is_explained():
    with pytest.raises(BackendError, match="no available backend serves device type 'xpu'"):
        Registry().for_device("xpu")


def test_two_backends_for_one_device_type_is_an_error_naming_both(monkeypatch):
    monkeypatch.delenv("TOKENRING_BACKEND", raising=False)
    from tokenring_cpu import CpuBackend

    class SecondCpu(CpuBackend):
        name = "cpu2"

    class Plugin:
        @staticmethod
        def tokenring_register_backends(register):
            register(SecondCpu())

    import tokenring

    Plugin.tokenring_register_backends = tokenring.hookimpl(Plugin.tokenring_register_backends)
    registry = Registry()
    registry.register_plugin(Plugin, distribution="second-cpu 1.0")
    with pytest.raises(BackendError, match=r"'cpu' \(tokenring-attn .*\) and 'cpu2' \(second-cpu 1.0\)"):
        registry.for_device("cpu")
    monkeypatch.setenv("TOKENRING_BACKEND", "cpu2")
    assert registry.for_device("cpu").name == "cpu2"
