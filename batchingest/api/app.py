"""The HTTP API application: routes, authentication, request ids and JSON errors.

`create_app(cfg, store)` does all its setup at once (tokens, routes), so the app runs
under uvicorn with `lifespan="off"`. Authentication, request ids and the last-resort
500 live in one plain ASGI middleware: it sits on every request, so it must be cheap.
"""

from __future__ import annotations

import importlib
import logging
import random
import re
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchingest import __version__, logs, metrics
from batchingest.api import access, areas, auth, docs, events, files, jobs, openapi
from batchingest.api.access import TOKEN_LABEL, AccessLog
from batchingest.api.errors import MAPPED, ApiError, api_error_of
from batchingest.api.paths import job_name, unsafe_url_path
from batchingest.config import Config
from batchingest.connections import BodyTimeout
from batchingest.endpoints import Endpoints
from batchingest.health import Progress, Readiness
from batchingest.store import Store
from batchingest.ui import public as ui_public

log = logging.getLogger("batchingest.api")

REQUEST_ID = "batchingest.request_id"  # scope key
_CLIENT_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
PUBLIC_PATHS = frozenset(openapi.PUBLIC)  # no secrets in them
# Routes a DTS client may call with its own credential (--dts-secret) instead of a token.
DTS_PATHS = ("/dts/staging", "/request_archived_files/")
JDP_STATUS = "/request_archived_files/requests/"

_HTTP_CODES = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    413: "PayloadTooLarge",
    416: "RangeNotSatisfiable",
    500: "InternalError",
    503: "ServiceUnavailable",
}


