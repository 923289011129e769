"""The Globus SDK for Python, unmodified, against the real service's /globus/ API.

One service serves a writable endpoint `data`, and through --archive/--staging the
read-only `archive` and `staging`. Beside the endpoint folders lies `outside/`, and links
to it are planted in `data`. Files there have a name and content (UNSEEN) that no
request and no link text ever spells, so an answer showing it would have looked outside.
Each test works in its own folder of `data`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import globus_sdk
import httpx
import pytest
from globus_sdk import TransferAPIError, TransferClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_service import TOKEN, Service, task_pids
from test_api_paths import _PIECES as JOB_API_PIECES
from test_api_paths import ATTACKS as JOB_API_ATTACKS

pytestmark = pytest.mark.e2e

SENTINEL = "target.txt"  # a file outside every endpoint, named by links in `data`
UNSEEN = "UNSEEN-c0ffee"  # in names and contents outside only: never sent, never linked


def client(service: Service, token: str = TOKEN) -> TransferClient:
    return TransferClient(
        base_url=service.url + "/globus/", authorizer=globus_sdk.AccessTokenAuthorizer(token)
    )


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every name under folder (links not followed) with its content or link text."""
    found: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                found[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                found[rel] = path.read_bytes()
            else:
                found[rel] = "dir"
    return found


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


class World:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.data = tmp / "data"
        self.archive = tmp / "archive"
        self.staging = tmp / "staging"
        self.outside = tmp / "outside"
        for folder in (self.data, self.archive, self.staging, self.outside):
            folder.mkdir()
        (self.outside / SENTINEL).write_text(UNSEEN)
        (self.outside / UNSEEN).write_text(UNSEEN)
        (self.outside / "sub").mkdir()
        (self.outside / "sub" / SENTINEL).write_text(UNSEEN)
        (self.outside / "sub" / UNSEEN).write_text(UNSEEN)
        (self.archive / "kept.txt").write_text("archived")
        for name, target in self.links().items():
            os.symlink(target, self.data / name)
        self.outside_before = snapshot(self.outside)
        self.archive_before = snapshot(self.archive)
        args = ["--endpoint", f"data={self.data}", "--archive", str(self.archive),
                "--staging", str(self.staging), "--no-processor"]  # fmt: skip
        self.service = Service(tmp / "root", *args)
        self.data_id = str(uuid.uuid5(uuid.NAMESPACE_URL, "batchingest:endpoint:data"))

    def folder(self) -> tuple[str, Path]:
        """A fresh folder in `data`: (its Globus path, its real path)."""
        name = "t-" + uuid.uuid4().hex[:8]
        (self.data / name).mkdir()
        return f"/~/{name}/", self.data / name

    def links(self) -> dict[str, Path | str]:
        return {"out-dir": self.outside, "out-file": self.outside / SENTINEL, "slash": "/"}

    def reset(self) -> None:
        """Remove what a test made at the top of `data`; put the planted links back."""
        for entry in set(os.listdir(self.data)) - set(self.links()):
            if not entry.startswith("t-"):
                remove(self.data / entry)
        for name, target in self.links().items():
            if not os.path.lexists(self.data / name):  # renamed away: plant it again
                os.symlink(target, self.data / name)

    def check_outside(self) -> None:
        assert snapshot(self.outside) == self.outside_before
        assert snapshot(self.archive) == self.archive_before
        logs = [p.name for p in self.tmp.glob("service-*.log")]
        made = {"archive", "data", "outside", "root", "staging", *logs}
        assert set(os.listdir(self.tmp)) == made


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("globus"))
    w.service.start()
    try:
        yield w
    finally:
        w.service.stop()
    assert "Traceback" not in w.service.log()


@pytest.fixture
def tc(world: World) -> TransferClient:
    return client(world.service)


def api_error(call: Callable[[], Any]) -> TransferAPIError:
    with pytest.raises(TransferAPIError) as e:
        call()
    err = e.value
    body = err.raw_json
    assert body is not None and set(body) == {"code", "message", "request_id", "resource"}
    assert err.headers["X-Transfer-API-Error"] == body["code"]
    assert body["request_id"] == err.headers["X-Request-Id"]
    assert not body["resource"].startswith("/globus")
    return err


# -- endpoints ------------------------------------------------------------------------------


def test_get_endpoint_by_id_and_by_name(world: World, tc: TransferClient) -> None:
    by_id = tc.get_endpoint(world.data_id)
    assert by_id["DATA_TYPE"] == "endpoint"
    assert by_id["id"] == world.data_id
    assert by_id["display_name"] == "data"
    assert by_id["activated"] is True
    assert by_id["read_only"] is False
    assert by_id["DATA"] == []
    assert tc.get_endpoint("data").data == by_id.data
    archive = tc.get_endpoint("archive")
    assert archive["read_only"] is True
    assert archive["id"] == str(uuid.uuid5(uuid.NAMESPACE_URL, "batchingest:endpoint:archive"))
    assert set(tc.get_endpoint("data", query_params={"fields": "id,name"}).data) == {
        "DATA_TYPE", "id", "name",
    }  # fmt: skip


def test_unknown_endpoint(tc: TransferClient) -> None:
    missing = str(uuid.uuid4())
    err = api_error(lambda: tc.get_endpoint(missing))
    assert (err.http_status, err.code) == (404, "EndpointNotFound")
    assert err.raw_json is not None and err.raw_json["resource"] == f"/endpoint/{missing}"
    for call in (
        lambda: tc.operation_ls("nope"),
        lambda: tc.operation_stat("nope", "/"),
        lambda: tc.operation_mkdir("nope", "/x"),
        lambda: tc.operation_rename("nope", "/x", "/y"),
    ):
        err = api_error(call)
        assert (err.http_status, err.code) == (404, "EndpointNotFound")


