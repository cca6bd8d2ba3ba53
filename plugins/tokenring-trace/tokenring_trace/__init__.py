"""Record TokenRing's timeline to files; turn them into a Chrome trace and a Gantt chart.

Switched on by the environment variable ``TOKENRING_TRACE_DIR`` in the ranks'
processes: each rank appends one JSON line per pass (forward or backward) of
every attention call to ``$TOKENRING_TRACE_DIR/rank<r>.jsonl``. Without the
variable, the entry point's object implements no hook at all, so TokenRing
records nothing (the executor checks once per pass whether anyone listens).

Then ``tokenring-trace DIR --json trace.json --png gantt.png`` writes a
Chrome/Perfetto trace (open it at https://ui.perfetto.dev or
chrome://tracing) and a PNG Gantt chart with one row per rank.
"""

from __future__ import annotations

import json
import os

import tokenring

from .render import chrome_trace, gantt_png, load_timelines

__all__ = ["chrome_trace", "gantt_png", "load_timelines", "plugin", "Tracer"]

ENV = "TOKENRING_TRACE_DIR"


class Tracer:
    """Appends each timeline this process sees to ``<directory>/rank<r>.jsonl``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)

    @tokenring.hookimpl
    def tokenring_timeline(self, timeline):
        path = os.path.join(self.directory, f"rank{timeline.rank}.jsonl")
        with open(path, "a", encoding="utf-8") as file:
            file.write(json.dumps(timeline.to_json()) + "\n")


class _Off:
    """Tracing switched off: no hook implemented, nothing recorded anywhere."""


def _plugin():
    directory = os.environ.get(ENV)
    return Tracer(directory) if directory else _Off()


# The entry point names this object; it is made when TokenRing first loads its plugins.
plugin = _plugin()
