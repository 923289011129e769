"""Prometheus metrics: one registry, the metric objects, and hooks the rest of the code calls.

Counters and histograms live in this process and start at zero after a restart. Gauges
that describe the jobs root (jobs per state, webhook outbox depth) are not kept here:
they are read from disk when `GET /metrics` is scraped (`RootCollector`), so they are
true at once, also after a restart and with other processors on the same root. A
state folder's count is kept while the folder is unchanged (`Store.job_count`); once a
state folder is large the store keeps the counts from inotify events instead
(batchingest.listings), exact at each scrape without listing a changing folder of
100,000 entries again, so a scrape costs a few milliseconds at any size.

Every label value comes from a small set the operator controls (states, task
executables, route templates, HTTP status codes), never from a job's or a request's
content, so the number of series stays bounded whatever clients send.

The hooks (`task_done`, `cancel`, `uploaded`, ...) are plain functions so that callers
need one line and no knowledge of prometheus-client; each costs a lock and an add.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

# submodules, not the package: its __init__ imports its HTTP servers and push client
# (http.server, urllib.request, wsgiref; see batchingest.lean), and the text format
# (prometheus_client.exposition, which imports them too) is loaded at the first scrape
from prometheus_client.metrics import Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from batchingest import fs, staging, transfers
from batchingest.store import STATES, Store

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from batchingest.runner import TaskResult

log = logging.getLogger("batchingest.metrics")

# the `_created` series double every counter's output and no dashboard here needs them
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # CPU, memory, open descriptors of this process

# Seconds, from a fast request or `true` task to a long task; pickup is bounded by
# --poll-interval, so its buckets stop at a minute.
_TASK_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
_PICKUP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60)

JOBS_FINISHED = Counter(
    "batchingest_jobs_finished",
    "Jobs this process moved out of processing/, by the state they went to",
    ["result"],
    registry=REGISTRY,
)
TASK_DURATION = Histogram(
    "batchingest_task_duration_seconds",
    "How long tasks ran, by task name",
    ["task"],
    buckets=_TASK_BUCKETS,
    registry=REGISTRY,
)
TASK_FAILURES = Counter(
    "batchingest_task_failures",
    "Failed task runs, by task name and reason class",
    ["task", "reason"],
    registry=REGISTRY,
)
PICKUP_LATENCY = Histogram(
    "batchingest_pickup_latency_seconds",
    "From a job's arrival in queue/ (its folder's change time) to its claim",
    buckets=_PICKUP_BUCKETS,
    registry=REGISTRY,
)
WORKERS_BUSY = Gauge(
    "batchingest_workers_busy", "Processor workers running a task now", registry=REGISTRY,
    multiprocess_mode="max",  # only the main process runs workers (see exposition)
)  # fmt: skip
CANCELS = Counter("batchingest_cancels", "Jobs cancelled", registry=REGISTRY)
WEBHOOK_DELIVERIES = Counter(
    "batchingest_webhook_deliveries",
    "Webhook delivery attempts, by outcome (delivered, retried, failed)",
    ["outcome"],
    registry=REGISTRY,
)
UPLOADED = Counter(
    "batchingest_uploaded_bytes", "Bytes received by file uploads", registry=REGISTRY
)
DOWNLOADED = Counter(
    "batchingest_downloaded_bytes", "Bytes of files sent to clients", registry=REGISTRY
)
STAGED = Counter("batchingest_staged_bytes", "Bytes copied by staging", registry=REGISTRY)
TRANSFERRED = Counter(
    "batchingest_transferred_bytes", "Bytes moved by transfer tasks", registry=REGISTRY
)
STAGING_REQUESTS = Counter(
    "batchingest_staging_requests",
    "Staging requests, by the status they got",
    ["status"],
    registry=REGISTRY,
)
HTTP_REQUESTS = Counter(
    "batchingest_http_requests",
    "HTTP requests, by method, route template and status",
    ["method", "route", "status"],
    registry=REGISTRY,
)
HTTP_DURATION = Histogram(
    "batchingest_http_request_duration_seconds",
    "Time from a request's arrival to its last response byte, by method and route template",
    ["method", "route"],
    buckets=_HTTP_BUCKETS,
    registry=REGISTRY,
)

# the task label of a task that could not be resolved: its name came from a JOB file,
# which anyone submitting a job writes, so it must not become a label value
UNKNOWN_TASK = "(unknown)"


# -- hooks ------------------------------------------------------------------------------


def reason_class(result: TaskResult) -> str:
    """The class of a task run's outcome (see runner.run_task): a bounded label value."""
    if result.ok:
        return "ok"
    if result.interrupted:
        return "interrupted"
    for prefix, cls in _REASON_CLASSES:
        if result.reason.startswith(prefix):
            return cls
    # no process ran and it was not for want of resources: no such task (a name from JOB)
    return "unknown-task" if result.exit_code is None else "control"


