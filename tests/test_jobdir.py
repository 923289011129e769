"""The service's files in a job folder (JOB, LOG), reached only through its descriptor."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchingest import jobdir
from batchingest.jobfile import JOB_LIMIT, JobFile, JobFileError
from batchingest.runner import TaskResult


@pytest.fixture
def job(tmp_path: Path) -> Path:
    path = tmp_path / "job"
    path.mkdir()
    return path


@pytest.fixture
def dir_fd(job: Path) -> Iterator[int]:
    fd = jobdir.open_folder(job)
    yield fd
    os.close(fd)


def test_log_is_appended_and_created(job: Path, dir_fd: int) -> None:
    jobdir.append_log(dir_fd, "one")
    jobdir.append_log(job, "two")  # by path, for callers that hold one
    lines = (job / "LOG").read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["batchingest: one", "batchingest: two"]
    fd = jobdir.open_log(dir_fd)
    try:
        assert os.get_blocking(fd) and not os.get_inheritable(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("mode", [0o644, 0o444])
def test_a_log_link_is_never_written_through(
    job: Path, dir_fd: int, tmp_path: Path, mode: int
) -> None:
    outside = tmp_path / "outside"
    outside.write_text("precious\n")
    outside.chmod(mode)
    (job / "LOG").symlink_to(outside)
    with pytest.raises(jobdir.LogError, match="LOG is a symbolic link"):
        jobdir.open_log(dir_fd)
    with pytest.raises(jobdir.LogError):
        jobdir.append_log(dir_fd, "x")
    assert outside.read_text() == "precious\n"
    dangling = tmp_path / "made-by-the-link"
    (job / "LOG").unlink()
    (job / "LOG").symlink_to(dangling)
    with pytest.raises(jobdir.LogError):
        jobdir.open_log(dir_fd)
    assert not dangling.exists()


def test_a_log_fifo_or_folder_is_refused_without_waiting(job: Path, dir_fd: int) -> None:
    os.mkfifo(job / "LOG")
    t0 = time.monotonic()
    with pytest.raises(jobdir.LogError, match="LOG is a named pipe"):
        jobdir.open_log(dir_fd)
    assert time.monotonic() - t0 < 1
    (job / "LOG").unlink()
    (job / "LOG").mkdir()
    with pytest.raises(jobdir.LogError, match="LOG is a folder"):
        jobdir.open_log(dir_fd)


def test_open_log_of_a_vanished_folder_is_an_os_error(job: Path) -> None:
    with pytest.raises(FileNotFoundError):
        jobdir.open_log(job.parent / "gone")


def test_job_load_and_save_through_the_descriptor(job: Path, dir_fd: int) -> None:
    assert jobdir.load_job(dir_fd) == JobFile()
    saved = JobFile(todo=["b"], finished=[{"Name": "a"}], extra={"K": 1})
    jobdir.save_job(dir_fd, saved)
    assert jobdir.load_job(dir_fd) == saved
    assert sorted(os.listdir(job)) == ["JOB"]
    assert (job / "JOB").stat().st_mode & 0o777 == 0o644


def test_a_job_link_is_never_read(job: Path, dir_fd: int, tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text('{"Todo": ["evil"]}')
    (job / "JOB").symlink_to(outside)
    with pytest.raises(JobFileError, match="symbolic link"):
        jobdir.load_job(dir_fd)
    (job / "JOB").unlink()
    (job / "JOB").symlink_to("/dev/zero")
    t0 = time.monotonic()
    with pytest.raises(JobFileError, match="symbolic link"):
        jobdir.load_job(dir_fd)
    assert time.monotonic() - t0 < 1


def test_a_job_fifo_is_refused_without_waiting(job: Path, dir_fd: int) -> None:
    os.mkfifo(job / "JOB")
    t0 = time.monotonic()
    with pytest.raises(JobFileError, match="named pipe"):
        jobdir.load_job(dir_fd)
    assert time.monotonic() - t0 < 1


def test_job_size_cap(job: Path, dir_fd: int) -> None:
    base = json.dumps({"Todo": ["a"], "Pad": ""}).encode()
    pad = JOB_LIMIT - len(base)
    (job / "JOB").write_bytes(json.dumps({"Todo": ["a"], "Pad": "x" * pad}).encode())
    assert (job / "JOB").stat().st_size == JOB_LIMIT
    assert jobdir.load_job(dir_fd).todo == ["a"]  # exactly the limit is fine
    (job / "JOB").write_bytes(json.dumps({"Todo": ["a"], "Pad": "x" * (pad + 1)}).encode())
    with pytest.raises(JobFileError, match="JOB is larger than 1048576 bytes"):
        jobdir.load_job(dir_fd)


def test_finished_records() -> None:
    ok = TaskResult("t", "S", "F", ok=True, exit_code=0)
    assert jobdir.finished_record(ok) == {"Name": "t", "Start": "S", "Finish": "F", "Status": "ok"}
    bad = TaskResult("t", "S", "F", ok=False, exit_code=3, reason="exit status 3")
    assert jobdir.finished_record(bad) == {
        "Name": "t",
        "Start": "S",
        "Finish": "F",
        "Status": "error",
        "ExitCode": 3,
        "Reason": "exit status 3",
    }
    record = jobdir.failure_record("start", "LOG is a named pipe")
    assert record["Status"] == "error" and record["Reason"] == "LOG is a named pipe"
    assert record["Start"] == record["Finish"] and record["ExitCode"] is None


def test_record_failure_appends_to_finished_and_keeps_todo(job: Path, dir_fd: int) -> None:
    (job / "JOB").write_text('{"Todo": ["a", "b"], "Keep": 1}')
    assert jobdir.record_failure(dir_fd, "LOG is a named pipe")
    data = json.loads((job / "JOB").read_text())
    assert data["Todo"] == ["a", "b"] and data["Keep"] == 1
    (entry,) = data["Finished"]
    assert entry["Name"] == "a" and entry["Reason"] == "LOG is a named pipe"
    (job / "JOB").write_text("not json")
    assert not jobdir.record_failure(dir_fd, "x")
    assert (job / "JOB").read_text() == "not json"
