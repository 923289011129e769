"""The processor end to end: the real service as a subprocess, jobs moved in with rename."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from live_service import Service, job_json, make_job, wait_for, wait_landed, write_task

pytestmark = pytest.mark.e2e


def drop(
    root: Path, name: str, job: str | None = None, files: dict[str, str] | None = None
) -> None:
    """Assemble a job under a hidden name and `mv` it into queue/, as an operator would."""
    os.rename(make_job(root, name, job, files), root / "queue" / name)


def test_job_runs_start_and_added_tasks(root: Path) -> None:
    tasks = root / "tasks"
    write_task(
        tasks,
        "start",
        'echo "start in $PWD for $JOBNAME at $JOBPATH"\n'
        'echo addtask:second >> "$JOBCONTROL"\necho >> "$JOBCONTROL"\n',
    )
    write_task(tasks, "second", 'echo second ran; echo addtask:third >> "$JOBCONTROL"\n')
    write_task(tasks, "third", "echo third ran >&2\n")
    with Service(root, api=False) as svc:
        drop(root, "job-1", files={"data.txt": "x"})
        assert wait_landed(root, "job-1") == "success"
        job = root / "success" / "job-1"
        data = job_json(job)
        assert data["Todo"] == []
        assert [f["Name"] for f in data["Finished"]] == ["start", "second", "third"]
        assert all(f["Status"] == "ok" for f in data["Finished"])
        assert all(f["Start"].endswith("Z") and f["Finish"] >= f["Start"] for f in data["Finished"])
        log = (job / "LOG").read_text()
        assert f"start in {root}/processing/job-1 for job-1 at {root}/processing/job-1" in log
        assert "second ran" in log and "third ran" in log
        assert log.index("task start: begin") < log.index("second ran") < log.index("third ran")
        assert "task third: ok" in log
        assert not (job / ".jobcontrol").exists()
        assert (job / "data.txt").read_text() == "x"
        wait_for(lambda: "job job-1 finished: success" in svc.log(), what="finish line")
        assert "job job-1 picked up" in svc.log()


def test_failed_task_stays_first_and_resumes_after_requeue(root: Path) -> None:
    tasks = root / "tasks"
    write_task(tasks, "one", "echo one\n")
    write_task(tasks, "flaky", 'echo "flaky says no"; exit 3\n')
    write_task(tasks, "three", "echo three\n")
    with Service(root, api=False):
        drop(root, "j", job=json.dumps({"Todo": ["one", "flaky", "three"], "Keep": {"me": 1}}))
        assert wait_landed(root, "j") == "error"
        data = job_json(root / "error" / "j")
        assert data["Todo"] == ["flaky", "three"]
        assert data["Keep"] == {"me": 1}
        failed = data["Finished"][-1]
        assert failed["Name"] == "flaky" and failed["Status"] == "error"
        assert failed["ExitCode"] == 3
        log = (root / "error" / "j" / "LOG").read_text()
        assert "flaky says no" in log and "exit status 3" in log
        # fix the task, requeue by hand: resumes at flaky, does not rerun one
        write_task(tasks, "flaky", "echo flaky fixed\n")
        os.rename(root / "error" / "j", root / "queue" / "j")
        assert wait_landed(root, "j") == "success"
        data = job_json(root / "success" / "j")
        assert [f["Name"] for f in data["Finished"]] == ["one", "flaky", "flaky", "three"]
        assert [f["Status"] for f in data["Finished"]] == ["ok", "error", "ok", "ok"]
        assert (root / "success" / "j" / "LOG").read_text().count("\none\n") == 1


def test_unknown_task_bad_control_line_and_timeout(root: Path) -> None:
    tasks = root / "tasks"
    write_task(tasks, "bad-control", 'echo "rmtask:x" >> "$JOBCONTROL"\n')
    write_task(tasks, "slow", "sleep 30\n")
    (tasks / "not-exec").write_text("#!/bin/sh\n")
    with Service(root, "--task-timeout", "1", api=False):
        drop(root, "u", job='{"Todo": ["no-such-task"]}')
        drop(root, "c", job='{"Todo": ["bad-control"]}')
        drop(root, "t", job='{"Todo": ["slow"]}')
        drop(root, "n", job='{"Todo": ["not-exec"]}')
        for name in "ucnt":
            assert wait_landed(root, name) == "error"
        assert "unknown task no-such-task" in (root / "error/u/LOG").read_text()
        assert job_json(root / "error/u")["Todo"] == ["no-such-task"]
        assert "'rmtask:x'" in (root / "error/c/LOG").read_text()
        assert job_json(root / "error/c")["Finished"][-1]["Status"] == "error"
        assert "timed out after 1 s" in (root / "error/t/LOG").read_text()
        assert "not executable" in (root / "error/n/LOG").read_text()


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'["start"]', b'{"Todo": "start"}', b'{"Todo": ["../evil"]}', b"\xff\xfe"],
)
def test_malformed_job_goes_to_error_and_is_kept(root: Path, content: bytes) -> None:
    write_task(root / "tasks", "start", "echo ran\n")
    with Service(root, api=False):
        path = make_job(root, "bad")
        (path / "JOB").write_bytes(content)
        os.rename(path, root / "queue" / "bad")
        drop(root, "good")
        assert wait_landed(root, "bad") == "error"
        assert (root / "error/bad/JOB").read_bytes() == content
        assert "cannot run this job: JOB" in (root / "error/bad/LOG").read_text()
        assert wait_landed(root, "good") == "success"  # the processor kept going


def test_strays_and_bad_names_in_queue_are_skipped(root: Path) -> None:
    write_task(root / "tasks", "start", "true\n")
    (root / "queue" / "stray.txt").write_text("not a job")
    (root / "queue" / "bad name").mkdir()
    (root / "queue" / ".hidden-wip").mkdir()
    with Service(root, api=False) as svc:
        drop(root, "fine")
        assert wait_landed(root, "fine") == "success"
        wait_for(lambda: "'bad name'" in svc.log(), what="a warning about the bad name")
        assert (root / "queue" / "stray.txt").exists()
        assert (root / "queue" / "bad name").is_dir()
        assert (root / "queue" / ".hidden-wip").is_dir()
        assert svc.proc is not None and svc.proc.poll() is None


def test_finished_job_never_overwrites_a_namesake(root: Path) -> None:
    write_task(root / "tasks", "start", "true\n")
    (root / "success" / "dup").mkdir()
    (root / "success" / "dup" / "OLD").write_text("keep")
    (root / "success" / "dup-001").mkdir()  # an empty folder must not be replaced either
    with Service(root, api=False):
        drop(root, "dup")
        wait_for(lambda: (root / "success" / "dup-002").is_dir(), what="dup-002")
    assert (root / "success" / "dup" / "OLD").read_text() == "keep"
    assert list((root / "success" / "dup-001").iterdir()) == []


def test_sigterm_mid_task_returns_job_to_queue(root: Path) -> None:
    write_task(root / "tasks", "start", 'echo started > "$JOBPATH/started"; sleep 30\n')
    svc = Service(root, "--grace", "0.5", api=False).start()
    drop(root, "long")
    wait_for(lambda: (root / "processing/long/started").exists(), what="task start")
    svc.signal(signal.SIGTERM)
    assert svc.proc is not None
    assert svc.proc.wait(20) == 0
    svc.stop()
    assert (root / "queue" / "long").is_dir()
    assert not (root / "error" / "long").exists()
    job = root / "queue" / "long"
    data = job_json(job) if (job / "JOB").exists() else {"Todo": ["start"], "Finished": []}
    assert data["Todo"][0] == "start"
    assert all(f["Status"] != "error" for f in data["Finished"])
    assert "service stopping" in (job / "LOG").read_text()


def test_sigterm_lets_a_task_finish_within_grace(root: Path) -> None:
    write_task(
        root / "tasks",
        "start",
        'touch "$JOBPATH/started"; sleep 1; echo addtask:next >> "$JOBCONTROL"\n',
    )
    write_task(root / "tasks", "next", "true\n")
    svc = Service(root, "--grace", "20", api=False).start()
    drop(root, "g")
    wait_for(lambda: (root / "processing/g/started").exists(), what="task start")
    svc.signal(signal.SIGTERM)
    assert svc.proc is not None and svc.proc.wait(20) == 0
    svc.stop()
    data = job_json(root / "queue" / "g")
    assert [f["Name"] for f in data["Finished"]] == ["start"]
    assert data["Todo"] == ["next"]


def test_kill_9_mid_task_resumes_after_restart_and_orphan_never_overlaps(
    root: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs.log"
    # The task outlives the killed service as an orphan that keeps running (and, through
    # the inherited lock, holding the job) for a while. The re-run must not start before
    # the orphan has ended.
    write_task(root / "tasks", "first", "true\n")
    write_task(
        root / "tasks",
        "work",
        'echo "begin $(date +%s.%N)" >> "$RUNS"\n'
        'if [ ! -e "$JOBPATH/.once" ]; then touch "$JOBPATH/.once"\n'
        '  sh -c \'sleep 2; echo "orphan-end $(date +%s.%N)" >> "$RUNS"\'\nfi\n'
        'echo "end $(date +%s.%N)" >> "$RUNS"\n',
    )
    env = {"RUNS": str(runs)}
    svc = Service(root, api=False, env=env).start()
    drop(root, "k", job='{"Todo": ["first", "work"], "Extra": "kept"}')
    wait_for(lambda: runs.exists() and "begin" in runs.read_text(), what="work to begin")
    svc.kill()
    assert (root / "processing" / "k").is_dir()
    svc2 = Service(root, api=False, env=env).start()
    try:
        assert wait_landed(root, "k") == "success"
    finally:
        svc2.stop()
    lines = runs.read_text().split("\n")
    events = [line.split() for line in lines if line]
    kinds = [e[0] for e in events]
    # the first run (orphaned) ends completely before the re-run begins
    assert kinds == ["begin", "orphan-end", "end", "begin", "end"], kinds
    assert float(events[3][1]) >= float(events[2][1])
    data = job_json(root / "success" / "k")
    assert data["Extra"] == "kept"
    assert [f["Name"] for f in data["Finished"]] == ["first", "work"]
    assert data["Todo"] == []


def test_two_processors_run_each_of_200_jobs_once(root: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs.log"
    write_task(root / "tasks", "start", 'echo "$JOBNAME" >> "$RUNS"\n')
    env = {"RUNS": str(runs)}
    a = Service(root, "--workers", "3", api=False, env=env).start()
    b = Service(root, "--workers", "3", api=False, env=env).start()
    try:
        names = [f"job-{i:03d}" for i in range(200)]
        for name in names:
            drop(root, name)
        wait_for(
            lambda: len(list((root / "success").iterdir())) == 200,
            timeout=120,
            what="200 jobs in success/",
        )
    finally:
        a.stop()
        b.stop()
    ran = runs.read_text().split()
    assert sorted(ran) == names  # every job exactly once
    assert sorted(p.name for p in (root / "success").iterdir()) == names
    picked_a = a.log().count("picked up")
    picked_b = b.log().count("picked up")
    assert picked_a + picked_b == 200


def test_unusable_root_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "batchingest.cli",
            "serve",
            "--root",
            str(blocker / "root"),
            "--no-api",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "not usable" in out.stderr


def test_status_and_version(root: Path) -> None:
    (root / "error" / "broken").mkdir()
    (root / "data" / "a").mkdir()
    (root / "processing" / "busy").mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "batchingest.cli", "status", "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0
    assert "broken" in out.stdout and "busy" in out.stdout
    lines = {
        line.split()[0]: line.split()[1]
        for line in out.stdout.splitlines()
        if len(line.split()) == 2 and line.split()[1].isdigit()
    }
    assert lines["ready"] == "1" and lines["error"] == "1" and lines["total"] == "3"
    v = subprocess.run(
        [sys.executable, "-m", "batchingest.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert v.stdout.startswith("batchingest ")


def test_pickup_is_event_driven(root: Path) -> None:
    """With a 60 s poll interval, only the file-system event can wake the processor."""
    write_task(root / "tasks", "start", "true\n")
    poll = 60.0
    with Service(root, "--poll-interval", str(poll), api=False) as svc:
        wait_for(lambda: "watching queue/ with inotify" in svc.log(), 30, what="the watch")
        t0 = time.monotonic()
        drop(root, "fast")
        wait_landed(root, "fast", timeout=poll / 2)
        assert time.monotonic() - t0 < poll / 2  # the next listing comes a poll later


def test_port_in_use_is_a_clear_error(root: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "batchingest.cli", "serve", "--root", str(root),
             "--host", "127.0.0.1", "--port", str(port)],
            capture_output=True, text=True, timeout=30,
            env={**os.environ, "BATCHINGEST_TOKENS": "t"},
        )  # fmt: skip
    assert out.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr


def test_longest_job_name_runs(root: Path) -> None:
    name = "n" * 255
    write_task(root / "tasks", "start", 'echo addtask:second >> "$JOBCONTROL"\n')
    write_task(root / "tasks", "second", "true\n")
    with Service(root, api=False):
        drop(root, name)
        assert wait_landed(root, name) == "success"
    assert job_json(root / "success" / name)["Todo"] == []


def test_stage_replaced_by_a_site_task(root: Path) -> None:
    """A `stage` executable in the tasks folder runs instead of the built-in one."""
    write_task(root / "tasks", "stage", 'echo "site stage for $JOBNAME"\n')
    with Service(root, api=False):
        drop(root, "s", job='{"Todo": ["stage"]}')
        assert wait_landed(root, "s") == "success"
    assert "site stage for s" in (root / "success/s/LOG").read_text()


def test_force_polling_finds_jobs_without_events(root: Path) -> None:
    write_task(root / "tasks", "start", "true\n")
    with Service(root, "--force-polling", "--poll-interval", "0.2", api=False):
        for i in range(3):
            drop(root, f"p{i}")
        for i in range(3):
            assert wait_landed(root, f"p{i}", timeout=20) == "success"


def test_few_descriptors_delay_jobs_but_never_fail_or_lose_them(root: Path) -> None:
    """Out of descriptors at any step (claim, LOG, JOB, spawning a task): the job goes
    back to queue/ and the processor pauses; none lands in error/ for it, none is lost."""
    write_task(root / "tasks", "start", "echo ran\n")
    count = 60
    # the service alone holds about 22 descriptors (event feed, outbox, inotify, pipes):
    # 40 leave four workers short at every step of a job
    svc = Service(root, "--workers", "4", api=False, prefix=["prlimit", "--nofile=40", "--"])
    with svc:
        for i in range(count):
            drop(root, f"j{i:02d}")
        wait_for(
            lambda: len(os.listdir(root / "success")) + len(os.listdir(root / "error")) == count,
            120,
            what="every job to finish",
        )
        assert os.listdir(root / "error") == []
        assert "Too many open files" in svc.log()  # the limit did bite
    for i in range(count):
        assert "ran" in (root / "success" / f"j{i:02d}" / "LOG").read_text()
