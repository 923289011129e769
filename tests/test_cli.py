"""The real `batchingest` command: help, exit statuses, and what it refuses at start."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from live_service import as_at_a_terminal

from batchingest.config import env_of, flag_of, options

USAGE_ERROR = 2


def command() -> list[str]:
    """The installed console script if there is one, else the module."""
    script = Path(sys.executable).parent / "batchingest"
    return [str(script)] if script.exists() else [sys.executable, "-m", "batchingest.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BATCHINGEST_")}
    return subprocess.run(
        [*command(), *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_error_line(p: subprocess.CompletedProcess[str], prog: str, text: str) -> None:
    assert p.returncode == USAGE_ERROR, p.stderr
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if text in line]
    assert len(lines) == 1, p.stderr  # said once, not once per logger
    # argparse names the top-level command for arguments no subcommand knows
    assert lines[0].startswith((f"{prog}: error: ", "batchingest: error: unrecognized"))


def test_serve_help_shows_every_flag_variable_and_default() -> None:
    p = run("serve", "--help")
    assert p.returncode == 0
    lines: dict[str, str] = {}  # flag -> its help, wrapped lines joined
    flag = ""
    for line in p.stdout.splitlines():
        if line.startswith("  --"):
            flag = line.split()[0]
            lines[flag] = line
        elif line.startswith("    ") and flag:
            lines[flag] += " " + line.strip()
        else:
            flag = ""
    for f, opt in options():
        flag = "--" + flag_of(f, opt)
        assert flag in lines, flag
        assert f"[{env_of(f, opt)}]" in lines[flag]
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not (
            dataclasses.MISSING
        )
        if has_default and not opt.switch:
            assert "(default: " in lines[flag], lines[flag]
    assert "(default: 2)" in lines["--workers"] and "(default: ROOT/tasks)" in lines["--tasks"]
    assert "(default: 10.0)" in lines["--webhook-backoff"]


@pytest.mark.parametrize("sub", ["serve", "status"])
def test_no_root_is_a_usage_error_for_every_command(sub: str) -> None:
    one_error_line(run(sub), f"batchingest {sub}", "--root (or BATCHINGEST_ROOT) is required")


def test_missing_root_is_refused_without_init(tmp_path: Path) -> None:
    root = tmp_path / "typo"
    p = run("serve", "--root", str(root), "--no-api")
    one_error_line(p, "batchingest serve", f"jobs root {root} is not usable: no such folder")
    assert "--init creates it" in p.stderr
    assert not root.exists()  # nothing was made where the operator mistyped
    p = run("status", "--root", str(root))
    one_error_line(p, "batchingest status", f"no jobs root at {root}")


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--workers", "0"], {}, "argument --workers: must be at least 1: 0"),
        ([], {"BATCHINGEST_WORKERS": "zero"}, "bad BATCHINGEST_WORKERS"),
        (["--no-api", "--no-processor"], {}, "leave nothing to run"),
        (["--port", "99999"], {}, "argument --port: must be a port number"),
        (["--log-level", "loud"], {}, "argument --log-level: must be one of"),
        (["--bogus"], {}, "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_exit_2(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    one_error_line(
        run("serve", "--root", str(tmp_path), *args, env=env), "batchingest serve", message
    )
    assert not (tmp_path / "queue").exists()  # refused before anything was started


def test_port_in_use_is_said_once(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = run("serve", "--root", str(tmp_path), "--port", str(port),
                env={"BATCHINGEST_TOKENS": "t"})  # fmt: skip
    one_error_line(p, "batchingest serve", f"cannot listen on 127.0.0.1:{port}")


def start_until(args: list[str], env: dict[str, str], log: Path, text: str) -> str:
    """Start `batchingest serve ARGS`, wait for TEXT in its log, stop it; return the log."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("BATCHINGEST_")}
    with open(log, "wb") as out:
        proc = subprocess.Popen([*command(), "serve", *args], env={**base, **env},
                                stdout=out, stderr=out)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while text not in log.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    return log.read_text()


