"""outbox.py: one file per event whatever the number of URLs, written off the event loop
in batches, and never lost to a full disk."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_service import wait_for
from webhook_receiver import Receiver, Silent, new_job, outbox, run_through, running

from batchingest.config import Config
from batchingest.store import Store
from batchingest.webhooks import Webhooks
from batchingest.webhooks.outbox import Event, Outbox, Writer, parse_event


def outbox_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / ".outbox").glob("*.json"))


def test_body_is_stored_once_per_event_not_per_url(store: Store) -> None:
    hooks = Webhooks(Config(root=store.root), store)
    hooks.attach()  # writing, not delivering
    try:
        urls = "".join(f"http://h{i}.example/hook\n" for i in range(16))
        path = new_job(store, "wide", urls)
        (path / "LOG").write_bytes(b"y" * (1 << 20))
        run_through(store, "wide", "error")
    finally:
        hooks.close()
    files = outbox(store.root)
    assert len(files) == 3  # queue, processing, error: one file each, 16 URLs in each
    # the error event carries the 1 MiB LOG tail once, not 16 times
    assert (1 << 20) < outbox_bytes(store.root) < (1 << 20) + 16_000
    head = json.loads((store.root / ".outbox" / files[-1]).read_bytes().split(b"\n", 1)[0])
    assert head["state"] == "error" and len(head["urls"]) == 16


def test_writer_batches_and_reports_each_event(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "box")
    written: list[str] = []
    writer = Writer(box, lambda events: written.extend(e.file for e in events))
    names = []

    def submit(i: int) -> None:
        e = Event(i, f"id{i}", "j", "j", "queue", ("http://x/",), Event.name_for(i, f"id{i}"))
        names.append(e.file)
        assert writer.submit([(e, b"{}")], wait=True)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(1, 41)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(written) == sorted(names)
    assert sorted(box.names()) == sorted(names)
    assert box.read(names[0]) is not None


def test_a_url_done_is_not_sent_again_after_a_restart(store: Store) -> None:
    with Silent() as dead:
        port = dead.port
        with Receiver() as ok, running(store, webhook_timeout=30):
            new_job(store, "two", f"{ok.url}/a\nhttp://127.0.0.1:{port}/b\n")
            store.queue("two")
            ok.wait(1)
            # the first URL is done: its marker is there, the event waits for the second
            wait_for(lambda: list((store.root / ".outbox").glob("*.json.done0")), 30)
            assert len(outbox(store.root)) == 1
    with Receiver(port=port) as late, Receiver() as ok2, running(store):
        late.wait(1)
        # the event file and its marker both go
        box = store.root / ".outbox"
        wait_for(lambda: list(box.iterdir()) == [box / "failed"], 30, what="outbox to empty")
    assert [r.path for r in late.receipts] == ["/b"]
    assert ok2.receipts == []  # the ok receiver's port differs; nothing else was resent


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, to fill up; skipped where mounting is not allowed."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                          capture_output=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> None:
    """Write until the file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


def test_no_event_lost_on_a_full_disk(small_fs: Path) -> None:
    store = Store(small_fs / "root")
    store.init()
    with Receiver() as rx, running(store) as hooks:
        new_job(store, "full", rx.url)
        filler = small_fs / "filler"
        fill(filler)
        started = time.monotonic()
        store.queue("full")  # the move succeeds; its event cannot be written yet
        hold = store.claim("full")
        assert hold is not None
        # moves that waited for their events to be written would wait here for good
        assert time.monotonic() - started < 30
        assert outbox(store.root) == []
        assert hooks.writer is not None and hooks.writer.pending() == 2
        time.sleep(1.5)  # retried meanwhile, and still kept
        assert rx.receipts == [] and hooks.writer.pending() == 2
        filler.unlink()  # space again: the events are written and sent, in order
        rx.wait(2)
        store.finish(hold, "success")
        rx.wait(3)
        wait_for(lambda: outbox(store.root) == [], 30, what="outbox to empty")
    assert [e["job_state"] for e in rx.events()] == ["queue", "processing", "success"]


def test_a_file_cut_short_is_recognised_and_set_aside(store: Store) -> None:
    event = Event(1, "e1", "j", "j", "queue", ("http://x/",), Event.name_for(1, "e1"))
    data = event.dumps(b'{"job_name": "j"}')
    assert parse_event(event.file, data) == (event, b'{"job_name": "j"}')
    assert parse_event(event.file, data[:-3]) is None  # the recorded size gives it away
    box = store.root / ".outbox"
    box.mkdir()
    (box / event.file).write_bytes(data[:-3])
    with running(store):
        wait_for(lambda: (box / "failed" / event.file).exists(), 30, what="set aside")
    assert outbox(store.root) == []
    assert [p.name for p in box.iterdir() if p.name.startswith(".")] == []  # no temporaries


def test_start_delivers_old_format_files_and_sweeps_leftovers(store: Store) -> None:
    box = store.root / ".outbox"
    box.mkdir()
    stale, fresh = box / ".x.json.0123456789ab.tmp", box / ".y.json.0123456789ab.tmp"
    stale.write_text("cut off")
    os.utime(stale, (time.time() - 120, time.time() - 120))
    fresh.write_text("another service writing now")
    orphan = box / "00000000000000000009-gone.json.done1"
    orphan.touch()
    with Receiver() as rx:
        # one pending delivery as earlier versions wrote it: one file per URL, "url"
        head = {"seq": 5, "index": 0, "event_id": "e-old", "job": "j", "key": "j",
                "state": "queue", "url": f"{rx.url}/old"}  # fmt: skip
        (box / "00000000000000000005-0000-e-old.json").write_bytes(
            json.dumps(head).encode() + b"\n" + b'{"event_id": "e-old"}'
        )
        with running(store):
            (receipt,) = rx.wait(1)
            wait_for(lambda: outbox(store.root) == [], 30, what="outbox to empty")
    assert receipt.path == "/old" and receipt.json == {"event_id": "e-old"}
    assert not stale.exists() and fresh.exists() and not orphan.exists()
