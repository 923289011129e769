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

_JOB_INFO = {
    "type": "object",
    "required": ["Name", "Status", "Todo", "Finished"],
    "properties": {
        **_JOB["properties"],  # type: ignore[dict-item]
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
        "summary": "every job, sorted by name",
        "parameters": [
            {
                "name": "status",
                "in": "query",
                "schema": {"type": "string"},
                "description": "comma-separated statuses, e.g. queue,error",
            },
            {"name": "limit", "in": "query", "schema": {"type": "integer"}},
            {"name": "offset", "in": "query", "schema": {"type": "integer"}},
        ],
        "responses": {
            "200": {
                **_json({"type": "array", "items": _JOB}, "jobs"),
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


def spec(version: str, extra_paths: dict[str, Any] | None = None) -> dict[str, Any]:
    paths = _paths()
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
