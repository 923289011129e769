"""Task resolution and the control file, without the processor around them."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchingest.runner import (
    CONTROL_LIMIT,
    ControlDir,
    EncodedEnv,
    TaskProcess,
    UnknownTask,
    base_env,
    fresh_control_file,
    read_control,
    resolve,
    run_task,
    sweep_control_dirs,
)


def test_tasks_folder_wins_over_a_builtin(tmp_path: Path) -> None:
    assert resolve("stage", tmp_path) == [sys.executable, "-P", "-m", "batchingest.tasks.stage"]
    own = tmp_path / "stage"
    own.write_text("#!/bin/sh\n")
    own.chmod(0o755)
    assert resolve("stage", tmp_path) == [str(own)]


@pytest.mark.parametrize("python_path", [None, os.pathsep + "/nowhere", ".", "x:"])
@pytest.mark.parametrize("task", ["stage", "transfer"])
def test_a_job_folder_cannot_replace_a_built_in_task(
    tmp_path: Path, task: str, python_path: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A built-in task runs in the job folder, whose files are the user's: a package of
    the service's name among them is never imported in place of the service's own, also
    where the service's PYTHONPATH has an empty or relative entry (which, taken in the
    job folder, would name it)."""
    if python_path is not None:
        monkeypatch.setenv("PYTHONPATH", python_path)
    env = base_env({})
    job = tmp_path / "job"
    (job / "batchingest" / "tasks").mkdir(parents=True)
    (job / "batchingest" / "__init__.py").write_text("")
    (job / "batchingest" / "tasks" / "__init__.py").write_text("")
    (job / "batchingest" / "tasks" / f"{task}.py").write_text(
        "open('USER-CODE-RAN', 'w').close()\n"
    )
    cmd = resolve(task, tmp_path / "tasks")
    done = subprocess.run(cmd, cwd=job, env=env, capture_output=True, text=True, timeout=60)
    assert not (job / "USER-CODE-RAN").exists()
    assert "ERROR" in done.stdout + done.stderr  # the real task, finding no request


def test_unknown_invalid_and_not_executable_tasks(tmp_path: Path) -> None:
    with pytest.raises(UnknownTask, match="unknown task nope"):
        resolve("nope", tmp_path)
    with pytest.raises(UnknownTask, match="invalid task name"):
        resolve("../etc/passwd", tmp_path)
    (tmp_path / "plain").write_text("#!/bin/sh\n")
    with pytest.raises(UnknownTask, match="not executable"):
        resolve("plain", tmp_path)


def test_a_task_file_made_executable_or_not_between_runs(tmp_path: Path) -> None:
    task = tmp_path / "t"
    task.write_text("#!/bin/sh\n")
    task.chmod(0o755)
    assert resolve("t", tmp_path) == [str(task)]
    task.chmod(0o644)  # the answer kept for the file is not reused once it changed
    with pytest.raises(UnknownTask, match="not executable"):
        resolve("t", tmp_path)
    task.chmod(0o755)
    assert resolve("t", tmp_path) == [str(task)]
    task.unlink()
    task.mkdir()  # a folder of that name is no task file
    with pytest.raises(UnknownTask, match="unknown task t"):
        resolve("t", tmp_path)


