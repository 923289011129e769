"""Staccato's v1 REST API at /v1/transfers: byte ranges of local files, as transfer jobs.

A transfer is a job (batchingest.transfers, kind `staccato`) named by a UUID4, run by the
built-in transfer task, which copies [start_offset, end_offset) of the source into the
same offsets of the destination and records `progress` (bytes flushed to disk) as it
goes, so a restart resumes where it stopped. URLs are `file://` URLs of paths inside an
endpoint folder; one that leads outside every endpoint (by `..` or through a symbolic
link) is a 403, a malformed one or another scheme a 400.

States come from the job: NEW (queued), RUNNING (processing), CANCELING (a cancel
request waits), CANCELED, ERRORING (the task reported an error and is ending), ERROR,
COMPLETE, DELETED (deleted by its client: still answered by id, no longer listed).
"""

from __future__ import annotations

import os
import re
import stat
import time
import uuid
from typing import Any
from urllib.parse import unquote, urlsplit

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from batchingest import endpoints, fs, transfers
from batchingest.api import models
from batchingest.api.common import by_method, model_response, read_body, run_blocking
from batchingest.api.errors import ApiError
from batchingest.api.openapi import Op, answer, links, param, paths, with_links
from batchingest.config import Config
from batchingest.endpoints import Endpoint, Endpoints, PathError
from batchingest.store import State, Store

MAX_BODY = 64 << 10
LIST_LIMIT = 1000
# legal actions, by state
CANCELABLE = ("STATE_NEW", "STATE_RUNNING")
DELETABLE = ("STATE_COMPLETE", "STATE_CANCELED", "STATE_ERROR")


def bad(message: str) -> ApiError:
    return ApiError(400, "InvalidRequest", message)


def unsatisfiable(message: str) -> ApiError:
    """A well-formed range the source cannot give (no schema can say so): as for a Range."""
    return ApiError(416, "RangeNotSatisfiable", message)


def outside(message: str) -> ApiError:
    return ApiError(403, "OutsideEndpoints", message)


def state_of(snap: transfers.Snapshot) -> models.TransferState:
    if snap.deleted:
        return "STATE_DELETED"
    state = snap.job.state
    fatal = snap.fatal
    if state == State.SUCCESS:
        return "STATE_COMPLETE"
    if state in (State.ERROR, State.DATA) and fatal is not None:
        return "STATE_CANCELED" if fatal["code"] != "FAILED" else "STATE_ERROR"
    if snap.cancel:
        return "STATE_CANCELING" if state in (State.QUEUE, State.PROCESSING) else "STATE_CANCELED"
    if state == State.PROCESSING:
        return "STATE_ERRORING" if snap.progress.get("fatal_error") else "STATE_RUNNING"
    return "STATE_NEW"


def document(snap: transfers.Snapshot) -> models.Transfer:
    req = snap.request
    return models.Transfer(
        id=snap.job.name,
        source_url=req.get("source_url") or "",
        destination_url=req.get("destination_url") or "",
        state=state_of(snap),
        progress=int(snap.progress.get("progress") or 0),
        start_offset=int(req.get("start_offset") or 0),
        end_offset=int(req.get("end_offset", -1)),
        source_options=req.get("source_options") or {},
        destination_options=req.get("destination_options") or {},
    )


def file_path(url: Any, what: str) -> str:
    """The local path of a file:// URL; 400 for anything else."""
    if not isinstance(url, str) or not url:
        raise bad(f"{what} must be a file:// URL")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise bad(f"{what} is not a URL: {url[:200]!r}") from None
    if parts.scheme.lower() != "file":
        raise bad(f"{what}: only file:// URLs are served, not {parts.scheme or 'none'!r}")
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise bad(f"{what}: a file URL names a path on this machine only: {url[:200]!r}")
    path = unquote(parts.path, errors="strict") if "%" in parts.path else parts.path
    if not path.startswith("/") or "\x00" in path or "\\" in path:
        raise bad(f"{what}: not an absolute path without NUL or backslash: {url[:200]!r}")
    return path


def locate(registry: Endpoints, path: str, what: str) -> tuple[Endpoint, list[str]]:
    if any(part in (".", "..") for part in path.split("/")):
        raise outside(f"{what}: '.' and '..' are never resolved: {path[:200]!r}")
    try:
        found = registry.locate(path)
    except PathError as e:
        raise bad(f"{what}: {e.message}") from None
    if found is None or not found[1]:
        raise outside(f"{what}: {path[:200]!r} is not a file inside an endpoint folder")
    return found


