"""Job history and the event feed end to end: the real service, real moves, real tasks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_service import Service, make_job, wait_for, write_task
from webhook_receiver import Receiver

pytestmark = pytest.mark.e2e

ALLOW = {"BATCHINGEST_WEBHOOK_ALLOW": "127.0.0.1", "BATCHINGEST_WEBHOOK_BACKOFF": "0.05"}
WEBHOOK_CODES = ("WEBHOOK_DELIVERED", "WEBHOOK_FAILED")


def drop(
    root: Path, name: str, job: str | None = None, files: dict[str, str] | None = None
) -> None:
    os.rename(make_job(root, name, job, files), root / "queue" / name)


def history(c: httpx.Client, name: str) -> list[dict[str, Any]]:
    r = c.get(f"/jobs/{name}/events", params={"limit": 1000})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["DATA_TYPE"] == "event_list" and body["total"] == len(body["DATA"])
    assert all(e["DATA_TYPE"] == "event" for e in body["DATA"])
    return body["DATA"]  # type: ignore[no-any-return]


def job_codes(events: list[dict[str, Any]]) -> list[str]:
    """The codes of the job's own story (webhook results arrive whenever they do)."""
    return [e["code"] for e in events if e["code"] not in WEBHOOK_CODES]


def finished(c: httpx.Client, name: str) -> list[dict[str, Any]]:
    def done() -> list[dict[str, Any]] | None:
        r = c.get(f"/jobs/{name}/events", params={"limit": 1000})
        if r.status_code != 200:
            return None
        got: list[dict[str, Any]] = r.json()["DATA"]
        return got if any(e["code"] in ("SUCCEEDED", "FAILED") for e in got) else None

    return wait_for(done, 30, what=f"{name} to finish")  # type: ignore[no-any-return]


def read_feed(c: httpx.Client, after: str | None = None, limit: int = 4) -> list[dict[str, Any]]:
    """Every event after the cursor, page by page, as a consumer would."""
    out: list[dict[str, Any]] = []
    while True:
        params: dict[str, Any] = {"limit": limit}
        if after is not None:
            params["after"] = after
        body = c.get("/events", params=params).json()
        assert body["DATA_TYPE"] == "event_list", body
        out.extend(body["DATA"])
        if body["DATA"]:
            after = body["DATA"][-1]["cursor"]
        if body["next_cursor"] is None:
            return out
        assert body["next_cursor"] == after


def in_feed(c: httpx.Client, *names: str) -> list[dict[str, Any]]:
    """The whole feed, once it has every named job's last event: the feed's lines are
    written a tick after the histories' (events.py, Durability)."""

    def done() -> list[dict[str, Any]] | None:
        got = read_feed(c, None, 1000)
        ended = {e["job"] for e in got if e["code"] in ("SUCCEEDED", "FAILED")}
        return got if ended >= set(names) else None

    return wait_for(done, 10, what=f"{', '.join(names)} in the feed")  # type: ignore[no-any-return]


