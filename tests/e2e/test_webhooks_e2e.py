"""Webhooks end to end: the real service as a subprocess, real receivers on loopback."""

from __future__ import annotations

import base64
import os
import re
import time
from pathlib import Path

import pytest
from live_service import Service, free_port, make_job, wait_for, write_task
from webhook_receiver import Receiver, Silent, verify

pytestmark = pytest.mark.e2e

# the receivers listen on loopback, which webhooks reach only when allowed
ALLOW = {"BATCHINGEST_WEBHOOK_ALLOW": "127.0.0.1"}
FAST = {"BATCHINGEST_WEBHOOK_BACKOFF": "0.05", **ALLOW}


def drop(root: Path, name: str, webhook: str | None = None, job: str | None = None) -> None:
    """Assemble a job and `mv` it into queue/ as an operator would."""
    files = {"WEBHOOK": webhook} if webhook is not None else {}
    os.rename(make_job(root, name, job, files), root / "queue" / name)


def landed(root: Path, names: list[str]) -> bool:
    return all((root / "success" / n).is_dir() or (root / "error" / n).is_dir() for n in names)


def outbox(root: Path) -> list[str]:
    return sorted(p.name for p in (root / ".outbox").glob("*.json"))


def by_job(events: list[dict]) -> dict[str, list[str]]:  # type: ignore[type-arg]
    states: dict[str, list[str]] = {}
    for e in events:
        states.setdefault(e["job_name"], []).append(e["job_state"])
    return states


def test_all_four_events_through_the_api(root: Path) -> None:
    write_task(root / "tasks", "start", "echo started\n")
    write_task(root / "tasks", "bad", "echo something broke >&2; exit 3\n")
    with Receiver() as rx, Service(root, env=FAST) as svc, svc.client() as c:
        for name, job in (("good", '{"Todo": ["start"]}'), ("failing", '{"Todo": ["bad"]}')):
            assert c.put(f"/jobs/{name}").status_code in (200, 201)
            hook = f"127.0.0.1:{rx.port}/hook?job={name}"  # no scheme: http://
            assert c.put(f"/jobs/{name}/files/WEBHOOK", content=hook).status_code in (200, 201)
            assert c.put(f"/jobs/{name}/files/JOB", content=job).status_code in (200, 201)
            assert c.post(f"/jobs/{name}/queue").status_code in (200, 202)
        rx.wait(6)
        wait_for(lambda: outbox(root) == [], 30, what="outbox to empty")
    # queued through the API: exactly one queue event each, not a second one at the claim
    states = by_job(rx.events())
    assert states == {"good": ["queue", "processing", "success"],
                      "failing": ["queue", "processing", "error"]}  # fmt: skip
    events = {(e["job_name"], e["job_state"]): e for e in rx.events()}
    assert events["good", "queue"]["tasks"] == ["start"]
    assert events["good", "success"]["tasks"] == []
    assert "job_log" not in events["good", "success"]
    error = events["failing", "error"]
    assert "something broke" in error["job_log"]
    assert error["job_log_truncated"] is False
    assert error["tasks"] == ["bad"]
    paths = {r.path for r in rx.receipts}
    assert paths == {"/hook?job=good", "/hook?job=failing"}


def test_hand_queued_job_gets_queue_processing_and_final_events(root: Path) -> None:
    """`mv` into queue/ makes no store move: the claim announces the queueing first."""
    write_task(root / "tasks", "start", "echo ok\n")
    with Receiver() as rx, Service(root, api=False, env=FAST):
        drop(root, "dropped", f"{rx.url}/h")
        rx.wait(3)
        wait_for(lambda: outbox(root) == [], 30, what="outbox to empty")
    events = rx.events()
    assert [(e["job_state"], e["previous_state"]) for e in events] == [
        ("queue", None), ("processing", "queue"), ("success", "processing")]  # fmt: skip
    assert len({e["event_id"] for e in events}) == 3
    log = (root / "success" / "dropped" / "LOG").read_text()
    assert log.count("attempt 1/6: HTTP 200, 6 bytes") == 3


def test_dead_receiver_does_not_delay_jobs(root: Path) -> None:
    write_task(root / "tasks", "start", "exit 0\n")

    def batch(prefix: str, webhook: str | None) -> float:
        names = [f"{prefix}{i:02d}" for i in range(20)]
        started = time.monotonic()
        for name in names:
            drop(root, name, webhook)
        wait_for(lambda: landed(root, names), 60, what=f"batch {prefix}")
        return time.monotonic() - started

    timeout = 30.0
    with (
        Receiver() as live,
        Silent() as dead,
        Service(root, "--webhook-timeout", str(timeout), api=False, env=ALLOW) as svc,
    ):
        # both write every event to the outbox before the move returns (an fsync of the
        # file and of the folder); only the receiver differs
        with_live = batch("live", live.url)
        wait_for(lambda: outbox(root) == [], 30, what="live events delivered")
        with_dead = batch("dead", dead.url)
        wait_for(
            lambda: len(outbox(root)) == 60, 30, what="60 pending events"
        )  # queue, processing and success of each, still pending
        stopped = time.monotonic()
        assert svc.stop() == 0
        # the dead receiver takes each connection and never answers: a job, or a stop,
        # that waited for a delivery would wait the whole timeout
        assert time.monotonic() - stopped < timeout
    print(f"20 jobs: {with_live:.2f}s with a live receiver, {with_dead:.2f}s with a dead one")
    assert with_dead < timeout, (with_live, with_dead)
    assert len(outbox(root)) == 60  # kept for the next start