def _new_request_id() -> str:
    # ids need to be unique, not secret: no system call for them (random reseeds on fork)
    return f"{random.getrandbits(64):016x}"


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-Id if it is a sane one, else a new id."""
    request_id = None
    for key, value in headers:
        if key == b"x-request-id" and _CLIENT_ID.fullmatch(value):
            request_id = value.decode()
    return request_id or _new_request_id()


def error_body(
    scope: Scope, status: int, code: str, message: str, extra: dict[str, Any] | None = None
) -> Response:
    """The one JSON shape of every error, with X-Error-Code."""
    body: dict[str, Any] = {
        "code": code,
        "message": message,
        "request_id": scope.get(REQUEST_ID, ""),
        "resource": scope.get("path", ""),
    }
    if extra:
        for key, value in extra.items():
            body.setdefault(key, value)
    response = jobs.json_response(body, status)
    response.headers["X-Error-Code"] = code
    return response


class ApiMiddleware:
    """Request ids, token checks and a JSON 500 for anything unexpected."""

    def __init__(
        self,
        app: ASGIApp,
        checker: auth.TokenChecker,
        dts: auth.DtsSecret | None = None,
        jdp: bool = False,
        direct: jobs.DirectJobInfo | None = None,
    ) -> None:
        self.app = app
        self.checker = checker
        self.dts = dts
        self.jdp = jdp
        self.direct = direct  # GET /jobs/{id} without the router

    def allowed(self, scope: Scope, path: str) -> bool:
        """May this request go on: a public route, an API token, or a DTS credential."""
        if path in PUBLIC_PATHS or ui_public(path):
            return True
        label = self.checker.label(scope["headers"])
        if label is not None:
            scope[TOKEN_LABEL] = label  # for the access log: which token, never the token
            return True
        if self.jdp and path.startswith(JDP_STATUS) and scope["method"] in ("GET", "HEAD"):
            return True  # the DTS polls without credentials; the ids carry no data
        if self.dts is not None and path.startswith(DTS_PATHS):
            user = self.dts.user(scope["headers"])
            if user is not None:
                scope[auth.REQUESTER] = user
                scope[TOKEN_LABEL] = "dts"
                return True
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope["headers"])
        scope[REQUEST_ID] = request_id
        logs.REQUEST_ID.set(request_id)  # this request's task and threads: every log line
        rid_header = (b"x-request-id", request_id.encode())
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", ()), rid_header]
            await send(message)

        path: str = scope["path"]
        if not self.allowed(scope, path):
            response = error_body(
                scope,
                401,
                # the Globus Transfer API's own code for it, under /globus/
                "AuthenticationFailed" if path.startswith("/globus/") else "Unauthorized",
                "a valid token is required (X-Api-Token or Authorization)",
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="batchingest"'
            await response(scope, receive, send_with_id)
            return
        refusal = _refuse_path(scope, path)
        if refusal is not None:
            await refusal(scope, receive, send_with_id)
            return
        try:
            if self.direct is None or not await self.direct(scope, send_with_id):
                await self.app(scope, receive, send_with_id)
        except BodyTimeout:
            log.warning("request %s: its body stalled past --body-timeout: closed", request_id)
        except ClientDisconnect:
            log.info("request %s: client went away", request_id)
        except Exception:
            log.exception("request %s %s %s failed", request_id, scope["method"], path)
            if not started:
                response = error_body(
                    scope,
                    500,
                    "InternalError",
                    f"internal error; see the service log for {request_id}",
                )
                await response(scope, receive, send_with_id)


def _refuse_path(scope: Scope, path: str) -> Response | None:
    """400 for traversal attempts and bad job ids, before any routing.

    The job id is taken from the raw path, so that an encoded slash (`a%2Ffiles`)
    cannot turn one id into an id plus a route.
    """
    if not (path.startswith("/jobs/") or path.startswith("/dts/")):
        return None
    if unsafe_url_path(path):
        return error_body(
            scope, 400, "InvalidPath", "paths must not contain '.' or '..' segments, NUL or '\\'"
        )
    if path.startswith("/jobs/"):
        raw: bytes = scope.get("raw_path") or path.encode()
        segment = raw[6:].split(b"/", 1)[0]
        if segment:
            try:
                job_name(unquote(segment.decode("ascii"), errors="strict"))
            except (UnicodeDecodeError, ValueError):
                return error_body(scope, 400, "InvalidName", "the job id is not valid")
            except ApiError as e:
                return error_body(scope, e.status, e.code, e.message)
    return None


class QuickJobInfo:
    """GET and HEAD /jobs/{id}, answered by the HTTP protocol from the request head
    alone (batchingest.connections, `quick`): no task, no ASGI messages, no middleware.

    It answers only what DirectJobInfo answers behind ApiMiddleware (a job found, or
    not found), with a valid token, and with the same bytes, headers, access line and
    metrics as the app; any other request (no token, another route, a name to decode,
    an error) it leaves to the app, which answers it as always.
    """

    def __init__(self, checker: auth.TokenChecker, direct: jobs.DirectJobInfo) -> None:
        self.checker = checker
        self.direct = direct

    def __call__(
        self, method: str, target: bytes, headers: list[tuple[bytes, bytes]]
    ) -> jobs.Answer | None:
        path, _, _query = target.partition(b"?")
        # %-escapes and non-ASCII are the app's to decode and refuse
        if not path.startswith(b"/jobs/") or b"%" in path or not path.isascii():
            return None
        t0 = time.perf_counter()
        token = self.checker.label(headers)
        if token is None:
            return None  # the app's 401
        request_id = request_id_of(headers)
        scope = {"method": method, "path": path.decode(), REQUEST_ID: request_id}
        answer = self.direct.answer(scope)
        if answer is None:
            return None
        status, head, body = answer
        head = [*head, (b"x-request-id", request_id.encode())]
        route = self.direct.route.path  # type: ignore[attr-defined]
        access.record(method, route, status, len(body), time.perf_counter() - t0, request_id, token)
        return status, head, body


async def _api_error(request: Request, exc: Exception) -> Response:
    """ApiError, and the store's and access layer's exceptions (errors.api_error_of): every
    route raises them, and they become the JSON error here, in one place."""
    mapped = api_error_of(exc)
    if mapped is None:
        raise exc  # not one the API can explain: the middleware's 500
    exc = mapped
    response = error_body(request.scope, exc.status, exc.code, exc.message, exc.extra)
    for key, value in exc.headers.items():
        response.headers[key] = value
    return response


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    code = _HTTP_CODES.get(status, "HTTPError")
    if status == 404:
        message = f"no route {request.url.path}"
    elif status == 405:
        message = f"{request.method} is not allowed here"
    else:
        message = str(exc.detail)
    response = error_body(request.scope, status, code, message)
    for key, value in (exc.headers or {}).items():
        response.headers[key] = value
    return response


def _staging_routes(cfg: Config, store: Store) -> tuple[list[BaseRoute], dict[str, Any]]:
    try:
        from batchingest.api import staging as staging_api
    except ImportError:
        return [], {}
    return list(staging_api.routes(cfg, store)), dict(getattr(staging_api, "OPENAPI_PATHS", {}))


# uvicorn stops reading a request body once 64 KiB wait unread, and resumes on the next
# receive(): for a GiB upload that is one pause, resume and ASGI message per socket read.
# Letting 2 MiB wait cuts that per-chunk work (about a fifth of the upload's CPU here)
# at the price of 2 MiB of buffer per uploading connection.
BODY_BUFFER = 2 << 20


def _larger_body_buffer() -> None:
    # h11's module only where it is in use already: the service's protocol is httptools'
    for module in ("uvicorn.protocols.http.httptools_impl", "uvicorn.protocols.http.h11_impl"):
        mod = sys.modules.get(module)
        if mod is None and module.endswith("httptools_impl"):
            try:
                mod = importlib.import_module(module)
            except ImportError:
                continue
        if mod is not None and getattr(mod, "HIGH_WATER_LIMIT", BODY_BUFFER) < BODY_BUFFER:
            mod.HIGH_WATER_LIMIT = BODY_BUFFER  # type: ignore[attr-defined]


def _service_routes(document: areas.Once[bytes], readiness: Readiness) -> list[BaseRoute]:
    """/, /healthz, /readyz, /openapi.json and /docs."""

    async def index(request: Request) -> Response:
        return jobs.json_response({"name": "batchingest", "version": __version__})

    async def healthz(request: Request) -> Response:
        # liveness only: the process answers. Whether it can work is /readyz's question.
        return jobs.json_response({"status": "ok"})

    async def readyz(request: Request) -> Response:
        # no token and so no details: the reasons are in the service log
        if await readiness.reasons():
            return error_body(
                request.scope, 503, "NotReady", "not ready to take jobs; see the service log"
            )
        return jobs.json_response({"status": "ready"})

    async def openapi_json(request: Request) -> Response:
        return Response(document.get(), media_type="application/json")

    return [
        Route("/", index, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", docs.page, methods=["GET"]),
    ]


def _documented() -> dict[str, Any]:
    """The operations of the areas made at first use (their modules imported now)."""
    # in this order, whichever area is asked for first: a model's schema takes its place
    # in the document's components when its module is imported, and the document is
    # the same whatever the requests before it
    from batchingest.api import staccato, stuck  # isort: skip
    from batchingest.api import globus

    return {**globus.OPENAPI_PATHS, **events.OPENAPI_PATHS, **staccato.OPENAPI_PATHS,
            **stuck.OPENAPI_PATHS}  # fmt: skip


def _document(cfg: Config, staging_paths: dict[str, Any]) -> areas.Once[bytes]:
    """/openapi.json, from every area's operations."""

    def build() -> bytes:
        extra_paths = {**staging_paths, **_documented()}
        spec = openapi.spec(__version__, extra_paths, staging_ids_are_paths=cfg.catalog is None)
        return bytes(jobs.json_response(spec).body)

    return areas.Once(build)


