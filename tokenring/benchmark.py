"""``tokenring bench``: placeholder while the side-by-side benchmark is written."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` subcommand's options to ``parser``."""


def command(args: argparse.Namespace) -> int:
    print("tokenring bench: not available yet", file=sys.stderr)
    return 2
