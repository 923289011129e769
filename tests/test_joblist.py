"""GET /jobs paging and streaming (api/joblist.py): a page found by bisection is the slice
of the whole merged listing, a large listing is streamed whole and valid, and paging
while jobs move shows no job twice on one page and loses none that stayed put."""

from __future__ import annotations

import asyncio
import heapq
import json
import os
import random
from collections.abc import AsyncIterator
from itertools import islice
from pathlib import Path

import pytest
from live_service import Service, alive
from test_api import call, make_app

from batchingest.api import joblist
from batchingest.store import STATES


def merged(per_state: list[tuple[str, list[str]]]) -> list[tuple[str, str]]:
    """The listing's order, by brute force: by name, then by the order of the states."""
    rank = {s: i for i, s in enumerate(STATES)}
    rows = heapq.merge(*[[(n, rank[s], s) for n in names] for s, names in per_state])
    return [(n, s) for n, _, s in rows]


@pytest.mark.parametrize("seed", range(30))
def test_a_page_is_the_slice_of_the_whole_listing(seed: int) -> None:
    rng = random.Random(seed)
    pool = [f"j{i:03d}" for i in range(rng.randrange(1, 60))]
    # the same name may sit in several states (by hand): state order then decides
    per_state = [(s, sorted(rng.sample(pool, rng.randrange(len(pool) + 1)))) for s in STATES]
    whole = merged(per_state)
    for offset in range(len(whole) + 2):
        for limit in (None, 0, 1, 3, 10):
            stop = None if limit is None else offset + limit
            page = list(joblist.page(per_state, offset, stop))
            assert page == whole[offset:stop], (offset, limit)


async def _all(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in chunks])


def test_chunks_make_the_same_body() -> None:
    rows = [(f"job-{i:05d}", "success" if i % 3 else "queue") for i in range(2_345)]
    streamed = asyncio.run(_all(joblist.chunks(iter(rows))))
    assert streamed == joblist.body(rows)
    assert json.loads(streamed)[1234] == {"Name": "job-01234", "Status": "success"}
    assert asyncio.run(_all(joblist.chunks(iter([])))) == b"[]\n" == joblist.body([])


def test_deep_pages_in_process(root: Path) -> None:
    application, _ = make_app(root)
    for state, count in (("success", 3_000), ("queue", 500), ("error", 40)):
        for i in range(count):
            (root / state / f"{state[0]}-{i:05d}").mkdir()
    whole = call(application, "GET", "/jobs").json()
    assert len(whole) == 3_540 and whole == sorted(whole, key=lambda r: r["Name"])
    for offset in (0, 39, 40, 539, 540, 2_000, 3_539, 3_540, 9_999):
        reply = call(application, "GET", f"/jobs?limit=100&offset={offset}")
        assert reply.json() == whole[offset : offset + 100]
        assert reply.headers["x-total-count"] == "3540"
        assert ("link" in reply.headers) == (offset + 100 < 3_540)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_full_listing_is_streamed_every_job_once(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for state, count in (("success", 4_000), ("error", 700), ("queue", 300)):
        (root / state).mkdir(parents=True)
        for i in range(count):
            os.mkdir(root / state / f"job-{i:05d}-{state}")
    with Service(root, "--no-processor", "--log-level", "warning") as svc:
        assert svc.proc is not None and alive(svc.proc.pid)
        with svc.client() as client:
            client.get("/jobs?limit=1")
            before = rss_kib(svc.proc.pid)
            for _ in range(3):
                with client.stream("GET", "/jobs") as reply:
                    assert reply.status_code == 200
                    assert "content-length" not in reply.headers  # streamed, not built whole
                    assert reply.headers["x-total-count"] == "5000"
                    rows = json.loads(reply.read())
            grown = rss_kib(svc.proc.pid) - before
    names = [r["Name"] for r in rows]
    assert len(names) == len(set(names)) == 5_000 and names == sorted(names)
    assert {r["Status"] for r in rows} == {"success", "error", "queue"}
    # a generous bound, not a measure: the whole body is 300 KB, rows as objects ~3 MB
    assert grown < 16 * 1024, f"peak RSS grew by {grown} KiB while listing"


def test_paging_across_changes(root: Path) -> None:
    """Jobs moving between states while a client pages: a move keeps a job's place in
    the listing (by name), so every job shows up exactly once, in name order."""
    application, store = make_app(root)
    store.watch_from = 100  # the inotify-kept listings, as a large root has them
    for i in range(600):
        (root / "success" / f"s-{i:04d}").mkdir()
    for i in range(100):
        (root / "queue" / f"q-{i:04d}").mkdir()
    rng = random.Random(7)
    movers = {f"s-{i:04d}" for i in rng.sample(range(600), 60)}
    seen: list[str] = []
    offset = 0
    while True:
        page = call(application, "GET", f"/jobs?limit=50&offset={offset}").json()
        if not page:
            break
        names = [r["Name"] for r in page]
        assert len(names) == len(set(names)) and names == sorted(names)
        seen += names
        offset += 50
        for name in islice(sorted(movers), 5):  # a few jobs leave success/ per page
            movers.discard(name)
            os.rename(root / "success" / name, root / "error" / name)
    assert len(os.listdir(root / "error")) == 60  # the moves did happen meanwhile
    assert seen == sorted([f"s-{i:04d}" for i in range(600)] + [f"q-{i:04d}" for i in range(100)])
    # after the moves, one more pass sees exactly the root as it is
    final = [r["Name"] for r in call(application, "GET", "/jobs").json()]
    assert final == sorted(os.listdir(root / "success") + os.listdir(root / "error")
                            + os.listdir(root / "queue"))  # fmt: skip
