"""CPU per `GET /jobs/{id}`, in process: this tree against another, interleaved.

Wall-clock request rates on a shared 2-core machine swing by 2-3x with whatever else
runs; the CPU time the app spends per request hardly does. This drives the ASGI app
directly (no sockets, no uvicorn) and reports requests per CPU-second of the process,
min-median-max over rounds that alternate between the two trees.

    BENCH_OTHER=/path/to/other/checkout .venv/bin/python scripts/bench.d/request_cpu.py

Without BENCH_OTHER only this tree is measured. BENCH_RUNS rounds (default 5),
BENCH_REQUESTS requests a round (default 20000).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
TREE = HERE.parents[2]
RUNS = int(os.environ.get("BENCH_RUNS", "5"))
REQUESTS = int(os.environ.get("BENCH_REQUESTS", "20000"))

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
"""


def rate(tree: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(REQUESTS)], env=env, check=True,
                         capture_output=True, text=True, cwd=tree).stdout  # fmt: skip
    return float(out.strip().splitlines()[-1])


def summary(values: list[float]) -> str:
    return f"{min(values):,.0f} / {statistics.median(values):,.0f} / {max(values):,.0f}"


def main() -> None:
    other = os.environ.get("BENCH_OTHER")
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(RUNS):
        if other:
            theirs.append(rate(Path(other)))
        ours.append(rate(TREE))
    print("## GET /jobs/{id}, in process: requests per CPU-second (min / median / max)\n")
    print("| tree | req per CPU-s |")
    print("|---|---|")
    if other:
        print(f"| {other} | {summary(theirs)} |")
    print(f"| this tree | {summary(ours)} |")
    if other:
        ratio = statistics.median(ours) / statistics.median(theirs)
        print(f"\nthis tree / other, medians: {ratio:.2f}x")
        # each round's pair ran back to back, under much the same load
        rounds = [a / b for a, b in zip(ours, theirs, strict=True)]
        spread = f"{min(rounds):.2f} / {statistics.median(rounds):.2f} / {max(rounds):.2f}"
        print(f"this tree / other, round by round (min / median / max): {spread}")


if __name__ == "__main__":
    main()
