"""The copy engine's grouping: small copies flushed in groups with one syncfs each and
only then named, large ones on their own; a crash between copy and naming.

Everything happens in folders under tmp_path.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchingest import copyengine, fs, transfers
from batchingest.staging import MANIFEST, TEMP_PREFIX, Resolver, manifest_bytes, read_progress
from batchingest.tasks import stage

SMALL_LARGE = 64 << 10  # "large" in these tests, so that large files stay cheap


def make_area(base: Path, sizes: list[int]) -> tuple[Path, Path, Path, list[str]]:
    archive, staging, job = base / "archive", base / "staging", base / "job"
    for d in (archive, staging, job):
        d.mkdir(parents=True)
    rels = []
    for i, size in enumerate(sizes):
        rel = f"d{i % 3}/f{i}.bin"
        (archive / rel).parent.mkdir(exist_ok=True)
        (archive / rel).write_bytes(os.urandom(size))
        rels.append(rel)
    entries, invalid, unresolved = Resolver(archive).resolve(rels)
    assert not invalid and not unresolved
    (job / MANIFEST).write_bytes(manifest_bytes(entries, archive, staging, "job1"))
    return archive, staging, job, rels


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(
        st.one_of(st.sampled_from([0, 1, 4096]), st.integers(1, 3 * SMALL_LARGE)), max_size=40
    ),
    group=st.integers(1, 12),
    parallel=st.integers(1, 4),
)
def test_any_mix_of_sizes_is_staged_with_one_syncfs_per_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sizes: list[int], group: int, parallel: int
) -> None:
    archive, staging, job, rels = make_area(tmp_path / uuid.uuid4().hex, sizes)
    monkeypatch.setenv("BATCHINGEST_ARCHIVE", str(archive))
    monkeypatch.setenv("BATCHINGEST_STAGING", str(staging))
    monkeypatch.setenv("BATCHINGEST_STAGE_PARALLEL", str(parallel))
    monkeypatch.setattr(stage, "LARGE", SMALL_LARGE)
    monkeypatch.setattr(copyengine, "STEP", 16 << 10)  # large files in several steps
    monkeypatch.setattr(stage, "group_size", lambda holders, reserve=0: group)
    flushes: list[int] = []
    real_syncfs = fs.syncfs

    def counted(fd: int) -> bool:
        flushes.append(1)
        return real_syncfs(fd)

    monkeypatch.setattr(fs, "syncfs", counted)
    job_fd = fs.open_root(job)
    try:
        assert stage.stage_job("job1", job_fd) == 0
        progress = read_progress(job_fd)
    finally:
        os.close(job_fd)
    small = sum(1 for s in sizes if s < SMALL_LARGE)
    # every group is filled to `group` under the lock, the rest is one last group, and
    # only groups of FSYNC_UNDER or more are worth a syncfs
    full, rest = divmod(small, group)
    worth = copyengine.FSYNC_UNDER
    assert len(flushes) == full * (group >= worth) + (rest >= worth)
    assert progress is not None and progress.files_staged == len(sizes)
    assert progress.bytes_staged == sum(sizes)
    for rel in rels:
        src, dst = archive / rel, staging / rel
        assert dst.read_bytes() == src.read_bytes()
        assert dst.stat().st_mtime_ns == src.stat().st_mtime_ns
    assert not [p for p in staging.rglob("*") if p.name.startswith(TEMP_PREFIX)]


KILL_AT_SECOND_GROUP = """
import os, signal
from batchingest.tasks import stage
real_commit = stage.Stager.commit
calls = []

def commit(self, pending):
    calls.append(len(pending))
    if len(pending) > 1 and len(calls) > 1:
        # copied and flushed, not named yet: the crash this test is about
        os.kill(os.getpid(), signal.SIGKILL)
    real_commit(self, pending)