_REASON_CLASSES = (
    ("exit status", "exit"),
    ("killed by signal", "signal"),
    ("timed out", "timeout"),
    ("cannot start task", "spawn"),
)


def task_done(result: TaskResult) -> None:
    """A task run ended (any outcome): its duration, and its failure if it failed."""
    cls = reason_class(result)
    task = UNKNOWN_TASK if cls == "unknown-task" else result.task
    TASK_DURATION.labels(task).observe(result.seconds)
    if not result.ok and not result.interrupted:
        TASK_FAILURES.labels(task, cls).inc()


def queued_at(store: Store, name: str) -> float | None:
    """When the job arrived in queue/: its folder's change time, which the rename into
    queue/ sets (as does any later change of its entries). None if it is gone."""
    try:
        return os.lstat(store.job_path("queue", name)).st_ctime
    except (OSError, ValueError):
        return None


def picked_up(queued_at: float | None) -> None:
    """A job was claimed; queued_at is when it arrived in queue/ (time.time() clock)."""
    if queued_at is not None:
        PICKUP_LATENCY.observe(max(0.0, time.time() - queued_at))


def job_finished(state: str) -> None:
    JOBS_FINISHED.labels(state).inc()


def cancel() -> None:
    CANCELS.inc()


def webhook(outcome: str) -> None:
    """One webhook delivery attempt: "delivered", "retried" or "failed" (for good)."""
    WEBHOOK_DELIVERIES.labels(outcome).inc()


def uploaded(n: int) -> None:
    UPLOADED.inc(n)


def downloaded(n: int) -> None:
    DOWNLOADED.inc(n)


# -- bytes the built-in tasks copy ----------------------------------------------------------
# The stage and transfer tasks copy in their own processes, so no hook in this process
# sees their bytes. Each run rewrites a progress file in the job folder with what it
# copied, counted from 0 by each run (staging's bytes_copied; a transfer's
# bytes_transferred, files found in sync left out). The processor reads that file when
# the run ends, bounded and through the job folder's descriptor, and adds its figure;
# a file the run did not rewrite (it never started, or a site's own task of that name
# keeps no such file) adds nothing, so a job run again is never counted twice.


def _stage_copied(dir_fd: int) -> int:
    progress = staging.read_progress(dir_fd)
    return progress.bytes_copied if progress is not None else 0


def _transfer_copied(dir_fd: int) -> int:
    n = transfers.read_progress(dir_fd).get("bytes_transferred")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0


_COPIES = {
    "stage": (staging.PROGRESS, _stage_copied, STAGED),
    "transfer": (transfers.PROGRESS, _transfer_copied, TRANSFERRED),
}


