"""The HTTP API app in-process: every route and status, auth, error shape, OpenAPI.

Requests go straight to the ASGI app with an exact path (see `call`), against a real
jobs root on disk. Behaviour that needs a real server and real sockets (streaming,
disconnects, concurrency, the processor) is in tests/e2e/test_api_e2e.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import stat
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import pytest
from live_service import TOKEN
from starlette.routing import Route
from starlette.types import ASGIApp

from batchingest import filetimes, fs, metrics
from batchingest.api import areas, auth, jobs, models, openapi
from batchingest.api.app import create_app
from batchingest.api.common import json_dumps
from batchingest.api.errors import ApiError
from batchingest.config import Config
from batchingest.paths import InvalidPath, relpath_segments
from batchingest.store import Store
from batchingest.store import valid_name as store_valid_name

# -- calling the app with an exact path ------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    app: ASGIApp,
    method: str,
    raw_path: str,
    body: bytes = b"",
    token: str | None = TOKEN,
    headers: dict[str, str] | None = None,
    parts: list[bytes] | None = None,
) -> Reply:
    """One request, sent as given: httpx (and TestClient) would normalise `..` away.

    The path is percent-decoded exactly as uvicorn does before it reaches the app.
    With parts, the body is those chunks without a Content-Length, as a chunked upload.
    """
    path, _, query = raw_path.partition("?")
    raw_headers = [(b"host", b"test")]
    if token is not None:
        raw_headers.append((b"x-api-token", token.encode()))
    for key, value in (headers or {}).items():
        raw_headers.append((key.lower().encode(), value.encode()))
    if parts is None:
        raw_headers.append((b"content-length", str(len(body)).encode()))
    messages_in = [body] if parts is None else parts
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(path),
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": raw_headers,
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 1234),
    }
    delivered = 0
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if delivered < len(messages_in):
            delivered += 1
            more = delivered < len(messages_in)
            return {"type": "http.request", "body": messages_in[delivered - 1], "more_body": more}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))  # type: ignore[arg-type]
    start = messages[0]
    return Reply(
        status=start["status"],
        headers={k.decode().lower(): v.decode() for k, v in start["headers"]},
        body=b"".join(m.get("body", b"") for m in messages[1:]),
    )


def make_app(root: Path, **settings: Any) -> tuple[ASGIApp, Store]:
    settings.setdefault("tokens", [TOKEN])
    cfg = Config(root=root, **settings)
    store = Store(root)
    return create_app(cfg, store), store


@pytest.fixture
def api(root: Path) -> tuple[ASGIApp, Store]:
    return make_app(root)


def assert_error(reply: Reply, status: int, code: str) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body)
    body = reply.json()
    assert body["code"] == code
    assert reply.headers["x-error-code"] == code
    assert body["request_id"] == reply.headers["x-request-id"]
    assert body["message"]
    assert body["resource"].startswith("/")
    return body  # type: ignore[no-any-return]


# -- auth ---------------------------------------------------------------------------------

EVERY_ROUTE = [
    ("GET", "/"),
    ("GET", "/jobs"),
    ("GET", "/jobs?limit=1"),
    ("GET", "/jobs/j"),
    ("HEAD", "/jobs/j"),
    ("PUT", "/jobs/j"),
    ("DELETE", "/jobs/j"),
    ("POST", "/jobs/j/queue"),
    ("GET", "/jobs/j/files"),
    ("GET", "/jobs/j/files/"),
    ("GET", "/jobs/j/files/a"),
    ("HEAD", "/jobs/j/files/a"),
    ("PUT", "/jobs/j/files/a"),
    ("DELETE", "/jobs/j/files/a"),
    ("GET", "/no/such/route"),
    ("POST", "/jobs"),
    ("GET", "/dts/anything"),
    ("GET", "/jobs/%2e%2e"),
]


@pytest.mark.parametrize(("method", "path"), EVERY_ROUTE)
def test_every_route_needs_a_token(api: tuple[ASGIApp, Store], method: str, path: str) -> None:
    app, store = api
    store.create("j")
    (store.get("j").path / "a").write_text("keep")
    for token, headers in [
        (None, {}),
        ("wrong", {}),
        (None, {"Authorization": "Bearer wrong"}),
        (None, {"Authorization": f"Basic {TOKEN}"}),
        (TOKEN + "x", {}),
        ("", {}),
    ]:
        reply = call(app, method, path, token=token, headers=headers)
        if method != "HEAD":
            assert_error(reply, 401, "Unauthorized")
        assert reply.status == 401
        assert reply.headers["www-authenticate"].startswith("Bearer")
    # nothing was changed by the refused requests
    assert store.get("j").state == "data"
    assert (store.get("j").path / "a").read_text() == "keep"


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Api-Token": TOKEN},
        {"Authorization": f"Bearer {TOKEN}"},
        {"Authorization": f"bearer  {TOKEN}"},
        {"Authorization": f"Token {TOKEN}"},
    ],
)
def test_accepted_token_forms(api: tuple[ASGIApp, Store], headers: dict[str, str]) -> None:
    app, _ = api
    reply = call(app, "GET", "/jobs", token=None, headers=headers)
    assert reply.status == 200
    assert reply.json() == []


def test_healthz_needs_no_token(api: tuple[ASGIApp, Store]) -> None:
    app, _ = api
    reply = call(app, "GET", "/healthz", token=None)
    assert reply.status == 200
    assert reply.json() == {"status": "ok"}
    assert reply.headers["x-request-id"]


def test_any_of_several_tokens(root: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("# service A\nfile-token-1\n\n  file-token-2  \n#not-a-token\n")
    token_file.chmod(0o640)
    app, _ = make_app(root, tokens=["env-token"], token_file=token_file)
    for good in ("env-token", "file-token-1", "file-token-2"):
        assert call(app, "GET", "/jobs", token=good).status == 200
    for bad in ("#not-a-token", "# service A", "file-token", "env-token2"):
        assert call(app, "GET", "/jobs", token=bad).status == 401


def test_missing_token_file_is_an_error(root: Path, tmp_path: Path) -> None:
    with pytest.raises(auth.TokenError, match="cannot read token file"):
        make_app(root, tokens=[], token_file=tmp_path / "absent")


def test_generated_token_when_none_configured(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    app, store = make_app(root, tokens=[])
    path = store.service_path("api-token")
    token = path.read_text().strip()
    assert len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token not in caplog.text
    assert str(path) in caplog.text
    assert call(app, "GET", "/jobs", token=token).status == 200
    assert call(app, "GET", "/jobs", token=TOKEN).status == 401
    # a restart keeps the same token, so clients configured with it keep working
    app2, _ = make_app(root, tokens=[])
    assert call(app2, "GET", "/jobs", token=token).status == 200
    # hidden: never a job
    assert call(app, "GET", "/jobs", token=token).json() == []


# -- request ids and the error shape ---------------------------------------------------------


def test_request_ids(api: tuple[ASGIApp, Store]) -> None:
    app, _ = api
    ids = {call(app, "GET", "/jobs").headers["x-request-id"] for _ in range(20)}
    assert len(ids) == 20
    # a sane id from a proxy is kept, so logs line up; anything else is replaced
    assert (
        call(app, "GET", "/", headers={"X-Request-Id": "abc-123"}).headers["x-request-id"]
        == "abc-123"
    )
    odd = call(app, "GET", "/", headers={"X-Request-Id": "a b\x7f"}).headers["x-request-id"]
    assert odd != "a b\x7f"


def test_unknown_route_and_wrong_method(api: tuple[ASGIApp, Store]) -> None:
    app, _ = api
    body = assert_error(call(app, "GET", "/nothing/here"), 404, "NotFound")
    assert body["resource"] == "/nothing/here"
    reply = call(app, "POST", "/jobs/x")
    assert_error(reply, 405, "MethodNotAllowed")
    assert set(reply.headers["allow"].split(", ")) == {"GET", "HEAD", "PUT", "DELETE"}
    assert_error(call(app, "PATCH", "/jobs/x/files/a"), 405, "MethodNotAllowed")
    assert_error(call(app, "GET", "/jobs/x/queue"), 405, "MethodNotAllowed")


def test_unexpected_failure_is_a_json_500(
    api: tuple[ASGIApp, Store], caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = api

    async def boom(request: object) -> None:
        raise RuntimeError("surprise")

    app.router.routes.append(Route("/boom", boom))  # type: ignore[attr-defined]
    reply = call(app, "GET", "/boom")
    body = assert_error(reply, 500, "InternalError")
    assert body["request_id"] in body["message"]
    assert body["request_id"] in caplog.text and "surprise" in caplog.text


# -- /, /openapi.json -------------------------------------------------------------------


def test_index(api: tuple[ASGIApp, Store]) -> None:
    app, _ = api
    body = call(app, "GET", "/").json()
    assert body["name"] == "batchingest"
    assert isinstance(body["version"], str) and body["version"]


def test_openapi_documents_every_route(api: tuple[ASGIApp, Store]) -> None:
    app, _ = api
    spec = call(app, "GET", "/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    # the areas made at their first request are documented before any is made
    lazy = [r for r in app.routes if isinstance(r, areas.Area)]  # type: ignore[attr-defined]
    assert {a.prefix for a in lazy} == {"/globus", "/ui", "/v1/transfers", "/stuck"}
    assert not any(a.loaded for a in lazy)
    documented = {(path, method.upper()) for path, ops in spec["paths"].items() for method in ops}
    for route in areas.expanded(app.routes):  # type: ignore[attr-defined]
        assert isinstance(route, Route)
        path = route.path.replace("{path:path}", "{path}")
        path = openapi.ALIASES.get(path, path)  # '/jobs/' is '/jobs': documented once
        if path in ("/globus/{path}", "/ui") or path.startswith("/ui/"):
            # not operations: the Globus routes not served (501, 405, 404), and the
            # dashboard's pages and the API of its own script
            assert path not in spec["paths"], path
            continue
        for method in route.methods or ():
            assert (path, method) in documented, (path, method)
    codes = set(spec["components"]["schemas"]["Error"]["properties"]["code"]["enum"])
    assert {"Unauthorized", "JobNotFound", "InvalidPath", "JobBusy", "DigestMismatch"} <= codes
    # every operation is named, tagged, and says 401 unless it needs no token
    op_ids = [op["operationId"] for ops in spec["paths"].values() for op in ops.values()]
    assert len(op_ids) == len(set(op_ids))
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert op["tags"], (path, method)
            says_401 = "401" in op["responses"] or "default" in op["responses"]
            assert says_401 == (op.get("security") != []), (path, method)
    assert not set(openapi.ALIASES) & set(spec["paths"])


def test_openapi_and_docs_need_no_token(root: Path) -> None:
    app, _ = make_app(root)
    spec = call(app, "GET", "/openapi.json", token=None)
    assert spec.status == 200 and spec.json()["openapi"] == "3.1.0"
    page = call(app, "GET", "/docs", token=None)
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert b"openapi.json" in page.body and b"http" not in page.body.replace(b"http-equiv", b"")
    assert call(app, "GET", "/jobs", token=None).status == 401


def test_openapi_patterns_are_what_the_server_enforces() -> None:
    """The spec's job-name and file-path patterns accept exactly what the server does."""
    # JSON Schema's (ECMA 262) '$' is the end of the string, Python's \Z
    name = re.compile(models.JOB_NAME_PATTERN.replace("$", r"\Z"))
    for raw in ["a", "A.b-c_9", "x" * 255, "", ".a", "x" * 256, "a/b", "a b", "\u00e9", "a\n"]:
        assert bool(name.search(raw)) == store_valid_name(raw), raw
    rel = re.compile(models.FILE_PATH_PATTERN.replace("$", r"\Z"))
    for raw in [
        "a",
        "a/b.c",
        "a/.b",
        ".a",
        "a//b",
        "a/",
        "/a",
        "a/./b",
        "a/../b",
        "a\\b",
        "a\x00b",
        "a\x7fb",
        "\u00e9t\u00e9/x",
        "x" * 255,
        "x" * 256,
        "a/" + "y" * 256,
    ]:
        try:
            relpath_segments(raw)
            ok = True
        except InvalidPath:
            ok = False
        assert bool(rel.search(raw)) == ok, raw


