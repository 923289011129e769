"""The operator commands as real subprocesses, on a jobs root and against the real service.

Every command is run both ways on one root (`--root`, and `--url` with the service
serving that root), and both must print the same: the rendering is written once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_service import TOKEN, Service, as_at_a_terminal, free_port, make_job, wait_for, write_task

pytestmark = pytest.mark.e2e

FAILURE, USAGE = 1, 2


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BATCHINGEST_")}
    return subprocess.run(
        [sys.executable, "-m", "batchingest.cli", *args],
        env={**base, **(env or {})},
        stdin=subprocess.DEVNULL,  # no terminal: nothing may wait for an answer
        capture_output=True,
        timeout=timeout,
    )


def both(root: Path, svc: Service) -> list[tuple[list[str], dict[str, str]]]:
    """The flags and environment for each way of reaching one root."""
    return [(["--root", str(root)], {}), (["--url", svc.url], {"BATCHINGEST_TOKEN": TOKEN})]


def same(root: Path, svc: Service, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run a command both ways; they must agree on exit status, stdout and stderr."""
    (local_flags, local_env), (url_flags, url_env) = both(root, svc)
    local = cli(*args, *local_flags, env=local_env)
    remote = cli(*args, *url_flags, env=url_env)
    assert b"Traceback" not in local.stderr + remote.stderr, (local.stderr, remote.stderr)
    assert (local.returncode, local.stdout) == (remote.returncode, remote.stdout), args
    assert local.stderr == remote.stderr, args
    return local


def place(root: Path, state: str, name: str, files: dict[str, str] | None = None) -> Path:
    """A job moved into a state folder at once, as an operator would with mv."""
    built = make_job(root / state, name, files=files)
    target = root / state / name
    built.rename(target)
    return target


@pytest.fixture
def api(root: Path) -> Iterator[Service]:
    with Service(root, "--no-processor") as svc:
        yield svc


FINISHED = {
    "Todo": ["check"],
    "Finished": [
        {"Name": "start", "Start": "2026-11-23T14:16:44.524Z", "Finish": "2026-11-23T14:16:44.531Z",
         "Status": "ok"},
        {"Name": "check", "Start": "2026-11-23T14:16:44.600Z", "Finish": "2026-11-23T14:16:45.000Z",
         "Status": "error", "ExitCode": 1, "Reason": "exit status 1"},
    ],
    "Mine": {"kept": True},
}  # fmt: skip


def test_every_command_prints_the_same_from_a_root_and_from_the_service(
    api: Service, root: Path
) -> None:
    place(root, "data", "assembling")
    failed = place(root, "error", "failed", {"JOB": json.dumps(FINISHED)})
    (failed / "LOG").write_bytes(b"line one\nline two\n")
    done = place(root, "success", "done")
    big = b"".join(b"%07d \xff\xfe not text, and long enough to take several reads\n" % i
                   for i in range(50_000))  # fmt: skip
    (done / "LOG").write_bytes(big)
    place(root, "processing", "left-behind")  # no processor serves this root: nobody holds it
    place(root, "error", "broken", {"JOB": "{not json"})

    listing = same(root, api, "jobs")
    assert listing.returncode == 0
    assert listing.stdout.decode().split() == [
        "assembling", "ready", "broken", "error", "done", "success", "failed", "error",
        "left-behind", "processing",
    ]  # fmt: skip
    as_json = json.loads(same(root, api, "jobs", "--json").stdout)
    with api.client() as c:
        assert as_json == c.get("/jobs").json()  # the fields of GET /jobs, nothing else
        assert json.loads(same(root, api, "show", "failed", "--json").stdout) == (
            c.get("/jobs/failed").json()
        )
    filtered = json.loads(same(root, api, "jobs", "--json", "--status", "error,ready").stdout)
    assert [j["Name"] for j in filtered] == ["assembling", "broken", "failed"]

    shown = same(root, api, "show", "failed").stdout.decode()
    assert "Status:   error" in shown and "Todo:     check" in shown
    assert "check  error  2026-11-23T14:16:44.600Z .. 2026-11-23T14:16:45.000Z  exit status 1" in (
        shown
    )
    assert "JOB is not valid JSON" in same(root, api, "show", "broken").stdout.decode()
    assert same(root, api, "logs", "done").stdout == big  # byte for byte, over many reads
    assert same(root, api, "logs", "failed").stdout == b"line one\nline two\n"
    assert same(root, api, "logs", "assembling").stdout == b""  # no LOG yet: nothing

    status = {}
    for flags, env in both(root, api):
        p = cli("status", "--json", *flags, env=env)
        assert p.returncode == 0, p.stderr
        status[flags[0]] = json.loads(p.stdout)
    local, remote = status["--root"], status["--url"]
    assert local["stuck"] == ["left-behind"]
    for key in ("counts", "total", "processing", "error", "stuck"):
        assert local[key] == remote[key], key
    assert local["counts"] == {"ready": 1, "queue": 0, "processing": 1, "success": 1, "error": 2}


