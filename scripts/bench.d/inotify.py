"""CPU to read inotify events: the listings' and arrivals' drains against a floor.

The floor reads the same kind of events with os.read and parses them with one struct,
the least Python can do (and what the two modules did by hand before inotify_simple).
Each round makes BENCH_EVENTS folders (default 5000) in a watched folder of a fresh
temporary root, then times, in CPU of this process, one drain of all their events;
floor, listings and arrivals alternate round by round. BENCH_RUNS rounds (default 7).

    .venv/bin/python scripts/bench.d/inotify.py
"""

from __future__ import annotations

import os
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from inotify_simple import INotify, flags

from batchingest import arrivals, listings

RUNS = int(os.environ.get("BENCH_RUNS", "7"))
EVENTS = int(os.environ.get("BENCH_EVENTS", "5000"))
_HEADER = struct.Struct("iIII")


def floor_drain(folder: Path) -> Callable[[], int]:
    ino = INotify(nonblocking=True)
    ino.add_watch(folder, flags.CREATE | flags.MOVED_TO | flags.ONLYDIR)

    def drain() -> int:
        seen = 0
        while True:
            try:
                data = os.read(ino.fileno(), 1 << 20)
            except BlockingIOError:
                ino.close()
                return seen
            at = 0
            while at < len(data):
                _, _, _, size = _HEADER.unpack_from(data, at)
                os.fsdecode(data[at + _HEADER.size : at + _HEADER.size + size].rstrip(b"\0"))
                at += _HEADER.size + size
                seen += 1

    return drain


def listings_drain(folder: Path) -> Callable[[], int]:
    root_fd = os.open(folder.parent, os.O_RDONLY | os.O_DIRECTORY)
    watched = listings.Watched(root_fd, [folder.name], lambda name: True)

    def drain() -> int:
        seen = watched.count(folder.name)
        watched.close()
        os.close(root_fd)
        return seen

    return drain


def arrivals_drain(folder: Path) -> Callable[[], int]:
    watch = arrivals.Arrivals(folder)

    def drain() -> int:
        arrived = watch.drain()
        watch.close()
        return EVENTS if arrived else 0

    return drain


def one_round(start: Callable[[Path], Callable[[], int]]) -> float:
    """CPU seconds per event of one drain of EVENTS folder creations."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "queue"
        folder.mkdir()
        drain = start(folder)
        for i in range(EVENTS):
            (folder / f"job{i:06d}").mkdir()
        began = time.process_time()
        seen = drain()
        spent = time.process_time() - began
        assert seen == EVENTS, seen
        return spent / EVENTS


def main() -> None:
    kinds = {"floor": floor_drain, "listings": listings_drain, "arrivals": arrivals_drain}
    cpu: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(RUNS):
        for kind, start in kinds.items():
            cpu[kind].append(one_round(start))
    print(f"## inotify: CPU per event read, {EVENTS} events a drain, {RUNS} rounds\n")
    print("| drain | µs per event (min-median-max) | ratio to the floor (min-median-max) |")
    print("| --- | --- | --- |")
    for kind, spent in cpu.items():
        us = "-".join(f"{f(spent) * 1e6:.2f}" for f in (min, statistics.median, max))
        ratios = [ours / floor for ours, floor in zip(spent, cpu["floor"], strict=True)]
        rs = "-".join(f"{f(ratios):.2f}" for f in (min, statistics.median, max))
        print(f"| {kind} | {us} | {rs} |")


if __name__ == "__main__":
    main()
