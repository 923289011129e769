"""GET /metrics, the access-log line and the metric hooks, in-process against a real root.

Counters belong to the process and other tests in it move them too, so each test
compares a counter before and after what it does.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from live_service import TOKEN
from prometheus_client.parser import text_string_to_metric_families
from test_api import call, make_app

from batchingest import metrics
from batchingest.api import access, app, auth
from batchingest.processor import failure_reason
from batchingest.runner import TaskResult
from batchingest.store import Store


def scrape(application: object) -> str:
    reply = call(application, "GET", "/metrics", token=None,  # type: ignore[arg-type]
                 headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"].startswith("text/plain")
    return reply.body.decode()


def value(text: str, name: str, **labels: str) -> float:
    """The sample name{labels} of a scrape; 0 if it is not there (a counter not yet used)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def test_metrics_needs_a_token(root: Path) -> None:
    application, _ = make_app(root)
    reply = call(application, "GET", "/metrics", token=None)
    assert reply.status == 401
    assert b"batchingest_jobs" not in reply.body
    assert call(application, "GET", "/metrics").status == 200  # X-Api-Token works too


def test_jobs_per_state_are_read_from_the_root(root: Path) -> None:
    application, _ = make_app(root)
    for state, names in {"data": ["a", "b"], "queue": ["c"], "error": ["d", "e", "f"]}.items():
        for name in names:
            (root / state / name).mkdir()
    (root / "data" / ".hidden").mkdir()  # being assembled: not a job yet
    (root / "queue" / "stray-file").write_text("x")  # not a folder: not a job
    text = scrape(application)
    counts = {s: value(text, "batchingest_jobs", state=s) for s in ("data", "queue", "error")}
    assert counts == {"data": 2, "queue": 1, "error": 3}
    assert value(text, "batchingest_jobs", state="success") == 0
    # a job moved by hand counts at the next scrape: gauges come from disk, not from events
    os.rename(root / "queue" / "c", root / "success" / "c")
    text = scrape(application)
    assert value(text, "batchingest_jobs", state="queue") == 0
    assert value(text, "batchingest_jobs", state="success") == 1


def test_outbox_depth_is_read_from_disk(root: Path) -> None:
    application, _ = make_app(root)
    outbox = root / ".outbox"
    (outbox / "failed").mkdir(parents=True)
    for i in range(3):
        (outbox / f"{i:020d}-x.json").write_text("{}\n")
    (outbox / f"{0:020d}-x.json.done0").write_text("")  # a marker, not an event
    (outbox / ".tmp-event.json").write_text("")  # a temporary being written
    (outbox / "failed" / "1-y.json").write_text("{}\n")
    text = scrape(application)
    assert value(text, "batchingest_webhook_outbox_events", queue="pending") == 3
    assert value(text, "batchingest_webhook_outbox_events", queue="failed") == 1


def test_requests_are_counted_by_route_template_not_path(root: Path) -> None:
    application, _ = make_app(root)
    before = scrape(application)
    labels = {"method": "GET", "route": "/jobs/{id}", "status": "404"}
    for name in ("nope-1", "nope-2", "nope-3"):
        assert call(application, "GET", f"/jobs/{name}").status == 404
    after = scrape(application)
    name = "batchingest_http_requests_total"
    assert value(after, name, **labels) - value(before, name, **labels) == 3
    assert "nope-1" not in after  # no series per job name
    hist = "batchingest_http_request_duration_seconds_count"
    assert value(after, hist, method="GET", route="/jobs/{id}") >= 3
    # refused before any routing: counted without a route
    call(application, "GET", "/jobs/nope-1", token="wrong")
    text = scrape(application)
    assert value(text, name, method="GET", route=access.UNMATCHED, status="401") >= 1


def test_made_up_methods_share_one_series(root: Path) -> None:
    application, _ = make_app(root)
    for word in ("BREW", "WHEN", "X-1"):
        call(application, word, "/jobs/a")
    text = scrape(application)
    assert "BREW" not in text and "WHEN" not in text
    name = "batchingest_http_requests_total"
    assert (
        sum(
            value(text, name, method="OTHER", route=r, status=s)
            for r in ("/jobs/{id}", access.UNMATCHED)
            for s in ("405", "400", "401")
        )
        >= 3
    )


