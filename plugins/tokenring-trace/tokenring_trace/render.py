"""Turn recorded timelines into a Chrome trace or a Gantt chart."""

from __future__ import annotations

import glob
import json
import os

from tokenring.runtime.timeline import Timeline

_COLOURS = {"compute": "#4C72B0", "post": "#DD8452", "wait": "#C44E52", "merge": "#55A868"}


def load_timelines(directory: str, algorithm: str | None = None) -> list[Timeline]:
    """Every timeline recorded under ``directory`` (only ``algorithm``'s, if given), in rank and time order."""
    timelines = []
    for path in sorted(glob.glob(os.path.join(directory, "rank*.jsonl"))):
        with open(path, encoding="utf-8") as file:
            timelines += [Timeline.from_json(json.loads(line)) for line in file if line.strip()]
    if algorithm is not None:
        timelines = [t for t in timelines if t.algorithm == algorithm]
    if not timelines:
        which = f" of algorithm {algorithm!r}" if algorithm else ""
        raise FileNotFoundError(f"no rank*.jsonl timelines{which} under {directory!r} (was TOKENRING_TRACE_DIR set?)")
    return sorted(timelines, key=lambda t: (t.rank, t.start_s))


def chrome_trace(timelines: list[Timeline], last_calls: int | None = None) -> dict:
    """The Trace Event Format (complete events, microseconds): one process per rank, one thread per event kind."""
    timelines = _last(timelines, last_calls)
    origin = min(t.start_s for t in timelines)
    events = []
    lanes = {"compute": 1, "merge": 1, "post": 2, "wait": 3}
    for t in timelines:
        pass_name = "backward" if t.backward else "forward"
        for e in t.events:
            events.append({
                "name": f"{e.kind} {pass_name} step {e.step}",
                "cat": e.kind,
                "ph": "X",
                "pid": t.rank,
                "tid": lanes.get(e.kind, 4),
                "ts": (e.start_s - origin) * 1e6,
                "dur": max(e.seconds, 0.0) * 1e6,
                "args": {"algorithm": t.algorithm, "step": e.step, **e.detail},
            })
    ranks = sorted({t.rank for t in timelines})
    for rank in ranks:
        events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
        for name, tid in (("compute+merge", 1), ("post", 2), ("wait", 3)):
            events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": name}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _last(timelines: list[Timeline], calls: int | None) -> list[Timeline]:
    """Only the last ``calls`` passes of each rank (the steady state, after warm-up)."""
    if calls is None:
        return timelines
    by_rank: dict[int, list[Timeline]] = {}
    for t in timelines:
        by_rank.setdefault(t.rank, []).append(t)
    return [t for rank in sorted(by_rank) for t in by_rank[rank][-calls:]]


def gantt_png(timelines: list[Timeline], path: str, last_calls: int | None = None, title: str | None = None) -> None:
    """One row per rank: compute (blue), merge (green), waits (red), and posts as ticks; steps labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    timelines = _last(timelines, last_calls)
    origin = min(t.start_s for t in timelines)
    ranks = sorted({t.rank for t in timelines})
    fig, ax = plt.subplots(figsize=(12, 0.9 * len(ranks) + 1.6))
    for t in timelines:
        y = ranks.index(t.rank)
        for e in t.events:
            start_ms, width_ms = (e.start_s - origin) * 1e3, e.seconds * 1e3
            if e.kind == "post":
                ax.plot([start_ms, start_ms], [y - 0.42, y + 0.42], color=_COLOURS["post"], lw=1.2)
                continue
            height = 0.6 if e.kind == "compute" else 0.3
            ax.barh(y, width_ms, left=start_ms, height=height, color=_COLOURS[e.kind], edgecolor="none")
            if e.kind == "compute":
                ax.text(start_ms + width_ms / 2, y, str(e.step), ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(ranks)))
    ax.set_yticklabels([f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.legend(
        handles=[Patch(color=c, label=k if k != "post" else "post (messages start)") for k, c in _COLOURS.items()],
        loc="upper center", bbox_to_anchor=(0.5, -0.25 if len(ranks) < 3 else -0.12), ncol=4, fontsize=8,
    )
    passes = " then ".join(dict.fromkeys("backward" if t.backward else "forward" for t in timelines))
    algorithms = "/".join(sorted({t.algorithm for t in timelines}))
    ax.set_title(title or f"{algorithms} timeline ({passes}): block computes numbered by step, waits, merges")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
