"""CPU per `GET /jobs/{id}`, in process: this tree against another, interleaved.

Wall-clock request rates on a shared 2-core machine swing by 2-3x with whatever else
runs; the CPU time the app spends per request hardly does. This drives the ASGI app
directly (no sockets, no uvicorn) and reports requests per CPU-second of the process,
min-median-max over rounds that alternate between the two trees; for a tree whose HTTP
protocol answers the request from its head (api.app.QuickJobInfo), that call too.

    BENCH_OTHER=/path/to/other/checkout .venv/bin/python scripts/bench.d/request_cpu.py

Without BENCH_OTHER only this tree is measured. BENCH_RUNS rounds (default 5),
BENCH_REQUESTS requests a round (default 20000).

Where wrk is installed (and BENCH_HTTP is not 0), the same request is then sent over
HTTP to the real service (`serve --no-processor`, uvicorn) of each tree in turn, with 8
connections for BENCH_HTTP_SECONDS (default 5) a round: req/s, p50 and p99 as wrk sees
them, and the service's CPU (user + system, from /proc) per request. The services run
from a temporary folder, so `python -m` imports the tree named by PYTHONPATH.
BENCH_API_PROCESSES (e.g. "1,2") runs this tree once per value of `--api-processes`
in each round (the other tree with its default); the ratio of each to the other tree's
req/s, round by round, is printed too.
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
from pathlib import Path

HERE = Path(__file__).resolve()
TREE = HERE.parents[2]
RUNS = int(os.environ.get("BENCH_RUNS", "5"))
REQUESTS = int(os.environ.get("BENCH_REQUESTS", "20000"))
HTTP_SECONDS = int(os.environ.get("BENCH_HTTP_SECONDS", "5"))
API_PROCESSES = [int(n) for n in os.environ.get("BENCH_API_PROCESSES", "1").split(",")]
sys.path.insert(0, str(TREE / "tests"))

CHILD = r"""
import asyncio, json, os, sys, tempfile, time
from pathlib import Path
from batchingest.config import Config
from batchingest.store import Store
from batchingest.api.app import create_app

root = Path(tempfile.mkdtemp()) / "root"
store = Store(root)
store.init()
job = store.create("job-0001")[0]
(job.path / "JOB").write_text(json.dumps({"Todo": ["a", "b"], "Finished": []}))
# a history of six events, as a job has after a run (trees without histories ignore it)
event = {"code": "QUEUED", "time": "2026-12-01T12:00:00.000Z", "is_error": False,
         "description": "The job was queued.", "details": {"by": "api"}, "state": "queue"}
(job.path / ".events").write_text("".join(json.dumps(event) + "\n" for _ in range(6)))
# the service's log set up as `serve` does (access lines on), written to /dev/null
try:
    from batchingest import logs
except ImportError:
    logs = None
if logs is not None and hasattr(logs, "setup"):
    sys.stderr = open(os.devnull, "w")
    logs.setup("info")
os.environ["BATCHINGEST_TOKENS"] = "t"
app = create_app(Config(root=root, tokens=["t"]), store)
scope = {"type": "http", "method": "GET", "path": "/jobs/job-0001", "raw_path": b"/jobs/job-0001",
         "query_string": b"", "headers": [(b"x-api-token", b"t"), (b"host", b"x")],
         "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 1),
         "client": ("127.0.0.1", 2),
         "root_path": "", "asgi": {"version": "3.0"}}

async def receive():
    return {"type": "http.request", "body": b"", "more_body": False}

status = []
async def send(message):
    if message["type"] == "http.response.start":
        status.append(message["status"])

async def main(n):
    for _ in range(n):
        await app(dict(scope), receive, send)

asyncio.run(main(500))  # warm up
assert status and status[-1] == 200, status[-1:]
t0 = time.process_time()
asyncio.run(main(int(sys.argv[1])))
print(int(sys.argv[1]) / (time.process_time() - t0))
# a tree whose HTTP protocol answers this request from its head (QuickJobInfo)
quick = getattr(app, "quick", None)
if quick is not None:
    async def answers(n):  # on a loop, as served: access lines written once a turn
        for _ in range(n):
            quick("GET", b"/jobs/job-0001", scope["headers"])

    t0 = time.process_time()
    asyncio.run(answers(int(sys.argv[1])))
    print("quick", int(sys.argv[1]) / (time.process_time() - t0))
"""


def rate(tree: Path) -> tuple[float, float | None]:
    """Requests per CPU-second through the ASGI app, and answered from the request head
    (None: a tree that does not)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(REQUESTS)], env=env, check=True,
                         capture_output=True, text=True, cwd=tree).stdout  # fmt: skip
    lines = out.strip().splitlines()
    if lines[-1].startswith("quick "):
        return float(lines[-2]), float(lines[-1].split()[1])
    return float(lines[-1]), None


