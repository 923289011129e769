"""The OpenAPI 3.1 description served at `/openapi.json`, written out by hand.

Hand-written because the routes are plain functions; a test checks that every route
of the app appears here, so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

from typing import Any

ERRORS = {
    "Unauthorized": "401: no token, or a wrong one",
    "NotFound": "404: no such route",
    "MethodNotAllowed": "405: the route exists but not with this method",
    "InvalidName": "400: the job id is not a valid job name",
    "InvalidPath": "400: '.'/'..' segments, NUL, backslash, empty, hidden or absolute path, "
    "or a symlink leading outside the job folder",
    "InvalidParameter": "400: a query parameter is malformed",
    "InvalidJobFile": "400: an uploaded JOB is not what the processor can read",
    "InvalidDigest": "400: a malformed Content-Digest header",
    "DigestMismatch": "400: the body does not match its Content-Digest",
    "JobNotFound": "404: no job with this name",
    "FileNotFound": "404: no such file or folder in the job",
    "JobBusy": "409: the job is queued or processing (or held by a processor)",
    "JobNotCancellable": "409: only a queued or processing job can be canceled",
    "DeadlinePassed": "409: the job's own Deadline has passed (or is not a time)",
    "NotEmpty": "409: deleting a non-empty folder without ?recursive=true",
    "IsADirectory": "409: uploading onto a folder",
    "NotADirectory": "409: a parent of the path is a file",
    "Conflict": "409: the job's folder changed during an upload",
    "PayloadTooLarge": "413: larger than --max-upload",
    "RangeNotSatisfiable": "416: the Range starts beyond the end of the file",
    "InsufficientStorage": "507: the disk is full; nothing was changed",
    "InternalError": "500: unexpected; the log has the request id",
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
}

_ERROR_SCHEMA = {
    "type": "object",
    "required": ["code", "message", "request_id", "resource"],
    "properties": {
        "code": {"type": "string", "enum": sorted(ERRORS)},
        "message": {"type": "string"},
        "request_id": {"type": "string"},
        "resource": {"type": "string"},
    },
}

_JOB = {
    "type": "object",
    "required": ["Name", "Status"],
    "properties": {
        "Name": {"type": "string"},
        "Status": {"type": "string", "enum": ["ready", "queue", "processing", "success", "error"]},
    },
}

_TIME = {"type": ["string", "null"], "format": "date-time"}
_JOB_ROW = {
    "type": "object",
    "description": "Name and Status, or the fields asked for with ?fields=",
    "properties": {
        **_JOB["properties"],  # type: ignore[dict-item]
        "Created": {**_TIME, "description": "when the job folder was made (RFC 3339, ms, UTC)"},
        "Modified": {
            **_TIME,
            "description": "the folder's last change: a move to another state, an entry added "
            "or removed (its ctime)",
        },
    },
}

_JOB_INFO = {
    "type": "object",
    "required": ["Name", "Status", "Created", "Modified", "Todo", "Finished"],
    "properties": {
        **_JOB_ROW["properties"],  # type: ignore[dict-item]
        "Todo": {"type": ["array", "null"], "items": {"type": "string"}},
        "Finished": {"type": ["array", "null"]},
        "JobError": {"type": "string", "description": "why JOB cannot be read, if it cannot"},
    },
}

_NAMES = {"type": "array", "items": {"type": "string"}}
_UPLOADED = {
    "type": "object",
    "properties": {
        "path": {"type": "string"},
        "size": {"type": "integer"},
        "sha256": {"type": "string"},
    },
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: str) -> dict[str, Any]:
    by_status: dict[str, list[str]] = {}
    for code in ("Unauthorized", *codes):
        by_status.setdefault(ERRORS[code].split(":")[0], []).append(code)
    return {
        status: _json({"$ref": "#/components/schemas/Error"}, "error: " + ", ".join(names))
        for status, names in by_status.items()
    }


def _param(name: str, where: str, description: str) -> dict[str, Any]:
    """A string parameter: required in the path, optional elsewhere."""
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "schema": {"type": "string"},
        "description": description,
    }


_ID = _param("id", "path", "job name: 1-255 of A-Z a-z 0-9 . _ -, not starting with '.'")
_PATH = _param("path", "path", "file path inside the job folder, '/' separated")
_DIGEST = _param("Content-Digest", "header", "RFC 9530, e.g. sha-256=:<base64>:")
_RANGE = _param("Range", "header", "one byte range, e.g. bytes=0-99")


def _paths() -> dict[str, Any]:
    file_get = {
        "summary": "a file's bytes (Range supported), or a folder's names",
        "parameters": [_ID, _PATH, _RANGE],
        "responses": {
            "200": {
                "description": "the file (application/octet-stream) or a JSON array of "
                "names for a folder"
            },
            "206": {"description": "the requested byte range"},
            "304": {"description": "If-None-Match matched the ETag"},
            **_errors(
                "InvalidName", "InvalidPath", "JobNotFound", "FileNotFound", "RangeNotSatisfiable"
            ),
        },
    }
    names_get = {
        "summary": "names in the job folder, sorted; hidden files never appear",
        "parameters": [_ID],
        "responses": {"200": _json(_NAMES, "names"), **_errors("InvalidName", "JobNotFound")},
    }
    jobs_get = {
        "summary": "every job, sorted by name (or ?orderby=)",
        "parameters": [
            {
                "name": "status",
                "in": "query",
                "schema": {"type": "string"},
                "description": "comma-separated statuses, e.g. queue,error",
            },
            {"name": "limit", "in": "query", "schema": {"type": "integer"}},
            {"name": "offset", "in": "query", "schema": {"type": "integer"}},
            _param(
                "orderby",
                "query",
                "comma-separated name, status, created or modified, each optionally "
                "followed by asc or desc, e.g. 'status,modified desc'; status words sort "
                "alphabetically; the default is by name",
            ),
            {
                **_param(
                    "filter",
                    "query",
                    "clauses FIELD:VALUE joined by '/', all of which must hold, e.g. "
                    "'status:queue,error/modified:2026-01-01,2026-02-01/name:~batch-'; "
                    "name: a list of names, =NAME, !=NAME, ~PREFIX or !~PREFIX; status: a "
                    "list of statuses; created, modified: FROM,TO, inclusive, either end "
                    "may be empty, as YYYY-MM-DD, YYYY-MM-DD HH:MM:SS or RFC 3339 (UTC when "
                    "no zone is given). Several filter parameters are alternatives.",
                ),
                "explode": True,
            },
            _param(
                "fields",
                "query",
                "comma-separated Name, Status, Created, Modified: the fields of each job "
                "(default Name,Status)",
            ),
        ],
        "responses": {
            "200": {
                **_json({"type": "array", "items": _JOB_ROW}, "jobs"),
                "headers": {
                    "X-Total-Count": {"schema": {"type": "integer"}},
                    "Link": {
                        "schema": {"type": "string"},
                        "description": '<...>; rel="next" when paging',
                    },
                },
            },
            **_errors("InvalidParameter"),
        },
    }
    return {
        "/": {
            "get": {
                "summary": "service name and version",
                "responses": {"200": {"description": "name and version"}},
            }
        },
        "/healthz": {
            "get": {
                "summary": "liveness; needs no token",
                "security": [],
                "responses": {"200": {"description": '{"status": "ok"}'}},
            }
        },
        "/readyz": {
            "get": {
                "summary": "readiness: can take and run jobs now; needs no token",
                "security": [],
                "responses": {
                    "200": {"description": '{"status": "ready"}'},
                    "503": {"description": "not ready (NotReady); the reasons are logged"},
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "this document",
                "responses": {"200": {"description": "OpenAPI 3.1"}},
            }
        },
        "/jobs": {"get": jobs_get},
        "/jobs/": {"get": jobs_get},
        "/jobs/{id}": {
            "get": {
                "summary": "a job's status and task lists (HEAD too)",
                "parameters": [_ID],
                "responses": {
                    "200": _json(_JOB_INFO, "the job"),
                    **_errors("InvalidName", "JobNotFound"),
                },
            },
            "put": {
                "summary": "create an empty job in data/ (idempotent; the body is ignored)",
                "parameters": [_ID],
                "responses": {
                    "201": _json(_JOB_INFO, "created"),
                    "200": _json(_JOB_INFO, "it existed; nothing changed"),
                    **_errors("InvalidName"),
                },
            },
            "delete": {
                "summary": "remove the job and all its files",
                "parameters": [_ID],
                "responses": {
                    "204": {"description": "gone (also if it never existed)"},
                    **_errors("InvalidName", "JobBusy"),
                },
            },
        },
        "/jobs/{id}/queue": {
            "post": {
                "summary": "move the job from data/, error/ or success/ to queue/",
                "parameters": [_ID],
                "responses": {
                    "202": _json(_JOB_INFO, "queued"),
                    "200": _json(_JOB_INFO, "already queued or processing"),
                    **_errors("InvalidName", "JobNotFound", "JobBusy", "DeadlinePassed"),
                },
            }
        },
        "/jobs/{id}/cancel": {
            "post": {
                "summary": "cancel a queued job (back to data/) or a processing one (to error/)",
                "parameters": [_ID],
                "responses": {
                    "202": _json(_JOB_INFO, "cancel requested; a queued job is ready again"),
                    **_errors("InvalidName", "JobNotFound", "JobNotCancellable"),
                },
            }
        },
        "/jobs/{id}/files": {"get": names_get},
        "/jobs/{id}/files/": {"get": names_get},
        "/jobs/{id}/files/{path}": {
            "get": file_get,
            "put": {
                "summary": "upload a file (streamed; renamed into place when complete)",
                "parameters": [_ID, _PATH, _DIGEST],
                "requestBody": {"content": {"application/octet-stream": {}}},
                "responses": {
                    "201": _json(_UPLOADED, "created"),
                    "200": _json(_UPLOADED, "replaced"),
                    **_errors(
                        "InvalidName",
                        "InvalidPath",
                        "InvalidJobFile",
                        "InvalidDigest",
                        "DigestMismatch",
                        "JobNotFound",
                        "JobBusy",
                        "IsADirectory",
                        "NotADirectory",
                        "Conflict",
                        "PayloadTooLarge",
                        "InsufficientStorage",
                    ),
                },
            },
            "delete": {
                "summary": "remove a file or an empty folder (?recursive=true for any folder)",
                "parameters": [
                    _ID,
                    _PATH,
                    {"name": "recursive", "in": "query", "schema": {"type": "boolean"}},
                ],
                "responses": {
                    "204": {"description": "gone (also if it never existed)"},
                    **_errors("InvalidName", "InvalidPath", "JobNotFound", "JobBusy", "NotEmpty"),
                },
            },
        },
    }


_STAGING_STATUS = {
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
_STAGING_IDS = {
    "type": "object",
    "required": ["ids"],
    "properties": {
        "ids": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}}
    },
}
_REQUEST_ID = {"type": "object", "properties": {"request_id": {"type": "string", "format": "uuid"}}}


def _staging_paths() -> dict[str, Any]:
    """The DTS staging provider's routes (batchingest/api/staging.py)."""
    status_responses = {
        "200": _json(_STAGING_STATUS, "status of the staging request"),
        **_errors("InvalidRequestId", "StagingRequestNotFound", "JobBusy", "StagingNotConfigured"),
    }
    request_id = {"required": True, "schema": {"type": "string", "format": "uuid"}}
    key = _param("Idempotency-Key", "header", "1-255 characters; the same key within 24 h "
                 "returns the same request_id")  # fmt: skip
    key["schema"]["maxLength"] = 255
    return {
        "/dts/staging": {
            "post": {
                "summary": "Ask for files to be copied from the archive into the staging area",
                "parameters": [key],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _STAGING_IDS}},
                },
                "responses": {
                    "201": _json(_REQUEST_ID, "staging job created and queued"),
                    **_errors(
                        "InvalidRequest",
                        "InvalidId",
                        "FilesNotFound",
                        "IdempotencyConflict",
                        "RequestTooLarge",
                        "IdempotencyKeyReused",
                        "StagingRequestFailed",
                        "StagingNotConfigured",
                        "CatalogUnavailable",
                    ),
                },
            },
            "get": {
                "summary": "Status of a staging request",
                "parameters": [{"name": "id", "in": "query", **request_id}],
                "responses": status_responses,
            },
        },
        "/dts/staging/{id}": {
            "get": {
                "summary": "Status of a staging request",
                "parameters": [{"name": "id", "in": "path", **request_id}],
                "responses": status_responses,
            },
        },
    }


def spec(version: str, extra_paths: dict[str, Any] | None = None) -> dict[str, Any]:
    paths = _paths()
    paths.update(_staging_paths())
    paths.update(extra_paths or {})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "batchingest",
            "version": version,
            "description": "Create jobs, fill them with files and queue them. Every "
            "error is JSON with the same code in X-Error-Code; every response has "
            "X-Request-Id.",
        },
        "paths": paths,
        "components": {
            "schemas": {"Error": _ERROR_SCHEMA},
            "securitySchemes": {
                "token": {"type": "apiKey", "in": "header", "name": "X-Api-Token"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
        "security": [{"token": []}, {"bearer": []}],
    }
