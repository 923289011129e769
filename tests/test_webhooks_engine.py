"""The webhook engine in-process: a real Store moving real job folders, Webhooks on an
asyncio loop in a thread (as the service runs it), real HTTP receivers on loopback."""

from __future__ import annotations

import base64
import json
import logging
import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from live_service import wait_for
from webhook_receiver import (
    Receiver,
    Silent,
    failed,
    job_log,
    new_job,
    outbox,
    run_through,
    running,
    verify,
)

import batchingest
from batchingest.config import Config
from batchingest.health import Progress
from batchingest.store import Job, Store
from batchingest.webhooks import Webhooks
from batchingest.webhooks.engine import HEARTBEAT, _Announced
from batchingest.webhooks.send import sign

# -- events and bodies ----------------------------------------------------------------


def test_queue_processing_success_in_order_with_bodies(store: Store) -> None:
    with Receiver() as rx, running(store):
        new_job(store, "j1", f"# comment\n\n{rx.url}/hook\n", json.dumps({"Todo": ["a", "b"]}))
        run_through(store, "j1")
        receipts = rx.wait(3)
        log = job_log(store, "j1", 3)
        assert len(rx.receipts) == 3
    bodies = [r.json for r in receipts]
    assert [b["job_state"] for b in bodies] == ["queue", "processing", "success"]
    assert [b["previous_state"] for b in bodies] == ["ready", "queue", "processing"]
    for r, b in zip(receipts, bodies, strict=True):
        assert r.path == "/hook"
        assert r.headers["content-type"] == "application/json"
        assert r.headers["x-batchingest-event-id"] == b["event_id"]
        assert b["job_name"] == "j1"
        assert b["version"] == batchingest.__version__
        assert b["host"] and b["time"].endswith("Z")
        assert b["tasks"] == ["a", "b"]
        assert "job_log" not in b
        assert "x-batchingest-signature" not in r.headers
    assert len({b["event_id"] for b in bodies}) == 3
    assert outbox(store.root) == []
    assert log.count("attempt 1/6: HTTP 200, 6 bytes") == 3


def test_error_event_carries_the_log_and_caps_it(store: Store) -> None:
    with Receiver() as rx, running(store):
        path = new_job(store, "small", rx.url)
        (path / "LOG").write_text("task start: exit 3\n")
        new_job(store, "big", rx.url)
        big = b"x" * (1 << 20) + b"THE-END\n"
        (store.get("big").path / "LOG").write_bytes(b"FIRST-LINE\n" + big)
        run_through(store, "small", "error")
        run_through(store, "big", "error")
        rx.wait(6)
    errors = {e["job_name"]: e for e in rx.events() if e["job_state"] == "error"}
    # the LOG lines of earlier deliveries may be in by the time the error event is built
    assert own_lines(errors["small"]["job_log"]) == "task start: exit 3\n"
    assert errors["small"]["job_log_truncated"] is False
    cut = errors["big"]
    assert cut["job_log_truncated"] is True
    assert cut["job_log"].startswith("[LOG is")
    assert "FIRST-LINE" not in cut["job_log"]
    assert own_lines(cut["job_log"]).endswith("THE-END\n")
    assert len(cut["job_log"].encode()) < (1 << 20) + 200
    assert all("job_log" not in e for e in rx.events() if e["job_state"] != "error")


def own_lines(text: str) -> str:
    """A LOG without the lines webhook deliveries added to it."""
    return "".join(x for x in text.splitlines(True) if " batchingest: webhook " not in x)


def test_renamed_on_arrival_keeps_order_and_reports_final_name(store: Store) -> None:
    store.create("dup")
    run_through(store, "dup")  # success/dup is taken now
    with Receiver() as rx, running(store):
        (store.root / "data" / "dup").mkdir()  # a second job of the same name
        (store.root / "data" / "dup" / "WEBHOOK").write_text(rx.url)
        final = run_through(store, "dup")
        assert final == "dup-001"
        rx.wait(3)
    assert [(e["job_name"], e["job_state"]) for e in rx.events()] == [
        ("dup", "queue"), ("dup", "processing"), ("dup-001", "success")]  # fmt: skip


