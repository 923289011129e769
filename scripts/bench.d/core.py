"""Processor benchmarks: pickup latency and job throughput.

Pickup latency: from the rename into queue/ to the first instruction of the job's first
task (bash's $EPOCHREALTIME, no fork). Throughput: 500 queued jobs, each running `true`,
for --workers 1, 2 and 4, next to the same number of bare fork+exec of `true` from one
Python loop in the same run (the floor a processor cannot beat).

    BENCH_OTHER=/path/to/other/checkout .venv/bin/python scripts/bench.d/core.py

compares this tree with another instead: --workers 2 only, runs alternating between the
two trees (each service started with PYTHONPATH set to its tree), jobs/s and the
service process's own CPU per job (from /proc, its threads but not the tasks), which
other load on the machine disturbs far less than the rate; and the pickup latency of
each. BENCH_RUNS rounds (default 3). BENCH_DIR puts the jobs roots in another folder:
BENCH_DIR=/dev/shm (tmpfs) leaves out what creating files costs the disk at the moment,
which swings with what was deleted there in the last half minute (ext4 without a journal
passes over recently freed inodes when it allocates one), so the service's own CPU per
job is far steadier there.
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

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
TREE = Path(__file__).resolve().parents[2]
JOBS = 500
LATENCY_SAMPLES = 60


def start_service(
    root: Path, *args: str, tree: Path = TREE, settle: float = 1.0
) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batchingest.cli",
            "serve",
            "--root",
            str(root),
            "--no-api",
            "--log-level",
            "warning",
            *args,
        ],
        stderr=subprocess.DEVNULL,
        # `python -m` puts the working folder first on the path, ahead of PYTHONPATH:
        # without PYTHONSAFEPATH a run started in a checkout runs that checkout's code
        env={**os.environ, "PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"},
    )
    time.sleep(settle)  # started and idle
    return proc


def stop_service(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(30)


def fresh_root(base: Path) -> Path:
    root = Path(tempfile.mkdtemp(dir=base))
    for state in ("data", "queue", "processing", "success", "error", "tasks"):
        (root / state).mkdir()
    return root


def cpu_seconds(pid: int) -> float:
    """The process's own user + system time (all its threads, not its children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pickup_latency(base: Path, tree: Path = TREE) -> list[float]:
    root = fresh_root(base)
    task = root / "tasks" / "start"
    task.write_text('#!/bin/bash\necho "$EPOCHREALTIME" > "$JOBPATH/t0"\n')
    task.chmod(0o755)
    proc = start_service(root, tree=tree)
    samples = []
    try:
        for i in range(LATENCY_SAMPLES):
            job = root / f".j{i}"
            job.mkdir()
            t0 = time.time()
            os.rename(job, root / "queue" / f"j{i}")
            done = root / "success" / f"j{i}" / "t0"
            deadline = time.monotonic() + 10
            while not done.exists() and time.monotonic() < deadline:
                time.sleep(0.002)
            samples.append(float(done.read_text()) - t0)
            time.sleep(0.05)  # idle between jobs
    finally:
        stop_service(proc)
        shutil.rmtree(root, ignore_errors=True)
    return samples


def throughput(base: Path, workers: int, tree: Path = TREE) -> tuple[float, float]:
    """Jobs/s, and the service's CPU seconds per job."""
    root = fresh_root(base)
    os.symlink(shutil.which("true") or "/bin/true", root / "tasks" / "true")
    for i in range(JOBS):
        job = root / f".j{i:04d}"
        job.mkdir()
        (job / "JOB").write_text('{"Todo": ["true"]}')
    # steady throughput: from after the service's start-up work, which later trees do in
    # the background 3 s after the start (the sweep of job folders, store.SWEEP_AFTER)
    proc = start_service(root, "--workers", str(workers), tree=tree, settle=4.5)
    try:
        t0, cpu0 = time.monotonic(), cpu_seconds(proc.pid)
        for i in range(JOBS):
            os.rename(root / f".j{i:04d}", root / "queue" / f"j{i:04d}")
        success = root / "success"
        while len(os.listdir(success)) < JOBS:
            time.sleep(0.005)
        elapsed, cpu = time.monotonic() - t0, cpu_seconds(proc.pid) - cpu0
    finally:
        stop_service(proc)
        shutil.rmtree(root, ignore_errors=True)
    return JOBS / elapsed, cpu / JOBS


def fork_exec_floor() -> float:
    true = shutil.which("true") or "/bin/true"
    t0 = time.monotonic()
    for _ in range(JOBS):
        subprocess.run([true], check=True)
    return JOBS / (time.monotonic() - t0)


