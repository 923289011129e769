"""Staging benchmarks: copy throughput against cp, and the status endpoint under load.

All figures come from one running service (`--archive`, `--staging` on the same file
system as the copies made by cp), medians of BENCH_RUNS runs (default 5: disk-bound
figures are noisy):

- one 2 GiB file: POST /dts/staging to `ready`, against `cp` of the same file into the
  same file system, and `cp` followed by an fsync of the copy (`sync FILE`; the stage
  task flushes every copy before it gets its real name);
- 10,000 files of 4 KiB in 100 folders: POST to `ready`, against `cp -r` of the tree
  (and `cp -r` then `sync -f`);
- GET /dts/staging?id= latency (client round trip, keep-alive) while a 2 GiB and a
  10,000-file staging run.

Every run starts with the page cache holding the sources and nothing dirty (`sync`).
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
import threading
import time
from pathlib import Path

import httpx

RUNS = int(os.environ.get("BENCH_RUNS", "5"))
BIG_MIB = int(os.environ.get("BENCH_BIG_MIB", "2048"))
FILES, FOLDERS, SMALL = 10_000, 100, 4096
TOKEN = "bench-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sync() -> None:
    subprocess.run(["sync"], check=True)


def timed(cmd: list[str]) -> float:
    sync()
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


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
        self.fresh: list[float] = []
        self.fresh_big: list[float] = []

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

    def stage(self, ids: list[str], poll: list[float] | None = None) -> float:
        """Seconds from the POST to the job being done (in success/); polls status if asked."""
        sync()
        stop = threading.Event()
        poller = None
        if poll is not None:
            poller = threading.Thread(target=self._poll, args=(poll, stop))
        t0 = time.perf_counter()
        r = self.client.post("/dts/staging", json={"ids": ids})
        r.raise_for_status()
        rid = r.json()["request_id"]
        if poller is not None:
            self._rid = rid
            poller.start()
        done, failed = self.root / "success" / rid, self.root / "error" / rid
        while not done.exists():
            if failed.exists():
                raise SystemExit(f"staging failed: {(failed / 'LOG').read_text()[-2000:]}")
            time.sleep(0.002)
        elapsed = time.perf_counter() - t0
        stop.set()
        if poller is not None:
            poller.join()
        if self.client.get("/dts/staging", params={"id": rid}).json()["status"] != "ready":
            raise SystemExit("status is not ready")
        return elapsed

    def _poll(self, samples: list[float], stop: threading.Event) -> None:
        """Alternate a request on a kept-alive connection and one on a new connection."""
        url, headers = self.client.base_url, {"X-Api-Token": TOKEN}
        fresh: list[float] = []
        with httpx.Client(base_url=url, headers=headers) as c:
            c.get("/healthz")
            while not stop.is_set():
                t0 = time.perf_counter()
                r = c.get("/dts/staging", params={"id": self._rid})
                samples.append(time.perf_counter() - t0)
                assert r.status_code == 200
                time.sleep(0.01)
                with httpx.Client(base_url=url, headers=headers) as once:
                    t0 = time.perf_counter()
                    r = once.get("/dts/staging", params={"id": self._rid})
                    fresh.append(time.perf_counter() - t0)
                assert r.status_code == 200
                time.sleep(0.01)
        self.fresh = fresh


def clear(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()


def big_file(b: Bench) -> tuple[list[float], list[float], list[float], list[float]]:
    src = b.archive / "big" / "file.bin"
    src.parent.mkdir()
    block = os.urandom(16 << 20)
    with open(src, "wb") as f:
        for _ in range(BIG_MIB // 16):
            f.write(block)
    cp, cp_sync, stage, poll = [], [], [], []
    b.fresh = []
    dst = b.copies / "file.bin"
    for run in range(RUNS):
        dst.unlink(missing_ok=True)
        cp.append(timed(["cp", str(src), str(dst)]))
        dst.unlink()
        cp_sync.append(timed(["sh", "-c", f'cp "{src}" "{dst}" && sync "{dst}"']))
        dst.unlink()
        clear(b.staging)
        stage.append(b.stage(["big/file.bin"], poll if run == RUNS - 1 else None))
    clear(b.staging)
    b.fresh_big = b.fresh
    return cp, cp_sync, stage, poll


def small_files(b: Bench) -> tuple[list[float], list[float], list[float], list[float]]:
    tree = b.archive / "tree"
    ids = []
    for d in range(FOLDERS):
        folder = tree / f"d{d:03d}"
        folder.mkdir(parents=True)
        for i in range(FILES // FOLDERS):
            (folder / f"f{i:04d}.dat").write_bytes(os.urandom(SMALL))
            ids.append(f"tree/d{d:03d}/f{i:04d}.dat")
    cp, cp_sync, stage, poll = [], [], [], []
    b.fresh = []
    dst = b.copies / "tree"
    for run in range(RUNS):
        shutil.rmtree(dst, ignore_errors=True)
        cp.append(timed(["cp", "-r", str(tree), str(dst)]))
        shutil.rmtree(dst)
        cp_sync.append(timed(["sh", "-c", f'cp -r "{tree}" "{dst}" && sync -f "{dst}"']))
        shutil.rmtree(dst)
        clear(b.staging)
        stage.append(b.stage(ids, poll if run == RUNS - 1 else None))
    clear(b.staging)
    return cp, cp_sync, stage, poll


def ms(xs: list[float], q: float = 0.5) -> str:
    xs = sorted(xs)
    return f"{xs[min(len(xs) - 1, int(q * len(xs)))] * 1000:.1f} ms"


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="bench-staging-", dir=os.environ.get("BENCH_DIR")))
    b = Bench(base)
    try:
        b.start()
        big = big_file(b)
        small = small_files(b)
    finally:
        b.stop()
        shutil.rmtree(base, ignore_errors=True)
    med = statistics.median
    gib = BIG_MIB / 1024
    print(f"## Staging (medians of {RUNS} runs, {os.cpu_count()} cores, {base.parent})")
    print()
    print("| workload | batchingest | cp | cp + fsync | vs cp | vs cp + fsync | target |")
    print("|---|---|---|---|---|---|---|")
    cp, cps, st, _ = big
    print(f"| one {gib:g} GiB file, POST to ready | {gib / med(st):.2f} GiB/s | "
          f"{gib / med(cp):.2f} GiB/s | {gib / med(cps):.2f} GiB/s | {med(cp) / med(st):.2f}x | "
          f"{med(cps) / med(st):.2f}x | >= 0.9x cp |")  # fmt: skip
    cp, cps, st, _ = small
    print(f"| {FILES:,} x 4 KiB in {FOLDERS} folders, POST to ready | {FILES / med(st):,.0f} "
          f"files/s | {FILES / med(cp):,.0f} files/s | {FILES / med(cps):,.0f} files/s | "
          f"{med(cp) / med(st):.2f}x | {med(cps) / med(st):.2f}x | >= 0.5x cp -r |")  # fmt: skip
    print()
    print("| status endpoint while staging runs | connection | samples | p50 | p95 | target |")
    print("|---|---|---|---|---|---|")
    for name, (_, _, _, poll), fresh in (
        (f"one {gib:g} GiB file", big, b.fresh_big),
        (f"{FILES:,} small files", small, b.fresh),
    ):
        for how, xs in (("kept alive", poll), ("new", fresh)):
            print(f"| {name} | {how} | {len(xs)} | {ms(xs)} | {ms(xs, 0.95)} | p50 <= 10 ms |")
    print()
    print(
        f"raw seconds: big cp {big[0]}, cp+fsync {big[1]}, stage {big[2]}; "
        f"small cp {small[0]}, cp+fsync {small[1]}, stage {small[2]}"
    )


if __name__ == "__main__":
    main()