stage.Stager.commit = commit
stage.main()
"""


@pytest.mark.parametrize("unnamed", ["1", "0"])
def test_a_crash_between_copy_and_naming_shows_no_incomplete_file(
    tmp_path: Path, unnamed: str
) -> None:
    sizes = [4096] * 300 + [SMALL_LARGE * 2]
    archive, staging, job, rels = make_area(tmp_path, sizes)
    env = dict(os.environ, BATCHINGEST_ARCHIVE=str(archive), BATCHINGEST_STAGING=str(staging),
               BATCHINGEST_STAGE_PARALLEL="3", BATCHINGEST_STAGE_UNNAMED=unnamed,
               JOBNAME="job1", JOBPATH=str(job))  # fmt: skip

    limit = stage.descriptor_reserve(3) + 4 * 36  # groups of 36 copies (4 holders)

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    crashed = subprocess.run(
        [sys.executable, "-c", KILL_AT_SECOND_GROUP],
        cwd=job, env=env, preexec_fn=few_descriptors, capture_output=True, timeout=120,
    )  # fmt: skip
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout
    named = [rel for rel in rels if (staging / rel).exists()]
    assert 0 < len(named) < len(rels)  # the first group, not the one being named
    for rel in named:
        assert (staging / rel).read_bytes() == (archive / rel).read_bytes()
    leftovers = [p for p in staging.rglob("*") if p.name.startswith(TEMP_PREFIX)]
    assert (leftovers == []) == (unnamed == "1")  # unnamed copies vanish with the process
    again = subprocess.run([sys.executable, "-m", "batchingest.tasks.stage"], cwd=job, env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert again.returncode == 0, again.stdout
    for rel in rels:
        assert (staging / rel).read_bytes() == (archive / rel).read_bytes()
    assert not [p for p in staging.rglob("*") if p.name.startswith(TEMP_PREFIX)]


def transfer_job(
    tmp_path: Path, unnamed: str, contents: list[bytes]
) -> tuple[Path, Path, Path, list[str], dict[str, str]]:
    """A transfer job copying the folder /t of endpoint src (its files d0..d3/fN hold
    contents) to /c of endpoint dst: (src, dst, job, the files' paths, the environment)."""
    src, dst, job = tmp_path / "src", tmp_path / "dst", tmp_path / "job"
    for d in (src, dst, job):
        d.mkdir()
    names = [f"t/d{i % 4}/f{i}" for i in range(len(contents))]
    for rel, content in zip(names, contents, strict=True):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(content)
    tree = {"source_path": "/t", "destination_path": "/c", "recursive": True}
    request = {"kind": "transfer", "id": str(uuid.uuid4()), "source_endpoint": "src",
               "destination_endpoint": "dst", "items": [tree]}  # fmt: skip
    (job / transfers.REQUEST).write_text(json.dumps(request))
    env = dict(os.environ, BATCHINGEST_TRANSFER_UNNAMED=unnamed,
               BATCHINGEST_TRANSFER_ENDPOINTS=json.dumps([["src", str(src), True],
                                                          ["dst", str(dst), False]]))  # fmt: skip
    return src, dst, job, names, env


def few_descriptors() -> None:  # a transfer's groups of (700 - 256) // 2 = 222 copies
    resource.setrlimit(resource.RLIMIT_NOFILE, (700, 700))


@pytest.mark.parametrize("unnamed", ["1", "0"])
def test_transfer_of_many_files_in_groups_under_a_low_descriptor_limit(
    tmp_path: Path, unnamed: str
) -> None:
    contents = [str(i).encode() for i in range(900)]
    src, dst, job, names, env = transfer_job(tmp_path, unnamed, contents)
    (src / "t" / "big").write_bytes(os.urandom(copyengine.LARGE + 5))
    done = subprocess.run([sys.executable, "-m", "batchingest.tasks.transfer"], cwd=job, env=env,
                          preexec_fn=few_descriptors, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    progress = json.loads((job / transfers.PROGRESS).read_text())
    assert progress["files_transferred"] == len(names) + 1
    for content, rel in zip(contents, names, strict=True):
        assert (dst / "c" / rel.removeprefix("t/")).read_bytes() == content
    assert (dst / "c" / "big").read_bytes() == (src / "t" / "big").read_bytes()
    assert not [p for p in dst.rglob("*") if p.name.startswith(".batchingest")]


def test_copy_flushing_copies_in_steps_and_reports_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(copyengine, "STEP", 64 << 10)
    data = os.urandom((64 << 10) * 3 + 123)
    (tmp_path / "src").write_bytes(data)
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT, 0o600)
    steps: list[int] = []
    try:
        assert copyengine.copy_flushing(src, dst, len(data), steps.append) == len(data)
        assert fs.sync_file_range(dst, 0, len(data), wait=True)
        # a source shorter than it was said to be: the bytes there are, no more
        assert copyengine.copy_flushing(src, dst, len(data) + 999) == len(data)
    finally:
        os.close(src)
        os.close(dst)
    assert steps == [64 << 10] * 3 + [123]
    assert (tmp_path / "dst").read_bytes() == data


def test_a_large_copy_between_file_systems_falls_back_to_a_plain_copy(tmp_path: Path) -> None:
    """copy_file_range refuses (EXDEV) between /dev/shm and the test's folder: the large
    file's stepped copy must then copy it the plain way, and report it as one step."""
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system (/dev/shm) to copy from here")
    import shutil
    import tempfile

    shm = Path(tempfile.mkdtemp(prefix="batchingest-test-", dir="/dev/shm"))
    try:
        data = os.urandom(copyengine.LARGE + 12345)
        (shm / "src").write_bytes(data)
        src = os.open(shm / "src", os.O_RDONLY)
        dst = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT, 0o600)
        steps: list[int] = []
        try:
            copied = copyengine.copy_flushing(src, dst, len(data), steps.append)
        finally:
            os.close(src)
            os.close(dst)
        assert copied == len(data) and sum(steps) == len(data)
        assert (tmp_path / "dst").read_bytes() == data
    finally:
        shutil.rmtree(shm)