def test_no_webhook_file_no_event_and_edits_take_effect(store: Store) -> None:
    with Receiver() as rx, Receiver() as rx2, running(store):
        store.create("plain")
        run_through(store, "plain")
        assert outbox(store.root) == []
        path = new_job(store, "edit", rx.url)
        store.queue("edit")
        hold = store.claim("edit")
        assert hold is not None
        (path.parent.parent / "processing" / "edit" / "WEBHOOK").write_text(f"{rx2.url}/2\n")
        store.finish(hold, "success")
        rx.wait(2)
        rx2.wait(1)
    assert [e["job_state"] for e in rx.events()] == ["queue", "processing"]
    assert [e["job_state"] for e in rx2.events()] == ["success"]
    assert rx2.receipts[0].path == "/2"


def claim_and_finish(store: Store, name: str, final: str = "success") -> str:
    """processing -> final of a job already in queue/, as a processor would move it."""
    hold = store.claim(name)
    assert hold is not None
    return store.finish(hold, final).name


def test_hand_queued_job_announces_queue_before_processing(store: Store) -> None:
    with Receiver() as rx, running(store):
        path = new_job(store, "byhand", rx.url, json.dumps({"Todo": ["a"]}))
        path.rename(store.root / "queue" / "byhand")  # an operator's `mv`: no store move
        assert outbox(store.root) == []
        claim_and_finish(store, "byhand", "error")
        # and again, from error/ back into queue/ by hand
        (store.root / "error" / "byhand").rename(store.root / "queue" / "byhand")
        claim_and_finish(store, "byhand")
        rx.wait(6)
        wait_for(lambda: outbox(store.root) == [], 30, what="outbox to empty")
    events = rx.events()
    assert [(e["job_state"], e["previous_state"]) for e in events] == [
        ("queue", None), ("processing", "queue"), ("error", "processing"),
        ("queue", None), ("processing", "queue"), ("success", "processing")]  # fmt: skip
    assert len({e["event_id"] for e in events}) == 6
    assert events[0]["tasks"] == ["a"]


def test_api_queued_job_announces_queue_once(store: Store) -> None:
    with Receiver() as rx, running(store):
        new_job(store, "once", rx.url)
        store.create("plain")  # no WEBHOOK: still remembered as queued
        store.queue("plain")
        (store.root / "queue" / "plain" / "WEBHOOK").write_text(rx.url)
        run_through(store, "once")
        claim_and_finish(store, "plain")
        rx.wait(5)
        wait_for(lambda: outbox(store.root) == [], 30, what="outbox to empty")
    assert by_job(rx.events()) == {
        "once": ["queue", "processing", "success"], "plain": ["processing", "success"]}  # fmt: skip


def test_unqueued_then_hand_queued_is_announced_again(store: Store) -> None:
    with Receiver() as rx, running(store):
        new_job(store, "back", rx.url)
        store.queue("back")
        store.move("back", "queue", "data")
        (store.root / "data" / "back").rename(store.root / "queue" / "back")
        claim_and_finish(store, "back")
        rx.wait(4)
        wait_for(lambda: outbox(store.root) == [], 30, what="outbox to empty")
    assert [(e["job_state"], e["previous_state"]) for e in rx.events()] == [
        ("queue", "ready"), ("queue", None),
        ("processing", "queue"), ("success", "processing")]  # fmt: skip


def test_late_queue_listener_after_claim_adds_no_second_queue_event(store: Store) -> None:
    """store.queue's listener may run only after a processor thread claimed the job."""
    with Receiver() as rx, running(store) as hooks:
        path = new_job(store, "race", rx.url)
        path.rename(store.root / "queue" / "race")
        hold = store.claim("race")
        assert hold is not None
        # the queue move's own notice, arriving late: already announced by the claim
        hooks.on_change(Job("race", "queue", store.root / "queue" / "race"), "data")
        store.finish(hold, "success")
        rx.wait(3)
        wait_for(lambda: outbox(store.root) == [], 30, what="outbox to empty")
    assert [e["job_state"] for e in rx.events()] == ["queue", "processing", "success"]


