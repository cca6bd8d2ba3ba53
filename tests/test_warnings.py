"""Only what the project means to say: no warning on a first run, none from pytest about the suite.

A newcomer's first `tokenring run` must not print torch's "Failed to
initialize NumPy" once per process, and the conformance suite, which runs in
other projects' CI, must not lean on anything pytest deprecates (pytest 10
refuses class-scoped fixtures written as instance methods, for one).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tokenring.testing.suite as suite

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def warning_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "Warning" in line or "NumPy" in line]


# -- a first run ---------------------------------------------------------------------


def test_tokenring_run_prints_no_warning_on_stderr():
    done = run("-m", "tokenring", "run", "--world-size", "2", "--seq-len", "128")
    assert done.returncode == 0, done.stdout + done.stderr
    assert warning_lines(done.stderr) == [], done.stderr
    assert "PASS" in done.stdout


def test_numpy_is_a_core_dependency():
    # torch runs without numpy but warns in every process that imports it; the test
    # extras bring numpy (through matplotlib), so only this check sees it missing.
    tomllib = pytest.importorskip("tomllib")
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    names = {re.match(r"[A-Za-z0-9._-]+", requirement).group().lower() for requirement in project["dependencies"]}
    assert "numpy" in names, project["dependencies"]


# -- pytest's deprecations and the conformance suite ----------------------------------


def test_the_suite_collects_and_sets_up_its_fixtures_without_pytest_deprecations():
    # Collects the whole suite, then runs one kernel test: its class-scoped fixtures
    # are set up, where pytest >= 9.1 warns about instance-method fixtures.
    done = run(
        "-m", "tokenring", "conformance", "--backend", "cpu", "--",
        "-q", "-W", "error::pytest.PytestDeprecationWarning", "-k", "test_views_of_a_shard_are_accepted",
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "1 passed" in done.stdout, output
    assert warning_lines(output) == [], output


def test_the_suite_class_scoped_fixtures_are_classmethods():
    # The same rule, whatever pytest is installed here: a fixture wider than a test,
    # defined in a test class, takes no instance (pytest 10 refuses one that does).
    offenders = []
    for cls in ast.parse(Path(suite.__file__).read_text()).body:
        if not isinstance(cls, ast.ClassDef):
            continue
        for method in cls.body:
            if not isinstance(method, ast.FunctionDef):
                continue
            decorators = [ast.unparse(d) for d in method.decorator_list]
            fixture = next((d for d in decorators if d.startswith("pytest.fixture")), None)
            if fixture is None or "scope=" not in fixture or "scope='function'" in fixture:
                continue
            if not {"classmethod", "staticmethod"} & set(decorators):
                offenders.append(f"{cls.name}.{method.name}")
    assert offenders == [], f"class-scoped fixtures defined as instance methods: {offenders}"


def test_the_plugin_makes_pytest_deprecations_errors_in_the_suite_tests_only(tmp_path):
    # An outsider's test folder: the plugin, the suite's kernel tests imported, a test of
    # its own, and an autouse fixture that raises a pytest deprecation in every test.
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(textwrap.dedent("""
        import warnings
        import pytest

        pytest_plugins = ["tokenring.testing.plugin"]

        @pytest.fixture(scope="session")
        def tokenring_backend_name():
            return "cpu"

        @pytest.fixture(autouse=True)
        def deprecated_thing():
            warnings.warn(pytest.PytestDeprecationWarning("something pytest deprecates"))
    """))
    (tmp_path / "test_outsider.py").write_text(textwrap.dedent("""
        from tokenring.testing.suite import TestKernelContract  # noqa: F401

        def test_of_its_own():
            pass
    """))
    done = run(
        "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-k", "test_views_of_a_shard_are_accepted or test_of_its_own",
        cwd=tmp_path,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "ERROR test_outsider.py::TestKernelContract::test_views_of_a_shard_are_accepted" in output, output
    assert "PytestDeprecationWarning: something pytest deprecates" in output, output
    assert "PASSED test_outsider.py::test_of_its_own" in output, output