def test_endpoint_search(world: World, tc: TransferClient) -> None:
    found = tc.endpoint_search("data")
    assert found["DATA_TYPE"] == "endpoint_list"
    assert [ep["id"] for ep in found] == [world.data_id]
    assert found["has_next_page"] is False
    assert isinstance(found["limit"], int) and isinstance(found["offset"], int)
    everything = [ep["display_name"] for ep in tc.endpoint_search(filter_scope="my-endpoints")]
    assert everything == ["data", "archive", "staging"]
    assert [ep["display_name"] for ep in tc.endpoint_search("ARCH")] == ["archive"]
    assert list(tc.endpoint_search("read-only folder")) != []
    assert list(tc.endpoint_search("no such thing")) == []
    assert list(tc.endpoint_search(filter_scope="shared-with-me")) == []
    page = tc.endpoint_search(filter_scope="all", limit=1, offset=1)
    assert [ep["display_name"] for ep in page] == ["archive"] and page["has_next_page"] is True
    err = api_error(lambda: tc.endpoint_search(filter_scope="bogus"))
    assert (err.http_status, err.code) == (400, "ClientError.BadRequest")
    err = api_error(lambda: tc.endpoint_search("x", filter_owner_id="someone"))
    assert err.http_status == 400


def test_endpoint_search_pages_with_the_sdk_paginator(tmp_path: Path) -> None:
    """The SDK asks 100 at a time and stops on has_next_page: 130 endpoints, 2 pages."""
    (tmp_path / "f").mkdir()
    specs = ",".join(f"many-{i:03d}={tmp_path / 'f'}" for i in range(130))
    with Service(tmp_path / "root", env={"BATCHINGEST_ENDPOINTS": specs}) as service:
        tc = client(service)
        pages = list(tc.paginated.endpoint_search("many"))
        assert len(pages) == 2
        names = [ep["display_name"] for page in pages for ep in page]
        assert names == [f"many-{i:03d}" for i in range(130)]
        assert [ep["display_name"] for ep in tc.paginated.endpoint_search("many").items()] == names


def test_no_endpoint_configured_is_503(tmp_path: Path) -> None:
    with Service(tmp_path / "root") as service:
        tc = client(service)
        tc.retry_config.max_retries = 0  # the SDK would retry a 503 for seconds
        for call in (
            lambda: tc.get_endpoint("data"),
            lambda: tc.endpoint_search("data"),
            lambda: tc.operation_ls("data"),
            lambda: tc.get_submission_id(),
        ):
            err = api_error(call)
            assert (err.http_status, err.code) == (503, "EndpointsNotConfigured")
            assert "--endpoint" in err.message


def test_an_endpoint_folder_that_is_not_there(tmp_path: Path) -> None:
    later = tmp_path / "mounted-later"
    with Service(tmp_path / "root", "--endpoint", f"later={later}") as service:
        assert f"endpoint 'later': {later} is not a folder" in service.log()
        tc = client(service)
        assert tc.get_endpoint("later")["display_name"] == "later"
        err = api_error(lambda: tc.operation_ls("later"))
        assert (err.http_status, err.code) == (502, "ExternalError.DirListingFailed")
        assert "cannot be opened" in err.message
        err = api_error(lambda: tc.operation_mkdir("later", "/x"))
        assert (err.http_status, err.code) == (502, "ExternalError.MkdirFailed")
        later.mkdir()  # the mount arrives: no restart needed
        assert tc.operation_ls("later")["total"] == 0
    assert not (tmp_path / "x").exists()


def test_token_is_required(world: World) -> None:
    tc = client(world.service, token="wrong")
    with pytest.raises(TransferAPIError) as e:
        tc.get_endpoint("data")
    assert (e.value.http_status, e.value.code) == (401, "AuthenticationFailed")
    reply = httpx.get(world.service.url + "/globus/v0.10/endpoint/data")
    assert reply.status_code == 401 and reply.json()["code"] == "AuthenticationFailed"
    # the other APIs keep their code
    assert httpx.get(world.service.url + "/jobs").json()["code"] == "Unauthorized"


# -- listing --------------------------------------------------------------------------------


def test_ls_documents(world: World, tc: TransferClient) -> None:
    path, real = world.folder()
    (real / "b.txt").write_text("12345")
    (real / "sub").mkdir()
    os.symlink("b.txt", real / "link")
    os.mkfifo(real / "pipe")  # never served: not in the listing
    listing = tc.operation_ls(world.data_id, path=path)
    assert listing["DATA_TYPE"] == "file_list"
    assert listing["path"] == path.removeprefix("/~")
    assert (listing["length"], listing["total"], listing["offset"]) == (3, 3, 0)
    docs = {d["name"]: d for d in listing}
    assert sorted(docs) == ["b.txt", "link", "sub"]
    b = docs["b.txt"]
    assert (b["DATA_TYPE"], b["type"], b["size"], b["link_target"]) == ("file", "file", 5, None)
    assert b["permissions"] == f"{(real / 'b.txt').stat().st_mode & 0o7777:04o}"
    assert b["last_modified"].endswith("+00:00")
    assert docs["sub"]["type"] == "dir"
    assert (docs["link"]["type"], docs["link"]["link_target"]) == ("invalid_symlink", "b.txt")
    # /, /~/, ~ and "" all name the endpoint folder
    for root in ("/", "/~/", "~", ""):
        names = [d["name"] for d in tc.operation_ls("data", path=root)]
        assert path.strip("/").removeprefix("~/") in names and "out-dir" in names


