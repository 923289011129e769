"""Running one task of a job: resolve it, start it, wait, read its control file.

The task interface is the original service's, kept exactly because existing task
scripts rely on it: the working directory is the job folder; the environment is the
service's plus JOBPATH, JOBNAME and JOBCONTROL (a fresh empty file); stdout and stderr
are appended to the job's LOG; exit status 0 means success. After a successful task,
each non-blank line of JOBCONTROL must be `addtask:NAME`.

A task runs in its own process group, so a timeout or a stop can kill everything it
started. It inherits the job's lock: if the service dies (kill -9, a crash), whatever
the task still runs keeps the job held until it exits, so the re-run that recovery
starts never runs beside an orphan of the first run. (Killing the task with the service
through PR_SET_PDEATHSIG would need a pre-exec hook, which makes every spawn several
times slower, and would still miss the task's own children.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from batchingest import fs
from batchingest.config import SECRET_ENV
from batchingest.jobdir import LOG_FILE, append_log, log_line, open_log
from batchingest.jobfile import now_rfc3339
from batchingest.lease import pid_alive
from batchingest.store import valid_name
from batchingest.tasks import BUILTIN

__all__ = ["LOG_FILE", "append_log", "log_line", "open_log"]  # their home is jobdir

log = logging.getLogger("batchingest.runner")
# Seconds a task gets between SIGTERM and SIGKILL when it is stopped.
KILL_AFTER = 5.0
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def base_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The service's environment without its secrets, plus settings for built-in tasks."""
    # nor the API processes' metrics folder (batchingest.apiprocs): a task's own
    # prometheus-client would write its counters among ours
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV and k != METRICS_ENV}
    env.update(extra)
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = fixed_python_path(env["PYTHONPATH"])
    return env


def fixed_python_path(value: str) -> str:
    """PYTHONPATH with its empty and relative entries made absolute, as the service
    meant them (against its own working folder). A task runs in its job folder, where
    `''` or `.` would name that folder: the job's files, which could then stand in for a
    built-in task's modules (`python -P` leaves PYTHONPATH as it is)."""
    here = os.getcwd()
    return os.pathsep.join(os.path.join(here, p) if not os.path.isabs(p) else p
                           for p in value.split(os.pathsep))  # fmt: skip


class EncodedEnv(dict[bytes, bytes]):
    """An environment already in the bytes a new process gets: every task of the service
    starts with the same one, and encoding each variable again for every spawn is a
    good part of what a spawn costs in Python."""

    @classmethod
    def of(cls, env: Mapping[str, str]) -> EncodedEnv:
        return cls((os.fsencode(k), os.fsencode(v)) for k, v in env.items())


class UnknownTask(Exception):
    pass


class CannotSpawn(Exception):
    """The service could not start a task: no descriptors, memory or processes left.

    Not the task's fault, so it is not recorded as a failed run: the processor puts the
    job back in queue/ and runs it later.
    """


# errors of starting a process that mean the service, not the task, is in trouble
_SPAWN_LIMITS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN})


def resolve(task: str, tasks_dir: Path) -> list[str]:
    """The command for a task name: TASKS/NAME, else a built-in, else UnknownTask."""
    if not valid_name(task):
        raise UnknownTask(f"invalid task name {task!r}")
    path = tasks_dir / task
    try:
        st: os.stat_result | None = os.stat(path)
    except OSError as e:
        if e.errno not in _NOT_A_FILE:
            raise
        st = None
    if st is not None and stat.S_ISREG(st.st_mode):
        if not _executable(str(path), st):
            raise UnknownTask(f"task {task} ({path}) is not executable")
        return [str(path)]
    module = BUILTIN.get(task)
    if module is not None:
        # -P: the task runs in the job folder, and `-m` would put that folder first on
        # the module path, so a job holding batchingest/tasks/NAME.py would run its own
        return [sys.executable, "-P", "-m", f"batchingest.tasks.{module}"]
    raise UnknownTask(f"unknown task {task}")


# what Path.is_file() takes for "not a file" rather than raising
_NOT_A_FILE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP})

# access(X_OK) answers of task files, by the file's identity: the same task run over and
# over need not ask again. A chmod, chown or ACL change moves the ctime, a replaced file
# or link target has another inode, so a changed file is asked about again.
_EXECUTABLE: dict[tuple[str, int, int, int, int, int, int], bool] = {}