def test_errors_are_said_the_same_both_ways(api: Service, root: Path) -> None:
    for command in (["show", "nope"], ["logs", "nope"], ["queue", "nope"]):
        p = same(root, api, *command)
        assert p.returncode == FAILURE
        assert p.stderr.decode() == f"batchingest {command[0]}: error: no job named 'nope'\n"
    p = same(root, api, "jobs", "--status", "done")
    assert p.returncode == USAGE and b"unknown status 'done'" in p.stderr
    p = same(root, api, "show", "../x")
    assert p.returncode == USAGE and b"invalid job name '../x'" in p.stderr


def test_queue_and_requeue_both_ways(api: Service, root: Path) -> None:
    for i, (flags, env) in enumerate(both(root, api)):
        place(root, "data", f"new-{i}")
        p = cli("queue", f"new-{i}", *flags, env=env)
        assert (p.returncode, p.stdout) == (0, f"new-{i}: queued\n".encode()), p.stderr
        assert (root / "queue" / f"new-{i}").is_dir()
        p = cli("queue", f"new-{i}", *flags, env=env)  # a second time: nothing to do
        assert (p.returncode, p.stdout) == (0, f"new-{i}: already queue, left as it is\n".encode())

        names = [f"failed-{i}-{n}" for n in range(3)]
        for name in names:
            place(root, "error", name)
        # no terminal and no --yes: refused before anything moves
        p = cli("requeue", "--failed", *flags, env=env)
        assert p.returncode == USAGE, p.stderr
        assert b"no terminal to confirm on: add --yes" in p.stderr
        assert sorted(os.listdir(root / "error")) == names
        p = cli("requeue", "--failed", "--yes", *flags, env=env)
        assert p.returncode == 0, p.stderr
        assert p.stdout == b"requeued 3 of 3 failed job(s)\n"
        # progress without a terminal: one plain line per job, no carriage returns
        assert p.stderr.decode().splitlines() == [
            f"requeue {n + 1}/3: {name}" for n, name in enumerate(names)
        ]
        assert os.listdir(root / "error") == []
        assert set(names) <= set(os.listdir(root / "queue"))
        p = cli("requeue", "--failed", *flags, env=env)  # none left: nothing to confirm
        assert (p.returncode, p.stdout) == (0, b"no failed jobs\n")


