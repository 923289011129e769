"""The DTS staging endpoints: POST /dts/staging, GET /dts/staging?id=, GET /dts/staging/{id}.

A request becomes an ordinary job named by a UUID4 with a manifest and `{"Todo": ["stage"]}`,
so it is queued, processed, logged, retried and webhooked like every other job. The
status endpoint reads the job's state (its folder) and its small progress file only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from batchingest import jobfile, metrics
from batchingest.api.auth import REQUESTER
from batchingest.api.errors import ApiError
from batchingest.config import Config
from batchingest.staging import (
    MANIFEST,
    Entry,
    Progress,
    Resolver,
    StagingError,
    manifest_bytes,
    status,
    write_progress,
)
from batchingest.store import Job, JobBusy, Store

log = logging.getLogger("batchingest.api.staging")

IDEMPOTENCY_TTL = 24 * 3600.0
MAX_KEY = 255
# A request body may hold staging_max_ids ids of up to 4096 bytes each, JSON-quoted.
BYTES_PER_ID = 4200


# -- idempotency keys ---------------------------------------------------------------------


class Idempotency:
    """Idempotency-Key -> request id, one small file per key in a hidden service folder.

    Files are created with link(2), which never replaces, so two requests racing with the
    same key agree on one request id. Records older than 24 hours count as absent and
    are swept at most once an hour.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._swept = 0.0
        self._lock = threading.Lock()

    def _path(self, key: str) -> Path:
        return self.folder / hashlib.sha256(key.encode()).hexdigest()

    def lookup(self, key: str) -> dict[str, Any] | None:
        try:
            record = json.loads(self._path(key).read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or not isinstance(record.get("created"), (int, float)):
            return None
        if time.time() - record["created"] > IDEMPOTENCY_TTL:
            return None
        return record

    def claim(self, key: str, request_id: str, fingerprint: str) -> dict[str, Any] | None:
        """Record key -> request_id; if another live record holds the key, return it."""
        self.folder.mkdir(exist_ok=True)
        self._sweep()
        record = {"request_id": request_id, "created": time.time(), "body_sha256": fingerprint}
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(record).encode())
                f.flush()
                os.fsync(f.fileno())
            for _ in range(3):
                try:
                    os.link(tmp, self._path(key))
                    return None
                except FileExistsError:
                    existing = self.lookup(key)
                    if existing is not None:
                        return existing
                    with contextlib.suppress(FileNotFoundError):
                        self._path(key).unlink()  # expired or unreadable
            raise ApiError(409, "IdempotencyConflict", "Idempotency-Key is being reused")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def forget(self, key: str, request_id: str) -> None:
        record = self.lookup(key)
        if record is not None and record.get("request_id") == request_id:
            with contextlib.suppress(FileNotFoundError):
                self._path(key).unlink()

    def _sweep(self) -> None:
        with self._lock:
            if time.monotonic() - self._swept < 3600 and self._swept:
                return
            self._swept = time.monotonic()
        cutoff = time.time() - IDEMPOTENCY_TTL
        with os.scandir(self.folder) as it:
            for entry in it:
                with contextlib.suppress(OSError):
                    if entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)


# -- request parsing ------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "RequestTooLarge", f"request body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "RequestTooLarge", f"request body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_ids(body: bytes, max_ids: int) -> list[str]:
    """The ids of a request body, duplicates dropped (first kept); ApiError 400 if malformed."""

    def bad(message: str) -> ApiError:
        return ApiError(400, "InvalidRequest", message)

    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise bad('request body is not JSON; send {"ids": ["...", ...]}') from None
    if not isinstance(data, dict):
        raise bad('request body must be a JSON object {"ids": ["...", ...]}')
    if "ids" not in data:
        raise bad("field 'ids' is missing")
    ids = data["ids"]
    if not isinstance(ids, list):
        raise bad("field 'ids' must be a list of strings")
    if not ids:
        raise bad("field 'ids' is empty")
    if len(ids) > max_ids:
        raise bad(f"too many ids: {len(ids)}, at most {max_ids} per request")
    for i, file_id in enumerate(ids):
        if not isinstance(file_id, str) or not file_id:
            raise bad(f"ids[{i}] is not a non-empty string")
    return list(dict.fromkeys(ids))


def request_name(raw: str | None) -> str:
    """The job name of a request id: its canonical lower-case UUID form; 400 if not a UUID."""
    if not raw:
        raise ApiError(400, "InvalidRequestId", "the request id is missing (?id=<uuid>)")
    try:
        return str(uuid.UUID(raw.strip()))
    except ValueError:
        raise ApiError(400, "InvalidRequestId", f"not a UUID: {raw[:100]!r}") from None


