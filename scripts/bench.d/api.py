"""HTTP API benchmarks: bulk transfers against floors, memory, request rate, listings.

Starts the real service (`batchingest serve --no-processor`) on a temporary jobs root and
measures:
- upload of a BENCH_SIZE_MIB file with `curl -T` against the floor a Python service can
  reach here: a plain asyncio server (standard loop, an asyncio.Protocol) that parses
  just enough HTTP/1.1 (Content-Length or chunked) and writes every piece it receives
  to a file (`python api.py floor-server DIR`, its own process); download with
  `curl -o FILE` against a bare socket server sending the file with sendfile(2).
  Floor and service alternate run by run (which goes first alternates too); before
  every timed step the previous step's output is deleted, the page cache is written
  back (`sync`) and the machine left alone for SETTLE seconds. Each run gives a ratio
  (floor time / our time); min, median and max are printed, and a warning when a
  floor's own times spread more than 2x;
- the service's CPU seconds per GiB moved (from /proc/PID/stat), much steadier than
  wall-clock on a shared machine, next to the upload floor's and to the floor's plus
  SHA-256 alone (hashlib over the same bytes in this process, the least an upload that
  is hashed can cost), and split into the event loop's thread and the others;
- the service's RSS (/proc/PID/status): idle (VmRSS after start), and the peak (VmHWM,
  reset through /proc/PID/clear_refs where allowed) during the uploads and during the
  downloads;
- `GET /jobs/{id}` with 8 concurrent connections (wrk if installed, else a multi-process
  Python load generator, which is slower than the server and so gives a lower bound);
- `GET /jobs` with 10,000 jobs in success/, and `GET /jobs?limit=100`.

Environment: BENCH_RUNS (default 5), BENCH_SIZE_MIB (default 512), BENCH_DIR (where the
jobs root and the test file go; default the system temp folder), BENCH_PARTS (default
`transfers,load,listing`: which of the three to measure; `transfers` alone takes about
a minute), BENCH_OTHER (another tree, e.g. an older checkout: its service's uploads
are measured too, in the same rounds against the same floor), BENCH_PROCESSOR=1 (the
services run with their processor, as the default `serve` does: its idle memory and
peaks).
To compare two versions in one sitting, run this twice, once with
`PYTHONPATH=/other/tree`: the service subprocess then runs that tree's code (without it,
this file's own tree, whatever the current folder).
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import multiprocessing
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from _copyfloors import children_cpu
from live_service import TOKEN, Service

RUNS = int(os.environ.get("BENCH_RUNS", "5"))
SIZE = int(os.environ.get("BENCH_SIZE_MIB", "512")) << 20
SETTLE = 1.0
LOAD_SECONDS = 5
LIST_JOBS = 10_000
PARTS = os.environ.get("BENCH_PARTS", "transfers,load,listing").split(",")
OTHER = os.environ.get("BENCH_OTHER", "")
# BENCH_PROCESSOR=1: the default `serve`, its processor running beside the API
SERVE_ARGS = () if os.environ.get("BENCH_PROCESSOR") == "1" else ("--no-processor",)


def timed(cmd: list[str], before: list[Path]) -> float:
    """Seconds cmd takes, from a quiet start: `before` (the previous outputs) deleted,
    dirty pages written back, SETTLE seconds of rest."""
    for path in before:
        path.unlink(missing_ok=True)
    subprocess.run(["sync"], check=True)
    time.sleep(SETTLE)
    cpu = children_cpu()
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    CLIENT_CPU.append(children_cpu() - cpu)
    return seconds


# the CPU seconds of each timed command (the client, curl), in order
CLIENT_CPU: list[float] = []


def reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mib(pid: int, field: str = "VmHWM") -> float:
    """VmRSS (now) or VmHWM (peak) of the process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def service_cpu(pid: int) -> float:
    """User + system CPU seconds the process has used so far."""
    return stat_cpu(Path(f"/proc/{pid}/stat"))


