"""The access layer for user folders (batchingest/fs.py): containment, no links, no hangs.

Every test runs twice: with openat2 (where the kernel has it) and with the
component-by-component O_NOFOLLOW fallback, which the module switches to when
`fs._openat2_works` is False.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchingest import fs


def _kernel_has_openat2() -> bool:
    saved = fs._openat2_works
    fs._openat2_works = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "probe").write_bytes(b"")
            fd = fs.open_root(tmp)
            try:
                os.close(fs.open_beneath(fd, "probe"))
            finally:
                os.close(fd)
        return fs._openat2_works is True
    finally:
        fs._openat2_works = saved


HAS_OPENAT2 = _kernel_has_openat2()


@pytest.fixture(params=["openat2", "fallback"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which way open_beneath resolves; the module flag is restored after the test."""
    if request.param == "openat2":
        if not HAS_OPENAT2:
            pytest.skip("this kernel has no openat2")
        monkeypatch.setattr(fs, "_openat2_works", None)
    else:
        monkeypatch.setattr(fs, "_openat2_works", False)
    return str(request.param)


@pytest.fixture
def jail(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    j = tmp_path / "jail"
    j.mkdir()
    fd = fs.open_root(j)
    try:
        yield j, fd
    finally:
        os.close(fd)


def test_open_dir_nested_folder(resolver: str, jail: tuple[Path, int]) -> None:
    # openat2 refused every folder open (EINVAL) when a mode rode along with O_DIRECTORY
    path, root = jail
    (path / "a" / "b").mkdir(parents=True)
    (path / "a" / "b" / "f").write_text("x")
    fd = fs.open_dir(root, "a/b")
    try:
        assert fs.read_file(fd, "f", 10) == b"x"
    finally:
        os.close(fd)
    if resolver == "openat2":
        assert fs._openat2_works is True