def test_init_creates_the_root_and_a_missing_tasks_folder_is_a_warning(tmp_path: Path) -> None:
    root = tmp_path / "new" / "root"
    out = start_until(["--no-api", "--init"], {"BATCHINGEST_ROOT": str(root)},
                      tmp_path / "log", "serving jobs root")  # fmt: skip
    assert (root / "queue").is_dir() and (root / "error").is_dir()
    warnings = [line for line in out.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and f"no tasks folder at {root / 'tasks'}" in warnings[0]
    # with the tasks folder there, a second start has nothing to warn about
    (root / "tasks").mkdir()
    out = start_until(["--no-api", "--root", str(root)], {}, tmp_path / "log2", "serving jobs root")
    assert "WARNING" not in out


REPO = Path(__file__).resolve().parent.parent


def test_one_install_serves_both_scripts(tmp_path: Path) -> None:
    """scripts/serve after scripts/test must not install again (it took ~17 s)."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "_venv.sh").write_text((REPO / "scripts" / "_venv.sh").read_text())
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    # a stand-in for the virtual environment's python that only notes what pip was asked
    python.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/pip-calls\n')
    python.chmod(0o755)

    def ensure(*extras: str) -> list[str]:
        calls = tmp_path / "pip-calls"
        calls.unlink(missing_ok=True)
        script = "; ".join(f". scripts/_venv.sh; ensure_venv {e}" for e in extras)
        p = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        lines = calls.read_text().splitlines() if calls.exists() else []
        return [line.split()[-1] for line in lines if " -e " in line]

    assert ensure("test") == [".[test]"]
    assert ensure("", "test", "") == []  # serve, test, serve: nothing to install
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'y'\n")
    assert ensure("") == ["."]  # pyproject.toml changed
    assert ensure("test", "") == [".[test]"]  # the test tools are added once


def test_dependencies_are_what_the_code_imports() -> None:
    """Declared and never imported (aiofiles), or imported and not declared (anyio): neither."""
    import ast
    import importlib.metadata
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~;\[ ]", d)[0].lower() for d in project["dependencies"]}
    dists = importlib.metadata.packages_distributions()
    imported: set[str] = set()
    for source in (REPO / "batchingest").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {name.split(".")[0] for name in names}:
                if top not in sys.stdlib_module_names and top != "batchingest":
                    imported |= {d.lower() for d in dists.get(top, [top])}
    assert imported == declared


def test_readme_tables_name_real_flags_and_variables() -> None:
    """Every `--flag` row of the README's tables is a setting, with the variable it names."""
    import re

    known = {"--" + flag_of(f, opt): env_of(f, opt) for f, opt in options()}
    rows = re.findall(r"^\| `(--[a-z-]+)[^`]*` \|([^|]*)\|", (REPO / "README.md").read_text(), re.M)
    assert len(rows) >= 20
    for flag, second in rows:
        assert flag in known, flag
        if "BATCHINGEST_" in second:
            assert f"`{known[flag]}`" in second, (flag, second)


def test_status_reads_the_root_as_serve_does(tmp_path: Path) -> None:
    """An empty --root is refused rather than meaning the current folder."""
    p = run("status", "--root", "")
    assert p.returncode == USAGE_ERROR and "argument --root: must not be empty" in p.stderr
    for state in ("data", "queue", "processing", "success", "error"):
        (tmp_path / state).mkdir()
    (tmp_path / "error" / "broken").mkdir()
    p = run("status", env={"BATCHINGEST_ROOT": str(tmp_path)})
    assert p.returncode == 0 and f"jobs root {tmp_path}" in p.stdout
    assert "error:\n  broken" in p.stdout


# -- the operator commands on a jobs root (tests/e2e/test_cli_e2e.py runs them both ways) --


def jobs_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    for state in ("data", "queue", "processing", "success", "error"):
        (root / state).mkdir(parents=True)
    return root


def test_status_names_the_jobs_in_processing_that_nobody_holds(tmp_path: Path) -> None:
    import fcntl
    import json

    root = jobs_root(tmp_path)
    for name in ("held", "orphan", "free"):
        (root / "processing" / name).mkdir()
    (root / "processing" / "free" / ".lock").write_bytes(b"")  # an older version's, free
    # a local root: a live processor holds a job by a flock on its folder
    holder = os.open(root / "processing" / "held", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        p = run("status", "--json", "--root", str(root))
        assert p.returncode == 0, p.stderr
        report = json.loads(p.stdout)
        assert report["processing"] == ["free", "held", "orphan"]
        assert report["stuck"] == ["free", "orphan"]
        p = run("status", "--root", str(root))
        assert "stuck (in processing/, no live holder):\n  free\n  orphan\n" in p.stdout
        # looking changed nothing: no job moved, no lock file made, the holder still holds
        assert sorted(os.listdir(root / "processing")) == ["free", "held", "orphan"]
        assert not (root / "processing" / "orphan" / ".lock").exists()
        other = os.open(root / "processing" / "held", os.O_RDONLY | os.O_DIRECTORY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(other)
        free = os.open(root / "processing" / "free", os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(free, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released again at once
        os.close(free)
    finally:
        os.close(holder)


def test_requeue_asks_on_a_terminal_and_shows_a_live_line(tmp_path: Path) -> None:
    import pty
    import select

    root = jobs_root(tmp_path)
    for name in ("e1", "e2"):
        (root / "error" / name).mkdir()

    def on_terminal(answer: bytes) -> tuple[int, bytes]:
        leader, follower = pty.openpty()
        base = {k: v for k, v in os.environ.items() if not k.startswith("BATCHINGEST_")}
        args = [*command(), "requeue", "--failed", "--root", str(root)]
        proc = subprocess.Popen(args, stdin=follower, stdout=follower, stderr=follower, env=base)
        os.close(follower)
        seen = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # the command ended and closed the terminal
                    break
                seen += chunk
                if b"[y/N]" in chunk:
                    os.write(leader, answer)
            elif proc.poll() is not None:
                break
        os.close(leader)
        return proc.wait(60), seen

    status, seen = on_terminal(b"n\n")
    assert status == 1 and b"Move 2 failed job(s) (e1, e2) to queue/? [y/N]" in seen
    assert sorted(os.listdir(root / "error")) == ["e1", "e2"]  # nothing moved
    status, seen = on_terminal(b"y\n")
    assert status == 0, seen
    # one line rewritten in place on a terminal, then the result
    assert b"\r\x1b[Krequeue 1/2: e1\r\x1b[Krequeue 2/2: e2" in seen
    assert b"requeued 2 of 2 failed job(s)" in seen
    assert sorted(os.listdir(root / "queue")) == ["e1", "e2"]


def test_logs_and_show_never_follow_planted_files(tmp_path: Path) -> None:
    import json

    root = jobs_root(tmp_path)
    outside = tmp_path / "outside.json"
    outside.write_text('{"Todo": ["from-outside"]}')
    job = root / "data" / "planted"
    job.mkdir()
    (job / "JOB").symlink_to(outside)
    os.mkfifo(job / "LOG")  # a FIFO must neither hang the command nor be read
    p = run("logs", "planted", "--root", str(root))
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr == "batchingest logs: error: the LOG of 'planted' is not a regular file " \
        "(named pipe)\n"  # fmt: skip
    p = run("show", "planted", "--json", "--root", str(root))
    assert p.returncode == 0, p.stderr
    shown = json.loads(p.stdout)
    assert shown.pop("Created") and shown.pop("Modified")  # the folder's times, as the API's
    assert shown == {
        "Events": 0,
        "Name": "planted",
        "Status": "ready",
        "Todo": None,
        "Finished": None,
        "JobError": "JOB is a symbolic link (not followed)",
    }


def test_operator_commands_need_a_root_or_a_url(tmp_path: Path) -> None:
    for args in (["jobs"], ["logs", "j"], ["requeue", "--failed", "--yes"]):
        p = run(*args)
        one_error_line(p, f"batchingest {args[0]}", "--url (or BATCHINGEST_URL) or --root")
    p = run("requeue", "--root", str(tmp_path))
    assert (
        p.returncode == USAGE_ERROR and "the following arguments are required: --failed" in p.stderr
    )


def test_logs_into_a_pipe_that_closes_early_is_quiet(tmp_path: Path) -> None:
    root = jobs_root(tmp_path)
    (root / "success" / "long").mkdir()
    (root / "success" / "long" / "LOG").write_bytes(b"a log line\n" * 500_000)
    p = subprocess.run(f"{' '.join(command())} logs long --root {root} | head -1",
                       shell=True, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.stdout == "a log line\n" and p.stderr == ""


class _StandIn:
    """A stand-in answering as the routes being added will (GET /events, POST .../cancel),
    so the commands' paging, following and error handling are tested before they exist."""

    def __init__(self) -> None:
        import http.server
        import json
        import threading
        from urllib.parse import parse_qs, urlsplit

        self.events = [self.event(i) for i in range(1, 6)]
        self.tokens: list[str | None] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(self, status: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                outer.tokens.append(self.headers.get("X-Api-Token"))
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                after, limit = int(query.get("after", 0)), int(query["limit"])
                later = [e for e in list(outer.events) if int(e["cursor"]) > after]
                page = later[:limit]
                more = len(later) > limit
                cursor = page[-1]["cursor"] if more else None
                self.answer(200, {"DATA_TYPE": "event_list", "DATA": page, "next_cursor": cursor})

            def do_POST(self) -> None:
                if self.path == "/jobs/running/cancel":
                    self.answer(202, {"Name": "running", "Status": "processing"})
                else:
                    message = "job 'done' has finished"
                    self.answer(409, {"code": "JobNotCancellable", "message": message,
                                      "request_id": "r", "resource": self.path})  # fmt: skip

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def event(i: int) -> dict[str, str]:
        return {"job": f"j{i}", "code": "SUCCEEDED", "time": f"2026-12-01T10:00:0{i}Z",
                "description": f"job j{i} succeeded", "cursor": str(i)}  # fmt: skip


def test_events_pages_and_follows_the_event_list() -> None:
    import json

    stand_in = _StandIn()
    env = {"BATCHINGEST_TOKEN": "t0k"}
    try:
        p = run("events", "--url", stand_in.url, "--limit", "2", env=env)
        assert p.returncode == 0, p.stderr
        assert p.stdout.splitlines() == [
            f"2026-12-01T10:00:0{i}Z  j{i}  SUCCEEDED  job j{i} succeeded" for i in range(1, 6)
        ]
        assert set(stand_in.tokens) == {"t0k"}
        p = run("events", "--json", "--after", "3", "--url", stand_in.url, env=env)
        assert json.loads(p.stdout) == [stand_in.event(4), stand_in.event(5)]

        base = {k: v for k, v in os.environ.items() if not k.startswith("BATCHINGEST_")}
        proc = subprocess.Popen([*command(), "events", "-f", "--json", "--url", stand_in.url],
                                env={**base, **env}, stdout=subprocess.PIPE, text=True,
                                preexec_fn=as_at_a_terminal)  # fmt: skip
        assert proc.stdout is not None
        try:
            seen = [json.loads(proc.stdout.readline()) for _ in range(5)]
            assert seen == stand_in.events
            stand_in.events.append(stand_in.event(6))  # a new event while following
            assert json.loads(proc.stdout.readline()) == stand_in.event(6)
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 130  # a quiet end, however slowly a loaded machine exits

        p = run("cancel", "running", "--url", stand_in.url, env=env)
        assert (p.returncode, p.stdout) == (0, "running: cancel requested (status processing)\n")
        p = run("cancel", "done", "--url", stand_in.url, env=env)
        assert p.returncode == 1
        assert p.stderr == (
            "batchingest cancel: error: job 'done' has finished (JobNotCancellable, HTTP 409)\n"
        )
    finally:
        stand_in.server.shutdown()
