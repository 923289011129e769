"""Job history and the event feed: the files, the cursors and the store listener."""

from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchingest import events, fs, lease, processor
from batchingest.events import Code, Cursor, Feed, Recorder
from batchingest.jobdir import EVENTS_FILE
from batchingest.store import Job, Store

HOUR = events.SEGMENT_SECONDS


def line(code: Code = Code.CREATED, state: str = "ready", **details: object) -> bytes:
    return events.encode(events.make_event(code, state, "Something happened.", details))


def feed_line(job: str, n: int) -> bytes:
    event = events.make_event(Code.TASK_STARTED, "processing", f"Task {n} started.", {"n": n})
    return events.encode({"job": job, **event})


def codes(history: list[dict[str, object]]) -> list[object]:
    return [e["code"] for e in history]


@pytest.fixture
def job_dir(tmp_path: Path) -> tuple[Path, int]:
    path = tmp_path / "job"
    path.mkdir()
    fd = fs.open_root(path)
    yield path, fd
    os.close(fd)


# -- one event --------------------------------------------------------------------------


def test_event_fields_and_line_bound() -> None:
    event = events.make_event(Code.TASK_FAILED, "processing", "Task x failed.", {"n": 1})
    assert set(event) == {"code", "time", "is_error", "description", "details", "state"}
    assert event["is_error"] is True and event["time"].endswith("Z") and len(event["time"]) == 24
    assert events.make_event(Code.QUEUED, "queue", "Q.")["is_error"] is False
    long = events.make_event(Code.TASK_FAILED, "processing", "x" * 10_000, {"reason": "y" * 9000})
    encoded = events.encode(long)
    assert len(encoded) <= events.MAX_LINE and encoded.endswith(b"\n")
    back = events.decode(encoded)
    assert back is not None and back["code"] == "TASK_FAILED" and back["details"]["reason"]
    many = {f"k{i}": "v" * 150 for i in range(200)}
    assert len(events.encode(events.make_event(Code.FAILED, "error", "d", many))) <= events.MAX_LINE


def test_any_details_make_one_line_that_reads_back() -> None:
    # what msgspec will not write (an int beyond 64 bits, a lone surrogate from a file
    # name) still makes one line; other text stays UTF-8, not escaped
    details = {"big": 2**70, "path": "caf\u00e9/\udc80", "line": "a\nb", "nan": float("nan")}
    encoded = events.encode(events.make_event(Code.FILE_UPLOADED, "ready", "F.", details))
    assert encoded.count(b"\n") == 1 and encoded.endswith(b"\n")
    back = events.decode(encoded)
    assert back is not None and back["details"]["big"] == 2**70
    assert back["details"]["path"] == "caf\u00e9/\udc80" and back["details"]["line"] == "a\nb"
    plain = events.encode(events.make_event(Code.FILE_UPLOADED, "ready", "F.", {"p": "caf\u00e9"}))
    assert "caf\u00e9".encode() in plain and events.decode(plain) is not None


def test_decode_refuses_what_is_not_an_event() -> None:
    raw = line()
    good = json.loads(raw)
    assert events.decode(raw) == good
    for bad in (b"", b"{", b"[]", b'"x"', json.dumps({**good, "is_error": "no"}).encode(),
                json.dumps({k: v for k, v in good.items() if k != "state"}).encode()):  # fmt: skip
        assert events.decode(bad) is None
    assert events.decode(raw, job=True) is None  # a feed line names its job


# -- a job's history ----------------------------------------------------------------------


def test_history_appends_and_skips_a_torn_line(job_dir: tuple[Path, int]) -> None:
    path, fd = job_dir
    os.close(events.append_history(fd, line(Code.CREATED)))
    # a crash cut the next line short; the one after must not be glued to it
    with open(path / EVENTS_FILE, "ab") as f:
        f.write(line(Code.QUEUED, "queue")[:30])
    assert codes(events.read_history(fd)) == ["CREATED"]  # the torn last line is skipped
    os.close(events.append_history(fd, line(Code.CLAIMED, "processing")))
    assert codes(events.read_history(fd)) == ["CREATED", "CLAIMED"]
    assert events.last_state(fd) == "processing"
    # garbage a user wrote in between is skipped too, never fatal
    with open(path / EVENTS_FILE, "ab") as f:
        f.write(b'not json\n{"code": 1}\n[1,2]\n')
    os.close(events.append_history(fd, line(Code.SUCCEEDED, "success")))
    assert codes(events.read_history(fd)) == ["CREATED", "CLAIMED", "SUCCEEDED"]


def test_history_read_is_bounded(job_dir: tuple[Path, int]) -> None:
    path, fd = job_dir
    with open(path / EVENTS_FILE, "wb") as f:
        f.write(b"x" * (3 << 20))  # a huge planted file, no newline in it
        f.write(b"\n" + line(Code.CREATED))
    assert codes(events.read_history(fd, limit=1 << 20)) == ["CREATED"]
    assert events.last_state(fd) == "ready"


def test_history_never_follows_a_link_or_opens_a_fifo(job_dir: tuple[Path, int]) -> None:
    path, fd = job_dir
    target = path.parent / "elsewhere"
    target.write_bytes(b"precious\n")
    (path / EVENTS_FILE).symlink_to(target)
    with pytest.raises(fs.UnsafePath):
        events.append_history(fd, line())
    with pytest.raises(fs.UnsafePath):
        events.read_history(fd)
    assert events.last_state(fd) is None
    assert target.read_bytes() == b"precious\n"
    (path / EVENTS_FILE).unlink()
    os.mkfifo(path / EVENTS_FILE)
    with pytest.raises(fs.NotRegular):
        events.append_history(fd, line())  # no reader: must not hang either
    with pytest.raises(fs.NotRegular):
        events.read_history(fd)


def test_count_follows_every_change_of_the_history(job_dir: tuple[Path, int]) -> None:
    path, fd = job_dir
    assert events.count(fd) == 0
    os.close(events.append_history(fd, line(Code.CREATED)))
    assert events.count(fd) == 1
    assert events.count(fd) == 1  # counted before: the same answer
    os.close(events.append_history(fd, line(Code.QUEUED, "queue")))
    assert events.count(fd) == 2
    # replaced by another file of the same size: counted again, not taken from before
    (path / "other").write_bytes(b"a\n" * (len(line()) + len(line(Code.QUEUED, "queue"))))
    os.replace(path / "other", path / EVENTS_FILE)
    assert events.count(fd) == len(line()) + len(line(Code.QUEUED, "queue"))
    # a link to a history counted before is never followed, a FIFO never opened
    (path / EVENTS_FILE).write_bytes(line() * 3)
    assert events.count(fd) == 3
    os.replace(path / EVENTS_FILE, path / "real")
    (path / EVENTS_FILE).symlink_to(path / "real")
    assert events.count(fd) == 0
    (path / EVENTS_FILE).unlink()
    os.mkfifo(path / EVENTS_FILE)
    assert events.count(fd) == 0


