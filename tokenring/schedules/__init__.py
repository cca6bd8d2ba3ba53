"""The registered schedules: the one list every tool, test and plugin reads.

(Transitional stub: replaced by the registry-backed version in the plan-model change.)
"""

from __future__ import annotations


def schedule_names() -> tuple[str, ...]:
    """Names of every registered schedule, first-party ones first."""
    from ..plan import Algorithm

    return tuple(a.value for a in Algorithm)