KILL_AT_SECOND_SYNCFS = """
import os, signal
from batchingest.tasks import transfer
real_syncfs_group = transfer.syncfs_group
calls = []

def syncfs_group(copies, fd):
    calls.append(copies)
    if len(calls) > 1:
        # a group copied, neither flushed nor named: the crash this test is about
        os.kill(os.getpid(), signal.SIGKILL)
    return real_syncfs_group(copies, fd)

transfer.syncfs_group = syncfs_group
transfer.main()
"""


@pytest.mark.parametrize("unnamed", ["1", "0"])
def test_a_transfer_killed_before_a_groups_syncfs_names_no_file_of_it(
    tmp_path: Path, unnamed: str
) -> None:
    """Only copies whose group was flushed have names (and TRANSFERRED lines); the group
    killed before its syncfs leaves none, and a rerun of the job finishes the rest."""
    contents = [os.urandom(4096) for _ in range(900)]
    src, dst, job, names, env = transfer_job(tmp_path, unnamed, contents)
    crashed = subprocess.run([sys.executable, "-c", KILL_AT_SECOND_SYNCFS], cwd=job, env=env,
                             preexec_fn=few_descriptors, capture_output=True,
                             timeout=120)  # fmt: skip
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout
    named = [rel for rel in names if (dst / "c" / rel.removeprefix("t/")).exists()]
    assert 0 < len(named) < len(names)  # the first group only
    for rel in named:
        assert (dst / "c" / rel.removeprefix("t/")).read_bytes() == (src / rel).read_bytes()
    lines = (job / transfers.TRANSFERRED).read_text().splitlines()
    recorded = {json.loads(line)["destination_path"] for line in lines}
    assert recorded == {"/c/" + rel.removeprefix("t/") for rel in named}
    leftovers = [p for p in dst.rglob("*") if p.name.startswith(".batchingest")]
    assert (leftovers == []) == (unnamed == "1")  # unnamed copies vanish with the process
    again = subprocess.run([sys.executable, "-m", "batchingest.tasks.transfer"], cwd=job,
                           env=env, preexec_fn=few_descriptors, capture_output=True, text=True,
                           timeout=120)  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    for rel in names:
        assert (dst / "c" / rel.removeprefix("t/")).read_bytes() == (src / rel).read_bytes()
    assert not [p for p in dst.rglob("*") if p.name.startswith(".batchingest")]


