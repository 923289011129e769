"""The service log's set-up: text or JSON lines, request ids and job names on every line."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchingest import logs
from batchingest.config import ConfigError, parse_serve_args


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """logs.setup replaces the root logger's handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    flags = (logging._srcfile, logging.logThreads, logging.logProcesses,  # type: ignore[attr-defined]
             logging.logMultiprocessing)  # fmt: skip
    yield
    (logging._srcfile, logging.logThreads, logging.logProcesses,  # type: ignore[attr-defined]
     logging.logMultiprocessing) = flags  # fmt: skip
    logs.ACCESS.flush()
    logs.ACCESS.stream, logs.ACCESS.json = None, False
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def lines(err: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in err.splitlines() if line.strip()]


RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def test_json_lines_carry_time_level_and_context(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    logs.setup("info", "json")
    log = logging.getLogger("batchingest.test")
    log.info("plain %s", "line")
    token = logs.REQUEST_ID.set("req-1")
    try:
        log.warning("in a request")
    finally:
        logs.REQUEST_ID.reset(token)
    with logs.about_job("job-7"):
        log.info("job %s picked up", "job-7")
    log.debug("not at info")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    out = lines(capsys.readouterr().err)
    assert [o["message"] for o in out] == ["plain line", "in a request", "job job-7 picked up",
                                           "failed"]  # fmt: skip
    assert all(RFC3339_UTC.fullmatch(str(o["time"])) for o in out)
    assert out[0]["level"] == "info" and out[0]["logger"] == "batchingest.test"
    assert "request_id" not in out[0] and "job" not in out[0]
    assert out[1]["request_id"] == "req-1" and out[1]["level"] == "warning"
    assert out[2]["job"] == "job-7" and "request_id" not in out[2]
    assert "ValueError: boom" in str(out[3]["exception"])


def test_the_job_name_stays_with_its_thread_and_task(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    """Workers run several jobs at once: each line names the job of its own thread."""
    logs.setup("info", "json")
    log = logging.getLogger("batchingest.test")
    barrier = threading.Barrier(2)

    def worker(name: str) -> None:
        with logs.about_job(name):
            barrier.wait()
            log.info("working on %s", name)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    async def request(rid: str) -> None:
        logs.REQUEST_ID.set(rid)  # as the API middleware does, inside the request's task
        await asyncio.sleep(0)
        await asyncio.to_thread(log.info, "blocking work of %s", rid)

    async def both() -> None:
        await asyncio.gather(request("r1"), request("r2"))
        log.info("after the requests")

    asyncio.run(both())
    out = lines(capsys.readouterr().err)
    by_message = {str(o["message"]): o for o in out}
    assert by_message["working on a"]["job"] == "a"
    assert by_message["working on b"]["job"] == "b"
    assert by_message["blocking work of r1"]["request_id"] == "r1"
    assert by_message["blocking work of r2"]["request_id"] == "r2"
    assert "request_id" not in by_message["after the requests"]


FIELDS: dict[str, object] = {"request_id": "r9", "method": "GET", "route": "/jobs/{id}",
                              "status": 200, "bytes": 12, "duration_ms": 0.5,
                              "token": "sha256:abcd"}  # fmt: skip
TEXT_FIELDS = (
    "request r9 method=GET route=/jobs/{id} status=200 bytes=12 duration_ms=0.5 token=sha256:abcd"
)


def test_access_fields_in_text_and_json(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    """Through logging (an app without logs.setup) and straight (logs.ACCESS): one line."""
    access = logging.getLogger("batchingest.access")
    logs.setup("info", "text")
    access.info("request %s", "r9", extra=FIELDS)
    logs.ACCESS.add("request r9", FIELDS)
    via_logging, straight = capsys.readouterr().err.splitlines()
    assert via_logging.endswith(f"INFO batchingest.access: {TEXT_FIELDS}")
    assert straight[23:] == via_logging[23:]  # the same line, but for the time
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}", straight[:23])
    logs.setup("info", "json")
    access.info("request %s", "r9", extra=FIELDS)
    logs.ACCESS.add("request r9", FIELDS)
    first, second = lines(capsys.readouterr().err)
    assert {k: first[k] for k in FIELDS} == FIELDS == {k: second[k] for k in FIELDS}
    for line in (first, second):
        assert line["logger"] == "batchingest.access" and line["message"] == "request r9"
        assert RFC3339_UTC.fullmatch(str(line["time"])) and line["level"] == "info"


def test_access_lines_of_one_loop_turn_are_one_write(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    logs.setup("info", "json")

    async def burst() -> tuple[str, str]:
        for i in range(3):
            logs.ACCESS.add(f"request {i}", FIELDS)
        before = capsys.readouterr().err  # nothing yet: written at the end of the turn
        await asyncio.sleep(0)
        return before, capsys.readouterr().err

    before, after = asyncio.run(burst())
    assert before == ""
    assert [line["message"] for line in lines(after)] == ["request 0", "request 1", "request 2"]


def test_no_access_lines_below_info(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    logs.setup("warning", "text")
    assert logs.ACCESS.stream is None  # the middleware then skips the line altogether
    assert not logging.getLogger("batchingest.access").isEnabledFor(logging.INFO)


def test_text_is_the_classic_line(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    logs.setup("warning", "text")
    logging.getLogger("batchingest.x").info("hidden")
    logging.getLogger("batchingest.x").warning("shown %d", 1)
    err = capsys.readouterr().err
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING batchingest.x: shown 1\n", err
    )


def test_log_format_setting(tmp_path: Path) -> None:
    assert parse_serve_args(["--root", str(tmp_path)], environ={}).log_format == "text"
    env = {"BATCHINGEST_LOG_FORMAT": "JSON"}
    assert parse_serve_args(["--root", str(tmp_path)], environ=env).log_format == "json"
    args = ["--root", str(tmp_path), "--log-format", "text"]
    assert parse_serve_args(args, environ=env).log_format == "text"  # the flag wins
    with pytest.raises((ConfigError, SystemExit)):
        parse_serve_args(["--root", str(tmp_path), "--log-format", "xml"], environ={})


def test_access_lines_name_the_process_where_several_serve(
    capsys: pytest.CaptureFixture[str], restore_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs.ACCESS, "pid", 4321)  # set by --api-processes 2 or more
    logs.setup("info", "text")
    logs.ACCESS.add("request r9", FIELDS)
    assert capsys.readouterr().err.endswith(f"{TEXT_FIELDS} pid=4321\n")
    logs.setup("info", "json")
    logs.ACCESS.add("request r9", FIELDS)
    (line,) = lines(capsys.readouterr().err)
    assert line["pid"] == 4321 and {k: line[k] for k in FIELDS} == FIELDS
