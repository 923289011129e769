"""batchingest.api.areas: the Globus Transfer API, the dashboard, Staccato and /stuck are
made at their first request, answer it as they answer every later one, and are in the
OpenAPI document before any of them is made."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from starlette.types import ASGIApp
from test_api import Reply, call, make_app

from batchingest.api import areas
from batchingest.store import Store

PREFIXES = {"/globus", "/ui", "/v1/transfers", "/stuck"}

# (method, path, status): each an area's first request, found or not, allowed or not
FIRST_REQUESTS = [
    ("GET", "/stuck", 200),
    ("POST", "/stuck", 405),
    ("GET", "/v1/transfers", 200),
    ("PATCH", "/v1/transfers/00000000-0000-4000-8000-000000000000", 405),
    ("GET", "/v1/transfers/00000000-0000-4000-8000-000000000000", 404),
    ("GET", "/globus/v0.10/endpoint/data", 200),
    ("GET", "/globus/v0.10/operation/endpoint/data/ls?path=/", 200),
    ("GET", "/globus/v0.10/no-such-thing", 404),
    ("POST", "/globus/v0.10/endpoint/data", 405),
    ("GET", "/ui/api/overview", 200),
    ("GET", "/ui/login", 200),
    ("GET", "/ui/nothing", 404),
]


def lazy_areas(app: ASGIApp) -> dict[str, areas.Area]:
    return {r.prefix: r for r in app.routes if isinstance(r, areas.Area)}  # type: ignore[attr-defined]


def make(tmp_path: Path, name: str) -> tuple[ASGIApp, Store]:
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    (folder / "a.txt").write_text("a")
    app, store = make_app(tmp_path / name, endpoints=[("data", folder)])
    store.init()
    return app, store


def answer(app: ASGIApp, method: str, path: str) -> Reply:
    # the same request id both times, so that error documents are equal byte for byte
    return call(app, method, path, headers={"X-Request-Id": "first-request-1"})


@pytest.mark.parametrize(("method", "path", "status"), FIRST_REQUESTS)
def test_an_area_answers_its_first_request_as_it_answers_later(
    tmp_path: Path, method: str, path: str, status: int
) -> None:
    fresh, _ = make(tmp_path, "fresh")
    made, _ = make(tmp_path, "made")
    areas.expanded(made.routes)  # type: ignore[attr-defined]  # every area made beforehand
    assert all(a.loaded for a in lazy_areas(made).values())
    assert not any(a.loaded for a in lazy_areas(fresh).values())

    first = answer(fresh, method, path)
    later = answer(made, method, path)
    assert first.status == status, (first.status, first.body)
    assert (first.status, first.body) == (later.status, later.body)
    assert first.headers == later.headers
    loaded = {prefix for prefix, area in lazy_areas(fresh).items() if area.loaded}
    assert loaded == {next(p for p in PREFIXES if path.startswith(p))}


def test_a_path_outside_every_area_makes_none(tmp_path: Path) -> None:
    app, _ = make(tmp_path, "root")
    for method, path, status in [
        ("GET", "/jobs", 200),
        ("GET", "/healthz", 200),
        ("GET", "/globusx", 404),
        ("GET", "/uix/a", 404),
        ("GET", "/stuckness", 404),
        ("GET", "/v1/transfersx", 404),
        ("GET", "/openapi.json", 200),
    ]:
        reply = call(app, method, path)
        assert reply.status == status, (path, reply.status, reply.body)
        if status == 404:
            assert reply.json()["code"] == "NotFound"  # the app's, not the Globus form
    assert not any(a.loaded for a in lazy_areas(app).values())


def test_the_document_lists_every_area_before_any_is_made(tmp_path: Path) -> None:
    fresh, _ = make(tmp_path, "fresh")
    spec = call(fresh, "GET", "/openapi.json").json()
    assert set(lazy_areas(fresh)) == PREFIXES
    assert not any(a.loaded for a in lazy_areas(fresh).values())
    for path in (
        "/stuck",
        "/v1/transfers",
        "/v1/transfers/{id}",
        "/globus/v0.10/endpoint/{endpoint}",
    ):
        assert path in spec["paths"], path
    made, _ = make(tmp_path, "made")
    areas.expanded(made.routes)  # type: ignore[attr-defined]
    assert call(made, "GET", "/openapi.json").body == call(fresh, "GET", "/openapi.json").body


DOCUMENT_AFTER = """
import sys
import subprocess
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_api import call, make_app
app, store = make_app(Path({root!r}), endpoints=[("data", Path({root!r}))])
store.init()
for path in sys.argv[1:]:
    call(app, "GET", path)
sys.stdout.buffer.write(call(app, "GET", "/openapi.json").body)
"""


def test_the_document_is_the_same_whichever_area_came_first(tmp_path: Path) -> None:
    # fresh interpreters: the areas' modules imported by the first request
    code = DOCUMENT_AFTER.format(tests=str(Path(__file__).parent), root=str(tmp_path / "root"))
    bodies = {
        first: subprocess.run(
            [sys.executable, "-c", code, *first], capture_output=True, check=True, timeout=60
        ).stdout
        for first in [(), ("/globus/v0.10/endpoint/data",), ("/stuck", "/v1/transfers")]
    }
    assert len(set(bodies.values())) == 1 and b'"/stuck"' in bodies[()]