# -- the feed -------------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def parent(tmp_path: Path) -> int:
    fd = fs.open_root(tmp_path)
    yield fd
    os.close(fd)


def read_all(feed: Feed, after: Cursor | None, limit: int = 7) -> list[tuple[dict, Cursor]]:  # type: ignore[type-arg]
    out = []
    while True:
        page, more = feed.read(after, limit)
        out.extend(page)
        if page:
            after = page[-1][1]
        if not more:
            return out


def test_feed_pages_by_cursor_nothing_missed_nothing_twice(parent: int) -> None:
    clock = Clock(1000 * HOUR + 10)
    feed = Feed(parent, ".events", clock=clock)
    for n in range(50):
        feed.append(feed_line("a", n))
    page, more = feed.read(None, 20)
    assert [e["details"]["n"] for e, _ in page] == list(range(20)) and more
    rest = read_all(feed, page[-1][1])
    assert [e["details"]["n"] for e, _ in rest] == list(range(20, 50))
    assert feed.read(rest[-1][1], 10) == ([], False)
    # a cursor is opaque text, and a round trip through it lands on the same place
    cursor = page[4][1]
    assert Cursor.parse(cursor.text) == cursor
    again, _ = feed.read(Cursor.parse(cursor.text), 1)
    assert again[0][0]["details"]["n"] == 5
    feed.close()


def test_feed_refuses_a_cursor_it_did_not_give(parent: int) -> None:
    feed = Feed(parent, ".events", clock=Clock(1000 * HOUR))
    feed.append(feed_line("a", 1))
    for text in ("", "xyz", "0" * 21, "g" * 20):
        with pytest.raises(events.BadCursor):
            Cursor.parse(text)
    with pytest.raises(events.BadCursor):
        feed.read(Cursor(1000, 3), 10)  # inside a line
    with pytest.raises(events.BadCursor):
        feed.read(Cursor(1000, 10**9), 10)  # past the end
    feed.close()


def test_feed_moves_on_to_the_next_hour_only_after_its_grace(parent: int) -> None:
    clock = Clock(1000 * HOUR + HOUR - 1)
    feed = Feed(parent, ".events", clock=clock)
    feed.append(feed_line("a", 1))
    clock.now = 1001 * HOUR + 1  # a new segment
    feed.append(feed_line("a", 2))
    assert feed.segments() == [1000, 1001]
    first, more = feed.read(None, 10)
    # a writer that read the clock before the hour turned may still add to hour 1000
    assert [e["details"]["n"] for e, _ in first] == [1] and not more
    clock.now = 1001 * HOUR + events.SEGMENT_GRACE + 1
    rest = read_all(feed, first[-1][1])
    assert [e["details"]["n"] for e, _ in rest] == [2]
    assert rest[0][1].segment == 1001
    feed.close()


def test_feed_skips_a_torn_line_and_keeps_writing_after_it(parent: int, tmp_path: Path) -> None:
    clock = Clock(1000 * HOUR)
    feed = Feed(parent, ".events", clock=clock)
    feed.append(feed_line("a", 1))
    feed.close()
    with open(tmp_path / ".events" / "00001000.jsonl", "ab") as f:
        f.write(feed_line("a", 2)[:25])  # a crash in the middle of a line
    feed = Feed(parent, ".events", clock=clock)  # the restarted service
    feed.append(feed_line("a", 3))
    assert [e["details"]["n"] for e, _ in read_all(feed, None)] == [1, 3]
    feed.close()


def test_feed_live_end_and_prune(parent: int) -> None:
    clock = Clock(1000 * HOUR)
    feed = Feed(parent, ".events", keep_days=1, clock=clock)
    assert feed.read(None, 5) == ([], False)
    end = feed.live_end()
    feed.append(feed_line("a", 1))
    page, _ = feed.read(end, 5)
    assert [e["details"]["n"] for e, _ in page] == [1]
    assert feed.live_end() == page[-1][1]
    clock.now += 24 * HOUR
    feed.append(feed_line("a", 2))  # its last event may be less than a day old: kept
    assert feed.segments() == [1000, 1024]
    clock.now += HOUR
    feed.append(feed_line("a", 3))  # a new hour prunes what is older than a day
    assert feed.segments() == [1024, 1025]
    # a cursor into a pruned segment goes on with what is kept
    assert [e["details"]["n"] for e, _ in feed.read(page[-1][1], 5)[0]] == [2]
    assert [e["details"]["n"] for e, _ in feed.read(None, 5)[0]] == [2]
    feed.close()


def _append_many(path: str, who: str, count: int) -> None:
    parent = fs.open_root(path)
    feed = Feed(parent, ".events")
    for n in range(count):
        feed.append(feed_line(who, n))
    feed.close()


def test_feed_several_processes_append_whole_lines(tmp_path: Path, parent: int) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), w, 2000)) for w in "abc"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    feed = Feed(parent, ".events")
    got = read_all(feed, None, 1000)
    feed.close()
    # (an hour may have turned during the run: the last segment is not read past its grace)
    for who in "abc":
        ns = [e["details"]["n"] for e, _ in got if e["job"] == who]
        assert ns == list(range(len(ns)))
    assert len(got) >= 2000


# -- the recorder on a store ------------------------------------------------------------------


@pytest.fixture
def recorder(store: Store) -> Recorder:
    rec = Recorder(store)
    rec.attach()
    yield rec
    rec.close()