def _version(dir_fd: int, name: str) -> tuple[int, ...] | None:
    # a replaced file has another inode or change time (write_atomic renames a new file)
    try:
        st = fs.lstat(dir_fd, name)
    except OSError:
        return None
    return None if st is None else (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def progress_mark(dir_fd: int, task: str) -> tuple[int, ...] | None:
    """Before a run of task: which version of its progress file the job holds (None:
    none yet, or a task that copies nothing), for task_copied to compare with."""
    copies = _COPIES.get(task)
    return None if copies is None else _version(dir_fd, copies[0])


def task_copied(dir_fd: int, task: str, mark: tuple[int, ...] | None) -> None:
    """After a run of task: the bytes it copied, if it rewrote its progress file."""
    copies = _COPIES.get(task)
    if copies is None:
        return
    name, copied, counter = copies
    now = _version(dir_fd, name)
    if now is not None and now != mark:
        counter.inc(copied(dir_fd))


def staging_request(status: str) -> None:
    STAGING_REQUESTS.labels(status).inc()


# The series of each (method, route, status) once looked up: labels() validates and
# locks on every call, which costs more than the count itself. A method is whatever a
# client sends, so any word outside HTTP's own is counted as OTHER: a client must not
# be able to make series without end.
_HTTP_SERIES: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
)


def http_request(method: str, route: str, status: int, seconds: float) -> None:
    if method not in HTTP_METHODS:
        method = "OTHER"
    key = (method, route, status)
    series = _HTTP_SERIES.get(key)
    if series is None:
        if len(_HTTP_SERIES) >= 1000:
            _HTTP_SERIES.clear()
        series = (
            HTTP_REQUESTS.labels(method, route, str(status)),
            HTTP_DURATION.labels(method, route),
        )
        _HTTP_SERIES[key] = series
    series[0].inc()
    series[1].observe(seconds)


# -- read from disk at scrape time ----------------------------------------------------------


class RootCollector(Collector):
    """Jobs per state and webhook outbox depth, listed from the root at each scrape."""

    def __init__(self) -> None:
        self.store: Store | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        store = self.store
        if store is None:
            return
        jobs = GaugeMetricFamily(
            "batchingest_jobs", "Jobs in the root now, by state folder", labels=["state"]
        )
        for state in STATES:
            jobs.add_metric([state], store.job_count(state))
        yield jobs
        outbox = GaugeMetricFamily(
            "batchingest_webhook_outbox_events",
            "Webhook events on disk: waiting for delivery, or failed for good",
            labels=["queue"],
        )
        folder = store.service_path("outbox")
        outbox.add_metric(["pending"], _count_events(folder))
        outbox.add_metric(["failed"], _count_events(folder / "failed"))
        yield outbox


def _count_events(folder: os.PathLike[str]) -> int:
    """Event files (`*.json`, not hidden) in one of the service's own outbox folders."""
    try:
        with os.scandir(folder) as it:
            return sum(
                1
                for e in it
                if e.name.endswith(".json")
                and not e.name.startswith(".")
                and e.is_file(follow_symlinks=False)
            )
    except FileNotFoundError:
        return 0


ROOT = RootCollector()
REGISTRY.register(ROOT)


def watch(store: Store) -> None:
    """Report this root's gauges from now on."""
    ROOT.store = store


def exposition() -> bytes:
    """The whole registry in Prometheus text format (lists folders: not on the event loop).

    With several API processes (--api-processes), prometheus-client's multiprocess mode
    is on (PROMETHEUS_MULTIPROC_DIR, set by the main process before this module was
    first imported): every process keeps its counters and histograms in a memory-mapped
    file there, and whichever process is scraped answers with their sums, so a scrape
    never depends on which process the connection reached. process_* metrics are left
    out then: they would describe only the process that happened to answer.
    """
    from prometheus_client.exposition import generate_latest

    return generate_latest(_multiprocess_registry() if MULTIPROCESS_DIR else REGISTRY)


MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
_MULTIPROCESS: list[CollectorRegistry] = []


def _multiprocess_registry() -> CollectorRegistry:
    if not _MULTIPROCESS:
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        registry.register(ROOT)
        _MULTIPROCESS.append(registry)
    return _MULTIPROCESS[0]


def routes(store: Store) -> list[BaseRoute]:
    """GET /metrics; behind the API's token check like every other route."""
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from batchingest.api.common import run_blocking

    watch(store)

    async def metrics(request: Request) -> Response:
        body = await run_blocking(exposition)
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return [Route("/metrics", metrics, methods=["GET"])]
