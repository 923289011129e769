"""State folder listings kept by inotify (batchingest.listings) and the store's use of them:
exact after hand-made moves, hidden and badly named folders, files and links left out,
a state folder swapped or gone, and the switch from scanning once a folder is large."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_service import Service
from test_api import call, make_app
from test_metrics import scrape, value

from batchingest import fs, listings
from batchingest.store import STATES, State, Store, valid_name


@pytest.fixture
def w(root: Path) -> Iterator[listings.Watched]:
    root_fd = fs.open_root(root)
    watched = listings.Watched(root_fd, STATES, valid_name)
    yield watched
    watched.close()
    os.close(root_fd)


def test_hand_moves_show_at_once(root: Path, w: listings.Watched) -> None:
    for i in range(5):
        (root / "success" / f"job-{i}").mkdir()
    assert w.names("success") == [f"job-{i}" for i in range(5)]
    os.rename(root / "success" / "job-1", root / "error" / "job-1")
    os.rename(root / "success" / "job-3", root / "queue" / "job-3")
    assert w.names("success") == ["job-0", "job-2", "job-4"]
    assert (w.count("error"), w.count("queue"), w.count("data")) == (1, 1, 0)
    os.rmdir(root / "error" / "job-1")
    assert w.count("error") == 0


def test_only_job_folders_are_listed(root: Path, w: listings.Watched) -> None:
    success = root / "success"
    (success / ".incoming").mkdir()  # being assembled under a hidden name
    (success / "bad name").mkdir()
    (success / "stray").write_text("x")
    os.symlink(root / "data", success / "link")
    (success / "real").mkdir()
    assert w.names("success") == ["real"]
    os.rename(success / ".incoming", success / "batch-42")  # the usual way to submit
    assert w.names("success") == ["batch-42", "real"]
    os.rename(success / "real", success / ".trashed")
    assert w.names("success") == ["batch-42"]


def test_the_listing_is_a_new_list_only_when_it_changed(root: Path, w: listings.Watched) -> None:
    (root / "data" / "a").mkdir()
    first = w.names("data")
    assert w.names("data") is first
    (root / "data" / "b").mkdir()
    second = w.names("data")
    assert second == ["a", "b"] and first == ["a"]  # the old list is left as it was


@pytest.mark.parametrize("changes", [50, 3_000])  # inserted one by one / sorted again
def test_many_changes_between_looks(root: Path, w: listings.Watched, changes: int) -> None:
    rng = random.Random(changes)
    present: set[str] = set()
    w.names("success")
    for _ in range(changes):
        name = f"j{rng.randrange(changes):05d}"
        path = root / "success" / name
        if name in present:
            path.rmdir()
            present.discard(name)
        else:
            path.mkdir()
            present.add(name)
    assert w.names("success") == sorted(present)
    assert w.count("success") == len(present)


def test_a_state_folder_swapped_is_scanned_again(root: Path, w: listings.Watched) -> None:
    (root / "error" / "old").mkdir()
    assert w.names("error") == ["old"]
    os.rename(root / "error", root / "error-before")
    (root / "error").mkdir()
    (root / "error" / "new").mkdir()
    assert w.names("error") == ["new"]
    (root / "error" / "newer").mkdir()
    assert w.names("error") == ["new", "newer"]


def test_store_watches_once_a_folder_is_large(root: Path) -> None:
    store = Store(root)
    store.watch_from = 3
    for i in range(2):
        (root / "success" / f"s{i}").mkdir()
    assert store.job_count("success") == 2
    assert store._watched is None  # small: scanned
    (root / "success" / "s2").mkdir()
    assert store.job_names("success") == ["s0", "s1", "s2"]
    assert store._watched is not None
    os.rename(root / "success" / "s1", root / "queue" / "s1")
    assert store.job_names("success") == ["s0", "s2"]
    assert store.job_names("queue") == ["s1"]
    assert [store.job_count(s) for s in ("success", "queue", "error")] == [2, 1, 0]


def test_store_falls_back_to_scanning_when_a_state_folder_goes(root: Path) -> None:
    store = Store(root)
    store.watch_from = 1
    (root / "error" / "e").mkdir()
    assert store.job_names("error") == ["e"]
    os.rename(root / "error", root / "error-gone")
    assert store.job_count("error") == 0
    assert store._watched is None
    (root / "error").mkdir()
    (root / "error" / "f").mkdir()
    assert store.job_names("error") == ["f"]


def test_gauges_true_after_hand_moves_in_a_large_root(root: Path) -> None:
    application, store = make_app(root)
    store.watch_from = 20
    for i in range(30):
        (root / "success" / f"job-{i:02d}").mkdir()
    text = scrape(application)
    assert value(text, "batchingest_jobs", state="success") == 30
    assert store._watched is not None
    for i in range(5):
        os.rename(root / "success" / f"job-{i:02d}", root / "error" / f"job-{i:02d}")
    os.rename(root / "success" / "job-10", root / "queue" / "job-10")
    text = scrape(application)
    counts = {s: value(text, "batchingest_jobs", state=s) for s in ("success", "error", "queue")}
    assert counts == {"success": 24, "error": 5, "queue": 1}
    reply = call(application, "GET", "/jobs?status=error")
    assert reply.status == 200 and reply.body.count(b'"Name"') == 5


def test_changes_between_two_listings(root: Path, w: listings.Watched) -> None:
    (root / "success" / "a").mkdir()
    first = w.names("success")
    (root / "success" / "b").mkdir()
    second = w.names("success")
    os.rename(root / "success" / "a", root / "error" / "a")
    (root / "success" / "c").mkdir()
    third = w.names("success")
    assert w.changes("success", first, third) == {"b": True, "a": False, "c": True}
    assert w.changes("success", second, third) == {"a": False, "c": True}
    assert w.changes("success", third, third) == {}
    os.rename(root / "success", root / "success-old")  # listed again: history lost
    (root / "success").mkdir()
    fourth = w.names("success")
    assert fourth == [] and w.changes("success", third, fourth) is None


def test_arrival_times_follow_the_watched_changes(root: Path) -> None:
    """The dashboard's per-state times, changed from the store's known changes: a job
    that leaves and comes back between two looks gets its new arrival time."""
    from batchingest.ui import data

    store = Store(root)
    store.watch_from = 5
    for i in range(10):
        (root / "success" / f"s{i}").mkdir()
    store.job_names("success")  # large: watched from now on
    times = data.ChangeTimes(store)
    before = times.of(State.SUCCESS)
    assert len(before) == 10 and store._watched is not None
    os.rename(root / "success" / "s3", root / "data" / "s3")
    store.job_names("success")  # someone else's listing in between
    time.sleep(0.01)
    os.rename(root / "data" / "s3", root / "success" / "s3")
    os.rename(root / "success" / "s4", root / "error" / "s4")
    after = times.of(State.SUCCESS)
    assert sorted(after) == [f"s{i}" for i in range(10) if i != 4]
    assert after["s3"] > before["s3"]  # its rename back set a new ctime
    assert after["s3"] == os.lstat(root / "success" / "s3").st_ctime
    fresh = data.ChangeTimes(store).listing(State.SUCCESS)
    assert times.listing(State.SUCCESS).by_time == fresh.by_time


def test_live_service_gauges_after_hand_moves(tmp_path: Path) -> None:
    """The real service on a root large enough to be watched: `mv` by hand between two
    scrapes, and the next scrape has the new counts."""
    root = tmp_path / "root"
    (root / "success").mkdir(parents=True)
    for i in range(2_500):
        os.mkdir(root / "success" / f"job-{i:05d}")

    def counts(client: httpx.Client) -> dict[str, float]:
        text = client.get("/metrics").text
        return {s: value(text, "batchingest_jobs", state=s) for s in ("success", "error", "data")}

    with Service(root, "--no-processor", "--log-level", "warning") as svc, svc.client() as client:
        assert counts(client) == {"success": 2_500, "error": 0, "data": 0}
        for i in range(3):
            os.rename(root / "success" / f"job-{i:05d}", root / "error" / f"job-{i:05d}")
        os.rename(root / "success" / "job-00100", root / "data" / "job-00100")
        (root / "data" / ".being-built").mkdir()  # hidden: no job
        assert counts(client) == {"success": 2_496, "error": 3, "data": 1}
        os.rename(root / "error" / "job-00001", root / "success" / "job-00001")
        assert counts(client) == {"success": 2_497, "error": 2, "data": 1}
        names = [r["Name"] for r in client.get("/jobs?status=error").json()]
        assert names == ["job-00000", "job-00002"]


def test_force_polling_never_watches_in_any_process_of_the_service(root: Path) -> None:
    """--force-polling (NFS: inotify misses other hosts' moves) holds for every store the
    service makes, the extra API processes' included: each is made by store_for."""
    from batchingest.config import Config
    from batchingest.service import store_for
    from batchingest.store import WATCH_FROM

    for i in range(WATCH_FROM + 1):  # large enough to be watched
        (root / "success" / f"s{i}").mkdir()
    forced = store_for(Config(root=root, force_polling=True))
    assert len(forced.job_names("success")) == WATCH_FROM + 1
    assert forced._watched is None  # listed, never watched
    usual = store_for(Config(root=root))
    assert len(usual.job_names("success")) == WATCH_FROM + 1
    assert usual._watched is not None
