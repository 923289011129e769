"""Cancel benchmark: from `POST /jobs/{id}/cancel` to the task's process group gone.

The real service (API and processor in one process) on a temporary jobs root; each job's
task writes its pid and `exec`s `sleep 60`, which exits on SIGTERM, so the task's group
is that one process. A sample starts just before the POST is sent and ends when
/proc/PID is gone or a zombie (polled every 0.2 ms). Next to it, in the same run, the
round trip of `GET /jobs/{id}` on the same connection: what any request costs. The
holder learns of a request by looking for the job's `.cancel` every 50 ms, so about
half of that is expected on top.

With BENCH_API_PROCESSES=N (N > 1) a third kind of run: one service with
`--api-processes N`, each request on a connection of its own so that the cancels reach
every process (an extra process wakes the holder through the main one).

Environment: BENCH_RUNS (default 3), BENCH_DIR (default the system temp folder),
BENCH_API_PROCESSES (default 1: no third kind). The kinds alternate run by run.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
PROCESSES = int(os.environ.get("BENCH_API_PROCESSES", "1"))
SAMPLES = 30
TOKEN = "bench-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_until(predicate, timeout: float = 30.0, step: float = 0.0002) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(step)


def serve(root: Path, port: int, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "BATCHINGEST_TOKENS": TOKEN}
    return subprocess.Popen(
        [sys.executable, "-m", "batchingest.cli", "serve", "--root", str(root),
         "--port", str(port), "--log-level", "warning", *args],
        env=env, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def one_run(base: Path, split: bool, processes: int = 1) -> tuple[list[float], list[float]]:
    """Samples of one run; split: the API and the processor in two services; processes:
    --api-processes, with a connection per request."""
    root = Path(tempfile.mkdtemp(dir=base))
    for state in ("data", "queue", "processing", "success", "error", "tasks"):
        (root / state).mkdir()
    task = root / "tasks" / "start"
    # the pid file appears complete (renamed into place); sleep exits on SIGTERM
    task.write_text("#!/bin/sh\necho $$ > pid.tmp\nmv pid.tmp pid\nexec sleep 60\n")
    task.chmod(0o755)
    port = free_port()
    procs = (
        [serve(root, port, "--no-processor"), serve(root, free_port(), "--no-api")]
        if split
        else [serve(root, port, "--api-processes", str(processes))]
    )
    cancels: list[float] = []
    gets: list[float] = []
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        headers = {"X-Api-Token": TOKEN}

        def request(method: str, path: str) -> int:
            nonlocal conn
            if processes > 1:  # the kernel picks a process per connection
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request(method, path, headers=headers)
            r = conn.getresponse()
            r.read()
            return r.status

        wait_until(lambda: _answers(port), 20, 0.05)
        if processes > 1:
            time.sleep(3.0)  # the extra processes started and serving
        for i in range(SAMPLES):
            name = f"j{i}"
            build = root / "queue" / f".{name}"
            build.mkdir()
            os.rename(build, root / "queue" / name)
            pid_file = root / "processing" / name / "pid"
            wait_until(pid_file.exists)
            pid = int(pid_file.read_text())
            t0 = time.perf_counter()
            assert request("GET", f"/jobs/{name}") == 200
            gets.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            assert request("POST", f"/jobs/{name}/cancel") == 202
            wait_until(lambda pid=pid: gone(pid))  # type: ignore[misc]
            cancels.append(time.perf_counter() - t0)
            wait_until((root / "error" / name).is_dir)
        conn.close()
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(root, ignore_errors=True)
    return cancels, gets


def _answers(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/healthz")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="batchingest-bench-", dir=os.environ.get("BENCH_DIR")))
    try:
        one, two, many = [], [], []
        for _ in range(RUNS):
            one.append(one_run(base, split=False))
            two.append(one_run(base, split=True))
            if PROCESSES > 1:
                many.append(one_run(base, split=False, processes=PROCESSES))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    get50 = statistics.median(pct(g, 0.5) for _, g in one) * 1000
    print("## Cancel")
    print()
    print(f"{RUNS} runs of {SAMPLES} jobs, medians; {os.cpu_count()} cores")
    print()
    print("| cancel latency (POST → task group gone) | p50 | p90 | max | target |")
    print("|---|---|---|---|---|")
    kinds = [("API and processor in one service", one),
             ("API in one service, the holder in another", two)]  # fmt: skip
    if many:
        kinds.append((f"one service, {PROCESSES} API processes, a connection per request", many))
    for what, runs in kinds:
        p50 = statistics.median(pct(c, 0.5) for c, _ in runs) * 1000
        p90 = statistics.median(pct(c, 0.9) for c, _ in runs) * 1000
        hi = max(max(c) for c, _ in runs) * 1000
        print(f"| {what} | {p50:.1f} ms | {p90:.1f} ms | {hi:.1f} ms | p50 <= 50 ms |")
    print()
    print(f"Same run: `GET /jobs/{{id}}` round trip p50 {get50:.1f} ms.")


if __name__ == "__main__":
    main()