def test_every_code_of_an_api_job_in_order(root: Path) -> None:
    write_task(root / "tasks", "start", 'echo addtask:second >> "$JOBCONTROL"\n')
    write_task(root / "tasks", "second", "echo second\n")
    with Receiver() as rx, Service(root, env=ALLOW) as svc, svc.client() as c:
        assert c.put("/jobs/api-job").status_code == 201
        assert c.put("/jobs/api-job/files/data.txt", content=b"hello").status_code == 201
        hook = f"http://127.0.0.1:{rx.port}/hook"
        assert c.put("/jobs/api-job/files/WEBHOOK", content=hook).status_code == 201
        assert c.put("/jobs/api-job/files/sub/gone.txt", content=b"x").status_code == 201
        assert c.delete("/jobs/api-job/files/sub/gone.txt").status_code == 204
        # the history is the service's: it cannot be uploaded over or listed
        assert c.put("/jobs/api-job/files/.events", content=b"{}\n").status_code == 400
        assert ".events" not in c.get("/jobs/api-job/files").json()
        assert c.post("/jobs/api-job/queue").status_code == 202
        finished(c, "api-job")
        got = wait_for(
            lambda: (h := history(c, "api-job")) and len(h) - len(job_codes(h)) == 3 and h,
            30,
            what="the three webhook deliveries",
        )
        # the job's info counts its history
        assert c.get("/jobs/api-job").json()["Events"] == len(history(c, "api-job"))
    assert job_codes(got) == [
        "CREATED", "FILE_UPLOADED", "FILE_UPLOADED", "FILE_UPLOADED", "FILE_DELETED",
        "QUEUED", "CLAIMED", "TASK_STARTED", "TASK_SUCCEEDED", "TASK_STARTED",
        "TASK_SUCCEEDED", "SUCCEEDED",
    ]  # fmt: skip
    own = [e for e in got if e["code"] not in WEBHOOK_CODES]
    assert [e["state"] for e in own] == ["ready"] * 5 + ["queue"] + ["processing"] * 5 + [
        "success"]  # fmt: skip
    assert own[1]["details"]["path"] == "data.txt" and own[1]["details"]["size"] == 5
    assert own[4]["details"] == {"path": "sub/gone.txt"}
    assert own[5]["details"] == {"by": "api", "from": "ready"}
    assert own[6]["details"]["host"] and isinstance(own[6]["details"]["pid"], int)
    assert own[8]["details"]["task"] == "start" and own[8]["details"]["added"] == ["second"]
    assert all(not e["is_error"] for e in got)
    assert [e["time"] for e in got] == sorted(e["time"] for e in got)
    hooks = [e for e in got if e["code"] == "WEBHOOK_DELIVERED"]
    assert [e["details"]["state"] for e in hooks] == ["queue", "processing", "success"]
    # one sentence each, for people
    assert all(e["description"].endswith(".") for e in got)


def test_hand_moved_failing_timed_out_renamed_and_webhook_failed(root: Path) -> None:
    write_task(root / "tasks", "bad", "echo broken >&2; exit 3\n")
    write_task(root / "tasks", "slow", "sleep 30\n")
    write_task(root / "tasks", "start", "true\n")
    (root / "success" / "dup").mkdir()  # a namesake that had no history
    refused = {"WEBHOOK": "http://127.0.0.1:9/refused-without-an-allow-list\n"}
    with Service(root, "--task-timeout", "1") as svc, svc.client() as c:
        drop(root, "h", '{"Todo": ["bad"]}', refused)
        drop(root, "t", '{"Todo": ["slow"]}')
        drop(root, "dup")
        first = finished(c, "h")
        os.rename(root / "error" / "h", root / "queue" / "h")  # mv error/h queue/
        wait_for(lambda: job_codes(history(c, "h")).count("FAILED") == 2, 30, what="h again")
        h = wait_for(
            lambda: (g := history(c, "h")) and len(g) - len(job_codes(g)) == 6 and g,
            30,
            what="the six refused webhook events",
        )
        t = finished(c, "t")
        dup = finished(c, "dup-001")
    story = ["QUEUED", "CLAIMED", "TASK_STARTED", "TASK_FAILED", "FAILED"]
    assert job_codes(first) == story
    assert job_codes(h) == story + story
    own = [e for e in h if e["code"] not in WEBHOOK_CODES]
    assert own[0]["details"] == {"by": "hand"} and own[0]["state"] == "queue"
    assert own[5]["details"] == {"by": "hand", "from": "error"}
    assert own[3]["details"]["exit_code"] == 3 and own[3]["details"]["reason"] == "exit status 3"
    assert own[3]["is_error"] and own[4]["is_error"] and own[4]["state"] == "error"
    failed = [e for e in h if e["code"] == "WEBHOOK_FAILED"]
    assert len(failed) == 6 and all(e["is_error"] for e in failed)
    assert "loopback" in failed[0]["details"]["reason"]
    assert job_codes(t) == ["QUEUED", "CLAIMED", "TASK_STARTED", "TASK_TIMED_OUT", "FAILED"]
    assert "timed out" in t[3]["details"]["reason"]
    assert job_codes(dup)[-2:] == ["SUCCEEDED", "RENAMED"]
    assert dup[-1]["details"] == {"from": "dup", "to": "dup-001"}


def test_a_hand_queued_job_has_its_queued_event_while_it_waits(root: Path) -> None:
    write_task(root / "tasks", "start", '[ "$JOBNAME" = first ] && sleep 8; true\n')
    with Service(root, "--workers", "1") as svc, svc.client() as c:
        drop(root, "first")
        wait_for(lambda: (root / "processing" / "first").is_dir(), 30, what="first to start")
        drop(root, "waiting")  # no worker free: it stays in queue/ for a while
        got = wait_for(lambda: history(c, "waiting"), 6, what="waiting's QUEUED")
        assert (root / "queue" / "waiting").is_dir()
        assert [e["code"] for e in got] == ["QUEUED"]
        assert got[0]["details"] == {"by": "hand"} and got[0]["state"] == "queue"
        assert job_codes(finished(c, "waiting")).count("QUEUED") == 1


