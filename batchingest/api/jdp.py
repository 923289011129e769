"""The JGI Data Portal staging dialect, as the DTS's own JDP adapter speaks it.

The DTS (github.com/kbase/dts) stages files through one HTTP client only, its JDP
adapter, so a DTS deployment can use this service for staging only in that dialect
(`--dts-dialect jdp`):

    POST /request_archived_files/            {"ids": [...], "send_email": false, ...}
        -> 201 {"request_id": 17}            an integer: a string fails the DTS's decoding
    GET  /request_archived_files/requests/17 (no credentials: the DTS sends none)
        -> 200 {"status": "new" | "pending" | "ready"}

Each request is the same staging job `POST /dts/staging` makes; the integer is an alias
of its UUID, kept in a durable counter folder of the root and never reused. The JDP
words: `new` while the job waits (created, queued, not yet claimed), `pending` while
the stage task runs, `ready` when every file is in place. A failed job has no JDP word:
it answers `{"status": "failed", "message": ...}`, the word of the documented DTS
contract; today's DTS logs that as an error and keeps polling, so operators watch
failures through the job (its LOG, webhooks).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import uuid
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from batchingest import fs
from batchingest.api.common import json_response, read_body, run_blocking
from batchingest.api.errors import ApiError
from batchingest.api.staging import StagingApi, parse_ids, requester_details
from batchingest.store import Store

# The JDP words for a staging job's folder; error/ has none (see the module docstring).
JDP_STATUS = {"data": "new", "queue": "new", "processing": "pending", "success": "ready"}
# Request numbers are decimal file names; 18 digits keep them within a signed 64-bit int.
MAX_DIGITS = 18


class RequestNumbers:
    """Integer request ids, one tiny file per number holding the staging request's UUID.

    A number is taken with link(2) of a finished (fsync-ed) file, which never replaces:
    two API processes (or hosts) racing for one number agree on a winner, and the loser
    takes the next. Files are never removed, so a number is never reused.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._last: int | None = None
        self._lock = threading.Lock()

    def _highest(self, dir_fd: int) -> int:
        highest = 0
        for entry in fs.entries(dir_fd):
            if entry.name.isdigit() and len(entry.name) <= MAX_DIGITS:
                highest = max(highest, int(entry.name))
        return highest

    def allocate(self, request_id: str) -> int:
        """A new number for request_id, durable before it is returned."""
        self.folder.mkdir(exist_ok=True)
        dir_fd = fs.open_root(self.folder)
        try:
            tmp = fs.temp_name("request")
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=dir_fd
            )
            try:
                fs.write_all(fd, f"{request_id}\n".encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                with self._lock:
                    if self._last is None:
                        self._last = self._highest(dir_fd)
                    number = self._last + 1
                    while True:
                        try:
                            os.link(tmp, str(number), src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                            break
                        except FileExistsError:
                            number += 1  # another process took it
                    self._last = number
                os.fsync(dir_fd)  # the name itself survives a crash before we answer
                return number
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)

    def lookup(self, number: int) -> str | None:
        """The staging request (UUID) behind a number; None if there is none."""
        try:
            dir_fd = fs.open_root(self.folder)
        except FileNotFoundError:
            return None
        try:
            raw = fs.read_file(dir_fd, str(number), 64)
        except OSError:
            return None
        finally:
            os.close(dir_fd)
        if raw is None:
            return None
        try:
            return str(uuid.UUID(raw.decode("ascii").strip()))
        except (UnicodeDecodeError, ValueError):
            return None


def request_number(raw: str) -> int:
    if not raw.isascii() or not raw.isdigit() or len(raw) > MAX_DIGITS:
        raise ApiError(400, "InvalidRequestId", f"not a request number: {raw[:100]!r}")
    return int(raw)


def routes(staging: StagingApi, store: Store) -> list[BaseRoute]:
    numbers = RequestNumbers(store.service_path("jdp-requests"))

    async def create(request: Request) -> Response:
        staging.enabled()
        body = await read_body(request, staging.body_limit)
        ids = parse_ids(body, staging.cfg.staging_max_ids)
        details = requester_details(request)
        extra = _extra_fields(body)
        if extra:
            details["body"] = extra  # send_email, api_version, ...: kept for the record
        taken: list[int] = []

        def number_it(request_id: str) -> None:
            taken.append(numbers.allocate(request_id))

        await staging.submit(ids, details, before_job=number_it)
        return json_response(
            {"request_id": taken[0]},
            201,
            {"Location": f"/request_archived_files/requests/{taken[0]}"},
        )

    async def get(request: Request) -> Response:
        staging.enabled()
        number = request_number(request.path_params["n"])
        name = await run_blocking(numbers.lookup, number)
        document = None if name is None else await run_blocking(staging.status_document, name)
        if document is None:
            raise ApiError(404, "StagingRequestNotFound", f"no staging request {number}")
        state, doc = document
        word = JDP_STATUS.get(state)
        if word is None:
            return json_response({"status": "failed", "message": doc.get("message", "")})
        return json_response({"status": word})

    return [
        Route("/request_archived_files/", create, methods=["POST"]),
        Route("/request_archived_files/requests/{n}", get, methods=["GET"]),
    ]


def _extra_fields(body: bytes) -> dict[str, Any]:
    """The body's fields other than ids (parse_ids has already checked it is JSON)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # a number json will not convert (4300+ digits)
        return {}
    return {k: v for k, v in data.items() if k != "ids"} if isinstance(data, dict) else {}