def check_source(ep: Endpoint, parts: list[str]) -> int:
    """The source's size; 403 if a link is on the way, 404 if it is not a regular file."""
    root = fs.open_root(ep.path)
    try:
        fd = fs.open_regular(root, "/".join(parts))
    except fs.UnsafePath as e:
        raise outside(f"source: a symbolic link on the way leads out ({e.strerror})") from None
    except (fs.NotRegular, FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise ApiError(404, "SourceNotFound", "source: no such regular file") from None
    finally:
        os.close(root)
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def check_destination(ep: Endpoint, parts: list[str]) -> None:
    """403 if a link (or a non-folder) is on the destination's way, or it is read-only."""
    if ep.read_only:
        raise outside(f"destination: endpoint {ep.name!r} is read-only")
    root = fs.open_root(ep.path)
    try:
        for depth in range(1, len(parts) + 1):
            st = fs.lstat(root, "/".join(parts[:depth]))
            if st is None:
                return  # created by the task, beneath the endpoint folder
            last = depth == len(parts)
            if stat.S_ISLNK(st.st_mode):
                raise outside("destination: a symbolic link is in the way (never followed)")
            if not last and not stat.S_ISDIR(st.st_mode):
                raise bad("destination: a part of the path is not a folder")
            if last and not stat.S_ISREG(st.st_mode):
                raise bad("destination: exists and is not a regular file")
    except fs.UnsafePath:
        raise outside("destination: a symbolic link is in the way (never followed)") from None
    finally:
        os.close(root)


class StaccatoApi:
    def __init__(self, cfg: Config, store: Store) -> None:
        self.registry = Endpoints.from_config(cfg)
        self.store = store
        self.requests = transfers.Requests(store)

    def configured(self) -> None:
        if not len(self.registry):
            raise ApiError(503, "EndpointsNotConfigured", endpoints.NOT_CONFIGURED)

    async def create(self, request: Request) -> Response:
        self.configured()
        body = models.decode(models.TransferRequest, await _body(request))
        src_ep, src = locate(self.registry, file_path(body.source_url, "source_url"), "source_url")
        dst_ep, dst = locate(self.registry, file_path(body.destination_url, "destination_url"),
                             "destination_url")  # fmt: skip
        start = body.start_offset or 0
        end = -1 if body.end_offset is None else body.end_offset
        if end != -1 and start > end:
            raise unsatisfiable(f"start_offset {start} is after end_offset {end}")
        size = await run_blocking(check_source, src_ep, src)
        if start > size:
            raise unsatisfiable(f"start_offset {start} is beyond the source's size ({size} bytes)")
        await run_blocking(check_destination, dst_ep, dst)
        name = str(uuid.uuid4())
        req = {
            "kind": "staccato", "id": name, "request_time": transfers.now_text(),
            "created_ns": time.time_ns(),  # the list's order
            "source_url": body.source_url, "destination_url": body.destination_url,
            "source_endpoint": src_ep.name, "destination_endpoint": dst_ep.name,
            "source_parts": src, "destination_parts": dst,
            "start_offset": start, "end_offset": end,
            "source_options": body.source_options or {},
            "destination_options": body.destination_options or {},
        }  # fmt: skip
        await run_blocking(transfers.create, self.store, name, req, None)
        snap = await run_blocking(transfers.snapshot, self.store, name)
        assert snap is not None
        return model_response(document(snap), 201, {"Location": f"/v1/transfers/{name}"})

    async def find(self, request: Request) -> transfers.Snapshot:
        self.configured()
        raw = request.path_params["id"]
        try:
            name = str(uuid.UUID(raw))
        except ValueError:
            raise ApiError(404, "TransferNotFound", f"no transfer {raw[:100]!r}") from None
        snap = await run_blocking(transfers.snapshot, self.store, name)
        if snap is None or snap.request.get("kind") != "staccato":
            raise ApiError(404, "TransferNotFound", f"no transfer {name}")
        return snap

    async def get(self, request: Request) -> Response:
        return model_response(document(await self.find(request)))

    async def action(self, request: Request) -> Response:
        snap = await self.find(request)
        models.decode(models.TransferAction, await _body(request))  # the one action: cancel
        state = state_of(snap)
        if state not in CANCELABLE:
            raise ApiError(400, "IllegalTransition", f"cannot cancel a transfer in {state}")
        await run_blocking(transfers.request_cancel, self.store, snap.job.name)
        now = await run_blocking(transfers.snapshot, self.store, snap.job.name)
        return model_response(document(now or snap), 202)

    async def delete(self, request: Request) -> Response:
        snap = await self.find(request)
        state = state_of(snap)
        if state not in DELETABLE:
            raise ApiError(400, "IllegalTransition", f"cannot delete a transfer in {state}")
        await run_blocking(transfers.mark_deleted, self.store, snap.job)
        return Response(status_code=204)

    async def listing(self, request: Request) -> Response:
        self.configured()
        raw = request.query_params.get("limit", "100")
        if not raw.isdigit() or not 1 <= int(raw) <= LIST_LIMIT:
            raise bad(f"limit must be from 1 to {LIST_LIMIT}")
        after = request.query_params.get("next") or ""
        docs, more = await run_blocking(self._page, int(raw), after)
        headers = {}
        if more:
            headers["Link"] = f'</v1/transfers?limit={raw}&next={docs[-1].id}>; rel="next"'
        return model_response(docs, 200, headers)

    def _page(self, limit: int, after: str) -> tuple[list[models.Transfer], bool]:
        """Transfers in creation order after the one named `after`, deleted ones left out."""
        rows = sorted((int(req.get("created_ns") or 0), name, req)
                      for name, _, req in self.requests.listing()
                      if req.get("kind") == "staccato")  # fmt: skip
        start = 0
        if after:
            names = [name for _, name, _ in rows]
            if after not in names:
                if not re.fullmatch(models.UUID_PATTERN, after):
                    raise bad(f"next: not a transfer id: {after[:100]!r}")
                raise ApiError(404, "TransferNotFound", f"next: no transfer {after}")
            start = names.index(after) + 1
        docs: list[models.Transfer] = []
        for _, name, req in rows[start:]:
            snap = transfers.snapshot(self.store, name, req)
            if snap is None or snap.deleted:
                continue
            if len(docs) == limit:
                return docs, True
            docs.append(document(snap))
        return docs, False


async def _body(request: Request) -> bytes:
    return await read_body(request, MAX_BODY, "PayloadTooLarge")


def routes(cfg: Config, store: Store) -> list[BaseRoute]:
    api = StaccatoApi(cfg, store)
    return [
        by_method("/v1/transfers", {"GET": api.listing, "POST": api.create}),
        by_method("/v1/transfers/{id}", {"GET": api.get, "DELETE": api.delete}),
        by_method("/v1/transfers/{id}/action", {"POST": api.action}),
    ]


_ID = param("id", "path", "a transfer id", {"type": "string", "pattern": models.UUID_PATTERN})
_CONFIG = ("EndpointsNotConfigured",)
_FOUND = ("TransferNotFound", *_CONFIG)
_BY_ID = links(("getTransfer", "headTransfer", "deleteTransfer", "actOnTransfer"), "id", "id")
_LIST = (
    param("limit", "query", "at most this many (default 100)",
          {"type": "integer", "minimum": 1, "maximum": LIST_LIMIT}),
    param("next", "query", "the id of the last transfer of the page before",
          {"type": "string", "pattern": f"^({models.UUID_PATTERN[1:-1]})?$"}),
)  # fmt: skip
_LISTED = {
    **answer({"type": "array", "items": models.ref(models.Transfer)}, "transfers"),
    "headers": {"Link": {"schema": {"type": "string"}, "description": '<...>; rel="next"'}},
}
OPS = (
    Op("get", "/v1/transfers", "listTransfers", "staccato",
       "transfers in creation order, deleted ones left out", {"200": _LISTED},
       ("InvalidRequest", "TransferNotFound", *_CONFIG), _LIST),
    Op("post", "/v1/transfers", "createTransfer", "staccato",
       "copy a byte range between file:// URLs in endpoint folders, as a job",
       {"201": with_links(models.Transfer, "created", _BY_ID)},
       ("InvalidRequest", "OutsideEndpoints", "SourceNotFound", "PayloadTooLarge",
        "RangeNotSatisfiable", *_CONFIG),
       (), models.TransferRequest),
    Op("get", "/v1/transfers/{id}", "getTransfer", "staccato", "one transfer",
       {"200": models.Transfer}, _FOUND, (_ID,)),
    Op("delete", "/v1/transfers/{id}", "deleteTransfer", "staccato",
       "delete a completed, canceled or failed transfer (it is still answered by id)",
       {"204": {"description": "deleted"}}, ("IllegalTransition", *_FOUND), (_ID,)),
    Op("post", "/v1/transfers/{id}/action", "actOnTransfer", "staccato",
       "cancel a new or running transfer", {"202": models.Transfer},
       ("InvalidRequest", "IllegalTransition", "PayloadTooLarge", *_FOUND), (_ID,),
       models.TransferAction),
)  # fmt: skip
OPENAPI_PATHS = paths(OPS)
