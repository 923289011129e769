"""The stage task's CPU time per small file, this tree against another (BENCH_OTHER).

The stage task alone (`python -m batchingest.tasks.stage` in a job folder, as the
processor runs it; no service), on FILES files of 4 KiB in FOLDERS folders
(_copyfloors.py: 10,000 in 100 at BENCH_SCALE=1) into an empty staging area, and on one
file of them (its start-up: interpreter, imports, probe, progress files). CPU per file
is (CPU of the whole run - CPU of the one-file run) / (FILES - 1), user + system of the
task (getrusage of children), which moves far less with others' load than wall time.
The trees' runs alternate run by run, each on a drained disk, the order rotating.

    BENCH_OTHER=/tmp/base-tree BENCH_RUNS=5 .venv/bin/python scripts/bench.d/stage_cpu.py

BENCH_RUNS (default 5), BENCH_SCALE, BENCH_DIR: see _copyfloors.py. Without BENCH_OTHER
only this tree is measured.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import _copyfloors as cf

TREE = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(TREE))

from batchingest.staging import Resolver, manifest_bytes  # noqa: E402


def job_with(base: Path, name: str, ids: list[str], archive: Path, staging: Path) -> Path:
    job = base / "root" / name
    job.mkdir(parents=True)
    entries, _, unresolved = Resolver(archive).resolve(ids)
    assert not unresolved
    (job / "MANIFEST.json").write_bytes(manifest_bytes(entries, archive, staging, name))
    return job


def step(tree: Path, job: Path, archive: Path, staging: Path, run: int) -> cf.Timed:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONSAFEPATH="1", JOBPATH=str(job),
               JOBNAME=job.name, BATCHINGEST_ARCHIVE=str(archive),
               BATCHINGEST_STAGING=str(staging))  # fmt: skip
    shutil.rmtree(staging)
    staging.mkdir()
    cmd = [sys.executable, "-m", "batchingest.tasks.stage"]
    cf.DRAINS.drain()
    cpu = cf.children_cpu()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=job, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"stage failed in {tree}: {p.stdout[-2000:]}")
    return cf.Timed(time.perf_counter() - t0, cf.children_cpu() - cpu)


def main() -> None:
    trees = cf.trees(TREE)
    base = Path(tempfile.mkdtemp(prefix="bench-stage-cpu-", dir=os.environ.get("BENCH_DIR")))
    try:
        archive, staging = base / "archive", base / "staging"
        staging.mkdir()
        ids = cf.make_tree(archive / "tree")
        many = job_with(base, "many", ids, archive, staging)
        one = job_with(base, "one", ids[:1], archive, staging)
        steps: dict[str, Callable[[int], cf.Timed]] = {}
        for name, tree in trees.items():
            for label, job in ((f"{cf.FILES} files", many), ("1 file", one)):
                steps[f"{name}: {label}"] = partial(step, tree, job, archive, staging)
        series = cf.interleave(cf.RUNS, steps, lambda: None)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    report(trees, series)


def report(trees: dict[str, Path], series: dict[str, cf.Series]) -> None:
    print(f"## The stage task's CPU per file ({cf.RUNS} runs, interleaved, {os.cpu_count()} "
          f"cores; {cf.FILES:,} x 4 KiB in {cf.FOLDERS} folders)")  # fmt: skip
    print()
    print("| tree | CPU of the run, s | CPU of one file's run, s | CPU per file, µs "
          "(min / median / max, run by run) | wall of the run, s |")  # fmt: skip
    print("|---|---|---|---|---|")
    per_file: dict[str, list[float]] = {}
    for name, tree in trees.items():
        many, one = series[f"{name}: {cf.FILES} files"], series[f"{name}: 1 file"]
        per_file[name] = [(m - o) / (cf.FILES - 1) for m, o in zip(many.cpu, one.cpu, strict=True)]
        print(f"| {name} ({tree}) | {cf.mmm(many.cpu)} | {cf.mmm(one.cpu)} | "
              f"{cf.mmm(per_file[name], 1e6, digits=1)} | {cf.mmm(many.seconds)} |")  # fmt: skip
    if len(trees) == 2:
        ours, other = per_file["this tree"], per_file["BENCH_OTHER"]
        paired = sorted(o / b for o, b in zip(ours, other, strict=True))
        med = statistics.median(ours) / statistics.median(other)
        print()
        print(f"this tree's CPU per file / BENCH_OTHER's: {med:.2f}x of the medians "
              f"(run by run {cf.mmm(paired)})")  # fmt: skip


if __name__ == "__main__":
    main()
