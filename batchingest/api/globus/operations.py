"""Endpoints, directory operations, submission ids and activation of the Globus API."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from batchingest import endpoints
from batchingest.api import models as api_models
from batchingest.api.common import json_response, read_body, run_blocking
from batchingest.api.errors import ApiError
from batchingest.api.globus import documents, models, query, unsupported
from batchingest.endpoints import Endpoint, Endpoints, Item, PathError

log = logging.getLogger("batchingest.api.globus")
Handler = Callable[[Request], Awaitable[Response]]
T = TypeVar("T")

MAX_BODY = 64 << 10
LS_LIMIT = 100_000  # Globus's default and largest ls page
SEARCH_LIMIT = 100
SEARCH_MAX = 1000  # Globus's endpoint_search never goes past 1000 results
# filter_scope values: those naming every endpoint here, and those naming none (no
# shares, no Globus Connect Personal here); anything else is refused.
SCOPES_ALL = ("all", "my-endpoints", "administered-by-me", "recently-used", "in-use")
SCOPES_NONE = ("my-gcp-endpoints", "shared-by-me", "shared-with-me", "hosted-by-endpoint")
# Globus's failure names per operation: ExternalError.<name>.<reason>
_FAILED = {"ls": "DirListingFailed", "stat": "StatFailed", "mkdir": "MkdirFailed",
           "rename": "RenameFailed"}  # fmt: skip


def path_error(op: str, e: PathError) -> ApiError:
    """The Globus error for a failed file operation (never a 500)."""
    if e.kind in ("invalid", "link"):
        return ApiError(400, "ClientError.BadRequest", e.message)
    if e.kind == "missing":
        return ApiError(404, "ClientError.NotFound", e.message)
    failed = f"ExternalError.{_FAILED[op]}"
    reason = {"exists": "Exists", "not-dir": "NotDirectory", "read-only": "PermissionDenied"}
    if e.kind in reason:
        return ApiError(502, f"{failed}.{reason[e.kind]}", e.message)
    log.warning("%s failed: %s", op, e.message)
    return ApiError(502, failed, e.message)


def split(raw: Any, what: str = "path") -> list[str]:
    if not isinstance(raw, str):
        raise query.bad(f"{what} must be a string")
    try:
        return endpoints.split_path(raw)
    except PathError as e:
        raise ApiError(400, "ClientError.BadRequest", e.message) from None


async def read_doc(request: Request, model: type[T], limit: int = MAX_BODY) -> T:
    """The body as one of the documents of globus/models.py: 400 saying where it is
    wrong if it is not one (the rules /openapi.json shows)."""
    body = await read_body(request, limit, "ClientError.RequestTooLarge")
    return api_models.decode(model, body, "ClientError.BadRequest")


class GlobusApi:
    def __init__(self, registry: Endpoints) -> None:
        self.registry = registry

    def endpoint(self, request: Request) -> Endpoint:
        """The endpoint named in the URL, by id or name; 503 if none is configured."""
        if not len(self.registry):
            raise ApiError(503, "EndpointsNotConfigured", endpoints.NOT_CONFIGURED)
        ref = request.path_params["endpoint"]
        found = self.registry.find(ref)
        if found is None:
            raise ApiError(404, "EndpointNotFound", f"No such endpoint {ref[:200]!r}")
        return found

    async def get_endpoint(self, request: Request) -> Response:
        doc = documents.endpoint_doc(self.endpoint(request))
        return json_response(documents.select_fields(doc, query.fields(request)))

    async def endpoint_search(self, request: Request) -> Response:
        if not len(self.registry):
            raise ApiError(503, "EndpointsNotConfigured", endpoints.NOT_CONFIGURED)
        for name in request.query_params:
            if name.startswith("filter_") and name not in ("filter_fulltext", "filter_scope"):
                raise query.bad(f"{name} is not supported here")
        scope = request.query_params.get("filter_scope", "all")
        if scope not in SCOPES_ALL + SCOPES_NONE:
            raise query.bad(f"unknown filter_scope {scope[:50]!r}")
        limit = query.integer(request, "limit", 25, 1, SEARCH_LIMIT)
        offset = query.integer(request, "offset", 0, 0, SEARCH_MAX - 1)
        words = (request.query_params.get("filter_fulltext") or "").lower().split()
        found = []
        for ep in self.registry if scope in SCOPES_ALL else []:
            doc = documents.endpoint_doc(ep)
            text = " ".join(str(doc[k]) for k in ("id", "name", "canonical_name", "description"))
            if all(word in text.lower() for word in words):
                found.append(documents.select_fields(doc, query.fields(request)))
        page = found[offset : offset + limit]
        return json_response({
            "DATA_TYPE": "endpoint_list",
            "DATA": page,
            "offset": offset,
            "limit": limit,
            "has_next_page": offset + limit < min(len(found), SEARCH_MAX),
        })  # fmt: skip

    async def ls(self, request: Request) -> Response:
        ep = self.endpoint(request)
        parts = split(request.query_params.get("path", ""))
        hidden = query.boolean(request, "show_hidden", True)
        limit = query.integer(request, "limit", LS_LIMIT, 0, LS_LIMIT)
        offset = query.integer(request, "offset", 0, 0, 1 << 62)
        test = query.file_filter(request)
        keys = query.order_keys(request)
        fields = query.fields(request)
        try:
            page, total = await run_blocking(
                _ls_page, ep, parts, hidden, test, keys, (offset, limit), fields
            )
        except PathError as e:
            raise path_error("ls", e) from None
        shown = endpoints.show_path(parts, folder=True)
        # a page may hold 100,000 entries: encode it off the event loop too
        return await run_blocking(json_response, {
            "DATA_TYPE": "file_list",
            "DATA": page,
            "path": shown,
            "absolute_path": shown,
            "endpoint": ep.id,
            "rename_supported": not ep.read_only,
            "symlink_supported": False,
            "length": len(page),
            "total": total,
            "offset": offset,
            "limit": limit,
        })  # fmt: skip

    async def stat(self, request: Request) -> Response:
        ep = self.endpoint(request)
        parts = split(request.query_params.get("path", ""))
        try:
            doc = await run_blocking(_stat_doc, ep, parts)
        except PathError as e:
            raise path_error("stat", e) from None
        return json_response(documents.select_fields(doc, query.fields(request)))

    async def mkdir(self, request: Request) -> Response:
        ep = self.endpoint(request)
        doc = await read_doc(request, models.Mkdir)
        parts = split(doc.path)
        try:
            await run_blocking(endpoints.make_folder, ep, parts)
        except PathError as e:
            raise path_error("mkdir", e) from None
        message = "The directory was created successfully"
        body = documents.result(request, "mkdir_result", "DirectoryCreated", message)
        return json_response(body, 202)

    async def rename(self, request: Request) -> Response:
        ep = self.endpoint(request)
        doc = await read_doc(request, models.Rename)
        old = split(doc.old_path, "old_path")
        new = split(doc.new_path, "new_path")
        try:
            await run_blocking(endpoints.rename, ep, old, new)
        except PathError as e:
            raise path_error("rename", e) from None
        message = "File or directory renamed successfully"
        return json_response(documents.result(request, "result", "FileRenamed", message))

    async def submission_id(self, request: Request) -> Response:
        if not len(self.registry):
            raise ApiError(503, "EndpointsNotConfigured", endpoints.NOT_CONFIGURED)
        return json_response({"DATA_TYPE": "submission_id", "value": str(uuid.uuid4())})

    async def activate(self, request: Request) -> Response:
        """autoactivate and activate: endpoints here need no credential, ever."""
        self.endpoint(request)
        body = documents.result(
            request,
            "activation_result",
            "AlreadyActivated",
            "Endpoint is already activated; endpoints here never expire.",
            activated=True, expires_in=-1, expire_time=None, subject=None, length=0,
            DATA=[], oauth_server=None,
        )  # fmt: skip
        return json_response(body)

    async def activation_requirements(self, request: Request) -> Response:
        self.endpoint(request)
        return json_response({
            "DATA_TYPE": "activation_requirements",
            "DATA": [],
            "length": 0,
            "activated": True,
            "auto_activation_supported": True,
            "expires_in": -1,
            "expire_time": None,
            "oauth_server": None,
        })  # fmt: skip

    async def not_served(self, request: Request) -> Response:
        why = unsupported.CONFIGURED
        raise ApiError(501, "NotImplemented", f"{request.method} {request.url.path}: {why}")

    def routes(self) -> list[tuple[str, Handler, list[str]]]:
        return [(path, getattr(self, name), methods) for path, name, methods, _ in ROUTES]


_EP = "/v0.10/endpoint/{endpoint}"
_OP = "/v0.10/operation/endpoint/{endpoint}"
# (path below /globus, GlobusApi method, HTTP methods, what it does)
ROUTES: list[tuple[str, str, list[str], str]] = [
    (_EP, "get_endpoint", ["GET"], "an endpoint document, by id or name"),
    (_EP, "not_served", ["PUT", "DELETE"], "updating or deleting an endpoint: 501"),
    ("/v0.10/endpoint_search", "endpoint_search", ["GET"], "endpoints matching filter_fulltext"),
    (f"{_OP}/ls", "ls", ["GET"], "list a folder (path, show_hidden, filter, orderby, paging)"),
    (f"{_OP}/stat", "stat", ["GET"], "one file, folder or link, never followed"),
    (f"{_OP}/mkdir", "mkdir", ["POST"], "create a folder: 202 DirectoryCreated"),
    (f"{_OP}/rename", "rename", ["POST"], "rename within an endpoint, never replacing"),
    ("/v0.10/submission_id", "submission_id", ["GET"], "a new submission id"),
    (f"{_EP}/autoactivate", "activate", ["POST"], "always AlreadyActivated"),
    (f"{_EP}/activate", "activate", ["POST"], "always AlreadyActivated"),
    (f"{_EP}/activation_requirements", "activation_requirements", ["GET"], "none: always active"),
]


def _ls_page(
    ep: Endpoint,
    parts: list[str],
    hidden: bool,
    test: query.Test | None,
    keys: list[tuple[str, bool]],
    window: tuple[int, int],
    fields: list[str] | None,
) -> tuple[list[dict[str, Any]], int]:
    """One page of a listing and the total (in a thread: user and group names may
    need NSS lookups, and a folder may hold 100,000 entries)."""
    items = endpoints.list_folder(ep, parts, hidden)
    docs = [_with_mtime(item) for item in items if documents.file_type(item.st.st_mode)]
    if test is not None:
        docs = [d for d in docs if test(d)]
    query.sort(docs, keys)
    offset, limit = window
    page = [documents.select_fields(_strip(d), fields) for d in docs[offset : offset + limit]]
    return page, len(docs)


def _stat_doc(ep: Endpoint, parts: list[str]) -> dict[str, Any]:
    item = endpoints.stat_path(ep, parts)
    if documents.file_type(item.st.st_mode) is None:
        message = f"{endpoints.show_path(parts)} is not a file or folder"
        raise PathError("missing", message)
    return documents.file_doc(item)


def _with_mtime(item: Item) -> dict[str, Any]:
    doc = documents.file_doc(item, times=False)
    doc[query.MTIME] = item.st.st_mtime
    return doc


def _strip(doc: dict[str, Any]) -> dict[str, Any]:
    return documents.add_times(doc, doc.pop(query.MTIME))
