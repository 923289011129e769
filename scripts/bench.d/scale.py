"""100,000 jobs: listing, metrics, dashboard, memory, start-up and pickup at that size.

One jobs root is built once (100,000 empty job folders in success/, 10,000 in queue/;
no JOB file, so each queued job runs `start`), then, BENCH_RUNS times, interleaving
each measure with its floor in the same run:

- the API alone (`serve --no-processor`, the root at rest): `GET /jobs?limit=100`
  (first page and page 500), the whole `GET /jobs` (110,000 rows, read to the end and
  parsed), `/metrics`, the dashboard's `/ui` and `/ui/api/overview`, a filtered and an
  ordered query; the floor is `GET /healthz` on the same connection (an answer with no
  work). Then `/metrics`, `GET /jobs?limit=100` and `/ui/api/overview` again while a
  job moves into and out of success/ every 50 ms, so that no listing of it is ever
  reused as it was. The service's RSS once started and its start-up sweep of the job
  folders done (idle), and its peak (VmHWM) after all of these;
- start-up to first pickup: from starting the process (with the processor) to the first
  instruction of the first queued job's task (bash's $EPOCHREALTIME); the floor is the
  same service on an empty root with one queued job. The task holds its worker
  (`sleep`), so the 10,000 queued jobs stay queued; SIGTERM with `--grace 0` puts the
  two running ones back;
- pickup latency with 100,000 jobs in success/ (queue/ set aside for it), once the
  start-up sweep is over: rename into queue/ to the first instruction of the task; the
  floor is the same on an empty root;
- `GET /jobs` with 10,000 jobs (a root of its own), next to `GET /healthz`.

Environment: BENCH_RUNS (default 3), BENCH_DIR (default the system temp folder),
BENCH_SWEEP_WAIT (seconds to wait for the start's background sweep to end before
measuring, default 120). The service runs the tree of the working directory (`python -m`
puts it ahead of PYTHONPATH): to compare with another tree in one sitting, run this
script again from that tree's folder (BENCH_SWEEP_WAIT=0 for a tree that sweeps before
it answers).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from live_service import TOKEN, Service, free_port
from metrics import churn  # success/job-000000 out to data/ and back every 50 ms

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
SUCCESS, QUEUED, SMALL = 100_000, 10_000, 10_000
SAMPLES = 30
PREFIX = {"success": "job"}  # job-000000 is the one metrics.churn moves
SWEEP_WAIT = float(os.environ.get("BENCH_SWEEP_WAIT", "120"))
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
# holds its worker so the backlog stays queued; prints when it began (no fork first)
TASK = '#!/bin/bash\necho "$EPOCHREALTIME $JOBNAME" >> "$BENCH_MARK"\nexec sleep 30\n'
PICKUP_TASK = '#!/bin/bash\necho "$EPOCHREALTIME" > "$JOBPATH/t0"\n'


def build(root: Path, jobs: dict[str, int]) -> float:
    t0 = time.perf_counter()
    for state in ("data", "queue", "processing", "success", "error", "tasks"):
        (root / state).mkdir(parents=True, exist_ok=True)
    for state, count in jobs.items():
        fd = os.open(root / state, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i in range(count):
                os.mkdir(f"{PREFIX.get(state, state[0])}-{i:06d}", dir_fd=fd)
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def rss_mib(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed_get(conn: http.client.HTTPConnection, path: str) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    conn.request("GET", path, headers=HEADERS)
    reply = conn.getresponse()
    body = reply.read()
    elapsed = time.perf_counter() - t0
    assert reply.status == 200, (path, reply.status, body[:300])
    return elapsed, body


def p50(conn: http.client.HTTPConnection, path: str, n: int = SAMPLES) -> float:
    timed_get(conn, path)  # a first look may fill caches: not what is measured here
    return statistics.median(timed_get(conn, path)[0] for _ in range(n)) * 1000


def full_listing(conn: http.client.HTTPConnection, expect: int) -> float:
    elapsed, body = timed_get(conn, "/jobs")
    assert len(json.loads(body)) == expect, "the listing lost jobs"
    return elapsed * 1000


def while_changing(root: Path, conn: http.client.HTTPConnection) -> dict[str, float]:
    stop = threading.Event()
    mover = threading.Thread(target=churn, args=(root, stop))
    mover.start()
    try:
        time.sleep(1.2)  # past any one-second rule a cache may have
        return {
            "metrics, success/ changing": p50(conn, "/metrics"),
            "limit=100, success/ changing": p50(conn, "/jobs?limit=100"),
            "overview, success/ changing": p50(conn, "/ui/api/overview"),
        }
    finally:
        stop.set()
        mover.join()


QUERIES = {
    "floor: GET /healthz": "/healthz",
    "GET /jobs?limit=100": "/jobs?limit=100",
    "GET /jobs?limit=100&offset=50000": "/jobs?limit=100&offset=50000",
    "GET /metrics": "/metrics",
    "GET /ui": "/ui",
    "GET /ui/api/overview": "/ui/api/overview",
}
SCANS = {
    "filter name:~job-0500 (full scan)": "/jobs?filter=name:~job-0500&limit=100",
    "orderby=modified desc (statx of every job)": "/jobs?orderby=modified%20desc&limit=100",
}


def wait_for_sweep(svc: Service) -> None:
    """The start's sweep of every job folder runs in the background (seconds with
    100,000 jobs, slowing what runs meanwhile): what is measured here comes after it.
    A tree that says nothing of it swept before it answered."""
    deadline = time.monotonic() + SWEEP_WAIT
    while "job folders swept" not in svc.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # the processor's sweep of cancel requests starts at the same time


def api_run(root: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    with Service(root, "--no-processor") as svc:
        assert svc.proc is not None
        out = {"start to ready (no processor), ms": (time.perf_counter() - t0) * 1000}
        pid = svc.proc.pid
        wait_for_sweep(svc)
        out["RSS idle, MiB"] = rss_mib(pid, "VmRSS")
        conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=120)
        for label, path in QUERIES.items():
            out[label] = p50(conn, path)
        out["full GET /jobs (110,000), ms"] = full_listing(conn, SUCCESS + QUEUED)
        for label, path in SCANS.items():
            out[label] = p50(conn, path, 3)
        out.update(while_changing(root, conn))
        out["RSS peak, MiB"] = rss_mib(pid, "VmHWM")
        out["RSS peak - idle, MiB"] = out["RSS peak, MiB"] - out["RSS idle, MiB"]
        conn.close()
    return out


def first_pickup(root: Path, mark: Path) -> float:
    """Seconds from starting the service to its first task's first instruction."""
    mark.unlink(missing_ok=True)
    env = dict(os.environ, BENCH_MARK=str(mark), BATCHINGEST_TOKENS=TOKEN)
    cmd = [sys.executable, "-m", "batchingest.cli", "serve", "--root", str(root),
           "--port", str(free_port()), "--grace", "0", "--log-level", "warning"]  # fmt: skip
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (mark.exists() and mark.read_text().strip()):
            assert time.monotonic() < deadline and proc.poll() is None, "no pickup"
            time.sleep(0.002)
        return float(mark.read_text().split()[0]) - t0
    finally:
        proc.terminate()
        proc.wait(60)
        for state in ("processing", "error", "success"):  # what ran goes back
            for job in (root / state).glob("q-*"):
                for name in ("LOG", "JOB"):
                    (job / name).unlink(missing_ok=True)
                os.rename(job, root / "queue" / job.name)


