#!/usr/bin/env python3
"""Run pyvmm's fuzz targets (tests/fuzz/targets.py) for longer than the suite does.

    scripts/fuzz.py --minutes N [--target NAME]

The time is shared equally between the targets; for each it prints the executions and
the failures (a failure: the falsifying input and its traceback, shrunk by hypothesis).
Exit status 1 if any target failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hypothesis import HealthCheck, given, settings  # noqa: E402

from tests.fuzz.targets import TARGETS  # noqa: E402


def fuzz(name: str, seconds: float) -> tuple[int, int]:
    """Fuzz one target for about ``seconds``; returns (executions, failures)."""
    strategy, check = TARGETS[name]
    count = [0]
    end = time.monotonic() + seconds

    def counted(value):
        count[0] += 1
        check(value)

    failures = 0
    while time.monotonic() < end:
        run = settings(max_examples=200,   # small batches: the time is checked between them
                       deadline=None, database=None,
                       suppress_health_check=list(HealthCheck))(given(strategy)(counted))
        try:
            run()
        except Exception:
            failures += 1
            traceback.print_exc()
    return count[0], failures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=1.0)
    p.add_argument("--target", choices=sorted(TARGETS), action="append")
    args = p.parse_args()
    names = args.target or sorted(TARGETS)
    per = args.minutes * 60 / len(names)
    failed = 0
    print(f"{'target':<10} {'executions':>10} {'failures':>8}")
    for name in names:
        n, f = fuzz(name, per)
        failed += f
        print(f"{name:<10} {n:>10} {f:>8}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
