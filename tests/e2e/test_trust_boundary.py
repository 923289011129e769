"""Issue 8 against the real service: what a hand-dropped job folder holds is user input.

Links and special files planted as JOB, LOG, `.lock` or the control file never make the
service read or write outside the job, hang a worker or stop the service; a crash
leaves nothing behind after the next start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from live_service import Service, job_json, make_job, wait_for, wait_landed, write_task

pytestmark = pytest.mark.e2e


def drop(root: Path, name: str, job: str | None = None, plant=None) -> Path:  # type: ignore[no-untyped-def]
    """Assemble a job under a hidden name (plant() adds the hostile part) and queue it."""
    path = make_job(root, name, job, {"data.txt": "x"})
    if plant is not None:
        plant(path)
    os.rename(path, root / "queue" / name)
    return root / "queue" / name


def test_log_link_or_fifo_sends_the_job_to_error_and_writes_nothing_outside(
    root: Path, tmp_path: Path
) -> None:
    write_task(root / "tasks", "start", "echo ran > ran.txt\n")
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    readonly = tmp_path / "readonly.txt"
    readonly.write_text("read only\n")
    readonly.chmod(0o444)
    made = tmp_path / "would-be-created"
    with Service(root, api=False) as svc:
        drop(root, "to-file", plant=lambda p: (p / "LOG").symlink_to(outside))
        drop(root, "to-readonly", plant=lambda p: (p / "LOG").symlink_to(readonly))
        drop(root, "dangling", plant=lambda p: (p / "LOG").symlink_to(made))
        drop(root, "fifo", plant=lambda p: os.mkfifo(p / "LOG"))
        drop(root, "fine")
        assert wait_landed(root, "fine") == "success"
        for name, what in [
            ("to-file", "symbolic link"),
            ("to-readonly", "symbolic link"),
            ("dangling", "symbolic link"),
            ("fifo", "named pipe"),
        ]:
            assert wait_landed(root, name) == "error", name
            job = root / "error" / name
            (entry,) = job_json(job)["Finished"]
            assert entry["Name"] == "start" and entry["Status"] == "error"
            assert f"LOG is a {what}" in entry["Reason"]
            assert job_json(job)["Todo"] == ["start"]  # re-queued once fixed, it runs start
            assert not (job / "ran.txt").exists()  # no task ran without its LOG
            wait_for(lambda n=name: f"job {n}: LOG is a" in svc.log(), what="service log")
        # the service keeps working after all of them
        drop(root, "after")
        assert wait_landed(root, "after") == "success"
    assert outside.read_text() == "precious\n"
    assert readonly.read_text() == "read only\n"
    assert not made.exists()


def test_job_links_to_devices_and_huge_jobs_are_errors_not_stalls(root: Path) -> None:
    write_task(root / "tasks", "start", "true\n")
    big = json.dumps({"Todo": ["start"], "Pad": "x" * (96 << 20)})
    with Service(root) as svc:
        drop(root, "zero", plant=lambda p: (p / "JOB").symlink_to("/dev/zero"))
        drop(root, "fifo", plant=lambda p: os.mkfifo(p / "JOB"))
        drop(root, "big", job=big)
        for name, what in [("zero", "symbolic link"), ("fifo", "named pipe"), ("big", "larger")]:
            assert wait_landed(root, name, timeout=20) == "error"
            assert what in (root / "error" / name / "LOG").read_text()
        # the API answers at once for a 96 MiB JOB: read up to the cap, never parsed
        with svc.client() as client:
            t0 = time.monotonic()
            info = client.get("/jobs/big").json()
            assert time.monotonic() - t0 < 2
            assert "larger than 1048576 bytes" in info["JobError"]
        drop(root, "after")
        assert wait_landed(root, "after") == "success"


def test_control_file_made_a_fifo_or_link_fails_the_task_not_the_worker(
    root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside-control"
    outside.write_text("addtask:evil\n")
    write_task(root / "tasks", "fifo", 'rm -f "$JOBCONTROL"; mkfifo "$JOBCONTROL"\n')
    write_task(root / "tasks", "link", f'rm -f "$JOBCONTROL"; ln -s {outside} "$JOBCONTROL"\n')
    write_task(root / "tasks", "evil", "touch evil-ran\n")
    write_task(root / "tasks", "start", 'echo addtask:fine >> "$JOBCONTROL"\n')
    write_task(root / "tasks", "fine", "true\n")
    with Service(root, "--workers", "1", api=False):
        drop(root, "fifo", job='{"Todo": ["fifo"]}')
        drop(root, "link", job='{"Todo": ["link"]}')
        for name in ("fifo", "link"):
            assert wait_landed(root, name, timeout=20) == "error"
            (entry,) = job_json(root / "error" / name)["Finished"]
            assert "control file is not a regular file" in entry["Reason"]
            assert not (root / "error" / name / "evil-ran").exists()
        # the same worker goes on, and its next control file works
        drop(root, "after")
        assert wait_landed(root, "after") == "success"
        assert [f["Name"] for f in job_json(root / "success" / "after")["Finished"]] == [
            "start",
            "fine",
        ]
    assert outside.read_text() == "addtask:evil\n"


def test_lock_link_or_folder_is_never_followed_and_the_service_goes_on(
    root: Path, tmp_path: Path
) -> None:
    """On a local root jobs are held by a flock on the folder itself: a `.lock` link or
    folder planted in a job is nothing to the service, which runs the job and never
    follows the link. (On a shared root, where `.lock` is the lock, such a job is
    skipped: see test_store.)"""
    write_task(root / "tasks", "start", "true\n")
    target = tmp_path / "lock-target"
    drop(root, "lock-link", plant=lambda p: (p / ".lock").symlink_to(target))
    drop(root, "lock-folder", plant=lambda p: (p / ".lock").mkdir())
    # one left in processing/ too, as a crash would: recovered at start
    stuck = make_job(root, "stuck")
    (stuck / ".lock").mkdir()
    os.rename(stuck, root / "processing" / "stuck")
    with Service(root, api=False) as svc:
        for name in ("lock-link", "lock-folder", "stuck"):
            assert wait_landed(root, name) == "success"
        assert svc.proc is not None and svc.proc.poll() is None
        assert "skipping" not in svc.log()
    assert not target.exists()
    assert (root / "success" / "lock-link" / ".lock").is_symlink()


def _serve_once(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchingest.cli", "serve", "--root", str(root), "--no-api"],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_trash_or_state_folder_link_refuses_to_start_and_touches_nothing(
    root: Path, tmp_path: Path
) -> None:
    precious = tmp_path / "precious"
    (precious / "folder").mkdir(parents=True)
    (precious / "folder" / "file").write_text("keep")
    (root / ".trash").symlink_to(precious)
    out = _serve_once(root)
    assert out.returncode == 2
    assert ".trash is a symbolic link" in out.stderr
    assert (precious / "folder" / "file").read_text() == "keep"
    (root / ".trash").unlink()
    (root / "success").rename(tmp_path / "success-elsewhere")
    (root / "success").symlink_to(tmp_path / "success-elsewhere")
    out = _serve_once(root)
    assert out.returncode == 2
    assert "success is a symbolic link" in out.stderr


def _old(path: Path) -> None:
    then = time.time() - 3600
    os.utime(path, (then, then))


def test_kill_9_then_restart_leaves_no_temporaries_and_no_locks(root: Path, tmp_path: Path) -> None:
    write_task(root / "tasks", "start", 'echo addtask:slow >> "$JOBCONTROL"\n')
    write_task(root / "tasks", "slow", 'touch "$JOBPATH/../../began-$JOBNAME"; sleep 1\n')
    svc = Service(root, api=False).start()
    drop(root, "done")
    assert wait_landed(root, "done") == "success"
    drop(root, "k")
    wait_for(lambda: (root / "began-k").exists(), what="the slow task")
    pid = svc.proc.pid if svc.proc else 0
    controls = list(Path("/dev/shm").glob(f"batchingest-control-{pid}-*"))
    # what a kill -9 inside JOB's atomic rewrite leaves: a temporary beside JOB
    (root / "processing" / "k" / ".JOB.0123456789ab.tmp").write_text("{half")
    # and older leftovers in a finished job (a previous crash, an earlier version)
    (root / "success" / "done" / ".JOB.k2j_9xzq.tmp").write_text("{half")
    _old(root / "success" / "done" / ".JOB.k2j_9xzq.tmp")
    (root / "success" / "done" / ".lock").write_text("")
    svc.kill()
    assert controls and all(c.is_dir() for c in controls)
    svc2 = Service(root, api=False).start()
    try:
        assert wait_landed(root, "k") == "success"
        # finished jobs are swept in the background, a few seconds after the start
        wait_for(lambda: "job folders swept" in svc2.log(), what="the sweep of job folders")
    finally:
        svc2.stop()
    assert not any(c.exists() for c in controls)
    left = [p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name == ".lock"]
    assert left == []
    assert not list(Path("/dev/shm").glob(f"batchingest-control-{svc2.proc.pid}-*"))  # type: ignore[union-attr]