def test_access_line_names_the_token_by_label_only(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    application, _ = make_app(root, tokens=["first-token-aaaa", TOKEN])
    with caplog.at_level(logging.INFO, logger="batchingest.access"):
        reply = call(application, "PUT", "/jobs/job-1", headers={"X-Request-Id": "req-42"})
    assert reply.status == 201
    lines = [r for r in caplog.records if r.name == "batchingest.access"]
    assert len(lines) == 1
    line = lines[0].__dict__
    assert line["request_id"] == "req-42"
    assert (line["method"], line["route"], line["status"]) == ("PUT", "/jobs/{id}", 201)
    assert line["bytes"] == len(reply.body) > 0
    assert line["duration_ms"] > 0
    assert line["token"] == auth.token_label(TOKEN.encode())
    assert line["token"] != auth.token_label(b"first-token-aaaa")
    assert TOKEN not in caplog.text


def test_token_label_never_holds_the_token() -> None:
    checker = auth.TokenChecker([b"abcd", b"secret-two"])
    label = checker.label([(b"authorization", b"Bearer secret-two")])
    assert label is not None and label.startswith("sha256:") and len(label) == 11
    assert "secret" not in label and "abcd" not in checker.labels[0]
    assert checker.label([(b"x-api-token", b"abcd")]) == checker.labels[0]
    assert checker.label([(b"x-api-token", b"abc")]) is None
    assert checker.check([(b"x-api-token", b"secret-two")])
    assert not checker.check([(b"x-api-token", b"")])


def test_scope_key_is_the_one_the_api_sets() -> None:
    assert access.REQUEST_ID == app.REQUEST_ID


def result(task: str, reason: str, code: int | None, **kw: object) -> TaskResult:
    return TaskResult(task, "", "", ok=not reason, exit_code=code, reason=reason, seconds=0.5,
                      **kw)  # type: ignore[arg-type]  # fmt: skip


@pytest.mark.parametrize(
    ("res", "cls"),
    [
        (result("t", "", 0), "ok"),
        (result("t", "exit status 3", 3), "exit"),
        (result("t", "killed by signal SIGKILL", -9), "signal"),
        (result("t", "timed out after 1 s", -15), "timeout"),
        (result("t", "cannot start task t: Permission denied", None), "spawn"),
        (result("t", "control file line 1 is not addtask:NAME", 0), "control"),
        (result("t", "unknown task t", None), "unknown-task"),
        (result("t", "invalid task name 'x y'", None), "unknown-task"),
        (result("t", "task t (/x/t) is not executable", None), "unknown-task"),
        (
            result("t", "stopped because the service is stopping", -15, interrupted=True),
            "interrupted",
        ),
    ],
)
def test_reason_classes(res: TaskResult, cls: str) -> None:
    assert metrics.reason_class(res) == cls


def test_a_task_name_from_a_job_file_never_becomes_a_label() -> None:
    """Unknown task names are what a submitter wrote in JOB: one label for all of them."""
    before = metrics.TASK_FAILURES.labels(metrics.UNKNOWN_TASK, "unknown-task")._value.get()
    metrics.task_done(result("made-up-by-a-user-1234", "unknown task made-up-by-a-user-1234", None))
    text = metrics.exposition().decode()
    assert "made-up-by-a-user-1234" not in text
    after = metrics.TASK_FAILURES.labels(metrics.UNKNOWN_TASK, "unknown-task")._value.get()
    assert after == before + 1


def test_task_hook_counts_duration_and_failures() -> None:
    hist = metrics.TASK_DURATION.labels("hook-task")
    before = metrics.TASK_FAILURES.labels("hook-task", "exit")._value.get()
    metrics.task_done(result("hook-task", "", 0))
    metrics.task_done(result("hook-task", "exit status 2", 2))
    text = metrics.exposition().decode()
    assert value(text, "batchingest_task_duration_seconds_count", task="hook-task") == 2
    assert value(text, "batchingest_task_duration_seconds_sum", task="hook-task") == 1.0
    assert metrics.TASK_FAILURES.labels("hook-task", "exit")._value.get() == before + 1
    assert hist is metrics.TASK_DURATION.labels("hook-task")


def test_failure_reason_comes_from_the_last_finished_record(root: Path) -> None:
    job = root / "error" / "j"
    job.mkdir()
    fd = os.open(job, os.O_RDONLY | os.O_DIRECTORY)
    try:
        (job / "JOB").write_text(
            '{"Todo": ["b"], "Finished": [{"Name": "a", "Status": "ok"},'
            ' {"Name": "b", "Status": "error", "Reason": "exit status 3"}]}'
        )
        assert failure_reason(fd) == "exit status 3"
        (job / "JOB").write_text("{not json")
        assert failure_reason(fd).startswith("JOB is not valid JSON")
        (job / "JOB").unlink()
        os.symlink("/etc/passwd", job / "JOB")  # never followed: the reason says so
        assert "symbolic link" in failure_reason(fd)
        (job / "JOB").unlink()
        (job / "JOB").write_text('{"Todo": ["a"], "Finished": [1, 2]}')  # not records
        assert failure_reason(fd) == "internal error, see the job's LOG"
        long = "x" * 2000  # JOB is the submitter's: its Reason is cut to a line's worth
        (job / "JOB").write_text(f'{{"Finished": [{{"Status": "error", "Reason": "{long}"}}]}}')
        assert failure_reason(fd) == "x" * 500
    finally:
        os.close(fd)


def test_pickup_latency_uses_the_arrival_in_queue(store: Store, root: Path) -> None:
    (root / "data" / "j").mkdir()
    os.rename(root / "data" / "j", root / "queue" / "j")
    arrived = metrics.queued_at(store, "j")
    assert arrived is not None
    assert abs(arrived - os.lstat(root / "queue" / "j").st_ctime) < 1e-6
    assert metrics.queued_at(store, "gone") is None
    before = metrics.PICKUP_LATENCY._sum.get()
    metrics.picked_up(arrived)
    assert 0 <= metrics.PICKUP_LATENCY._sum.get() - before < 5


def test_job_count_counts_what_job_names_lists(store: Store, root: Path) -> None:
    for name in ("a", "b.c", "d-1", "x" * 255):
        (root / "success" / name).mkdir()
    (root / "success" / ".hidden").mkdir()
    (root / "success" / "bad name").mkdir()  # no job can have this name
    (root / "success" / "two\nlines").mkdir()  # nor this one, which looks like two
    (root / "success" / "file").write_text("")
    (root / "success" / "link").symlink_to(root / "success" / "a")
    assert store.job_count("success") == len(store.job_names("success")) == 4
    fresh = Store(root)  # no listing cached: counted
    assert fresh.job_count("success") == 4
    assert fresh.job_count("success") == 4
    (root / "success" / "e").mkdir()  # a change is seen at once
    assert fresh.job_count("success") == 5
    (root / "success" / "bad name").rmdir()
    (root / "success" / "f").mkdir()
    assert fresh.job_count("success") == 6 == len(fresh.job_names("success"))
    assert fresh.job_count("queue") == 0


def test_job_count_reuses_a_count_of_a_folder_at_rest(store: Store, root: Path) -> None:
    for i in range(3):
        (root / "error" / f"j{i}").mkdir()
    past = time.time() - 5
    os.utime(root / "error", (past, past))  # at rest for more than a second
    assert store.job_count("error") == 3
    calls = 0
    real = store._entries

    def counting(state: str):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return real(state)

    store._entries = counting  # type: ignore[method-assign]
    assert store.job_count("error") == 3
    assert calls == 0  # nothing listed again
    (root / "error" / "j3").mkdir()
    assert store.job_count("error") == 4
    assert calls == 1
