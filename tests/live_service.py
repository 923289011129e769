"""Start the real service as a subprocess for end-to-end tests (named so that it never
shadows batchingest/service.py on the tests' import path)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

TOKEN = "test-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """`batchingest serve` on a jobs root, with its stderr captured to a file."""

    def __init__(
        self,
        root: Path,
        *args: str,
        api: bool = True,
        env: dict[str, str] | None = None,
        port: int | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.root = root
        self.prefix = list(prefix)  # e.g. ["prlimit", "--nofile=256", "--"]
        self.api = api
        self.port = port or free_port()
        self.args: Sequence[str] = args
        self.env = dict(os.environ)
        self.env.setdefault("BATCHINGEST_TOKENS", TOKEN)
        self.env.update(env or {})
        self.log_path = root.parent / f"service-{self.port}-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, token: str | None = TOKEN, **kw: object) -> httpx.Client:
        headers = {"X-Api-Token": token} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kw)  # type: ignore[arg-type]

    def start(self, wait: bool = True) -> Service:
        cmd = [sys.executable, "-m", "batchingest.cli", "serve", "--root", str(self.root), "--init",
               "--poll-interval", "0.5", *self.args]  # fmt: skip
        if self.api:
            cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        else:
            cmd += ["--no-api"]
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*self.prefix, *cmd], env=self.env, stdout=self._log, stderr=self._log
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited {self.proc.returncode}:\n{self.log()}")
            if self.api:
                try:
                    if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            elif "serving jobs root" in self.log():
                return
            time.sleep(0.05)
        raise RuntimeError(f"service not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """kill -9: no chance to clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 60) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def as_at_a_terminal() -> None:
    """A preexec_fn: SIGINT acts as at a terminal (Ctrl-C stops the command), also where
    the tests were started with it ignored, which a command inherits and keeps (a
    shell's job started with `&` and no job control)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(predicate, timeout: float = 30, interval: float = 0.02, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll until predicate() is truthy; return its value or fail with `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def make_job(
    parent: Path, name: str, job: str | None = None, files: dict[str, str] | None = None
) -> Path:
    """A job folder assembled under a hidden name, as an operator would before `mv`."""
    # hidden and short: a 255-character job name leaves no room for a prefix
    path = parent / f".build-{uuid.uuid4().hex[:12]}"
    path.mkdir(parents=True)
    if job is not None:
        (path / "JOB").write_text(job)
    for rel, content in (files or {}).items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(content)
    return path


def write_task(tasks: Path, name: str, script: str) -> Path:
    tasks.mkdir(parents=True, exist_ok=True)
    path = tasks / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return path


def copies_in_flight(staging: Path) -> list[str]:
    """Files under staging some process has open: named or unnamed (O_TMPFILE) copies."""
    found = []
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        # an unnamed copy reads as "STAGING/dir/#inode (deleted)"
        if target.startswith(f"{staging}/") and target.endswith(" (deleted)"):
            found.append(target)
    return found


def landed(root: Path, name: str) -> str | None:
    """The final state a job reached (success or error), or None while it has not."""
    for state in ("success", "error"):
        if (root / state / name).is_dir():
            return state
    return None


def wait_landed(root: Path, name: str, timeout: float = 30) -> str:
    return str(wait_for(lambda: landed(root, name), timeout, what=f"{name} to finish"))


def job_json(path: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((path / "JOB").read_text())  # type: ignore[no-any-return]


def rfc3339(seconds_from_now: float) -> str:
    """A time that far from now, as a JOB's Deadline is written."""
    at = datetime.now(UTC) + timedelta(seconds=seconds_from_now)
    return at.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def task_pids(root: Path) -> list[int]:
    """Processes working in a job folder under root (the tasks the service started)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if cwd.startswith(str(root) + "/"):
                pids.append(int(entry))
    return pids
