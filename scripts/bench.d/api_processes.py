"""`GET /jobs/{id}` with 1, 2 and 3 API processes (`--api-processes N`), interleaved.

Each run starts the real service once per N (the order rotating from run to run) on one
jobs root holding the job asked for, and drives it with wrk (8 connections, 2 threads,
BENCH_SECONDS each, 10 by default) as `scripts/bench api` does. Reported per N: req/s,
p50 and p99 (min-median-max over the runs), the ratio of req/s to N=1 in the same run,
the service's CPU per request (every process of it, from /proc/PID/stat) and the share
of that CPU the busiest process took (how evenly the kernel spreads the connections over
the processes' sockets), and the median time from a POST /jobs/{id}/queue to the first
line of the job's task (BENCH_PICKUPS jobs, 21 by default). wrk runs on the same 2
cores, so it takes CPU from the service as it would from any local client.

Environment: BENCH_RUNS (default 3), BENCH_SECONDS (default 10), BENCH_PROCESSES (the
values of N, default "1,2,3"), BENCH_LOG_LEVEL (default warning: no access lines, as
`scripts/bench api`; `info` writes one per request), BENCH_GRANIAN (a folder granian is
importable from, e.g. `pip install --target /tmp/granian granian`: then the same app also
runs under granian with as many workers, without the processor and without our
connection limits, for comparison; its rows say "granian").
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
from api import wrk
from live_service import TOKEN, Service, free_port, wait_for

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
COUNTS = [int(n) for n in os.environ.get("BENCH_PROCESSES", "1,2,3").split(",")]
LOG_LEVEL = os.environ.get("BENCH_LOG_LEVEL", "warning")
GRANIAN = os.environ.get("BENCH_GRANIAN", "")
TICKS = os.sysconf("SC_CLK_TCK")
PICKUPS = int(os.environ.get("BENCH_PICKUPS", "21"))
HEADERS = {"X-Api-Token": TOKEN}


@dataclass
class Result:
    rate: float
    p50: float
    p99: float
    cpu_us: float  # service CPU per request, all processes
    busiest: float  # share of that CPU the busiest process took
    pickup: float  # median ms from POST /jobs/{id}/queue sent to the task's first line
    queued: float  # median ms from the QUEUED event's time (ms resolution) to the same


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def service_pids(pid: int) -> list[int]:
    """The service and its extra API processes (not the tasks it runs: none here)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *map(int, children)]