def test_ls_paging_filter_order_hidden(world: World, tc: TransferClient) -> None:
    path, real = world.folder()
    for i in range(23):
        (real / f"f{i:02d}.txt").write_bytes(b"x" * i)
    (real / "d1").mkdir()
    (real / ".hidden").write_text("h")
    every = [d["name"] for d in tc.operation_ls(world.data_id, path=path)]
    assert every == sorted([".hidden", "d1", *(f"f{i:02d}.txt" for i in range(23))])
    shown = [d["name"] for d in tc.operation_ls(world.data_id, path=path, show_hidden=False)]
    assert shown == every[1:]
    # paging with limit/offset through the SDK until total is reached
    paged: list[str] = []
    offset = 0
    while True:
        page = tc.operation_ls(world.data_id, path=path, limit=7, offset=offset)
        assert isinstance(page["total"], int) and page["limit"] == 7 and page["offset"] == offset
        paged += [d["name"] for d in page]
        offset += page["length"]
        if offset >= page["total"]:
            break
    assert paged == every
    only_dirs = tc.operation_ls(world.data_id, path=path, filter={"type": "dir"})
    assert [d["name"] for d in only_dirs] == ["d1"]
    globbed = tc.operation_ls(world.data_id, path=path, filter="name:~f1*.txt/size:>=15")
    assert [d["name"] for d in globbed] == [f"f{i}.txt" for i in range(15, 20)]
    either = tc.operation_ls(world.data_id, path=path, filter=["type:dir", "name:=f00.txt"])
    assert sorted(d["name"] for d in either) == ["d1", "f00.txt"]
    biggest = tc.operation_ls(
        world.data_id, path=path, orderby="size DESC", filter="type:file", limit=2
    )
    assert [d["name"] for d in biggest] == ["f22.txt", "f21.txt"]
    by_type = tc.operation_ls(world.data_id, path=path, orderby=["type", "name DESC"])
    assert [d["name"] for d in by_type][:3] == ["d1", "f22.txt", "f21.txt"]
    recent = tc.operation_ls(world.data_id, path=path, filter={"last_modified": ["2000-01-01", ""]})
    assert recent["total"] == len(every)
    fields = tc.operation_ls(world.data_id, path=path, query_params={"fields": "name"})
    assert all(set(d) == {"DATA_TYPE", "name"} for d in fields)
    for bad in ({"filter": "nosuch:1"}, {"orderby": "colour"}, {"limit": "-1"}, {"offset": "x"},
                {"show_hidden": "maybe"}, {"filter": "size:>lots"}):  # fmt: skip
        err = api_error(lambda b=bad: tc.operation_ls(world.data_id, path=path, query_params=b))  # type: ignore[misc]
        assert (err.http_status, err.code) == (400, "ClientError.BadRequest"), bad


def test_ls_errors(world: World, tc: TransferClient) -> None:
    path, real = world.folder()
    (real / "file").write_text("x")
    err = api_error(lambda: tc.operation_ls("data", path=path + "missing/"))
    assert (err.http_status, err.code) == (404, "ClientError.NotFound")
    err = api_error(lambda: tc.operation_ls("data", path=path + "file"))
    assert (err.http_status, err.code) == (502, "ExternalError.DirListingFailed.NotDirectory")


# -- stat, mkdir, rename --------------------------------------------------------------------


def test_stat(world: World, tc: TransferClient) -> None:
    path, real = world.folder()
    (real / "f").write_text("abc")
    doc = tc.operation_stat("data", path + "f")
    assert (doc["DATA_TYPE"], doc["name"], doc["type"], doc["size"]) == ("file", "f", "file", 3)
    assert tc.operation_stat("data", path)["type"] == "dir"
    assert tc.operation_stat("data", "/")["type"] == "dir"
    link = tc.operation_stat("data", "/out-file")
    assert link["type"] == "invalid_symlink"
    assert link["link_target"] == str(world.outside / SENTINEL)
    assert link["size"] == len(str(world.outside / SENTINEL))  # the link's, not the target's
    err = api_error(lambda: tc.operation_stat("data", path + "missing"))
    assert (err.http_status, err.code) == (404, "ClientError.NotFound")
    world.check_outside()


def test_mkdir(world: World, tc: TransferClient) -> None:
    path, real = world.folder()
    done = tc.operation_mkdir(world.data_id, path + "new")
    assert done.http_status == 202
    assert (done["DATA_TYPE"], done["code"]) == ("mkdir_result", "DirectoryCreated")
    assert done["request_id"] and done["resource"].endswith("/mkdir")
    assert (real / "new").is_dir()
    tc.operation_mkdir("data", path.removeprefix("/~/") + "relative")  # relative to home
    assert (real / "relative").is_dir()
    err = api_error(lambda: tc.operation_mkdir("data", path + "new"))
    assert (err.http_status, err.code) == (502, "ExternalError.MkdirFailed.Exists")
    err = api_error(lambda: tc.operation_mkdir("data", "/"))
    assert err.code == "ExternalError.MkdirFailed.Exists"
    err = api_error(lambda: tc.operation_mkdir("data", path + "no/such/parent"))
    assert (err.http_status, err.code) == (404, "ClientError.NotFound")
    assert sorted(os.listdir(real)) == ["new", "relative"]


def test_rename(world: World, tc: TransferClient) -> None:
    path, real = world.folder()
    (real / "a").write_text("A")
    (real / "b").write_text("B")
    (real / "d").mkdir()
    done = tc.operation_rename("data", path + "a", path + "d/a2")
    assert done.http_status == 200
    assert (done["DATA_TYPE"], done["code"]) == ("result", "FileRenamed")
    assert (real / "d" / "a2").read_text() == "A"
    err = api_error(lambda: tc.operation_rename("data", path + "b", path + "d/a2"))
    assert (err.http_status, err.code) == (502, "ExternalError.RenameFailed.Exists")
    err = api_error(lambda: tc.operation_rename("data", path + "b", path + "d"))
    assert err.code == "ExternalError.RenameFailed.Exists"
    assert (real / "b").read_text() == "B" and (real / "d" / "a2").read_text() == "A"
    err = api_error(lambda: tc.operation_rename("data", path + "gone", path + "x"))
    assert (err.http_status, err.code) == (404, "ClientError.NotFound")
    # a well-formed request the file system refuses (rename(2): EINVAL), as Globus says
    err = api_error(lambda: tc.operation_rename("data", path + "d", path + "d/inside"))
    assert (err.http_status, err.code) == (502, "ExternalError.RenameFailed")
    assert "into itself" in err.message
    assert sorted(os.listdir(real)) == ["b", "d"]


