"""The OpenAPI 3.1 description served at `/openapi.json`.

Operations are rows of tables (`Op`): the job, file, service and staging ones here, the
others beside their routes (api/globus/spec.py, api/staccato.py, api/events.py), each
module's `paths(OPS)` given to `spec()` as `extra_paths`. The documents come from the
typed models of batchingest.api.models (and api/globus/models.py), the same ones that
decode request bodies, and the name and path patterns are the ones the server enforces.
A test checks that every route of the app appears here, so the two cannot drift apart.

Adding an operation: a row `Op("get", "/things/{id}", "getThing", "tag", "summary",
{"200": Thing}, errors=("ThingNotFound",), params=(...))` in its module's table; its
documents in a models module (a msgspec.Struct: `ref()` puts it in the components), its
error codes in `ERRORS`. 401 is added unless the operation is public, 500 always, and
HEAD beside every GET.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batchingest.api import models

ERRORS = {
    "Unauthorized": "401: no token, or a wrong one",
    "NotFound": "404: no such route",
    "MethodNotAllowed": "405: the route exists but not with this method (see Allow)",
    "InvalidName": "400: the job id is not a valid job name",
    "InvalidPath": "400: '.'/'..' segments, NUL, backslash, empty, hidden or absolute path, "
    "or a symlink leading outside the job folder",
    "InvalidParameter": "400: a query parameter is malformed",
    "JobNotCancellable": "409: only a queued or processing job can be canceled",
    "DeadlinePassed": "409: the job's own Deadline has passed (or is not a time)",
    "InvalidJobFile": "400: an uploaded JOB is not what the processor can read",
    "InvalidDigest": "400: a malformed Content-Digest header",
    "DigestMismatch": "400: the body does not match its Content-Digest",
    "JobNotFound": "404: no job with this name",
    "FileNotFound": "404: no such file or folder in the job",
    "JobBusy": "409: the job is queued or processing (or held by a processor)",
    "NotEmpty": "409: deleting a non-empty folder without ?recursive=true",
    "IsADirectory": "409: uploading onto a folder",
    "NotADirectory": "409: a parent of the path is a file",
    "Conflict": "409: the job's folder changed during an upload, or the name is taken by "
    "something that is not a job folder",
    "PayloadTooLarge": "413: larger than --max-upload",
    "RangeNotSatisfiable": "416: the Range (or a transfer's start) is beyond the end of the file",
    "InsufficientStorage": "507: the disk is full; nothing was changed",
    "InternalError": "500: unexpected; the log has the request id",
    "NotReady": "503: the service cannot take and run jobs now; the log says why",
    # answered by the connection limits (connections.py) before any route, so on no
    # operation: an over-limit connection, slow or oversized request headers
    "TooManyConnections": "503: --max-connections are open; the connection is closed",
    "RequestTimeout": "408: the request line and headers took over --header-timeout",
    "HeadersTooLarge": "431: the request line and headers exceed --max-header-size",
    # the /dts/staging routes
    "InvalidRequest": '400: the body is not {"ids": [...]} with 1 to staging-max-ids '
    "non-empty strings, or the Idempotency-Key is not 1-255 characters",
    "InvalidId": "400: ids that can never be archive paths, listed in 'invalid' (no catalog)",
    "InvalidRequestId": "400: the staging request id is missing or not a UUID",
    "FilesNotFound": "404: ids naming no file in the archive, listed in 'unresolved'",
    "StagingRequestNotFound": "404: no staging request with this id",
    "IdempotencyConflict": "409: another request is claiming the same Idempotency-Key",
    "RequestTooLarge": "413: a body over max(1 MiB, staging-max-ids x 4200 bytes)",
    "IdempotencyKeyReused": "422: the Idempotency-Key was used for other ids",
    "StagingRequestFailed": "500: the staging job could not be created",
    "StagingNotConfigured": "503: the service runs without --archive and --staging",
    "CatalogUnavailable": "503: the catalog file cannot be read",
    "ArchiveUnavailable": "503: the archive cannot be looked in now (missing, unreadable, "
    "out of descriptors, an I/O error); no id was judged",
    # job history (api/events.py)
    "InvalidCursor": "400: after= or Last-Event-ID is not a cursor of this feed",
    # the transfer APIs: Staccato (api/staccato.py) and Globus (api/globus/)
    "EndpointsNotConfigured": "503: the service runs without --endpoint",
    "OutsideEndpoints": "403: a URL leads outside every endpoint folder, or the endpoint is "
    "read-only",
    "SourceNotFound": "404: the source is not a regular file",
    "TransferNotFound": "404: no transfer with this id",
    "IllegalTransition": "400: the transfer's state does not allow it (Staccato's code)",
    "AuthenticationFailed": "401: no token, or a wrong one (under /globus/)",
    "ClientError.BadRequest": "400: a malformed parameter or body",
    "ClientError.NotFound": "404: no such path on the endpoint, or no such route",
    "ClientError.MethodNotAllowed": "405: the route exists but not with this method",
    "ClientError.RequestTooLarge": "413: a body over the route's limit",
    "EndpointNotFound": "404: no endpoint with this id or name",
    "TaskNotFound": "404: no task with this id",
    "PermissionDenied": "403: the endpoint is read-only",
    "NotImplemented": "501: a Globus feature this service does not serve",
    **{
        f"ExternalError.{failed}{reason}": "502: the file operation failed on the endpoint"
        for failed in ("DirListingFailed", "StatFailed", "MkdirFailed", "RenameFailed")
        for reason in ("", ".Exists", ".NotDirectory", ".PermissionDenied")
    },
}

# What GET /jobs's query parameters may be, as the server reads them (api/query.py). Days
# up to 28 only, so that every date the pattern admits exists.
_KEY = "(name|status|created|modified)"
_ORDERBY = rf"^({_KEY}( (asc|desc))?(,{_KEY}( (asc|desc))?)*)?$"
_FIELDS = "^((Name|Status|Created|Modified)(,(Name|Status|Created|Modified))*)?$"
_NAME = "[A-Za-z0-9_-][A-Za-z0-9._-]{0,100}"
_STATUS = "(ready|queue|processing|success|error)"
_TIME = (
    r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|1\d|2[0-8])"
    r"(T([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,3})?(Z|[+-]([01]\d|2[0-3]):[0-5]\d))?"
)
_CLAUSE = (
    f"(name:(=|!=|~|!~)?{_NAME}|status:{_STATUS}(,{_STATUS})*"
    f"|(created|modified):({_TIME})?,({_TIME})?)"
)
_FILTER = f"^({_CLAUSE}(/{_CLAUSE})*)?$"

# Paths the server also answers, as aliases of a documented one: not in the document, so
# that a generated client has one function per operation.
ALIASES = {"/jobs/": "/jobs", "/jobs/{id}/files/": "/jobs/{id}/files"}
# Paths readable without a token: they hold nothing secret.
PUBLIC = ("/healthz", "/readyz", "/openapi.json", "/docs")


def json_body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def error_responses(*codes: str, public: bool = False) -> dict[str, Any]:
    """One response per status, naming its error codes."""
    by_status: dict[str, list[str]] = {}
    for code in (*(() if public else ("Unauthorized",)), *codes):
        by_status.setdefault(ERRORS[code].split(":")[0], []).append(code)
    return {
        status: json_body(models.ref(models.Error), "error: " + ", ".join(names))
        for status, names in sorted(by_status.items())
    }


def param(
    name: str, where: str, description: str, schema: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A parameter: required in the path, optional elsewhere; a string unless told."""
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "schema": schema or {"type": "string"},
        "description": description,
    }


