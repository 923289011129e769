"""Archive folders with search but no read permission (0711) are passed through, as a
path lookup would; errors that are about the archive or the staging area, not about a
file, are said as such (the resolver's ArchiveUnavailable, the task's fatal error).

Modes apply only to an unprivileged process: the code under test runs in a subprocess
through tests/modes.py (as root: without the capabilities that pass every mode check).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from modes import unprivileged
from test_staging_task import Area

from batchingest.staging import ArchiveUnavailable, Resolver

RESOLVE = """
import json, sys
from pathlib import Path
from batchingest.staging import Resolver
try:
    entries, invalid, unresolved = Resolver(Path(sys.argv[1])).resolve(sys.argv[2:])
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
else:
    print(json.dumps({"paths": [e.path for e in entries], "unresolved": unresolved}))
"""


def run_unprivileged(
    *argv: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        unprivileged(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def resolve_unprivileged(archive: Path, *ids: str) -> dict[str, object]:
    p = run_unprivileged(sys.executable, "-c", RESOLVE, str(archive), *ids)
    assert p.returncode == 0, p.stderr
    return dict(json.loads(p.stdout))


def search_only(area: Area, *folders: str) -> None:
    """Give folders of the archive, and its top, search permission only (0111: the owner
    too, as the tests may run as the owner), and check that the subprocess indeed cannot
    list them, else the test would prove nothing."""
    for rel in (*folders, ""):
        (area.archive / rel).chmod(0o111)
    listed = run_unprivileged(sys.executable, "-c", "import os, sys; os.listdir(sys.argv[1])",
                              str(area.archive))  # fmt: skip
    assert listed.returncode != 0 and "PermissionError" in listed.stderr


@pytest.fixture
def area(tmp_path: Path) -> Iterator[Area]:
    a = Area(tmp_path)
    yield a
    for p in (a.archive, a.archive / "sub", a.archive / "sub" / "deeper", a.staging):
        if p.is_dir():
            p.chmod(0o755)  # so that tmp_path can be removed when not run as root


def test_the_resolver_finds_files_in_search_only_folders(area: Area) -> None:
    area.add("sub/deeper/f", b"f")
    area.add("sub/g", b"g")
    area.add("top", b"top")
    search_only(area, "sub/deeper", "sub")
    found = resolve_unprivileged(area.archive, "sub/deeper/f", "sub/g", "top", "sub/none")
    assert found == {"paths": ["sub/deeper/f", "sub/g", "top"], "unresolved": ["sub/none"]}


def test_the_stage_task_copies_from_search_only_folders(area: Area) -> None:
    data = {"sub/deeper/f": b"deep", "sub/g": b"g", "top": b"top"}
    for rel, content in data.items():
        area.add(rel, content)
    area.manifest(list(data))
    search_only(area, "sub/deeper", "sub")
    p = run_unprivileged(sys.executable, "-m", "batchingest.tasks.stage", cwd=area.job,
                         env=area.env())  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    for rel, content in data.items():
        assert (area.staging / rel).read_bytes() == content
    progress = area.progress()
    assert progress is not None and progress.files_staged == 3 and progress.error is None


def test_a_file_in_a_folder_the_service_may_not_search_is_unresolved(area: Area) -> None:
    """No search permission on a folder beneath the archive's top: its files are not
    there for the service, as final an answer as a missing name (the DTS asking again
    would meet the same)."""
    area.add("sub/f", b"f")
    area.add("top", b"top")
    (area.archive / "sub").chmod(0o000)
    found = resolve_unprivileged(area.archive, "top", "sub/f")
    assert found.get("error") is None, found
    assert found["unresolved"] == ["sub/f"] and found["paths"] == ["top"]


def test_no_archive_is_not_a_missing_file(tmp_path: Path) -> None:
    """An archive not there (not mounted) says nothing about the ids."""
    with pytest.raises(ArchiveUnavailable, match="cannot be opened: No such file"):
        Resolver(tmp_path / "unmounted").resolve(["a/b"])


OUT_OF_DESCRIPTORS = """
import os, resource, sys
from pathlib import Path
from batchingest.staging import ArchiveUnavailable, Resolver
resolver = Resolver(Path(sys.argv[1]))
resolver.resolve(["top"])  # everything imported and built once
used = len(os.listdir("/proc/self/fd")) - 1  # less the listing's own
# room for the archive's top folder, none for its sub folder
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (used + 1, hard))
try:
    resolver.resolve(["sub/f"])
except ArchiveUnavailable as e:
    print(e)
"""


def test_running_out_of_descriptors_is_not_a_missing_file(area: Area) -> None:
    area.add("sub/f", b"f")
    area.add("top", b"top")
    p = subprocess.run([sys.executable, "-c", OUT_OF_DESCRIPTORS, str(area.archive)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.stdout == "the archive cannot be read at 'sub/f': Too many open files\n", p.stderr


def test_an_unopenable_staging_area_is_a_recorded_fatal_error(area: Area) -> None:
    area.add("f", b"f")
    area.manifest(["f"])
    area.staging.chmod(0o000)
    p = run_unprivileged(sys.executable, "-m", "batchingest.tasks.stage", cwd=area.job,
                         env=area.env())  # fmt: skip
    message = f"the staging area {area.staging} cannot be opened: Permission denied"
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stdout == f"ERROR stage: {message}\n"
    assert p.stderr == ""  # no traceback
    progress = area.progress()
    assert progress is not None and progress.error == message
