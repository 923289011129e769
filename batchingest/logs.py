"""The service log: set up once, as text for people or JSON for log collectors.

`--log-format json` writes one JSON object a line: `time` (RFC 3339, UTC, milliseconds),
`level`, `logger`, `message`, and `request_id` or `job` whenever the line concerns one.
Those two come from context variables, set where a request or a job is being handled
(`REQUEST_ID` by the API middleware, `about_job` by a processor worker); asyncio tasks
and the API's worker threads inherit them, so a line logged anywhere below needs no
extra argument. A line may also name them itself: `log.info(..., extra={"job": name})`.

Access lines (logger `batchingest.access`, one per request) carry their fields as
`extra` too, so in JSON they are fields of their own, and in text `key=value` pairs.
Once `setup` has run they skip the logging machinery (`ACCESS`): a record, its handler
and a write per line cost more than the `GET /jobs/{id}` they describe, a tenth of it.
They are formatted as the handler would, and written together at the end of the event
loop's turn, so a burst of requests costs one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TextIO

FORMATS = ("text", "json")
REQUEST_ID: ContextVar[str | None] = ContextVar("batchingest_request_id", default=None)
JOB: ContextVar[str | None] = ContextVar("batchingest_job", default=None)
# the fields of an access line, in the order they are written
ACCESS_FIELDS = ("method", "route", "status", "bytes", "duration_ms", "token")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# an access line's fields in text: "method={method} route={route} ..."
_TEXT_PAIRS = " ".join(f"{key}={{{key}}}" for key in ACCESS_FIELDS)


def parse_format(value: str) -> str:
    v = value.strip().lower()
    if v not in FORMATS:
        raise ValueError(f"must be one of {', '.join(FORMATS)}: {value!r}")
    return v


@contextlib.contextmanager
def about_job(name: str) -> Iterator[None]:
    """Every line logged in this context (this thread, or tasks it starts) names the job."""
    token = JOB.set(name)
    try:
        yield
    finally:
        JOB.reset(token)


def rfc3339(created: float) -> str:
    ms = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{ms:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object a line; see the module's docstring for its fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, var in (("request_id", REQUEST_ID), ("job", JOB)):
            value = record.__dict__.get(key) or var.get()
            if value:
                line[key] = value
        for key in ACCESS_FIELDS:
            if key in record.__dict__:
                line[key] = record.__dict__[key]
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The classic line; an access line's fields follow its message as key=value."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.name == "batchingest.access":
            fields = " ".join(f"{k}={record.__dict__[k]}" for k in ACCESS_FIELDS)
            return f"{text} {fields}"
        return text


class AccessLines:
    """Access lines, written to the log's stream in one write per event-loop turn."""

    def __init__(self) -> None:
        self.stream: TextIO | None = None  # None: not set up, go through logging
        self.json = False
        self.pid: int | None = None  # named on every line where several processes serve
        self._pending: list[str] = []
        self._second = -1
        self._second_text = ""

    def add(self, message: str, fields: dict[str, object]) -> None:
        created = time.time()
        if self.json:
            head = {"time": rfc3339(created), "level": "info", "logger": ACCESS_LOGGER}
            document = {**head, "message": message, **fields}
            if self.pid is not None:
                document["pid"] = self.pid
            line = json.dumps(document, ensure_ascii=False)
        else:
            at = self._local_second(int(created))
            pairs = _TEXT_PAIRS.format_map(fields)
            if self.pid is not None:
                pairs += f" pid={self.pid}"
            line = f"{at},{int(created * 1000) % 1000:03d} INFO {ACCESS_LOGGER}: {message} {pairs}"
        self._pending.append(line + "\n")
        if len(self._pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop here: now
                self.flush()

    def _local_second(self, second: int) -> str:
        # the date and time of the line, formatted once a second, not once a line
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._second = second
        return self._second_text

    def flush(self) -> None:
        lines, self._pending = self._pending, []
        if lines and self.stream is not None:
            with contextlib.suppress(OSError, ValueError):  # a closed or full stderr
                self.stream.write("".join(lines))
                self.stream.flush()


ACCESS = AccessLines()
ACCESS_LOGGER = "batchingest.access"


def setup(level: str, fmt: str = "text") -> None:
    """The one place that configures logging: stderr, at level, in fmt (text or json)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # Neither format shows the caller, thread or process, and every request logs a line:
    # not collecting them saves a sixth of a line's cost (the logging docs' "Optimization")
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    ACCESS.flush()
    ACCESS.json = fmt == "json"
    enabled = logging.getLogger(ACCESS_LOGGER).isEnabledFor(logging.INFO)
    ACCESS.stream = handler.stream if enabled else None
    # httpx logs every webhook request at INFO; our own line per attempt says more
    logging.getLogger("httpx").setLevel(logging.WARNING)
