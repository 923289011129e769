"""API areas whose code is imported at their first request, and the OpenAPI document made
at its first request: idle memory.

Most installations never call the Globus Transfer API, Staccato, the dashboard or
GET /stuck, yet their modules (handlers, msgspec models, the Globus operations' part of
the document) took close to 1 MiB of every API process's memory from its start. An
`Area` stands in the app's routes, in the place of the routes it stands for, for every
path under its prefix: the first request whose path is under it imports the area's
module and makes its routes (`make`), once; from then on it matches and answers exactly
as those routes, in their order (404, 405 and the area's own fallbacks alike). A path
outside the prefix never loads anything.

What must be known at start stays at start: create_app checks the endpoints (a bad or
twice given name fails the start, a missing folder is warned of) before any area is
made. The OpenAPI document (`Document`) is built from every area's table of operations
at the first GET /openapi.json, so it is the same document as before, whichever routes
were used or not.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from starlette.datastructures import URLPath
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import Receive, Scope, Send

_CHOSEN = "batchingest.area_route"  # scope key: the area's route that matched


class Area(BaseRoute):
    """The routes under `prefix` (the path itself, or below it), made at first use."""

    def __init__(self, prefix: str, make: Callable[[], list[BaseRoute]]) -> None:
        self.prefix = prefix
        self._make: Callable[[], list[BaseRoute]] | None = make
        self._routes: list[BaseRoute] = []
        self._lock = threading.Lock()

    @property
    def routes(self) -> list[BaseRoute]:
        """The area's routes, made now if no request has made them yet."""
        if self._make is not None:
            with self._lock:
                if self._make is not None:
                    self._routes = self._make()
                    self._make = None
        return self._routes

    @property
    def loaded(self) -> bool:
        return self._make is None

    def covers(self, path: str) -> bool:
        return path == self.prefix or path.startswith(self.prefix + "/")

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http" or not self.covers(scope["path"]):
            return Match.NONE, {}
        partial: tuple[Scope, BaseRoute] | None = None
        for route in self.routes:  # as the router would go through them
            match, child = route.matches(scope)
            if match == Match.FULL:
                return Match.FULL, {**child, _CHOSEN: route}
            if match == Match.PARTIAL and partial is None:
                partial = ({**child, _CHOSEN: route}, route)
        if partial is not None:
            return Match.PARTIAL, partial[0]
        return Match.NONE, {}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        route: BaseRoute = scope[_CHOSEN]
        await route.handle(scope, receive, send)

    def url_path_for(self, name: str, /, **path_params: Any) -> URLPath:
        for route in self.routes:
            try:
                return route.url_path_for(name, **path_params)
            except NoMatchFound:
                pass
        raise NoMatchFound(name, path_params)


class Document:
    """The OpenAPI document's bytes, built by `build` at the first request for it."""

    def __init__(self, build: Callable[[], bytes]) -> None:
        self._build: Callable[[], bytes] | None = build
        self._body = b""
        self._lock = threading.Lock()

    @property
    def body(self) -> bytes:
        if self._build is not None:
            with self._lock:
                if self._build is not None:
                    self._body = self._build()
                    self._build = None
        return self._body


def expanded(routes: list[BaseRoute]) -> list[BaseRoute]:
    """routes with every area replaced by its own routes (made now if need be)."""
    out: list[BaseRoute] = []
    for route in routes:
        out.extend(route.routes if isinstance(route, Area) else [route])
    return out
