"""``tokenring-trace DIR [--json trace.json] [--png gantt.png] [--last N]``."""

from __future__ import annotations

import argparse
import json
import sys

from tokenring.schedules.build import schedule_names

from .render import chrome_trace, gantt_png, load_timelines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tokenring-trace", description=__doc__)
    parser.add_argument("directory", help="the TOKENRING_TRACE_DIR the ranks wrote to")
    parser.add_argument("--json", metavar="PATH", help="write a Chrome/Perfetto trace here")
    parser.add_argument("--png", metavar="PATH", help="write a Gantt chart here (needs matplotlib)")
    parser.add_argument("--last", type=int, metavar="N", help="only each rank's last N passes")
    parser.add_argument("--algorithm", choices=schedule_names(), help="only this algorithm's passes")
    parser.add_argument("--title", help="chart title")
    args = parser.parse_args(argv)
    try:
        timelines = load_timelines(args.directory, args.algorithm)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(chrome_trace(timelines, args.last), file)
    if args.png:
        gantt_png(timelines, args.png, args.last, args.title)
    print(f"{len(timelines)} timelines from {len({t.rank for t in timelines})} ranks", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
