"""The printed plans of the first-party schedules, pinned.

Each first-party schedule has a file tests/golden/plans/NAME.txt holding its
plans (forward and backward, a few layouts and world sizes) exactly as
``tokenring plan`` prints them. A change to a builder, the backward
derivation or the printed form shows up here as a diff. After a deliberate
change: ``TOKENRING_UPDATE_GOLDEN=1 python -m pytest tests/test_golden_plans.py``.
"""

import os
from pathlib import Path

import pytest

from tokenring.plan.model import ProblemShape
from tokenring.registry import CORE_DISTRIBUTION, registry
from tokenring.schedules.build import build_plan

GOLDEN = Path(__file__).parent / "golden" / "plans"
CASES = [("contiguous", False, 3), ("contiguous", True, 4), ("zigzag", True, 3), ("zigzag", True, 4)]
SHAPE = ProblemShape(batch=1, seq_local=64, q_heads=8, kv_heads=2, head_dim=64, itemsize=2)


def first_party() -> list[str]:
    return [e.name for e in registry.schedule_entries()
            if e.schedule is not None and e.distribution.split()[0] == CORE_DISTRIBUTION]


def printed(name: str) -> str:
    parts = []
    for layout, causal, n in CASES:
        for backward in (False, True):
            parts.append(build_plan(name, layout, causal, n, backward=backward).describe(SHAPE))
    return "\n\n".join(parts) + "\n"


@pytest.mark.parametrize("name", first_party())
def test_printed_plans_match_the_golden_file(name):
    path = GOLDEN / f"{name}.txt"
    text = printed(name)
    if os.environ.get("TOKENRING_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"no golden file for schedule {name!r}: run with TOKENRING_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"the plans of {name!r} changed; see {path}"


def test_every_golden_file_belongs_to_a_schedule():
    assert sorted(p.stem for p in GOLDEN.glob("*.txt")) == sorted(first_party())
