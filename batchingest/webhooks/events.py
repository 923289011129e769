"""Webhook events: the WEBHOOK file, the LOG tail and the POST body of one state change.

Everything here reads a job folder, which is user input: only through a descriptor of
the folder (`Store.open_job`) and `batchingest.fs`, so a WEBHOOK, JOB or LOG that is a
symbolic link, a FIFO or a device is refused instead of followed, and every read has a
stated limit.
"""

from __future__ import annotations

import json
import re
import socket
from typing import Any

import batchingest
from batchingest import fs, jobfile
from batchingest.jobdir import read_log_tail
from batchingest.jobfile import JOB_FILE
from batchingest.store import STATUS_OF_STATE

WEBHOOK_FILE = "WEBHOOK"
# A WEBHOOK is a short list of URLs: more than this is refused, not half-used.
WEBHOOK_MAX_BYTES = 64 * 1024
MAX_URLS = 16
# The LOG tail an error event carries.
LOG_CAP = 1 << 20
# A JOB bigger than this gets its events with "tasks": [] (the processor says why).
JOB_MAX_BYTES = 1 << 20
# Entering these states is announced; entering data/ is not (nothing happened yet).
EVENT_STATES = frozenset(("queue", "processing", "success", "error"))
_SUFFIX = re.compile(r"-\d{3,5}$")
_HOST = socket.gethostname()


class WebhookRefused(Exception):
    """The WEBHOOK file cannot be used; nothing is sent for the job."""


def read_urls(raw: bytes) -> list[str]:
    """URLs of a WEBHOOK file: one per line, blank lines and `#` comments skipped."""
    urls: list[str] = []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            urls.append(line)
    return urls


def read_webhook(dir_fd: int) -> list[str]:
    """The URLs of the job's WEBHOOK ([] if it has none); WebhookRefused if unusable."""
    try:
        raw = fs.read_file(dir_fd, WEBHOOK_FILE, WEBHOOK_MAX_BYTES)
    except fs.TooLarge:
        raise WebhookRefused(f"{WEBHOOK_FILE} is larger than {WEBHOOK_MAX_BYTES} bytes") from None
    except (fs.UnsafePath, fs.NotRegular) as e:
        raise WebhookRefused(f"{WEBHOOK_FILE} is not used: {e.strerror}") from None
    except IsADirectoryError:
        raise WebhookRefused(f"{WEBHOOK_FILE} is a folder, not a file") from None
    if raw is None:
        return []
    urls = read_urls(raw)
    if len(urls) > MAX_URLS:
        raise WebhookRefused(f"{WEBHOOK_FILE} lists {len(urls)} URLs, more than {MAX_URLS}")
    return urls


def lane_key(job_name: str) -> str:
    """The name that orders a job's events.

    A job arriving in success/ or error/ where its name is taken becomes NAME-001; its
    earlier events were sent as NAME. Dropping such a suffix keeps all of them in one
    lane. Two different jobs NAME and NAME-001 then share a lane, which only costs
    parallelism, never order.
    """
    # cut to the length the store keeps of a long name when it adds a suffix
    return _SUFFIX.sub("", job_name)[:249]


def error_log(dir_fd: int, cap: int = LOG_CAP) -> tuple[str, bool]:
    """`job_log` and `job_log_truncated` of an error event."""
    try:
        tail = read_log_tail(dir_fd, cap)
    except OSError as e:
        # a LOG planted as a link or FIFO is not read, and its name says why
        return f"[LOG not read: {e.strerror or e}]\n", False
    if tail.cut:
        return f"[LOG is {tail.size} bytes; only its last {cap} bytes follow]\n" + tail.text, True
    return tail.text, False


def read_tasks(dir_fd: int) -> list[str]:
    """The remaining Todo of the JOB file, or [] if it cannot be read."""
    try:
        raw = fs.read_file(dir_fd, JOB_FILE, JOB_MAX_BYTES)
        return jobfile.parse(raw).todo if raw is not None else jobfile.JobFile().todo
    except (jobfile.JobFileError, OSError):
        return []  # a broken JOB still gets its event; the processor reports the error


def build_body(
    job_name: str, state: str, old_state: str | None, dir_fd: int, event_id: str, time: str
) -> bytes:
    body: dict[str, Any] = {
        "host": _HOST,
        "version": batchingest.__version__,
        "job_name": job_name,
        "job_state": state,
        "previous_state": STATUS_OF_STATE.get(old_state) if old_state else None,
        "event_id": event_id,
        "time": time,
        "tasks": read_tasks(dir_fd),
    }
    if state == "error":
        body["job_log"], body["job_log_truncated"] = error_log(dir_fd)
    return json.dumps(body).encode()
