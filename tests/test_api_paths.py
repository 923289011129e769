"""Nothing outside a job folder, ever: known attacks and generated paths.

Every request is sent with its exact raw path (see test_api.call), so `..` and its
encodings reach the app as a client could send them. After each request, a canary
outside the job folder and a sibling job must be unchanged.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.types import ASGIApp
from test_api import call, make_app

from batchingest.api.errors import ApiError
from batchingest.api.paths import segments
from batchingest.paths import InvalidPath, relpath_segments
from batchingest.store import Store, valid_name

ATTACKS = [
    "../x",
    "../../x",
    "..",
    "%2e%2e",
    "%2e%2e/x",
    "%2E%2E/%2e%2e/x",
    ".%2e/x",
    "%2e./x",
    "a/../../x",
    "a/%2e%2e/%2e%2e/x",
    "a/%2E%2e/b",
    "..%2f..%2fx",
    "..%2F..%2Fcanary",
    "a/..%2f..%2fx",
    "%2f",
    "%2fetc%2fpasswd",
    "/etc/passwd",
    "//etc/passwd",
    "a//b",
    "./x",
    "a/./b",
    "%2e",
    "x%00",
    "x%00/y",
    "%00",
    "..%00",
    "..%5cx",
    "..%5C..%5Cx",
    "a%5c..%5cb",
    "a\\b",
    ".lock",
    ".upload-1234",
    "a/.hidden",
    "...",
    "..a",
    "x" * 300,
]

# double encoding and overlong UTF-8 decode once, to harmless literal names
GOOD = ["f", "a/b/c.txt", "%252e%252e", "%252e%252e/x", "a..b", "a%20b", "%C3%A9t%C3%A9", "-_.x",
        "%c0%ae%c0%ae/x", "a%2Fb"]  # fmt: skip


@pytest.fixture
def world(tmp_path: Path) -> tuple[ASGIApp, Store, Path]:
    root = tmp_path / "root"
    Store(root).init()
    (tmp_path / "canary").write_text("outside")
    (root / "canary").write_text("in the root")
    app, store = make_app(root)
    job, _ = store.create("j")
    (job.path / "inside").write_text("mine")
    other, _ = store.create("other")
    (other.path / "x").write_text("other job")
    return app, store, tmp_path


def untouched(tmp: Path) -> None:
    root = tmp / "root"
    assert (tmp / "canary").read_text() == "outside"
    assert (root / "canary").read_text() == "in the root"
    assert (root / "data" / "other" / "x").read_text() == "other job"
    assert (root / "data" / "j" / "inside").read_text() == "mine"
    assert sorted(p.name for p in root.iterdir() if p.name != ".trash") == [
        "canary", "data", "error", "processing", "queue", "success",
    ]  # fmt: skip
    assert sorted(os.listdir(root / "data")) == ["j", "other"]


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_known_attacks(world: tuple[ASGIApp, Store, Path], attack: str, method: str) -> None:
    app, _, tmp = world
    reply = call(app, method, f"/jobs/j/files/{attack}", b"pwned")
    assert reply.status == 400, (attack, reply.status, reply.body)
    assert reply.json()["code"] in ("InvalidPath", "InvalidName")
    assert reply.headers["x-error-code"] == reply.json()["code"]
    untouched(tmp)


@pytest.mark.parametrize("attack", ["..", "%2e%2e", ".", "%2e", "..%2f..", "%2e%2e%2fdata"])
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_job_id_attacks(world: tuple[ASGIApp, Store, Path], attack: str, method: str) -> None:
    """The original service deleted the whole root on `DELETE /jobs/..`."""
    app, _, tmp = world
    for suffix in ("", "/files", "/files/x", "/queue"):
        reply = call(app, "POST" if suffix == "/queue" else method, f"/jobs/{attack}{suffix}")
        assert reply.status == 400, (attack, suffix, reply.status)
        untouched(tmp)


@pytest.mark.parametrize("good", GOOD)
def test_ordinary_names_work(world: tuple[ASGIApp, Store, Path], good: str) -> None:
    app, _, tmp = world
    assert call(app, "PUT", f"/jobs/j/files/{good}", b"ok").status == 201
    assert call(app, "GET", f"/jobs/j/files/{good}").body == b"ok"
    assert call(app, "DELETE", f"/jobs/j/files/{good}").status == 204
    untouched(tmp)


def test_empty_paths_never_hit_the_job_folder(world: tuple[ASGIApp, Store, Path]) -> None:
    app, _, tmp = world
    for method in ("PUT", "DELETE"):
        for path in ("/jobs/j/files/", "/jobs/j/files//", "/jobs/j/files/%2f", "/jobs/j/files/a/"):
            reply = call(app, method, path + "?recursive=true", b"x")
            assert reply.status in (400, 405), (method, path, reply.status)
            untouched(tmp)


def test_symlinks(world: tuple[ASGIApp, Store, Path]) -> None:
    """A symbolic link anywhere on a path is refused, for every method, wherever it
    points: it is never followed, so what it points at is never read, written or removed."""
    app, store, tmp = world
    job = store.get("j").path
    os.symlink(tmp / "canary", job / "out-file")
    os.symlink(tmp, job / "out-dir")
    os.symlink("../other", job / "sibling")
    # an absolute link: to a stand-in for "/", so a broken check cannot harm the machine
    (tmp / "abs" / "etc").mkdir(parents=True)
    (tmp / "abs" / "etc" / "passwd").write_text("outside")
    os.symlink(tmp / "abs", job / "slash")
    os.symlink("inside", job / "in-link")
    (job / "sub").mkdir()
    os.symlink("..", job / "sub" / "up")
    for path in ("out-file", "out-dir/canary", "out-dir", "sibling/x", "slash/etc/passwd",
                 "out-dir/new", "sibling", "slash", "in-link", "sub/up", "sub/up/inside",
                 "sub/up/new"):  # fmt: skip
        for method in ("GET", "PUT", "DELETE"):
            reply = call(app, method, f"/jobs/j/files/{path}?recursive=true", b"pwned")
            assert reply.status == 400, (path, method, reply.status)
            assert reply.json()["code"] == "InvalidPath"
            assert "symbolic link" in reply.json()["message"]
            untouched(tmp)
            assert (tmp / "abs" / "etc" / "passwd").read_text() == "outside"
    assert (job / "in-link").is_symlink() and (job / "sub" / "up").is_symlink()
    assert not (job / "new").exists()
    # the folder holding links can be listed, and removed as a whole: the links go,
    # never what they point at
    assert call(app, "GET", "/jobs/j/files/sub").json() == ["up"]
    assert "out-dir" in call(app, "GET", "/jobs/j/files").json()
    (job / "sub" / "deeper").mkdir()
    os.symlink(tmp, job / "sub" / "deeper" / "out")
    assert call(app, "DELETE", "/jobs/j/files/sub?recursive=true").status == 204
    assert not (job / "sub").exists()
    untouched(tmp)


# -- generated paths ---------------------------------------------------------------------

_PIECES = st.sampled_from(
    ["..", ".", "%2e", "%2E", "%2e%2e", ".%2e", "%2f", "%2F", "/", "//", "\\", "%5c", "%00",
     "a", "b", "x.txt", "..a", "%25", "%252e", "~", "canary", "other", "j", "data", "root",
     " ", "%20", "%c0%ae", ".lock"]
)  # fmt: skip


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    pieces=st.lists(_PIECES, min_size=1, max_size=8),
    method=st.sampled_from(["GET", "PUT", "DELETE"]),
)
def test_generated_paths_stay_inside(
    world: tuple[ASGIApp, Store, Path], pieces: list[str], method: str
) -> None:
    app, store, tmp = world
    raw = "".join(pieces)
    reply = call(app, method, f"/jobs/j/files/{raw}?recursive=true", b"generated")
    assert reply.status in (200, 201, 204, 400, 404, 405, 409), (raw, reply.status)
    assert reply.headers["x-request-id"]
    if reply.status >= 400:
        assert reply.headers["x-error-code"] == reply.json()["code"]
    untouched(tmp)
    # whatever was written is inside the job folder (reset it for the next example)
    job = store.get("j").path
    for entry in os.listdir(job):
        if entry not in ("inside", ".lock"):
            target = job / entry
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=st.text(min_size=1, max_size=20) | st.sampled_from(["..", ".", "...", ".a", "a."]))
def test_generated_job_ids(world: tuple[ASGIApp, Store, Path], name: str) -> None:
    app, _, tmp = world
    raw = quote(name, safe="")
    reply = call(app, "PUT", f"/jobs/{raw}")
    if valid_name(name) and name not in ("j", "other"):
        assert reply.status == 201, (name, reply.status)
        assert (tmp / "root" / "data" / name).is_dir()
        assert call(app, "DELETE", f"/jobs/{raw}").status == 204
    elif not valid_name(name):
        assert reply.status == 400, (name, reply.status)
        assert reply.json()["code"] in ("InvalidName", "InvalidPath")
    untouched(tmp)


@given(
    parts=st.lists(
        st.text(alphabet=st.characters(codec="utf-8"), min_size=0, max_size=12), min_size=1,
        max_size=6,
    )
)  # fmt: skip
def test_segments_never_escape(parts: list[str]) -> None:
    raw = "/".join(parts)
    try:
        checked = segments(raw, allow_empty=False)
    except ApiError as e:
        assert e.status == 400
        return
    assert checked and all(p not in ("", ".", "..") and "/" not in p for p in checked)
    assert all("\x00" not in p and "\\" not in p and not p.startswith(".") for p in checked)
    base = Path("/srv/job")
    joined = os.path.normpath(os.path.join(base, *checked))
    assert joined.startswith(str(base) + "/")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [("", "empty path"), ("a\nb", "control character"), ("a\x00", "NUL"), ("a\\b", "backslash"),
     ("/a", "not relative"), ("a//b", "empty path segment"), ("a/../b", "'..'"),
     ("a/.x", "hidden"), ("x" * 256, "longer than 255"), ("a/" * 2048, "longer than 4095"),
     ("\udcff", "UTF-8")],
)  # fmt: skip
def test_relpath_rules(raw: str, reason: str) -> None:
    """One set of rules for every relative path (API files, staging ids): each says why."""
    with pytest.raises(InvalidPath, match=reason):
        relpath_segments(raw)
    assert relpath_segments("a/b c/d.txt") == ["a", "b c", "d.txt"]
    assert relpath_segments("a/", allow_empty=True) == ["a"]
    assert relpath_segments("", allow_empty=True) == []
    assert relpath_segments("x" * 255 + "/" + "y" * 255) == ["x" * 255, "y" * 255]