def test_openapi_documents_list_queries(api: tuple[ASGIApp, Store]) -> None:
    app, _ = api
    spec = call(app, "GET", "/openapi.json").json()
    listing = spec["paths"]["/jobs"]["get"]
    params = {p["name"] for p in listing["parameters"]}
    assert {"status", "limit", "offset", "orderby", "filter", "fields"} <= params
    schemas = spec["components"]["schemas"]

    def deref(schema: dict[str, Any]) -> dict[str, Any]:
        ref = schema.get("$ref", "")
        return dict(schemas[ref.rsplit("/", 1)[-1]]) if ref else schema

    row = deref(listing["responses"]["200"]["content"]["application/json"]["schema"]["items"])
    assert {"Name", "Status", "Created", "Modified"} <= set(row["properties"])
    info = spec["paths"]["/jobs/{id}"]["get"]["responses"]["200"]["content"]
    assert {"Created", "Modified"} <= set(deref(info["application/json"]["schema"])["required"])


# -- /jobs ------------------------------------------------------------------------------


def test_list_jobs_empty_is_an_array(api: tuple[ASGIApp, Store]) -> None:
    app, _ = api
    reply = call(app, "GET", "/jobs")
    assert reply.status == 200
    assert reply.body == b"[]\n"
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["x-total-count"] == "0"


def test_list_jobs_sorted_with_statuses(api: tuple[ASGIApp, Store], root: Path) -> None:
    app, store = api
    for name in ("b", "a", "c", "A", "d-1", "e"):
        store.create(name)
    store.queue("b")
    store.move("c", "data", "success")
    store.move("d-1", "data", "error")
    store.move("e", "data", "processing")
    (root / "data" / ".hidden-temp").mkdir()
    (root / "data" / "not-a-job-file").write_text("")
    (root / "success" / "bad name").mkdir()
    jobs = call(app, "GET", "/jobs").json()
    assert jobs == [
        {"Name": "A", "Status": "ready"},
        {"Name": "a", "Status": "ready"},
        {"Name": "b", "Status": "queue"},
        {"Name": "c", "Status": "success"},
        {"Name": "d-1", "Status": "error"},
        {"Name": "e", "Status": "processing"},
    ]
    assert call(app, "GET", "/jobs/").json() == jobs


def test_list_jobs_filter(api: tuple[ASGIApp, Store]) -> None:
    app, store = api
    for name in ("a", "b", "c", "d"):
        store.create(name)
    store.queue("a")
    store.move("b", "data", "error")
    store.move("c", "data", "success")
    reply = call(app, "GET", "/jobs?status=queue,error")
    assert [j["Name"] for j in reply.json()] == ["a", "b"]
    assert reply.headers["x-total-count"] == "2"
    assert call(app, "GET", "/jobs?status=ready").json() == [{"Name": "d", "Status": "ready"}]
    assert_error(call(app, "GET", "/jobs?status=done"), 400, "InvalidParameter")


