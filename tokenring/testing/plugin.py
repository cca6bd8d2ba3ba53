"""The pytest plugin behind the conformance suite.

Load it with ``-p tokenring.testing.plugin`` or, in a backend's own
``conftest.py``, with ``pytest_plugins = ["tokenring.testing.plugin"]``.

Options:

``--tokenring-backend NAME``
    The registered backend under test. A backend's conftest may instead
    override the ``tokenring_backend_name`` fixture.
``--tokenring-world-sizes 1,2,3,4``
    World sizes for the multi-rank tests (default 1,2,3,4). Sizes above the
    backend's ``Capabilities.max_world_size`` or ``Backend.device_count()``
    are skipped with a reason.

Fixtures (the names are API, see CHANGELOG.md):

``tokenring_backend_name``
    The name of the backend under test.
``tokenring_backend``
    The `tokenring.Backend` object. The kernel contract uses only this
    fixture, in the test process, so a conftest may override it with an
    unregistered backend object (a kernel bound to a specification, say).
``tokenring_worlds``
    A session-wide pool of local worlds, one per world size, whose ranks run
    the backend by name (with ``TOKENRING_BACKEND`` set to it, so that it is
    also the one chosen by device type); a world a test broke is restarted on
    next use.
``tokenring_seed``
    A fresh random seed per test, printed with every failure.

Warnings: pytest's deprecation warnings (``PytestDeprecationWarning``, the
parent of ``PytestRemovedIn10Warning`` and its successors) raised while one
of the suite's own tests runs (set-up, call, tear-down) are errors, so a
suite that would break on the next pytest fails here first. Only the
suite's tests get that filter; a backend's other tests keep their own.
"""

from __future__ import annotations

import random

import pytest

from tokenring.interfaces import Backend, BackendError
from tokenring.tools.launch import LocalWorld

DEFAULT_WORLD_SIZES = (1, 2, 3, 4)
# The module whose tests get SUITE_WARNING_FILTERS (not imported here: it is collected, or imported by a test module).
SUITE_MODULE = "tokenring.testing.suite"
# Deprecations pytest raises about the suite's own code: errors, so CI sees them before pytest's next major release.
SUITE_WARNING_FILTERS = ("error::pytest.PytestDeprecationWarning",)
# Short enough that a hang fails a test quickly, long enough for a loaded 2-core machine.
WORKER_TIMEOUT_S = 30.0


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tokenring", "TokenRing conformance suite")
    group.addoption("--tokenring-backend", metavar="NAME", help="name of the backend under test")
    group.addoption(
        "--tokenring-world-sizes", metavar="SIZES", default=",".join(map(str, DEFAULT_WORLD_SIZES)),
        help="comma-separated world sizes for multi-rank tests (default: %(default)s)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "tokenring_world_size(n): a multi-rank test at world size n (skipped above the backend's limit)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    strict = pytest.mark.filterwarnings(*SUITE_WARNING_FILTERS)
    for item in items:
        if is_suite_test(item):
            item.add_marker(strict)


def is_suite_test(item: pytest.Item) -> bool:
    """Whether ``item`` is one of the suite's tests, collected from the suite or from a module importing its classes."""
    function = getattr(item, "function", None)
    return getattr(function, "__module__", None) == SUITE_MODULE


def requested_world_sizes(config: pytest.Config) -> list[int]:
    text = config.getoption("--tokenring-world-sizes")
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise pytest.UsageError(f"--tokenring-world-sizes: expected comma-separated integers, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise pytest.UsageError(f"--tokenring-world-sizes: expected positive integers, got {text!r}")
    return sizes


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "world_size" in metafunc.fixturenames and not _parametrized(metafunc, "world_size"):
        sizes = requested_world_sizes(metafunc.config)
        metafunc.parametrize("world_size", sizes, ids=[f"N{n}" for n in sizes])


def _parametrized(metafunc: pytest.Metafunc, name: str) -> bool:
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0]
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        if name in names:
            return True
    return False


@pytest.fixture(scope="session")
def tokenring_backend_name(request: pytest.FixtureRequest) -> str:
    name = request.config.getoption("--tokenring-backend")
    if not name:
        pytest.fail(
            "no backend under test: pass --tokenring-backend NAME (or use `tokenring conformance --backend NAME`), "
            "or override the tokenring_backend_name fixture in your conftest.py",
            pytrace=False,
        )
    return name


@pytest.fixture(scope="session")
def tokenring_backend(tokenring_backend_name: str) -> Backend:
    from tokenring.registry import registry

    try:
        return registry.get(tokenring_backend_name)
    except BackendError as exc:
        # An unusable backend fails its conformance run; it is never skipped.
        pytest.fail(f"backend under test cannot be used: {exc}", pytrace=False)


class WorldPool:
    """One `LocalWorld` per world size for the whole session, restarted when a test broke it."""

    def __init__(self, backend_name: str, backend: Backend) -> None:
        self.backend_name = backend_name
        self.backend = backend
        self._worlds: dict[int, LocalWorld] = {}

    def limit(self) -> tuple[int | None, str]:
        """The largest world size this backend runs here, and why (None: no limit)."""
        limits = []
        if self.backend.capabilities.max_world_size is not None:
            limits.append((self.backend.capabilities.max_world_size, "Capabilities.max_world_size"))
        count = self.backend.device_count()
        if count is not None:
            limits.append((count, "device_count() on this machine"))
        return min(limits) if limits else (None, "")

    def get(self, world_size: int) -> LocalWorld:
        """A running world of ``world_size`` ranks, or a skip naming the backend and its limit."""
        most, why = self.limit()
        if most is not None and world_size > most:
            pytest.skip(f"backend {self.backend_name!r}: world size {world_size} is above its {why} = {most}")
        world = self._worlds.get(world_size)
        if world is None or world.closed:
            world = LocalWorld(
                world_size,
                tokenring_backend=self.backend_name,
                threads_per_rank=1,
                # The backend under test is also the one chosen by device type,
                # even where another installed backend serves the same device.
                env={"TOKENRING_TIMEOUT_S": str(WORKER_TIMEOUT_S), "TOKENRING_BACKEND": self.backend_name},
            )
            self._worlds[world_size] = world
        return world

    def discard(self, world_size: int) -> None:
        """Shut down a world whose state a test has disturbed; the next `get` starts a fresh one."""
        world = self._worlds.pop(world_size, None)
        if world is not None:
            world.close()

    def close(self) -> None:
        for world in self._worlds.values():
            world.close()
        self._worlds.clear()


@pytest.fixture(scope="session")
def tokenring_worlds(tokenring_backend_name: str, tokenring_backend: Backend):
    pool = WorldPool(tokenring_backend_name, tokenring_backend)
    yield pool
    pool.close()


@pytest.fixture
def tokenring_seed() -> int:
    """A fresh seed per test; failure messages include it (inside the Problem), so a failure can be replayed."""
    return random.randrange(2**31)
