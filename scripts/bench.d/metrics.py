"""Metrics and access-log benchmarks: the cost of a scrape, and of the access line per request.

Starts the real service (`batchingest serve --no-processor`) on a temporary jobs root and
measures, medians of several runs:
- `GET /metrics` with 100,000 jobs in the root (90,000 in success/, 9,000 in error/,
  1,000 in data/): p50 and p99 of sequential scrapes, once with the root at rest and once
  while jobs keep moving into and out of success/ every 50 ms, so that its cached listing
  is never reused and every scrape lists 90,000 entries again;
- the service's CPU time per `GET /jobs/{id}` (from /proc/PID/stat, over 20,000 keep-alive
  requests from one client), with this tree and, when BENCH_BASE names another checkout
  (say `git archive <commit> | tar -x -C /tmp/base`), with that one in the same sitting:
  CPU per request hardly moves with the machine's load, wall-clock rates do.

Environment: BENCH_RUNS (default 3), BENCH_DIR (default the system temp folder),
BENCH_BASE (a tree to compare with; default none), BENCH_SKIP_SCRAPES (set: only the
CPU per request).
"""

from __future__ import annotations

import http.client
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from live_service import TOKEN, Service

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
BASE = os.environ.get("BENCH_BASE", "")
JOBS = {"success": 90_000, "error": 9_000, "data": 1_000}
SCRAPES = 40
REQUESTS = 20_000
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fill(root: Path) -> None:
    for state, count in JOBS.items():
        base = root / state
        base.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (base / f"job-{i:06d}").mkdir()


def scrape_times(port: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    times = []
    for _ in range(SCRAPES):
        t0 = time.perf_counter()
        conn.request("GET", "/metrics", headers=HEADERS)
        reply = conn.getresponse()
        body = reply.read()
        times.append(time.perf_counter() - t0)
        assert reply.status == 200 and b'batchingest_jobs{state="success"}' in body, body
    conn.close()
    return times


def churn(root: Path, stop: threading.Event) -> None:
    """Keep success/ changing: one job out to data/ and back, every 50 ms."""
    a, b = root / "success" / "job-000000", root / "data" / "churn"
    while not stop.is_set():
        os.rename(a, b)
        os.rename(b, a)
        stop.wait(0.05)


def pct(times: list[float], p: float) -> float:
    return sorted(times)[min(len(times) - 1, int(p * len(times)))] * 1000


def scrapes(work: Path) -> list[str]:
    root = work / "root"
    rows = []
    # filled once it runs: its start-up sweep looks into every job folder, which is
    # not what is measured here
    with Service(root, "--no-processor") as svc:
        t0 = time.perf_counter()
        fill(root)
        made = time.perf_counter() - t0
        time.sleep(1.2)  # past the listing cache's one-second rule
        for label, moving in (("at rest", False), ("success/ changing every 50 ms", True)):
            p50s, p99s = [], []
            for _ in range(RUNS):
                stop = threading.Event()
                mover = threading.Thread(target=churn, args=(root, stop)) if moving else None
                if mover:
                    mover.start()
                    time.sleep(1.2)  # past the listing cache's one-second rule
                try:
                    times = scrape_times(svc.port)
                finally:
                    stop.set()
                    if mover:
                        mover.join()
                p50s.append(pct(times, 0.5))
                p99s.append(pct(times, 0.99))
            p50, p99 = statistics.median(p50s), statistics.median(p99s)
            rows.append(f"| `GET /metrics`, 100,000 jobs, {label} | {p50:.1f} ms | {p99:.1f} ms |")
    rows.append(f"\n(100,000 job folders made in {made:.1f} s)")
    return rows


def cpu_per_request(work: Path, tree: str, *args: str) -> float:
    root = work / f"root-{len(tree)}-{time.monotonic_ns()}"
    (root / "data" / "bench").mkdir(parents=True)
    env = {"PYTHONPATH": tree} if tree else {}
    with Service(root, "--no-processor", *args, env=env) as svc:
        assert svc.proc is not None
        conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=30)
        for _ in range(500):  # warm up
            conn.request("GET", "/jobs/bench", headers=HEADERS)
            conn.getresponse().read()
        before = cpu_seconds(svc.proc.pid)
        for _ in range(REQUESTS):
            conn.request("GET", "/jobs/bench", headers=HEADERS)
            reply = conn.getresponse()
            reply.read()
            assert reply.status == 200
        used = cpu_seconds(svc.proc.pid) - before
        conn.close()
    return used / REQUESTS * 1e6


def main() -> None:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        work = Path(tmp)
        print("## Metrics and access log\n")
        if not os.environ.get("BENCH_SKIP_SCRAPES"):
            print("| measure | p50 | p99 |\n|---|---:|---:|")
            for row in scrapes(work):
                print(row)
        quiet = ("--log-level", "warning")
        trees = [
            ("this tree", "", ()),
            ("this tree, no access lines (--log-level warning)", "", quiet),
        ]
        trees += [("BENCH_BASE", BASE, ())] if BASE else []
        results: dict[str, list[float]] = {label: [] for label, _, _ in trees}
        for _ in range(RUNS):
            for label, tree, args in trees:  # interleaved, so all see the same machine
                results[label].append(cpu_per_request(work, tree, *args))
        print("\n| `GET /jobs/{id}`, service CPU per request | median | runs |\n|---|---:|---|")
        for label, values in results.items():
            runs = ", ".join(f"{v:.0f}" for v in values)
            print(f"| {label} | {statistics.median(values):.0f} µs | {runs} |")


if __name__ == "__main__":
    main()
