"""API errors: one JSON shape for every failure.

`{"code": "JobNotFound", "message": "...", "request_id": "...", "resource": "/jobs/x"}`,
with the same code in the `X-Error-Code` header. Route code raises ApiError; the app's
exception handlers turn it (and Starlette's own 404/405) into that shape.
"""

from __future__ import annotations

from typing import Any


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