def fs_floor(base: Path, threads: int) -> float:
    """The file-system steps of a job without its task: the folder's lock, claim rename,
    LOG, JOB rewritten with fsync, final rename. What a durable processor cannot go below."""
    import fcntl
    from concurrent.futures import ThreadPoolExecutor

    root = fresh_root(base)
    for i in range(JOBS):
        (root / "queue" / f"j{i}").mkdir()
        (root / "queue" / f"j{i}" / "JOB").write_text('{"Todo": ["true"]}')

    def job(i: int) -> None:
        q, p = f"{root}/queue/j{i}", f"{root}/processing/j{i}"
        lock = os.open(q, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(q, p)
        with open(p + "/JOB", "rb") as f:
            f.read()
        log = os.open(p + "/LOG", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(log, b"begin\n")
        tmp = os.open(p + "/.JOB.tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(tmp, b'{"Todo": [], "Finished": [{}]}')
        os.fsync(tmp)
        os.close(tmp)
        os.replace(p + "/.JOB.tmp", p + "/JOB")
        os.write(log, b"end\n")
        os.close(log)
        os.rename(p, f"{root}/success/j{i}")
        os.close(lock)

    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(job, range(JOBS)))
    rate = JOBS / (time.monotonic() - t0)
    shutil.rmtree(root, ignore_errors=True)
    return rate


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def spread(values: list[float], fmt: str = ",.0f") -> str:
    return " / ".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def compare(base: Path, other: Path) -> None:
    """This tree against another, --workers 2, rounds alternating which goes first."""
    trees = {"other": other, "ours": TREE}
    rates: dict[str, list[float]] = {"other": [], "ours": []}
    cpus: dict[str, list[float]] = {"other": [], "ours": []}
    pickups: dict[str, list[float]] = {"other": [], "ours": []}
    for i in range(RUNS):
        for key in ("other", "ours") if i % 2 == 0 else ("ours", "other"):
            rate, cpu = throughput(base, 2, trees[key])
            rates[key].append(rate)
            cpus[key].append(cpu * 1e6)
            pickups[key].append(pct(pickup_latency(base, trees[key]), 0.5) * 1000)
            print(f"round {i + 1}, {key}: {rate:.0f} jobs/s, {cpu * 1e6:,.0f} us CPU per job, "
                  f"pickup p50 {pickups[key][-1]:.1f} ms", file=sys.stderr, flush=True)  # fmt: skip
    print("## Processor: this tree against another, --workers 2, 500 jobs (`true`)")
    print()
    print(f"{RUNS} rounds alternating between the trees; min / median / max")
    print()
    print("| tree | jobs/s | service CPU per job (us) | pickup p50 (ms) |")
    print("|---|---|---|---|")
    for key, label in (("other", str(other)), ("ours", "this tree")):
        print(f"| {label} | {spread(rates[key])} | {spread(cpus[key])} "
              f"| {spread(pickups[key], '.1f')} |")  # fmt: skip
    paired = [a / b for a, b in zip(rates["ours"], rates["other"], strict=True)]
    cpu_paired = [b / a for a, b in zip(cpus["ours"], cpus["other"], strict=True)]
    print()
    medians = statistics.median(rates["ours"]) / statistics.median(rates["other"])
    print(
        f"jobs/s, this tree / other, round by round: {spread(paired, '.2f')}; "
        f"of the medians: {medians:.2f}x"
    )
    print(
        f"CPU per job, other / this tree (higher is better), round by round: "
        f"{spread(cpu_paired, '.2f')}"
    )


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="batchingest-bench-", dir=os.environ.get("BENCH_DIR")))
    other = os.environ.get("BENCH_OTHER")
    if other:
        try:
            compare(base, Path(other).resolve())
        finally:
            shutil.rmtree(base, ignore_errors=True)
        return
    try:
        lat_runs = [pickup_latency(base) for _ in range(RUNS)]
        p50 = statistics.median(pct(s, 0.5) for s in lat_runs) * 1000
        p99 = statistics.median(pct(s, 0.99) for s in lat_runs) * 1000
        lo = min(min(s) for s in lat_runs) * 1000
        hi = max(max(s) for s in lat_runs) * 1000
        print("## Processor")
        print()
        print(f"{RUNS} runs, medians; {os.cpu_count()} cores")
        print()
        print("| measure | batchingest | compared with | target |")
        print("|---|---|---|---|")
        print(f"| pickup latency p50 | {p50:.1f} ms | Go service (5 s poll): 2,300 ms | <= 20 ms |")
        print(
            f"| pickup latency p99 | {p99:.1f} ms (range {lo:.1f}-{hi:.1f}) "
            "| Go service: 600-4,900 ms | <= 100 ms |"
        )
        for workers in (1, 2, 4):
            rates, floors, fs = [], [], []
            for _ in range(RUNS):
                floors.append(fork_exec_floor())
                fs.append(fs_floor(base, workers))
                rates.append(throughput(base, workers)[0])
            rate, floor = statistics.median(rates), statistics.median(floors)
            fs_rate = statistics.median(fs)
            target = ">= 300 jobs/s and >= 50% of floor" if workers == 2 else ""
            print(
                f"| throughput, --workers {workers} | {rate:.0f} jobs/s "
                f"({100 * rate / floor:.0f}% of floor) | fork+exec floor {floor:.0f}/s; "
                f"file-system steps alone ({workers} threads) {fs_rate:.0f}/s; "
                f"Go: 555/s | {target} |"
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