def test_read_only_endpoint(world: World, tc: TransferClient) -> None:
    assert [d["name"] for d in tc.operation_ls("archive")] == ["kept.txt"]
    assert tc.operation_ls("archive")["rename_supported"] is False
    err = api_error(lambda: tc.operation_mkdir("archive", "/new"))
    assert (err.http_status, err.code) == (502, "ExternalError.MkdirFailed.PermissionDenied")
    err = api_error(lambda: tc.operation_rename("archive", "/kept.txt", "/moved.txt"))
    assert (err.http_status, err.code) == (502, "ExternalError.RenameFailed.PermissionDenied")
    # staging, beside it, is writable, but not the unfinished copies of the stage task
    tc.operation_mkdir("staging", "/made-here")
    assert (world.staging / "made-here").is_dir()
    (world.staging / ".batchingest-stage-j.1-1.tmp").write_text("half a file")
    err = api_error(
        lambda: tc.operation_rename("staging", "/.batchingest-stage-j.1-1.tmp", "/made-here/f")
    )
    assert (err.http_status, err.code) == (502, "ExternalError.RenameFailed.PermissionDenied")
    assert os.listdir(world.staging / "made-here") == []
    world.check_outside()


# -- path safety ----------------------------------------------------------------------------

LINK_ATTACKS = ["/out-dir/", "/out-dir/" + SENTINEL, "/out-dir/sub/", "/~/out-dir/sub/" + SENTINEL,
                "/slash/etc/", "/slash/etc/passwd", "out-dir"]  # fmt: skip
DOT_ATTACKS = ["/../", "/~/../", "..", "/../outside/", "/~/../outside/" + SENTINEL,
               "/out-dir/../", "/a/../../outside", "/./", "a/./b", "/a//b", "/x\x00y",
               "/x\\..\\y", "~root/", "/" + "x" * 5000]  # fmt: skip


@pytest.mark.parametrize("attack", LINK_ATTACKS + DOT_ATTACKS)
def test_attacks_are_refused(world: World, tc: TransferClient, attack: str) -> None:
    calls: list[Callable[[], Any]] = [
        lambda: tc.operation_mkdir("data", attack.rstrip("/") + "/new"),
        lambda: tc.operation_rename("data", "/out-file", attack.rstrip("/") + "/moved"),
    ]
    if attack.rstrip("/") not in ("out-dir", "/slash/etc/passwd") and not attack.endswith(SENTINEL):
        calls.append(lambda: tc.operation_ls("data", path=attack))
    if attack.count("/") > 2 or attack in DOT_ATTACKS:
        calls.append(lambda: tc.operation_stat("data", attack))
    for call in calls:
        err = api_error(call)
        assert (err.http_status, err.code) == (400, "ClientError.BadRequest"), attack
        assert UNSEEN not in str(err.raw_json)
    assert os.readlink(world.data / "out-file") == str(world.outside / SENTINEL)
    world.check_outside()


def answer_of(call: Callable[[], Any]) -> tuple[int, Any]:
    """(status, document) of a call, whether it succeeded or failed; never a 5xx but 502."""
    try:
        done = call()
    except TransferAPIError as e:
        assert e.http_status in (400, 404, 502), (e.http_status, e.code, e.message)
        return e.http_status, e.raw_json
    return done.http_status, done.data


@pytest.mark.parametrize("attack", JOB_API_ATTACKS)
def test_the_job_api_attack_list(world: World, tc: TransferClient, attack: str) -> None:
    """Globus paths are never percent-decoded: encoded attacks are literal names inside."""
    path, real = world.folder()
    (real / "movable").write_text("m")
    for raw in (attack, path + attack, "/out-dir/" + attack, "/~/../" + attack):
        for call in (
            lambda raw=raw: tc.operation_ls("data", path=raw),
            lambda raw=raw: tc.operation_stat("data", raw),
            lambda raw=raw: tc.operation_mkdir("data", raw),
            lambda raw=raw: tc.operation_rename("data", path + "movable", raw),
        ):
            status, doc = answer_of(call)
            assert UNSEEN not in str(doc), raw
            if raw.startswith(("/out-dir/", "/~/../")):
                assert status == 400, (raw, status, doc)
        world.check_outside()
        world.reset()
        for entry in set(os.listdir(real)) - {"movable"}:  # back for the next spelling
            remove(real / entry)
        if not (real / "movable").exists():
            (real / "movable").write_text("m")


def test_links_are_shown_never_followed(world: World, tc: TransferClient) -> None:
    docs = {d["name"]: d for d in tc.operation_ls("data", path="/")}
    assert docs["out-dir"]["type"] == "invalid_symlink"
    assert docs["out-dir"]["link_target"] == str(world.outside)
    assert docs["slash"]["link_target"] == "/"
    stat = tc.operation_stat("data", "/out-dir")
    assert stat["type"] == "invalid_symlink"
    err = api_error(lambda: tc.operation_ls("data", path="/out-dir/"))
    assert "symbolic link" in err.message
    world.check_outside()


_PIECES = st.sampled_from(
    ["..", ".", "/", "//", "~", "/~/", "~/", "\\", "\x00", "a", "b", "out-dir", "out-file",
     "slash", "etc", "outside", SENTINEL, "sub", "%2e%2e", "%2f", " ", ".hidden", "scratch"]
)  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    pieces=st.lists(st.one_of(_PIECES, JOB_API_PIECES), min_size=0, max_size=8),
    op=st.sampled_from(["ls", "stat", "mkdir", "rename-from", "rename-to"]),
)
def test_generated_paths_never_leave_the_endpoint(world: World, pieces: list[str], op: str) -> None:
    tc = client(world.service)
    path = "".join(pieces)
    scratch = world.data / "scratch"
    scratch.mkdir(exist_ok=True)
    (scratch / "movable").write_text("m")
    calls = {
        "ls": lambda: tc.operation_ls("data", path=path),
        "stat": lambda: tc.operation_stat("data", path),
        "mkdir": lambda: tc.operation_mkdir("data", path),
        "rename-from": lambda: tc.operation_rename("data", path, "/scratch/moved-here"),
        "rename-to": lambda: tc.operation_rename("data", "/scratch/movable", path),
    }
    try:
        answer: Any = calls[op]().data
    except TransferAPIError as e:
        assert e.http_status in (400, 404, 502), (path, e.http_status, e.code)
        answer = e.raw_json
    assert UNSEEN not in str(answer), path
    world.check_outside()
    world.reset()  # whatever was made or moved is inside the endpoint folder: undo it