# -- the routes -----------------------------------------------------------------------------


class StagingApi:
    def __init__(self, cfg: Config, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        self.resolver = Resolver(cfg.archive, cfg.catalog) if cfg.archive is not None else None
        self.keys = Idempotency(store.service_path("idempotency"))

    def enabled(self) -> Resolver:
        if self.resolver is None or self.cfg.staging is None:
            raise ApiError(
                503,
                "StagingNotConfigured",
                "staging is not configured: start the service with --archive and --staging",
            )
        return self.resolver

    async def create(self, request: Request) -> JSONResponse:
        self.enabled()
        body = await read_body(request, self.body_limit)
        ids = parse_ids(body, self.cfg.staging_max_ids)
        key = request.headers.get("idempotency-key")
        fingerprint = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
        if key is not None:
            if not key or len(key) > MAX_KEY:
                raise ApiError(
                    400, "InvalidRequest", f"Idempotency-Key must be 1-{MAX_KEY} characters"
                )
            existing = await run_in_threadpool(self.keys.lookup, key)
            if existing is not None:
                return self._replay(existing, fingerprint)
        details = requester_details(request)
        request_id, replayed = await self.submit(ids, details, key, fingerprint)
        if replayed is not None:
            return self._replay(replayed, fingerprint)
        return JSONResponse(
            {"request_id": request_id},
            status_code=201,
            headers={"Location": f"/dts/staging/{request_id}"},
        )

    @property
    def body_limit(self) -> int:
        return max(1 << 20, self.cfg.staging_max_ids * BYTES_PER_ID)

    async def submit(
        self,
        ids: list[str],
        details: dict[str, Any],
        key: str | None = None,
        fingerprint: str = "",
        before_job: Callable[[str], None] | None = None,
    ) -> tuple[str, dict[str, Any] | None]:
        """Resolve ids and create the queued staging job; (request id, replayed record).

        ApiError 400 / 404 (naming the ids) when any id is invalid or unresolved: then
        nothing is created. before_job runs with the new request id before its job is
        made (in a thread), so a durable alias can never point at a job not yet asked for.
        """
        resolver = self.enabled()
        try:
            entries, invalid, unresolved = await run_in_threadpool(resolver.resolve, ids)
        except StagingError as e:
            log.error("%s", e)
            raise ApiError(503, "CatalogUnavailable", str(e)) from None
        if invalid:
            raise ApiError(
                400,
                "InvalidId",
                f"{len(invalid)} ids are not valid archive paths (relative, no "
                "'..', no hidden or empty segments)",
                extra={"invalid": invalid},
            )
        if unresolved:
            raise ApiError(
                404,
                "FilesNotFound",
                f"{len(unresolved)} of {len(ids)} ids name no file in the archive",
                extra={"unresolved": unresolved},
            )
        request_id = str(uuid.uuid4())
        if key is not None:
            existing = await run_in_threadpool(self.keys.claim, key, request_id, fingerprint)
            if existing is not None:
                return str(existing.get("request_id")), existing
        try:
            if before_job is not None:
                await run_in_threadpool(before_job, request_id)
            await run_in_threadpool(self._make_job, request_id, entries, details)
        except OSError as e:
            if key is not None:
                await run_in_threadpool(self.keys.forget, key, request_id)
            log.error("staging request %s: cannot create its job: %s", request_id, e)
            raise ApiError(
                500, "StagingRequestFailed", f"cannot create the staging job: {e.strerror or e}"
            ) from None
        metrics.staging_request("accepted")
        log.info(
            "staging request %s: %d files, %d bytes%s",
            request_id,
            len(entries),
            sum(e.size for e in entries),
            f", requested by {details['requester']}" if "requester" in details else "",
        )
        return request_id, None

    def _replay(self, record: dict[str, Any], fingerprint: str) -> JSONResponse:
        if record.get("body_sha256") not in (None, fingerprint):
            raise ApiError(
                422,
                "IdempotencyKeyReused",
                "this Idempotency-Key was used for a request with other ids",
            )
        request_id = str(record.get("request_id"))
        return JSONResponse(
            {"request_id": request_id},
            status_code=201,
            headers={"Location": f"/dts/staging/{request_id}", "Idempotent-Replayed": "true"},
        )

    def _make_job(self, name: str, entries: list[Entry], details: dict[str, Any]) -> None:
        assert self.cfg.archive is not None and self.cfg.staging is not None
        job, created = self.store.create(name)
        if not created:  # a UUID4 collision: never touch someone else's job
            raise OSError(f"job {name} exists")
        try:
            jobfile.write_atomic(
                job.path / MANIFEST,
                manifest_bytes(entries, self.cfg.archive, self.cfg.staging, name, details),
            )
            progress = Progress(files_total=len(entries), bytes_total=sum(e.size for e in entries))
            write_progress(job.path, progress, durable=True)
            jobfile.save(job.path, jobfile.JobFile(todo=["stage"]))
            self.store.queue(name)
        except BaseException:
            with contextlib.suppress(Exception):
                self.store.delete(name)
            raise

    async def get(self, request: Request) -> JSONResponse:
        return self._status(request.query_params.get("id"))

    async def get_path(self, request: Request) -> JSONResponse:
        return self._status(request.path_params.get("id"))

    def _status(self, raw: str | None) -> JSONResponse:
        # Small reads only (a few stats, one small file), so it runs on the loop directly.
        self.enabled()
        name = request_name(raw)
        found = status_document(self.store, name)
        if found is None:
            raise ApiError(404, "StagingRequestNotFound", f"no staging request {name}")
        return JSONResponse(found[1])


def requester_details(request: Request) -> dict[str, Any]:
    """Who asked, when a DTS client proved it with the shared secret (see auth.py)."""
    user = request.scope.get(REQUESTER)
    return {"requester": user} if user else {}


def status_document(store: Store, name: str) -> tuple[str, dict[str, Any]] | None:
    """(state, status document) of the staging request name; None if there is none."""
    try:
        found = store.read(name, _status_of)
    except JobBusy as e:
        raise ApiError(409, "JobBusy", str(e)) from None
    if found is None or found[1] is None:
        return None
    return found[0].state, found[1]


def _status_of(job: Job) -> dict[str, Any] | None:
    """The status document of a staging job; None for a job that is not one."""
    if not (job.path / MANIFEST).is_file():
        return None
    return status(job.path, job.state)


def routes(cfg: Config, store: Store) -> list[BaseRoute]:
    api = StagingApi(cfg, store)
    extra: list[BaseRoute] = []
    if cfg.dts_dialect == "jdp":
        from batchingest.api import jdp

        extra = jdp.routes(api, store)
    return [
        *extra,
        Route("/dts/staging", api.create, methods=["POST"]),
        Route("/dts/staging", api.get, methods=["GET"]),
        Route("/dts/staging/{id}", api.get_path, methods=["GET"]),
    ]


_STATUS_SCHEMA = {
    "type": "object",
    "required": ["status", "files_total", "files_staged", "bytes_total", "bytes_staged"],
    "properties": {
        "status": {"type": "string", "enum": ["staging", "ready", "failed"]},
        "files_total": {"type": "integer"},
        "files_staged": {"type": "integer"},
        "bytes_total": {"type": "integer"},
        "bytes_staged": {"type": "integer"},
        "message": {"type": "string", "description": "why it failed (only when failed)"},
    },
}
_ERROR = {"description": "error", "content": {"application/json": {"schema": {"type": "object"}}}}
_STATUS_RESPONSES = {
    "200": {
        "description": "status of the staging request",
        "content": {"application/json": {"schema": _STATUS_SCHEMA}},
    },
    "400": {**_ERROR, "description": "id missing or not a UUID"},
    "404": {**_ERROR, "description": "no such staging request"},
    "503": {**_ERROR, "description": "staging is not configured"},
}
_ID_PARAM = {"required": True, "schema": {"type": "string", "format": "uuid"}}

OPENAPI_PATHS: dict[str, Any] = {
    "/dts/staging": {
        "post": {
            "summary": "Ask for files to be copied from the archive into the staging area",
            "parameters": [
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "maxLength": MAX_KEY},
                }
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["ids"],
                            "properties": {
                                "ids": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {"type": "string", "minLength": 1},
                                }
                            },
                        }
                    }
                },
            },
            "responses": {
                "201": {
                    "description": "staging job created and queued",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {"request_id": {"type": "string", "format": "uuid"}},
                            }
                        }
                    },
                },
                "400": {**_ERROR, "description": "malformed body or invalid ids"},
                "404": {**_ERROR, "description": "ids that name no file (listed in 'unresolved')"},
                "413": {**_ERROR, "description": "body too large"},
                "422": {**_ERROR, "description": "Idempotency-Key reused with other ids"},
                "503": {**_ERROR, "description": "staging is not configured"},
            },
        },
        "get": {
            "summary": "Status of a staging request",
            "parameters": [{"name": "id", "in": "query", **_ID_PARAM}],
            "responses": _STATUS_RESPONSES,
        },
    },
    "/dts/staging/{id}": {
        "get": {
            "summary": "Status of a staging request",
            "parameters": [{"name": "id", "in": "path", **_ID_PARAM}],
            "responses": _STATUS_RESPONSES,
        },
    },
}