def test_list_jobs_paging(api: tuple[ASGIApp, Store]) -> None:
    app, store = api
    names = [f"job-{i:02d}" for i in range(25)]
    for i, name in enumerate(names):
        store.create(name)
        if i % 3 == 1:
            store.move(name, "data", "success")
    seen: list[str] = []
    url = "/jobs?limit=10"
    pages = 0
    while url:
        reply = call(app, "GET", url)
        assert reply.status == 200
        assert reply.headers["x-total-count"] == "25"
        seen += [j["Name"] for j in reply.json()]
        pages += 1
        link = reply.headers.get("link")
        url = link.split(">")[0].lstrip("<") if link else ""
        if url:
            assert link.endswith('rel="next"')  # type: ignore[union-attr]
    assert pages == 3
    assert seen == names
    assert [j["Name"] for j in call(app, "GET", "/jobs?offset=20").json()] == names[20:]
    assert call(app, "GET", "/jobs?limit=5&offset=100").json() == []
    assert_error(call(app, "GET", "/jobs?limit=-1"), 400, "InvalidParameter")
    assert_error(call(app, "GET", "/jobs?offset=x"), 400, "InvalidParameter")


def test_list_sees_changes_at_once(api: tuple[ASGIApp, Store]) -> None:
    app, store = api
    for i in range(5):
        store.create(f"j{i}")
        assert len(call(app, "GET", "/jobs?limit=100").json()) == i + 1
    store.delete("j0")
    assert [j["Name"] for j in call(app, "GET", "/jobs?limit=100").json()] == [
        "j1",
        "j2",
        "j3",
        "j4",
    ]


# -- /jobs queries: orderby, filter, fields ------------------------------------------------


def _stamp(text: str) -> float:
    assert text.endswith("Z") and len(text) == len("2026-01-02T03:04:05.678Z"), text
    return datetime.fromisoformat(text[:-1] + "+00:00").timestamp()


def _jobs_in_order(store: Store, *moves: tuple[str, str]) -> None:
    """Create each job and move it, with a pause, so their times differ."""
    for name, state in moves:
        store.create(name)
        if state != "data":
            store.move(name, "data", state)
        time.sleep(0.02)


def test_job_info_has_created_and_modified(api: tuple[ASGIApp, Store], root: Path) -> None:
    app, _ = api
    before = time.time()
    info = call(app, "PUT", "/jobs/j").json()
    after = time.time()
    created, modified = _stamp(info["Created"]), _stamp(info["Modified"])
    assert before - 0.01 <= created <= modified <= after + 0.01
    time.sleep(0.05)
    moved = call(app, "POST", "/jobs/j/queue").json()
    # a rename into another state folder changes the folder's ctime, not its birth
    assert _stamp(moved["Modified"]) >= modified + 0.04
    if filetimes.folder_times(str(root / "queue" / "j")).birth:  # type: ignore[union-attr]
        assert moved["Created"] == info["Created"]
    # the listing shows the same times
    listed = call(app, "GET", "/jobs?fields=Name,Created,Modified").json()
    assert listed == [{"Name": "j", "Created": moved["Created"], "Modified": moved["Modified"]}]
    shown = call(app, "GET", "/jobs/j").json()
    assert (shown["Created"], shown["Modified"]) == (moved["Created"], moved["Modified"])
    time.sleep(0.05)
    (root / "queue" / "j" / "new-file").write_bytes(b"")  # an entry added: a new ctime
    again = call(app, "GET", "/jobs/j").json()
    assert _stamp(again["Modified"]) >= _stamp(moved["Modified"]) + 0.04


def test_list_without_queries_is_unchanged(api: tuple[ASGIApp, Store]) -> None:
    app, store = api
    _jobs_in_order(store, ("b", "error"), ("a", "data"))
    assert call(app, "GET", "/jobs").body == (
        b'[{"Name":"a","Status":"ready"},{"Name":"b","Status":"error"}]\n'
    )


def test_list_orderby(api: tuple[ASGIApp, Store]) -> None:
    app, store = api
    _jobs_in_order(store, ("c", "success"), ("a", "error"), ("d", "data"), ("b", "queue"))

    def names(query: str) -> list[str]:
        reply = call(app, "GET", "/jobs?" + query)
        assert reply.status == 200, reply.body
        return [j["Name"] for j in reply.json()]

    assert names("orderby=name") == ["a", "b", "c", "d"]
    assert names("orderby=name%20desc") == ["d", "c", "b", "a"]
    assert names("orderby=modified") == ["c", "a", "d", "b"]
    assert names("orderby=modified%20DESC") == ["b", "d", "a", "c"]
    assert names("orderby=created") == ["c", "a", "d", "b"]
    # status words alphabetically: error, queue, ready, success
    assert names("orderby=status") == ["a", "b", "d", "c"]
    assert names("orderby=status%20desc,name") == ["c", "d", "b", "a"]
    # the same name in two states: by name, then the state order of the plain listing
    (store.root / "success" / "a").mkdir()
    assert call(app, "GET", "/jobs?orderby=name&fields=Name,Status").json()[:2] == [
        {"Name": "a", "Status": "success"},
        {"Name": "a", "Status": "error"},
    ]


def test_list_filter(api: tuple[ASGIApp, Store]) -> None:
    app, store = api
    _jobs_in_order(store, ("x-1", "success"), ("x-2", "error"), ("y-1", "data"), ("y-2", "queue"))
    times = {
        j["Name"]: j["Modified"] for j in call(app, "GET", "/jobs?fields=Name,Modified").json()
    }

    def names(flt: str, extra: str = "") -> list[str]:
        reply = call(app, "GET", f"/jobs?filter={quote(flt)}{extra}")
        assert reply.status == 200, reply.body
        assert reply.headers["x-total-count"] == str(len(reply.json()))
        return [j["Name"] for j in reply.json()]

    assert names("status:queue,error") == ["x-2", "y-2"]
    assert names("name:~x") == ["x-1", "x-2"]
    assert names("name:!~x") == ["y-1", "y-2"]
    assert names("name:=y-1") == ["y-1"]
    assert names("name:!=y-1") == ["x-1", "x-2", "y-2"]
    assert names("name:x-1,y-2") == ["x-1", "y-2"]
    assert names("status:queue,error/name:~x") == ["x-2"]
    # several filter parameters are alternatives
    assert names("name:~x", "&filter=status:queue") == ["x-1", "x-2", "y-2"]
    # ranges are inclusive, either end may be empty; a time shown matches its own job
    assert names(f"modified:{times['x-2']},{times['y-1']}") == ["x-2", "y-1"]
    assert names(f"modified:{times['x-2']},{times['x-2']}") == ["x-2"]
    assert names(f"modified:,{times['x-2']}") == ["x-1", "x-2"]
    assert names(f"modified:{times['y-1']},") == ["y-1", "y-2"]
    assert names("modified:2000-01-01,2000-01-02 00:00:00") == []
    assert names("created:2000-01-01T00:00:00+02:00,") == ["x-1", "x-2", "y-1", "y-2"]
    # combined with ?status= both must hold
    assert names("name:~y", "&status=ready") == ["y-1"]


def test_list_fields(api: tuple[ASGIApp, Store]) -> None:
    app, store = api
    _jobs_in_order(store, ("a", "success"))
    assert call(app, "GET", "/jobs?fields=Status").json() == [{"Status": "success"}]
    row = call(app, "GET", "/jobs?fields=modified,NAME,Created,Status").json()[0]
    assert list(row) == ["Name", "Status", "Created", "Modified"]
    assert call(app, "GET", "/jobs?fields=").json() == [{"Name": "a", "Status": "success"}]
    assert call(app, "GET", "/jobs?orderby=name").json() == [{"Name": "a", "Status": "success"}]


