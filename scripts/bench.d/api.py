"""HTTP API benchmarks: bulk transfer against `cp`, request rate, job listings.

Starts the real service (`batchingest serve --no-processor`) on a temporary jobs root and
measures, medians of several runs:
- upload of a 1 GiB file with `curl -T` next to `cp` of the same file on the same disk,
  and next to the same curl against a bare socket server (the floor curl itself sets),
  and download with `curl -o` (to the same disk) next to the same `cp`; the page cache is
  written back (`sync`) before each timed copy so one run's dirty pages do not slow the next;
- the service's peak RSS during the uploads and during the downloads (VmHWM, reset
  between phases through /proc/PID/clear_refs where allowed);
- `GET /jobs/{id}` with 8 concurrent connections (wrk if installed, else a multi-process
  Python load generator, which is slower than the server and so gives a lower bound);
- `GET /jobs` with 10,000 jobs in success/, and `GET /jobs?limit=100`.

Environment: BENCH_RUNS (default 3), BENCH_SIZE_MIB (default 1024), BENCH_DIR (where the
jobs root and the test file go; default the system temp folder).

Wall-clock figures swing with whatever else the machine runs; the service's own CPU
seconds per GiB moved (from /proc/PID/stat) hardly do, so they are printed too. To
compare two versions in one sitting, run this twice, once with `PYTHONPATH=/other/tree`:
the service subprocess then runs that tree's code.
"""

from __future__ import annotations

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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from live_service import TOKEN, Service

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
SIZE = int(os.environ.get("BENCH_SIZE_MIB", "1024")) << 20
LOAD_SECONDS = 5
LIST_JOBS = 10_000


