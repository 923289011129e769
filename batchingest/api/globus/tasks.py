"""Transfer and delete tasks of the Globus API: submit, get, list, events, cancel.

A task is a transfer job (batchingest.transfers) named by its task_id, which is derived
from the submission id, so a second submission with the same id finds the first task
(200 `Duplicate`) and never makes another. Task documents are built from the job's
state and its small files; listing reads each request once (transfers.Requests).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import time
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from batchingest import endpoints, fs, transfers
from batchingest.api.common import json_response, run_blocking
from batchingest.api.errors import ApiError
from batchingest.api.globus import documents, models, query
from batchingest.api.globus.operations import read_doc, split
from batchingest.endpoints import Endpoint, Endpoints
from batchingest.store import Job, State, Store

MAX_BODY = 16 << 20  # a transfer may list many items
LIST_LIMIT = 1000
EVENT_LIMIT = 1000
TRANSFERS_PAGE = 1000
MAX_TRANSFERRED = 256 << 20
CANCEL_WAIT = 10.0
SYNC_LEVELS = {"exists": 0, "size": 1, "mtime": 2, "checksum": 3}
TASK_ORDER = ("request_time", "completion_time", "status", "type", "label", "task_id")


def task_not_found(task_id: str) -> ApiError:
    return ApiError(404, "TaskNotFound", f"Task {task_id[:100]!r} not found")


def _deadline(raw: str | None) -> str | None:
    if raw is None:
        return None
    try:
        return transfers.parse_time(raw).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        raise query.bad(f"deadline is not a date and time: {raw[:50]!r}") from None


def _sync_level(raw: int | str | None) -> int | None:
    return SYNC_LEVELS[raw] if isinstance(raw, str) else raw


def _check_path(raw: str, key: str) -> None:
    split(raw, key)
    if endpoints.SERVICE_PREFIX in raw:
        raise query.bad(f"{key}: names starting with {endpoints.SERVICE_PREFIX} are the service's")


class TaskApi:
    def __init__(self, registry: Endpoints, store: Store) -> None:
        self.registry = registry
        self.store = store
        self.requests = transfers.Requests(store)
        # (the state folders' name lists, filter and order, the rows they gave)
        self._sorted: tuple[list[list[str]], str, list[dict[str, Any]]] | None = None

    def configured(self) -> None:
        if not len(self.registry):
            raise ApiError(503, "EndpointsNotConfigured", endpoints.NOT_CONFIGURED)

    def endpoint(self, ref: Any, *, write: bool) -> Endpoint:
        if not isinstance(ref, str) or not ref:
            raise query.bad("an endpoint id or name is required")
        found = self.registry.find(ref)
        if found is None:
            raise ApiError(404, "EndpointNotFound", f"No such endpoint {ref[:200]!r}")
        if write and found.read_only:
            raise ApiError(403, "PermissionDenied", f"endpoint {found.name!r} is read-only")
        return found

    # -- submitting --------------------------------------------------------------------

    async def submit_transfer(self, request: Request) -> Response:
        self.configured()
        doc = await read_doc(request, models.TransferSubmission, MAX_BODY)
        if doc.encrypt_data:
            raise ApiError(501, "NotImplemented", "encryption has no meaning between local folders")
        src = self.endpoint(doc.source_endpoint, write=False)
        dst = self.endpoint(doc.destination_endpoint, write=True)
        for item in doc.DATA:
            _check_path(item.source_path, "source_path")
            _check_path(item.destination_path, "destination_path")
        fields = {
            "source_endpoint": src.name,
            "destination_endpoint": dst.name,
            "items": [
                {
                    "source_path": i.source_path,
                    "destination_path": i.destination_path,
                    "recursive": bool(i.recursive),
                }
                for i in doc.DATA
            ],
            "sync_level": _sync_level(doc.sync_level),
            "verify_checksum": bool(doc.verify_checksum),
            "preserve_timestamp": bool(doc.preserve_timestamp),
            "delete_destination_extra": bool(doc.delete_destination_extra),
        }
        return await self._submit(request, doc, "transfer", fields)

    async def submit_delete(self, request: Request) -> Response:
        self.configured()
        doc = await read_doc(request, models.DeleteSubmission, MAX_BODY)
        ep = self.endpoint(doc.endpoint, write=True)
        for item in doc.DATA:
            if not split(item.path):
                raise query.bad("/ is the endpoint folder itself: it is never deleted")
        fields = {
            "endpoint": ep.name,
            "items": [{"path": item.path} for item in doc.DATA],
            "recursive": bool(doc.recursive),
            "ignore_missing": bool(doc.ignore_missing),
        }
        return await self._submit(request, doc, "delete", fields)

    async def _submit(
        self,
        request: Request,
        doc: models.Submission,
        kind: str,
        fields: dict[str, Any],
    ) -> Response:
        submission = doc.submission_id
        task_id = transfers.task_id_for(submission)
        deadline = _deadline(doc.deadline)
        req = {
            "kind": kind,
            "id": task_id,
            "submission_id": submission,
            "label": doc.label,
            "request_time": transfers.now_text(),
            "deadline": deadline,
            **fields,
        }
        created = await run_blocking(transfers.create, self.store, task_id, req, deadline)
        code, status = ("Accepted", 202) if created else ("Duplicate", 200)
        if created:
            message = f"The {kind} has been accepted and a task has been created and queued"
        else:
            message = "A task with this submission id exists"
        link = {
            "DATA_TYPE": "link",
            "href": f"task/{task_id}?format=json",
            "rel": "related",
            "resource": "task",
            "title": "related task",
        }
        body = documents.result(
            request,
            f"{kind}_result",
            code,
            message,
            task_id=task_id,
            submission_id=submission,
            task_link=link,
        )
        return json_response(body, status)

    # -- reading -----------------------------------------------------------------------

    async def snapshot(self, request: Request) -> transfers.Snapshot:
        self.configured()
        task_id = request.path_params["task_id"]
        name = _task_name(task_id)
        snap = await run_blocking(transfers.snapshot, self.store, name) if name else None
        if snap is None or snap.request.get("kind") not in ("transfer", "delete"):
            raise task_not_found(task_id)
        return snap

    async def get_task(self, request: Request) -> Response:
        snap = await self.snapshot(request)
        doc = task_doc(snap, self.registry)
        return json_response(documents.select_fields(doc, query.fields(request)))

    async def task_list(self, request: Request) -> Response:
        self.configured()
        limit = query.integer(request, "limit", 10, 0, LIST_LIMIT)
        offset = query.integer(request, "offset", 0, 0, 1 << 40)
        test = task_filter(request)
        keys = task_order(request)
        fields = query.fields(request)
        spec = json.dumps([request.query_params.getlist("filter"), keys])
        window = (offset, limit)
        page, total = await run_blocking(self._page, test, keys, spec, window, fields)
        return json_response({"DATA_TYPE": "task_list", "DATA": page, "length": len(page),
                              "limit": limit, "offset": offset, "total": total})  # fmt: skip

    def _rows(self, test: Any, keys: list[tuple[str, bool]], spec: str) -> list[dict[str, Any]]:
        """The tasks matching, in order; reused while no state folder has changed.

        The store hands out the same name list of a state while its folder is unchanged,
        so the same lists mean the same jobs in the same states: a client paging through
        10,000 tasks does not filter and sort them again for every page.
        """
        lists = [self.store.job_names(state) for state in State]
        hit = self._sorted
        if (
            hit is not None
            and hit[1] == spec
            and all(a is b for a, b in zip(hit[0], lists, strict=True))
        ):
            return hit[2]
        rows = []
        for name, state, req in self.requests.listing():
            if req.get("kind") in ("transfer", "delete"):
                row = brief(name, state, req)
                if test(row):
                    rows.append(row)
        for key, descending in reversed(keys):
            rows.sort(key=lambda r, k=key: r[k] or "", reverse=descending)  # type: ignore[misc]
        self._sorted = (lists, spec, rows)
        return rows

    def _page(
        self,
        test: Any,
        keys: list[tuple[str, bool]],
        spec: str,
        window: tuple[int, int],
        fields: list[str] | None,
    ) -> tuple[list[dict[str, Any]], int]:
        rows = self._rows(test, keys, spec)
        page = []
        offset, limit = window
        for row in rows[offset : offset + limit]:
            snap = transfers.snapshot(self.store, row["task_id"], row["_request"])
            if snap is not None:
                page.append(documents.select_fields(task_doc(snap, self.registry), fields))
        return page, len(rows)

    async def event_list(self, request: Request) -> Response:
        snap = await self.snapshot(request)
        limit = query.integer(request, "limit", 10, 0, EVENT_LIMIT)
        offset = query.integer(request, "offset", 0, 0, 1 << 40)
        events = await run_blocking(task_events, self.store, snap)
        page = events[offset : offset + limit]
        return json_response(
            {
                "DATA_TYPE": "event_list",
                "DATA": page,
                "length": len(page),
                "limit": limit,
                "offset": offset,
                "total": len(events),
            }
        )

    async def successful_transfers(self, request: Request) -> Response:
        snap = await self.snapshot(request)
        marker = query.integer(request, "marker", 0, 0, 1 << 40)
        lines = await run_blocking(_transferred, self.store, snap.job)
        page = []
        for line in lines[marker : marker + TRANSFERS_PAGE]:
            try:
                item = json.loads(line)
            except ValueError:
                continue
            page.append({"DATA_TYPE": "successful_transfer", **item})
        following = marker + TRANSFERS_PAGE if marker + TRANSFERS_PAGE < len(lines) else None
        return json_response(
            {
                "DATA_TYPE": "successful_transfers",
                "marker": marker,
                "next_marker": following,
                "DATA": page,
            }
        )

    async def cancel(self, request: Request) -> Response:
        snap = await self.snapshot(request)
        name = snap.job.name
        active = snap.job.state in (State.QUEUE, State.PROCESSING)
        if active:
            await run_blocking(transfers.request_cancel, self.store, name)
            waited = time.monotonic() + CANCEL_WAIT
            while time.monotonic() < waited:
                now = await run_blocking(transfers.snapshot, self.store, name)
                if now is None or now.job.state not in (State.QUEUE, State.PROCESSING):
                    break
                await asyncio.sleep(0.05)
            later = await run_blocking(transfers.snapshot, self.store, name)
            snap = later if later is not None else snap
        fatal = snap.fatal or {}
        if not active:
            code, message = "TaskComplete", "The task had already ended; nothing to cancel."
        elif fatal.get("code") == "CANCELED":
            code, message = "Canceled", "The task has been cancelled successfully."
        elif snap.job.state in (State.QUEUE, State.PROCESSING):
            code, message = "CancelAccepted", "The cancel was accepted; the task is stopping."
        else:
            code, message = "TaskComplete", "The task ended before the cancel took effect."
        return json_response(documents.result(request, "result", code, message))


def _task_name(raw: str) -> str | None:
    try:
        import uuid

        return str(uuid.UUID(raw))
    except ValueError:
        return None


# -- documents --------------------------------------------------------------------------------


def status_of(state: str, fatal: dict[str, str] | None) -> str:
    if state == State.SUCCESS:
        return "SUCCEEDED"
    if state in (State.QUEUE, State.PROCESSING):
        return "ACTIVE"
    if state == State.DATA and fatal is None:
        return "INACTIVE"
    return "FAILED"


def brief(name: str, state: State, req: dict[str, Any]) -> dict[str, Any]:
    """What task_list filters and sorts on, without opening the job."""
    return {
        "task_id": name,
        "type": str(req.get("kind", "")).upper(),
        # a transfer job is only in data/ once canceled while queued
        "status": status_of(state, {"code": "CANCELED"} if state == State.DATA else None),
        "label": req.get("label"),
        "request_time": req.get("request_time"),
        "completion_time": None,
        "_request": req,
    }


def _completed(job: Job) -> str | None:
    if job.state in (State.QUEUE, State.PROCESSING):
        return None
    try:
        when = os.stat(job.path).st_ctime  # a rename sets the folder's ctime
    except OSError:
        return None
    return datetime.fromtimestamp(int(when), UTC).strftime("%Y-%m-%d %H:%M:%S+00:00")


def task_doc(snap: transfers.Snapshot, registry: Endpoints) -> dict[str, Any]:
    req, prog = snap.request, snap.progress
    fatal = snap.fatal
    status = status_of(snap.job.state, fatal)
    kind = str(req.get("kind"))
    src = registry.find(str(req.get("source_endpoint" if kind == "transfer" else "endpoint")))
    dst = registry.find(str(req.get("destination_endpoint"))) if kind == "transfer" else None
    nice = {
        "ACTIVE": "Queued" if snap.job.state == State.QUEUE else "OK",
        "SUCCEEDED": None,
        "INACTIVE": "Canceling" if snap.cancel else None,
    }
    doc: dict[str, Any] = {
        "DATA_TYPE": "task",
        "task_id": snap.job.name,
        "type": kind.upper(),
        "status": status,
        "label": req.get("label"),
        "request_time": req.get("request_time"),
        "completion_time": _completed(snap.job) if status != "ACTIVE" else None,
        "deadline": req.get("deadline"),
        "source_endpoint_id": src.id if src else None,
        "source_endpoint_display_name": src.name if src else None,
        "destination_endpoint_id": dst.id if dst else None,
        "destination_endpoint_display_name": dst.name if dst else None,
        **_subtasks(req, prog, status, fatal),
        "sync_level": req.get("sync_level"),
        "verify_checksum": bool(req.get("verify_checksum")),
        "preserve_timestamp": bool(req.get("preserve_timestamp")),
        "delete_destination_extra": bool(req.get("delete_destination_extra")),
        "encrypt_data": False,
        "recursive_symlinks": "ignore",
        "fatal_error": fatal if status == "FAILED" else None,
        "nice_status": fatal["code"] if fatal and status == "FAILED" else nice.get(status),
        "nice_status_short_description": fatal["description"] if fatal else None,
        "is_paused": False,
        "is_ok": status != "FAILED" if status == "ACTIVE" else None,
        "canceled_by_admin": None,
        "history_deleted": False,
        "faults": 0,
        "owner_id": None,
        "username": "batchingest",
        "effective_bytes_per_second": 0,
    }
    for key in (
        "files",
        "directories",
        "files_skipped",
        "files_transferred",
        "bytes_transferred",
        "bytes_checksummed",
    ):
        doc[key] = int(prog.get(key, 0) or 0)
    return doc


def _subtasks(
    req: dict[str, Any], prog: dict[str, Any], status: str, fatal: dict[str, str] | None
) -> dict[str, int]:
    """One subtask per item: those not done are pending while active, canceled after."""
    total = len(req.get("items") or [])
    ok, failed = int(prog.get("subtasks_succeeded", 0)), int(prog.get("subtasks_failed", 0))
    left = max(0, total - ok - failed)
    return {
        "subtasks_total": total,
        "subtasks_succeeded": ok,
        "subtasks_failed": failed,
        "subtasks_pending": left if status in ("ACTIVE", "INACTIVE") else 0,
        "subtasks_canceled": left if fatal and status == "FAILED" else 0,
        "subtasks_retrying": 0,
        "subtasks_expired": 0,
        "subtasks_skipped_errors": 0,
    }


# -- task_list filter and order -----------------------------------------------------------


def _time(text: str) -> str:
    """A filter bound as the sortable text request_time is stored in."""
    try:
        return transfers.parse_time(text).strftime("%Y-%m-%d %H:%M:%S+00:00")
    except ValueError:
        raise query.bad(f"not a date (YYYY-MM-DD[ HH:MM:SS]): {text[:50]!r}") from None


def _clause(clause: str) -> Any:
    field, sep, value = clause.partition(":")
    field = field.strip()
    if not sep:
        raise query.bad(f"filter clause {clause[:100]!r} is not FIELD:VALUE")
    if field in ("status", "type", "task_id"):
        allowed = {v.strip() for v in value.split(",")}
        if field == "status" and "SUCCESSFUL" in allowed:
            allowed.add("SUCCEEDED")  # the reference's example spells it so
        return lambda r: r[field] in allowed
    if field == "label":
        if value.startswith("~"):
            return lambda r: value[1:].lower() in (r["label"] or "").lower()
        return lambda r: r["label"] == value
    if field in ("request_time", "completion_time"):
        start_text, comma, end_text = value.partition(",")
        start = _time(start_text) if start_text.strip() else ""
        end = _time(end_text) if comma and end_text.strip() else "~"
        if not comma:
            end = "~"
        return lambda r: r[field] is not None and start <= r[field] < end
    raise query.bad(f"cannot filter tasks on {field[:50]!r}")


def task_filter(request: Request) -> Any:
    """§4.2 filters: clauses joined by '/', all must hold; delete tasks only when asked."""
    tests = []
    asked_type = False
    for raw in request.query_params.getlist("filter"):
        for clause in raw.split("/"):
            if clause.strip():
                asked_type |= clause.strip().startswith("type:")
                tests.append(_clause(clause))
    if not asked_type:
        tests.append(lambda r: r["type"] == "TRANSFER")  # as Globus does, for old clients
    return lambda r: all(t(r) for t in tests)


def task_order(request: Request) -> list[tuple[str, bool]]:
    raw = request.query_params.get("orderby") or "request_time DESC"
    keys = []
    for part in raw.split(","):
        words = part.split()
        if not words:
            continue
        direction = words[1].upper() if len(words) > 1 else "ASC"
        if words[0] not in TASK_ORDER or direction not in ("ASC", "DESC") or len(words) > 2:
            raise query.bad(f"cannot order tasks by {part.strip()[:100]!r}")
        keys.append((words[0], direction == "DESC"))
    return keys


# -- events and transferred files -----------------------------------------------------------

_MARK = re.compile(r"^(\S+) batchingest: ---- task transfer: (\w+)")


def task_events(store: Store, snap: transfers.Snapshot) -> list[dict[str, Any]]:
    """The task's events, newest first: from the job history once batchingest.events
    exists, else from the LOG's task markers and the task's own lines."""
    try:
        events = importlib.import_module("batchingest.events")
        history = getattr(events, "history", None)
        if callable(history):
            found = history(store, snap.job)
            return [_history_event(e) for e in found][::-1]
    except Exception:  # any shape this code does not know: fall back to the LOG
        pass
    return _log_events(store, snap)


def _history_event(e: dict[str, Any]) -> dict[str, Any]:
    code = str(e.get("event", e.get("code", "")))
    return _event(code, str(e.get("detail", "")), str(e.get("time", "")))


def _event(code: str, details: str, when: str, error: bool = False) -> dict[str, Any]:
    return {
        "DATA_TYPE": "event",
        "code": code,
        "description": details.split(":")[0][:100],
        "details": details,
        "is_error": error,
        "time": when,
    }


def _log_events(store: Store, snap: transfers.Snapshot) -> list[dict[str, Any]]:
    out = [_event("QUEUED", "the task was accepted", str(snap.request.get("request_time")))]
    try:
        fd = store.open_job(snap.job)
    except OSError:
        return out
    try:
        found = fs.read_tail(fd, "LOG", 1 << 20)
    except OSError:
        found = None
    finally:
        os.close(fd)
    when = ""
    for line in (found[0] if found else b"").decode(errors="replace").splitlines():
        mark = _MARK.match(line)
        if mark:
            when = mark.group(1)
            if mark.group(2) == "begin":
                out.append(_event("STARTED", "the task was started or restarted", when))
        elif line.startswith("ERROR "):
            out.append(_event("ERROR", line[6:], when, error=True))
        elif line.startswith("transfer: stopped: "):
            code = transfers.is_canceled(line) or "CANCELED"
            out.append(_event(code, line[19:], when, error=True))
        elif line.startswith("transfer: done"):
            out.append(_event("SUCCEEDED", line[10:], when))
    return out[::-1]


def _transferred(store: Store, job: Job) -> list[str]:
    try:
        fd = store.open_job(job)
    except OSError:
        return []
    try:
        raw = fs.read_file(fd, transfers.TRANSFERRED, MAX_TRANSFERRED)
    except OSError:
        raw = None
    finally:
        os.close(fd)
    return (raw or b"").decode(errors="replace").splitlines()


_T = "/v0.10/task/{task_id}"
# (path below /globus, TaskApi method, HTTP methods, what it does)
ROUTES: list[tuple[str, str, list[str], str]] = [
    ("/v0.10/transfer", "submit_transfer", ["POST"], "submit a transfer task (a job)"),
    ("/v0.10/delete", "submit_delete", ["POST"], "submit a delete task (a job)"),
    ("/v0.10/task_list", "task_list", ["GET"], "tasks: filter, orderby, fields, paging"),
    (_T, "get_task", ["GET"], "one task document"),
    (f"{_T}/event_list", "event_list", ["GET"], "the task's events, newest first"),
    (f"{_T}/successful_transfers", "successful_transfers", ["GET"], "files copied (marker paging)"),
    (f"{_T}/cancel", "cancel", ["POST"], "cancel a task"),
]