def stat_cpu(stat: Path) -> float:
    """User + system CPU seconds in a /proc stat file (a process's or a thread's)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_file(path: Path, size: int) -> None:
    chunk = os.urandom(8 << 20)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)


class RawPeer:
    """The download floor: a bare socket server answering GET with sendfile(2) of a file;
    no HTTP library, no checks. It shows how much of a download is curl and the loopback."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    head += conn.recv(65536)
                size = self.source.stat().st_size
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
                with open(self.source, "rb") as f:
                    conn.sendfile(f)

    def close(self) -> None:
        self.sock.close()


class FloorUpload(asyncio.Protocol):
    """The upload floor: one request body written to a file as it arrives, 201.

    Just enough HTTP/1.1 for `curl -T`: the head's Content-Length or chunked coding and
    Expect: 100-continue. Every piece received is written at once with os.write (the
    standard loop reads at most 256 KiB at a time); nothing is hashed or checked.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.buf = bytearray()
        self.fd = -1
        self.left = 0  # body bytes still to come (Content-Length), or of this chunk
        self.chunked = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.fd < 0:
            self.buf += data
            head, sep, rest = bytes(self.buf).partition(b"\r\n\r\n")
            if not sep:
                return
            self.buf = bytearray()
            self._start(head)
            data = rest
        if self.chunked:
            self.buf += data
            self._chunks()
        else:
            self._write(data[: self.left])
            self.left -= min(len(data), self.left)
            if not self.left:
                self._done()

    def _start(self, head: bytes) -> None:
        self.left, self.chunked = 0, False
        for line in head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            key, value = key.strip().lower(), value.strip().lower()
            if key == b"content-length":
                self.left = int(value)
            elif key == b"transfer-encoding":
                self.chunked = b"chunked" in value
            elif key == b"expect" and value == b"100-continue":
                assert self.transport is not None
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        name = os.path.join(self.folder, f"floor-{time.monotonic_ns()}")
        self.fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        if not self.left and not self.chunked:
            self._done()

    def _chunks(self) -> None:
        """Chunked coding: a size line, that many bytes, CRLF; size 0 ends the body.
        (Not the measured path: `curl -T FILE` sends a Content-Length.)"""
        while self.fd >= 0:
            if self.left:
                n = min(self.left, len(self.buf))
                self._write(self.buf[:n])
                del self.buf[:n]
                self.left -= n
                if self.left:
                    return
            end = self.buf.find(b"\r\n")
            if end < 0:
                return
            line = bytes(self.buf[:end]).split(b";")[0].strip()
            del self.buf[: end + 2]
            if line:  # an empty line is the CRLF after a chunk's data
                self.left = int(line, 16)
                if not self.left:
                    self._done()

    def _write(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def _done(self) -> None:
        os.close(self.fd)
        self.fd = -1
        self.buf = bytearray()
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")


def floor_server(folder: str) -> None:
    """`python api.py floor-server DIR`: serve FloorUpload, print the port, run until killed."""

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: FloorUpload(folder), "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    asyncio.run(serve())


def sha256_cpu(rounds: int = 3) -> float:
    """CPU seconds SHA-256 alone takes over SIZE bytes here (the least of rounds)."""
    block = memoryview(os.urandom(1 << 20))
    best = float("inf")
    for _ in range(rounds):
        hasher = hashlib.sha256()
        t0 = time.thread_time()
        for _ in range(SIZE >> 20):
            hasher.update(block)
        best = min(best, time.thread_time() - t0)
    return best


def cpu_of(pid: int, cmd: list[str], before: list[Path]) -> tuple[float, float]:
    """(seconds, CPU seconds of process pid) of a timed step. The CPU of pid's main
    thread (the event loop's) and of its other threads, apart, goes to LOOP_CPU[pid]."""
    cpu = service_cpu(pid)
    with ThreadCpu(pid) as threads:
        seconds = timed(cmd, before)
    LOOP_CPU.setdefault(pid, []).append(threads.split())
    CLIENT_CPU_OF.setdefault(pid, []).append(CLIENT_CPU[-1])
    return seconds, service_cpu(pid) - cpu


# the client's CPU seconds of each step, by the pid of the server it talked to
CLIENT_CPU_OF: dict[int, list[float]] = {}


# (loop thread, other threads) CPU seconds of each step, by pid
LOOP_CPU: dict[int, list[tuple[float, float]]] = {}


class ThreadCpu:
    """CPU seconds each thread of a process used during a step: sampled every 20 ms,
    since an upload's threads end with it and take their figures along (so what a
    thread did in its last 20 ms is missed)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.first = self._read()
        self.last = dict(self.first)
        self.done = threading.Event()
        self.sampler = threading.Thread(target=self._sample, daemon=True)

    def _read(self) -> dict[int, float]:
        got = {}
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                got[int(task.name)] = stat_cpu(task / "stat")
            except OSError:
                continue  # the thread ended
        return got

    def _sample(self) -> None:
        while not self.done.wait(0.02):
            self.last.update(self._read())
        self.last.update(self._read())

    def __enter__(self) -> ThreadCpu:
        self.sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.sampler.join()

    def split(self) -> tuple[float, float]:
        used = {tid: cpu - self.first.get(tid, 0.0) for tid, cpu in self.last.items()}
        loop = used.pop(self.pid, 0.0)
        return loop, sum(used.values())


class Runs:
    """Paired runs of a floor and ours: times and CPU seconds of each, run by run."""

    def __init__(self) -> None:
        self.floor: list[float] = []
        self.ours: list[float] = []
        self.floor_cpu: list[float] = []
        self.ours_cpu: list[float] = []

    def add(self, floor: tuple[float, float], ours: tuple[float, float]) -> None:
        self.floor.append(floor[0])
        self.floor_cpu.append(floor[1])
        self.ours.append(ours[0])
        self.ours_cpu.append(ours[1])

    def ratios(self) -> list[float]:
        """floor time / our time, per run: above 1, ours was faster."""
        return [f / o for f, o in zip(self.floor, self.ours, strict=True)]


Step = Callable[[], tuple[float, float]]


def rounds(steps: list[Step]) -> list[list[tuple[float, float]]]:
    """RUNS rounds of every step, each step's results in a list; the order rotates
    round by round, so no step always follows the same one."""
    got: list[list[tuple[float, float]]] = [[] for _ in steps]
    for i in range(RUNS):
        for k in range(len(steps)):
            j = (i + k) % len(steps)
            got[j].append(steps[j]())
    return got


def runs_of(floor: list[tuple[float, float]], ours: list[tuple[float, float]]) -> Runs:
    runs = Runs()
    for f, o in zip(floor, ours, strict=True):
        runs.add(f, o)
    return runs


def paired(floor: Step, ours: Step) -> Runs:
    return runs_of(*rounds([floor, ours]))


def uploads(svc: Service, src: Path, work: Path, other: Service | None) -> list[Runs]:
    """Uploads into the floor and the service (and the other tree's service, if any),
    round by round: [ours against the floor, the other tree's against the same floor]."""
    folder = work / "floor"
    folder.mkdir()
    server = subprocess.Popen(
        [sys.executable, __file__, "floor-server", str(folder)], stdout=subprocess.PIPE, text=True
    )
    curl = ["curl", "-sS", "--fail", "-o", "/dev/null", "-T", str(src)]

    def into(service: Service) -> Step:
        assert service.proc is not None
        pid, url = service.proc.pid, f"{service.url}/jobs/bench/files/big.bin"
        out = service.root / "data" / "bench" / "big.bin"
        return lambda: cpu_of(pid, [*curl, "-H", f"X-Api-Token: {TOKEN}", url], [out])

    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        floor = lambda: cpu_of(server.pid, [*curl, f"http://127.0.0.1:{port}/x"],  # noqa: E731
                               list(folder.iterdir()))  # fmt: skip
        steps = [floor, into(svc)] + ([into(other)] if other is not None else [])
        got = rounds(steps)
        return [runs_of(got[0], theirs) for theirs in got[1:]]
    finally:
        server.kill()
        server.wait()


def downloads(svc: Service, src: Path, work: Path) -> Runs:
    assert svc.proc is not None
    pid = svc.proc.pid
    peer = RawPeer(src)
    out = work / "down.bin"
    curl = ["curl", "-sS", "--fail", "-o", str(out)]
    try:
        return paired(
            lambda: cpu_of(pid, [*curl, f"http://127.0.0.1:{peer.port}/x"], [out]),
            lambda: cpu_of(pid, [*curl, "-H", f"X-Api-Token: {TOKEN}",
                                 f"{svc.url}/jobs/bench/files/big.bin"], [out]),
        )  # fmt: skip
    finally:
        peer.close()
        out.unlink(missing_ok=True)


def transfers(svc: Service, work: Path) -> dict[str, object]:
    assert svc.proc is not None
    pid = svc.proc.pid
    idle = rss_mib(pid, "VmRSS")
    src = work / "source.bin"
    make_file(src, SIZE)
    with svc.client() as c:
        c.put("/jobs/bench")
    other = start_other(work)
    can_reset = reset_peak(pid)
    try:
        up, *up_other = uploads(svc, src, work, other)
    finally:
        if other is not None:
            other.stop()
    up_rss = rss_mib(pid)
    with svc.client() as c:
        c.put("/jobs/bench/files/big.bin", content=src.read_bytes())
    reset_peak(pid)
    down = downloads(svc, src, work)
    down_rss = rss_mib(pid)
    src.unlink()
    return {"up": up, "down": down, "idle": idle, "up_rss": up_rss, "down_rss": down_rss,
            "rss_note": "" if can_reset else " (peak since start)",
            "up_other": up_other[0] if up_other else None, "pid": pid,
            "other_pid": other.proc.pid if other is not None and other.proc else None}  # fmt: skip


def start_other(work: Path) -> Service | None:
    """The service of the tree BENCH_OTHER names, on a root of its own, or None."""
    if not OTHER:
        return None
    root = work / "other-root"
    (root / "tasks").mkdir(parents=True)
    env = {"PYTHONPATH": OTHER, "PYTHONSAFEPATH": "1"}
    other = Service(root, *SERVE_ARGS, "--log-level", "warning", env=env).start()
    with other.client() as c:
        c.put("/jobs/bench")
    return other


def wrk(url: str, seconds: float) -> tuple[float, float, float, int]:
    """wrk with 8 connections on 2 threads: req/s, p50 and p99 in ms, requests made.
    RuntimeError if any answer was not a 2xx."""
    out = subprocess.run(
        ["wrk", "-t2", "-c8", f"-d{seconds}s", "--latency", "-H", f"X-Api-Token: {TOKEN}", url],
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
        raise RuntimeError(f"wrk did not get 2xx answers:\n{out}")
    return float(rate.group(1)), ms("50%"), ms("99%"), int(done.group(1))


def wrk_load(url: str) -> tuple[float, float, float, str] | None:
    if shutil.which("wrk") is None:
        return None
    rate, p50, p99, _ = wrk(url, LOAD_SECONDS)
    return rate, p50, p99, "wrk"


def _load_worker(port: int, path: str, seconds: float, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    conn = http.client.HTTPConnection("127.0.0.1", port)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        conn.request("GET", path, headers={"X-Api-Token": TOKEN})
        conn.getresponse().read()
        times.append(time.perf_counter() - t0)
    out.put(times)


def python_load(port: int, path: str) -> tuple[float, float, float, str]:
    out: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    procs = [
        multiprocessing.Process(target=_load_worker, args=(port, path, LOAD_SECONDS, out))
        for _ in range(8)
    ]
    for p in procs:
        p.start()
    times: list[float] = []
    for _ in procs:
        times += out.get()
    for p in procs:
        p.join()
    times.sort()
    p50 = times[len(times) // 2] * 1000
    p99 = times[int(len(times) * 0.99)] * 1000
    return len(times) / LOAD_SECONDS, p50, p99, "python load generator (a lower bound)"


def listing(svc: Service) -> tuple[float, float]:
    success = svc.root / "success"
    for i in range(LIST_JOBS):
        (success / f"job-{i:05d}").mkdir()
    time.sleep(1.1)  # let the state folder settle, as a long-lived one would be
    conn = http.client.HTTPConnection("127.0.0.1", svc.port)

    def p50(path: str, n: int) -> float:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            conn.request("GET", path, headers={"X-Api-Token": TOKEN})
            resp = conn.getresponse()
            resp.read()
            times.append(time.perf_counter() - t0)
            assert resp.status == 200, resp.status
        return statistics.median(times) * 1000

    full = p50("/jobs", 31)
    page = p50("/jobs?limit=100&offset=5000", 201)
    conn.close()
    return full, page


def main() -> None:
    base = Path(os.environ.get("BENCH_DIR") or tempfile.gettempdir())
    work = Path(tempfile.mkdtemp(prefix="bench-api-", dir=base))
    t: dict[str, object] | None = None
    load = None
    lists = None
    try:
        root = work / "root"
        (root / "tasks").mkdir(parents=True)
        # the service runs the tree PYTHONPATH names, else this one: never the current
        # folder's (python -m puts it first), nor the virtualenv's installed copy
        tree = os.environ.get("PYTHONPATH") or str(Path(__file__).resolve().parents[2])
        env = {"PYTHONPATH": tree, "PYTHONSAFEPATH": "1"}
        svc = Service(root, *SERVE_ARGS, "--log-level", "warning", env=env)
        svc.start()
        try:
            if "transfers" in PARTS:
                t = transfers(svc, work)
            if "load" in PARTS:
                with svc.client() as c:
                    c.put("/jobs/bench")
                url = f"{svc.url}/jobs/bench"
                load = wrk_load(url) or python_load(svc.port, "/jobs/bench")
            if "listing" in PARTS:
                lists = listing(svc)
        finally:
            svc.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"## HTTP API ({RUNS} runs of {SIZE >> 20} MiB, min-median-max)")
    print()
    print("| measure | batchingest | floor, same runs | ours / floor | target |")
    print("|---|---|---|---|---|")
    if t is not None:
        print_transfers(t)
    if load is not None:
        print(
            f"| GET /jobs/{{id}}, 8 connections ({load[3]}) | {load[0]:,.0f} req/s | "
            f"p50 {load[1]:.2f} ms, p99 {load[2]:.2f} ms | | >= 5,000 req/s, p99 <= 20 ms |"
        )
    if lists is not None:
        full, page = lists
        print(f"| GET /jobs, {LIST_JOBS:,} jobs | p50 {full:.1f} ms | | | p50 <= 40 ms |")
        print(f"| GET /jobs?limit=100, {LIST_JOBS:,} jobs | p50 {page:.2f} ms | | | p50 <= 10 ms |")
    if t is not None:
        for label in ("up", "down"):
            runs: Runs = t[label]  # type: ignore[assignment]
            low, high = min(runs.floor), max(runs.floor)
            if high > 2 * low:
                print(f"\nWarning: the {label}load floor's times spread over 2x "
                      f"({low:.2f}-{high:.2f} s)")  # fmt: skip


def print_ceiling(up: Runs, client: list[float]) -> None:
    """The most ours / floor can be on this machine, run by run: the floor's time over
    the least time our upload's CPU and curl's (on the same machine) need spread over
    every core. A client elsewhere would leave the service every core."""
    cores = os.cpu_count() or 1
    if len(client) != len(up.ours):
        return
    ceiling = [f / ((o + c) / cores) for f, o, c in zip(up.floor, up.ours_cpu, client, strict=True)]
    print(f"| upload, the most ours / floor can be on these {cores} cores (floor's time over "
          f"(our CPU + curl's) / {cores}) | {spread(ceiling)} | curl's CPU per GiB: "
          f"{per_gib(client)} | | |")  # fmt: skip


def print_transfers(t: dict[str, object]) -> None:
    up: Runs = t["up"]  # type: ignore[assignment]
    down: Runs = t["down"]  # type: ignore[assignment]
    idle = float(t["idle"])  # type: ignore[arg-type]
    sha = sha256_cpu()
    with_sha = [f + sha for f in up.floor_cpu]
    print(
        f"| upload `curl -T` (SHA-256, unnamed file, commit) | {rates(up.ours)} | asyncio "
        f"server writing the body: {rates(up.floor)} | **{spread(up.ratios())}** | >= 0.9x |"
    )
    print(
        f"| download `curl -o FILE` | {rates(down.ours)} | sendfile(2) server: "
        f"{rates(down.floor)} | **{spread(down.ratios())}** | no regression |"
    )
    to_floor = [o / f for o, f in zip(up.ours_cpu, with_sha, strict=True)]
    print(
        f"| CPU per GiB, upload | {per_gib(up.ours_cpu)} | asyncio server: "
        f"{per_gib(up.floor_cpu)}; plus SHA-256 alone ({sha * (1 << 30) / SIZE:.2f} s): "
        f"{per_gib(with_sha)} | {spread(to_floor)} of floor + SHA-256 | |"
    )
    print_ceiling(up, CLIENT_CPU_OF.get(t["pid"], [])[:RUNS])  # type: ignore[call-overload]
    for label, pid in (("this tree", t["pid"]), ("BENCH_OTHER's tree", t.get("other_pid"))):
        splits = LOOP_CPU.get(pid, [])[:RUNS]  # type: ignore[call-overload]  # uploads come first
        if splits:
            loop, rest = per_gib([a for a, _ in splits]), per_gib([b for _, b in splits])
            print(f"| upload CPU per GiB, {label}: loop thread, other threads | {loop}, "
                  f"{rest} | | | |")  # fmt: skip
    other: Runs | None = t["up_other"]  # type: ignore[assignment]
    if other is not None:
        print(
            f"| upload, BENCH_OTHER's tree | {rates(other.ours)}, CPU per GiB "
            f"{per_gib(other.ours_cpu)} | the same floor runs | **{spread(other.ratios())}** | |"
        )
    print(f"| CPU per GiB, download | {per_gib(down.ours_cpu)} | | | |")
    print(f"| RSS idle (VmRSS after start) | {idle:.1f} MiB | | | <= 35 MiB |")
    for phase in ("up", "down"):
        peak = float(t[f"{phase}_rss"])  # type: ignore[arg-type]
        print(
            f"| peak RSS during {phase}loads{t['rss_note']} | {peak:.1f} MiB "
            f"(idle + {peak - idle:.1f}) | | | <= idle + 16 MiB |"
        )


def spread(values: list[float], unit: str = "x", scale: float = 1.0) -> str:
    """min-median-max of values (times scale), e.g. 0.61-0.74-0.80x."""
    low, mid, high = (v * scale for v in (min(values), statistics.median(values), max(values)))
    return f"{low:.2f}-{mid:.2f}-{high:.2f}{unit}"


def rates(seconds: list[float]) -> str:
    mib = SIZE / (1 << 20)
    got = sorted(mib / s for s in seconds)
    return f"{got[0]:,.0f}-{statistics.median(got):,.0f}-{got[-1]:,.0f} MiB/s"


def per_gib(cpu: list[float]) -> str:
    return spread(cpu, " s", (1 << 30) / SIZE)


if __name__ == "__main__":
    if sys.argv[1:2] == ["floor-server"]:
        floor_server(sys.argv[2])
    else:
        main()
