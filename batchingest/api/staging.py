"""The DTS staging endpoints: POST /dts/staging, GET /dts/staging?id=, GET /dts/staging/{id}.

A request becomes an ordinary job named by a UUID4 with a manifest and `{"Todo": ["stage"]}`,
so it is queued, processed, logged, retried and webhooked like every other job. The
status endpoint reads the job's state (its folder) and its small progress file only.
Their OpenAPI description is in openapi.py, with the rest of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from batchingest import events, fs, jobfile, metrics
from batchingest.api import models
from batchingest.api.auth import REQUESTER
from batchingest.api.common import by_method, json_response, read_body, run_blocking
from batchingest.api.errors import ApiError
from batchingest.api.idempotency import Idempotency, KeyContested
from batchingest.config import Config
from batchingest.staging import (
    MANIFEST,
    ArchiveUnavailable,
    Entry,
    Progress,
    Resolver,
    StagingError,
    body_limit,
    is_staging_job,
    manifest_bytes,
    status,
    write_progress,
)
from batchingest.store import Job, JobBusy, Store

log = logging.getLogger("batchingest.api.staging")

MAX_KEY = 255


# -- request parsing ------------------------------------------------------------------------


def parse_ids(body: bytes, max_ids: int) -> list[str]:
    """The ids of a request body, duplicates dropped (first kept); ApiError 400 if malformed.

    The shape is models.StagingRequest's, the one /openapi.json shows; the limit on the
    number of ids is the service's setting, so it is checked here.
    """
    try:
        ids = models.decode(models.StagingRequest, body).ids
    except RecursionError:  # arrays or objects nested thousands deep
        raise ApiError(400, "InvalidRequest", "request body is nested too deeply") from None
    if len(ids) > max_ids:
        raise ApiError(
            400, "InvalidRequest", f"too many ids: {len(ids)}, at most {max_ids} per request"
        )
    return list(dict.fromkeys(ids))


def request_name(raw: str | None) -> str:
    """The job name of a request id: its canonical lower-case UUID form; 400 if not a UUID."""
    if not raw:
        raise ApiError(400, "InvalidRequestId", "the request id is missing (?id=<uuid>)")
    try:
        return str(uuid.UUID(raw.strip()))
    except ValueError:
        raise ApiError(400, "InvalidRequestId", f"not a UUID: {raw[:100]!r}") from None


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and (not key or len(key) > MAX_KEY):
        raise ApiError(400, "InvalidRequest", f"Idempotency-Key must be 1-{MAX_KEY} characters")
    return key


def resolve(resolver: Resolver, ids: list[str]) -> list[Entry]:
    """The manifest entries of ids; ApiError unless every id names a file."""
    try:
        entries, invalid, unresolved = resolver.resolve(ids)
    except ArchiveUnavailable as e:
        log.error("%s", e)  # where and why, for the operator; the client learns no path
        raise ApiError(
            503, "ArchiveUnavailable", "the archive cannot be looked in now; try again later"
        ) from None
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
    return entries


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

    async def create(self, request: Request) -> Response:
        self.enabled()
        body = await read_body(request, self.body_limit)
        ids = parse_ids(body, self.cfg.staging_max_ids)
        key = idempotency_key(request)
        fingerprint = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
        if key is not None:
            existing = await run_blocking(self.keys.lookup, key)
            if existing is not None:
                return self._replay(existing, fingerprint)
        request_id, replayed = await self.submit(ids, requester_details(request), key, fingerprint)
        if replayed is not None:
            return self._replay(replayed, fingerprint)
        return json_response(
            {"request_id": request_id},
            201,
            {"Location": f"/dts/staging/{request_id}"},
        )

    @property
    def body_limit(self) -> int:
        return body_limit(self.cfg.staging_max_ids)

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
            entries = await run_blocking(resolve, resolver, ids)
        except ApiError:
            metrics.staging_request("rejected")  # invalid or unknown ids: nothing made
            raise
        request_id = str(uuid.uuid4())
        if key is not None:
            try:
                existing = await run_blocking(self.keys.claim, key, request_id, fingerprint)
            except KeyContested:
                raise ApiError(
                    409, "IdempotencyConflict", "Idempotency-Key is being reused"
                ) from None
            if existing is not None:
                return str(existing.get("request_id")), existing
        try:
            if before_job is not None:
                await run_blocking(before_job, request_id)
            await run_blocking(self._make_job, request_id, entries, details)
        except OSError as e:
            if key is not None:
                await run_blocking(self.keys.forget, key, request_id)
            metrics.staging_request("failed")
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

    def _replay(self, record: dict[str, Any], fingerprint: str) -> Response:
        if record.get("body_sha256") not in (None, fingerprint):
            raise ApiError(
                422,
                "IdempotencyKeyReused",
                "this Idempotency-Key was used for a request with other ids",
            )
        metrics.staging_request("replayed")
        request_id = str(record.get("request_id"))
        return json_response(
            {"request_id": request_id},
            201,
            {"Location": f"/dts/staging/{request_id}", "Idempotent-Replayed": "true"},
        )

    def _make_job(self, name: str, entries: list[Entry], details: dict[str, Any]) -> None:
        assert self.cfg.archive is not None and self.cfg.staging is not None
        job, created = self.store.create(name)
        if not created:  # a UUID4 collision: never touch someone else's job
            raise OSError(f"job {name} exists")
        try:
            manifest = manifest_bytes(entries, self.cfg.archive, self.cfg.staging, name, details)
            progress = Progress(files_total=len(entries), bytes_total=sum(e.size for e in entries))
            job_fd = self.store.open_job(job)
            try:
                fs.write_atomic(job_fd, MANIFEST, manifest)
                write_progress(job_fd, progress, durable=True)
            finally:
                os.close(job_fd)
            jobfile.save(job.path, jobfile.JobFile(todo=["stage"]))
            # in the history too: who asked (the DTS's user) and for how many files
            events.created(self.store, job, {"staging_files": len(entries), **details})
            events.queue(self.store, name)
        except BaseException:
            with contextlib.suppress(Exception):
                self.store.delete(name)
            raise

    async def get(self, request: Request) -> Response:
        return self._status(request.query_params.get("id"))

    async def get_path(self, request: Request) -> Response:
        return self._status(request.path_params.get("id"))

    def _status(self, raw: str | None) -> Response:
        # Small bounded reads only (a few stats, one small file): on the loop directly.
        self.enabled()
        name = request_name(raw)
        found = self.status_document(name)
        if found is None:
            raise ApiError(404, "StagingRequestNotFound", f"no staging request {name}")
        return json_response(found[1])

    def status_document(self, name: str) -> tuple[str, dict[str, Any]] | None:
        """(state, status document) of the staging request name; None if there is none."""
        try:
            found = self.store.read(name, self._status_of)
        except JobBusy as e:
            raise ApiError(409, "JobBusy", str(e)) from None
        if found is None or found[1] is None:
            return None
        return found[0].state, found[1]

    def _status_of(self, job: Job) -> dict[str, Any] | None:
        """The status document of a staging job; None for a job that is not one.

        Its files are user input: read through the folder's descriptor, bounded, and
        never following a link, so a FIFO or a huge PROGRESS.json cannot stall the loop.
        """
        try:
            job_fd = self.store.open_job(job)
        except OSError:
            return None  # moved on meanwhile: Store.read looks again
        try:
            return status(job_fd, job.state) if is_staging_job(job_fd) else None
        finally:
            os.close(job_fd)


def requester_details(request: Request) -> dict[str, Any]:
    """Who asked, when a DTS client proved it with the shared secret (see auth.py)."""
    user = request.scope.get(REQUESTER)
    return {"requester": user} if user else {}


def routes(cfg: Config, store: Store) -> list[BaseRoute]:
    api = StagingApi(cfg, store)
    extra: list[BaseRoute] = []
    if cfg.dts_dialect == "jdp":
        from batchingest.api import jdp

        extra = jdp.routes(api, store)
    return [
        *extra,
        # one route for the path, so that a 405 lists both methods in Allow
        by_method("/dts/staging", {"POST": api.create, "GET": api.get}),
        Route("/dts/staging/{id}", api.get_path, methods=["GET"]),
    ]