class Follower:
    """`batchingest logs -f` running, its output gathered by a thread."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith("BATCHINGEST_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batchingest.cli", "logs", "-f", *args],
            env={**base, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=as_at_a_terminal,
        )  # fmt: skip
        self.out = bytearray()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            self.out += chunk

    def stop(self) -> bytes:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Ctrl-C: a quiet end
            self.proc.wait(60)  # the exit code is checked; a loaded machine may be slow
        self.thread.join(60)
        return self.proc.stderr.read() if self.proc.stderr else b""


def test_logs_follow_a_growing_log_as_the_job_moves(root: Path) -> None:
    # the task holds on after line 3 until the test has seen it followed, so "while it
    # runs" does not depend on how fast a loaded machine is
    write_task(root / "tasks", "start",
               'for i in 1 2 3; do echo "line $i"; sleep 0.1; done\n'
               'while [ ! -e release ]; do sleep 0.05; done\n'
               'for i in 4 5 6; do echo "line $i"; sleep 0.1; done\n')  # fmt: skip
    with Service(root) as svc:
        job = place(root, "data", "slow")
        followers = [Follower("slow", *flags, env=env) for flags, env in both(root, svc)]
        time.sleep(0.5)  # both are following a job with no LOG yet
        job.rename(root / "queue" / "slow")
        wait_for(lambda: all(b"line 3" in f.out for f in followers), what="line 3 followed")
        assert (root / "processing" / "slow").is_dir()  # followed while it runs
        (root / "processing" / "slow" / "release").touch()
        log = root / "success" / "slow" / "LOG"
        wait_for(log.exists, what="the job to succeed")
        final = log.read_bytes()
        assert b"task start: ok" in final
        # across queue/ -> processing/ -> success/, every byte once, in order
        wait_for(lambda: all(bytes(f.out) == final for f in followers), timeout=15,
                 what="the followers to catch up")  # fmt: skip
        for f in followers:
            assert f.stop() == b""
            assert f.proc.returncode == 130


def test_a_log_planted_as_a_link_is_never_printed(api: Service, root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-0042\n")
    job = place(root, "data", "planted")
    (job / "LOG").symlink_to(secret)
    for flags, env in both(root, api):
        p = cli("logs", "planted", *flags, env=env)
        assert p.returncode == FAILURE, p.stderr
        assert b"SECRET" not in p.stdout + p.stderr
        assert p.stderr.startswith(b"batchingest logs: error: ")
        f = cli("logs", "-f", "planted", *flags, env=env, timeout=20)  # not followed either
        assert f.returncode == FAILURE and b"SECRET" not in f.stdout


def test_tokens_and_unreachable_services_are_clear_errors(
    api: Service, root: Path, tmp_path: Path
) -> None:
    place(root, "data", "j")
    p = cli("jobs", "--url", api.url, env={"BATCHINGEST_TOKEN": "wrong"})
    assert p.returncode == FAILURE and p.stdout == b""
    assert p.stderr.decode() == (
        f"batchingest jobs: error: the service at {api.url} refused the API token (401): "
        "check BATCHINGEST_TOKEN or --token-file\n"
    )
    p = cli("jobs", "--url", api.url)
    assert p.returncode == USAGE
    assert b"no API token: set BATCHINGEST_TOKEN or give --token-file" in p.stderr
    token_file = tmp_path / "token"
    token_file.write_text(f"# the operator's token\n{TOKEN}\n")
    token_file.chmod(0o600)  # a token file others may read is refused, as by the service
    p = cli("jobs", "--url", api.url, "--token-file", str(token_file))
    assert (p.returncode, p.stdout) == (0, b"j  ready\n"), p.stderr
    p = cli("jobs", env={"BATCHINGEST_URL": api.url, "BATCHINGEST_TOKEN_FILE": str(token_file)})
    assert (p.returncode, p.stdout) == (0, b"j  ready\n"), p.stderr
    assert TOKEN.encode() not in p.stdout + p.stderr
    # plain http needs no certificates: a broken SSL_CERT_FILE must not matter
    p = cli("jobs", "--url", api.url, env={"BATCHINGEST_TOKEN": TOKEN, "SSL_CERT_FILE": "/none"})
    assert (p.returncode, p.stdout) == (0, b"j  ready\n"), p.stderr

    gone = f"http://127.0.0.1:{free_port()}"
    p = cli("status", "--url", gone, env={"BATCHINGEST_TOKEN": TOKEN})
    assert p.returncode == FAILURE and b"Traceback" not in p.stderr
    assert p.stderr.startswith(
        f"batchingest status: error: cannot reach the service at {gone}: ".encode()
    )
    p = cli("jobs", "--url", "127.0.0.1:15000", env={"BATCHINGEST_TOKEN": TOKEN})
    assert p.returncode == USAGE and b"--url must start with http:// or https://" in p.stderr
    p = cli("jobs", "--url", api.url, "--root", str(root), env={"BATCHINGEST_TOKEN": TOKEN})
    assert p.returncode == USAGE and b"give --url or --root, not both" in p.stderr


def test_status_over_http_names_the_stuck_jobs(api: Service, root: Path) -> None:
    place(root, "processing", "left-behind")
    p = cli("status", "--url", api.url, env={"BATCHINGEST_TOKEN": TOKEN})
    assert p.returncode == 0, p.stderr
    text = p.stdout.decode()
    assert text.startswith(f"service {api.url}\n")
    assert "stuck (in processing/, no live holder):\n  left-behind\n" in text


def plant_lease(job: Path, host: str, pid: int, age: float, boot: str = "another-boot") -> None:
    """A `.lease` as a holder writes it (see batchingest.lease), last renewed age s ago."""
    doc = {"Host": host, "Boot": boot, "Pid": pid, "Token": "t" * 32, "Claimed": "",
           "Renewed": "", "Expires": ""}  # fmt: skip
    (job / ".lease").write_text(json.dumps(doc))
    (job / ".lock").write_bytes(b"")  # free: locks are not shared between these hosts
    then = time.time() - age
    os.utime(job / ".lease", (then, then))


def test_status_judges_leases_as_the_processor_does_both_ways(root: Path) -> None:
    import socket

    from batchingest.lease import boot_id

    write_task(root / "tasks", "start", "sleep 60\n")
    # recovery runs at the start only: the jobs planted later stay where they are
    with Service(root, "--poll-interval", "3600", "--lease-timeout", "30", "--grace", "1") as svc:
        place(root, "queue", "held")
        wait_for(lambda: (root / "processing" / "held" / "LOG").exists(), what="the task")
        gone = subprocess.Popen(["true"])
        gone.wait()  # a pid that no process has any more
        plant_lease(place(root, "processing", "stale"), "elsewhere", 1, age=3600)
        plant_lease(place(root, "processing", "renewed"), "elsewhere", 1, age=0)
        plant_lease(place(root, "processing", "dead"), socket.gethostname(), gone.pid, 0, boot_id())
        place(root, "processing", "bare")  # no lock, no lease
        runs = [cli("status", *flags, env={**env, "BATCHINGEST_LEASE_TIMEOUT": "30"})
                for flags, env in both(root, svc)]  # fmt: skip
        reports = [cli("status", "--json", *flags, env={**env, "BATCHINGEST_LEASE_TIMEOUT": "30"})
                   for flags, env in both(root, svc)]  # fmt: skip
        # a local root: the live processor holds it by its folder's lock alone
        assert not {".lease", ".lock"} & set(os.listdir(root / "processing" / "held"))
    assert all(p.returncode == 0 for p in runs + reports), [p.stderr for p in runs + reports]
    local, remote = (json.loads(p.stdout) for p in reports)
    # held by the live processor; another host's lease renewed within --lease-timeout: alive
    assert local["stuck"] == ["bare", "dead", "stale"]
    assert {**local, "source": ""} == {**remote, "source": ""}
    local_text, remote_text = (p.stdout.decode().split("\n", 1)[1] for p in runs)
    assert local_text == remote_text
    assert "stuck (in processing/, no live holder):\n  bare\n  dead\n  stale\n" in local_text


# -- job history and cancel ------------------------------------------------------------


def test_events_and_cancel_work_on_a_root_as_through_the_service(root: Path) -> None:
    write_task(root / "tasks", "start", "sleep 60\n")
    with Service(root) as svc:
        place(root, "queue", "long")
        wait_for(lambda: (root / "processing" / "long").is_dir(), what="the job to start")
        p = cli("cancel", "long", "--root", str(root))
        assert p.returncode == 0 and p.stderr == b"", p.stderr.decode()
        # the holder, in the service, may stop it before the command looks again
        assert p.stdout in (
            b"long: cancel requested (status processing)\n",
            b"long: cancel requested (status error)\n",
        )
        # the service holding the job finds the request and stops the task
        wait_for(lambda: (root / "error" / "long").is_dir(), what="the job to be canceled")
        p = cli("cancel", "long", "--root", str(root))
        assert p.returncode == FAILURE
        assert p.stderr == (
            b"batchingest cancel: error: job 'long' is error: "
            b"only a queued or processing job can be canceled\n"
        )

        def codes() -> list[str]:
            p = cli("events", "--json", "--root", str(root))
            assert p.returncode == 0, p.stderr
            return [e["code"] for e in json.loads(p.stdout) if e["job"] == "long"]

        def settled() -> list[str] | None:
            """The job's codes once CANCELED is in and nothing more came for a while."""
            first = codes()
            time.sleep(0.3)
            return first if "CANCELED" in first and first == codes() else None

        wait_for(settled, what="the job's events to settle")
        p = same(root, svc, "events", "--json")
        feed = [e for e in json.loads(p.stdout) if e["job"] == "long"]
        asked = [e for e in feed if e["code"] == "CANCEL_REQUESTED"]
        assert [e["details"]["by"] for e in asked] == ["command line"]
        assert "CANCELED" in [e["code"] for e in feed]
        assert same(root, svc, "events").stdout.count(b"  long  ") == len(feed)
        p = cli("events", "--root", str(root), "--after", "nonsense")
        assert p.returncode == USAGE and b"invalid cursor 'nonsense'" in p.stderr