def test_recovered_after_a_crash_and_requeued_when_stopped(root: Path) -> None:
    # runs until killed, unless the job holds `quick`; says its pid, to end it after kill -9
    script = '[ -f "$JOBPATH/quick" ] && exit 0\necho $$ >> "$JOBPATH/pids"\nexec sleep 60\n'
    write_task(root / "tasks", "start", script)

    def started(times: int) -> bool:
        """The task has run `times` times (and said its pid)."""
        for state in ("queue", "processing"):
            pids = root / state / "r" / "pids"
            with contextlib.suppress(FileNotFoundError):
                if len(pids.read_text().split()) >= times:
                    return True
        return False

    svc = Service(root, api=False).start()
    try:
        drop(root, "r")
        wait_for(lambda: started(1), 30, what="the task to start")
        svc.kill()  # kill -9: the orphaned task holds the job until it exits
        orphan = int((root / "processing" / "r" / "pids").read_text().split()[-1])
        os.kill(orphan, signal.SIGKILL)
        svc = Service(root, "--grace", "0").start()
        wait_for(lambda: started(2), 30, what="the task to start again")
    finally:
        stopped = svc.stop()  # stopping: the job goes back to queue/
    assert stopped == 0
    (root / "queue" / "r" / "quick").write_text("")
    with Service(root) as svc, svc.client() as c:
        got = finished(c, "r")
    assert job_codes(got) == [
        "QUEUED", "CLAIMED", "TASK_STARTED",
        "RECOVERED", "CLAIMED", "TASK_STARTED", "TASK_FAILED", "QUEUED",
        "CLAIMED", "TASK_STARTED", "TASK_SUCCEEDED", "SUCCEEDED",
    ]  # fmt: skip
    assert got[3]["state"] == "queue" and got[3]["details"] == {"from": "processing"}
    assert got[6]["details"]["reason"] == "stopped because the service is stopping"
    assert got[7]["details"] == {"by": "service", "from": "processing"}


def test_feed_cursor_across_a_restart_misses_nothing_and_repeats_nothing(root: Path) -> None:
    write_task(root / "tasks", "start", "true\n")
    with Service(root) as svc, svc.client() as c:
        for n in range(3):
            drop(root, f"a{n}")
        for n in range(3):
            finished(c, f"a{n}")
        in_feed(c, "a0", "a1", "a2")
        before = read_feed(c)
    assert sorted(e["job"] for e in before if e["code"] == "SUCCEEDED") == ["a0", "a1", "a2"]
    last = before[-1]["cursor"]
    with Service(root) as svc, svc.client() as c:
        for n in range(2):
            drop(root, f"b{n}")
        for n in range(2):
            finished(c, f"b{n}")
        in_feed(c, "b0", "b1")
        after = read_feed(c, last)
        everything = read_feed(c, None, limit=1000)
        per_job = {name: history(c, name) for name in ("a0", "a1", "a2", "b0", "b1")}
    assert everything == before + after
    assert {e["job"] for e in after} == {"b0", "b1"}
    cursors = [e["cursor"] for e in everything]
    assert len(set(cursors)) == len(cursors)
    # the feed holds each job's history, event for event
    for name, own in per_job.items():
        strip = [{k: v for k, v in e.items() if k not in ("job", "cursor")} for e in everything
                 if e["job"] == name]  # fmt: skip
        assert strip == own