def pickups(svc: Service, tag: str) -> tuple[float, float]:
    """Medians, in ms, from sending POST /jobs/{id}/queue (on a connection of its own, so
    to any of the processes) to the first instruction of the job's task, and from its
    QUEUED event (written by the main process just after the rename) to the same."""
    took, picked = [], []
    fresh = httpx.Limits(max_keepalive_connections=0)  # a connection per request
    client = httpx.Client(base_url=svc.url, headers=HEADERS, limits=fresh)
    for i in range(PICKUPS):
        name = f"pickup-{tag}-{i}"
        assert client.put(f"/jobs/{name}").status_code == 201
        t0 = time.time()
        assert client.post(f"/jobs/{name}/queue").status_code == 202
        mark = svc.root / "success" / name / "t0"
        wait_for(mark.exists, 10, interval=0.005, what=f"{name} to run")
        started = float(mark.read_text())
        took.append((started - t0) * 1000)
        history = (svc.root / "success" / name / ".events").read_text().splitlines()
        queued = next(json.loads(x)["time"] for x in history if '"QUEUED"' in x)
        at = datetime.strptime(queued, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        picked.append((started - at.timestamp()) * 1000)
    client.close()
    return statistics.median(took), statistics.median(picked)


def one(root: Path, processes: int, tag: str) -> Result:
    svc = Service(root, "--api-processes", str(processes), "--log-level", LOG_LEVEL).start()
    try:
        with svc.client() as c:
            assert c.get("/jobs/bench").status_code == 200
        pid: int = svc.proc.pid  # type: ignore[union-attr]
        wait_for(lambda: len(service_pids(pid)) == processes, what="the API processes")
        time.sleep(2.0)  # their imports done, serving
        pids = service_pids(pid)
        before = {pid: cpu_ticks(pid) for pid in pids}
        rate, p50, p99, done = wrk(f"{svc.url}/jobs/bench", SECONDS)
        used = {pid: cpu_ticks(pid) - before[pid] for pid in pids}
        pickup, queued = pickups(svc, tag)
    finally:
        svc.stop()
    total = sum(used.values())
    busiest = max(used.values()) / max(total, 1)
    return Result(rate, p50, p99, total / TICKS / done * 1e6, busiest, pickup, queued)


GRANIAN_APP = """
import os
from pathlib import Path
from batchingest.api.app import create_app
from batchingest.config import Config
from batchingest.store import Store

def app():
    root = Path(os.environ["BENCH_ROOT"])
    return create_app(Config(root=root, tokens=[os.environ["BENCH_TOKEN"]]), Store(root))
"""


def one_granian(root: Path, processes: int) -> Result:
    """The same app under granian (BENCH_GRANIAN: a folder it is importable from), with
    `processes` workers: the app alone, no processor, and none of our connection limits."""
    port = free_port()
    (root.parent / "granian_app.py").write_text(GRANIAN_APP)
    path = os.pathsep.join([str(root.parent), GRANIAN, *sys.path])
    env = {**os.environ, "BENCH_ROOT": str(root), "BENCH_TOKEN": TOKEN, "PYTHONPATH": path}
    proc = subprocess.Popen(
        [sys.executable, "-m", "granian", "--interface", "asgi", "--factory", "--workers",
         str(processes), "--loop", "uvloop", "--http", "1", "--no-ws", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", "granian_app:app"],
        env=env, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: len(service_pids(proc.pid)) == processes + 1, what="granian's workers")
        wait_for(lambda: _answers(url), what="granian to answer")
        time.sleep(1.0)
        pids = service_pids(proc.pid)
        before = {pid: cpu_ticks(pid) for pid in pids}
        rate, p50, p99, done = wrk(f"{url}/jobs/bench", SECONDS)
        used = {pid: cpu_ticks(pid) - before[pid] for pid in pids}
    finally:
        proc.terminate()
        proc.wait(30)
    total = sum(used.values())
    busiest = max(used.values()) / max(total, 1)
    nan = float("nan")
    return Result(rate, p50, p99, total / TICKS / done * 1e6, busiest, nan, nan)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/jobs/bench", headers=HEADERS).status_code == 200
    except httpx.HTTPError:
        return False


def spread(values: list[float], fmt: str) -> str:
    return " / ".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def report(results: dict[str, list[Result]]) -> None:
    base = results[str(COUNTS[0])]
    print(f"## GET /jobs/{{id}} by API processes ({RUNS} runs, wrk -t2 -c8 -d{SECONDS}s,")
    print(f"log level {LOG_LEVEL}; min / median / max)")
    print()
    print("| processes | req/s | vs first row, same run | p50 ms | p99 ms | CPU µs/request "
          "| busiest process's CPU share | POST queue → task runs, ms "
          "| QUEUED event → task runs, ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for n, rows in results.items():
        ratios = [r.rate / b.rate for r, b in zip(rows, base, strict=True)]
        print(
            f"| {n} | {spread([r.rate for r in rows], ',.0f')} | {spread(ratios, '.2f')}x "
            f"| {spread([r.p50 for r in rows], '.2f')} | {spread([r.p99 for r in rows], '.2f')} "
            f"| {spread([r.cpu_us for r in rows], '.0f')} "
            f"| {spread([r.busiest for r in rows], '.2f')} "
            f"| {spread([r.pickup for r in rows], '.1f')} "
            f"| {spread([r.queued for r in rows], '.1f')} |"
        )


def main() -> None:
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed (apt-get install wrk)")
    work = Path(tempfile.mkdtemp(prefix="bench-apiprocs-"))
    try:
        root = work / "root"
        job = root / "data" / "bench"
        job.mkdir(parents=True)
        (root / "tasks").mkdir()
        start = root / "tasks" / "start"
        start.write_text('#!/bin/bash\necho "$EPOCHREALTIME" > "$JOBPATH/t0"\n')
        start.chmod(0o755)
        (job / "JOB").write_text(json.dumps({"Todo": ["a", "b"], "Finished": []}))
        kinds = [(n, "") for n in COUNTS] + [(n, " granian") for n in COUNTS if GRANIAN]
        results: dict[str, list[Result]] = {f"{n}{what}": [] for n, what in kinds}
        for run in range(RUNS):
            for n, what in kinds[run % len(kinds) :] + kinds[: run % len(kinds)]:
                r = one_granian(root, n) if what else one(root, n, f"{run}-{n}")
                results[f"{n}{what}"].append(r)
                print(f"run {run + 1}, {n}{what}: {r.rate:,.0f} req/s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results)


if __name__ == "__main__":
    main()
