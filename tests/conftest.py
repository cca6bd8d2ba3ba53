"""The core's own tests run on the CPU backend through the conformance suite's pytest plugin."""

import os
import textwrap

import pytest

pytest_plugins = ["tokenring.testing.plugin"]

# These tests are about the CPU backend; another installed CPU backend (the
# template plugin, say) must not make calls without backend= ambiguous.
os.environ.setdefault("TOKENRING_BACKEND", "cpu")


@pytest.fixture(scope="session")
def tokenring_backend_name():
    return "cpu"


@pytest.fixture(scope="session")
def worlds(tokenring_worlds):
    """One local world per world size for the whole session (see tokenring.testing.plugin)."""
    return tokenring_worlds


@pytest.fixture
def seed(tokenring_seed):
    return tokenring_seed


# -- deliberately broken and deliberately wrong plugins, installed on a temporary path --

BROKEN_PLUGIN_MODULES = {
    # A plugin whose import fails, as one needing a missing vendor toolkit does.
    "module_that_raises": "raise RuntimeError('CANN toolkit not found')",
    # A plugin that registers a taken name and an incomplete backend.
    "clashing_backends": """
        import tokenring
        from tokenring_cpu import CpuBackend

        class Clash(CpuBackend):
            pass

        class Incomplete:
            name = "incomplete"
            device_type = "cpu"

        @tokenring.hookimpl
        def tokenring_register_backends(register):
            register(Clash())          # name 'cpu' is taken
            register(Incomplete())     # no capabilities, probe, create_comm, create_kernel
    """,
    # A backend that loads fine and is wrong: lse 0 instead of -inf for rows
    # that see no key, the defect of a math fallback elsewhere.
    "lse_zero_backend": """
        import torch
        import tokenring
        from tokenring_cpu import CpuBackend
        from tokenring_cpu.kernel import CpuSdpaKernel

        class LseZeroKernel(CpuSdpaKernel):
            def forward(self, q, k, v, *, scale, mask):
                out, lse = super().forward(q, k, v, scale=scale, mask=mask)
                return out, torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)

        class LseZeroBackend(CpuBackend):
            name = "lse-zero"

            def create_kernel(self):
                return LseZeroKernel()

        @tokenring.hookimpl
        def tokenring_register_backends(register):
            register(LseZeroBackend())
    """,
}


def make_distribution(root, name, entry_points, modules):
    """A minimal installed distribution on ``root`` (a dist-info folder and modules)."""
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[tokenring.backends]\n{lines}\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    """A folder holding the distribution 'broken_plugin', on sys.path and PYTHONPATH."""
    make_distribution(
        tmp_path,
        "broken_plugin",
        {"broken": "module_that_raises", "clashing": "clashing_backends", "lse-zero": "lse_zero_backend"},
        BROKEN_PLUGIN_MODULES,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv("TOKENRING_PLUGINS", raising=False)
    monkeypatch.delenv("TOKENRING_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    return tmp_path