def test_recovered_job_is_not_announced_twice(store: Store) -> None:
    with Receiver() as rx, running(store):
        new_job(store, "orphan", rx.url)
        store.queue("orphan")
        hold = store.claim("orphan")
        assert hold is not None
        hold.release()  # its processor died
        assert store.recover() == ["orphan"]
        claim_and_finish(store, "orphan")
        rx.wait(5)
        wait_for(lambda: outbox(store.root) == [], 30, what="outbox to empty")
    assert [(e["job_state"], e["previous_state"]) for e in rx.events()] == [
        ("queue", "ready"), ("processing", "queue"), ("queue", "processing"),
        ("processing", "queue"), ("success", "processing")]  # fmt: skip


def test_announced_map_is_bounded_and_forgets_finished_jobs() -> None:
    seen = _Announced(limit=2)
    assert seen.events("a", "queue", "data") == [("queue", "data")]
    assert seen.events("a", "processing", "queue") == [("processing", "queue")]
    assert seen.events("a", "success", "processing") == [("success", "processing")]
    assert seen.events("b", "queue", "data") == [("queue", "data")]
    assert seen.events("c", "queue", "data") == [("queue", "data")]
    assert seen.events("d", "queue", "data") == [("queue", "data")]
    # b was the oldest of three: forgotten, so its claim announces the queueing again
    assert seen.events("b", "processing", "queue") == [("queue", None), ("processing", "queue")]
    assert seen.events("d", "processing", "queue") == [("processing", "queue")]
    # b's entry pushed out c, the oldest then
    assert seen._last == {"b": "processing+queue", "d": "processing"}


def by_job(events: list[dict[str, Any]]) -> dict[str, list[str]]:
    states: dict[str, list[str]] = {}
    for e in events:
        states.setdefault(e["job_name"], []).append(e["job_state"])
    return states


def test_broken_job_file_still_gets_events(store: Store) -> None:
    with Receiver() as rx, running(store):
        new_job(store, "broken", rx.url, job="{not json")
        run_through(store, "broken", "error")
        rx.wait(3)
    assert [e["tasks"] for e in rx.events()] == [[], [], []]


def test_several_urls_each_get_every_event(store: Store) -> None:
    with Receiver() as a, Receiver() as b, running(store):
        new_job(store, "multi", f"{a.url}/x\n{b.url}/y\n")
        run_through(store, "multi")
        a.wait(3)
        b.wait(3)
    assert [e["event_id"] for e in a.events()] == [e["event_id"] for e in b.events()]


# -- URLs and credentials -----------------------------------------------------------------


def test_basic_auth_query_and_no_scheme(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="batchingest")
    with Receiver() as rx, running(store):
        url = f"alice:s3cr%3At@127.0.0.1:{rx.port}/hook?q=1&r=two"
        new_job(store, "auth", url)
        store.queue("auth")
        (receipt,) = rx.wait(1)
        log = job_log(store, "auth")
    assert receipt.path == "/hook?q=1&r=two"
    kind, token = receipt.headers["authorization"].split()
    assert kind == "Basic"
    assert base64.b64decode(token).decode() == "alice:s3cr:t"
    assert f"POST http://alice:***@127.0.0.1:{rx.port}/hook?q=1&r=two attempt 1/6" in log
    for text in (log, caplog.text):
        assert "s3cr" not in text and token not in text


# -- retries, order, failure ---------------------------------------------------------