def test_cancel_on_a_root_takes_a_queued_job_back(root: Path) -> None:
    with Service(root, "--no-processor"):
        place(root, "queue", "waiting")
        p = cli("cancel", "waiting", "--root", str(root))
        assert (p.returncode, p.stderr) == (0, b"")
        assert (root / "data" / "waiting").is_dir()
        p = cli("events", "--json", "--root", str(root))
        codes = [e["code"] for e in json.loads(p.stdout) if e["job"] == "waiting"]
        assert codes[-2:] == ["CANCEL_REQUESTED", "CANCELED"]


def test_events_list_job_history(root: Path) -> None:
    with Service(root) as svc:
        write_task(root / "tasks", "start", "true\n")
        place(root, "queue", "tracked")
        wait_for(lambda: (root / "success" / "tracked").is_dir(), what="the job to succeed")
        env = {"BATCHINGEST_TOKEN": TOKEN}

        def history() -> list[dict[str, object]]:
            p = cli("events", "--json", "--url", svc.url, env=env)
            assert p.returncode == 0, p.stderr
            return [e for e in json.loads(p.stdout) if e.get("job") == "tracked"]

        events = wait_for(history, what="events of the job")
        for event in events:
            assert {"job", "code", "time", "cursor"} <= set(event)
        p = cli("events", "--url", svc.url, env=env)
        assert any(line.split()[1:2] == ["tracked"] for line in p.stdout.decode().splitlines())


