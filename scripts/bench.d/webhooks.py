"""Webhook benchmarks: what the listener costs a state move, and delivery rate.

Moves: 300 jobs taken through queue -> processing -> success with the store, (a) with no
listener, (b) with webhooks attached but no WEBHOOK file (the common case), (c) with a
WEBHOOK file of one URL (each move writes and fsyncs one outbox file), (d) the same with
16 URLs (still one file per event), (e) one URL, moves made by 4 threads at once (the
outbox writer takes waiting events in one batch). Next to it in the same run: bare
renames, bare renames plus a write+fsync of a small file (the floor of (c)), and the
same plus an fsync of its folder (a new name made durable by the POSIX book).
Delivery: 500 events pending in the outbox at start, delivered to a local receiver.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from batchingest.config import Config
from batchingest.store import Store
from batchingest.webhooks import Webhooks

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
JOBS = 300
EVENTS = 500


def through(store: Store, i: int) -> None:
    store.queue(f"j{i}")
    hold = store.claim(f"j{i}")
    assert hold is not None
    store.finish(hold, "success")


def moves(mode: str, base: Path) -> float:
    """Seconds for JOBS jobs x 3 moves."""
    root = base / f"root-{mode}-{time.monotonic_ns()}"
    store = Store(root)
    store.init()
    hooks = None
    if mode not in ("rename", "none", "rename+fsync", "rename+fsync+dir"):
        hooks = Webhooks(Config(root=root), store)
        hooks.attach()
    urls = {"webhook": 1, "webhook16": 16, "webhook-4threads": 1}.get(mode, 0)
    webhook = "".join(f"http://192.0.2.{n}/hook\n" for n in range(urls))
    for i in range(JOBS):
        path = root / "data" / f"j{i}"
        path.mkdir()
        if urls:
            (path / "WEBHOOK").write_text(webhook)
    started = time.perf_counter()
    if mode.startswith("rename"):
        for i in range(JOBS):
            for a, b in (("data", "queue"), ("queue", "processing"), ("processing", "success")):
                os.rename(root / a / f"j{i}", root / b / f"j{i}")
                if mode != "rename":
                    p = root / f".f{i}{b}"
                    with open(p, "wb") as f:
                        f.write(b"x" * 400)
                        os.fsync(f.fileno())
                if mode == "rename+fsync+dir":
                    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
                    os.fsync(fd)
                    os.close(fd)
    elif mode == "webhook-4threads":
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: through(store, i), range(JOBS)))
    else:
        for i in range(JOBS):
            through(store, i)
    took = time.perf_counter() - started
    if hooks is not None:
        hooks.close()
        assert len(list((root / ".outbox").glob("*.json"))) == (3 * JOBS if urls else 0)
    shutil.rmtree(root)
    return took


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default 5 resets a burst of new connections
    daemon_threads = True


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def delivery(base: Path) -> float:
    """Seconds to deliver EVENTS events pending in the outbox (one URL, 100 jobs)."""
    server = _Server(("127.0.0.1", 0), _Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook\n"
    root = base / f"root-delivery-{time.monotonic_ns()}"
    store = Store(root)
    store.init()
    hooks = Webhooks(Config(root=root, webhook_allow=["127.0.0.1"]), store)
    hooks.attach()
    for i in range(100):
        path = root / "data" / f"j{i}"
        path.mkdir()
        (path / "WEBHOOK").write_text(url)
    done = 0
    while done < EVENTS:  # queue <-> error moves: 5 events per job
        for i in range(100):
            j = store.find(f"j{i}")
            assert j is not None
            if j.state == "queue":
                hold = store.claim(j.name)
                assert hold is not None
                store.finish(hold, "error")
                done += 2
            else:
                store.queue(j.name)
                done += 1
            if done >= EVENTS:
                break
    hooks.detach()
    outbox = root / ".outbox"
    pending = len(list(outbox.glob("*.json")))

    async def main() -> float:
        stop = asyncio.Event()
        started = time.perf_counter()
        runner = asyncio.create_task(hooks.run(stop))
        while any(outbox.glob("*.json")):
            await asyncio.sleep(0.01)
        took = time.perf_counter() - started
        stop.set()
        await runner
        return took

    took = asyncio.run(main())
    hooks.close()
    server.shutdown()
    shutil.rmtree(root)
    return took / pending * EVENTS


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="bench-webhooks-"))
    try:
        modes = ["rename", "none", "attached", "rename+fsync", "rename+fsync+dir", "webhook",
                 "webhook16", "webhook-4threads"]  # fmt: skip
        results: dict[str, list[float]] = {m: [] for m in modes}
        rates: list[float] = []
        for _ in range(RUNS):
            for m in modes:
                results[m].append(moves(m, base))
            rates.append(delivery(base))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    n = JOBS * 3
    py = sys.version.split()[0]
    print(f"## webhooks ({RUNS} runs, medians, {os.cpu_count()} cores, Python {py})")
    print()
    print("| state moves | moves/s | vs |")
    print("|---|---:|---|")
    label = {
        "rename": "bare rename(2) (floor)",
        "none": "store, no listener",
        "attached": "store + webhooks, no WEBHOOK file",
        "rename+fsync": "bare rename + 400 B write+fsync (floor of webhooks)",
        "rename+fsync+dir": "bare rename + 400 B write+fsync + folder fsync",
        "webhook": "store + webhooks, WEBHOOK with 1 URL",
        "webhook16": "store + webhooks, WEBHOOK with 16 URLs",
        "webhook-4threads": "store + webhooks, 1 URL, 4 threads moving",
    }
    floor = {"none": "rename", "attached": "none", "webhook": "rename+fsync",
             "webhook16": "webhook", "webhook-4threads": "webhook"}  # fmt: skip
    med = {m: statistics.median(v) for m, v in results.items()}
    for m in modes:
        vs = f"{med[floor[m]] / med[m]:.2f}x of {label[floor[m]]}" if m in floor else ""
        print(f"| {label[m]} | {n / med[m]:,.0f} | {vs} |")
    print()
    print(f"Delivery: {EVENTS} events from the outbox to a local threaded http.server: "
          f"{EVENTS / statistics.median(rates):,.0f} events/s")  # fmt: skip


if __name__ == "__main__":
    main()
