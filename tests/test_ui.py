"""The dashboard's routes in-process, against a real jobs root on disk.

What the browser does with them is in tests/e2e/test_ui_browser.py.
"""

from __future__ import annotations

import fnmatch
import os
import random
import statistics
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest
from live_service import TOKEN
from starlette.types import ASGIApp
from test_api import assert_error, call, make_app

from batchingest.store import State, Store
from batchingest.ui import data

REPO = Path(__file__).resolve().parent.parent
UI = REPO / "batchingest" / "ui"


@pytest.fixture
def app(root: Path) -> tuple[ASGIApp, Store]:
    return make_app(root)


def jobs(root: Path, state: str, *names: str) -> None:
    for name in names:
        (root / state / name).mkdir()


# -- pages and who may see what ------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/ui", "/ui/", "/ui/login", "/ui/jobs", "/ui/jobs/some-job", "/ui/static/ui.js"]
)
def test_pages_need_no_token_and_hold_no_data(app: tuple[ASGIApp, Store], path: str) -> None:
    reply = call(app[0], "GET", path, token=None)
    assert reply.status == 200, reply.body
    if path.startswith("/ui/static/"):
        assert reply.headers["content-type"].startswith(
            ("text/javascript", "application/javascript")
        )
        return
    assert reply.headers["content-type"].startswith("text/html")
    csp = reply.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "frame-ancestors 'none'" in csp
    assert reply.headers["x-frame-options"] == "DENY"
    assert reply.headers["referrer-policy"] == "no-referrer"
    assert b"<script>" not in reply.body  # no inline script: the CSP forbids it
    assert "set-cookie" not in reply.headers


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/ui/api/overview"),
        ("GET", "/ui/api/jobs"),
        ("GET", "/ui/api/jobs/j/entries"),
        ("POST", "/ui/api/requeue-failed"),
        ("GET", "/ui/jobs/j/more"),  # not a page: no way around the token below /ui/jobs/
        ("GET", "/ui/api"),
        ("GET", "/uix"),
    ],
)
def test_data_needs_the_token(
    root: Path, app: tuple[ASGIApp, Store], method: str, path: str
) -> None:
    jobs(root, "error", "j")
    assert_error(call(app[0], method, path, token=None), 401, "Unauthorized")
    assert_error(call(app[0], method, path, token="wrong"), 401, "Unauthorized")
    assert (root / "error" / "j").is_dir()  # the refused requeue moved nothing


def test_job_page_checks_the_name(app: tuple[ASGIApp, Store]) -> None:
    assert_error(call(app[0], "GET", "/ui/jobs/.hidden", token=None), 400, "InvalidName")
    reply = call(app[0], "GET", "/ui/jobs/a-job_1.x", token=None)
    assert b'data-job="a-job_1.x"' in reply.body


