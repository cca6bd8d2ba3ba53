"""Argument types and problem checks shared by the commands (``tokenring run``, ``tokenring bench``).

Each type names what it expected; argparse puts the flag in front
(``argument --world-size: expected a positive integer, got 0``) and exits
with status 2. `check_problem` rejects, with the same exit status and the
flag's name, what no type can see alone: head counts that do not divide,
sequence lengths the layout cannot cut.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Callable, Sequence

from tokenring.placement.layout import chunks_per_rank, default_layout


def _number(convert: Callable[[str], float], expected: str, accept: Callable[[float], bool], name: str):
    """An argparse type: ``convert`` the text, then ``accept`` the value, or say what was ``expected``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    parse.__name__ = parse.__qualname__ = name
    return parse


positive_int = _number(int, "a positive integer", lambda value: value >= 1, "positive_int")
non_negative_int = _number(int, "an integer >= 0", lambda value: value >= 0, "non_negative_int")
positive_float = _number(
    float, "a finite positive number", lambda value: value > 0 and math.isfinite(value), "positive_float"
)
non_negative_float = _number(
    float, "a finite number >= 0", lambda value: value >= 0 and math.isfinite(value), "non_negative_float"
)


def comma_separated(kind: Callable[[str], object]) -> Callable[[str], list]:
    """A type for ``1,2,4``: each value checked by ``kind`` (one of the types above)."""

    def parse(text: str) -> list:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected comma-separated values, got {text!r}")
        try:
            return [kind(part) for part in parts]
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(f"in {text!r}: {error}") from None

    return parse


def check_problem(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    *,
    seq_lens: Sequence[int],
    layout: str | None = None,
) -> str:
    """Reject an impossible problem before any process starts; returns the resolved layout.

    Sets ``args.kv_heads`` (default: ``args.heads``) and ``args.threads_per_rank``
    (default: CPU count // world size, at least 1). ``layout`` None is the
    API's default for ``args.causal``.
    """
    if args.kv_heads is None:
        args.kv_heads = args.heads
    if args.heads % args.kv_heads:
        parser.error(f"argument --heads: {args.heads} must be a multiple of --kv-heads ({args.kv_heads})")
    layout = layout or default_layout(args.causal)
    chunks = args.world_size * chunks_per_rank(layout)
    for seq_len in seq_lens:
        if seq_len % chunks:
            parser.error(
                f"argument --seq-len: {seq_len} must be divisible by {chunks} for the {layout} layout "
                f"over {args.world_size} ranks"
            )
    if args.threads_per_rank is None:
        args.threads_per_rank = max(1, (os.cpu_count() or 1) // args.world_size)
    return layout
