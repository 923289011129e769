"""`GET /jobs/{id}` with 1, 2 and 3 API processes (`--api-processes N`), interleaved.

Each run starts the real service once per N (the order rotating from run to run) on one
jobs root holding the job asked for, and drives it with wrk (8 connections, 2 threads,
BENCH_SECONDS each, 10 by default) as `scripts/bench api` does. Reported per N: req/s,
p50 and p99 (min-median-max over the runs), the ratio of req/s to N=1 in the same run,
the service's CPU per request (every process of it, from /proc/PID/stat) and the share
of that CPU the busiest process took (how evenly the one accept queue spreads the
connections). wrk runs on the same 2 cores, so it takes CPU from the service as it would
from any local client.

Environment: BENCH_RUNS (default 3), BENCH_SECONDS (default 10), BENCH_PROCESSES (the
values of N, default "1,2,3"), BENCH_LOG_LEVEL (default warning: no access lines, as
`scripts/bench api`; `info` writes one per request).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from live_service import TOKEN, Service, wait_for

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
COUNTS = [int(n) for n in os.environ.get("BENCH_PROCESSES", "1,2,3").split(",")]
LOG_LEVEL = os.environ.get("BENCH_LOG_LEVEL", "warning")
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    rate: float
    p50: float
    p99: float
    cpu_us: float  # service CPU per request, all processes
    busiest: float  # share of that CPU the busiest process took


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def service_pids(pid: int) -> list[int]:
    """The service and its extra API processes (not the tasks it runs: none here)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *map(int, children)]


def wrk(url: str) -> tuple[float, float, float, int]:
    out = subprocess.run(
        ["wrk", "-t2", "-c8", f"-d{SECONDS}s", "--latency", "-H", f"X-Api-Token: {TOKEN}", url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip

    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if m is None:
            return float("nan")
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    done = re.search(r"^\s*(\d+) requests in", out, re.M)
    if "Non-2xx" in out or rate is None or done is None:
        raise RuntimeError(f"wrk did not get 200s:\n{out}")
    return float(rate.group(1)), ms("50%"), ms("99%"), int(done.group(1))


def one(root: Path, processes: int) -> Result:
    svc = Service(root, "--api-processes", str(processes), "--log-level", LOG_LEVEL).start()
    try:
        with svc.client() as c:
            assert c.get("/jobs/bench").status_code == 200
        pid: int = svc.proc.pid  # type: ignore[union-attr]
        wait_for(lambda: len(service_pids(pid)) == processes, what="the API processes")
        time.sleep(2.0)  # their imports done, serving
        pids = service_pids(pid)
        before = {pid: cpu_ticks(pid) for pid in pids}
        rate, p50, p99, done = wrk(f"{svc.url}/jobs/bench")
        used = {pid: cpu_ticks(pid) - before[pid] for pid in pids}
    finally:
        svc.stop()
    total = sum(used.values())
    return Result(rate, p50, p99, total / TICKS / done * 1e6, max(used.values()) / max(total, 1))


def spread(values: list[float], fmt: str) -> str:
    return " / ".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def report(results: dict[int, list[Result]]) -> None:
    base = results[COUNTS[0]]
    print(f"## GET /jobs/{{id}} by API processes ({RUNS} runs, wrk -t2 -c8 -d{SECONDS}s,")
    print(f"log level {LOG_LEVEL}; min / median / max)")
    print()
    print("| processes | req/s | vs first row, same run | p50 ms | p99 ms | CPU µs/request "
          "| busiest process's CPU share |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for n, rows in results.items():
        ratios = [r.rate / b.rate for r, b in zip(rows, base, strict=True)]
        print(
            f"| {n} | {spread([r.rate for r in rows], ',.0f')} | {spread(ratios, '.2f')}x "
            f"| {spread([r.p50 for r in rows], '.2f')} | {spread([r.p99 for r in rows], '.2f')} "
            f"| {spread([r.cpu_us for r in rows], '.0f')} "
            f"| {spread([r.busiest for r in rows], '.2f')} |"
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
        (job / "JOB").write_text(json.dumps({"Todo": ["a", "b"], "Finished": []}))
        results: dict[int, list[Result]] = {n: [] for n in COUNTS}
        for run in range(RUNS):
            order = COUNTS[run % len(COUNTS) :] + COUNTS[: run % len(COUNTS)]
            for n in order:
                results[n].append(one(root, n))
                r = results[n][-1]
                print(f"run {run + 1}, {n} process(es): {r.rate:,.0f} req/s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results)


if __name__ == "__main__":
    main()