@pytest.fixture
def at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job seen in queue/ by hand gets its QUEUED at that listing, not with its claim."""
    monkeypatch.setattr(events, "QUEUED_DELAY", 0.0)


def history(store: Store, name: str) -> list[dict[str, object]]:
    job = store.get(name)
    fd = store.open_job(job)
    try:
        return events.read_history(fd)
    finally:
        os.close(fd)


def feed_events(store: Store) -> list[dict[str, object]]:
    recorder = events.recorder_for(store)
    if recorder is not None:
        recorder.flush()  # the feed's lines are written once a tick
    feed = Feed(store.root_fd, ".events", create=False)
    try:
        return [e for e, _ in read_all(feed, None, 100)]
    finally:
        feed.close()


def run_held(store: Store, name: str, state: str) -> Job:
    hold = store.claim(name)
    assert hold is not None
    events.finishing(store, name)
    return store.finish(hold, state)


def test_moves_by_the_api_and_the_processor(store: Store, recorder: Recorder) -> None:
    job, _ = store.create("j")
    events.created(store, job)
    events.queue(store, "j")
    run_held(store, "j", "success")
    assert codes(history(store, "j")) == ["CREATED", "QUEUED", "CLAIMED", "SUCCEEDED"]
    queued = history(store, "j")[1]
    assert queued["details"] == {"by": "api", "from": "ready"} and queued["state"] == "queue"
    claimed = history(store, "j")[2]
    assert claimed["details"]["pid"] == os.getpid() and claimed["state"] == "processing"
    # the feed has the same events, each with its job
    feed = feed_events(store)
    assert [(e["job"], e["code"]) for e in feed] == [("j", c) for c in codes(history(store, "j"))]
    assert [e["time"] for e in feed] == [e["time"] for e in history(store, "j")]


def test_a_hand_queued_job_gets_its_queued_event_when_taken(
    store: Store, recorder: Recorder
) -> None:
    store.create("h")
    events.queue(store, "h")
    run_held(store, "h", "error")
    os.rename(store.root / "error" / "h", store.root / "queue" / "h")  # mv error/h queue/
    run_held(store, "h", "success")
    got = history(store, "h")
    assert codes(got) == ["QUEUED", "CLAIMED", "FAILED", "QUEUED", "CLAIMED", "SUCCEEDED"]
    assert got[3]["details"] == {"by": "hand", "from": "error"} and got[2]["is_error"] is True
    assert [e["state"] for e in got] == ["queue", "processing", "error", "queue", "processing",
                                         "success"]  # fmt: skip
    # one that never had a history: "from" is not known
    (store.root / "queue" / "new").mkdir()
    run_held(store, "new", "success")
    first = history(store, "new")[0]
    assert first["code"] == "QUEUED" and first["details"] == {"by": "hand"}


def test_namesake_is_renamed_and_recovery_and_stopping(store: Store, recorder: Recorder) -> None:
    (store.root / "success" / "d").mkdir()
    (store.root / "queue" / "d").mkdir()
    finished = run_held(store, "d", "success")
    assert finished.name == "d-001"
    got = history(store, "d-001")
    assert codes(got)[-2:] == ["SUCCEEDED", "RENAMED"]
    assert got[-1]["details"] == {"from": "d", "to": "d-001"}
    assert [e["job"] for e in feed_events(store)][-2:] == ["d-001", "d-001"]
    # a job left in processing/ by a dead processor
    (store.root / "processing" / "r").mkdir()
    assert store.recover() == ["r"]
    assert codes(history(store, "r")) == ["RECOVERED"]
    # a processor that stops puts its job back in queue/: that is no recovery
    run_held(store, "r", "queue")
    got = history(store, "r")
    assert codes(got) == ["RECOVERED", "CLAIMED", "QUEUED"]
    assert got[-1]["details"] == {"by": "service", "from": "processing"}


def test_the_apis_queued_comes_before_a_quick_claim(store: Store, recorder: Recorder) -> None:
    """A processor may take a job between the API's rename and the API's listener."""
    store.create("race")
    claimed: list[Job] = []

    def claim_at_once(job: Job, old_state: str | None) -> None:
        if job.state == "queue":
            thread = threading.Thread(
                target=lambda: claimed.append(run_held(store, "race", "success"))
            )
            thread.start()
            thread.join(1.0)  # the claim (and its listener) get every chance to go first

    # runs before the recorder's listener, as a quick processor would
    store._listeners.insert(0, claim_at_once)
    events.queue(store, "race")
    wait = time.monotonic() + 10
    while not claimed and time.monotonic() < wait:
        time.sleep(0.01)
    got = history(store, "race")
    assert codes(got) == ["QUEUED", "CLAIMED", "SUCCEEDED"]
    assert got[0]["details"]["by"] == "api"


def test_a_planted_history_link_is_not_written_the_feed_still_is(
    store: Store, recorder: Recorder, tmp_path: Path
) -> None:
    target = tmp_path / "outside"
    target.write_bytes(b"")
    (store.root / "queue" / "p").mkdir()
    (store.root / "queue" / "p" / EVENTS_FILE).symlink_to(target)
    run_held(store, "p", "success")
    assert target.read_bytes() == b""
    assert [e["code"] for e in feed_events(store) if e["job"] == "p"] == [
        "QUEUED", "CLAIMED", "SUCCEEDED"]  # fmt: skip


def test_without_a_recorder_the_hooks_do_nothing(store: Store) -> None:
    job, _ = store.create("quiet")
    events.created(store, job)
    events.queue(store, "quiet")
    assert not (store.root / "queue" / "quiet" / EVENTS_FILE).exists()
    assert not (store.root / ".events").exists()


def test_later_codes_can_be_recorded(store: Store, recorder: Recorder) -> None:
    store.create("c")
    events.cancel_requested(store, "c")
    events.canceled(store, "c", "start")
    events.deadline_exceeded(store, "c", "2026-12-01T00:00:00.000Z")
    got = history(store, "c")
    assert codes(got) == ["CANCEL_REQUESTED", "CANCELED", "DEADLINE_EXCEEDED"]
    assert [e["is_error"] for e in got] == [False, False, True]
    assert all(e["state"] == "ready" for e in got)


def test_hand_queued_jobs_are_seen_when_queue_is_listed(
    store: Store, recorder: Recorder, at_once: None
) -> None:
    store.create("api")
    events.queue(store, "api")
    run_held(store, "api", "error")
    os.rename(store.root / "error" / "api", store.root / "queue" / "api")  # mv error/api queue/
    (store.root / "queue" / "fresh").mkdir()
    store.create("byapi")
    events.queue(store, "byapi")
    events.seen_queued(store, store.queued())
    assert codes(history(store, "api"))[-1] == "QUEUED"
    assert history(store, "api")[-1]["details"] == {"by": "hand", "from": "error"}
    assert history(store, "fresh") and history(store, "fresh")[0]["details"] == {"by": "hand"}
    assert codes(history(store, "byapi")) == ["QUEUED"]  # the API's: nothing more
    # seen again at the next look, and then taken: no second QUEUED
    events.seen_queued(store, store.queued())
    run_held(store, "fresh", "success")
    assert codes(history(store, "fresh")) == ["QUEUED", "CLAIMED", "SUCCEEDED"]
    # a restarted processor looks at every name again: a queued history gets nothing
    recorder._queued.clear()
    events.seen_queued(store, store.queued())
    assert codes(history(store, "api")).count("QUEUED") == 2


def test_a_history_opened_in_queue_is_the_claims_or_closed(
    store: Store, recorder: Recorder, at_once: None
) -> None:
    """A hand-queued job's history, opened when seen, serves its claim; else it is closed."""
    for name in ("taken", "moved", "cleaned"):
        (store.root / "queue" / name).mkdir()
    before = len(os.listdir("/proc/self/fd"))
    events.seen_queued(store, store.queued())
    assert sorted(recorder._waiting) == ["cleaned", "moved", "taken"]
    run_held(store, "taken", "success")
    assert codes(history(store, "taken")) == ["QUEUED", "CLAIMED", "SUCCEEDED"]
    (store.root / "queue" / "cleaned" / EVENTS_FILE).unlink()  # removed while it waited
    run_held(store, "cleaned", "success")
    assert codes(history(store, "cleaned")) == ["CLAIMED", "SUCCEEDED"]  # a new history
    os.rename(store.root / "queue" / "moved", store.root / "data" / "moved")  # mv by hand
    events.seen_queued(store, store.queued())
    assert recorder._waiting == {} and recorder._held == {}
    recorder.close()  # and the flushes handed over are done
    assert len(os.listdir("/proc/self/fd")) <= before
    assert codes(history(store, "moved")) == ["QUEUED"]