def service_cpu(pid: int) -> float:
    """CPU seconds of the service and its extra API processes (their children)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0
    for each in [pid, *map(int, children)]:
        fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def wrk(url: str, seconds: int) -> str:
    from live_service import TOKEN

    cmd = ["wrk", "-t2", "-c8", f"-d{seconds}s", "--latency", "-H", f"X-Api-Token: {TOKEN}", url]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def wrk_ms(out: str, label: str) -> float:
    m = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)] if m else 0.0


def http_round(tree: Path, processes: int = 1) -> tuple[float, float, float, float] | None:
    """req/s, p50 ms, p99 ms and service CPU µs per request of one wrk run on tree;
    None if that tree's service does not start (an old tree without today's options)."""
    from live_service import Service

    work = Path(tempfile.mkdtemp(prefix="bench-request-cpu-"))
    here = os.getcwd()
    os.chdir(work)  # `python -m` puts the working folder first on the path
    try:
        (work / "root" / "tasks").mkdir(parents=True)
        extra = ["--api-processes", str(processes)] if processes > 1 else []
        svc = Service(work / "root", "--no-processor", *extra, env={"PYTHONPATH": str(tree)})
        try:
            svc.start()
        except RuntimeError as e:
            print(f"\n(no HTTP figures for {tree}: {str(e).splitlines()[-1]})")
            svc.stop()
            return None
        try:
            with svc.client() as client:
                assert client.put("/jobs/bench").status_code == 201
            job = work / "root" / "data" / "bench"
            (job / "JOB").write_text(json.dumps({"Todo": ["a", "b"], "Finished": []}))
            url = f"{svc.url}/jobs/bench"
            wrk(url, 1)  # warm up
            assert svc.proc is not None
            cpu0 = service_cpu(svc.proc.pid)
            out = wrk(url, HTTP_SECONDS)
            cpu = service_cpu(svc.proc.pid) - cpu0
        finally:
            svc.stop()
    finally:
        os.chdir(here)
        shutil.rmtree(work, ignore_errors=True)
    done = re.search(r"(\d+) requests in", out)
    n = int(done.group(1)) if done else 0
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    rate = float(rps.group(1)) if rps else 0.0
    return rate, wrk_ms(out, "50%"), wrk_ms(out, "99%"), cpu / max(n, 1) * 1e6


def http_table(other: str | None) -> None:
    """Rounds alternate the trees; this tree once per BENCH_API_PROCESSES value."""
    kinds: list[tuple[Path, int]] = ([(Path(other), 1)] if other else []) + [
        (TREE, n) for n in API_PROCESSES
    ]
    runs: dict[tuple[Path, int], list[tuple[float, float, float, float]]] = {k: [] for k in kinds}
    for _ in range(RUNS):
        for kind in list(kinds):
            found = http_round(*kind)
            if found is None:
                kinds.remove(kind)
            else:
                runs[kind].append(found)
    print(f"\n## GET /jobs/{{id}} over HTTP, wrk 8 connections, {HTTP_SECONDS} s a round")
    print("(min / median / max)\n")
    print("| tree | API processes | req/s | p50 ms | p99 ms | service CPU µs per request |")
    print("|---|---|---|---|---|---|")
    for kind in kinds:
        cols = [summary([r[i] for r in runs[kind]], ".2f" if i in (1, 2) else ",.0f")
                for i in range(4)]  # fmt: skip
        name = "this tree" if kind[0] == TREE else kind[0]
        print(f"| {name} | {kind[1]} | {' | '.join(cols)} |")
    base = runs.get((Path(other), 1)) if other else None
    if base:
        print()
        for kind in kinds:
            if kind[0] == TREE and len(runs[kind]) == len(base):
                rounds = [a[0] / b[0] for a, b in zip(runs[kind], base, strict=True)]
                print(f"req/s of this tree with {kind[1]} API process(es) / other, round by "
                      f"round (min / median / max): {summary(rounds, '.2f')}")  # fmt: skip


def summary(values: list[float], fmt: str = ",.0f") -> str:
    return f"{min(values):{fmt}} / {statistics.median(values):{fmt}} / {max(values):{fmt}}"


def main() -> None:
    other = os.environ.get("BENCH_OTHER")
    ours: list[float] = []
    theirs: list[float] = []
    quick: list[float] = []  # this tree's answers from the request head
    for _ in range(RUNS):
        if other:
            theirs.append(rate(Path(other))[0])
        asgi, at_once = rate(TREE)
        ours.append(asgi)
        if at_once is not None:
            quick.append(at_once)
    print("## GET /jobs/{id}, in process: requests per CPU-second (min / median / max)\n")
    print("| tree | req per CPU-s |")
    print("|---|---|")
    if other:
        print(f"| {other} | {summary(theirs)} |")
    print(f"| this tree | {summary(ours)} |")
    if quick:
        print(f"| this tree, answered from the request head (as served) | {summary(quick)} |")
    if other:
        ratio = statistics.median(ours) / statistics.median(theirs)
        print(f"\nthis tree / other, medians: {ratio:.2f}x")
        # each round's pair ran back to back, under much the same load
        rounds = [a / b for a, b in zip(ours, theirs, strict=True)]
        spread = f"{min(rounds):.2f} / {statistics.median(rounds):.2f} / {max(rounds):.2f}"
        print(f"this tree / other, round by round (min / median / max): {spread}")
    if shutil.which("wrk") and os.environ.get("BENCH_HTTP", "1") != "0":
        http_table(other)


if __name__ == "__main__":
    main()
