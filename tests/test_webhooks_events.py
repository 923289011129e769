"""events.py: the WEBHOOK file, the LOG tail and the body, read through a folder descriptor."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchingest import fs
from batchingest.jobdir import read_log_tail
from batchingest.webhooks.events import (
    LOG_CAP,
    MAX_URLS,
    WEBHOOK_MAX_BYTES,
    WebhookRefused,
    build_body,
    error_log,
    lane_key,
    read_urls,
    read_webhook,
)


@pytest.fixture
def job(tmp_path: Path) -> Path:
    path = tmp_path / "job"
    path.mkdir()
    return path


@pytest.fixture
def job_fd(job: Path) -> Iterator[int]:
    fd = fs.open_root(job)
    yield fd
    os.close(fd)


def test_urls_and_lane_keys() -> None:
    assert read_urls(b"  a\n#b\n\n c \r\n") == ["a", "c"]
    assert lane_key("job-001") == lane_key("job") == "job"
    assert lane_key("job-1") == "job-1"


def test_webhook_read_and_capped(job: Path, job_fd: int) -> None:
    assert read_webhook(job_fd) == []
    urls = [f"http://h{i}.example/" for i in range(MAX_URLS)]
    (job / "WEBHOOK").write_text("# the list\n" + "\n".join(urls))
    assert read_webhook(job_fd) == urls
    (job / "WEBHOOK").write_text("\n".join([*urls, "http://one-too-many.example/"]))
    with pytest.raises(WebhookRefused, match=f"lists {MAX_URLS + 1} URLs, more than {MAX_URLS}"):
        read_webhook(job_fd)
    (job / "WEBHOOK").write_bytes(b"#" * (WEBHOOK_MAX_BYTES + 1))
    with pytest.raises(WebhookRefused, match=f"larger than {WEBHOOK_MAX_BYTES} bytes"):
        read_webhook(job_fd)


def test_webhook_link_is_not_followed(job: Path, job_fd: int, tmp_path: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("http://secret-line.example/\n")
    (job / "WEBHOOK").symlink_to(outside)
    with pytest.raises(WebhookRefused, match="symbolic link") as e:
        read_webhook(job_fd)
    assert "secret-line" not in str(e.value)


def test_webhook_fifo_does_not_hang(job: Path, job_fd: int) -> None:
    os.mkfifo(job / "WEBHOOK")
    result: list[object] = []
    # in a thread, so that a read that blocks fails the test instead of hanging it
    thread = threading.Thread(target=lambda: result.append(_refusal(job_fd)), daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive(), "reading a FIFO named WEBHOOK blocked"
    assert result == ["WEBHOOK is not used: not a regular file (named pipe)"]


def _refusal(fd: int) -> str:
    try:
        read_webhook(fd)
    except WebhookRefused as e:
        return str(e)
    return "accepted"


def test_log_tail_is_bounded_and_never_follows_a_link(
    job: Path, job_fd: int, tmp_path: Path
) -> None:
    assert read_log_tail(job_fd, LOG_CAP).text == ""
    (job / "LOG").write_bytes(b"FIRST\n" + b"x" * 100 + b"\nLAST\n")
    tail = read_log_tail(job_fd, 10)
    assert (tail.text, tail.size, tail.cut) == ("xxxx\nLAST\n", 112, True)
    text, cut = error_log(job_fd, 10)
    assert cut and text == "[LOG is 112 bytes; only its last 10 bytes follow]\nxxxx\nLAST\n"
    (job / "LOG").unlink()
    outside = tmp_path / "outside-log"
    outside.write_text("outside content\n")
    (job / "LOG").symlink_to(outside)
    with pytest.raises(fs.UnsafePath):
        read_log_tail(job_fd, LOG_CAP)
    text, cut = error_log(job_fd)
    assert text.startswith("[LOG not read: a symbolic link") and not cut
    assert "outside content" not in text
    assert LOG_CAP == 1 << 20


def test_body_reads_job_through_the_folder(job: Path, job_fd: int, tmp_path: Path) -> None:
    (job / "JOB").write_text(json.dumps({"Todo": ["a", "b"]}))
    body = json.loads(build_body("j", "error", "processing", job_fd, "id", "t"))
    assert body["tasks"] == ["a", "b"] and body["previous_state"] == "processing"
    assert body["job_log"] == "" and body["job_log_truncated"] is False
    (job / "JOB").unlink()
    assert json.loads(build_body("j", "queue", "data", job_fd, "id", "t"))["tasks"] == ["start"]
    outside = tmp_path / "outside-job"
    outside.write_text(json.dumps({"Todo": ["leaked"]}))
    (job / "JOB").symlink_to(outside)
    body = json.loads(build_body("j", "queue", None, job_fd, "id", "t"))
    assert body["tasks"] == [] and body["previous_state"] is None