def test_receiver_down_across_kill_and_restart_gets_everything(root: Path) -> None:
    write_task(root / "tasks", "start", "echo ok\n")
    port = free_port()  # nothing listens here yet: connections are refused
    env = {"BATCHINGEST_WEBHOOK_BACKOFF": "0.2", **ALLOW}
    args = ("--webhook-retries", "1000")
    names = ["k1", "k2", "k3"]
    svc = Service(root, *args, api=False, env=env).start()
    try:
        for name in names:
            drop(root, name, f"http://127.0.0.1:{port}/hook")
        wait_for(lambda: landed(root, names), 30, what="jobs to finish")
        # the last event is written just after its job lands
        wait_for(lambda: len(outbox(root)) == 9, 30, what="nine pending events")
        wait_for(lambda: "ConnectError" in (root / "success" / "k1" / "LOG").read_text(), 30)
    finally:
        svc.kill()
    assert len(outbox(root)) == 9
    with Receiver(port=port) as rx:
        with Service(root, *args, api=False, env=env):
            rx.wait(9)
            wait_for(lambda: outbox(root) == [], 30, what="outbox to empty")
        events = rx.events()
    assert by_job(events) == {n: ["queue", "processing", "success"] for n in names}
    assert len({e["event_id"] for e in events}) == 9
    assert not list((root / ".outbox" / "failed").iterdir())


def test_secrets_never_logged_and_signature_verifies(root: Path) -> None:
    write_task(root / "tasks", "start", "echo ok\n")
    password = "pa55-w0rd-xyzzy"
    secret = "hmac-secret-abc"
    env = {**FAST, "BATCHINGEST_WEBHOOK_SECRET": secret}
    with Receiver([500, 502], answer=password.encode()) as rx:
        with Service(root, "--log-level", "debug", api=False, env=env) as svc:
            drop(root, "secret", f"http://user:{password}@127.0.0.1:{rx.port}/s")
            rx.wait(5)  # queue (after 500, 502), processing, success
            wait_for(lambda: outbox(root) == [], 30, what="outbox to empty")
            service_log = svc.log()
        job_log = (root / "success" / "secret" / "LOG").read_text()
    token = base64.b64encode(f"user:{password}".encode()).decode()
    assert rx.receipts[0].headers["authorization"] == f"Basic {token}"
    assert "attempt 1/6: HTTP 500" in job_log and "attempt 3/6: HTTP 200" in job_log
    assert f"http://user:***@127.0.0.1:{rx.port}/s" in job_log
    for text in (job_log, service_log):
        assert password not in text and token not in text and secret not in text
    for r in rx.receipts:
        assert verify(secret, r.headers, r.body)
        assert not verify("not-the-secret", r.headers, r.body)


def test_allow_list_refusal(root: Path) -> None:
    write_task(root / "tasks", "start", "echo ok\n")
    with Receiver() as rx:
        args = ("--webhook-allow", "192.0.2.0/24,hooks.example.org")
        with Service(root, *args, api=False, env=FAST) as svc:
            drop(root, "fenced", f"http://localhost:{rx.port}/x")
            wait_for(lambda: len(list((root / ".outbox" / "failed").glob("*.json"))) == 3, 20)
            service_log = svc.log()
        assert rx.receipts == []
    log = (root / "success" / "fenced" / "LOG").read_text()
    refusal = r"refused: host localhost resolves to (127\.0\.0\.1|::1) is not in --webhook-allow"
    assert len(re.findall(refusal, log)) == 3
    assert "not in --webhook-allow" in service_log


def test_loopback_refused_by_default(root: Path) -> None:
    write_task(root / "tasks", "start", "echo ok\n")
    with Receiver() as rx:
        with Service(root, api=False, env={"BATCHINGEST_WEBHOOK_BACKOFF": "0.05"}) as svc:
            drop(root, "inside", f"{rx.url}/x")
            wait_for(lambda: len(list((root / ".outbox" / "failed").glob("*.json"))) == 3, 20)
            service_log = svc.log()
        assert rx.receipts == []
    log = (root / "success" / "inside" / "LOG").read_text()
    refusal = "refused: host 127.0.0.1 is a loopback address, refused unless named in"
    assert log.count(refusal) == 3
    assert refusal in service_log


def test_planted_webhook_link_fifo_or_huge_file_is_refused(root: Path, tmp_path: Path) -> None:
    """Jobs dropped by hand with a WEBHOOK that must not be read: none leaks or hangs."""
    write_task(root / "tasks", "start", "echo ok\n")
    outside = tmp_path / "outside.txt"
    with Receiver() as rx:
        outside.write_text(f"{rx.url}/from-outside\n")
        with Service(root, api=False, env=FAST) as svc:
            for name in ("link", "fifo", "huge"):
                build = make_job(root, name)
                if name == "link":
                    (build / "WEBHOOK").symlink_to(outside)
                elif name == "fifo":
                    os.mkfifo(build / "WEBHOOK")
                else:
                    (build / "WEBHOOK").write_text(f"{rx.url}/huge\n" + "#" * 70_000)
                os.rename(build, root / "queue" / name)
            wait_for(lambda: landed(root, ["link", "fifo", "huge"]), 30, what="jobs to finish")
            time.sleep(0.3)
            service_log = svc.log()
        assert rx.receipts == []
    assert outbox(root) == []
    for name, why in (
        ("link", "WEBHOOK is not used: a symbolic link"),
        ("fifo", "WEBHOOK is not used: not a regular file (named pipe)"),
        ("huge", "WEBHOOK is larger than 65536 bytes"),
    ):
        log = (root / "success" / name / "LOG").read_text()
        # one line per move: the claim (with the hand-queued job's queue event) and the end
        assert log.count(f"event not sent: {why}") == 2
        assert "from-outside" not in log
        assert why in service_log
