"""Staging ids, paths, catalog, manifest, progress and status (no service needed)."""

from __future__ import annotations

import json
import os
import re
import string
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchingest.staging import (
    MANIFEST,
    PROGRESS_LIMIT,
    Catalog,
    Entry,
    InvalidPath,
    Progress,
    Resolver,
    StagingError,
    body_limit,
    check_relpath,
    last_log_line,
    load_manifest,
    manifest_bytes,
    manifest_limit,
    read_progress,
    status,
    write_progress,
)


@contextmanager
def opened(folder: Path) -> Iterator[int]:
    """A descriptor of a job folder, as the API and the stage task hold one."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.fixture
def areas(tmp_path: Path) -> tuple[Path, Path]:
    archive, staging = tmp_path / "archive", tmp_path / "staging"
    (archive / "p" / "q").mkdir(parents=True)
    staging.mkdir()
    (archive / "p" / "q" / "a.fastq").write_bytes(b"A" * 10)
    (archive / "top.txt").write_bytes(b"top")
    (tmp_path / "secret.txt").write_text("outside")
    return archive, staging


# -- path rules -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["", "/etc/passwd", "../x", "a/../../x", "a/..", "./a", "a/./b", "a//b", "a/", ".hidden",
     "a/.b/c", "a\x00b", "a\nb", "a\\b", "x" * 256, "a/" * 2100 + "b"],
)  # fmt: skip
def test_bad_paths_are_refused(bad: str) -> None:
    with pytest.raises(InvalidPath):
        check_relpath(bad)


@pytest.mark.parametrize("good", ["a", "a/b/c.txt", "proj1/reads/a.fastq", "a b/c-d_e.f", "é/ü"])
def test_good_paths_pass(good: str) -> None:
    assert check_relpath(good) == good


_segment = st.text(alphabet=string.ascii_letters + string.digits + "._- ", min_size=1, max_size=8)
_weird = st.sampled_from(["..", ".", "", "/", "\\", "\x00", "~", "%2e%2e", "..."])
_path = st.lists(st.one_of(_segment, _weird), min_size=1, max_size=6).map("/".join)


@given(rel=st.one_of(_path, st.text(max_size=40)), absolute=st.booleans())
@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_no_id_resolves_outside_the_archive(
    areas: tuple[Path, Path], rel: str, absolute: bool
) -> None:
    archive, _ = areas
    file_id = "/" + rel if absolute else rel
    entries, invalid, unresolved = Resolver(archive).resolve([file_id])
    for e in entries:
        real = os.path.realpath(archive / e.path)
        assert real.startswith(os.path.realpath(archive) + "/")
        assert Path(real).is_file()
        assert e.path == file_id
    assert len(entries) + len(invalid) + len(unresolved) == 1
    if absolute or ".." in file_id.split("/"):
        assert not entries


def test_symlinks_do_not_resolve_even_inside_the_archive(areas: tuple[Path, Path]) -> None:
    """The archive is an endpoint folder, user input: no link is followed, out or not."""
    archive, _ = areas
    outside = archive.parent / "secret.txt"
    (archive / "link.txt").symlink_to(outside)
    (archive / "dirlink").symlink_to(archive.parent)
    (archive / "inside.txt").symlink_to(archive / "top.txt")
    (archive / "p" / "dirin").symlink_to(archive / "p" / "q")
    os.mkfifo(archive / "p" / "pipe")  # looked at, never opened: a writer would wait
    ids = ["link.txt", "dirlink/secret.txt", "inside.txt", "p/dirin/a.fastq", "p", "p/q", "p/pipe"]
    entries, invalid, unresolved = Resolver(archive).resolve(ids)
    assert entries == []
    assert invalid == []
    # links (leading out or not) and folders are not regular files
    assert unresolved == ids


def test_resolve_dedupes_and_reports(areas: tuple[Path, Path]) -> None:
    archive, _ = areas
    entries, invalid, unresolved = Resolver(archive).resolve(
        ["top.txt", "p/q/a.fastq", "top.txt", "../etc/passwd", "/etc/passwd", "nope"]
    )
    assert [(e.id, e.path, e.size) for e in entries] == [
        ("top.txt", "top.txt", 3),
        ("p/q/a.fastq", "p/q/a.fastq", 10),
    ]
    assert invalid == ["../etc/passwd", "/etc/passwd"]
    assert unresolved == ["nope"]


# -- catalog ----------------------------------------------------------------------------------


def test_catalog_ids_and_reload(areas: tuple[Path, Path], tmp_path: Path) -> None:
    archive, _ = areas
    catalog = tmp_path / "catalog.tsv"
    catalog.write_text(
        "# id\tpath\n615a383dcc4ff44f36ca5ba2\tp/q/a.fastq\n\nbad\t../../etc/passwd\n"
        "hidden\t.x\nnotab\n61412246cc4ff44f36c8913f\ttop.txt\n"
    )
    r = Resolver(archive, catalog)
    entries, invalid, unresolved = r.resolve(
        ["615a383dcc4ff44f36ca5ba2", "61412246cc4ff44f36c8913f", "bad", "hidden", "top.txt"]
    )
    assert [(e.id, e.path) for e in entries] == [
        ("615a383dcc4ff44f36ca5ba2", "p/q/a.fastq"),
        ("61412246cc4ff44f36c8913f", "top.txt"),
    ]
    # catalog ids are opaque: paths are not ids, bad catalog lines are skipped
    assert invalid == []
    assert unresolved == ["bad", "hidden", "top.txt"]

    catalog.write_text("new-id\ttop.txt\n")
    os.utime(catalog, ns=(time.time_ns(), time.time_ns() + 10**9))
    entries, _, unresolved = r.resolve(["new-id", "615a383dcc4ff44f36ca5ba2"])
    assert [e.path for e in entries] == ["top.txt"]
    assert unresolved == ["615a383dcc4ff44f36ca5ba2"]


def test_missing_catalog_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(StagingError, match="catalog"):
        Catalog(tmp_path / "none.tsv").ids()


# -- manifest, progress, status -------------------------------------------------------------


def test_manifest_round_trip(areas: tuple[Path, Path], tmp_path: Path) -> None:
    archive, staging = areas
    entries, _, _ = Resolver(archive).resolve(["top.txt", "p/q/a.fastq"])
    job = tmp_path / "job"
    job.mkdir()
    (job / MANIFEST).write_bytes(manifest_bytes(entries, archive, staging, "rid"))
    data = json.loads((job / MANIFEST).read_bytes())
    assert data["files_total"] == 2 and data["bytes_total"] == 13
    assert data["archive"] == str(archive) and data["request_id"] == "rid"
    with opened(job) as fd:
        assert load_manifest(fd, 1 << 20) == entries


@pytest.mark.parametrize(
    "content",
    ["", "[]", '{"files": 1}', '{"files": [1]}', '{"files": [{"path": "../x", "size": 1}]}',
     '{"files": [{"path": "/etc/passwd", "size": 1}]}', '{"files": [{"path": "a", "size": "1"}]}'],
)  # fmt: skip
def test_bad_manifests_are_refused(tmp_path: Path, content: str) -> None:
    (tmp_path / MANIFEST).write_text(content)
    with opened(tmp_path) as fd, pytest.raises(StagingError, match="MANIFEST"):
        load_manifest(fd, 1 << 20)


def test_status_of_each_state(tmp_path: Path) -> None:
    with opened(tmp_path) as fd:
        write_progress(fd, Progress(3, 1, 300, 100))
        for state in ("data", "queue", "processing"):
            assert status(fd, state) == {
                "status": "staging",
                "files_total": 3,
                "files_staged": 1,
                "bytes_total": 300,
                "bytes_staged": 100,
            }
        ready = status(fd, "success")
        assert ready["status"] == "ready" and ready["files_staged"] == 3
        assert ready["bytes_staged"] == 300
        # no error recorded: the task's last LOG line, not the service's marker
        (tmp_path / "LOG").write_text(
            "2026-01-01T00:00:00.000Z batchingest: ---- task stage: begin ----\n"
            "tape library says no\n\n"
            "2026-01-01T00:00:01.000Z batchingest: ---- task stage: error, exit status 3 ----\n"
        )
        failed = status(fd, "error")
        assert failed["status"] == "failed" and failed["message"] == "tape library says no"
        write_progress(fd, Progress(3, 1, 300, 100, error="p/a: vanished from the archive"))
        assert status(fd, "error")["message"] == "p/a: vanished from the archive"


def test_last_log_line_falls_back_to_the_marker(tmp_path: Path) -> None:
    with opened(tmp_path) as fd:
        assert last_log_line(fd) is None
        (tmp_path / "LOG").write_text(
            "old output\nT batchingest: ---- task stage: begin ----\n"
            "T batchingest: ---- task stage: error, timed out after 5 s (5.0 s) ----\n"
        )
        assert last_log_line(fd) == (
            "T batchingest: ---- task stage: error, timed out after 5 s (5.0 s) ----"
        )


def test_garbage_progress_reads_as_none(tmp_path: Path) -> None:
    with opened(tmp_path) as fd:
        (tmp_path / "PROGRESS.json").write_text("{not json")
        assert read_progress(fd) is None
        (tmp_path / "PROGRESS.json").write_text('{"files_total": -1, "files_staged": "x"}')
        p = read_progress(fd)
        assert p is not None and p.files_total == 0 and p.files_staged == 0
        assert status(fd, "queue")["files_total"] == 0


# -- job files are user input: links, FIFOs, huge files -------------------------------------


def test_status_never_follows_links_out_of_the_job(tmp_path: Path) -> None:
    job, outside = tmp_path / "job", tmp_path / "outside"
    job.mkdir()
    outside.mkdir()
    (outside / "p.json").write_text(json.dumps(Progress(7, 7, 70, 70, "not ours").to_json()))
    (outside / "LOG").write_text("a secret line\n")
    (job / "PROGRESS.json").symlink_to(outside / "p.json")
    (job / "LOG").symlink_to(outside / "LOG")
    with opened(job) as fd:
        assert status(fd, "queue")["files_total"] == 0
        failed = status(fd, "error")
    assert failed["files_total"] == 0
    assert failed["message"].startswith("PROGRESS.json cannot be read: a symbolic link")
    assert "secret" not in failed["message"] and "not ours" not in failed["message"]


def test_status_of_a_fifo_or_huge_progress_does_not_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "PROGRESS.json")
    os.mkfifo(tmp_path / "LOG")  # opened by nobody else: reading it would block for ever
    with opened(tmp_path) as fd:
        assert status(fd, "processing")["status"] == "staging"
        failed = status(fd, "error")
        assert "PROGRESS.json cannot be read: not a regular file (named pipe)" in failed["message"]
        os.unlink(tmp_path / "PROGRESS.json")
        big = Progress(1, 1, 1, 1, error="x" * (PROGRESS_LIMIT + 1))
        (tmp_path / "PROGRESS.json").write_text(json.dumps(big.to_json()))
        failed = status(fd, "error")
    assert failed["message"] == f"PROGRESS.json cannot be read: larger than {PROGRESS_LIMIT} bytes"
    assert failed["files_total"] == 0


@pytest.mark.parametrize(
    ("make", "expect"),
    [("link", "a symbolic link is in the way"),
     ("fifo", "not a regular file (named pipe)"),
     ("folder", "not a regular file (folder)"),
     ("big", "larger than 1000 bytes"),
     ("nested", "MANIFEST.json cannot be read: maximum recursion depth")],
)  # fmt: skip
def test_unsafe_manifests_are_clear_errors(tmp_path: Path, make: str, expect: str) -> None:
    job = tmp_path / "job"
    job.mkdir()
    other = tmp_path / "other.json"
    other.write_text('{"files": [{"id": "a", "path": "a", "size": 1}]}')
    if make == "link":
        (job / MANIFEST).symlink_to(other)
    elif make == "fifo":
        os.mkfifo(job / MANIFEST)
    elif make == "folder":
        (job / MANIFEST).mkdir()
    elif make == "big":
        (job / MANIFEST).write_text('{"files": []}' + " " * 1000)
    else:
        (job / MANIFEST).write_text('{"files": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with opened(job) as fd, pytest.raises(StagingError, match=re.escape(expect)):
        load_manifest(fd, 1000 if make == "big" else 1 << 20)


def test_manifest_limit_holds_the_largest_request(tmp_path: Path) -> None:
    """The stage task's limit fits any manifest the API writes for max_ids ids."""
    longest = "/".join(["\u00e9" * 127 + '"'] * 16)[:2000]  # 4 KiB of UTF-8, quotes to escape
    entries = [Entry(longest + str(i), longest + str(i), 10**15) for i in range(50)]
    raw = manifest_bytes(entries, tmp_path / ("a" * 4000), tmp_path / ("s" * 4000), "rid")
    assert len(raw) <= manifest_limit(50)
    body = json.dumps({"ids": [e.id for e in entries]}).encode()  # the request it came from
    assert len(body) <= body_limit(50)
