"""API areas whose code is imported at their first request, and the OpenAPI document made
at its first request: idle memory.

Most installations never call the Globus Transfer API, Staccato, the dashboard or
GET /stuck, yet their modules (handlers, msgspec models, the Globus operations' part of
the document) and the document built at start took about 1.6 MiB of every API
process's memory. An `Area` stands in the app's routes, in the place of the routes it
stands for, for every path under its prefix: the first request whose path is under it
imports the area's module and makes its routes (`make`), once; from then on it matches
and answers exactly as those routes, in their order (404, 405 and the area's own
fallbacks alike). A path outside the prefix never loads anything.

What must be known at start stays at start: the settings check the endpoint names (a
bad or twice given one fails the start) and create_app warns of a missing endpoint
folder, before any area is made. The OpenAPI document (a `Once` in app.py) is built
from every area's table of operations at the first GET /openapi.json, so it is the
same document as before, whichever routes were used or not.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from starlette.datastructures import URLPath
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import Receive, Scope, Send

_CHOSEN = "batchingest.area_route"  # scope key: the area's route that matched
T = TypeVar("T")


class Once(Generic[T]):
    """What `make()` gives, made at the first ask (one thread at a time) and kept."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make: Callable[[], T] | None = make
        self._value: T | None = None
        self._lock = threading.Lock()

    @property
    def done(self) -> bool:
        return self._make is None

    def get(self) -> T:
        if self._make is not None:
            with self._lock:
                if self._make is not None:
                    self._value = self._make()
                    self._make = None
        return self._value  # type: ignore[return-value]  # made above


class Area(BaseRoute):
    """The routes under `prefix` (the path itself, or below it), made at first use."""

    def __init__(self, prefix: str, make: Callable[[], list[BaseRoute]]) -> None:
        self.prefix = prefix
        self._routes = Once(make)

    @property
    def routes(self) -> list[BaseRoute]:
        """The area's routes, made now if no request has made them yet."""
        return self._routes.get()

    @property
    def loaded(self) -> bool:
        return self._routes.done

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


def expanded(routes: list[BaseRoute]) -> list[BaseRoute]:
    """routes with every area replaced by its own routes (made now if need be)."""
    out: list[BaseRoute] = []
    for route in routes:
        out.extend(route.routes if isinstance(route, Area) else [route])
    return out
