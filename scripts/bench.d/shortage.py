"""Jobs through a processor short of descriptors: 4 workers under `prlimit --nofile=N`.

Each run drops JOBS jobs (one `true` task each) into queue/ of a fresh root and times
until every one has landed, against the same tree with no limit (the floor), run by run
interleaved. With BENCH_OTHER=/path/to/other/checkout that tree runs under the same
limit too (say, the tree before the shortage was handled): a run that does not finish
within BENCH_TIMEOUT seconds (default 120) counts as stalled.

    BENCH_RUNS=3 BENCH_OTHER=/work/main .venv/bin/python scripts/bench.d/shortage.py

BENCH_NOFILE (default 40), BENCH_RUNS (default 3).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TREE = Path(__file__).resolve().parents[2]
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
NOFILE = int(os.environ.get("BENCH_NOFILE", "40"))
TIMEOUT = float(os.environ.get("BENCH_TIMEOUT", "120"))
JOBS = 60
WORKERS = 4


def fresh_root(base: Path) -> Path:
    root = Path(tempfile.mkdtemp(dir=base))
    for state in ("data", "queue", "processing", "success", "error", "tasks"):
        (root / state).mkdir()
    os.symlink(shutil.which("true") or "/bin/true", root / "tasks" / "true")
    for i in range(JOBS):
        job = root / f".j{i:03d}"
        job.mkdir()
        (job / "JOB").write_text('{"Todo": ["true"]}')
    return root


def landed(root: Path) -> int:
    return len(os.listdir(root / "success")) + len(os.listdir(root / "error"))


def seconds(base: Path, tree: Path, nofile: int | None) -> float | None:
    """Seconds until every job landed; None if not within TIMEOUT (stalled)."""
    root = fresh_root(base)
    prefix = ["prlimit", f"--nofile={nofile}", "--"] if nofile else []
    cmd = [*prefix, sys.executable, "-m", "batchingest.cli", "serve", "--root", str(root),
           "--no-api", "--log-level", "error", "--workers", str(WORKERS)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.Popen(cmd, env=env, cwd=tree, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # started and idle
        t0 = time.monotonic()
        for i in range(JOBS):
            os.rename(root / f".j{i:03d}", root / "queue" / f"j{i:03d}")
        while landed(root) < JOBS:
            if time.monotonic() - t0 > TIMEOUT:
                return None
            time.sleep(0.01)
        return time.monotonic() - t0
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def summary(values: list[float | None]) -> str:
    done = sorted(v for v in values if v is not None)
    stalled = len(values) - len(done)
    text = "-"
    if done:
        text = " / ".join(f"{v:.1f}" for v in (done[0], statistics.median(done), done[-1]))
    return text + (f" ({stalled} of {len(values)} stalled)" if stalled else "")


def main() -> None:
    other = os.environ.get("BENCH_OTHER")
    kinds: list[tuple[str, Path, int | None]] = [
        ("no limit (floor)", TREE, None),
        (f"this tree, --nofile={NOFILE}", TREE, NOFILE),
    ]
    if other:
        kinds.append((f"{other}, --nofile={NOFILE}", Path(other), NOFILE))
    results: dict[str, list[float | None]] = {name: [] for name, _, _ in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(RUNS):
            for name, tree, nofile in kinds:
                results[name].append(seconds(Path(tmp), tree, nofile))
    floor = statistics.median(v for v in results[kinds[0][0]] if v is not None)
    print(f"## {JOBS} jobs, {WORKERS} workers, {RUNS} runs: seconds min / median / max")
    print()
    print("| tree | seconds | median vs floor |")
    print("|---|---|---|")
    for name, values in results.items():
        done = [v for v in values if v is not None]
        ratio = f"{statistics.median(done) / floor:.1f}x" if done else "-"
        print(f"| {name} | {summary(values)} | {ratio} |")


if __name__ == "__main__":
    main()