def sse(
    client: httpx.Client,
    count: int,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    ready: threading.Event | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """The first `count` events of a stream, as (id, event)."""
    got: list[tuple[str, dict[str, Any]]] = []
    event_id = None
    hdrs = {"Accept": "text/event-stream", **(headers or {})}
    with client.stream("GET", "/events", headers=hdrs, params=params) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        if ready is not None:
            ready.set()  # the stream's start is fixed once it answered
        for line in r.iter_lines():
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                assert event_id is not None
                got.append((event_id, json.loads(line[6:])))
                if len(got) == count:
                    return got
    return got


def test_server_sent_events_resume_with_last_event_id(root: Path) -> None:
    write_task(root / "tasks", "start", "true\n")
    with Service(root) as svc, svc.client() as c:
        drop(root, "old")
        in_feed(c, "old")
        live: list[tuple[str, dict[str, Any]]] = []
        ready = threading.Event()
        reader = threading.Thread(target=lambda: live.extend(sse(c, 4, ready=ready)))
        reader.start()
        assert ready.wait(30)
        drop(root, "new")  # the stream started at the live end: old's events are not in it
        reader.join(30)
        assert [e["job"] for _, e in live] == ["new"] * 4
        assert [e["code"] for _, e in live] == ["QUEUED", "CLAIMED", "TASK_STARTED",
                                                 "TASK_SUCCEEDED"]  # fmt: skip
        assert all(i == e["cursor"] for i, e in live)
        finished(c, "new")
        # reconnecting with the id of the second event goes on with the third
        resumed = sse(c, 2, headers={"Last-Event-ID": live[1][0]})
        assert [e for _, e in resumed] == [e for _, e in live[2:4]]
        # after= does the same, and Last-Event-ID wins over it
        also = sse(c, 1, params={"after": live[2][0]})
        assert also[0][1] == live[3][1]
        assert sse(c, 1, headers={"Last-Event-ID": live[2][0]}, params={"after": live[0][0]}) == [
            live[3]]  # fmt: skip


def test_bad_requests_and_a_planted_history(root: Path, tmp_path: Path) -> None:
    write_task(root / "tasks", "start", "true\n")
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    with Service(root) as svc, svc.client() as c:
        (job := make_job(root, "x"))
        (job / ".events").symlink_to(outside)
        os.rename(job, root / "queue" / "planted")
        # garbage and a torn line a user left: skipped, never fatal
        drop(root, "fake", files={".events": 'not json\n[1]\n{"code": "QUEUED"'})
        wait_for(lambda: (root / "success" / "planted").is_dir(), 30, what="planted to finish")
        wait_for(lambda: (root / "success" / "fake").is_dir(), 30, what="fake to finish")
        assert outside.read_text() == "precious\n"  # never written through the link
        r = c.get("/jobs/planted/events")
        assert r.status_code == 200 and r.json()["total"] == 0 and r.json()["DATA"] == []
        assert "SUCCEEDED" in [e["code"] for e in in_feed(c, "planted") if e["job"] == "planted"]
        assert job_codes(history(c, "fake"))[-1] == "SUCCEEDED"
        page = c.get("/jobs/fake/events", params={"limit": 2, "offset": 1}).json()
        assert page["limit"] == 2 and page["offset"] == 1 and len(page["DATA"]) == 2
        assert page["DATA"] == history(c, "fake")[1:3] and page["total"] >= 4
        for path, params, code in (
            ("/jobs/nope/events", {}, "JobNotFound"),
            ("/jobs/fake/events", {"limit": "0"}, "InvalidParameter"),
            ("/jobs/fake/events", {"limit": "1001"}, "InvalidParameter"),
            ("/jobs/fake/events", {"offset": "-1"}, "InvalidParameter"),
            ("/events", {"after": "not-a-cursor"}, "InvalidCursor"),
            ("/events", {"after": "0" * 20}, None),
            ("/events", {"limit": "x"}, "InvalidParameter"),
        ):
            r = c.get(path, params=params)
            if code is None:
                assert r.status_code == 200
                continue
            assert r.status_code in (400, 404) and r.json()["code"] == code, (path, r.text)
            assert r.headers["X-Error-Code"] == code
        r = c.get("/events", headers={"Accept": "text/event-stream", "Last-Event-ID": "zz"})
        assert r.status_code == 400 and r.json()["code"] == "InvalidCursor"
        assert c.get("/events", headers={"X-Api-Token": "wrong"}).status_code == 401


def test_a_feed_folder_that_is_a_link_stops_the_start(root: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "00000001.jsonl").write_text("precious\n")  # old enough to be pruned
    (root / ".events").symlink_to(elsewhere)
    svc = Service(root, api=False).start(wait=False)
    assert svc.proc is not None
    assert svc.proc.wait(30) == 2
    svc.stop()
    assert "cannot be the event feed's folder" in svc.log()
    assert (elsewhere / "00000001.jsonl").read_text() == "precious\n"