def _areas(cfg: Config, store: Store) -> dict[str, areas.Area]:
    """The Globus Transfer API, the dashboard, Staccato and /stuck, each made at its
    first request (see batchingest.api.areas)."""
    for ep in Endpoints.from_config(cfg):
        # at start, not at the first Globus request. Not fatal: a network mount may come
        # later; until then its operations say so (502)
        if not ep.path.is_dir():
            log.warning("endpoint %r: %s is not a folder (yet)", ep.name, ep.path)

    def make(module: str) -> Callable[[], list[BaseRoute]]:
        def routes() -> list[BaseRoute]:
            if module.startswith("batchingest.api."):
                _documented()
            made: list[BaseRoute] = importlib.import_module(module).routes(cfg, store)
            return made

        return routes

    return {
        name: areas.Area(prefix, make(module))
        for name, prefix, module in (
            ("globus", "/globus", "batchingest.api.globus"),
            ("ui", "/ui", "batchingest.ui.routes"),
            ("staccato", "/v1/transfers", "batchingest.api.staccato"),
            ("stuck", "/stuck", "batchingest.api.stuck"),
        )
    }


def create_app(cfg: Config, store: Store, readiness: Readiness | None = None) -> ApiApp:
    """The app; `readiness` is the service's (with its loops' heartbeats) if given."""
    _larger_body_buffer()
    if readiness is None:
        readiness = Readiness.for_store(store, cfg.min_free, Progress())
    checker = auth.TokenChecker(auth.load_tokens(cfg, store))
    dts = auth.load_dts_secret(cfg)
    staging_routes, staging_paths = _staging_routes(cfg, store)
    area = _areas(cfg, store)
    routes: list[BaseRoute] = [
        *jobs.routes(cfg, store),
        *files.routes(cfg, store),
        *events.routes(cfg, store),
        *_service_routes(_document(cfg, staging_paths), readiness),
        *staging_routes,
        area["globus"],
        area["ui"],
        area["staccato"],
        *metrics.routes(store),
        area["stuck"],
    ]
    direct = jobs.direct_info(store, routes, _job_not_found)
    app = ApiApp(
        routes=routes,
        middleware=[
            Middleware(AccessLog),  # outermost: it sees every answer, 401s and 500s too
            Middleware(
                ApiMiddleware,
                checker=checker,
                dts=dts,
                jdp=cfg.dts_dialect == "jdp",
                direct=direct,
            ),
        ],
        exception_handlers={
            **dict.fromkeys(MAPPED, _api_error),
            ApiError: _api_error,
            HTTPException: _http_error,
        },
    )
    app.quick = QuickJobInfo(checker, direct)
    return app


class ApiApp(Starlette):
    """The app, and what the HTTP protocol answers without it (`quick`, for uvicorn's
    protocol in batchingest.connections; None: everything goes through the app)."""

    quick: QuickJobInfo | None = None


def _job_not_found(scope: Scope, message: str) -> Response:
    return error_body(scope, 404, "JobNotFound", message)