def test_templates_and_static_files_are_package_data() -> None:
    """Every file the pages need is matched by pyproject's package-data, so a wheel has it."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["batchingest.ui"]
    shipped = [p.relative_to(UI).as_posix() for p in UI.rglob("*") if p.is_file()]
    needed = [p for p in shipped if p.startswith(("templates/", "static/"))]
    assert any(p.endswith(".html") for p in needed) and "static/ui.js" in needed
    for rel in needed:
        assert any(fnmatch.fnmatch(rel, pat) for pat in patterns), rel


def test_nothing_from_a_cdn() -> None:
    for path in [*UI.glob("templates/*.html"), *UI.glob("static/*")]:
        text = path.read_text()
        assert "http://" not in text and "https://" not in text, path


# -- overview ------------------------------------------------------------------------------


def test_overview_counts_and_the_last_hour(root: Path, app: tuple[ASGIApp, Store]) -> None:
    jobs(root, "data", "d1", "d2")
    jobs(root, "queue", "q1")
    jobs(root, "processing", "p1")
    jobs(root, "success", "s1", "s2", "s3")
    jobs(root, "error", "e1")
    (root / "success" / ".hidden").mkdir()  # never a job
    (root / "success" / "stray-file").write_text("x")  # not a folder: not a job
    body = call(app[0], "GET", "/ui/api/overview").json()
    assert body["counts"] == {"ready": 2, "queue": 1, "processing": 1, "success": 3, "error": 1}
    assert body["total"] == 8
    hour = body["hour"]
    assert (hour["finished"], hour["success"], hour["error"]) == (4, 3, 1)
    assert len(hour["buckets"]) == data.BUCKETS
    assert sum(b["success"] for b in hour["buckets"]) == 3
    assert hour["buckets"][-1]["error"] == 1  # just now: the last bar
    assert body["processing"] == ["p1"]
    assert [e["name"] for e in body["recent_errors"]] == ["e1"]


def test_jobs_older_than_an_hour_are_not_counted(root: Path, store: Store) -> None:
    jobs(root, "success", "old")
    later = time.time() + data.HOUR + 5
    body = data.overview(store, data.ChangeTimes(store), now=later)
    assert body["counts"]["success"] == 1
    assert body["hour"]["finished"] == 0
    assert body["recent_errors"] == []


def test_staging_requests_are_the_uuid_named_jobs(root: Path, store: Store) -> None:
    running = "0b9a3c1e-8d2f-4c55-9a77-0123456789ab"
    done = "1b9a3c1e-8d2f-4c55-9a77-0123456789ab"
    jobs(root, "processing", running, "not-a-request")
    jobs(root, "success", done)
    body = data.overview(store, data.ChangeTimes(store))
    assert body["staging"] == [
        {"id": running, "status": "processing"},
        {"id": done, "status": "success"},
    ]


def test_change_times_look_only_at_new_jobs(root: Path, store: Store) -> None:
    times = data.ChangeTimes(store)
    jobs(root, "success", "a")
    first = times.of(State.SUCCESS)
    assert set(first) == {"a"}
    jobs(root, "success", "b")
    os.rename(root / "success" / "a", root / "error" / "a")
    second = times.of(State.SUCCESS)
    assert set(second) == {"b"}
    assert set(times.of(State.ERROR)) == {"a"}
    ctime = os.stat(root / "success" / "b", follow_symlinks=False).st_ctime
    assert second["b"] == ctime


def test_a_link_in_a_state_folder_is_no_job(root: Path, store: Store, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "success" / "linked")
    assert data.overview(store, data.ChangeTimes(store))["counts"]["success"] == 0


def test_overview_is_fast_with_many_jobs(root: Path, app: tuple[ASGIApp, Store]) -> None:
    """p50 of the overview with many jobs (BATCHINGEST_UI_JOBS, default 10,000; the
    README's figure is for 100,000), after the first call has seen every job once."""
    count = int(os.environ.get("BATCHINGEST_UI_JOBS", "10000"))
    states = ["success"] * 8 + ["error", "data"]
    for i in range(count):
        os.mkdir(root / states[i % len(states)] / f"job-{i:06d}")
    call(app[0], "GET", "/ui/api/overview")  # sees each job once
    took = []
    for _ in range(15):
        start = time.perf_counter()
        reply = call(app[0], "GET", "/ui/api/overview")
        took.append(time.perf_counter() - start)
    assert reply.json()["total"] == count
    p50 = statistics.median(took)
    print(f"overview p50 with {count} jobs: {p50 * 1000:.1f} ms")
    assert p50 <= 0.100


# -- the job list --------------------------------------------------------------------------


def test_list_filters_sorts_and_pages(root: Path, app: tuple[ASGIApp, Store]) -> None:
    jobs(root, "success", "alpha", "beta", "Gamma-2")
    jobs(root, "error", "alphabet")
    jobs(root, "data", "delta")
    api = app[0]
    body = call(api, "GET", "/ui/api/jobs").json()
    assert body["total"] == 5
    assert [j["name"] for j in body["jobs"]] == ["Gamma-2", "alpha", "alphabet", "beta", "delta"]
    assert all(j["changed"].endswith("Z") for j in body["jobs"])
    body = call(api, "GET", "/ui/api/jobs?status=success,error&q=ALPHA&sort=-name").json()
    assert [(j["name"], j["status"]) for j in body["jobs"]] == [
        ("alphabet", "error"),
        ("alpha", "success"),
    ]
    body = call(api, "GET", "/ui/api/jobs?sort=state&limit=2&offset=1").json()
    assert (body["total"], body["offset"], body["limit"]) == (5, 1, 2)
    assert [j["name"] for j in body["jobs"]] == ["Gamma-2", "alpha"]  # ready first: delta
    time.sleep(0.01)
    jobs(root, "queue", "newest")
    body = call(api, "GET", "/ui/api/jobs?sort=-changed&status=ready,queue").json()
    assert [j["name"] for j in body["jobs"]] == ["newest", "delta"]


@pytest.mark.parametrize(
    "query",
    ["status=nope", "sort=size", "limit=-1", "limit=501", "offset=x", "q=" + "a" * 256],
)
def test_list_refuses_bad_parameters(app: tuple[ASGIApp, Store], query: str) -> None:
    assert_error(call(app[0], "GET", "/ui/api/jobs?" + query), 400, "InvalidParameter")


# -- files ---------------------------------------------------------------------------------


def test_entries_through_the_job_descriptor(
    root: Path, app: tuple[ASGIApp, Store], tmp_path: Path
) -> None:
    job = root / "success" / "j"
    (job / "sub").mkdir(parents=True)
    (job / "data.bin").write_bytes(b"x" * 10)
    (job / ".lock").write_text("")
    (job / "sub" / "inner.txt").write_text("hi")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    os.symlink(outside, job / "elsewhere")
    os.mkfifo(job / "pipe")
    api = app[0]
    body = call(api, "GET", "/ui/api/jobs/j/entries").json()
    assert body == [
        {"name": "data.bin", "type": "file", "size": 10},
        {"name": "elsewhere", "type": "link", "size": len(str(outside))},
        {"name": "pipe", "type": "other", "size": 0},
        {"name": "sub", "type": "dir", "size": body[3]["size"]},
    ]
    assert call(api, "GET", "/ui/api/jobs/j/entries?path=sub").json() == [
        {"name": "inner.txt", "type": "file", "size": 2}
    ]
    assert_error(call(api, "GET", "/ui/api/jobs/j/entries?path=elsewhere"), 400, "InvalidPath")
    assert_error(call(api, "GET", "/ui/api/jobs/j/entries?path=../j"), 400, "InvalidPath")
    assert_error(call(api, "GET", "/ui/api/jobs/j/entries?path=/etc"), 400, "InvalidPath")
    assert_error(call(api, "GET", "/ui/api/jobs/j/entries?path=nothing"), 404, "FileNotFound")
    assert_error(call(api, "GET", "/ui/api/jobs/j/entries?path=data.bin"), 404, "FileNotFound")
    assert_error(call(api, "GET", "/ui/api/jobs/none/entries"), 404, "JobNotFound")


# -- requeue all failed --------------------------------------------------------------------


def test_requeue_failed_moves_exactly_the_failed_jobs(
    root: Path, app: tuple[ASGIApp, Store]
) -> None:
    jobs(root, "error", "e1", "e2", "twin", "taken")
    jobs(root, "success", "twin")  # the same name in success/ stays there
    jobs(root, "queue", "taken")  # already waiting: this one cannot move
    (root / "error" / "e1" / "LOG").write_text("kept\n")
    body = call(app[0], "POST", "/ui/api/requeue-failed").json()
    assert body["requeued"] == 3
    assert sorted(body["jobs"]) == ["e1", "e2", "twin"]
    assert body["failed"] == [{"name": "taken", "reason": "a job of that name is already queued"}]
    assert sorted(os.listdir(root / "queue")) == ["e1", "e2", "taken", "twin"]
    assert os.listdir(root / "error") == ["taken"]
    assert os.listdir(root / "success") == ["twin"]
    assert (root / "queue" / "e1" / "LOG").read_text() == "kept\n"
    assert call(app[0], "GET", "/ui/api/requeue-failed").status == 405


def test_token_in_authorization_header_works_too(app: tuple[ASGIApp, Store]) -> None:
    reply = call(
        app[0], "GET", "/ui/api/overview", token=None, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert reply.status == 200


def test_login_form_never_puts_the_token_in_a_url(app: tuple[ASGIApp, Store]) -> None:
    """Without the script a GET form would send ?token=... in the address."""
    body = call(app[0], "GET", "/ui/login", token=None).body.decode()
    form = body[body.index("<form") : body.index(">", body.index("<form"))]
    assert 'method="post"' in form
    assert 'type="password"' in body
    reply = call(app[0], "POST", "/ui/login", body=b"token=x", token=None)
    assert reply.status == 405  # refused: a posted token is never taken or kept


def test_static_files_are_a_fixed_set(app: tuple[ASGIApp, Store]) -> None:
    css = call(app[0], "GET", "/ui/static/ui.css", token=None)
    assert css.status == 200 and css.headers["content-type"].startswith("text/css")
    assert css.body == (UI / "static" / "ui.css").read_bytes()
    for name in ["nothing.js", "..%2F__init__.py", "%2e%2e"]:
        assert_error(call(app[0], "GET", f"/ui/static/{name}", token=None), 404, "NotFound")
    assert_error(call(app[0], "GET", "/ui/static/a/b", token=None), 404, "NotFound")


def test_openapi_leaves_out_the_dashboard(app: tuple[ASGIApp, Store]) -> None:
    """The dashboard's pages and /ui/api/ are its own, changing with its script: not part
    of the API's contract."""
    paths = call(app[0], "GET", "/openapi.json").json()["paths"]
    assert not [p for p in paths if p == "/ui" or p.startswith("/ui/")]


def test_entries_follow_a_job_that_moves_while_listed(root: Path, store: Store) -> None:
    """A processor claiming the job between finding and opening it: look again, no 404."""
    jobs(root, "queue", "j")
    (root / "queue" / "j" / "f").write_text("x")
    open_job = store.open_job
    moves = []

    def claimed_meanwhile(job: Any) -> int:
        if not moves:
            moves.append(os.rename(root / "queue" / "j", root / "processing" / "j"))
        return open_job(job)

    store.open_job = claimed_meanwhile  # type: ignore[method-assign]
    assert data.folder_entries(store, "j", []) == [{"name": "f", "type": "file", "size": 1}]
    assert moves


@pytest.mark.parametrize("seed", range(5))
def test_a_listing_changed_in_place_equals_one_built_anew(seed: int) -> None:
    rng = random.Random(seed)
    ids = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(30)]
    pool = [f"job-{i}" for i in range(300)] + ids  # staging requests among them
    times = {n: float(rng.randrange(1000)) + rng.random() for n in rng.sample(pool, 200)}
    old = data.Listing(sorted(times), times)
    gone = rng.sample(sorted(times), 40)
    new = {n: float(rng.randrange(1000)) for n in pool if n not in times and rng.random() < 0.3}
    after = {n: t for n, t in times.items() if n not in gone} | new
    changed = old.changed(sorted(after), gone, new)
    fresh = data.Listing(sorted(after), after)
    for part in ("times", "by_time", "stamps", "latest", "requests"):
        assert getattr(changed, part) == getattr(fresh, part), part
    assert old.times == times and len(old.by_time) == 200  # the old one is left as it was
