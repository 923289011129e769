"""Transfer benchmarks: Globus transfers through the API against cp, and task_list.

One running service with endpoints `src` and `dst` on one file system, driven by the
Globus SDK (the client scripts use). Floors and ours alternate run by run in this one
invocation, each timed step started on a drained disk (_copyfloors.py):

- one 2 GiB file: submit_transfer to SUCCEEDED, against `cp` then `sync FILE` (the
  task flushes every copy before it gets its real name: a durable copy, whose floor is
  the durable one), and plain `cp` of the same file into the same file system;
- 10,000 files of 4 KiB in 100 folders (one recursive item): to SUCCEEDED, against
  plain `cp -r`, and `cp -r` then `sync -f` (syncfs);
- task_list with 10,000 tasks (made by a second service without a processor, so they
  stay queued): the first page (the SDK's default: 10, newest first), p50 and p99 of
  200 requests after one warm-up.

BENCH_RUNS (default 5), BENCH_SCALE (default 1), BENCH_DIR: see _copyfloors.py;
BENCH_TASKS the number of tasks listed (default 10,000; 0: none); BENCH_COPIES which copies run
(`big,small`, the default, or one of them). BENCH_OTHER=/path/to/other/checkout runs
that tree's service (and so its transfer task) as one more step of every run, on a root
and a destination folder of its own, with its ratios to the same floors and ours to it.
Each service runs its own tree's code, its tasks too (PYTHONPATH, PYTHONSAFEPATH).
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _copyfloors as cf
import globus_sdk

TASKS = int(os.environ.get("BENCH_TASKS", "10000"))
TOKEN = "bench-token-0123456789"
THIS = Path(__file__).resolve().parents[2]
OTHER = os.environ.get("BENCH_OTHER", "")
COPIES = os.environ.get("BENCH_COPIES", "big,small").split(",")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    def __init__(self, root: Path, *args: str, tree: Path = THIS) -> None:
        self.root = root
        self.port = free_port()
        # the tree's own code, also in the tasks it spawns (an editable install would
        # otherwise give them the installed tree's); the script's folder not on the path
        env = dict(os.environ, BATCHINGEST_TOKENS=TOKEN, PYTHONPATH=str(tree), PYTHONSAFEPATH="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batchingest.cli", "serve", "--root", str(root), "--init",
             "--port", str(self.port), "--log-level", "warning", *args],
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


def transfer(svc: Service, src: str, dst: str, recursive: bool) -> cf.Timed:
    """Seconds from submit_transfer to SUCCEEDED, started on a drained disk, and the
    service's CPU time meanwhile (its transfer task's included).

    The end is seen by the task's job landing in success/ (a stat every 5 ms), then
    confirmed with one get_task: asking get_task every few milliseconds, as no client
    does, would take the CPU the copy needs on a small machine.
    """
    cf.DRAINS.drain()
    data = globus_sdk.TransferData(source_endpoint="src", destination_endpoint="dst")
    data.add_item(src, dst, recursive=recursive)
    cpu = cf.process_cpu(svc.proc.pid)
    t0 = time.perf_counter()
    task_id = svc.tc.submit_transfer(data)["task_id"]
    ends = [svc.root / state / task_id for state in ("success", "error")]
    while not any(p.exists() for p in ends):
        time.sleep(0.005)
    elapsed = time.perf_counter() - t0
    used = cf.process_cpu(svc.proc.pid) - cpu
    status = svc.tc.get_task(task_id)
    assert status["status"] == "SUCCEEDED", status.data
    return cf.Timed(elapsed, used)


def empty(folder: Path) -> None:
    for p in folder.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def compare(
    services: dict[str, Service], base: Path, name: str, recursive: bool
) -> dict[str, cf.Series]:
    """cp, cp then flush, and a transfer of the same data by each service, interleaved
    run by run."""
    src, cps = base / "src" / name, base / "cp"

    def floor(make: Callable[[Path, Path, bool], list[str]], at: str) -> Callable[[int], cf.Timed]:
        def step(run: int) -> cf.Timed:
            (cps / at).mkdir()
            return cf.run_cmd(make(src, cps / at / name, recursive))

        return step

    def ours(svc: Service) -> Callable[[int], cf.Timed]:
        def step(run: int) -> cf.Timed:
            shown = f"/{name}/" if recursive else f"/{name}"
            return transfer(svc, shown, shown, recursive)

        return step

    def cleanup() -> None:
        for folder in (*(destination(base, label) for label in services), cps):
            empty(folder)

    r = " -r" if recursive else ""
    steps = {f"cp{r} + sync{' -f' if r else ''}": floor(cf.cp_sync, "synced"),
             f"cp{r}": floor(cf.cp, "plain")}  # fmt: skip
    steps.update((label, ours(svc)) for label, svc in services.items())
    return cf.interleave(cf.RUNS, steps, cleanup)


def destination(base: Path, label: str) -> Path:
    """The destination endpoint's folder of the service labelled label."""
    return base / ("dst" if label == "batchingest" else "dst-other")