# -- the rest of the API --------------------------------------------------------------------


def test_submission_id_and_activation(world: World, tc: TransferClient) -> None:
    first, second = tc.get_submission_id(), tc.get_submission_id()
    assert first["DATA_TYPE"] == "submission_id"
    assert uuid.UUID(first["value"]) and first["value"] != second["value"]
    for route in ("autoactivate", "activate"):
        done = tc.post(f"/v0.10/endpoint/{world.data_id}/{route}")
        assert (done["DATA_TYPE"], done["code"], done["expires_in"]) == (
            "activation_result", "AlreadyActivated", -1,
        )  # fmt: skip
    needs = tc.get("/v0.10/endpoint/data/activation_requirements")
    assert (needs["DATA_TYPE"], needs["activated"], needs["DATA"]) == (
        "activation_requirements", True, [],
    )  # fmt: skip
    err = api_error(lambda: tc.post("/v0.10/endpoint/data/deactivate"))
    assert (err.http_status, err.code) == (501, "NotImplemented")


def test_what_is_not_served_says_so(world: World, tc: TransferClient) -> None:
    for call in (
        lambda: tc.endpoint_acl_list("data"),
        lambda: tc.add_endpoint_acl_rule("data", {"DATA_TYPE": "access"}),
        lambda: tc.bookmark_list(),
        lambda: tc.create_bookmark({"name": "x"}),
        lambda: tc.create_shared_endpoint({"DATA_TYPE": "shared_endpoint"}),
        lambda: tc.my_shared_endpoint_list("data"),
        lambda: tc.endpoint_role_list("data"),
        lambda: tc.endpoint_server_list("data"),
        lambda: tc.update_endpoint("data", {"display_name": "x"}),
        lambda: tc.delete_endpoint("data"),
    ):
        err = api_error(call)
        assert (err.http_status, err.code) == (501, "NotImplemented")
    err = api_error(lambda: tc.get("/v0.10/no_such_thing"))
    assert (err.http_status, err.code) == (404, "ClientError.NotFound")
    err = api_error(lambda: tc.post("/v0.10/operation/endpoint/data/ls"))
    assert (err.http_status, err.code) == (405, "ClientError.MethodNotAllowed")
    assert tc.get_endpoint("data")["display_name"] == "data"  # nothing changed


