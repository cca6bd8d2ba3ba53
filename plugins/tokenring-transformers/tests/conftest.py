"""Worker processes shared by the plugin's test files: one LocalWorld per world size, spawned once."""

import random

import pytest

from tokenring.tools.launch import LocalWorld


@pytest.fixture(scope="session")
def worlds():
    opened: dict[int, LocalWorld] = {}

    def get(world_size: int) -> LocalWorld:
        if world_size not in opened or opened[world_size].closed:
            opened[world_size] = LocalWorld(world_size, threads_per_rank=1,
                                            env={"TOKENRING_TIMEOUT_S": "60", "TOKENRING_BACKEND": "cpu"})
        return opened[world_size]

    yield get
    for world in opened.values():
        world.close()


@pytest.fixture
def seed():
    return random.randrange(2**31)