def start(base: Path) -> dict[str, Service]:
    """This tree's service, and BENCH_OTHER's if given, each on a root of its own."""
    trees = {"batchingest": THIS, **({"BENCH_OTHER": Path(OTHER).resolve()} if OTHER else {})}
    services: dict[str, Service] = {}
    try:
        for label, tree in trees.items():
            dst = destination(base, label)
            dst.mkdir()
            services[label] = Service(base / f"root-{dst.name}", "--endpoint",
                                      f"src={base / 'src'}", "--endpoint", f"dst={dst}",
                                      tree=tree)  # fmt: skip
    except BaseException:
        for svc in services.values():
            svc.stop()
        raise
    return services


def rows_of(title: str, unit: Callable[[float], str], series: dict[str, cf.Series],
            floors: list[tuple[str, str]]) -> list[str]:  # fmt: skip
    """Our rows against the floors; with BENCH_OTHER, its rows and ours against it."""
    against = [(series[f], target) for f, target in floors]
    rows = cf.table(title, unit, series["batchingest"], against)
    if "BENCH_OTHER" in series:
        other = series["BENCH_OTHER"]
        rows += cf.table(title, unit, other, [(s, "") for s, _ in against])
        rows.append(f"| {title}: batchingest vs BENCH_OTHER ({OTHER}) | | "
                    f"{cf.ratio(other, series['batchingest'])} | | | "
                    f"{cf.cpu_ratio(other, series['batchingest'])} |")  # fmt: skip
    return rows


def copies(base: Path) -> list[str]:
    (base / "src").mkdir()
    (base / "cp").mkdir()
    if "big" in COPIES:
        cf.make_big(base / "src" / "big.bin")
    if "small" in COPIES:
        cf.make_tree(base / "src" / "tree")
    services = start(base)
    try:
        big = compare(services, base, "big.bin", False) if "big" in COPIES else {}
        small = compare(services, base, "tree", True) if "small" in COPIES else {}
    finally:
        for svc in services.values():
            svc.stop()
    rows: list[str] = []
    if big:
        # a transfer is a durable copy (SUCCEEDED once its data is on disk), so its floor
        # is the durable one, `cp` + `sync`, as for staging; plain `cp` is shown beside it
        rows += rows_of(f"one {cf.BIG_MIB / 1024:g} GiB file, GiB/s", cf.gib_per_s(cf.BIG_MIB),
                        big, [("cp + sync", ">= 0.9x"), ("cp", "")])  # fmt: skip
    if small:
        rows += rows_of(f"{cf.FILES:,} x 4 KiB in {cf.FOLDERS} folders, files/s",
                        cf.files_per_s(cf.FILES), small,
                        [("cp -r", ">= 0.5x"), ("cp -r + sync -f", "")])  # fmt: skip
        per_file = []
        for label, series in small.items():
            us = sorted(c / cf.FILES * 1e6 for c in series.cpu)
            per_file.append(f"{label} {us[0]:.0f} / {statistics.median(us):.0f} / {us[-1]:.0f}")
        rows.append(f"\nCPU per file, small (min / median / max, us): {'; '.join(per_file)}")
    for label, found in (("big", big), ("small", small)):
        if found:
            raw = "; ".join(f"{s.name} {[round(x, 3) for x in s.seconds]}" for s in found.values())
            rows.append(f"\nraw seconds, {label}: {raw}")
    return rows


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
        rows = copies(base)
        print(f"## Transfers ({cf.RUNS} runs, interleaved; endpoints on one file system)\n")
        print("\n".join(cf.header() + rows))
        print(f"\n{cf.DRAINS.line()}")
        if TASKS:  # BENCH_TASKS=0: the copies only
            print("\n| measure | batchingest | same run | target |")
            print("|---|---|---|---|")
            for line in task_list(base):
                print(line, flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
