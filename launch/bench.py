"""Benchmarks: `python launch/bench.py SUITE [options]`.

Each suite lives in `launch/benchmarks/<suite>.py` with `add_arguments(parser)` and `run(args) -> dict`.
A suite prints its figures as it goes (medians, and ratios against a baseline measured in the same
run); the last line printed here is one JSON object with everything, for scripts to read.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from pipeline.data import DataError

SUITES = ("bag", "data", "ffi", "heads", "launchers", "mp", "quality", "rp")


def load_suite(name: str):
    return importlib.import_module(f"launch.benchmarks.{name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="suite", required=True, metavar="SUITE")
    argv = sys.argv[1:] if argv is None else argv
    # import only the suite asked for: others may need packages a GPU machine lacks (horovod, ...)
    wanted = [argv[0]] if argv and argv[0] in SUITES else SUITES
    for name in wanted:
        suite = load_suite(name)
        suite.add_arguments(sub.add_parser(name, help=(suite.__doc__ or "").strip().splitlines()[0]))
    args = parser.parse_args(argv)
    try:
        figures = load_suite(args.suite).run(args)
    except DataError as exn:  # a missing or malformed input file: its name and line, no traceback
        print(f"bench {args.suite}: {exn}", file=sys.stderr)
        return 2
    print(json.dumps({"suite": args.suite, **figures}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
