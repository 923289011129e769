"""Deadline pass benchmark: CPU of one `QueuedDeadlines.expire` with many jobs queued.

A temporary root with BENCH_JOBS jobs in queue/ (each a JOB without a deadline, the
default deadline set, so every job's deadline is looked at). One child process per run
builds the root, runs the first pass (every JOB read) and then BENCH_PASSES passes more
(what every --poll-interval costs), CPU time from getrusage around each. With
BENCH_OTHER=/path/to/older/checkout the same runs of that tree alternate with ours.

Environment: BENCH_RUNS (default 3), BENCH_JOBS (default 10000), BENCH_PASSES (default 5),
BENCH_OTHER (default none).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, os, resource, sys, tempfile, time
from pathlib import Path
from batchingest import control
from batchingest.store import Store

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

jobs, passes = int(sys.argv[1]), int(sys.argv[2])
with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp) / "root"
    Store(root).init()
    for i in range(jobs):
        (root / "queue" / f"j{i:06d}").mkdir()
        (root / "queue" / f"j{i:06d}" / "JOB").write_text('{"Todo": ["start"]}')
    deadlines = control.QueuedDeadlines(Store(root), default=3600.0)
    later = time.time() + 10
    took = []
    for _ in range(passes + 1):
        t = cpu()
        deadlines.expire(now=later)
        took.append(cpu() - t)
    print(json.dumps(took))
"""


def run(tree: str, jobs: int, passes: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": tree}
    # run from the tree: "-c" puts the working directory first on the path
    out = subprocess.run([sys.executable, "-c", CHILD, str(jobs), str(passes)], env=env, cwd=tree,
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return [t * 1000 for t in json.loads(out)]


def spread(values: list[float]) -> str:
    return f"{min(values):.0f}-{statistics.median(values):.0f}-{max(values):.0f}"


def main() -> None:
    runs = int(os.environ.get("BENCH_RUNS", "3"))
    jobs = int(os.environ.get("BENCH_JOBS", "10000"))
    passes = int(os.environ.get("BENCH_PASSES", "5"))
    trees = {"this tree": str(Path(__file__).resolve().parents[2])}
    if os.environ.get("BENCH_OTHER"):
        trees["BENCH_OTHER"] = os.environ["BENCH_OTHER"]
    first: dict[str, list[float]] = {k: [] for k in trees}
    later: dict[str, list[float]] = {k: [] for k in trees}
    for _ in range(runs):
        for kind, tree in trees.items():  # alternating, run by run
            took = run(tree, jobs, passes)
            first[kind].append(took[0])
            later[kind].extend(took[1:])
    print(f"## Deadline pass, {jobs} queued jobs, {runs} runs, CPU ms (min-median-max)\n")
    print("| tree | first pass | each later pass |")
    print("|---|---|---|")
    for kind in trees:
        print(f"| {kind} | {spread(first[kind])} | {spread(later[kind])} |")


if __name__ == "__main__":
    main()