def operation(
    op_id: str,
    tag: str,
    summary: str,
    *,
    responses: dict[str, Any],
    errors: tuple[str, ...] = (),
    params: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    public: bool = False,
    unauthorized: str = "Unauthorized",
) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": op_id, "tags": [tag], "summary": summary}
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = body
    # any operation may fail unexpectedly: a 500 naming the request id
    codes = (*errors, "InternalError") if public else (unauthorized, *errors, "InternalError")
    op["responses"] = {**responses, **error_responses(*codes, public=True)}
    if public:
        op["security"] = []
    return op


def head_of(get: dict[str, Any]) -> dict[str, Any]:
    """The HEAD operation of a GET: the same statuses and headers, no body."""
    responses = {
        status: {k: v for k, v in r.items() if k != "content"}
        for status, r in get["responses"].items()
    }
    op_id = get["operationId"]
    rest = op_id[3:] if op_id.startswith("get") else op_id[:1].upper() + op_id[1:]
    return {
        **get,
        "operationId": "head" + rest,
        "summary": get.get("summary", op_id) + " (headers only)",
        "responses": responses,
    }


JOB_ID = param(
    "id",
    "path",
    "job name: 1-255 of A-Z a-z 0-9 . _ -, not starting with '.'",
    {"type": "string", "pattern": models.JOB_NAME_PATTERN},
)
_PATH_RULES = (
    "file path in the job folder: '/'-separated names, none empty, '.', '..' or "
    "starting with '.', no backslash or control character; at most 255 bytes a name "
    "and 4095 in all"
)
_PATH = param(
    "path",
    "path",
    _PATH_RULES,
    {"type": "string", "pattern": models.FILE_PATH_PATTERN, "maxLength": models.MAX_PATH},
)
# GET also takes a folder's path ending in '/'
_READ_PATH = param(
    "path",
    "path",
    _PATH_RULES + "; a folder's may end in '/'",
    {
        "type": "string",
        "pattern": models.FILE_PATH_PATTERN[:-1] + "/?$",
        "maxLength": models.MAX_PATH,
    },
)
_DIGEST = param(
    "Content-Digest",
    "header",
    "RFC 9530: sha-256=:<base64 of 32 bytes>: is checked; other algorithms are ignored",
)
_RANGE = param("Range", "header", "one byte range, e.g. bytes=0-99; others send it all")
_IF_RANGE = param("If-Range", "header", "the ETag: Range applies only if it still matches")
_IF_NONE_MATCH = param("If-None-Match", "header", "ETags, or *: 304 if one matches")
_IF_MODIFIED_SINCE = param(
    "If-Modified-Since", "header", "an HTTP date: 304 if not modified since (without If-None-Match)"
)
_BINARY = {"type": "string", "format": "binary"}
_NAMES = {"type": "array", "items": {"type": "string"}}
_FILE_HEADERS = {
    "ETag": {"schema": {"type": "string"}},
    "Last-Modified": {"schema": {"type": "string"}},
}


