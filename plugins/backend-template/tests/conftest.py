# The conformance suite's pytest plugin, and the name of the backend it tests.
import pytest

pytest_plugins = ["tokenring.testing.plugin"]


@pytest.fixture(scope="session")
def tokenring_backend_name():
    return "template-cpu"
