"""The dashboard's routes: the page shells, their static files and /ui/api/.

See the package's docstring for how the token is kept and sent."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from batchingest import __version__
from batchingest.api.common import json_response, run_blocking
from batchingest.api.errors import ApiError
from batchingest.api.paths import job_name, segments
from batchingest.config import Config
from batchingest.store import STATE_OF_STATUS, State, Store
from batchingest.ui import data

if TYPE_CHECKING:
    from starlette.templating import Jinja2Templates

HERE = Path(__file__).parent
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _states(raw: str | None) -> tuple[State, ...]:
    if not raw:
        return tuple(State)
    states = []
    for word in raw.split(","):
        state = STATE_OF_STATUS.get(word.strip())
        if state is None:
            known = ", ".join(STATE_OF_STATUS)
            raise ApiError(400, "InvalidParameter", f"unknown status {word[:50]!r} (use {known})")
        if state not in states:
            states.append(state)
    return tuple(states)


def _number(request: Request, key: str, default: int, most: int) -> int:
    raw = request.query_params.get(key, "")
    if raw == "":
        return default
    if not raw.isdigit() or len(raw) > 9 or int(raw) > most:
        raise ApiError(400, "InvalidParameter", f"{key} must be a whole number up to {most}")
    return int(raw)


def list_query(request: Request) -> data.ListQuery:
    sort = request.query_params.get("sort") or "name"
    if sort not in data.SORTS:
        raise ApiError(400, "InvalidParameter", f"sort must be one of {', '.join(data.SORTS)}")
    text = request.query_params.get("q", "")
    if len(text) > 255:
        raise ApiError(400, "InvalidParameter", "q is at most 255 characters")
    return data.ListQuery(
        states=_states(request.query_params.get("status")),
        text=text,
        sort=sort,
        offset=_number(request, "offset", 0, 10**9),
        limit=_number(request, "limit", 50, data.MAX_LIST) or 50,
    )


STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


def static_files() -> dict[str, Response]:
    """The script and style sheet, read once: a fixed set, so no request names a path."""
    files = {}
    for path in sorted((HERE / "static").iterdir()):
        media = STATIC_TYPES.get(path.suffix)
        if media is not None:
            headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
            files[path.name] = Response(path.read_bytes(), 200, headers, media_type=media)
    return files


class Dashboard:
    """The pages (HTML shells) and the small JSON reads they make."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.times = data.ChangeTimes(store)
        self.files = static_files()

    @cached_property
    def templates(self) -> Jinja2Templates:
        """Made at the first page asked for: Jinja2 costs the service ~1.5 MiB of memory,
        which an install whose dashboard nobody opens need not pay."""
        import jinja2
        from starlette.templating import Jinja2Templates

        # every value a template prints is escaped: job names, messages
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, auto_reload=False
        )
        return Jinja2Templates(env=env)

    def page(self, request: Request, template: str, **context: Any) -> Response:
        context.update(version=__version__)
        response = self.templates.TemplateResponse(request, template, context)
        response.headers.update(PAGE_HEADERS)
        return response

    async def overview_page(self, request: Request) -> Response:
        return self.page(request, "overview.html", page="overview", title="Overview")

    async def login_page(self, request: Request) -> Response:
        return self.page(request, "login.html", page="login", title="Log in")

    async def jobs_page(self, request: Request) -> Response:
        return self.page(request, "jobs.html", page="jobs", title="Jobs")

    async def job_page(self, request: Request) -> Response:
        name = job_name(request.path_params["id"])
        return self.page(request, "job.html", page="job", title=name, job=name)

    # listing 100,000 names or statting new jobs takes milliseconds: off the event loop
    async def overview(self, request: Request) -> Response:
        return json_response(await run_blocking(data.overview, self.store, self.times))

    async def jobs(self, request: Request) -> Response:
        query = list_query(request)
        return json_response(await run_blocking(data.list_jobs, self.store, self.times, query))

    async def entries(self, request: Request) -> Response:
        name = job_name(request.path_params["id"])
        parts = segments(request.query_params.get("path", ""), allow_empty=True)
        try:  # JobBusy and the like are mapped by the app's exception handlers
            found = await run_blocking(data.folder_entries, self.store, name, parts)
        except (FileNotFoundError, NotADirectoryError):
            raise ApiError(404, "FileNotFound", "no such folder in the job") from None
        except OSError as e:  # a link on the way (UnsafePath), unreadable
            raise ApiError(400, "InvalidPath", e.strerror or str(e)) from None
        if found is None:
            raise ApiError(404, "JobNotFound", f"no job named {name!r}")
        return json_response(found)

    async def static(self, request: Request) -> Response:
        found = self.files.get(request.path_params["name"])
        if found is None:
            raise ApiError(404, "NotFound", f"no route {request.url.path}")
        return found

    async def requeue_failed(self, request: Request) -> Response:
        return json_response(await run_blocking(data.requeue_failed, self.store))


def routes(cfg: Config, store: Store) -> list[BaseRoute]:
    ui = Dashboard(store)
    return [
        Route("/ui", ui.overview_page, methods=["GET"]),
        Route("/ui/", ui.overview_page, methods=["GET"]),
        Route("/ui/login", ui.login_page, methods=["GET"]),
        Route("/ui/jobs", ui.jobs_page, methods=["GET"]),
        Route("/ui/jobs/{id}", ui.job_page, methods=["GET"]),
        Route("/ui/api/overview", ui.overview, methods=["GET"]),
        Route("/ui/api/jobs", ui.jobs, methods=["GET"]),
        Route("/ui/api/jobs/{id}/entries", ui.entries, methods=["GET"]),
        Route("/ui/api/requeue-failed", ui.requeue_failed, methods=["POST"]),
        Route("/ui/static/{name}", ui.static, methods=["GET"]),
    ]