def _key(path: str, st: os.stat_result) -> tuple[str, int, int, int, int, int, int]:
    return (path, st.st_dev, st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_ctime_ns)


def _executable(path: str, st: os.stat_result) -> bool:
    key = _key(path, st)
    known = _EXECUTABLE.get(key)
    if known is None:
        known = os.access(path, os.X_OK)
        try:  # kept only if the answer was about that same file (a link not retargeted)
            same = _key(path, os.stat(path)) == key
        except OSError:
            same = False
        if same:
            if len(_EXECUTABLE) >= 256:
                _EXECUTABLE.clear()
            _EXECUTABLE[key] = known
    return known


@dataclass
class TaskResult:
    task: str
    start: str
    finish: str
    ok: bool
    exit_code: int | None = None
    reason: str = ""
    added: list[str] = field(default_factory=list)
    # stopped because the service is stopping: not the task's fault, not recorded as done
    interrupted: bool = False
    # stopped by a cancel request or a deadline (batchingest.control): reason says which
    canceled: bool = False
    seconds: float = 0.0


class TaskProcess:
    """One running task; `stop()` may be called from another thread."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.interrupted = False
        self.timed_out = False
        self.canceled = ""  # why it was canceled, if it was
        self._lock = threading.Lock()
        self._killer: threading.Timer | None = None

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(
        self,
        *,
        interrupted: bool = False,
        timed_out: bool = False,
        canceled: str = "",
        grace: float = KILL_AFTER,
    ) -> None:
        """SIGTERM the task's process group, SIGKILL it `grace` seconds later.

        Called before the task has started, it keeps it from starting at all.
        """
        with self._lock:
            self.interrupted |= interrupted
            self.timed_out |= timed_out
            self.canceled = self.canceled or canceled
            if self.proc is None or self.proc.returncode is not None:
                return
            self._signal_group(signal.SIGTERM)
            if self._killer is None:
                self._killer = threading.Timer(grace, self._signal_group, (signal.SIGKILL,))
                self._killer.daemon = True
                self._killer.start()

    def run(
        self,
        argv: list[str],
        *,
        job_dir: Path,
        job_name: str,
        control: Path,
        env: Mapping[str, str] | EncodedEnv,
        log_fd: int,
        hold_fd: int,
        timeout: float | None,
        control_fd: int | None = None,
    ) -> int:
        fresh_control_file(control, control_fd)
        child_env = EncodedEnv(env) if isinstance(env, EncodedEnv) else EncodedEnv.of(env)
        child_env[b"JOBPATH"] = os.fsencode(job_dir)
        child_env[b"JOBNAME"] = os.fsencode(job_name)
        child_env[b"JOBCONTROL"] = os.fsencode(control)
        with self._lock:
            if self.interrupted or self.canceled:
                return -signal.SIGTERM
            self.proc = subprocess.Popen(
                argv,
                cwd=job_dir,
                env=child_env,
                stdin=_devnull(),
                stdout=log_fd,
                stderr=log_fd,
                pass_fds=(hold_fd,),
                start_new_session=True,
            )
        timer = None
        if timeout:
            timer = threading.Timer(timeout, lambda: self.stop(timed_out=True))
            timer.daemon = True
            timer.start()
        try:
            code = self.proc.wait()
        finally:
            if timer is not None:
                timer.cancel()
            if self._killer is not None:
                self._killer.cancel()
            # whatever the task left running in its group goes with it
            self._signal_group(signal.SIGKILL)
        return code


_DEVNULL: list[int] = []


def _devnull() -> int:
    """/dev/null, opened once for every task's stdin (Popen's DEVNULL opens it each time)."""
    if not _DEVNULL:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        if _DEVNULL:  # another thread was first
            os.close(fd)
        else:
            _DEVNULL.append(fd)
    return _DEVNULL[0]


CONTROL_PREFIX = "batchingest-control-"
# Control files live in memory where we can: they are tiny, short-lived and per task,
# and creating files in the jobs root is the slowest part of running a trivial task.
_CONTROL_BASE = "/dev/shm"
_CONTROL_NAME = re.compile(re.escape(CONTROL_PREFIX) + r"(\d+)-")


def control_base() -> str:
    return _CONTROL_BASE if os.access(_CONTROL_BASE, os.W_OK) else tempfile.gettempdir()


class ControlDir:
    """This process's folder of control files, `batchingest-control-PID-XXXX` in /dev/shm.

    The folder is flock-ed for as long as the process lives, and carries its pid, so a
    later start can tell the leftovers of a killed service (sweep_control_dirs) from the
    folder of one still running, here or in another pid namespace.
    """

    def __init__(self, base: str | None = None) -> None:
        base = base or control_base()
        sweep_control_dirs(base)  # a killed service could not remove its own
        prefix = f"{CONTROL_PREFIX}{os.getpid()}-"
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
        # opened by its one name in base (no link followed), not by the path again
        base_fd = fs.open_root(base)
        try:
            self.fd = fs.open_dir(base_fd, self.path.name)
        finally:
            os.close(base_fd)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        self._files: dict[object, Path] = {}

    def file(self, key: object) -> Path:
        path = self._files.get(key)
        if path is None:  # one per worker thread: made once, not for every task
            path = self._files[key] = self.path / f"{key}.control"
        return path

    def close(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            base_fd = fs.open_root(self.path.parent)
            try:
                fs.remove_tree(base_fd, self.path.name)
            finally:
                os.close(base_fd)
        os.close(self.fd)  # drops the lock
        self.fd = -1


def sweep_control_dirs(base: str | None = None) -> list[str]:
    """Remove the control folders of services that died (kill -9) without cleaning up.

    A folder goes only if it is a real folder of ours, its pid is not alive, and its
    lock is free (the pid could be in another namespace). Returns the names removed.
    """
    base = base or control_base()
    removed: list[str] = []
    try:
        base_fd = fs.open_root(base)
    except OSError:
        return removed
    try:
        for entry in fs.entries(base_fd):
            match = _CONTROL_NAME.match(entry.name)
            if match is None or not entry.is_dir or pid_alive(int(match[1])):
                continue
            if _stale(base_fd, entry.name):
                with contextlib.suppress(OSError):
                    fs.remove_tree(base_fd, entry.name)
                    removed.append(entry.name)
    finally:
        os.close(base_fd)
    if removed:
        log.info("removed %d control folder(s) of stopped services in %s", len(removed), base)
    return removed


def _stale(base_fd: int, name: str) -> bool:
    """Ours (same owner), not a link, and nobody holds its lock."""
    try:
        fd = fs.open_dir(base_fd, name)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


# A control file holds a few `addtask:NAME` lines; more than this is a runaway task.
CONTROL_LIMIT = 1 << 20


def fresh_control_file(control: Path, dir_fd: int | None = None) -> None:
    """A new empty control file at control, whatever the last task left there.

    Whatever is at that name goes first (a link, FIFO or folder a task made of it is
    removed, never followed or opened); O_EXCL | O_NOFOLLOW then create exactly one new
    regular file. dir_fd: control's folder, already open (ControlDir.fd).
    """
    folder = fs.open_root(control.parent) if dir_fd is None else dir_fd
    try:
        # the last task's file is removed after it ran: mostly nothing is there
        fd = fs.create_new(folder, control.name, os.O_WRONLY, 0o600)
        if fd is None:
            fs.remove(folder, control.name, recursive=True)
            fd = fs.create_new(folder, control.name, os.O_WRONLY, 0o600)
        if fd is None:  # something came back at once: a task still running
            raise FileExistsError(errno.EEXIST, "a control file came back", str(control))
        os.close(fd)
    finally:
        if folder != dir_fd:
            os.close(folder)


def read_control(path: Path, dir_fd: int | None = None) -> tuple[list[str], str]:
    """Tasks added through the control file, or an error naming the offending line.

    Read without following a link, without opening a FIFO or device, and at most
    CONTROL_LIMIT bytes: whatever a task did to the file, the worker gets an answer.
    dir_fd: path's folder, already open.
    """
    added: list[str] = []
    try:
        folder = fs.open_root(path.parent) if dir_fd is None else dir_fd
    except FileNotFoundError:
        return added, ""
    try:
        raw = _read_control_file(folder, path.name)
    except fs.TooLarge:
        return added, f"control file is larger than {CONTROL_LIMIT} bytes"
    except (fs.UnsafePath, fs.NotRegular) as e:
        return added, f"control file is not a regular file ({e.strerror})"
    finally:
        if folder != dir_fd:
            os.close(folder)
    if raw is None:
        return added, ""
    for number, line in enumerate(raw.decode(errors="replace").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        verb, sep, arg = line.partition(":")
        if verb == "addtask" and sep and valid_name(arg.strip()):
            added.append(arg.strip())
        else:
            return added, f"bad control line {number}: {line[:500]!r} (expected addtask:NAME)"
    return added, ""


def _read_control_file(folder: int, name: str) -> bytes | None:
    """fs.read_file of the control file, without a read of one left empty (most are)."""
    try:
        fd, st = fs.open_regular_stat(folder, name)
    except FileNotFoundError:
        return None
    try:
        return fs.read_fd(fd, CONTROL_LIMIT, name, st.st_size) if st.st_size else b""
    finally:
        os.close(fd)


def run_task(
    task: str,
    *,
    job_dir: Path,
    job_name: str,
    tasks_dir: Path,
    control: Path,
    env: Mapping[str, str] | EncodedEnv,
    log_fd: int,
    hold_fd: int,
    timeout: float | None,
    process: TaskProcess,
    control_fd: int | None = None,
) -> TaskResult:
    """Run one task of a job to the end and say how it went; LOG gets marker lines.

    control_fd: the control file's folder, already open (ControlDir.fd).
    """
    start, t0 = now_rfc3339(), time.monotonic()
    log_line(log_fd, f"---- task {task}: begin ----")
    code: int | None = None
    added: list[str] = []
    reason = ""
    try:
        argv = resolve(task, tasks_dir)
    except UnknownTask as e:
        reason = str(e)
    else:
        try:
            code = process.run(
                argv,
                job_dir=job_dir,
                job_name=job_name,
                control=control,
                env=env,
                log_fd=log_fd,
                hold_fd=hold_fd,
                timeout=timeout,
                control_fd=control_fd,
            )
        except OSError as e:
            if e.errno in _SPAWN_LIMITS:
                with contextlib.suppress(OSError):
                    control.unlink()
                raise CannotSpawn(f"cannot start task {task}: {e.strerror or e}") from e
            reason = f"cannot start task {task}: {e.strerror or e}"
        else:
            added, reason = _outcome(process, code, timeout, control, control_fd)
    with contextlib.suppress(OSError):
        control.unlink()
    result = _ended(task, start, t0, process, code, reason, added)
    _log_end(log_fd, result)
    return result


def _ended(
    task: str, start: str, t0: float, process: TaskProcess, code: int | None, reason: str,
    added: list[str],
) -> TaskResult:  # fmt: skip
    """The result of a task that ended just now (reason "" for success)."""
    return TaskResult(
        task,
        start,
        now_rfc3339(),
        ok=not reason,
        exit_code=code,
        reason=reason,
        added=added,
        interrupted=process.interrupted,
        canceled=bool(process.canceled) and not process.interrupted,
        seconds=time.monotonic() - t0,
    )


def _outcome(
    process: TaskProcess, code: int, timeout: float | None, control: Path, control_fd: int | None
) -> tuple[list[str], str]:
    """Tasks added and the reason of failure ("" for success) of a task that ran."""
    if process.interrupted:
        return [], "stopped because the service is stopping"
    if process.canceled:
        return [], process.canceled
    if process.timed_out:
        return [], f"timed out after {timeout:g} s"
    if code < 0:
        return [], f"killed by signal {signal.Signals(-code).name}"
    if code != 0:
        return [], f"exit status {code}"
    return read_control(control, control_fd)


def _log_end(log_fd: int, result: TaskResult) -> None:
    """The LOG marker line closing a task's output."""
    task, reason, seconds = result.task, result.reason, result.seconds
    if result.ok:
        more = f", added {', '.join(result.added)}" if result.added else ""
        log_line(log_fd, f"---- task {task}: ok{more} ({seconds:.3f} s) ----")
    elif result.interrupted:
        log_line(log_fd, f"---- task {task}: interrupted, {reason} ({seconds:.3f} s) ----")
    elif result.canceled:
        log_line(log_fd, f"---- task {task}: canceled, {reason} ({seconds:.3f} s) ----")
    else:
        log_line(log_fd, f"---- task {task}: error, {reason} ({seconds:.3f} s) ----")