def test_500_twice_then_200_three_receipts_one_event_id(store: Store) -> None:
    with Receiver([500, 503]) as rx, running(store):
        new_job(store, "flaky", rx.url)
        store.queue("flaky")
        receipts = rx.wait(3)
        wait_for(lambda: outbox(store.root) == [], 30, what="outbox to empty")
    assert len({r.json["event_id"] for r in receipts}) == 1
    assert len({r.body for r in receipts}) == 1
    # retried after running()'s backoff (0.01 s), not the default one, with which the
    # first retry alone waits half of it at the least (jitter: 0.5 to 1.5 times)
    default = Config(root=store.root).webhook_backoff
    assert receipts[2].at - receipts[0].at < 0.5 * default
    log = job_log(store, "flaky", 3)
    assert "attempt 1/6: HTTP 500" in log and "attempt 2/6: HTTP 503" in log
    assert "attempt 3/6: HTTP 200" in log


def test_later_event_waits_for_earlier_of_same_job(store: Store) -> None:
    with Receiver([500, 500, 500]) as rx, running(store):
        new_job(store, "ordered", rx.url)
        run_through(store, "ordered")
        rx.wait(6)
    states = [e["job_state"] for e in rx.events()]
    assert states == ["queue"] * 4 + ["processing", "success"]


def test_4xx_is_not_retried_and_is_kept_as_failed(store: Store) -> None:
    with Receiver([404]) as rx, running(store):
        new_job(store, "gone", rx.url)
        store.queue("gone")
        rx.wait(1)
        wait_for(lambda: failed(store.root), 30, what="failed record")
        time.sleep(0.1)
        assert len(rx.receipts) == 1
    (rec,) = failed(store.root)
    assert rec["failure"] == "HTTP 404" and rec["state"] == "queue"
    assert outbox(store.root) == []
    assert "gave up: HTTP 404" in job_log(store, "gone")