def test_cancel_stops_a_job(root: Path) -> None:
    write_task(root / "tasks", "start", "sleep 60\n")
    with Service(root) as svc:
        place(root, "queue", "long")
        wait_for(lambda: (root / "processing" / "long").is_dir(), what="the job to start")
        env = {"BATCHINGEST_TOKEN": TOKEN}
        p = cli("cancel", "long", "--url", svc.url, env=env)
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith(b"long: cancel requested")
        wait_for(lambda: not (root / "processing" / "long").exists(), what="the job to stop")
        p = cli("cancel", "long", "--url", svc.url, env=env)  # nothing left to cancel: 409
        assert p.returncode == FAILURE and p.stderr.startswith(b"batchingest cancel: error: ")


def test_status_tells_a_job_a_processor_runs_from_one_left_behind(root: Path) -> None:
    write_task(root / "tasks", "start", "sleep 60\n")

    def stuck() -> list[str]:
        p = cli("status", "--json", "--root", str(root))
        assert p.returncode == 0, p.stderr
        report = json.loads(p.stdout)
        assert report["processing"] == ["long"]
        return list(report["stuck"])

    svc = Service(root, api=False).start()
    try:
        place(root, "queue", "long")
        job = root / "processing" / "long"
        wait_for(lambda: (job / "LOG").exists(), what="the task to start")
        assert stuck() == []  # a live processor holds it
        svc.kill()  # kill -9: the task it started lives on, holding the job's lock
        assert stuck() == []
        tasks = [pid for pid in os.listdir("/proc") if pid.isdigit() and _cwd(pid) == job]
        assert tasks
        for pid in tasks:
            os.kill(int(pid), signal.SIGKILL)
        wait_for(lambda: stuck() == ["long"], timeout=10, what="the job to be stuck")
        assert job.is_dir()  # status only looks
    finally:
        svc.stop()


def _cwd(pid: str) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None
