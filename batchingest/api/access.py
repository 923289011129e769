"""One access-log line and the HTTP metrics of every request.

`AccessLog` is the outermost ASGI middleware, so it sees every answer, the 401s and the
last-resort 500s of ApiMiddleware included. What it needs from the layers below it finds
in the scope once they are done: the request id (`REQUEST_ID`), the label of the token
used (`TOKEN_LABEL`, never the token) and the matched route (`scope["route"]`, set by
Starlette's router). The route is logged and counted by its template (`/jobs/{id}`),
never the raw path: a label per job name would grow without bound.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchingest import logs, metrics

log = logging.getLogger("batchingest.access")

REQUEST_ID = "batchingest.request_id"  # scope key: api.app.REQUEST_ID, set by ApiMiddleware
TOKEN_LABEL = "batchingest.token"  # scope key: auth.TokenChecker's label of the token used
# a request no route took (a 404, or one refused before routing: 401, 400)
UNMATCHED = "(unmatched)"


def route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class AccessLog:
    """Logs and counts each HTTP request once its response is over."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 0
        sent = 0

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            elif message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            # status 0: the client went away before any answer began
            record(
                scope["method"],
                route_template(scope),
                status,
                sent,
                time.perf_counter() - t0,
                scope.get(REQUEST_ID, ""),
                scope.get(TOKEN_LABEL, "-"),
            )


def record(
    method: str, route: str, status: int, sent: int, seconds: float, request_id: str, token: str
) -> None:
    """The metrics and the access line of one request (token: its label, never the token)."""
    metrics.http_request(method, route, status, seconds)
    if logs.ACCESS.stream is not None or log.isEnabledFor(logging.INFO):
        fields: dict[str, object] = {
            "request_id": request_id,
            "method": method,
            "route": route,
            "status": status,
            "bytes": sent,
            "duration_ms": round(seconds * 1000, 3),
            "token": token,
        }
        # straight to the service log's stream once logs.setup has run (logs.ACCESS),
        # else through logging (an app without the service around it)
        if logs.ACCESS.stream is not None:
            logs.ACCESS.add(f"request {request_id}", fields)
        else:
            log.info("request %s", request_id, extra=fields)
