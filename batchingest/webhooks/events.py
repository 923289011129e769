"""Webhook events: the WEBHOOK file, the POST body and the outbox file of one delivery.

An outbox file holds one pending delivery (one event to one URL): a first line of JSON
naming the job, URL and event, then the body exactly as it is sent. The header alone is
enough to schedule a delivery, so a restart with many pending events reads little.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import batchingest
from batchingest import jobfile
from batchingest.runner import LOG_FILE
from batchingest.store import STATUS_OF_STATE

WEBHOOK_FILE = "WEBHOOK"
LOG_CAP = 1 << 20
# Entering these states is announced; entering data/ is not (nothing happened yet).
EVENT_STATES = frozenset(("queue", "processing", "success", "error"))
_SUFFIX = re.compile(r"-\d{3,5}$")
_HOST = socket.gethostname()


def read_urls(raw: bytes) -> list[str]:
    """URLs of a WEBHOOK file: one per line, blank lines and `#` comments skipped."""
    urls: list[str] = []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            urls.append(line)
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


def read_log_tail(job_dir: Path, cap: int = LOG_CAP) -> tuple[str, bool]:
    """The last `cap` bytes of the job's LOG, and whether anything was cut."""
    try:
        with open(job_dir / LOG_FILE, "rb") as f:
            size = f.seek(0, 2)
            cut = size > cap
            f.seek(max(0, size - cap))
            data = f.read(cap)
    except (FileNotFoundError, IsADirectoryError):
        return "", False
    text = data.decode("utf-8", errors="replace")
    if cut:
        text = f"[LOG is {size} bytes; only its last {cap} bytes follow]\n" + text
    return text, cut


def build_body(
    job_name: str, state: str, old_state: str | None, job_dir: Path, event_id: str, time: str
) -> bytes:
    try:
        tasks = jobfile.load(job_dir).todo
    except (jobfile.JobFileError, OSError):
        tasks = []  # a broken JOB still gets its event; the processor reports the error
    body: dict[str, Any] = {
        "host": _HOST,
        "version": batchingest.__version__,
        "job_name": job_name,
        "job_state": state,
        "previous_state": STATUS_OF_STATE.get(old_state) if old_state else None,
        "event_id": event_id,
        "time": time,
        "tasks": tasks,
    }
    if state == "error":
        body["job_log"], body["job_log_truncated"] = read_log_tail(job_dir)
    return json.dumps(body).encode()


@dataclass(frozen=True)
class Record:
    """One pending delivery; `file` is its name in the outbox."""

    seq: int
    index: int
    event_id: str
    job: str
    key: str
    state: str
    url: str

    @property
    def file(self) -> str:
        return f"{self.seq:020d}-{self.index:04d}-{self.event_id}.json"

    @property
    def order(self) -> tuple[int, int]:
        return (self.seq, self.index)

    def dumps(self, body: bytes, **extra: object) -> bytes:
        return json.dumps({**asdict(self), **extra}).encode() + b"\n" + body


def read_record(path: Path) -> Record | None:
    """The header of an outbox file, or None if it is not one (or is gone)."""
    try:
        with open(path, "rb") as f:
            head = json.loads(f.readline())
        return Record(**{k: head[k] for k in Record.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_body(path: Path) -> bytes:
    data = path.read_bytes()
    return data[data.index(b"\n") + 1 :]