@pytest.mark.parametrize("task", ["stage", "transfer"])
def test_a_built_in_task_starts_without_the_services_modules(task: str) -> None:
    """A task starts once per request: it imports neither the service's settings, logging
    and asyncio nor the store (about half of its start-up CPU time)."""
    heavy = ["asyncio", "batchingest.config", "batchingest.store", "batchingest.jobdir"]
    code = (f"import sys, batchingest.tasks.{task}; "
            f"print([m for m in {heavy!r} if m in sys.modules])")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)  # fmt: skip
    assert out.stdout.strip() == "[]"


BOTH_AT_ONCE = """
import threading
from batchingest.tasks import transfer
both = threading.Barrier(2, timeout=20)
real_copy_file = transfer.Run.copy_file

def copy_file(self, *args, **kwargs):
    both.wait()  # broken (and the task failed) unless the two files are copied at once
    return real_copy_file(self, *args, **kwargs)

transfer.Run.copy_file = copy_file
transfer.main()
"""


def test_a_folder_of_two_files_is_copied_on_two_threads(tmp_path: Path) -> None:
    """Files are handed to the copying threads in pieces, but a short list is split
    evenly: two big files in one folder go on two threads, not one after the other."""
    contents = [os.urandom(4096), os.urandom(4096)]
    src, dst, job, names, env = transfer_job(tmp_path, "1", contents)
    for rel in names:  # both in one folder
        os.rename(src / rel, src / "t" / "d0" / Path(rel).name)
    done = subprocess.run([sys.executable, "-c", BOTH_AT_ONCE], cwd=job, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    for rel in names:
        name = Path(rel).name
        assert (dst / "c" / "d0" / name).read_bytes() == (src / "t" / "d0" / name).read_bytes()


GROUP_UNDER_LIMIT = """
import resource, sys
from batchingest import copyengine
from batchingest.tasks import stage
limit, parallel = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
print(copyengine.group_size(parallel + 1, stage.descriptor_reserve(parallel)))
"""


@pytest.mark.parametrize("parallel", [1, 8, 32])
def test_the_stage_tasks_groups_leave_room_for_its_kept_folders_and_threads(
    parallel: int,
) -> None:
    """Under a low hard limit the groups shrink so that the copies waiting in them (a
    group per thread and one being flushed), both sides' kept folders, each thread's own
    descriptors and the usual set-aside all fit."""
    limit = 700
    p = subprocess.run([sys.executable, "-c", GROUP_UNDER_LIMIT, str(limit), str(parallel)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stderr
    group = int(p.stdout)
    held = (parallel + 1) * group + 2 * stage.KEEP_OPEN + stage.FDS_PER_THREAD * parallel
    assert group >= 1
    assert held + copyengine.RESERVED_FDS <= limit


def test_many_folders_on_many_threads_under_a_low_descriptor_limit(tmp_path: Path) -> None:
    """Both sides keep KEEP_OPEN folders open and 16 threads copy: all fits in 700."""
    rels = [f"d{i:03d}/f{j}" for i in range(150) for j in range(3)]
    archive, staging, job = tmp_path / "archive", tmp_path / "staging", tmp_path / "job"
    for d in (archive, staging, job):
        d.mkdir()
    for rel in rels:
        (archive / rel).parent.mkdir(exist_ok=True)
        (archive / rel).write_bytes(rel.encode())
    entries, _, _ = Resolver(archive).resolve(rels)
    (job / MANIFEST).write_bytes(manifest_bytes(entries, archive, staging, "job1"))
    env = dict(os.environ, BATCHINGEST_ARCHIVE=str(archive), BATCHINGEST_STAGING=str(staging),
               BATCHINGEST_STAGE_PARALLEL="16", JOBNAME="job1", JOBPATH=str(job))  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "batchingest.tasks.stage"], cwd=job, env=env,
                          preexec_fn=few_descriptors, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    for rel in rels:
        assert (staging / rel).read_bytes() == rel.encode()
