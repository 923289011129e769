"""Endpoint settings and file operations on endpoint folders: nothing outside, ever."""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchingest import endpoints
from batchingest.config import ConfigError, parse_serve_args
from batchingest.endpoints import Endpoint, Endpoints, PathError, split_path


@pytest.fixture
def world(tmp_path: Path) -> tuple[Endpoint, Path]:
    """An endpoint folder with a file, a folder and links out of it; a sentinel outside."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "sentinel").write_text("outside")
    folder = tmp_path / "ep"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("inside")
    os.symlink(tmp_path / "outside", folder / "out-dir")
    os.symlink(tmp_path / "outside" / "sentinel", folder / "out-file")
    os.symlink("..", folder / "sub" / "up")
    return Endpoint("data", folder), tmp_path


def outside_untouched(tmp: Path) -> None:
    assert sorted(os.listdir(tmp / "outside")) == ["sentinel"]
    assert (tmp / "outside" / "sentinel").read_text() == "outside"


# -- settings -------------------------------------------------------------------------------


def test_ids_are_uuid5_of_the_name_and_stable() -> None:
    ep = Endpoint("data", Path("/x"))
    assert ep.id == str(uuid.uuid5(uuid.NAMESPACE_URL, "batchingest:endpoint:data"))
    assert Endpoint("data", Path("/elsewhere")).id == ep.id
    assert Endpoint("other", Path("/x")).id != ep.id


def test_found_by_name_or_id_in_any_form() -> None:
    registry = Endpoints([Endpoint("data", Path("/d")), Endpoint("b", Path("/b"))])
    ep = registry.find("data")
    assert ep is not None and ep.name == "data"
    assert registry.find(ep.id) is ep
    assert registry.find(ep.id.upper()) is ep
    assert registry.find(ep.id.replace("-", "")) is ep
    assert registry.find("nope") is None
    assert registry.find(str(uuid.uuid4())) is None


def test_flags_environment_and_staging(tmp_path: Path) -> None:
    cfg = parse_serve_args(
        ["--root", str(tmp_path), "--endpoint", "a=/srv/a", "--endpoint", "b=rel"], environ={}
    )
    assert cfg.endpoints == [("a", Path("/srv/a")), ("b", Path("rel").absolute())]
    env = {"BATCHINGEST_ENDPOINTS": "x=/x, y=/y"}
    cfg = parse_serve_args(["--root", str(tmp_path)], environ=env)
    assert cfg.endpoints == [("x", Path("/x")), ("y", Path("/y"))]
    # a flag wins over the variable
    cfg = parse_serve_args(["--root", str(tmp_path), "--endpoint", "z=/z"], environ=env)
    assert cfg.endpoints == [("z", Path("/z"))]
    args = ["--root", str(tmp_path), "--archive", "/ar", "--staging", "/st", "--endpoint", "a=/a"]
    registry = Endpoints.from_config(parse_serve_args(args, environ={}))
    assert [(e.name, e.read_only) for e in registry] == [
        ("a", False), ("archive", True), ("staging", False),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "args",
    [
        ["--endpoint", "noequals"],
        ["--endpoint", "=/x"],
        ["--endpoint", "a="],
        ["--endpoint", ".hidden=/x"],
        ["--endpoint", "a/b=/x"],
        ["--endpoint", "a=/x", "--endpoint", "a=/y"],
        ["--archive", "/a", "--staging", "/s", "--endpoint", "archive=/x"],
    ],
)
def test_bad_endpoint_settings_stop_the_start(tmp_path: Path, args: list[str]) -> None:
    # argparse stops on a bad flag value; clashes between settings are a ConfigError,
    # which the command turns into one line and exit status 2
    with pytest.raises((SystemExit, ConfigError)) as e:
        parse_serve_args(["--root", str(tmp_path), *args], environ={})
    assert not isinstance(e.value, SystemExit) or e.value.code != 0


def test_bad_endpoint_variable_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="BATCHINGEST_ENDPOINTS"):
        parse_serve_args(["--root", str(tmp_path)], environ={"BATCHINGEST_ENDPOINTS": "a"})


# -- paths ----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["", "/", "/~", "/~/", "~", "~/"])
def test_the_endpoint_folder_itself(raw: str) -> None:
    assert split_path(raw) == []


@pytest.mark.parametrize("raw", ["/a/b", "/~/a/b", "~/a/b", "a/b", "/a/b/", "/~/a/b/"])
def test_one_path_many_spellings(raw: str) -> None:
    assert split_path(raw) == ["a", "b"]


@pytest.mark.parametrize(
    "raw",
    ["..", "/..", "/~/..", "/a/../..", "a/./b", "./a", "/a//b", "//", "a\x00", "a\\b",
     "~root/x", "~root", "/" + "x" * 256, "/a" * 2100, "/\udcff", "/x\ud800y/z"],
)  # fmt: skip
def test_refused_paths(raw: str) -> None:
    with pytest.raises(PathError) as e:
        split_path(raw)
    assert e.value.kind == "invalid"


_PIECES = st.sampled_from(
    [
        "/",
        "//",
        "~",
        "~/",
        "/~/",
        ".",
        "..",
        "a",
        "b.c",
        ".h",
        "%2e",
        " ",
        "\\",
        "\x00",
        "\udcff",
        "é",
    ]
)


@given(st.lists(_PIECES, max_size=10))
def test_split_paths_are_names_only(pieces: list[str]) -> None:
    """Whatever is accepted splits into plain names, and spells back to the same parts."""
    raw = "".join(pieces)
    try:
        parts = split_path(raw)
    except PathError as e:
        assert e.kind == "invalid"
        return
    for part in parts:
        assert part and "/" not in part and "\x00" not in part and part not in (".", "..")
        part.encode()  # valid text
    assert split_path(endpoints.show_path(parts)) == parts
    assert split_path(endpoints.show_path(parts, folder=True)) == parts


def test_locate_a_local_path() -> None:
    registry = Endpoints(
        [Endpoint("a", Path("/srv/a")), Endpoint("ab", Path("/srv/a/b")), Endpoint("c", Path("/c"))]
    )
    assert registry.locate("/srv/a/x/y") == (registry.items[0], ["x", "y"])
    assert registry.locate("/srv/a/b/x") == (registry.items[1], ["x"])  # the longest wins
    assert registry.locate("/srv/a") == (registry.items[0], [])
    assert registry.locate("/srv/ab/x") is None  # a prefix of the text is not a parent
    assert registry.locate("/elsewhere") is None
    assert registry.locate("/") is None
    for bad in ("/srv/a/../../etc", "/srv/a/./x", "relative", "/srv//a"):
        with pytest.raises(PathError):
            registry.locate(bad)


def test_literal_names_that_only_look_special() -> None:
    assert split_path("/~a") == ["~a"]
    assert split_path("/~/~") == split_path("~/~/") == ["~"]
    assert split_path("~/~x") == ["~x"]
    assert split_path("/%2e%2e") == ["%2e%2e"]
    assert split_path("/.hidden/...") == [".hidden", "..."]


# -- operations -----------------------------------------------------------------------------


def test_links_are_listed_as_themselves(world: tuple[Endpoint, Path]) -> None:
    ep, tmp = world
    items = {i.name: i for i in endpoints.list_folder(ep, [])}
    assert sorted(items) == ["a.txt", "out-dir", "out-file", "sub"]
    assert items["out-dir"].link_target == str(tmp / "outside")
    assert items["a.txt"].link_target is None
    st = endpoints.stat_path(ep, ["out-file"])
    assert st.link_target == str(tmp / "outside" / "sentinel")
    assert st.st.st_size == len(str(tmp / "outside" / "sentinel"))  # the link's own size
    outside_untouched(tmp)


@pytest.mark.parametrize(
    "parts", [["out-dir"], ["out-dir", "sentinel"], ["sub", "up"], ["sub", "up", "a.txt"]]
)
def test_never_through_a_link(world: tuple[Endpoint, Path], parts: list[str]) -> None:
    ep, tmp = world
    with pytest.raises(PathError) as e:
        endpoints.list_folder(ep, parts)
    assert e.value.kind == "link"
    if len(parts) > 2 or (parts[0] == "out-dir" and len(parts) == 2):
        with pytest.raises(PathError) as e:
            endpoints.stat_path(ep, parts)
        assert e.value.kind == "link"
    with pytest.raises(PathError):
        endpoints.make_folder(ep, [*parts, "new"])
    with pytest.raises(PathError):
        endpoints.rename(ep, ["a.txt"], [*parts, "moved"])
    assert (ep.path / "a.txt").read_text() == "inside"
    outside_untouched(tmp)


def test_mkdir_and_rename(world: tuple[Endpoint, Path]) -> None:
    ep, tmp = world
    endpoints.make_folder(ep, ["new"])
    assert (ep.path / "new").is_dir()
    with pytest.raises(PathError) as e:
        endpoints.make_folder(ep, ["new"])
    assert e.value.kind == "exists"
    with pytest.raises(PathError) as e:
        endpoints.make_folder(ep, ["missing", "new"])
    assert e.value.kind == "missing"
    with pytest.raises(PathError) as e:
        endpoints.make_folder(ep, ["a.txt", "new"])
    assert e.value.kind == "not-dir"
    endpoints.rename(ep, ["a.txt"], ["new", "b.txt"])
    assert (ep.path / "new" / "b.txt").read_text() == "inside"
    with pytest.raises(PathError) as e:
        endpoints.rename(ep, ["new", "b.txt"], ["sub"])
    assert e.value.kind == "exists"
    with pytest.raises(PathError) as e:  # refused as rename(2) would refuse it
        endpoints.rename(ep, ["new"], ["new", "inner"])
    assert (e.value.kind, e.value.errno) == ("os", errno.EINVAL)
    with pytest.raises(PathError) as e:  # but a missing folder is said first
        endpoints.rename(ep, ["gone"], ["gone", "inner"])
    assert e.value.kind == "missing"
    # a link is renamed itself; what it points at stays where it is
    endpoints.rename(ep, ["out-file"], ["sub", "renamed-link"])
    assert os.readlink(ep.path / "sub" / "renamed-link") == str(tmp / "outside" / "sentinel")
    outside_untouched(tmp)


def test_read_only_endpoint_refuses_writes(world: tuple[Endpoint, Path]) -> None:
    ep, tmp = world
    archive = Endpoint("archive", ep.path, read_only=True)
    outside_untouched(tmp)
    for call in (
        lambda: endpoints.make_folder(archive, ["new"]),
        lambda: endpoints.rename(archive, ["a.txt"], ["b.txt"]),
    ):
        with pytest.raises(PathError) as e:
            call()
        assert e.value.kind == "read-only"
    assert sorted(os.listdir(ep.path)) == ["a.txt", "out-dir", "out-file", "sub"]
    assert [i.name for i in endpoints.list_folder(archive, ["sub"])] == ["up"]


def test_missing_endpoint_folder_is_an_error_not_a_crash(tmp_path: Path) -> None:
    ep = Endpoint("gone", tmp_path / "gone")
    with pytest.raises(PathError) as e:
        endpoints.list_folder(ep, [])
    assert e.value.kind == "os"
    assert "gone" in e.value.message


def test_fifo_is_listed_by_lstat_and_never_opened(world: tuple[Endpoint, Path]) -> None:
    ep, _ = world
    os.mkfifo(ep.path / "pipe")
    items = {i.name: i for i in endpoints.list_folder(ep, [])}
    assert "pipe" in items  # the API leaves it out; listing it never blocks
    with pytest.raises(PathError) as e:
        endpoints.list_folder(ep, ["pipe"])
    assert e.value.kind == "not-dir"


@pytest.mark.parametrize("parts", [["/etc"], ["sub", "/tmp/x"], [".."], ["a/b"], [""]])
def test_a_name_is_never_a_path(world: tuple[Endpoint, Path], parts: list[str]) -> None:
    """With a folder descriptor an absolute name is still absolute: checked before use."""
    ep, tmp = world
    with pytest.raises(PathError) as e:
        endpoints.make_folder(ep, parts)
    assert e.value.kind == "invalid"
    with pytest.raises(PathError) as e:
        endpoints.rename(ep, ["a.txt"], parts)
    assert e.value.kind == "invalid"
    assert (ep.path / "a.txt").read_text() == "inside"
    outside_untouched(tmp)


def test_the_services_temporaries_are_not_touched(world: tuple[Endpoint, Path]) -> None:
    """An unfinished staged copy renamed to a real name would show a partial file."""
    ep, _ = world
    (ep.path / ".batchingest-stage-job.1-1.tmp").write_text("half")
    for call in (
        lambda: endpoints.rename(ep, [".batchingest-stage-job.1-1.tmp"], ["data.bin"]),
        lambda: endpoints.rename(ep, ["a.txt"], ["sub", ".batchingest-stage-x.tmp"]),
        lambda: endpoints.make_folder(ep, [".batchingest-stage-d"]),
    ):
        with pytest.raises(PathError) as e:
            call()
        assert e.value.kind == "read-only"
    assert not (ep.path / "data.bin").exists()
    assert (ep.path / ".batchingest-stage-job.1-1.tmp").read_text() == "half"
    assert (ep.path / "a.txt").read_text() == "inside"