def test_a_job_seen_in_queue_before_its_move_out_of_processing_is_recorded(
    store: Store, recorder: Recorder
) -> None:
    """The instant between a recovery's rename into queue/ and its RECOVERED: a listing
    then writes no QUEUED by hand (the move's own event follows); a claim later does,
    if none came."""
    (store.root / "queue" / "r").mkdir()
    hold = store.claim("r")
    assert hold is not None
    events.task_started(store, hold, "start")
    hold.abandon()  # as if its processor died: the history ends in processing
    os.rename(store.root / "processing" / "r", store.root / "queue" / "r")  # no event yet
    events.seen_queued(store, store.queued())
    assert codes(history(store, "r")) == ["QUEUED", "CLAIMED", "TASK_STARTED"]
    assert recorder._waiting == {}
    run_held(store, "r", "success")
    got = history(store, "r")
    assert codes(got)[3:] == ["QUEUED", "CLAIMED", "SUCCEEDED"]
    assert got[3]["details"] == {"by": "hand", "from": "processing"}


def test_a_failing_hook_never_stops_the_work(
    store: Store, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    (store.root / "queue" / "j").mkdir()
    hold = store.claim("j")
    assert hold is not None

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(recorder, "record", broken)
    events.task_started(store, hold, "start")  # logged, not raised
    events.seen_queued(store, ["j"])
    events.file_deleted(store, "j", "x")
    store.finish(hold, "success")


def test_grouped_flushes_leave_no_descriptor_open(store: Store) -> None:
    assert store.root_fd >= 0  # opened once, kept
    before = len(os.listdir("/proc/self/fd"))
    recorder = Recorder(store)
    recorder.attach()
    for i in range(60):
        (store.root / "queue" / f"f{i}").mkdir()

    def take(i: int) -> None:
        run_held(store, f"f{i}", "success")

    threads = [threading.Thread(target=lambda k=k: [take(i) for i in range(k, 60, 4)])
               for k in range(4)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    recorder.close()
    assert len(os.listdir("/proc/self/fd")) <= before
    assert all(codes(history(store, f"f{i}")) == ["QUEUED", "CLAIMED", "SUCCEEDED"]
               for i in range(60))  # fmt: skip
    assert len([e for e in feed_events(store) if e["code"] == "SUCCEEDED"]) == 60


def test_a_history_removed_while_held_is_started_again(store: Store, recorder: Recorder) -> None:
    from batchingest.runner import TaskResult

    (store.root / "queue" / "k").mkdir()
    hold = store.claim("k")
    assert hold is not None
    events.task_started(store, hold, "start")
    (store.root / "processing" / "k" / EVENTS_FILE).unlink()  # a task cleaned the folder
    events.task_ended(store, hold, TaskResult("start", "", "", ok=True, seconds=0.5))
    events.finishing(store, "k")
    store.finish(hold, "success")
    assert codes(history(store, "k")) == ["TASK_SUCCEEDED", "SUCCEEDED"]
    assert recorder._held == {}  # nothing kept open once the job left processing/


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_history_is_flushed_once_a_batch_and_closed_after_its_flush(store: Store) -> None:
    """No copy of a history is made for its flush: one handed twice is flushed once, and
    given back before its flush it is closed by the flusher after it, not before."""
    feed = Feed(store.root_fd, ".events")
    flusher = events._Flusher(feed)
    flusher.stop()  # no thread to take the batch meanwhile: what is handed stays
    flusher.direct = False  # and the lines wait for a round, as with the thread running
    before = len(os.listdir("/proc/self/fd"))
    pending = os.open(store.root / "h", os.O_RDWR | os.O_CREAT, 0o644)
    done = os.open(store.root / "k", os.O_RDWR | os.O_CREAT, 0o644)
    flusher.sync(pending, 1)
    flusher.sync(pending, 1)
    flusher.lines(feed_line("h", 1))
    assert flusher._sync == {pending: 1} and len(os.listdir("/proc/self/fd")) == before + 2
    flusher.retire(pending)  # its flush is still due: kept open until then
    flusher.retire(done)  # nothing due: closed at once
    assert fd_open(pending) and not fd_open(done)
    flusher.flush()
    assert not fd_open(pending) and flusher._sync == {} and flusher._close == []
    assert [e["job"] for e, _ in feed.read(None, 10)[0]] == ["h"]
    feed.close()


def test_a_late_webhook_event_does_not_hide_a_move_by_hand(
    store: Store, recorder: Recorder
) -> None:
    """A webhook's result noted after `mv error/h queue/` carries the status "queue" but is
    no move: the job still gets its QUEUED (by hand, from error), seen or claimed."""
    for name in ("seen", "claimed"):
        store.create(name)
        events.queue(store, name)
        run_held(store, name, "error")
        os.rename(store.root / "error" / name, store.root / "queue" / name)  # by hand
        events.webhook_failed(store, name, "error", "http://127.0.0.1:9/", "refused")
        events.note(store, name, Code.CANCEL_REQUESTED, "Cancel requested.", {"by": "api"})
        assert history(store, name)[-1]["state"] == "queue"
    events.seen_queued(store, ["seen"])
    run_held(store, "seen", "success")
    run_held(store, "claimed", "success")
    for name in ("seen", "claimed"):
        got = [e for e in history(store, name) if e["code"] in ("QUEUED", "CLAIMED")]
        assert codes(got) == ["QUEUED", "CLAIMED", "QUEUED", "CLAIMED"], name
        assert got[2]["details"] == {"by": "hand", "from": "error"}


def test_a_listing_just_after_the_claims_rename_writes_no_second_queued(
    store: Store, recorder: Recorder, at_once: None
) -> None:
    """A job seen in queue/ (its QUEUED written, its history kept) is claimed; a listing
    taken after the rename is handled before the claim's events: still one QUEUED."""
    (store.root / "queue" / "t").mkdir()
    events.seen_queued(store, store.queued())
    assert "t" in recorder._waiting
    recorder._ends_queued.discard("t")  # what that listing's handling does first
    run_held(store, "t", "success")
    assert codes(history(store, "t")) == ["QUEUED", "CLAIMED", "SUCCEEDED"]


# -- the spool: the feed's lines not yet written, across a kill -9 ----------------------------


def _record_and_die(root: str, count: int, feed_written: bool, host: str = "") -> None:
    """A recorder (of a service with that --host-id) that records `count` events and is
    killed before its spool says they are in the feed: never written (feed_written
    False), or written just before."""
    events._Flusher._run = lambda self: None  # type: ignore[method-assign]
    if feed_written:
        events._Spool.written = lambda self, upto: None  # type: ignore[method-assign]
    store = Store(root)
    store.owner = lease.Owner.here(host)
    Recorder(store).attach()
    for n in range(count):
        events.note(store, "k", Code.TASK_STARTED, f"Task {n} started.", {"n": n})
    if feed_written:
        events.recorder_for(store).flush()  # type: ignore[union-attr]
    os.kill(os.getpid(), 9)


@pytest.mark.parametrize("feed_written", [False, True])
def test_the_feed_catches_up_after_a_kill_nothing_missed_nothing_twice(
    store: Store, feed_written: bool
) -> None:
    """Lines wait in the recorder's spool until the flusher writes them; a recorder
    started after a kill -9 writes those the feed lacks, once, after a reader's cursor."""
    store.create("k")
    first = Recorder(store)
    first.attach()
    events.note(store, "k", Code.CREATED, "Created.", {})
    first.close()
    feed = Feed(store.root_fd, ".events", create=False)
    seen, _ = feed.read(None, 100)
    cursor = seen[-1][1]  # a consumer that read everything so far
    child = multiprocessing.get_context("fork").Process(
        target=_record_and_die, args=(str(store.root), 50, feed_written)
    )
    child.start()
    child.join(60)
    assert child.exitcode == -9
    assert [n for n in os.listdir(store.root / ".events") if n.startswith(".spool-")]
    # every event is in the history, the durable record
    assert [e["details"].get("n") for e in history(store, "k")] == [None, *range(50)]
    for _ in range(2):  # restarted, twice: the second start finds nothing to add
        again = Recorder(store)
        again.attach()
        again.close()
        after = read_all(feed, cursor, 1000)
        assert [e["details"]["n"] for e, _ in after] == list(range(50))
    assert not [n for n in os.listdir(store.root / ".events") if n.startswith(".spool-")]
    feed.close()


def test_a_live_recorders_spool_is_left_to_it(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.create("k")
    live = Recorder(store)
    live.attach()
    monkeypatch.setattr(live._flusher, "_round", lambda: False)  # nothing written yet
    events.note(store, "k", Code.TASK_STARTED, "Task 1 started.", {"n": 1})
    other = Recorder(Store(store.root))  # another recorder started meanwhile on the root
    other.attach()
    other.close()
    assert feed_events(store) == []  # the live one's line is not taken over
    monkeypatch.undo()
    live.close()
    assert [e["details"]["n"] for e in feed_events(store)] == [1]


def test_the_spool_has_its_blocks_from_the_start(store: Store) -> None:
    """A spool's pages are all given blocks when it is made: a line copied into a page
    without one on a full disk would be a SIGBUS, not an error."""
    recorder = Recorder(store)
    recorder.attach()
    try:
        spool = recorder._flusher.spool  # type: ignore[union-attr]
        assert spool is not None
        assert os.fstat(spool.fd).st_blocks * 512 >= events.SPOOL_SIZE
    finally:
        recorder.close()


_NO_ROOM = """
import resource, signal, sys
from batchingest import events
from batchingest.store import Store
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
store = Store(sys.argv[1])
recorder = events.Recorder(store)
recorder.attach()
print(recorder._flusher.spool is None, flush=True)
for n in range(20):
    events.note(store, "k", events.Code.TASK_STARTED, f"Task {n} started.", {"n": n})
recorder.close()
"""


def test_without_room_for_a_spool_the_feed_is_written_without_one(store: Store) -> None:
    """Where the spool's blocks cannot be had (a full disk; here a file size limit), the
    recorder runs without a spool: it lives, and every event reaches the feed."""
    store.create("k")
    done = subprocess.run(
        [sys.executable, "-c", _NO_ROOM, str(store.root)], capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"]
    assert [e["details"]["n"] for e in feed_events(store)] == list(range(20))
    assert not [n for n in os.listdir(store.root / ".events") if n.startswith(".spool-")]


@contextlib.contextmanager
def api_processes(store: Store, notes_at_once: bool = False) -> Iterator[tuple[Store, Recorder]]:
    """The store and recorder of an extra API process on the root (the main process,
    `store`, makes its moves), and the main process's recorder: (api store, main's)."""
    api = Store(store.root)
    api.mover = store.move_here
    main_recorder, api_recorder = Recorder(store), Recorder(api)
    main_recorder.notes_at_once = notes_at_once  # as serve sets it with --api-processes 2
    main_recorder.attach()
    api_recorder.attach()
    try:
        yield api, main_recorder
        assert api_recorder._flusher.spool is None  # type: ignore[union-attr]
    finally:
        api_recorder.close()
        main_recorder.close()


def job_feed(store: Store, name: str) -> list[object]:
    return [e["code"] for e in feed_events(store) if e["job"] == name]


def test_a_job_s_events_keep_their_order_in_the_feed_across_api_processes(
    store: Store,
) -> None:
    """An extra API process records the events of its requests; its moves are made, and
    recorded, by the main process: the feed has them in the job's own order."""
    with api_processes(store) as (api, main_recorder):
        job, _ = store.create("j")
        events.created(api, job)
        events.file_uploaded(api, "j", "a.txt", 3, "0" * 64)
        events.queue(api, "j")
        main_recorder.flush()
        feed = job_feed(store, "j")
        assert feed == codes(history(store, "j")) == ["CREATED", "FILE_UPLOADED", "QUEUED"]


def _flock_as_on_nfs(fd: int, operation: int) -> None:
    """flock as an NFS client does it: an exclusive lock needs a descriptor open for
    writing (EBADF otherwise)."""
    writable = events.fcntl.fcntl(fd, events.fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY
    if operation & events.fcntl.LOCK_EX and not writable:
        raise OSError(errno.EBADF, "Bad file descriptor")
    _real_flock(fd, operation)


_real_flock = events.fcntl.flock


def test_a_killed_recorders_spool_is_replayed_where_flock_needs_writing(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On NFS an exclusive flock needs the file open for writing: a spool left by a kill
    is replayed there too, and the recorder starting has a spool of its own."""
    store.create("k")
    child = multiprocessing.get_context("fork").Process(
        target=_record_and_die, args=(str(store.root), 5, False)
    )
    child.start()
    child.join(60)
    assert child.exitcode == -9
    monkeypatch.setattr(events.fcntl, "flock", _flock_as_on_nfs)
    again = Recorder(store)
    again.attach()
    try:
        assert again._flusher.spool is not None  # type: ignore[union-attr]
        assert [e["details"]["n"] for e in feed_events(store)] == list(range(5))
    finally:
        again.close()


def test_a_spool_that_cannot_be_replayed_leaves_the_recorder_its_own(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error on one dead spool (an I/O error, say) leaves that spool for a later
    start; the recorder starting has its own all the same."""
    dead = store.root / ".events" / f".spool-1-0@{lease.host_label(store.owner.host)}"
    (store.root / ".events").mkdir(exist_ok=True)
    dead.write_bytes(bytes(16))

    def failing(fd: int, operation: int) -> None:
        if os.fstat(fd).st_ino == dead.stat().st_ino:
            raise OSError(errno.EIO, "Input/output error")
        _real_flock(fd, operation)

    monkeypatch.setattr(events.fcntl, "flock", failing)
    recorder = Recorder(store)
    recorder.attach()
    try:
        assert recorder._flusher.spool is not None  # type: ignore[union-attr]
        assert dead.exists()  # left for a later start
    finally:
        recorder.close()


def _spools(store: Store) -> list[str]:
    return sorted(n for n in os.listdir(store.root / ".events") if n.startswith(".spool-"))


def test_spools_are_replayed_by_the_host_id_not_the_host_name(store: Store) -> None:
    """A spool left on host id box-a is replayed by a recorder of box-a (a container
    recreated under a new host name keeps its id), never by one of box-b that happens
    to have the same host name."""
    store.create("k")
    child = multiprocessing.get_context("fork").Process(
        target=_record_and_die, args=(str(store.root), 3, False, "box-a")
    )
    child.start()
    child.join(60)
    assert child.exitcode == -9
    for host, found in (("box-b", []), ("box-a", [0, 1, 2])):
        store.owner = lease.Owner.here(host)
        recorder = Recorder(store)
        recorder.attach()
        recorder.close()
        assert [e["details"]["n"] for e in feed_events(store)] == found
    assert _spools(store) == []


def test_dead_spools_of_other_hosts_are_removed_after_events_keep(store: Store) -> None:
    """A spool another host left and never came back for goes once it is older than the
    feed's kept days; a newer one, or one its recorder still holds, stays."""
    spools = store.root / ".events"
    spools.mkdir(exist_ok=True)
    old, new = spools / ".spool-7-0@box-c", spools / ".spool-7-0@box-d"
    for dead in (old, new):
        dead.write_bytes(bytes(16))
    week = time.time() - 8 * 86400
    os.utime(old, (week, week))
    held = events._Spool(fs.open_dir(store.root_fd, ".events"), "box-e")
    os.utime(spools / held.name, (week, week))
    recorder = Recorder(store, keep_days=7)
    recorder.attach()
    recorder.close()
    try:
        assert _spools(store) == sorted([new.name, held.name])
    finally:
        held.close()
        os.close(held.dir_fd)


def test_a_line_recorded_while_the_recorder_closes_reaches_the_feed(store: Store) -> None:
    """An event recorded after the flusher's last round (another thread, while close()
    runs) is written to the feed at once, not left in the spool that close() removes."""
    store.create("k")
    recorder = Recorder(store)
    recorder.attach()
    recorder._flusher.stop()  # type: ignore[union-attr]  # what close() does first
    events.note(store, "k", Code.TASK_STARTED, "Task 1 started.", {"n": 1})
    recorder._flusher.spool.close()  # type: ignore[union-attr]  # and then this
    recorder._flusher.spool = None  # type: ignore[union-attr]
    recorder.close()
    assert [e["details"]["n"] for e in feed_events(store)] == [1]
    assert _spools(store) == []


def test_the_main_process_s_api_events_precede_an_extra_process_s_in_the_feed(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With several API processes, a job created through the main one and uploaded to
    through another has CREATED before FILE_UPLOADED in the feed, however soon the
    second request came (the main process's flusher has not had its tick here)."""
    monkeypatch.setattr(events._Flusher, "_run", lambda self: None)  # no tick meanwhile
    with api_processes(store, notes_at_once=True) as (api, _):
        job, _ = store.create("j")
        events.created(store, job)
        events.file_uploaded(api, "j", "a.txt", 3, "0" * 64)
        order = job_feed(store, "j")
        assert order == codes(history(store, "j")) == ["CREATED", "FILE_UPLOADED"]


# -- a job queued by hand: QUEUED with the claim, or once it has waited ------------------------


def test_a_job_claimed_soon_after_it_is_seen_gets_its_queued_with_the_claim(
    store: Store, recorder: Recorder
) -> None:
    """One open and one write of its history: QUEUED (timed when seen) and CLAIMED."""
    (store.root / "queue" / "soon").mkdir()
    events.seen_queued(store, store.queued())
    assert not (store.root / "queue" / "soon" / EVENTS_FILE).exists()  # nothing yet
    seen = recorder._seen["soon"][0]
    time.sleep(0.01)
    run_held(store, "soon", "success")
    got = history(store, "soon")
    assert codes(got) == ["QUEUED", "CLAIMED", "SUCCEEDED"]
    assert got[0]["details"] == {"by": "hand"} and got[0]["time"] == seen
    assert str(got[0]["time"]) < str(got[1]["time"])
    assert recorder._seen == {}


def test_a_job_left_waiting_gets_its_queued_from_the_flusher(
    store: Store, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "QUEUED_DELAY", 0.2)
    (store.root / "queue" / "waits").mkdir()
    events.seen_queued(store, store.queued())
    deadline = time.monotonic() + 10
    while not (store.root / "queue" / "waits" / EVENTS_FILE).exists():
        assert time.monotonic() < deadline, "no QUEUED written for a waiting job"
        time.sleep(0.05)
    assert codes(history(store, "waits")) == ["QUEUED"]
    events.seen_queued(store, store.queued())  # seen again: nothing more
    run_held(store, "waits", "success")
    assert codes(history(store, "waits")) == ["QUEUED", "CLAIMED", "SUCCEEDED"]


def test_jobs_seen_waiting_get_their_queued_when_the_recorder_closes(store: Store) -> None:
    recorder = Recorder(store)
    recorder.attach()
    for name in ("a", "b"):
        (store.root / "queue" / name).mkdir()
    events.seen_queued(store, store.queued())
    (store.root / "queue" / "b").rename(store.root / "data" / "b")  # gone before it is due
    recorder.close()
    assert codes(history(store, "a")) == ["QUEUED"]
    assert not (store.root / "data" / "b" / EVENTS_FILE).exists()
    assert [e["job"] for e in feed_events(store)] == ["a"]


def test_histories_waiting_for_one_syncfs_are_not_kept_open(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every task's fork copies and closes each open descriptor: of the histories waiting
    for a batch's syncfs, only SYNCFS_BATCH per file system stay open; all are flushed."""
    synced: list[int] = []
    real_syncfs = fs.syncfs

    def syncfs(fd: int) -> bool:
        synced.append(os.fstat(fd).st_dev)
        return real_syncfs(fd)

    monkeypatch.setattr(fs, "syncfs", syncfs)
    recorder = Recorder(store)
    recorder.attach()
    assert recorder._flusher is not None
    before = len(os.listdir("/proc/self/fd"))
    with recorder._flusher._one_round:  # no round meanwhile: all wait for the next
        for i in range(40):
            (store.root / "queue" / f"h{i}").mkdir()
            run_held(store, f"h{i}", "success")
        assert len(os.listdir("/proc/self/fd")) <= before + events.SYNCFS_BATCH
        assert sum(recorder._flusher._by_fs.values()) >= 40 - events.SYNCFS_BATCH
    recorder.close()
    assert os.stat(store.root / "success").st_dev in synced  # the closed ones' flush
    assert len(os.listdir("/proc/self/fd")) <= before
    assert all(codes(history(store, f"h{i}")) == ["QUEUED", "CLAIMED", "SUCCEEDED"]
               for i in range(40))  # fmt: skip


def test_the_flusher_writes_waiting_jobs_queued_a_bounded_number_a_round(
    store: Store, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flushes wait for a round: 10,000 jobs found queued at start are written over
    many rounds, the oldest seen first, and none is lost."""
    monkeypatch.setattr(events, "QUEUED_DELAY", 0.0)
    monkeypatch.setattr(events, "SEEN_A_ROUND", 3)
    names = [f"w{i}" for i in range(10)]
    assert recorder._flusher is not None
    due, recorder._flusher.due = recorder._flusher.due, None  # no round writes them meanwhile
    try:
        for name in names:
            (store.root / "queue" / name).mkdir()
            with recorder._queued_lock:  # seen one after another, as a listing does
                recorder._seen[name] = (events._now(), time.monotonic())
        assert recorder._write_seen_in_round(False) is True
        assert [n for n in names if history(store, n)] == ["w0", "w1", "w2"]
    finally:
        recorder._flusher.due = due
    deadline = time.monotonic() + 30
    while not all(history(store, n) for n in names):
        assert time.monotonic() < deadline, "waiting jobs never got their QUEUED"
        time.sleep(0.05)
    assert all(codes(history(store, n)) == ["QUEUED"] for n in names)


def test_a_job_given_up_without_a_move_closes_its_kept_history(
    store: Store, recorder: Recorder
) -> None:
    """A job another host took over (its lease lost) is let go: no descriptor stays."""
    (store.root / "queue" / "lost").mkdir()
    hold = store.claim("lost")
    assert hold is not None
    events.task_started(store, hold, "start")
    fd = recorder._held["lost"][0]
    events.let_go(store, "lost")
    hold.abandon()
    assert "lost" not in recorder._held
    recorder.flush()  # a flush still due for it came first
    history_file = str(store.root / "processing" / "lost" / EVENTS_FILE)
    with contextlib.suppress(FileNotFoundError):  # closed (or the number reused since)
        assert not os.readlink(f"/proc/self/fd/{fd}").startswith(history_file)


def test_a_waiting_queued_comes_before_a_cancel_or_a_note(store: Store, recorder: Recorder) -> None:
    """A job seen in queue/ by hand, its QUEUED not written yet: taken back to ready
    (a cancel, a deadline) or noted meanwhile, its QUEUED is written first."""
    for name in ("back", "noted"):
        store.create(name)
        events.queue(store, name)
        run_held(store, name, "error")
        os.rename(store.root / "error" / name, store.root / "queue" / name)  # by hand
    events.seen_queued(store, store.queued())
    assert codes(history(store, "back"))[-1] == "FAILED"  # nothing yet
    assert store.unqueue("back") is not None  # as a cancel of a queued job does
    events.canceled(store, "back")
    got = history(store, "back")
    assert codes(got)[-2:] == ["QUEUED", "CANCELED"]
    assert got[-2]["details"] == {"by": "hand", "from": "error"} and got[-2]["state"] == "queue"
    events.webhook_failed(store, "noted", "error", "http://127.0.0.1:9/", "refused")
    run_held(store, "noted", "success")
    got = history(store, "noted")
    assert codes(got)[-4:] == ["QUEUED", "WEBHOOK_FAILED", "CLAIMED", "SUCCEEDED"]
    assert got[-4]["time"] <= got[-3]["time"]  # type: ignore[operator]


def test_a_namesake_never_finished_leaves_no_history_to_the_next(
    store: Store, recorder: Recorder
) -> None:
    """A held job removed by hand (its final move never comes): a new job of that name,
    claimed later, writes its own history, not into the removed one's."""
    (store.root / "queue" / "c").mkdir()
    hold = store.claim("c")
    assert hold is not None
    events.task_started(store, hold, "start")
    shutil.rmtree(store.root / "processing" / "c")
    hold.abandon()
    store.create("c")
    events.queue(store, "c")
    run_held(store, "c", "success")
    assert codes(history(store, "c")) == ["QUEUED", "CLAIMED", "SUCCEEDED"]


def test_a_history_hard_linked_with_another_jobs_is_made_this_jobs_own(
    store: Store, recorder: Recorder
) -> None:
    """`cp -al success/a queue/b`: b's events go to b's history alone, which starts as a
    copy of a's; a's history is left as it was."""
    (store.root / "queue" / "a").mkdir()
    run_held(store, "a", "success")
    before = (store.root / "success" / "a" / EVENTS_FILE).read_bytes()
    (store.root / "queue" / "b").mkdir()
    os.link(store.root / "success" / "a" / EVENTS_FILE, store.root / "queue" / "b" / EVENTS_FILE)
    run_held(store, "b", "success")
    recorder.flush()
    assert (store.root / "success" / "a" / EVENTS_FILE).read_bytes() == before
    assert codes(history(store, "b")) == ["QUEUED", "CLAIMED", "SUCCEEDED"] * 2
    assert os.stat(store.root / "success" / "b" / EVENTS_FILE).st_nlink == 1


# -- a history made ready while a worker waits for a task slot -----------------------------


def fd_of(path: Path) -> list[str]:
    """This process's descriptors open on path."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                found.append(fd)
    return found


def test_a_history_made_ready_is_the_claims_and_written_only_by_it(
    store: Store, recorder: Recorder
) -> None:
    """Made ready (the file, nothing in it), then claimed: the claim writes through that
    descriptor. A history there already is left to the claim (which mends it under the
    job's lock if need be): its QUEUED by hand says the state the history ended in."""
    (store.root / "queue" / "fresh").mkdir()
    store.create("again")
    events.queue(store, "again")
    run_held(store, "again", "error")
    os.rename(store.root / "error" / "again", store.root / "queue" / "again")  # by hand
    for name in ("fresh", "again"):
        events.ready(store, name)
    fresh = store.root / "queue" / "fresh" / EVENTS_FILE
    assert fresh.exists() and fresh.read_bytes() == b""  # made, nothing written yet
    assert len(fd_of(fresh)) == 1 and sorted(recorder._ready) == ["fresh"]
    run_held(store, "fresh", "success")
    run_held(store, "again", "success")
    assert recorder._ready == {} and recorder._held == {}
    assert codes(history(store, "fresh")) == ["QUEUED", "CLAIMED", "SUCCEEDED"]
    assert history(store, "fresh")[0]["details"] == {"by": "hand"}
    got = history(store, "again")
    assert codes(got) == ["QUEUED", "CLAIMED", "FAILED", "QUEUED", "CLAIMED", "SUCCEEDED"]
    assert got[3]["details"] == {"by": "hand", "from": "error"}
    recorder.flush()
    assert fd_of(store.root / "success" / "fresh" / EVENTS_FILE) == []


def test_a_history_made_ready_but_not_claimed_here_is_closed(
    store: Store, recorder: Recorder
) -> None:
    """Taken elsewhere or moved out by hand before the claim: unready closes it, nothing
    written; one removed, or a job swapped for a namesake, before the claim: the claim
    writes to the claimed folder's history, never to the one made ready."""
    for name in ("elsewhere", "removed", "swapped"):
        (store.root / "queue" / name).mkdir()
        events.ready(store, name)
    os.rename(store.root / "queue" / "elsewhere", store.root / "data" / "elsewhere")
    assert store.claim("elsewhere") is None
    events.unready(store, "elsewhere")
    history_file = store.root / "data" / "elsewhere" / EVENTS_FILE
    assert fd_of(history_file) == [] and history_file.read_bytes() == b""
    (store.root / "queue" / "removed" / EVENTS_FILE).unlink()
    run_held(store, "removed", "success")
    assert codes(history(store, "removed")) == ["QUEUED", "CLAIMED", "SUCCEEDED"]
    os.rename(store.root / "queue" / "swapped", store.root / "data" / "swapped")
    (store.root / "queue" / "swapped").mkdir()  # another job of that name
    run_held(store, "swapped", "success")
    assert (store.root / "data" / "swapped" / EVENTS_FILE).read_bytes() == b""
    os.rename(store.root / "data" / "swapped", store.root / "data" / "away")
    assert codes(history(store, "swapped")) == ["QUEUED", "CLAIMED", "SUCCEEDED"]
    assert recorder._ready == {} and recorder._held == {}
    events.ready(store, "gone")  # not in queue/: nothing made, nothing raised
    assert recorder._ready == {}


def test_a_history_made_ready_then_hard_linked_is_not_written_through(
    store: Store, recorder: Recorder
) -> None:
    """Made ready, then linked into another folder (`cp -al`) before the claim: the claim
    gives this job its own copy, and the other folder's history gets none of its events."""
    (store.root / "queue" / "orig").mkdir()
    events.ready(store, "orig")
    assert "orig" in recorder._ready
    (store.root / "data" / "copy").mkdir()
    os.link(store.root / "queue" / "orig" / EVENTS_FILE, store.root / "data" / "copy" / EVENTS_FILE)
    run_held(store, "orig", "success")
    recorder.flush()
    assert (store.root / "data" / "copy" / EVENTS_FILE).read_bytes() == b""
    assert codes(history(store, "orig")) == ["QUEUED", "CLAIMED", "SUCCEEDED"]
    assert os.stat(store.root / "success" / "orig" / EVENTS_FILE).st_nlink == 1
    assert recorder._ready == {} and recorder._held == {}


def test_a_worker_waiting_for_a_slot_makes_its_jobs_history_ready(tmp_path: Path) -> None:
    """With every slot taken, the next job's history is made before its claim."""
    store = Store(tmp_path / "root")
    store.init()
    recorder = Recorder(store)
    recorder.attach()
    try:
        (store.root / "queue" / "next").mkdir()
        slots = threading.BoundedSemaphore(1)
        slots.acquire()  # the only slot is busy
        made: list[bool] = []

        def release_later() -> None:
            time.sleep(0.2)
            made.append((store.root / "queue" / "next" / EVENTS_FILE).exists())
            slots.release()

        threading.Thread(target=release_later).start()
        with processor._Slot(slots, lambda: events.ready(store, "next")):
            assert made == [True] and "next" in recorder._ready
        with processor._Slot(slots, lambda: made.append(False)):
            assert made == [True]  # a slot free at once: no wait, nothing made first
    finally:
        recorder.close()


def test_a_history_kept_since_seen_in_queue_is_not_a_swapped_namesakes(
    store: Store, recorder: Recorder, at_once: None
) -> None:
    """Seen in queue/ (its QUEUED written, the history kept), then moved out by hand and
    another job of that name moved in: the claim writes to the new job's history."""
    (store.root / "queue" / "twin").mkdir()
    events.seen_queued(store, store.queued())
    assert "twin" in recorder._waiting
    os.rename(store.root / "queue" / "twin", store.root / "data" / "first")
    (store.root / "queue" / "twin").mkdir()
    run_held(store, "twin", "success")
    assert codes(history(store, "first")) == ["QUEUED"]  # left as it was
    assert codes(history(store, "twin"))[-2:] == ["CLAIMED", "SUCCEEDED"]
    assert recorder._waiting == {} and recorder._held == {}
