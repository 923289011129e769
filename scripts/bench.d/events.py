"""Event benchmarks: what the job history costs the processor, and reading the feed.

Cost: 500 queued jobs, each running `true` (BENCH_TASK_SECONDS=S: `sleep S`), through the
real processor (in this process,
--workers 2) with the events recorder attached and without it, alternating in the same
run (taking turns at going first), each run started on a drained disk (sync, dirty
pages written, discards calmed: _copyfloors.py), so both see the same machine; and the process's CPU
time per job, which a machine shared with other work disturbs less than the rate. Each
job gets 5 events (QUEUED, CLAIMED, TASK_STARTED, TASK_SUCCEEDED, SUCCEEDED): 5 lines
in its history file (QUEUED and CLAIMED in one write when the claim comes within
events.QUEUED_DELAY of the job being seen in queue/) and 5 in the feed, written by the
flusher thread in one write a round, which also fsyncs the histories of the state
changes in groups.

Feed: 1,000,000 events written into 48 hourly segments of a root, then the real service
started on it; `GET /events?after=<cursor>&limit=100` for 500 cursors spread over the
whole feed (one keep-alive connection), p50 and p99; the same page from the oldest event
(no `after`); and `GET /healthz` on the same connection, the floor of any request.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _copyfloors as cf
import httpx

from batchingest import events
from batchingest.config import Config
from batchingest.processor import Processor
from batchingest.store import Store

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
# each task sleeps this long instead of running `true` (0: `true`): where the task slots,
# not the cores, bound the rate, what the history adds to a job's slot is what counts
TASK_SECONDS = float(os.environ.get("BENCH_TASK_SECONDS", "0"))
JOBS = 500
FEED_EVENTS = 1_000_000
SEGMENTS = 48
QUERIES = 500
TOKEN = "bench-token-0123456789"


def fresh_root(base: Path) -> Path:
    root = Path(tempfile.mkdtemp(dir=base))
    Store(root).init()
    (root / "tasks").mkdir()
    task = root / "tasks" / "true"
    if TASK_SECONDS > 0:
        task.write_text(f"#!/bin/sh\nexec sleep {TASK_SECONDS}\n")
        task.chmod(0o755)
    else:
        os.symlink(shutil.which("true") or "/bin/true", task)
    return root


async def _throughput(root: Path, with_events: bool) -> tuple[float, float]:
    store = Store(root)
    recorder = events.Recorder(store) if with_events else None
    if recorder is not None:
        recorder.attach()
    processor = Processor(Config(root=root, workers=2), store)
    stop = asyncio.Event()
    running = asyncio.create_task(processor.run(stop))
    await asyncio.sleep(0.5)  # started and idle
    t0, cpu0 = time.monotonic(), time.process_time()
    for i in range(JOBS):
        os.rename(root / f".j{i:04d}", root / "queue" / f"j{i:04d}")
    success = root / "success"
    while len(os.listdir(success)) < JOBS:
        await asyncio.sleep(0.005)
    elapsed, cpu = time.monotonic() - t0, time.process_time() - cpu0
    stop.set()
    await running
    if recorder is not None:
        recorder.close()
    return JOBS / elapsed, cpu / JOBS


def throughput(base: Path, with_events: bool) -> tuple[float, float]:
    """Jobs/s, and the service's own CPU seconds per job (its threads, not the tasks)."""
    root = fresh_root(base)
    for i in range(JOBS):
        job = root / f".j{i:04d}"
        job.mkdir()
        (job / "JOB").write_text('{"Todo": ["true"]}')
    # each run starts on a drained disk: the jobs just made and the last run's root,
    # removed (discards, on a file system mounted with `discard`), written out first
    cf.DRAINS.drain()
    cf.DRAINS.quiet += cf.wait_quiet_disk(root)
    try:
        return asyncio.run(_throughput(root, with_events))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def create_cost(base: Path) -> float:
    """CPU seconds to create one empty file in a fresh folder here: what a job's first
    event costs at least, since its history is a new file in the job's folder."""
    folder = Path(tempfile.mkdtemp(dir=base))
    fds = []
    for i in range(JOBS):
        (folder / f"j{i}").mkdir()
        fds.append(os.open(folder / f"j{i}", os.O_RDONLY | os.O_DIRECTORY))
    t0 = time.thread_time()
    for fd in fds:
        os.close(os.open(".events", os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644, dir_fd=fd))
    cost = (time.thread_time() - t0) / JOBS
    for fd in fds:
        os.close(fd)
    shutil.rmtree(folder, ignore_errors=True)
    return cost


def spread(values: list[float], scale: float = 1.0, digits: int = 0) -> str:
    """min / median / max"""
    parts = (min(values), statistics.median(values), max(values))
    return " / ".join(f"{v * scale:,.{digits}f}" for v in parts)