def timed(cmd: list[str]) -> float:
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def service_cpu(pid: int) -> float:
    """User + system CPU seconds the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_file(path: Path, size: int) -> None:
    chunk = os.urandom(8 << 20)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)


class RawPeer:
    """The floor for curl on this machine: a bare socket server that only moves bytes.

    GET answers with sendfile(2) of a file, PUT reads the body with recv_into and drops
    it; no HTTP library, no hashing, no disk writes. Measured in the same run, it shows
    how much of each transfer time is curl and the loopback itself.
    """

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
                self._one(conn)

    def _one(self, conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(65536)
        head, _, rest = head.partition(b"\r\n\r\n")
        if head.startswith(b"GET"):
            size = self.source.stat().st_size
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            with open(self.source, "rb") as f:
                conn.sendfile(f)
            return
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        if b"100-continue" in head.lower():
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        got = len(rest)
        buf = bytearray(4 << 20)
        while got < length:
            n = conn.recv_into(buf)
            if not n:
                return
            got += n
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    def close(self) -> None:
        self.sock.close()


def transfers(svc: Service, work: Path) -> dict[str, object]:
    assert svc.proc is not None
    pid = svc.proc.pid
    src = work / "source.bin"
    make_file(src, SIZE)
    with svc.client() as c:
        c.put("/jobs/bench")
    url = f"{svc.url}/jobs/bench/files/big.bin"
    auth = ["-H", f"X-Api-Token: {TOKEN}"]
    curl = ["curl", "-sS", "--fail", *auth]
    peer = RawPeer(src)
    raw_url = f"http://127.0.0.1:{peer.port}/x"
    cp_up, up, raw_up, cp_down, down, raw_down, down_null = [], [], [], [], [], [], []
    up_cpu, down_cpu = [], []
    can_reset = reset_peak(pid)
    for _ in range(RUNS):
        cp_up.append(timed(["cp", str(src), str(work / "copy.bin")]))
        (work / "copy.bin").unlink()
        before = service_cpu(pid)
        up.append(timed([*curl, "-o", "/dev/null", "-T", str(src), url]))
        up_cpu.append(service_cpu(pid) - before)
        raw_up.append(timed([*curl, "-o", "/dev/null", "-T", str(src), raw_url]))
    up_rss = peak_rss_mb(pid)
    reset_peak(pid)
    for _ in range(RUNS):
        cp_down.append(timed(["cp", str(src), str(work / "copy.bin")]))
        (work / "copy.bin").unlink()
        down.append(timed([*curl, "-o", str(work / "down.bin"), url]))
        (work / "down.bin").unlink()
        before = service_cpu(pid)
        down_null.append(timed([*curl, "-o", "/dev/null", url]))
        down_cpu.append(service_cpu(pid) - before)
        raw_down.append(timed([*curl, "-o", str(work / "down.bin"), raw_url]))
        (work / "down.bin").unlink()
    down_rss = peak_rss_mb(pid)
    peer.close()
    src.unlink()
    mib = SIZE / (1 << 20)
    return {
        "cp_up": statistics.median(cp_up),
        "up": statistics.median(up),
        "cp_down": statistics.median(cp_down),
        "down": statistics.median(down),
        "raw_up": statistics.median(raw_up),
        "raw_down": statistics.median(raw_down),
        "down_null": statistics.median(down_null),
        "mib": mib,
        "up_cpu": statistics.median(up_cpu) * 1024 / mib,
        "down_cpu": statistics.median(down_cpu) * 1024 / mib,
        "up_rss": up_rss,
        "down_rss": down_rss,
        "rss_note": "" if can_reset else " (peak since start)",
    }


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
    try:
        root = work / "root"
        (root / "tasks").mkdir(parents=True)
        svc = Service(root, "--no-processor", "--log-level", "warning")
        svc.start()
        try:
            t = transfers(svc, work)
            load = wrk_load(f"{svc.url}/jobs/bench") or python_load(svc.port, "/jobs/bench")
            full, page = listing(svc)
        finally:
            svc.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mib = float(t["mib"])  # type: ignore[arg-type]
    up_ratio = float(t["cp_up"]) / float(t["up"])  # type: ignore[arg-type]
    down_ratio = float(t["cp_down"]) / float(t["down"])  # type: ignore[arg-type]

    def rate(seconds: object) -> str:
        return f"{mib / float(seconds):,.0f} MiB/s"  # type: ignore[arg-type]

    print(f"## HTTP API ({RUNS} runs of {mib:.0f} MiB, medians; load: {load[3]})")
    print()
    print("| measure | result | same run | target |")
    print("|---|---|---|---|")
    print(
        f"| upload `curl -T` (incl. SHA-256) | {rate(t['up'])} | cp {rate(t['cp_up'])}: "
        f"**{up_ratio:.2f}x cp** | >= 0.3x cp |"
    )
    print(
        f"| download `curl -o` | {rate(t['down'])} | cp {rate(t['cp_down'])}: "
        f"**{down_ratio:.2f}x cp** | >= 0.6x cp |"
    )
    print(
        f"| download `curl -o /dev/null` | {rate(t['down_null'])} | "
        f"{float(t['cp_down']) / float(t['down_null']):.2f}x cp |  |"  # type: ignore[arg-type]
    )
    print(
        f"| floor: `curl -T` into a bare socket | {rate(t['raw_up'])} | "
        f"{float(t['cp_up']) / float(t['raw_up']):.2f}x cp |  |"  # type: ignore[arg-type]
    )
    print(
        f"| floor: `curl -o` from sendfile(2) | {rate(t['raw_down'])} | "
        f"{float(t['cp_down']) / float(t['raw_down']):.2f}x cp |  |"  # type: ignore[arg-type]
    )
    print(
        f"| service CPU per GiB, upload / download | {t['up_cpu']:.2f} / {t['down_cpu']:.2f} s"
        " | steadier than wall-clock on a busy machine | |"
    )
    print(f"| peak RSS during uploads{t['rss_note']} | {t['up_rss']:.0f} MB | | < 150 MB |")
    print(f"| peak RSS during downloads{t['rss_note']} | {t['down_rss']:.0f} MB | | < 150 MB |")
    print(
        f"| GET /jobs/{{id}}, 8 connections | {load[0]:,.0f} req/s | p50 {load[1]:.2f} ms, "
        f"p99 {load[2]:.2f} ms | >= 5,000 req/s, p99 <= 20 ms |"
    )
    print(f"| GET /jobs, {LIST_JOBS:,} jobs | p50 {full:.1f} ms | | p50 <= 40 ms |")
    print(f"| GET /jobs?limit=100, {LIST_JOBS:,} jobs | p50 {page:.2f} ms | | p50 <= 10 ms |")


if __name__ == "__main__":
    main()