@dataclass(frozen=True)
class Op:
    """One operation, as a row of a table: `paths(rows)` makes the spec's paths of them.

    ok maps a status to its answer: a model (a JSON document of it), a JSON Schema, or
    a whole response object (a dict with a description).
    """

    method: str
    path: str
    op_id: str
    tag: str
    summary: str
    ok: dict[str, Any]
    errors: tuple[str, ...] = ()
    params: tuple[dict[str, Any], ...] = ()
    body: Any = None
    public: bool = False


def answer(what: Any, description: str) -> dict[str, Any]:
    """A response: what is a model or a JSON Schema (a JSON body), or a response object."""
    if isinstance(what, dict) and "description" in what:
        return what
    return json_body(models.ref(what) if isinstance(what, type) else what, description)


def request_body(body: Any) -> dict[str, Any]:
    """A required JSON body of a model, or a requestBody object as it is."""
    if isinstance(body, type):
        return {"required": True, "content": {"application/json": {"schema": models.ref(body)}}}
    return dict(body)


def paths(rows: tuple[Op, ...] | list[Op]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for row in rows:
        responses = {status: answer(what, row.summary) for status, what in row.ok.items()}
        op = operation(
            row.op_id,
            row.tag,
            row.summary,
            responses=responses,
            errors=row.errors,
            params=list(row.params) or None,
            body=None if row.body is None else request_body(row.body),
            public=row.public,
            unauthorized="AuthenticationFailed"
            if row.path.startswith("/globus/")
            else "Unauthorized",
        )
        out.setdefault(row.path, {})[row.method] = op
    return out


def links(op_ids: tuple[str, ...], param: str, pointer: str) -> dict[str, Any]:
    """OpenAPI links: the operations that take `param` from the answer at `pointer`."""
    return {
        op: {"operationId": op, "parameters": {param: f"$response.body#/{pointer}"}}
        for op in op_ids
    }


def with_links(what: Any, description: str, found: dict[str, Any]) -> dict[str, Any]:
    return {**answer(what, description), "links": found}


_JOB = ("InvalidName", "InvalidPath")
_FILE_OK = {
    "description": "the file's bytes, or a JSON array of the names in a folder",
    "headers": _FILE_HEADERS,
    "content": {
        "application/octet-stream": {"schema": _BINARY},
        "application/json": {"schema": _NAMES},
    },
}
_RANGE_OK = {
    "description": "the requested byte range",
    "headers": _FILE_HEADERS,
    "content": {"application/octet-stream": {"schema": _BINARY}},
}
_NOT_MODIFIED = {"description": "If-None-Match or If-Modified-Since: not modified"}
_GONE = {"description": "gone (also if it never existed)"}
_UPLOAD_ERRORS = (*_JOB, "InvalidJobFile", "InvalidDigest", "DigestMismatch", "JobNotFound",
                  "JobBusy", "IsADirectory", "NotADirectory", "Conflict", "PayloadTooLarge",
                  "InsufficientStorage")  # fmt: skip
_RECURSIVE = param("recursive", "query", "true: remove a folder and all in it", {"type": "boolean"})
_PAGE = {"type": "integer", "minimum": 0, "maximum": 999_999_999}
_STATUS_WORDS = "|".join((*models.STATUSES, "data"))
_STATUS_LIST = rf"^\s*({_STATUS_WORDS})?\s*(,\s*({_STATUS_WORDS})?\s*)*$"
_LIST_PARAMS = (
    param("status", "query", "comma-separated statuses, e.g. queue,error",
          {"type": "string", "pattern": _STATUS_LIST}),
    param("limit", "query", "at most this many jobs", _PAGE),
    param("offset", "query", "skip this many jobs first", _PAGE),
    param("orderby", "query", "comma-separated name, status, created or modified, each "
          "optionally followed by asc or desc, e.g. 'status,modified desc'; status words sort "
          "alphabetically; the default is by name", {"type": "string", "pattern": _ORDERBY}),
    param("filter", "query", "clauses FIELD:VALUE joined by '/', all of which must hold, e.g. "
          "'status:queue,error/modified:2026-01-01,2026-02-01/name:~batch-'; name: a list of "
          "names, =NAME, !=NAME, ~PREFIX or !~PREFIX; status: a list of statuses; created, "
          "modified: FROM,TO, inclusive, either end may be empty, as YYYY-MM-DD, YYYY-MM-DD "
          "HH:MM:SS or RFC 3339 (UTC when no zone is given). Several filter parameters are "
          "alternatives.", {"type": "string", "pattern": _FILTER}),
    param("fields", "query", "comma-separated Name, Status, Created, Modified: the fields of "
          "each job (default Name,Status)", {"type": "string", "pattern": _FIELDS}),
)  # fmt: skip
_LISTED = {
    **json_body({"type": "array", "items": models.ref(models.JobRow)}, "jobs"),
    "headers": {
        "X-Total-Count": {"schema": {"type": "integer"}},
        "Link": {"schema": {"type": "string"}, "description": '<...>; rel="next" when paging'},
    },
}
_INFO = models.JobInfo
# what a created job's Name leads to
_ON_JOB = links(("getJob", "headJob", "queueJob", "cancelJob", "deleteJob", "getFileNames",
                 "getJobEvents"), "id", "Name")  # fmt: skip
JOB_OPS = (
    Op("get", "/jobs", "getJobs", "jobs", "every job, sorted by name", {"200": _LISTED},
       ("InvalidParameter",), _LIST_PARAMS),
    Op("get", "/jobs/{id}", "getJob", "jobs", "a job's status and task lists", {"200": _INFO},
       (*_JOB, "JobNotFound"), (JOB_ID,)),
    Op("put", "/jobs/{id}", "putJob", "jobs",
       "create an empty job in data/ (idempotent; the body is ignored)",
       {"201": with_links(_INFO, "created", _ON_JOB),
        "200": with_links(_INFO, "it existed; nothing changed", _ON_JOB)},
       (*_JOB, "Conflict"), (JOB_ID,)),
    Op("delete", "/jobs/{id}", "deleteJob", "jobs", "remove the job and all its files",
       {"204": _GONE}, (*_JOB, "JobBusy"), (JOB_ID,)),
    Op("post", "/jobs/{id}/queue", "queueJob", "jobs",
       "move the job from data/, error/ or success/ to queue/",
       {"202": _INFO, "200": answer(_INFO, "already queued or processing")},
       (*_JOB, "JobNotFound", "JobBusy", "DeadlinePassed"), (JOB_ID,)),
    Op("post", "/jobs/{id}/cancel", "cancelJob", "jobs",
       "cancel a queued job (back to data/) or a processing one (to error/)", {"202": _INFO},
       (*_JOB, "JobNotFound", "JobNotCancellable", "JobBusy"), (JOB_ID,)),
    Op("get", "/jobs/{id}/files", "getFileNames", "files",
       "names in the job folder, sorted; hidden files never appear", {"200": _NAMES},
       (*_JOB, "JobNotFound"), (JOB_ID,)),
    Op("get", "/jobs/{id}/files/{path}", "getFile", "files",
       "a file's bytes (Range supported), or a folder's names",
       {"200": _FILE_OK, "206": _RANGE_OK, "304": _NOT_MODIFIED},
       (*_JOB, "JobNotFound", "FileNotFound", "RangeNotSatisfiable"),
       (JOB_ID, _READ_PATH, _RANGE, _IF_RANGE, _IF_NONE_MATCH, _IF_MODIFIED_SINCE)),
    # no body at all uploads an empty file
    Op("put", "/jobs/{id}/files/{path}", "putFile", "files",
       "upload a file (streamed; renamed into place when complete)",
       {"201": answer(models.Uploaded, "created"), "200": answer(models.Uploaded, "replaced")},
       _UPLOAD_ERRORS, (JOB_ID, _PATH, _DIGEST),
       {"required": False, "content": {"application/octet-stream": {"schema": _BINARY}}}),
    Op("delete", "/jobs/{id}/files/{path}", "deleteFile", "files",
       "remove a file or an empty folder (?recursive=true for any folder)", {"204": _GONE},
       (*_JOB, "InvalidParameter", "JobNotFound", "JobBusy", "NotEmpty"),
       (JOB_ID, _PATH, _RECURSIVE)),
)  # fmt: skip

_DOCS_PAGE = {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}
SERVICE_OPS = (
    Op("get", "/", "getService", "service", "service name and version",
       {"200": models.ServiceInfo}),
    Op("get", "/healthz", "getHealthz", "service", "liveness: the process answers",
       {"200": models.Health}, public=True),
    Op("get", "/readyz", "getReadyz", "service", "readiness: can take and run jobs now",
       {"200": models.Health}, ("NotReady",), public=True),
    Op("get", "/openapi.json", "getOpenapi", "service", "this document",
       {"200": answer({"type": "object"}, "OpenAPI 3.1")}, public=True),
    Op("get", "/docs", "getDocs", "service", "this document as a page to read",
       {"200": _DOCS_PAGE}, public=True),
    Op("get", "/metrics", "getMetrics", "operations",
       "Prometheus metrics (text format); Prometheus sends the token as a bearer",
       {"200": {"description": "Prometheus text format 0.0.4",
                "content": {"text/plain": {"schema": {"type": "string"}}}}}),
)  # fmt: skip

_REQUEST_ID = {"type": "string", "pattern": models.UUID_PATTERN}
_STATUS_ERRORS = ("InvalidRequestId", "InvalidPath", "StagingRequestNotFound", "JobBusy",
                  "StagingNotConfigured")  # fmt: skip
_CREATE_ERRORS = ("InvalidRequest", "InvalidId", "FilesNotFound", "IdempotencyConflict",
                  "RequestTooLarge", "IdempotencyKeyReused", "StagingRequestFailed",
                  "StagingNotConfigured", "CatalogUnavailable",
                  "ArchiveUnavailable")  # fmt: skip
_KEY_PARAM = param("Idempotency-Key", "header",
                   "1-255 characters; the same key within 24 h returns the same request_id",
                   {"type": "string", "minLength": 1, "maxLength": 255})  # fmt: skip


_STATUS_OPS = ("getStaging", "getStagingByQuery", "headStaging", "headStagingByQuery")


def staging_ops(ids_are_paths: bool) -> tuple[Op, ...]:
    """The DTS staging provider's routes (batchingest/api/staging.py); without a catalog
    the ids are archive paths (ids_are_paths)."""
    status = models.StagingStatus
    created = with_links(
        models.StagingCreated,
        "staging job created",
        links(_STATUS_OPS, "id", "request_id"),
    )
    by_query = param("id", "query", "the request id", _REQUEST_ID) | {"required": True}
    asked = models.StagingPathsRequest if ids_are_paths else models.StagingRequest
    return (
        Op("post", "/dts/staging", "createStaging", "staging",
           "ask for files to be copied from the archive into the staging area",
           {"201": created}, _CREATE_ERRORS, (_KEY_PARAM,), asked),
        Op("get", "/dts/staging", "getStagingByQuery", "staging", "status of a staging request",
           {"200": status}, _STATUS_ERRORS, (by_query,)),
        Op("get", "/dts/staging/{id}", "getStaging", "staging", "status of a staging request",
           {"200": status}, _STATUS_ERRORS, (param("id", "path", "the request id", _REQUEST_ID),)),
    )  # fmt: skip


def spec(
    version: str,
    extra_paths: dict[str, Any] | None = None,
    *,
    staging_ids_are_paths: bool = True,
) -> dict[str, Any]:
    found = paths((*SERVICE_OPS, *JOB_OPS, *staging_ops(staging_ids_are_paths)))
    found.update(extra_paths or {})
    for ops in found.values():
        # Starlette answers HEAD wherever it answers GET
        if "get" in ops and "head" not in ops:
            ops["head"] = head_of(ops["get"])
    schemas = models.schemas()
    schemas["Error"]["properties"]["code"]["enum"] = sorted(ERRORS)
    tags = sorted({t for ops in found.values() for op in ops.values() for t in op.get("tags", ())})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "batchingest",
            "version": version,
            "description": "Create jobs, fill them with files and queue them. Every "
            "error is JSON with the same code in X-Error-Code; every response has "
            "X-Request-Id.",
        },
        "tags": [{"name": t} for t in tags],
        "paths": found,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "token": {"type": "apiKey", "in": "header", "name": "X-Api-Token"},
                "bearer": {"type": "http", "scheme": "bearer"},
                "tokenAuthorization": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "the token as `Authorization: Token <token>`",
                },
            },
        },
        "security": [{"token": []}, {"bearer": []}, {"tokenAuthorization": []}],
    }