def fill_feed(root: Path) -> list[str]:
    """FEED_EVENTS lines in SEGMENTS past hours; a cursor of every 1000th event."""
    folder = root / ".events"
    folder.mkdir()
    first = int(time.time() // events.SEGMENT_SECONDS) - SEGMENTS
    per = FEED_EVENTS // SEGMENTS
    template = events.encode(
        {"job": "job-XXXXXXX", **events.make_event(events.Code.TASK_SUCCEEDED, "processing",
         "Task check succeeded in 0.012 s.", {"task": "check", "seconds": 0.012, "added": []})}
    )  # fmt: skip
    cursors = []
    for s in range(SEGMENTS):
        segment = first + s
        lines = [template.replace(b"XXXXXXX", b"%07d" % (s * per + n)) for n in range(per)]
        offset = 0
        for n, line in enumerate(lines):
            offset += len(line)
            if n % 1000 == 0:
                cursors.append(events.Cursor(segment, offset).text)
        (folder / f"{segment:08d}.jsonl").write_bytes(b"".join(lines))
    return cursors


def feed_latency(base: Path) -> tuple[list[float], list[float], list[float], int]:
    root = fresh_root(base)
    cursors = fill_feed(root)
    size = sum(p.stat().st_size for p in (root / ".events").iterdir())
    port = 15900 + os.getpid() % 90
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchingest.cli", "serve", "--root", str(root), "--no-processor",
         "--port", str(port), "--log-level", "warning"],
        env={**os.environ, "BATCHINGEST_TOKENS": TOKEN},
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-Api-Token": TOKEN}) as c:
            for _ in range(100):
                try:
                    c.get("/healthz")
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            random.shuffle(cursors)
            after = []
            for cursor in cursors[:QUERIES]:
                t0 = time.perf_counter()
                r = c.get("/events", params={"after": cursor, "limit": 100})
                after.append(time.perf_counter() - t0)
                assert r.status_code == 200 and len(r.json()["DATA"]) == 100, r.text[:200]
            oldest = []
            for _ in range(100):
                t0 = time.perf_counter()
                r = c.get("/events", params={"limit": 100})
                oldest.append(time.perf_counter() - t0)
                assert len(r.json()["DATA"]) == 100
            floor = []  # the same connection's round trip for the smallest answer
            for _ in range(QUERIES):
                t0 = time.perf_counter()
                c.get("/healthz")
                floor.append(time.perf_counter() - t0)
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(root, ignore_errors=True)
    return after, oldest, floor, size


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="batchingest-bench-"))
    try:
        with_rates, without_rates, with_cpu, without_cpu, creates = [], [], [], [], []
        for n in range(RUNS):
            # the two kinds take turns going first: a run pays for some of the file
            # system's work left by the one before (the removal of its root)
            for with_events in (n % 2 == 1, n % 2 == 0):
                rate, cpu = throughput(base, with_events)
                (with_rates if with_events else without_rates).append(rate)
                (with_cpu if with_events else without_cpu).append(cpu)
            creates.append(create_cost(base))
        rate_ratios = [w / o for w, o in zip(with_rates, without_rates, strict=True)]
        cpu_ratios = [w / o for w, o in zip(with_cpu, without_cpu, strict=True)]
        with_rate, without_rate = statistics.median(with_rates), statistics.median(without_rates)
        cpu_with, cpu_without = statistics.median(with_cpu), statistics.median(without_cpu)
        after, oldest, floor, size = feed_latency(base)
        print("## Events")
        print()
        task = f"each task `sleep {TASK_SECONDS}`" if TASK_SECONDS > 0 else "each task `true`"
        print(f"{RUNS} runs, medians; {os.cpu_count()} cores; {task}")
        print()
        print("| measure | batchingest | compared with, same run | target |")
        print("|---|---|---|---|")
        print(
            f"| {JOBS} jobs, --workers 2, with job history and feed | {with_rate:.0f} jobs/s "
            f"(runs {', '.join(f'{r:.0f}' for r in with_rates)}) | without: {without_rate:.0f} "
            f"jobs/s (runs {', '.join(f'{r:.0f}' for r in without_rates)}); "
            f"{with_rate / without_rate:.2f}x | >= 0.9x |"
        )
        print(
            f"| service CPU per job (all its threads, not the task) | with: "
            f"{cpu_with * 1e6:.0f} µs | without: {cpu_without * 1e6:.0f} µs | |"
        )
        print(
            f"| round by round, min / median / max | jobs/s with over without: "
            f"{spread(rate_ratios, digits=2)}x | CPU per job with over without: "
            f"{spread(cpu_ratios, digits=2)}x | |"
        )
        print(
            f"| creating one empty file in a fresh folder (the floor of a new history), "
            f"CPU | {spread(creates, 1e6)} µs | | |"
        )
        print(
            f"| `GET /events?after=&limit=100`, {FEED_EVENTS:,} events ({size >> 20} MiB) "
            f"in {SEGMENTS} segments | p50 {pct(after, 0.5) * 1000:.1f} ms, "
            f"p99 {pct(after, 0.99) * 1000:.1f} ms | from the oldest (no `after`): p50 "
            f"{pct(oldest, 0.5) * 1000:.1f} ms; `GET /healthz`: p50 "
            f"{pct(floor, 0.5) * 1000:.1f} ms | p50 <= 10 ms |"
        )
        print(f"\n{cf.DRAINS.line()}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