@pytest.mark.parametrize("encoded", [False, True])
def test_a_task_gets_the_environment_given_and_the_job_variables(
    tmp_path: Path, encoded: bool
) -> None:
    tasks, job = tmp_path / "tasks", tmp_path / "job é"
    tasks.mkdir()
    job.mkdir()
    (tasks / "show").write_text('#!/bin/sh\necho "$FOO|$JOBNAME|$JOBPATH|$JOBCONTROL"\n')
    (tasks / "show").chmod(0o755)
    env = {"FOO": "bär", "JOBNAME": "overridden", "PATH": os.environ["PATH"]}
    log_fd = os.open(job / "LOG", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    hold_fd = os.open(job, os.O_RDONLY | os.O_DIRECTORY)
    try:
        result = run_task(
            "show",
            job_dir=job,
            job_name="j1",
            tasks_dir=tasks,
            control=tmp_path / "c.control",
            env=EncodedEnv.of(env) if encoded else env,
            log_fd=log_fd,
            hold_fd=hold_fd,
            timeout=None,
            process=TaskProcess(),
        )
    finally:
        os.close(log_fd)
        os.close(hold_fd)
    assert result.ok
    assert f"bär|j1|{job}|{tmp_path / 'c.control'}\n" in (job / "LOG").read_text()


def test_control_lines(tmp_path: Path) -> None:
    control = tmp_path / "control"
    control.write_text("addtask:a\n\n  \naddtask:b-2.x\n")
    assert read_control(control) == (["a", "b-2.x"], "")
    control.write_text("addtask:a\naddtask:../x\n")
    added, error = read_control(control)
    assert added == ["a"] and "bad control line 2" in error and "../x" in error
    control.write_text("deltask:a\n")
    assert "bad control line 1" in read_control(control)[1]
    assert read_control(tmp_path / "missing") == ([], "")
    control.write_text("")
    assert read_control(control) == ([], "")


def test_control_file_that_is_a_link_fifo_or_huge_is_refused_quickly(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("addtask:evil\n")
    control = tmp_path / "control"
    control.symlink_to(outside)
    added, error = read_control(control)
    assert added == [] and "not a regular file" in error
    control.unlink()
    os.mkfifo(control)
    t0 = time.monotonic()
    added, error = read_control(control)
    assert added == [] and "named pipe" in error and time.monotonic() - t0 < 1
    control.unlink()
    control.write_bytes(b"addtask:a\n" * (CONTROL_LIMIT // 10 + 1))
    assert read_control(control) == ([], f"control file is larger than {CONTROL_LIMIT} bytes")


@pytest.mark.parametrize("through_fd", [False, True])
@pytest.mark.parametrize("left", ["link", "fifo", "folder", "file"])
def test_a_fresh_control_file_replaces_whatever_was_left(
    tmp_path: Path, left: str, through_fd: bool
) -> None:
    """By path, or through the control folder's descriptor the processor keeps open."""
    outside = tmp_path / "outside"
    outside.write_text("keep")
    control = tmp_path / "control"
    if left == "link":
        control.symlink_to(outside)
    elif left == "fifo":
        os.mkfifo(control)
    elif left == "folder":
        (control / "sub").mkdir(parents=True)
    else:
        control.write_text("addtask:old\n")
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY) if through_fd else None
    try:
        fresh_control_file(control, dir_fd)
        assert control.is_file() and not control.is_symlink() and control.read_text() == ""
        assert outside.read_text() == "keep"
        control.write_text("addtask:next\n")
        assert read_control(control, dir_fd) == (["next"], "")
        control.unlink()
        control.symlink_to(outside)
        assert "not a regular file" in read_control(control, dir_fd)[1]
        if dir_fd is not None:
            os.fstat(dir_fd)  # still open: the caller's, never closed here
    finally:
        if dir_fd is not None:
            os.close(dir_fd)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_control_dir_carries_the_pid_and_is_removed_on_close(tmp_path: Path) -> None:
    control = ControlDir(str(tmp_path))
    assert control.path.parent == tmp_path
    assert control.path.name.startswith(f"batchingest-control-{os.getpid()}-")
    assert control.file(7) == control.path / "7.control"
    control.close()
    assert not control.path.exists()
    control.close()  # twice is harmless


def test_sweep_removes_only_control_dirs_of_dead_unlocked_services(tmp_path: Path) -> None:
    dead = tmp_path / f"batchingest-control-{_dead_pid()}-abc"
    (dead / "sub").mkdir(parents=True)
    (dead / "1.control").write_text("x")
    dead_but_locked = tmp_path / f"batchingest-control-{_dead_pid()}-locked"
    dead_but_locked.mkdir()
    other = tmp_path / "batchingest-other-1"
    other.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "f").write_text("x")
    link = tmp_path / f"batchingest-control-{_dead_pid()}-link"
    link.symlink_to(target)
    fd = os.open(dead_but_locked, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live service in another pid namespace, say
    try:
        mine = ControlDir(str(tmp_path))  # sweeps first, then makes its own
        assert not dead.exists()
        assert dead_but_locked.is_dir() and other.is_dir() and (target / "f").exists()
        assert link.is_symlink()
        assert sweep_control_dirs(str(tmp_path)) == []  # its own folder: alive
        assert mine.path.is_dir()
        mine.close()
    finally:
        os.close(fd)
    assert sweep_control_dirs(str(tmp_path)) == [dead_but_locked.name]