def pickups(root: Path) -> list[float]:
    """Rename into queue/ to the task's first instruction, SAMPLES jobs, one at a time.

    queue/ is set aside meanwhile: its backlog would be taken first.
    """
    (root / "tasks" / "start").write_text(PICKUP_TASK)
    os.rename(root / "queue", root / "queue-aside")
    os.mkdir(root / "queue")
    samples = []
    try:
        with Service(root) as svc:
            wait_for_sweep(svc)
            for i in range(SAMPLES):
                job = root / "data" / f"p-{i}"
                job.mkdir()
                t0 = time.time()
                os.rename(job, root / "queue" / job.name)
                done = root / "success" / job.name / "t0"
                deadline = time.monotonic() + 10
                while not done.exists() and time.monotonic() < deadline:
                    time.sleep(0.001)
                samples.append((float(done.read_text()) - t0) * 1000)
                time.sleep(0.05)
    finally:
        os.rmdir(root / "queue")
        os.rename(root / "queue-aside", root / "queue")
        for i in range(SAMPLES):
            shutil.rmtree(root / "success" / f"p-{i}", ignore_errors=True)
        (root / "tasks" / "start").write_text(TASK)
    return samples


def pickup_run(big: Path, empty: Path) -> dict[str, float]:
    return {
        "floor: start to first pickup, empty root, ms": first_pickup(empty, empty / "mark") * 1000,
        "start to first pickup, ms": first_pickup(big, big / "mark") * 1000,
        "floor: pickup p50, empty root, ms": statistics.median(pickups(empty)),
        "pickup p50, 100,000 in success/, ms": statistics.median(pickups(big)),
    }


def small_run(root: Path) -> dict[str, float]:
    with Service(root, "--no-processor", "--log-level", "warning") as svc:
        conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=60)
        out = {
            "floor: GET /healthz (10,000 root)": p50(conn, "/healthz"),
            "GET /jobs, 10,000 jobs": p50(conn, "/jobs"),
        }
        conn.close()
    return out


RATIOS = [
    ("start to first pickup, ms", "floor: start to first pickup, empty root, ms"),
    ("pickup p50, 100,000 in success/, ms", "floor: pickup p50, empty root, ms"),
    ("GET /jobs?limit=100", "floor: GET /healthz"),
    ("GET /metrics", "floor: GET /healthz"),
    ("GET /ui/api/overview", "floor: GET /healthz"),
]


def fmt(values: list[float]) -> str:
    lo, mid, hi = min(values), statistics.median(values), max(values)
    return f"{lo:.2f} / {mid:.2f} / {hi:.2f}" if hi < 10 else f"{lo:.1f} / {mid:.1f} / {hi:.1f}"


def main() -> None:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        work = Path(tmp)
        big, empty, small = work / "big", work / "empty", work / "small"
        made = build(big, {"success": SUCCESS, "queue": QUEUED})
        build(empty, {"queue": 1})
        build(small, {"success": SMALL})
        for root in (big, empty):
            (root / "tasks" / "start").write_text(TASK)
            (root / "tasks" / "start").chmod(0o755)
        results: dict[str, list[float]] = {}
        steps: list[Callable[[], dict[str, float]]] = [
            lambda: api_run(big),
            lambda: pickup_run(big, empty),
            lambda: small_run(small),
        ]
        for _ in range(RUNS):
            for step in steps:
                for label, value in step().items():
                    results.setdefault(label, []).append(value)
        print(f"## 100,000 jobs ({RUNS} runs; root of 110,000 folders built in {made:.1f} s)\n")
        print("| measure (ms unless said) | min / median / max |\n|---|---|")
        for label, values in results.items():
            print(f"| {label} | {fmt(values)} |")
        print("\n| ratio to its floor, run by run | min / median / max |\n|---|---|")
        for ours, floor in RATIOS:
            if ours in results and floor in results:
                pairs = zip(results[ours], results[floor], strict=True)
                print(f"| {ours} | {fmt([a / b for a, b in pairs])} |")


if __name__ == "__main__":
    main()
