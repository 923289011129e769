"""The staging resolver's CPU time per id (what POST /dts/staging costs the API process
before the job is created), this tree against another (BENCH_OTHER).

10,000 ids naming empty files in 100 archive folders, resolved in a fresh interpreter
per tree and run (5 resolves each, after one warm-up), the ids grouped by folder as the
DTS sends them, and shuffled (every id in another folder than the one before: the
resolver keeps only a few folders open a request). CPU is the process's own
(time.process_time), which moves far less with others' load than wall time; the trees
alternate run by run.

    BENCH_OTHER=/tmp/base-tree BENCH_RUNS=5 .venv/bin/python scripts/bench.d/resolve_cpu.py

Without BENCH_OTHER only this tree is measured.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import _copyfloors as cf

TREE = Path(__file__).resolve().parents[2]
RUNS = int(os.environ.get("BENCH_RUNS", "5"))
FOLDERS, PER_FOLDER, ROUNDS = 100, 100, 5

RESOLVE = """
import random, sys, time
from pathlib import Path
from batchingest.staging import Resolver
archive, ids_file, order, rounds = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
ids = Path(ids_file).read_text().split()
if order == "shuffled":
    random.Random(1).shuffle(ids)
resolver = Resolver(archive)
resolver.resolve(ids)
t = time.process_time()
for _ in range(rounds):
    entries, invalid, unresolved = resolver.resolve(ids)
    assert len(entries) == len(ids) and not invalid and not unresolved
print((time.process_time() - t) / rounds / len(ids))
"""


def per_id(tree: Path, archive: Path, ids_file: Path, order: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONSAFEPATH="1")
    argv = [sys.executable, "-c", RESOLVE, str(archive), str(ids_file), order, str(ROUNDS)]
    p = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return float(p.stdout)


def main() -> None:
    trees = cf.trees(TREE)
    base = Path(tempfile.mkdtemp(prefix="bench-resolve-", dir=os.environ.get("BENCH_DIR")))
    try:
        ids = []
        for d in range(FOLDERS):
            (base / "archive" / f"d{d:03d}").mkdir(parents=True)
            for f in range(PER_FOLDER):
                (base / "archive" / f"d{d:03d}" / f"f{f}").touch()
                ids.append(f"d{d:03d}/f{f}")
        (base / "ids").write_text("\n".join(ids))
        series: dict[tuple[str, str], list[float]] = {}
        for run in range(RUNS):
            for order in ("grouped", "shuffled"):
                names = list(trees) if run % 2 == 0 else list(reversed(trees))
                for name in names:
                    cpu = per_id(trees[name], base / "archive", base / "ids", order)
                    series.setdefault((name, order), []).append(cpu)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"## The staging resolver's CPU per id ({RUNS} runs, trees alternating; "
          f"{FOLDERS * PER_FOLDER:,} ids in {FOLDERS} folders)")  # fmt: skip
    print()
    print("| tree | ids | CPU per id, µs (min / median / max) |")
    print("|---|---|---|")
    for (name, order), xs in series.items():
        print(f"| {name} ({trees[name]}) | {order} | {cf.mmm(xs, 1e6)} |")
    if len(trees) == 2:
        print()
        for order in ("grouped", "shuffled"):
            ours, other = series[("this tree", order)], series[("BENCH_OTHER", order)]
            med = statistics.median(ours) / statistics.median(other)
            paired = [o / b for o, b in zip(ours, other, strict=True)]
            print(f"{order}: this tree / BENCH_OTHER {med:.2f}x of the medians "
                  f"(run by run {cf.mmm(paired)})")  # fmt: skip


if __name__ == "__main__":
    main()
