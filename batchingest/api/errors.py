"""API errors: one JSON shape for every failure, and the one place exceptions become it.

`{"code": "JobNotFound", "message": "...", "request_id": "...", "resource": "/jobs/x"}`,
with the same code in the `X-Error-Code` header. Route code raises ApiError, or lets the
store's and the access layer's own exceptions through: `api_error_of` maps those, and
the app registers it once as an exception handler (see app.py).
"""

from __future__ import annotations

import errno
from typing import Any

from batchingest import fs
from batchingest.paths import InvalidPath
from batchingest.store import InvalidName, JobBusy, JobNotFound


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        # additional fields for the JSON body, e.g. {"unresolved": [...]}
        self.extra = extra or {}


def bad_path(message: str) -> ApiError:
    return ApiError(400, "InvalidPath", message)


def _what(e: OSError) -> str:
    # the file name an fs error carries is relative to a job or the root: safe to show
    return f"{e.strerror}: {e.filename!r}" if e.filename else str(e.strerror or e)


# the exception classes api_error_of knows, for the app's exception handlers
MAPPED: tuple[type[Exception], ...] = (
    JobBusy,
    JobNotFound,
    InvalidName,
    InvalidPath,
    fs.UnsafePath,
    fs.NotRegular,
    fs.TooLarge,
    OSError,
)


def api_error_of(exc: Exception) -> ApiError | None:
    """The API error for an exception of the store or the access layer; None if it is
    not one the API can explain (a 500 then)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, JobBusy):
        return ApiError(409, "JobBusy", str(exc))
    if isinstance(exc, JobNotFound):
        return ApiError(404, "JobNotFound", str(exc))
    if isinstance(exc, InvalidName):
        return ApiError(400, "InvalidName", str(exc))
    if isinstance(exc, InvalidPath):
        return bad_path(f"invalid path: {exc}")
    if isinstance(exc, fs.UnsafePath):
        return bad_path(_what(exc))
    if isinstance(exc, fs.NotRegular):
        return ApiError(404, "FileNotFound", _what(exc))
    if isinstance(exc, fs.TooLarge):
        return ApiError(413, "PayloadTooLarge", _what(exc))
    if isinstance(exc, OSError):
        if exc.errno == errno.ENAMETOOLONG:
            return bad_path("the path is too long for this file system")
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return ApiError(507, "InsufficientStorage", "no space left for this file")
        if exc.errno == errno.ELOOP:
            return bad_path("a symbolic link is in the way (links are never followed)")
    return None