def test_list_queries_page_with_every_parameter_kept(api: tuple[ASGIApp, Store]) -> None:
    app, store = api
    for i in range(12):
        _jobs_in_order(store, (f"j{i:02d}", "success" if i % 2 else "error"))
    url = "/jobs?status=success,error&filter=name:~j&orderby=modified%20desc&fields=Name&limit=5"
    seen: list[str] = []
    while url:
        reply = call(app, "GET", url)
        assert reply.status == 200, reply.body
        assert reply.headers["x-total-count"] == "12"
        seen += [j["Name"] for j in reply.json()]
        link = reply.headers.get("link")
        url = link.split(">")[0].lstrip("<") if link else ""
        if url:
            assert "orderby=" in url and "filter=" in url and "fields=" in url and "status=" in url
    assert seen == [f"j{i:02d}" for i in reversed(range(12))]


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("filter=colour:red", "'colour'"),
        ("filter=name", "'name'"),
        ("filter=status:done", "'done'"),
        ("filter=modified:yesterday,", "'yesterday'"),
        ("filter=modified:2026-01-01", "FROM,TO"),
        ("filter=created:2026-13-01,", "2026-13-01"),
        ("orderby=size", "'size'"),
        ("orderby=name%20sideways", "'name sideways'"),
        ("orderby=name%20asc%20twice", "'name asc twice'"),
        ("fields=Name,Colour", "'Colour'"),
        ("fields=Events2", "'Events2'"),
    ],
)
def test_list_query_errors_name_the_wrong_part(
    api: tuple[ASGIApp, Store], query: str, names: str
) -> None:
    app, store = api
    store.create("a")
    body = assert_error(call(app, "GET", "/jobs?" + query), 400, "InvalidParameter")
    assert names in body["message"], body["message"]
    assert (store.root / "data" / "a").is_dir()  # nothing lost


# -- /jobs/{id} -------------------------------------------------------------------------------


def test_job_lifecycle(api: tuple[ASGIApp, Store], root: Path) -> None:
    app, store = api
    assert_error(call(app, "GET", "/jobs/j"), 404, "JobNotFound")
    assert call(app, "HEAD", "/jobs/j").status == 404
    reply = call(app, "PUT", "/jobs/j", b"ignored body")
    assert reply.status == 201
    assert reply.headers["location"] == "/jobs/j"
    body = reply.json()
    assert set(body) == {"Name", "Status", "Created", "Modified", "Events", "Todo", "Finished"}
    assert body | {"Created": 0, "Modified": 0} == {
        "Name": "j", "Status": "ready", "Created": 0, "Modified": 0, "Events": 0,
        "Todo": ["start"], "Finished": [],
    }  # fmt: skip
    assert (root / "data" / "j").is_dir()
    assert os.listdir(root / "data" / "j") == []
    # idempotent: 200, nothing changes, in every state
    (root / "data" / "j" / "f").write_text("x")
    assert call(app, "PUT", "/jobs/j").status == 200
    assert (root / "data" / "j" / "f").read_text() == "x"
    store.move("j", "data", "success")
    reply = call(app, "PUT", "/jobs/j")
    assert reply.status == 200
    assert reply.json()["Status"] == "success"
    assert not (root / "data" / "j").exists()
    assert call(app, "GET", "/jobs/j").json()["Status"] == "success"
    head = call(app, "HEAD", "/jobs/j")
    assert head.status == 200
    assert int(head.headers["content-length"]) > 0
    assert call(app, "DELETE", "/jobs/j").status == 204
    assert not (root / "success" / "j").exists()
    assert call(app, "DELETE", "/jobs/j").status == 204
    assert_error(call(app, "GET", "/jobs/j"), 404, "JobNotFound")


def test_job_info_reads_job_file(api: tuple[ASGIApp, Store]) -> None:
    app, store = api
    job, _ = store.create("j")
    (job.path / "JOB").write_text('{"Todo": ["b", "c"], "Finished": [{"task": "a"}], "x": 1}')
    info = call(app, "GET", "/jobs/j").json()
    assert {k: v for k, v in info.items() if k not in ("Created", "Modified", "Events")} == {
        "Name": "j",
        "Status": "ready",
        "Todo": ["b", "c"],
        "Finished": [{"task": "a"}],
    }
    (job.path / "JOB").write_text("{broken")
    body = call(app, "GET", "/jobs/j").json()
    assert body["Todo"] is None and "not valid JSON" in body["JobError"]


JOB_CONTENTS = [
    None,  # no JOB: the default task list
    b'{"Todo": ["b", "c"], "Finished": [{"task": "a", "exit": 0}], "x": 1}',
    b'{"Todo": [], "Finished": []}',
    # texts that need escaping, or none; numbers json writes in its own way
    '{"Todo": ["t"], "Finished": [{"n\u00e4me": "\u00fc\\"\\u0001\\u2028/"}]}'.encode(),
    b'{"Todo": ["t"], "Finished": [{"f": 1e400, "g": NaN, "h": 1.50, "i": 123456789012345678901}]}',
    b'{"Todo": ["t"], "Finished": ["' + b"y" * 5000 + b'"]}',  # too large to be kept
    b"{broken",
    b'{"Todo": ["../x"]}',
    b'{"Todo": "start"}',
]


@pytest.mark.parametrize("content", JOB_CONTENTS)
def test_job_info_json_is_the_encoding_of_the_info(
    api: tuple[ASGIApp, Store], content: bytes | None
) -> None:
    """The document GET /jobs/{id} puts together from parts is byte for byte the
    encoding of the job's info, also when the task lists come from a JOB seen before."""
    _, store = api
    job, _ = store.create("j")
    (job.path / ".events").write_bytes(b"{}\n" * 3)
    if content is not None:
        (job.path / "JOB").write_bytes(content)
    found = store.open_state("j")
    assert found is not None
    state, fd = found
    try:
        for _ in range(2):  # the second time from what was kept
            expected = json_dumps(jobs.folder_info("j", state, fd))
            assert jobs.folder_info_json("j", state, fd) == expected
        assert json.loads(expected)["Events"] == 3
    finally:
        os.close(fd)