def test_retries_run_out(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    with Receiver(default=500) as rx, running(store, webhook_retries=2):
        new_job(store, "down", rx.url)
        store.queue("down")
        wait_for(lambda: failed(store.root), 30, what="failed record")
        assert len(rx.receipts) == 3
    log = job_log(store, "down")
    assert "attempt 3/3: HTTP 500" in log and "gave up: HTTP 500" in log
    assert "failed for good" in caplog.text


def test_429_honours_retry_after(store: Store) -> None:
    with Receiver([429], headers={"Retry-After": "1"}) as rx, running(store):
        new_job(store, "busy", rx.url)
        store.queue("busy")
        first, second = rx.wait(2)
    assert 0.95 <= second.at - first.at < 2


def test_timeout_is_retried(store: Store) -> None:
    with Silent() as dead, running(store, webhook_timeout=0.2, webhook_retries=1):
        new_job(store, "slow", dead.url)
        store.queue("slow")
        wait_for(lambda: failed(store.root), 30, what="failed record")
    log = job_log(store, "slow")
    assert "attempt 1/2: timed out after 0.2s" in log
    assert "attempt 2/2: timed out" in log


def test_dead_receiver_does_not_slow_moves(store: Store) -> None:
    timeout = 30.0
    with Silent() as dead, running(store, webhook_timeout=timeout):
        for i in range(20):
            new_job(store, f"d{i}", dead.url)
        started = time.monotonic()
        for i in range(20):
            run_through(store, f"d{i}")
        took = time.monotonic() - started
    # a move that waited for its delivery would wait the whole timeout: the receiver
    # takes the connection and never answers
    assert took < timeout
    assert len(outbox(store.root)) == 60  # still pending, kept for the next start


# -- durability -----------------------------------------------------------------------


def test_events_written_before_move_returns_and_delivered_on_start(store: Store) -> None:
    hooks = Webhooks(Config(root=store.root), store)
    hooks.attach()  # listening, but not delivering: as if the service died right away
    with Receiver() as rx:
        new_job(store, "later", rx.url)
        run_through(store, "later")
        assert len(outbox(store.root)) == 3
        hooks.close()
        with running(store):
            rx.wait(3)
            wait_for(lambda: outbox(store.root) == [], 30, what="outbox to empty")
    assert [e["job_state"] for e in rx.events()] == ["queue", "processing", "success"]


def test_unreadable_outbox_file_is_set_aside(store: Store) -> None:
    (store.root / ".outbox").mkdir()
    (store.root / ".outbox" / "garbage.json").write_text("nope")
    with running(store):
        wait_for(lambda: (store.root / ".outbox" / "failed" / "garbage.json").exists(), 30)


def test_delivery_loop_beats_for_readiness_while_it_can_write(store: Store) -> None:
    progress = Progress()
    with running(store, progress=progress) as hooks:
        wait_for(lambda: "webhooks" in progress._due, 30)
        assert progress.stale() == []
        # a beat is due within three heartbeats: a loop that stops beating goes stale
        assert progress.stale(time.monotonic() + 3 * HEARTBEAT + 1) == ["webhooks"]
        writer = hooks.writer
        assert writer is not None and writer.healthy
    # stopped: the writer's thread is gone, so it no longer counts as able to write
    assert not writer.healthy


# -- signing ----------------------------------------------------------------------------


def test_signature_verifies_only_with_the_right_secret(store: Store) -> None:
    with Receiver() as rx, running(store, webhook_secret="topsecret"):
        new_job(store, "signed", rx.url)
        store.queue("signed")
        (r,) = rx.wait(1)
        log = job_log(store, "signed")
    assert r.headers["x-batchingest-signature"].startswith("sha256=")
    assert abs(int(r.headers["x-batchingest-timestamp"]) - time.time()) < 60
    assert verify("topsecret", r.headers, r.body)
    assert not verify("wrong", r.headers, r.body)
    assert not verify("topsecret", r.headers, r.body + b" ")
    # a correctly signed but old request is refused by the recipe: no replays
    old = str(int(r.headers["x-batchingest-timestamp"]) - 3600)
    stale = {**r.headers, "x-batchingest-timestamp": old,
             "x-batchingest-signature": sign("topsecret", old, r.body)}  # fmt: skip
    assert not verify("topsecret", stale, r.body)
    assert "topsecret" not in log


@pytest.mark.parametrize("secret", ["topsecret", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"])
def test_standard_webhooks_library_verifies(store: Store, secret: str) -> None:
    standardwebhooks = pytest.importorskip("standardwebhooks")
    with Receiver() as rx, running(store, webhook_secret=secret):
        new_job(store, "std", rx.url)
        store.queue("std")
        (r,) = rx.wait(1)
    # the receiver's side, as the specification's library does it
    key = secret if secret.startswith("whsec_") else secret.encode()
    body = standardwebhooks.Webhook(key).verify(r.body, dict(r.headers))
    assert body["job_name"] == "std"
    assert r.headers["webhook-id"] == r.headers["x-batchingest-event-id"]
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(b"wrong").verify(r.body, dict(r.headers))
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(key).verify(r.body + b" ", dict(r.headers))
    # the old header stays for existing receivers
    assert verify(secret, r.headers, r.body)


# -- allow-list -------------------------------------------------------------------------


def test_allow_list_refuses_and_records(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    with Receiver() as rx, running(store, webhook_allow=["10.0.0.0/8", "hooks.example.org"]):
        new_job(store, "blocked", f"http://u:pw-never-shown@localhost:{rx.port}/x")
        store.queue("blocked")
        wait_for(lambda: failed(store.root), 30, what="refusal")
        time.sleep(0.1)
        assert rx.receipts == []
    (rec,) = failed(store.root)
    assert "not in --webhook-allow" in rec["failure"]
    log = job_log(store, "blocked")
    refusal = r"refused: host localhost resolves to (127\.0\.0\.1|::1) is not in --webhook-allow"
    assert re.search(refusal, log)
    assert "refused" in caplog.text
    assert "pw-never-shown" not in log and "pw-never-shown" not in caplog.text


def test_allow_list_by_range_and_by_name(store: Store) -> None:
    # the request goes to the first address the name resolves to: listen there
    first = socket.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)[0][4][0]
    with Receiver(host=first) as rx, running(store, webhook_allow=["127.0.0.0/8", "::1"]):
        new_job(store, "by-range", f"localhost:{rx.port}/r")
        store.queue("by-range")
        (r,) = rx.wait(1)
        assert r.headers["host"] == f"localhost:{rx.port}"  # pinned address, same Host
    with Receiver(host=first) as rx, running(store, webhook_allow=["LocalHost"]):
        new_job(store, "by-name", f"localhost:{rx.port}/n")
        store.queue("by-name")
        rx.wait(1)


# -- safe by default --------------------------------------------------------------------


def test_loopback_refused_without_allow_and_said_in_log(store: Store) -> None:
    with Receiver() as rx, running(store, webhook_allow=[]):
        new_job(store, "local", f"{rx.url}/x\nhttp://[::1]:{rx.port}/y\n")
        store.queue("local")
        wait_for(lambda: len(failed(store.root)) == 2, 30, what="two refusals")
        time.sleep(0.1)
        assert rx.receipts == []
    log = job_log(store, "local", 2)
    assert f"POST {rx.url}/x attempt 1/1: refused: host 127.0.0.1 is a loopback address, " \
        "refused unless named in --webhook-allow" in log  # fmt: skip
    assert "refused: host ::1 is a loopback address" in log
    assert {r["failure"].split(" is ")[1] for r in failed(store.root)} == {
        "a loopback address, refused unless named in --webhook-allow"}  # fmt: skip


def test_answer_is_logged_as_status_and_size_only(store: Store) -> None:
    page = b"<html>internal admin console, token=abc123</html>"
    with Receiver([500], answer=page) as rx, running(store):
        new_job(store, "quiet", rx.url)
        store.queue("quiet")
        rx.wait(2)
        log = job_log(store, "quiet", 2)
    assert f"attempt 1/6: HTTP 500, {len(page)} bytes" in log
    assert f"attempt 2/6: HTTP 200, {len(page)} bytes" in log
    assert "admin console" not in log and "abc123" not in log


def test_too_many_urls_sends_nothing_and_says_why(store: Store) -> None:
    with Receiver() as rx, running(store):
        urls = "".join(f"{rx.url}/{i}\n" for i in range(17))
        new_job(store, "crowd", urls)
        store.queue("crowd")
        log = (store.get("crowd").path / "LOG").read_text()  # written before queue() returned
        time.sleep(0.2)
        assert rx.receipts == []
    assert "webhook queue event not sent: WEBHOOK lists 17 URLs, more than 16" in log
    assert outbox(store.root) == []


def test_webhook_link_leaks_nothing(store: Store, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("http://127.0.0.1:9/from-outside-file\n")
    with Receiver() as rx, running(store):
        path = store.create("linked")[0].path
        (path / "WEBHOOK").symlink_to(outside)
        store.queue("linked")
        time.sleep(0.2)
        assert rx.receipts == []
    log = (store.get("linked").path / "LOG").read_text()
    assert "webhook queue event not sent: WEBHOOK is not used: a symbolic link" in log
    assert "from-outside-file" not in log
    assert outbox(store.root) == []


def test_log_link_is_neither_written_nor_posted(store: Store, tmp_path: Path) -> None:
    outside = tmp_path / "outside-log"
    outside.write_text("OUTSIDE SECRET\n")
    outside.chmod(0o444)
    with Receiver() as rx, running(store):
        path = new_job(store, "loglink", rx.url)
        (path / "LOG").symlink_to(outside)
        run_through(store, "loglink", "error")
        rx.wait(3)
        time.sleep(0.2)  # the webhook lines would be appended after each POST
    error = next(e for e in rx.events() if e["job_state"] == "error")
    assert "OUTSIDE SECRET" not in error["job_log"]
    assert error["job_log"].startswith("[LOG not read: a symbolic link")
    assert outside.read_text() == "OUTSIDE SECRET\n"
