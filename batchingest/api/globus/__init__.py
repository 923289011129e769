"""The Globus Transfer API v0.10 subset, at /globus/v0.10/, over the configured endpoints.

Built so that the Globus SDK for Python works unmodified against it
(`TransferClient(base_url="http://HOST:PORT/globus/")`). Documents carry `DATA_TYPE`,
paging fields are JSON integers, and every error under /globus/ is the service's one
error shape with a Globus code (`EndpointNotFound`, `ClientError.NotFound`,
`ExternalError.MkdirFailed.Exists`, ...), also sent in `X-Transfer-API-Error`. Every file
operation runs in a thread, through `batchingest.endpoints`, on a descriptor of the
endpoint folder.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route

from batchingest.api.errors import ApiError
from batchingest.api.globus import operations, spec, tasks, unsupported
from batchingest.api.globus.documents import PREFIX, VERSION_PREFIX
from batchingest.config import Config
from batchingest.endpoints import Endpoints
from batchingest.store import Store

Handler = Callable[[Request], Awaitable[Response]]
# OPTIONS too: on a served path the fallback's 405 lists every method served there,
# where Starlette's own would list only those of the first route of the path
_ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def error(request: Request, exc: ApiError) -> Response:
    """The app's error document, with the resource named as Globus does (/endpoint/ID)."""
    from batchingest.api.app import error_body  # the app imports this package lazily

    path: str = request.scope.get("path", "")
    for prefix in (VERSION_PREFIX, PREFIX):
        if path.startswith(prefix + "/"):
            path = path[len(prefix) :]
            break
    scope = {**request.scope, "path": path}
    response = error_body(scope, exc.status, exc.code, exc.message, exc.extra)  # type: ignore[arg-type]
    response.headers["X-Transfer-API-Error"] = exc.code
    for key, value in exc.headers.items():
        response.headers[key] = value
    return response


def _globus(handler: Handler) -> Handler:
    """handler, with its ApiErrors answered in Globus form."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as e:
            return error(request, e)

    return wrapped


def _fallback(served: list[Route]) -> Handler:
    """Everything else under /globus/: 501 for features not served, 405, or 404."""
    refused = [(re.compile(_pattern(path)), why) for path, why in unsupported.UNSUPPORTED]

    async def fallback(request: Request) -> Response:
        # a path served with other methods: 405 listing them (RFC 9110), before any 501
        allowed = {m for r in served if r.matches(request.scope)[0] == Match.PARTIAL
                   for m in r.methods or ()}  # fmt: skip
        if allowed:
            message = f"{request.method} is not allowed on {request.url.path}"
            allow = {"Allow": ", ".join(sorted(allowed))}
            return error(request, ApiError(405, "ClientError.MethodNotAllowed", message,
                                           headers=allow))  # fmt: skip
        path = request.url.path.removeprefix(PREFIX)
        for pattern, why in refused:
            if pattern.fullmatch(path):
                message = f"{request.method} {request.url.path}: {why}"
                return error(request, ApiError(501, "NotImplemented", message))
        return error(request, ApiError(404, "ClientError.NotFound", f"no resource {path}"))

    return fallback


def _pattern(path: str) -> str:
    """A route template as a regular expression ({x} one segment, {x:path} the rest)."""
    out = re.escape(path)
    out = re.sub(r"\\\{\w+:path\\\}", ".*", out)
    return re.sub(r"\\\{\w+\\\}", "[^/]+", out)


def routes(cfg: Config, store: Store) -> list[BaseRoute]:
    registry = Endpoints.from_config(cfg)  # a missing folder: the app warned at start
    api = operations.GlobusApi(registry)
    task_api = tasks.TaskApi(registry, store)
    handlers = [*api.routes(), *[(p, getattr(task_api, n), m) for p, n, m, _ in tasks.ROUTES]]
    served = [
        Route(PREFIX + path, _globus(handler), methods=methods)
        for path, handler, methods in handlers
    ]
    fallback = Route(f"{PREFIX}/{{path:path}}", _fallback(served), methods=_ALL_METHODS)
    return [*served, fallback]


OPENAPI_PATHS = spec.OPENAPI_PATHS  # the Globus operations in /openapi.json
