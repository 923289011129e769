"""Idle memory: VmRSS of the service shortly after start, on an empty jobs root.

Each run starts the real service (`batchingest serve`, as `scripts/bench api` does:
`--no-processor --log-level warning`, and the default `serve` with its processor) on a
new empty root, waits for GET /healthz, waits BENCH_WAIT seconds (1 by default) and reads
VmRSS from /proc/PID/status, then stops it. With BENCH_OTHER (another tree, e.g. `git
archive main` unpacked) the other tree's service is started too, alternating run by run,
so both see the same load. Reported: min-median-max per variant, and whether the median
meets the target of 35 MiB.

Environment: BENCH_RUNS (default 5), BENCH_WAIT (default 1), BENCH_OTHER.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from api import rss_mib
from live_service import Service

RUNS = int(os.environ.get("BENCH_RUNS", "5"))
WAIT = float(os.environ.get("BENCH_WAIT", "1"))
OTHER = os.environ.get("BENCH_OTHER", "")
HERE = str(Path(__file__).resolve().parents[2])
TARGET = 35.0  # MiB, issue 15
VARIANTS = {"serve --no-processor": ("--no-processor",), "serve (default)": ()}


def idle_rss(tree: str, args: tuple[str, ...]) -> float:
    env = {"PYTHONPATH": tree}
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
        root = Path(tmp) / "root"
        svc = Service(root, *args, "--log-level", "warning", env=env).start()
        try:
            time.sleep(WAIT)
            assert svc.proc is not None
            return rss_mib(svc.proc.pid, "VmRSS")
        finally:
            svc.stop()


def main() -> None:
    # `python -m` puts the current folder first on the service's path, before
    # PYTHONPATH: started from a checkout, every service would run that checkout's code
    os.chdir(tempfile.gettempdir())
    trees = {"this tree": HERE} | ({"other": OTHER} if OTHER else {})
    got: dict[tuple[str, str], list[float]] = {}
    for run in range(RUNS):
        order = list(trees.items())
        if run % 2:
            order.reverse()
        for variant, args in VARIANTS.items():
            for name, tree in order:
                got.setdefault((variant, name), []).append(idle_rss(tree, args))
    print(f"## Idle RSS ({RUNS} starts each, VmRSS {WAIT:g} s after /healthz answers)\n")
    print("| service | tree | min | median | max | target | met (median) |")
    print("|---|---|---|---|---|---|---|")
    for (variant, name), values in got.items():
        low, mid, high = min(values), statistics.median(values), max(values)
        cells = " | ".join(f"{v:.1f} MiB" for v in (low, mid, high))
        met = "yes" if mid <= TARGET else "no"
        print(f"| {variant} | {name} | {cells} | <= {TARGET:g} MiB | {met} |")


if __name__ == "__main__":
    main()
