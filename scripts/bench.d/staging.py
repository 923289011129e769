"""Staging benchmarks: copy throughput against cp, and the status endpoint under load.

One running service (`--archive`, `--staging` on the same file system as the copies
made by cp). Floors and ours alternate run by run in this one invocation, each timed
step started on a drained disk (_copyfloors.py: sync, then Dirty + Writeback low):

- one 2 GiB file: POST /dts/staging to `ready`, against `cp` of the same file into the
  same file system then `sync FILE` (the stage task flushes every copy before it gets
  its real name), and plain `cp`;
- 10,000 files of 4 KiB in 100 folders: POST to `ready`, against `cp -r` then
  `sync -f` (syncfs), and plain `cp -r`;
- GET /dts/staging?id= latency (client round trip, keep-alive and new connections)
  during one more run of each, not timed.

BENCH_RUNS (default 5), BENCH_SCALE (default 1), BENCH_DIR: see _copyfloors.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import _copyfloors as cf
import httpx

TOKEN = "bench-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Bench:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "root"
        self.archive = base / "archive"
        self.staging = base / "staging"
        self.copies = base / "copies"
        for d in (self.archive, self.staging, self.copies):
            d.mkdir()
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.polls: dict[str, tuple[list[float], list[float]]] = {}

    def start(self) -> None:
        env = dict(os.environ, BATCHINGEST_TOKENS=TOKEN)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batchingest.cli", "serve", "--root", str(self.root),
             "--archive", str(self.archive), "--staging", str(self.staging),
             "--port", str(self.port), "--log-level", "warning", "--init"],
            env=env, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.client = httpx.Client(
            base_url=f"http://127.0.0.1:{self.port}", headers={"X-Api-Token": TOKEN}, timeout=60
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if self.client.get("/healthz").status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise SystemExit("service did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(60)

    def stage(self, ids: list[str], poll: str = "") -> cf.Timed:
        """Seconds from the POST to the job being done (in success/), on an empty staging
        area and a drained disk, and the service's CPU time meanwhile (its stage task's
        included); polls the status meanwhile if poll names the workload."""
        cf.DRAINS.drain()
        stop = threading.Event()
        assert self.proc is not None
        cpu = cf.process_cpu(self.proc.pid)
        t0 = time.perf_counter()
        r = self.client.post("/dts/staging", json={"ids": ids})
        r.raise_for_status()
        rid = r.json()["request_id"]
        poller = None
        if poll:
            self.polls[poll] = ([], [])
            poller = threading.Thread(target=self._poll, args=(rid, *self.polls[poll], stop))
            poller.start()
        done, failed = self.root / "success" / rid, self.root / "error" / rid
        while not done.exists():
            if failed.exists():
                raise SystemExit(f"staging failed: {(failed / 'LOG').read_text()[-2000:]}")
            time.sleep(0.002)
        elapsed = time.perf_counter() - t0
        used = cf.process_cpu(self.proc.pid) - cpu
        stop.set()
        if poller is not None:
            poller.join()
        if self.client.get("/dts/staging", params={"id": rid}).json()["status"] != "ready":
            raise SystemExit("status is not ready")
        return cf.Timed(elapsed, used)

    def _poll(self, rid: str, kept: list[float], fresh: list[float], stop: threading.Event) -> None:
        """Alternate a request on a kept-alive connection and one on a new connection."""
        url, headers = self.client.base_url, {"X-Api-Token": TOKEN}
        with httpx.Client(base_url=url, headers=headers) as c:
            c.get("/healthz")
            while not stop.is_set():
                t0 = time.perf_counter()
                r = c.get("/dts/staging", params={"id": rid})
                kept.append(time.perf_counter() - t0)
                assert r.status_code == 200
                time.sleep(0.01)
                with httpx.Client(base_url=url, headers=headers) as once:
                    t0 = time.perf_counter()
                    r = once.get("/dts/staging", params={"id": rid})
                    fresh.append(time.perf_counter() - t0)
                assert r.status_code == 200
                time.sleep(0.01)


def clear(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()


def compare(
    b: Bench, src: Path, ids: list[str], recursive: bool, poll: str
) -> dict[str, cf.Series]:
    """cp, cp then flush, and staging of the same data, interleaved run by run."""

    def floor(make: Callable[[Path, Path, bool], list[str]], at: str) -> Callable[[int], cf.Timed]:
        def step(run: int) -> cf.Timed:
            (b.copies / at).mkdir()
            return cf.run_cmd(make(src, b.copies / at / src.name, recursive))

        return step

    def cleanup() -> None:
        clear(b.copies)
        clear(b.staging)

    series = cf.interleave(cf.RUNS, {
        "cp + sync" if not recursive else "cp -r + sync -f": floor(cf.cp_sync, "synced"),
        "cp" if not recursive else "cp -r": floor(cf.cp, "plain"),
        "batchingest": lambda run: b.stage(ids),
    }, cleanup)  # fmt: skip
    # the status endpoint's latency in one more run, not timed: its requests take CPU
    # the copy would have on a small machine
    cleanup()
    b.stage(ids, poll)
    return series


def ms(xs: list[float], q: float = 0.5) -> str:
    if not xs:
        return "-"
    xs = sorted(xs)
    return f"{xs[min(len(xs) - 1, int(q * len(xs)))] * 1000:.1f} ms"


def report(b: Bench, big: dict[str, cf.Series], small: dict[str, cf.Series]) -> None:
    print(f"## Staging ({cf.RUNS} runs, interleaved, {os.cpu_count()} cores, {b.base.parent})")
    print()
    print("\n".join(cf.header()))
    big_title = f"one {cf.BIG_MIB / 1024:g} GiB file, GiB/s"
    print("\n".join(cf.table(big_title, cf.gib_per_s(cf.BIG_MIB), big["batchingest"], [
        (big["cp + sync"], ">= 1.0x"), (big["cp"], "")])))  # fmt: skip
    small_title = f"{cf.FILES:,} x 4 KiB in {cf.FOLDERS} folders, files/s"
    print("\n".join(cf.table(small_title, cf.files_per_s(cf.FILES), small["batchingest"], [
        (small["cp -r + sync -f"], ">= 0.8x"), (small["cp -r"], ">= 0.3x")])))  # fmt: skip
    print()
    print(cf.DRAINS.line())
    print()
    print("| status endpoint while staging runs | connection | samples | p50 | p95 | target |")
    print("|---|---|---|---|---|---|")
    for name, (kept, fresh) in b.polls.items():
        for how, xs in (("kept alive", kept), ("new", fresh)):
            print(f"| {name} | {how} | {len(xs)} | {ms(xs)} | {ms(xs, 0.95)} | p50 <= 10 ms |")
    print()
    for name, rows in (("big", big), ("small", small)):
        raw = "; ".join(f"{s.name} {[round(x, 3) for x in s.seconds]}" for s in rows.values())
        print(f"raw seconds, {name}: {raw}")


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="bench-staging-", dir=os.environ.get("BENCH_DIR")))
    b = Bench(base)
    try:
        b.start()
        cf.make_big(b.archive / "big" / "file.bin")
        big = compare(b, b.archive / "big" / "file.bin", ["big/file.bin"], False, "one big file")
        ids = cf.make_tree(b.archive / "tree")
        small = compare(b, b.archive / "tree", ids, True, f"{cf.FILES:,} small files")
    finally:
        b.stop()
        shutil.rmtree(base, ignore_errors=True)
    report(b, big, small)


if __name__ == "__main__":
    main()
