"""Transfer benchmarks: Globus transfers through the API against cp, and task_list.

One running service with endpoints `src` and `dst` on one file system, driven by the
Globus SDK (the client scripts use); medians of BENCH_RUNS runs (default 3):

- one 2 GiB file: submit_transfer to SUCCEEDED, against `cp` of the same file into the
  same file system, and `cp` then `sync FILE` (the task flushes every copy before it gets
  its real name);
- 10,000 files of 4 KiB in 100 folders (one recursive item): to SUCCEEDED, against
  `cp -r` (and `cp -r` then `sync -f`);
- task_list with 10,000 tasks (made by a second service without a processor, so they
  stay queued): the first page (the SDK's default: 10, newest first), p50 and p99 of
  200 requests after one warm-up.

BENCH_DIR picks the file system (default: the temporary folder); BENCH_BIG_MIB the size
of the big file.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import globus_sdk

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
BIG_MIB = int(os.environ.get("BENCH_BIG_MIB", "2048"))
FILES, FOLDERS, SMALL = 10_000, 100, 4096
TASKS = int(os.environ.get("BENCH_TASKS", "10000"))
TOKEN = "bench-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed(cmd: list[str]) -> float:
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


class Service:
    def __init__(self, root: Path, *args: str) -> None:
        self.port = free_port()
        env = dict(os.environ, BATCHINGEST_TOKENS=TOKEN)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batchingest.cli", "serve", "--root", str(root), "--init",
             "--port", str(self.port), "--log-level", "warning", "--poll-interval", "0.5",
             *args],
            env=env, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.tc = globus_sdk.TransferClient(
            base_url=f"http://127.0.0.1:{self.port}/globus/",
            authorizer=globus_sdk.AccessTokenAuthorizer(TOKEN),
        )
        for _ in range(200):
            try:
                self.tc.get_submission_id()
                return
            except Exception:
                time.sleep(0.1)
        raise RuntimeError("service did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def transfer(tc: globus_sdk.TransferClient, src: str, dst: str, recursive: bool) -> float:
    subprocess.run(["sync"], check=True)
    data = globus_sdk.TransferData(source_endpoint="src", destination_endpoint="dst")
    data.add_item(src, dst, recursive=recursive)
    t0 = time.perf_counter()
    task_id = tc.submit_transfer(data)["task_id"]
    while True:
        status = tc.get_task(task_id, query_params={"fields": "status"})["status"]
        if status != "ACTIVE":
            break
        time.sleep(0.01)
    elapsed = time.perf_counter() - t0
    assert status == "SUCCEEDED", tc.get_task(task_id).data
    return elapsed


def copies(base: Path) -> list[str]:
    src, dst, cps = base / "src", base / "dst", base / "cp"
    for d in (src, dst, cps):
        d.mkdir()
    big = src / "big.bin"
    with open(big, "wb") as f:
        for _ in range(BIG_MIB):
            f.write(os.urandom(1 << 20))
    for i in range(FILES):
        folder = src / "tree" / f"d{i % FOLDERS:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i:05d}").write_bytes(os.urandom(SMALL))
    svc = Service(base / "root", "--endpoint", f"src={src}", "--endpoint", f"dst={dst}")
    rows: dict[str, list[float]] = {k: [] for k in ("big", "cp", "cp+sync", "tree", "cpr",
                                                    "cpr+sync")}  # fmt: skip
    try:
        for run in range(RUNS):
            rows["big"].append(transfer(svc.tc, "/big.bin", f"/big{run}.bin", False))
            rows["cp"].append(timed(["cp", str(big), str(cps / f"big{run}")]))
            rows["cp+sync"].append(timed(["sh", "-c", f'cp "{big}" "{cps}/bs{run}" && '
                                                      f'sync "{cps}/bs{run}"']))  # fmt: skip
            rows["tree"].append(transfer(svc.tc, "/tree/", f"/tree{run}/", True))
            rows["cpr"].append(timed(["cp", "-r", str(src / "tree"), str(cps / f"t{run}")]))
            rows["cpr+sync"].append(timed(["sh", "-c", f'cp -r "{src}/tree" "{cps}/ts{run}" && '
                                                       f'sync -f "{cps}"']))  # fmt: skip
            for d in (dst, cps):
                for p in d.iterdir():
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
    finally:
        svc.stop()
    m = {k: statistics.median(v) for k, v in rows.items()}
    gib = BIG_MIB / 1024
    return [
        f"| one {BIG_MIB} MiB file | {gib / m['big']:.2f} GiB/s | {gib / m['cp']:.2f} GiB/s | "
        f"{gib / m['cp+sync']:.2f} GiB/s | {m['cp'] / m['big']:.2f}x | ≥ 0.9x |",
        f"| {FILES:,} x 4 KiB in {FOLDERS} folders | {FILES / m['tree']:,.0f} files/s | "
        f"{FILES / m['cpr']:,.0f} files/s | {FILES / m['cpr+sync']:,.0f} files/s | "
        f"{m['cpr'] / m['tree']:.2f}x | ≥ 0.5x |",
    ]


def task_list(base: Path) -> list[str]:
    data = base / "tl-data"
    data.mkdir()
    svc = Service(base / "tl-root", "--endpoint", f"data={data}", "--no-processor")
    try:

        def submit(i: int) -> None:
            td = globus_sdk.TransferData(source_endpoint="data", destination_endpoint="data",
                                         label=f"t{i}")  # fmt: skip
            td.add_item(f"/a{i}", f"/b{i}")
            svc.tc.submit_transfer(td)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(submit, range(TASKS)))
        made = time.perf_counter() - t0
        first = time.perf_counter()
        assert svc.tc.task_list()["total"] == TASKS
        cold = time.perf_counter() - first
        times = []
        for _ in range(200):
            t = time.perf_counter()
            svc.tc.task_list()
            times.append(time.perf_counter() - t)
    finally:
        svc.stop()
    times.sort()
    p50, p99 = times[len(times) // 2] * 1000, times[int(len(times) * 0.99)] * 1000
    return [
        f"| task_list first page, {TASKS:,} tasks | p50 {p50:.1f} ms, p99 {p99:.1f} ms | "
        f"first call after a start {cold * 1000:.0f} ms; {TASKS / made:,.0f} submissions/s "
        "| p50 ≤ 20 ms |",
    ]


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="bench-transfers-", dir=os.environ.get("BENCH_DIR")))
    try:
        print(f"## Transfers ({RUNS} runs, medians; endpoints on one file system)\n")
        print("| workload | batchingest | `cp` | `cp` + sync | vs `cp` | target |")
        print("|---|---|---|---|---|---|")
        for line in copies(base):
            print(line, flush=True)
        print("\n| measure | batchingest | same run | target |")
        print("|---|---|---|---|")
        for line in task_list(base):
            print(line, flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
