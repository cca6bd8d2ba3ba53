import random

import pytest

from tokenring.launch import LocalWorld

# Short enough that a hang fails a test quickly, long enough for a loaded 2-core CI machine.
WORKER_TIMEOUT_S = "30"


class Worlds:
    """One LocalWorld per world size for the whole session, restarted if a test broke it."""

    def __init__(self) -> None:
        self._worlds: dict[int, LocalWorld] = {}

    def get(self, world_size: int) -> LocalWorld:
        world = self._worlds.get(world_size)
        if world is None or world.closed:
            world = LocalWorld(world_size, threads_per_rank=1, env={"TOKENRING_TIMEOUT_S": WORKER_TIMEOUT_S})
            self._worlds[world_size] = world
        return world

    def close(self) -> None:
        for world in self._worlds.values():
            world.close()


@pytest.fixture(scope="session")
def worlds():
    pool = Worlds()
    yield pool
    pool.close()


@pytest.fixture
def seed():
    """A fresh seed per test; it is in the failure message, so a failure can be replayed."""
    return random.randrange(2**31)