@pytest.mark.parametrize("content", [b"{broken", b'{"Todo": "start"}', b'{"Todo": ["t"]}'])
def test_job_info_json_reads_job_once(
    api: tuple[ASGIApp, Store], content: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JOB that is not valid is read once, as a valid one is: the document is built
    from what was read, not by reading the job folder again."""
    _, store = api
    job, _ = store.create("j")
    (job.path / "JOB").write_bytes(content)
    reads: list[str] = []
    read_file = fs.read_file

    def counted(dir_fd: int, name: str, limit: int) -> bytes | None:
        reads.append(name)
        return read_file(dir_fd, name, limit)

    monkeypatch.setattr(fs, "read_file", counted)
    found = store.open_state("j")
    assert found is not None
    state, fd = found
    try:
        body = jobs.folder_info_json("j", state, fd)
    finally:
        os.close(fd)
    assert reads == ["JOB"]
    assert ("JobError" in json.loads(body)) is (content != b'{"Todo": ["t"]}')


def test_job_info_is_answered_before_routing_as_the_route_would(
    api: tuple[ASGIApp, Store],
) -> None:
    app, store = api
    job, _ = store.create("j")
    (job.path / "JOB").write_text('{"Todo": ["b"], "Finished": [{"task": "a"}]}')
    route = next(r for r in app.router.routes if getattr(r, "path", None) == "/jobs/{id}")  # type: ignore[attr-defined]
    counted = {"method": "GET", "route": "/jobs/{id}", "status": "200"}
    before = metrics.REGISTRY.get_sample_value("batchingest_http_requests_total", counted) or 0
    for method in ("GET", "HEAD"):
        direct = call(app, method, "/jobs/j")
        routed = call(route, method, "/jobs/j")
        assert direct.status == routed.status == 200
        assert direct.body == routed.body and json.loads(direct.body)["Todo"] == ["b"]
        assert {k: v for k, v in direct.headers.items() if k != "x-request-id"} == routed.headers
        assert direct.headers["x-request-id"]
    after = metrics.REGISTRY.get_sample_value("batchingest_http_requests_total", counted)
    assert after == before + 1  # by its route template, as a routed request
    # a job that is not there: the route's 404, from one look instead of two
    counted["status"] = "404"
    before = metrics.REGISTRY.get_sample_value("batchingest_http_requests_total", counted) or 0
    with pytest.raises(ApiError) as raised:  # the route's answer, before the error handler
        call(route, "GET", "/jobs/nothere")
    assert (raised.value.status, raised.value.code) == (404, "JobNotFound")
    for method in ("GET", "HEAD"):
        direct = call(app, method, "/jobs/nothere", headers={"X-Request-Id": "r1"})
        assert direct.status == 404 and direct.headers["x-error-code"] == "JobNotFound"
        assert json.loads(direct.body) == {
            "code": "JobNotFound",
            "message": raised.value.message,
            "request_id": "r1",
            "resource": "/jobs/nothere",
        }
    after = metrics.REGISTRY.get_sample_value("batchingest_http_requests_total", counted)
    assert after == before + 1  # the GET, under the route's template
    # without the route the job is still answered, and only what the route would answer
    app.router.routes.remove(route)  # type: ignore[attr-defined]
    assert call(app, "GET", "/jobs/j?anything=1").status == 200
    assert_error(call(app, "GET", "/jobs/nothere"), 404, "JobNotFound")
    assert_error(call(app, "GET", "/jobs/j/"), 404, "NotFound")
    assert_error(call(app, "POST", "/jobs/j"), 404, "NotFound")
    assert_error(call(app, "GET", "/jobs/.j"), 400, "InvalidName")
    assert_error(call(app, "GET", "/jobs/j", token="wrong"), 401, "Unauthorized")


def test_job_info_follows_every_change_of_job_it_does_not_read_again(
    api: tuple[ASGIApp, Store],
) -> None:
    """An unchanged JOB is not read again (its lstat says so); any change is seen."""
    app, store = api
    job, _ = store.create("j")
    path = job.path / "JOB"

    def todo() -> object:
        reply = call(app, "GET", "/jobs/j")
        assert reply.status == 200
        return json.loads(reply.body).get("Todo")

    path.write_text('{"Todo": ["aa"], "Finished": []}')
    assert todo() == ["aa"] and todo() == ["aa"]
    # the same size and the same mtime, written in place: ctime still moves
    st = path.stat()
    with open(path, "r+b") as f:
        f.write(b'{"Todo": ["bb"]')
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert todo() == ["bb"]
    # replaced by another file of the same size
    tmp = job.path / "JOB.new"
    tmp.write_text('{"Todo": ["cc"], "Finished": []}')
    os.replace(tmp, path)
    assert todo() == ["cc"]
    # replaced by a FIFO: never opened, reported
    path.unlink()
    os.mkfifo(path)
    reply = call(app, "GET", "/jobs/j")
    assert reply.status == 200 and "JobError" in json.loads(reply.body)
    path.unlink()
    assert todo() == ["start"]  # no JOB: the default task list


def test_delete_busy_job(api: tuple[ASGIApp, Store], root: Path) -> None:
    app, store = api
    store.create("j")
    store.move("j", "data", "processing")
    assert_error(call(app, "DELETE", "/jobs/j"), 409, "JobBusy")
    assert (root / "processing" / "j").is_dir()
    # a held job (a processor's lock) in queue/ is busy too
    store.create("k")
    store.queue("k")
    hold = store.claim("k")
    assert hold is not None
    try:
        assert_error(call(app, "DELETE", "/jobs/k"), 409, "JobBusy")
    finally:
        hold.release()
    # queued but not held: deleting is fine
    store.create("q")
    store.queue("q")
    assert call(app, "DELETE", "/jobs/q").status == 204
    assert not (root / "queue" / "q").exists()


def test_queue(api: tuple[ASGIApp, Store], root: Path) -> None:
    app, store = api
    assert_error(call(app, "POST", "/jobs/nope/queue"), 404, "JobNotFound")
    for state in ("data", "error", "success"):
        name = f"from-{state}"
        store.create(name)
        if state != "data":
            store.move(name, "data", state)
        reply = call(app, "POST", f"/jobs/{name}/queue")
        assert reply.status == 202
        assert reply.json()["Status"] == "queue"
        assert (root / "queue" / name).is_dir()
        # again: already queued, no effect
        reply = call(app, "POST", f"/jobs/{name}/queue")
        assert reply.status == 200
        assert reply.json()["Status"] == "queue"
    store.create("p")
    store.move("p", "data", "processing")
    reply = call(app, "POST", "/jobs/p/queue")
    assert reply.status == 200
    assert reply.json()["Status"] == "processing"
    assert (root / "processing" / "p").is_dir()


BAD_NAMES = [".", "..", "%2e%2e", "%2E%2e", ".hidden", "a%2Fb", "a b", "%00", "a%00b",
             "%5C..", "..%5C", "x" * 256, "%C3%A9", "a%5Cb", "-%2e%2e-%2F"]  # fmt: skip


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize(
    ("method", "suffix"),
    [("GET", ""), ("PUT", ""), ("DELETE", ""), ("POST", "/queue"), ("GET", "/files"),
     ("GET", "/files/a"), ("PUT", "/files/a"), ("DELETE", "/files/a")],
)  # fmt: skip
def test_invalid_job_names(
    api: tuple[ASGIApp, Store], root: Path, name: str, method: str, suffix: str
) -> None:
    app, _ = api
    before = sorted(p.name for p in root.iterdir())
    reply = call(app, method, f"/jobs/{name}{suffix}", b"x")
    assert reply.status == 400, (reply.status, reply.body)
    assert reply.json()["code"] in ("InvalidName", "InvalidPath")
    assert sorted(p.name for p in root.iterdir()) == before
    assert all(not any((root / s).iterdir()) for s in ("data", "queue", "success", "error"))


# -- files ---------------------------------------------------------------------------------------


def visible(path: Path) -> list[str]:
    """Entries of a folder as the API shows them: the job's .lock and temporaries hidden."""
    return sorted(n for n in os.listdir(path) if not n.startswith("."))


def digest_header(data: bytes) -> str:
    return "sha-256=:" + base64.b64encode(hashlib.sha256(data).digest()).decode() + ":"


def test_file_roundtrip(api: tuple[ASGIApp, Store], root: Path) -> None:
    app, store = api
    store.create("j")
    assert_error(call(app, "PUT", "/jobs/nope/files/a", b"x"), 404, "JobNotFound")
    assert_error(call(app, "GET", "/jobs/nope/files"), 404, "JobNotFound")
    data = os.urandom(10_000)
    reply = call(app, "PUT", "/jobs/j/files/sub/dir/f.bin", data)
    assert reply.status == 201
    assert reply.json() == {
        "path": "sub/dir/f.bin",
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    assert reply.headers["location"] == "/jobs/j/files/sub/dir/f.bin"
    assert (root / "data" / "j" / "sub" / "dir" / "f.bin").read_bytes() == data
    reply = call(app, "PUT", "/jobs/j/files/sub/dir/f.bin", b"new", headers={
        "Content-Digest": digest_header(b"new")})  # fmt: skip
    assert reply.status == 200
    got = call(app, "GET", "/jobs/j/files/sub/dir/f.bin")
    assert got.status == 200
    assert got.body == b"new"
    assert got.headers["content-type"] == "application/octet-stream"
    assert got.headers["content-length"] == "3"
    assert got.headers["etag"].startswith('"')
    assert got.headers["last-modified"].endswith("GMT")
    assert call(app, "GET", "/jobs/j/files").json() == ["sub"]
    assert call(app, "GET", "/jobs/j/files/").json() == ["sub"]
    assert call(app, "GET", "/jobs/j/files/sub").json() == ["dir"]
    assert call(app, "GET", "/jobs/j/files/sub/").json() == ["dir"]
    assert_error(call(app, "GET", "/jobs/j/files/absent"), 404, "FileNotFound")
    assert_error(call(app, "GET", "/jobs/j/files/sub/dir/f.bin/x"), 404, "FileNotFound")
    # no temporary files left behind
    assert visible(root / "data" / "j" / "sub" / "dir") == ["f.bin"]


def test_listing_hides_hidden_and_sorts(api: tuple[ASGIApp, Store]) -> None:
    app, store = api
    job, _ = store.create("j")
    for name in ("b", "a", "C", ".upload-123", ".lock", "_x"):
        (job.path / name).write_text("")
    (job.path / "dir").mkdir()
    assert call(app, "GET", "/jobs/j/files").json() == ["C", "_x", "a", "b", "dir"]


def test_head_and_ranges(api: tuple[ASGIApp, Store]) -> None:
    app, store = api
    job, _ = store.create("j")
    data = bytes(range(256)) * 4
    (job.path / "f").write_bytes(data)
    head = call(app, "HEAD", "/jobs/j/files/f")
    assert head.status == 200 and head.body == b""
    assert head.headers["content-length"] == "1024"
    assert head.headers["accept-ranges"] == "bytes"
    etag = head.headers["etag"]
    cases = {
        "bytes=0-9": (206, data[:10], "bytes 0-9/1024"),
        "bytes=1000-": (206, data[1000:], "bytes 1000-1023/1024"),
        "bytes=-24": (206, data[-24:], "bytes 1000-1023/1024"),
        "bytes=1020-5000": (206, data[1020:], "bytes 1020-1023/1024"),
        "bytes=0-0,5-6": (200, data, None),
        "items=0-4": (200, data, None),
        "bytes=-0": (416, None, "bytes */1024"),
    }
    for value, (status, body, content_range) in cases.items():
        reply = call(app, "GET", "/jobs/j/files/f", headers={"Range": value})
        assert reply.status == status, value
        if body is not None:
            assert reply.body == body, value
            assert reply.headers["content-length"] == str(len(body))
        assert reply.headers.get("content-range") == content_range, value
    assert_error(
        call(app, "GET", "/jobs/j/files/f", headers={"Range": "bytes=1024-"}),
        416,
        "RangeNotSatisfiable",
    )
    # If-Range with a stale validator: the whole file
    stale = call(app, "GET", "/jobs/j/files/f", headers={"Range": "bytes=0-1", "If-Range": '"x"'})
    assert stale.status == 200 and stale.body == data
    fresh = call(app, "GET", "/jobs/j/files/f", headers={"Range": "bytes=0-1", "If-Range": etag})
    assert fresh.status == 206 and fresh.body == data[:2]
    assert call(app, "GET", "/jobs/j/files/f", headers={"If-None-Match": etag}).status == 304
    empty = job.path / "empty"
    empty.write_bytes(b"")
    reply = call(app, "GET", "/jobs/j/files/empty")
    assert reply.status == 200 and reply.body == b"" and reply.headers["content-length"] == "0"


def test_digest_mismatch_changes_nothing(api: tuple[ASGIApp, Store]) -> None:
    app, store = api
    job, _ = store.create("j")
    (job.path / "f").write_bytes(b"old")
    reply = call(app, "PUT", "/jobs/j/files/f", b"new", headers={
        "Content-Digest": digest_header(b"other")})  # fmt: skip
    assert_error(reply, 400, "DigestMismatch")
    assert (job.path / "f").read_bytes() == b"old"
    reply = call(app, "PUT", "/jobs/j/files/g", b"new", headers={
        "Content-Digest": "sha-512=:AAAA:, sha-256=" + digest_header(b"x")[8:]})  # fmt: skip
    assert_error(reply, 400, "DigestMismatch")
    assert not (job.path / "g").exists()
    for bad in ("sha-256=abc", "sha-256=:!!!:", "sha-256=:AAAA:"):
        reply = call(app, "PUT", "/jobs/j/files/g", b"x", headers={"Content-Digest": bad})
        assert_error(reply, 400, "InvalidDigest")
    assert visible(job.path) == ["f"]
    # the folders a failed upload made are gone again; those that were there stay
    (job.path / "was").mkdir()
    for path in ("new/deep/g.txt", "was/new/deep/g.txt"):
        reply = call(app, "PUT", f"/jobs/j/files/{path}", b"new", headers={
            "Content-Digest": digest_header(b"other")})  # fmt: skip
        assert_error(reply, 400, "DigestMismatch")
    assert visible(job.path) == ["f", "was"]
    assert os.listdir(job.path / "was") == []
    assert call(app, "GET", "/jobs/j/files").json() == ["f", "was"]
    # an algorithm we do not check is ignored, as RFC 9530 allows
    ok = call(app, "PUT", "/jobs/j/files/g", b"x", headers={"Content-Digest": "sha-512=:AA==:"})
    assert ok.status == 201


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "JSON object"),
        (b'{"Todo": "start"}', "list of task names"),
        (b'{"Todo": ["ok", "../bad"]}', "not a valid task name"),
        (b'{"Todo": [1]}', "not a valid task name"),
        (b'{"Finished": {}}', "Finished must be a list"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_job_file_validated(api: tuple[ASGIApp, Store], content: bytes, reason: str) -> None:
    app, store = api
    job, _ = store.create("j")
    (job.path / "JOB").write_text('{"Todo": ["start"]}')
    body = assert_error(call(app, "PUT", "/jobs/j/files/JOB", content), 400, "InvalidJobFile")
    assert reason in body["message"]
    assert (job.path / "JOB").read_text() == '{"Todo": ["start"]}'
    assert visible(job.path) == ["JOB"]


def test_valid_job_file_and_job_elsewhere(api: tuple[ASGIApp, Store]) -> None:
    app, store = api
    store.create("j")
    assert call(app, "PUT", "/jobs/j/files/JOB", b'{"Todo": ["a", "b"], "Z": 1}').status == 201
    assert call(app, "GET", "/jobs/j").json()["Todo"] == ["a", "b"]
    # only the top-level JOB is the job's task list
    assert call(app, "PUT", "/jobs/j/files/sub/JOB", b"anything").status == 201


def test_max_upload(root: Path) -> None:
    app, store = make_app(root, max_upload=10)
    job, _ = store.create("j")
    assert call(app, "PUT", "/jobs/j/files/ok", b"0123456789").status == 201
    assert_error(call(app, "PUT", "/jobs/j/files/big", b"0123456789a"), 413, "PayloadTooLarge")
    assert visible(job.path) == ["ok"]
    # refused while streaming (no Content-Length to refuse it up front): no folders left
    reply = call(app, "PUT", "/jobs/j/files/new/deep/big", parts=[b"01234", b"56789", b"a"])
    assert_error(reply, 413, "PayloadTooLarge")
    assert visible(job.path) == ["ok"]


def test_upload_conflicts(api: tuple[ASGIApp, Store]) -> None:
    app, store = api
    job, _ = store.create("j")
    (job.path / "dir").mkdir()
    (job.path / "file").write_text("x")
    assert_error(call(app, "PUT", "/jobs/j/files/dir", b"x"), 409, "IsADirectory")
    assert_error(call(app, "PUT", "/jobs/j/files/file/x", b"x"), 409, "NotADirectory")
    assert (job.path / "file").read_text() == "x"


def test_delete_files(api: tuple[ASGIApp, Store]) -> None:
    app, store = api
    job, _ = store.create("j")
    (job.path / "f").write_text("x")
    (job.path / "empty").mkdir()
    (job.path / "full" / "deep").mkdir(parents=True)
    (job.path / "full" / "deep" / "g").write_text("y")
    assert call(app, "DELETE", "/jobs/j/files/f").status == 204
    assert not (job.path / "f").exists()
    assert call(app, "DELETE", "/jobs/j/files/f").status == 204
    assert call(app, "DELETE", "/jobs/j/files/nothing/here").status == 204
    assert call(app, "DELETE", "/jobs/j/files/empty").status == 204
    assert not (job.path / "empty").exists()
    assert_error(call(app, "DELETE", "/jobs/j/files/full"), 409, "NotEmpty")
    assert (job.path / "full" / "deep" / "g").exists()
    assert call(app, "DELETE", "/jobs/j/files/full?recursive=true").status == 204
    assert not (job.path / "full").exists()
    assert job.path.is_dir()
    assert_error(call(app, "DELETE", "/jobs/nope/files/f"), 404, "JobNotFound")


@pytest.mark.parametrize("state", ["queue", "processing"])
def test_busy_job_files_are_read_only(api: tuple[ASGIApp, Store], root: Path, state: str) -> None:
    app, store = api
    job, _ = store.create("j")
    (job.path / "LOG").write_text("line 1\n")
    (job.path / "d").mkdir()
    store.move("j", "data", state)
    path = root / state / "j"
    assert_error(call(app, "PUT", "/jobs/j/files/new", b"x"), 409, "JobBusy")
    assert_error(call(app, "PUT", "/jobs/j/files/LOG", b"x"), 409, "JobBusy")
    assert_error(call(app, "DELETE", "/jobs/j/files/LOG"), 409, "JobBusy")
    assert_error(call(app, "DELETE", "/jobs/j/files/d"), 409, "JobBusy")
    assert visible(path) == ["LOG", "d"]
    # reading is fine in every state
    assert call(app, "GET", "/jobs/j/files/LOG").body == b"line 1\n"
    assert call(app, "GET", "/jobs/j/files").json() == ["LOG", "d"]


@pytest.mark.parametrize("state", ["data", "success", "error"])
def test_idle_job_files_can_change(api: tuple[ASGIApp, Store], root: Path, state: str) -> None:
    app, store = api
    store.create("j")
    if state != "data":
        store.move("j", "data", state)
    assert call(app, "PUT", "/jobs/j/files/new", b"x").status == 201
    assert (root / state / "j" / "new").read_bytes() == b"x"
    assert call(app, "DELETE", "/jobs/j/files/new").status == 204
    assert not (root / state / "j" / "new").exists()
    assert visible(root / state / "j") == []


def test_held_job_files_are_read_only(api: tuple[ASGIApp, Store]) -> None:
    """A processor that holds a job (its lock) blocks changes even before the rename."""
    app, store = api
    store.create("j")
    store.queue("j")
    hold = store.claim("j")
    assert hold is not None
    try:
        assert_error(call(app, "PUT", "/jobs/j/files/x", b"x"), 409, "JobBusy")
    finally:
        hold.release()


def test_fifos_never_hang_the_server(api: tuple[ASGIApp, Store]) -> None:
    """A task may leave a named pipe behind; reading it would block the event loop."""
    app, store = api
    job, _ = store.create("j")
    os.mkfifo(job.path / "pipe")
    os.mkfifo(job.path / "JOB")
    assert_error(call(app, "GET", "/jobs/j/files/pipe"), 404, "FileNotFound")
    info = call(app, "GET", "/jobs/j").json()
    assert info["Todo"] is None and info["JobError"]
    assert call(app, "GET", "/jobs/j/files").json() == ["JOB", "pipe"]


def test_job_names_reused_only_while_unchanged(api: tuple[ASGIApp, Store], root: Path) -> None:
    """Paging must not rescan a large, settled state folder, yet never show a stale list."""
    app, store = api
    for i in range(3):
        (root / "success" / f"old-{i}").mkdir()
    past = time.time() - 10
    os.utime(root / "success", (past, past))
    first = store.job_names("success")
    assert first == ["old-0", "old-1", "old-2"]
    assert store.job_names("success") is first  # reused: no rescan
    (root / "success" / "new").mkdir()
    assert store.job_names("success") == ["new", "old-0", "old-1", "old-2"]
    # a folder changed within the last second is always rescanned
    assert store.job_names("success") is not store.job_names("success")
    names = [j["Name"] for j in call(app, "GET", "/jobs?limit=2&offset=1").json()]
    assert names == ["old-0", "old-1"]


# -- the trust boundary: links, odd names, huge numbers, long paths --------------------------


def test_non_utf8_names_are_left_out_of_listings(api: tuple[ASGIApp, Store]) -> None:
    """A name no URL can carry (not UTF-8) used to make the listing answer 500."""
    app, store = api
    job, _ = store.create("j")
    (job.path / "ok.txt").write_text("x")
    os.mkdir(os.path.join(os.fsencode(job.path), b"sub"))
    open(os.path.join(os.fsencode(job.path), b"bad-\xff\xfe"), "wb").close()
    open(os.path.join(os.fsencode(job.path), b"sub/\xc3\x28"), "wb").close()
    reply = call(app, "GET", "/jobs/j/files")
    assert reply.status == 200, reply.body
    assert reply.json() == ["ok.txt", "sub"]
    assert call(app, "GET", "/jobs/j/files/sub").json() == []


@pytest.mark.parametrize(
    ("value", "status"),
    [("bytes=" + "9" * 5000 + "-", 416), ("bytes=0-" + "9" * 5000, 206),
     ("bytes=-" + "9" * 5000, 206), ("bytes=" + "0" * 5000 + "1-", 206),
     ("bytes=" + "9" * 5000 + "-" + "9" * 5001, 416)],
)  # fmt: skip
def test_range_numbers_of_any_length(api: tuple[ASGIApp, Store], value: str, status: int) -> None:
    """int() refuses numbers of more than 4300 digits: such a Range answered 500."""
    app, store = api
    job, _ = store.create("j")
    (job.path / "f").write_bytes(b"0123456789")
    reply = call(app, "GET", "/jobs/j/files/f", headers={"Range": value})
    assert reply.status == status, reply.body[:200]
    if status == 416:
        assert_error(reply, 416, "RangeNotSatisfiable")
        assert len(reply.json()["message"]) < 300
    else:
        assert reply.body in (b"0123456789", b"123456789")


def test_content_length_of_any_length(root: Path) -> None:
    app, store = make_app(root, max_upload=10)
    store.create("j")
    reply = call(app, "PUT", "/jobs/j/files/f", headers={"Content-Length": "9" * 5000})
    assert_error(reply, 413, "PayloadTooLarge")


def test_paths_as_long_as_the_rules_allow(api: tuple[ASGIApp, Store], root: Path) -> None:
    """Root + job + path beyond PATH_MAX answered 500; paths are now opened beneath the job
    folder, so only the relative path's own length counts, and past the limit it is a 400."""
    app, store = api
    job, _ = store.create("j")
    deep = "/".join(["d" * 250] * 16 + ["e" * 79])  # 4095 bytes: with the root's, beyond 4096
    assert len(deep.encode()) == 4095
    reply = call(app, "PUT", f"/jobs/j/files/{deep}", b"deep")
    assert reply.status == 201, reply.body
    assert call(app, "GET", f"/jobs/j/files/{deep}").body == b"deep"
    assert call(app, "HEAD", f"/jobs/j/files/{deep}").status == 200
    assert call(app, "GET", f"/jobs/j/files/{deep.rpartition('/')[0]}").json() == ["e" * 79]
    assert call(app, "DELETE", f"/jobs/j/files/{deep}").status == 204
    too_long = deep + "x"
    for method in ("GET", "PUT", "DELETE"):
        body = assert_error(
            call(app, method, f"/jobs/j/files/{too_long}", b"x"), 400, "InvalidPath"
        )
        assert "longer than 4095 bytes" in body["message"]
    assert call(app, "DELETE", "/jobs/j/files/" + "d" * 250 + "?recursive=true").status == 204
    assert visible(job.path) == []


def test_put_job_over_a_link_in_data(
    api: tuple[ASGIApp, Store], root: Path, tmp_path: Path
) -> None:
    """`PUT /jobs/X` where data/X is a symbolic link answered 200 with the outside JOB."""
    app, _ = api
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "JOB").write_text('{"Todo": ["secret-task"], "Secret": 1}')
    os.symlink(outside, root / "data" / "x")
    reply = call(app, "PUT", "/jobs/x")
    assert_error(reply, 409, "Conflict")
    assert b"secret" not in reply.body
    assert_error(call(app, "GET", "/jobs/x"), 404, "JobNotFound")
    assert_error(call(app, "GET", "/jobs/x/files/JOB"), 404, "JobNotFound")
    assert_error(call(app, "PUT", "/jobs/x/files/new", b"x"), 404, "JobNotFound")
    assert sorted(os.listdir(outside)) == ["JOB"]


def test_job_file_that_is_a_link_is_not_followed(
    api: tuple[ASGIApp, Store], tmp_path: Path
) -> None:
    app, store = api
    job, _ = store.create("j")
    (tmp_path / "secret.json").write_text('{"Todo": ["outside-task"]}')
    os.symlink(tmp_path / "secret.json", job.path / "JOB")
    info = call(app, "GET", "/jobs/j").json()
    assert info["Todo"] is None and "symbolic link" in info["JobError"]
    assert b"outside-task" not in call(app, "GET", "/jobs/j").body
    assert_error(call(app, "GET", "/jobs/j/files/JOB"), 400, "InvalidPath")


def test_store_and_access_errors_are_mapped_in_one_place(api: tuple[ASGIApp, Store]) -> None:
    """Exceptions of the store and of batchingest.fs reach the client as JSON errors
    through the app's exception handlers, not by hand in every route."""
    from batchingest import fs
    from batchingest.paths import InvalidPath
    from batchingest.store import InvalidName, JobBusy, JobNotFound

    app, _ = api
    cases: list[tuple[Exception, int, str]] = [
        (JobBusy("busy"), 409, "JobBusy"),
        (JobNotFound("none"), 404, "JobNotFound"),
        (InvalidName("bad"), 400, "InvalidName"),
        (InvalidPath("bad"), 400, "InvalidPath"),
        (fs.UnsafePath(40, "a symbolic link is in the way", "a/b"), 400, "InvalidPath"),
        (fs.NotRegular(22, "not a regular file (named pipe)", "p"), 404, "FileNotFound"),
        (fs.TooLarge(27, "larger than 10 bytes", "JOB"), 413, "PayloadTooLarge"),
        (OSError(36, "File name too long"), 400, "InvalidPath"),
        (OSError(28, "No space left on device"), 507, "InsufficientStorage"),
    ]
    for i, (exc, status, code) in enumerate(cases):

        async def boom(request: object, exc: Exception = exc) -> None:
            raise exc

        app.router.routes.append(Route(f"/boom{i}", boom))  # type: ignore[attr-defined]
        assert_error(call(app, "GET", f"/boom{i}"), status, code)


def test_reading_a_fifo_never_opens_it(api: tuple[ASGIApp, Store]) -> None:
    """Opening a FIFO, even with O_NONBLOCK, wakes a writer waiting on it (and opening a
    device can act on it): a read looks at what a name is before opening anything."""
    import threading

    app, store = api
    job, _ = store.create("j")
    fifo = job.path / "pipe"
    os.mkfifo(fifo)
    opened = threading.Event()

    def writer() -> None:
        fd = os.open(fifo, os.O_WRONLY)  # blocks until someone opens it for reading
        opened.set()
        os.close(fd)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    time.sleep(0.1)
    body = assert_error(call(app, "GET", "/jobs/j/files/pipe"), 404, "FileNotFound")
    assert "named pipe" in body["message"]
    assert not opened.wait(0.3), "the FIFO was opened"
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # let the writer go
    thread.join(5)
    os.close(reader)


@pytest.mark.parametrize("unnamed", [None, False])
def test_upload_into_a_job_deleted_meanwhile_is_404(
    store: Store, monkeypatch: pytest.MonkeyPatch, unnamed: bool | None
) -> None:
    from batchingest.api import upload
    from batchingest.api.errors import ApiError

    monkeypatch.setattr(upload, "_unnamed", unnamed)
    job, _ = store.create("j")
    job_fd = store.open_job(job)
    try:
        store.delete("j")
        up = upload.Upload(store, job, job_fd, ["sub", "f"])
        with pytest.raises(ApiError) as caught:
            up.open()
        up.close()
        assert (caught.value.status, caught.value.code) == (404, "JobNotFound")
    finally:
        os.close(job_fd)
    assert store.find("j") is None


# -- the contract: strict parameters, 405 with Allow, conditional requests -------------


def test_unknown_boolean_words_are_400_and_remove_nothing(api: tuple[ASGIApp, Store]) -> None:
    app, store = api
    job, _ = store.create("j")
    (job.path / "d").mkdir()
    (job.path / "d" / "f").write_bytes(b"x")
    for word in ("garbage", "", "ture", "2"):
        reply = call(app, "DELETE", f"/jobs/j/files/d?recursive={word}")
        assert_error(reply, 400, "InvalidParameter")
    assert (job.path / "d" / "f").read_bytes() == b"x"
    assert_error(call(app, "DELETE", "/jobs/j/files/d?recursive=false"), 409, "NotEmpty")
    assert call(app, "DELETE", "/jobs/j/files/d?recursive=TRUE").status == 204
    assert not (job.path / "d").exists()


def test_methods_not_served_are_405_with_every_allowed_method(
    api: tuple[ASGIApp, Store],
) -> None:
    app, store = api
    store.create("j")
    for method in ("PUT", "DELETE"):
        reply = call(app, method, "/jobs/j/files/")
        assert_error(reply, 405, "MethodNotAllowed")
        assert reply.headers["allow"] == "GET, HEAD"
    reply = call(app, "OPTIONS", "/jobs/j/files/a")
    assert_error(reply, 405, "MethodNotAllowed")
    assert set(reply.headers["allow"].split(", ")) == {"GET", "HEAD", "PUT", "DELETE"}


def test_staging_path_answers_405_with_get_and_post(tmp_path: Path) -> None:
    root = tmp_path / "root"
    Store(root).init()
    (tmp_path / "archive").mkdir()
    (tmp_path / "staging").mkdir()
    app, _ = make_app(root, archive=tmp_path / "archive", staging=tmp_path / "staging")
    for method in ("OPTIONS", "PUT", "DELETE"):
        reply = call(app, method, "/dts/staging")
        assert_error(reply, 405, "MethodNotAllowed")
        assert set(reply.headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}


def test_if_none_match_star_and_if_modified_since(api: tuple[ASGIApp, Store]) -> None:
    """RFC 9110 13.1.2 and 13.1.3."""
    app, store = api
    job, _ = store.create("j")
    (job.path / "f").write_bytes(b"data")
    os.utime(job.path / "f", (1_700_000_000, 1_700_000_000))
    first = call(app, "GET", "/jobs/j/files/f")
    etag, modified = first.headers["etag"], first.headers["last-modified"]

    def status(**headers: str) -> int:
        return call(app, "GET", "/jobs/j/files/f", headers=headers).status

    assert status(**{"If-None-Match": "*"}) == 304
    assert status(**{"If-None-Match": f'"other", W/{etag}'}) == 304  # weak comparison
    assert status(**{"If-None-Match": '"other"'}) == 200
    assert status(**{"If-Modified-Since": modified}) == 304
    assert status(**{"If-Modified-Since": "Tue, 14 Nov 2023 22:13:19 GMT"}) == 200  # older
    assert status(**{"If-Modified-Since": "not a date"}) == 200
    assert status(**{"If-Modified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"}) == 200  # future
    # If-None-Match wins over If-Modified-Since
    assert status(**{"If-None-Match": '"other"', "If-Modified-Since": modified}) == 200
    assert call(app, "GET", "/jobs/j/files/nope", headers={"If-None-Match": "*"}).status == 404


def test_paging_numbers_in_other_scripts_are_400_not_500(api: tuple[ASGIApp, Store]) -> None:
    app, _ = api
    for value in (
        "%C2%B2",
        "%D9%A3",
        "%EF%BC%91",
    ):  # superscript two, Arabic-Indic three, fullwidth one
        assert_error(call(app, "GET", f"/jobs?limit={value}"), 400, "InvalidParameter")
        assert_error(call(app, "GET", f"/jobs?offset={value}"), 400, "InvalidParameter")
