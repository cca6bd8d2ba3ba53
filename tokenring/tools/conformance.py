"""Run the shared conformance suite against one installed backend.

    tokenring conformance --backend NAME [-- EXTRA PYTEST ARGS]

The suite is `tokenring.testing.suite`, run by pytest with the
`tokenring.testing.plugin` plugin, exactly as a backend's own test folder
runs it. The exit status is pytest's: 0 when everything passed or was
skipped, non-zero when anything failed.
"""

from __future__ import annotations

import argparse

SUITE_MODULE = "tokenring.testing.suite"
PLUGIN_MODULE = "tokenring.testing.plugin"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", required=True, help="name of the backend to test (see `tokenring backends`)")
    parser.add_argument(
        "pytest_args", nargs=argparse.REMAINDER,
        help="after `--`: extra arguments for pytest, e.g. -- -k kernel -x",
    )


def pytest_arguments(backend: str, extra: list[str]) -> list[str]:
    if extra and extra[0] == "--":
        extra = extra[1:]
    return [
        "-p", PLUGIN_MODULE,
        "-ra",
        "-p", "no:cacheprovider",  # the suite may live in site-packages: write nothing there
        f"--tokenring-backend={backend}",
        "--pyargs", SUITE_MODULE,
        *extra,
    ]


def command(args: argparse.Namespace) -> int:
    import pytest

    return int(pytest.main(pytest_arguments(args.backend, list(args.pytest_args))))