def test_bad_bodies(world: World, tc: TransferClient) -> None:
    for body in ({"DATA_TYPE": "rename", "path": "/x"}, {"path": 5}, {"path": None}):
        err = api_error(lambda b=body: tc.post("/v0.10/operation/endpoint/data/mkdir", data=b))  # type: ignore[misc]
        assert (err.http_status, err.code) == (400, "ClientError.BadRequest")
    reply = httpx.post(
        world.service.url + "/globus/v0.10/operation/endpoint/data/rename",
        content=b"not json",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert reply.status_code == 400 and reply.json()["code"] == "ClientError.BadRequest"
    # lone surrogates in JSON: once a 500 (and a name no listing could show)
    for raw in (b'{"path": "/\\udcff"}', b'{"path": "/x\\ud800y/z"}'):
        reply = httpx.post(
            world.service.url + "/globus/v0.10/operation/endpoint/data/mkdir",
            content=raw,
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert reply.status_code == 400 and reply.json()["code"] == "ClientError.BadRequest"
    big = {"DATA_TYPE": "mkdir", "path": "/x", "pad": "x" * (64 << 10)}
    err = api_error(lambda: tc.post("/v0.10/operation/endpoint/data/mkdir", data=big))
    assert (err.http_status, err.code) == (413, "ClientError.RequestTooLarge")
    err = api_error(lambda: tc.operation_mkdir("data", "/x", local_user="root"))
    assert err.http_status == 400
    assert not (world.data / "x").exists()
    assert os.listdir(world.data) == [n for n in os.listdir(world.data) if n.isprintable()]


# -- transfer and delete tasks: jobs run by the built-in transfer task --------------------


class Moves:
    """A service with its processor: endpoints `src` and `dst`, read-only `archive`."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.tmp = tmp
        self.src, self.dst = tmp / "src", tmp / "dst"
        self.archive, self.staging, self.outside = tmp / "archive", tmp / "staging", tmp / "out"
        for folder in (self.src, self.dst, self.archive, self.staging, self.outside):
            folder.mkdir()
        (self.outside / SENTINEL).write_text(UNSEEN)
        os.symlink(self.outside, self.src / "out-dir")
        os.symlink(self.outside / SENTINEL, self.src / "out-file")
        os.symlink(self.outside, self.dst / "out-dir")
        self.outside_before = snapshot(self.outside)
        self.service = Service(
            tmp / "root", "--endpoint", f"src={self.src}", "--endpoint", f"dst={self.dst}",
            "--archive", str(self.archive), "--staging", str(self.staging), *args,
        )  # fmt: skip

    def check_outside(self) -> None:
        assert snapshot(self.outside) == self.outside_before


@pytest.fixture(scope="module")
def moves(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moves]:
    m = Moves(tmp_path_factory.mktemp("moves"))
    m.service.start()
    try:
        yield m
    finally:
        m.service.stop()
    assert "Traceback" not in m.service.log()


@pytest.fixture
def mc(moves: Moves) -> TransferClient:
    return client(moves.service)


def finished(tc: TransferClient, task_id: str, timeout: int = 30) -> dict[str, Any]:
    assert tc.task_wait(task_id, timeout=timeout, polling_interval=1), tc.get_task(task_id).data
    return dict(tc.get_task(task_id).data)


def test_transfer_files_and_a_folder_with_sync_checksum(moves: Moves, mc: TransferClient) -> None:
    tree = moves.src / "tree"
    (tree / "sub").mkdir(parents=True)
    for i in range(10):
        (tree / ("sub" if i % 2 else "") / f"f{i}").write_bytes(f"content {i}\n".encode() * 100)
    (moves.src / "one.bin").write_bytes(os.urandom(3 << 20))
    os.utime(moves.src / "one.bin", (1_000_000_000, 1_000_000_000))
    # half the files are already there, one of them different (same size)
    there = moves.dst / "tree-copy"
    (there / "sub").mkdir(parents=True)
    for i in range(5):
        rel = Path("sub" if i % 2 else "") / f"f{i}"
        (there / rel).write_bytes((tree / rel).read_bytes())
    (there / "f4").write_bytes(b"CONTENT 4\n" * 100)
    (there / "extra").write_text("only here")
    data = globus_sdk.TransferData(
        source_endpoint="src", destination_endpoint=moves_id("dst"), label="sync run",
        sync_level="checksum", verify_checksum=True, preserve_timestamp=True,
        delete_destination_extra=True,
    )  # fmt: skip
    data.add_item("/tree/", "/tree-copy/", recursive=True)
    data.add_item("/one.bin", "/~/single/one.bin")
    result = mc.submit_transfer(data)
    assert (result.http_status, result["code"]) == (202, "Accepted")
    task = finished(mc, result["task_id"])
    assert task["status"] == "SUCCEEDED", task
    assert task["label"] == "sync run" and task["type"] == "TRANSFER"
    assert (task["files"], task["files_skipped"], task["files_transferred"]) == (11, 4, 7)
    assert task["directories"] == 2 and task["sync_level"] == 3 and task["verify_checksum"]
    assert task["bytes_transferred"] == 6 * 1000 + (3 << 20)
    assert task["bytes_checksummed"] > 0 and task["fatal_error"] is None
    assert (task["subtasks_total"], task["subtasks_succeeded"]) == (2, 2)
    assert task["source_endpoint_id"] == moves_id("src")
    assert task["completion_time"] and task["request_time"]
    for i in range(10):
        rel = Path("sub" if i % 2 else "") / f"f{i}"
        assert (there / rel).read_bytes() == (tree / rel).read_bytes()
    assert not (there / "extra").exists()  # delete_destination_extra
    assert (moves.dst / "single" / "one.bin").read_bytes() == (moves.src / "one.bin").read_bytes()
    assert (moves.dst / "single" / "one.bin").stat().st_mtime == 1_000_000_000
    assert not [p for p in moves.dst.rglob(".batchingest-*")]
    done = list(mc.paginated.task_successful_transfers(task["task_id"]).items())
    assert sorted(d["destination_path"] for d in done) == sorted(
        ["/~/single/one.bin", "/tree-copy/f4", *[f"/tree-copy/{'sub/' if i % 2 else ''}f{i}"
                                                  for i in range(5, 10)]]
    )  # fmt: skip
    events = [e["code"] for e in mc.task_event_list(task["task_id"])]
    assert events[0] == "SUCCEEDED" and "STARTED" in events
    # the job behind it, in the job API, named by the task id
    job = moves.service.client().get(f"/jobs/{task['task_id']}").json()
    assert job["Status"] == "success"


def moves_id(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"batchingest:endpoint:{name}"))


def test_same_submission_id_is_the_same_task(moves: Moves, mc: TransferClient) -> None:
    (moves.src / "dup.txt").write_text("once")
    submission = mc.get_submission_id()["value"]
    data = globus_sdk.TransferData(
        source_endpoint="src", destination_endpoint="dst", submission_id=submission
    )
    data.add_item("/dup.txt", "/dup.txt")
    first = mc.submit_transfer(data)
    second = mc.submit_transfer(data)
    assert (first.http_status, second.http_status) == (202, 200)
    assert (second["code"], second["DATA_TYPE"]) == ("Duplicate", "transfer_result")
    assert second["task_id"] == first["task_id"]
    ids = [t["task_id"] for t in mc.paginated.task_list().items()]
    assert ids.count(first["task_id"]) == 1
    assert finished(mc, first["task_id"])["status"] == "SUCCEEDED"


def test_delete_task_and_read_only_endpoints(moves: Moves, mc: TransferClient) -> None:
    (moves.dst / "gone" / "deep").mkdir(parents=True)
    (moves.dst / "gone" / "deep" / "x").write_text("x")
    (moves.dst / "gone.txt").write_text("x")
    delete = globus_sdk.DeleteData(endpoint="dst", recursive=True, label="cleanup")
    delete.add_item("/gone")
    delete.add_item("/~/gone.txt")
    delete.add_item("/out-dir")  # the link itself goes; never what it points at
    result = mc.submit_delete(delete)
    assert (result.http_status, result["code"], result["DATA_TYPE"]) == (
        202, "Accepted", "delete_result",
    )  # fmt: skip
    task = finished(mc, result["task_id"])
    assert (task["status"], task["type"]) == ("SUCCEEDED", "DELETE"), task
    assert not (moves.dst / "gone").exists() and not (moves.dst / "gone.txt").exists()
    assert not os.path.lexists(moves.dst / "out-dir")
    moves.check_outside()
    os.symlink(moves.outside, moves.dst / "out-dir")
    # delete tasks show in task_list only when asked for (as in Globus)
    assert task["task_id"] not in [t["task_id"] for t in mc.task_list(limit=1000)]
    listed = mc.task_list(filter="type:DELETE/label:cleanup", limit=1000)
    assert [t["task_id"] for t in listed] == [task["task_id"]]
    # a folder without recursive fails the task, and loses nothing
    (moves.dst / "keep").mkdir()
    (moves.dst / "keep" / "k").write_text("k")
    shallow = globus_sdk.DeleteData(endpoint="dst")
    shallow.add_item("/keep")
    failed = finished(mc, mc.submit_delete(shallow)["task_id"])
    assert failed["status"] == "FAILED" and "recursive" in failed["fatal_error"]["description"]
    assert (moves.dst / "keep" / "k").read_text() == "k"
    for ref in ("archive", moves_id("archive")):
        ro = globus_sdk.DeleteData(endpoint=ref, recursive=True)
        ro.add_item("/kept.txt")
        err = api_error(lambda ro=ro: mc.submit_delete(ro))  # type: ignore[misc]
        assert (err.http_status, err.code) == (403, "PermissionDenied")
        into = globus_sdk.TransferData(source_endpoint="src", destination_endpoint=ref)
        into.add_item("/dup.txt", "/x")
        err = api_error(lambda into=into: mc.submit_transfer(into))  # type: ignore[misc]
        assert (err.http_status, err.code) == (403, "PermissionDenied")


def test_links_in_a_transfer_are_never_followed(moves: Moves, mc: TransferClient) -> None:
    for source in ("/out-dir/", "/out-dir/target.txt", "/out-file"):
        data = globus_sdk.TransferData(source_endpoint="src", destination_endpoint="dst")
        data.add_item(source, "/leak/x", recursive=source.endswith("/"))
        task = finished(mc, mc.submit_transfer(data)["task_id"])
        assert task["status"] == "FAILED", (source, task)
        assert UNSEEN not in json.dumps(task)
    (moves.src / "linky").mkdir()
    os.symlink(moves.outside, moves.src / "linky" / "escape")
    (moves.src / "linky" / "real").write_text("real")
    data = globus_sdk.TransferData(source_endpoint="src", destination_endpoint="dst")
    data.add_item("/linky/", "/out-dir/", recursive=True)  # writing through a link: refused
    data.add_item("/linky/", "/linky-copy/", recursive=True)
    task = finished(mc, mc.submit_transfer(data)["task_id"])
    assert task["status"] == "FAILED" and task["subtasks_succeeded"] == 1
    assert sorted(os.listdir(moves.dst / "linky-copy")) == ["real"]  # the link is skipped
    moves.check_outside()
    assert not (moves.outside / "x").exists() and not (moves.outside / "real").exists()


@pytest.mark.parametrize("attack", JOB_API_ATTACKS)
def test_the_job_api_attack_list_in_submissions(mc: TransferClient, attack: str) -> None:
    for raw in ("/~/../" + attack, "/a/../" + attack, "/.batchingest-x", attack + "/./x"):
        data = globus_sdk.TransferData(source_endpoint="src", destination_endpoint="dst")
        data.add_item(raw, "/fine")
        err = api_error(lambda data=data: mc.submit_transfer(data))  # type: ignore[misc]
        assert (err.http_status, err.code) == (400, "ClientError.BadRequest"), raw
        data = globus_sdk.TransferData(source_endpoint="src", destination_endpoint="dst")
        data.add_item("/fine", raw)
        err = api_error(lambda data=data: mc.submit_transfer(data))  # type: ignore[misc]
        assert (err.http_status, err.code) == (400, "ClientError.BadRequest"), raw


def test_task_errors(moves: Moves, mc: TransferClient) -> None:
    missing = str(uuid.uuid4())
    for call in (
        lambda: mc.get_task(missing),
        lambda: mc.cancel_task(missing),
        lambda: mc.task_event_list(missing),
        lambda: mc.task_successful_transfers(missing),
        lambda: mc.get_task("not-a-task"),
    ):
        err = api_error(call)
        assert (err.http_status, err.code) == (404, "TaskNotFound")
    item = {"DATA_TYPE": "transfer_item", "source_path": "/a", "destination_path": "/b"}
    good = {"DATA_TYPE": "transfer", "submission_id": "s-1", "source_endpoint": "src",
            "destination_endpoint": "dst", "DATA": [item]}  # fmt: skip
    for change, status, code in (
        ({"source_endpoint": "nope"}, 404, "EndpointNotFound"),
        ({"destination_endpoint": str(uuid.uuid4())}, 404, "EndpointNotFound"),
        ({"sync_level": 7}, 400, "ClientError.BadRequest"),
        ({"sync_level": "often"}, 400, "ClientError.BadRequest"),
        ({"deadline": "tomorrow"}, 400, "ClientError.BadRequest"),
        ({"DATA": []}, 400, "ClientError.BadRequest"),
        ({"DATA": [{"DATA_TYPE": "delete_item", "path": "/a"}]}, 400, "ClientError.BadRequest"),
        ({"submission_id": None}, 400, "ClientError.BadRequest"),
        ({"verify_checksum": "yes"}, 400, "ClientError.BadRequest"),
        ({"encrypt_data": True}, 501, "NotImplemented"),
        ({"DATA_TYPE": "delete"}, 400, "ClientError.BadRequest"),
    ):
        err = api_error(lambda c=change: mc.post("/v0.10/transfer", data={**good, **c}))  # type: ignore[misc]
        assert (err.http_status, err.code) == (status, code), change
    for params in ({"filter": "colour:red"}, {"orderby": "size"}, {"limit": "5000"},
                   {"filter": "request_time:yesterday,"}):  # fmt: skip
        err = api_error(lambda p=params: mc.task_list(query_params=p))  # type: ignore[misc]
        assert (err.http_status, err.code) == (400, "ClientError.BadRequest"), params
    reply = httpx.post(moves.service.url + "/globus/v0.10/transfer", content=b"{",
                       headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
    assert reply.status_code == 400 and reply.json()["code"] == "ClientError.BadRequest"
    assert "Traceback" not in moves.service.log()


def test_paging_through_250_tasks(world: World, tc: TransferClient) -> None:
    """Without a processor the tasks stay queued: ACTIVE, then paged through with the SDK."""
    label = "page-" + uuid.uuid4().hex[:6]
    made = []
    for i in range(250):
        data = globus_sdk.TransferData(source_endpoint="data", destination_endpoint="staging",
                                       label=f"{label}-{i:03d}")  # fmt: skip
        data.add_item(f"/f{i}", f"/f{i}")
        made.append(tc.submit_transfer(data)["task_id"])
    found = list(
        tc.paginated.task_list(filter=f"label:~{label}", query_params={"limit": 100}).items()
    )
    assert sorted(t["task_id"] for t in found) == sorted(made)
    assert {t["status"] for t in found} == {"ACTIVE"}
    times = [t["request_time"] for t in found]
    assert times == sorted(times, reverse=True)  # newest first by default
    page = tc.task_list(limit=7, offset=3, orderby="label ASC", filter=f"label:~{label}",
                        query_params={"fields": "task_id,label"})  # fmt: skip
    assert (page["limit"], page["offset"], page["total"], page["length"]) == (7, 3, 250, 7)
    assert [t["label"] for t in page] == [f"{label}-{i:03d}" for i in range(3, 10)]
    assert set(page["DATA"][0]) == {"DATA_TYPE", "task_id", "label"}
    exact = tc.task_list(filter=f"label:{label}-042/status:ACTIVE")
    assert [t["task_id"] for t in exact] == [made[42]]
    assert tc.task_list(filter=f"label:~{label}/status:SUCCEEDED,FAILED")["total"] == 0
    assert tc.task_list(filter=f"label:~{label}/request_time:,2000-01-01")["total"] == 0
    assert tc.task_list(filter=f"label:~{label}/request_time:2000-01-01,")["total"] == 250


@pytest.fixture
def slow(tmp_path: Path) -> Iterator[Moves]:
    """One worker copying at most 40 MB/s: a few dozen MiB take a second or more."""
    m = Moves(tmp_path, "--workers", "1", "--transfer-max-rate", "40M")
    for i in range(20):
        (m.src / "many").mkdir(exist_ok=True)
        (m.src / "many" / f"part{i:02d}").write_bytes(os.urandom(4 << 20))
    m.service.start()
    try:
        yield m
    finally:
        m.service.stop()
    assert "Traceback" not in m.service.log()


def many(m: Moves, dest: str, **kw: Any) -> globus_sdk.TransferData:
    data = globus_sdk.TransferData(source_endpoint="src", destination_endpoint="dst", **kw)
    data.add_item("/many/", dest, recursive=True)
    return data


def test_cancel_mid_copy_and_while_queued(slow: Moves) -> None:
    tc = client(slow.service)
    running = tc.submit_transfer(many(slow, "/run/"))["task_id"]
    moved = [0]
    while moved[-1] < 8 << 20:  # progress fields move while the copy runs
        task = tc.get_task(running)
        assert task["status"] == "ACTIVE"
        moved.append(task["bytes_transferred"])
        time.sleep(0.05)
    queued = tc.submit_transfer(many(slow, "/queued/"))["task_id"]  # the one worker is busy
    assert tc.get_task(queued)["nice_status"] == "Queued"
    done = tc.cancel_task(queued)
    assert (done["DATA_TYPE"], done["code"]) == ("result", "Canceled")
    task = tc.get_task(queued)
    assert (task["status"], task["fatal_error"]["code"]) == ("FAILED", "CANCELED")
    done = tc.cancel_task(running)
    assert done["code"] == "Canceled", done.data
    task = tc.get_task(running)
    assert (task["status"], task["fatal_error"]["code"], task["nice_status"]) == (
        "FAILED", "CANCELED", "CANCELED",
    )  # fmt: skip
    assert 0 < task["files_transferred"] < 20 and task["completion_time"]
    assert "CANCELED" in [e["code"] for e in tc.task_event_list(running)]
    # what was copied is whole; nothing half-copied is left under any name
    for path in (slow.dst / "run").iterdir():
        assert path.read_bytes() == (slow.src / "many" / path.name).read_bytes()
    assert not (slow.dst / "queued").exists()
    assert not [p for p in slow.dst.rglob(".batchingest-*")]
    assert tc.cancel_task(running)["code"] == "TaskComplete"
    assert tc.task_wait(running, timeout=1, polling_interval=1)  # not ACTIVE: done waiting


def test_deadline_running_and_queued(slow: Moves) -> None:
    tc = client(slow.service)
    soon = datetime.now(UTC) + timedelta(seconds=1)
    running = tc.submit_transfer(many(slow, "/d1/", deadline=soon))["task_id"]
    past = datetime.now(UTC) - timedelta(seconds=1)
    queued = tc.submit_transfer(many(slow, "/d2/", deadline=past))["task_id"]
    for tid in (running, queued):
        task = finished(tc, tid)
        assert (task["status"], task["fatal_error"]["code"]) == ("FAILED", "DEADLINE_EXCEEDED")
        assert task["deadline"]
    assert not (slow.dst / "d2").exists() or not os.listdir(slow.dst / "d2")


def test_kill_9_mid_transfer_still_succeeds(slow: Moves) -> None:
    tc = client(slow.service)
    tid = tc.submit_transfer(many(slow, "/k/", label="survivor"))["task_id"]
    while tc.get_task(tid)["bytes_transferred"] < 12 << 20:
        time.sleep(0.05)
    slow.service.kill()
    for pid in task_pids(slow.tmp / "root"):
        os.kill(pid, signal.SIGKILL)
    slow.service.start()
    task = finished(client(slow.service), tid, timeout=60)
    assert (task["status"], task["label"], task["files"]) == ("SUCCEEDED", "survivor", 20)
    for i in range(20):
        name = f"part{i:02d}"
        assert (slow.dst / "k" / name).read_bytes() == (slow.src / "many" / name).read_bytes()
    assert not [p for p in slow.dst.rglob(".batchingest-*")]
