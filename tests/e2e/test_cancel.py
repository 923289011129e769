"""Cancel and deadlines end to end: the real service, real HTTP, real task processes.

Every path here is inside the test's own tmp_path.
"""

from __future__ import annotations

import json
import os
import signal
from datetime import UTC, datetime
from pathlib import Path

import pytest
from live_service import Service, alive, make_job, rfc3339, wait_for, write_task

pytestmark = pytest.mark.e2e

# Traps SIGTERM, and leaves a grandchild that ignores it: only SIGKILL of the whole
# process group ends them.
STUBBORN = """
trap 'echo TERM ignored' TERM
sh -c 'trap "" TERM; echo $$ > grandchild.pid; while :; do sleep 1; done' &
echo $$ > task.pid
echo run >> runs
while :; do sleep 0.05; done
"""


def drop(root: Path, name: str, job: str | None = None) -> None:
    os.rename(make_job(root, name, job), root / "queue" / name)


def job_json(path: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((path / "JOB").read_text())  # type: ignore[no-any-return]


def cancel(svc: Service, name: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    with svc.client() as c:
        r = c.post(f"/jobs/{name}/cancel")
    return r.status_code, r.json()


def test_cancel_kills_a_task_that_traps_sigterm_and_its_grandchild(root: Path) -> None:
    write_task(root / "tasks", "start", STUBBORN)
    with Service(root, "--cancel-grace", "1") as svc:
        drop(root, "stubborn")
        running = root / "processing" / "stubborn"
        # the shell makes a pid file before it writes the pid into it: wait for the pids
        written = [running / "grandchild.pid", running / "task.pid"]
        wait_for(lambda: all(p.exists() and p.read_text().strip() for p in written))
        pids = [int((running / f).read_text()) for f in ("task.pid", "grandchild.pid")]
        status, body = cancel(svc, "stubborn")
        assert (status, body["Name"], body["Status"]) == (202, "stubborn", "processing")
        job = root / "error" / "stubborn"
        wait_for(job.is_dir, 15, what="the job in error/")
        assert not any(alive(pid) for pid in pids)
        data = job_json(job)
        assert data["Todo"] == ["start"]
        (entry,) = data["Finished"]
        assert entry["Status"] == "canceled" and entry["Reason"] == "canceled through the API"
        assert set(entry) == {"Name", "Start", "Finish", "Status", "Reason"}
        log = (job / "LOG").read_text()
        assert "TERM ignored" in log and "---- task start: canceled" in log
        # removed once the job has left processing/, just after the move
        wait_for(lambda: not (job / ".cancel").exists(), 5, what="the request removed")
        # nothing left to cancel: 409 saying where the job is
        status, body = cancel(svc, "stubborn")
        assert (status, body["code"], body["status"]) == (409, "JobNotCancellable", "error")
        assert "is error" in body["message"]


def test_cancel_while_queued_returns_the_job_to_ready(root: Path) -> None:
    write_task(root / "tasks", "start", "echo run >> runs; [ -e block ] && exec sleep 60; true\n")
    with Service(root, "--workers", "1") as svc:
        blocker = make_job(root, "blocker", files={"block": ""})
        os.rename(blocker, root / "queue" / "blocker")
        wait_for((root / "processing" / "blocker" / "runs").exists, what="the blocker to run")
        drop(root, "waiting")
        status, body = cancel(svc, "waiting")
        assert (status, body["Status"]) == (202, "ready")
        job = root / "data" / "waiting"
        assert job.is_dir() and not (job / ".cancel").exists()
        assert "canceled through the API while queued: back to data/" in (job / "LOG").read_text()
        # counted for the operator, in this service's metrics
        with svc.client() as c:
            assert "batchingest_cancels_total 1.0" in c.get("/metrics").text
        status, body = cancel(svc, "waiting")
        assert (status, body["code"], body["status"]) == (409, "JobNotCancellable", "ready")
        assert cancel(svc, "nobody")[0] == 404
        # it is an ordinary ready job again: queue it and it runs
        assert cancel(svc, "blocker")[0] == 202
        wait_for((root / "error" / "blocker").is_dir, 15, what="the blocker to stop")
        with svc.client() as c:
            assert c.post("/jobs/waiting/queue").status_code == 202
        wait_for((root / "success" / "waiting").is_dir, 15, what="the job to run")
        assert (root / "success" / "waiting" / "runs").read_text() == "run\n"
        assert cancel(svc, "waiting")[1]["status"] == "success"


def test_cancel_reaches_a_job_held_by_another_processor(root: Path) -> None:
    """The API service runs no processor; the one holding the job learns of the request
    from the job folder alone."""
    write_task(root / "tasks", "start", "echo run >> runs; exec sleep 60\n")
    with (
        Service(root, "--no-processor") as api,
        Service(root, "--cancel-grace", "2", api=False),
    ):
        drop(root, "elsewhere")
        wait_for((root / "processing" / "elsewhere" / "runs").exists, what="the task to run")
        assert cancel(api, "elsewhere")[0] == 202
        job = root / "error" / "elsewhere"
        wait_for(job.is_dir, 10, what="the holder to cancel it")
        assert job_json(job)["Finished"][0]["Status"] == "canceled"
        assert "killed by" not in (job / "LOG").read_text()  # TERM was enough, before SIGKILL


def test_cancel_survives_kill_9_of_the_holder_and_the_task_is_not_run_again(root: Path) -> None:
    write_task(root / "tasks", "start", "echo run >> runs; sleep 1.5\n")
    with Service(root, "--no-processor") as api:
        holder = Service(root, api=False).start()
        try:
            drop(root, "orphan")
            running = root / "processing" / "orphan"
            wait_for((running / "runs").exists, what="the task to run")
            holder.signal(signal.SIGSTOP)  # it cannot act on the request...
            assert cancel(api, "orphan")[0] == 202
            assert (running / ".cancel").exists()
            holder.kill()  # ...and dies without having done so
        finally:
            holder.stop()
        # the orphaned task keeps the job held until it ends; then the next processor
        # recovers it, finds the request, and cancels it without running anything
        with Service(root, api=False) as again:
            job = root / "error" / "orphan"
            wait_for(job.is_dir, 20, what="the job to end canceled")
            assert (job / "runs").read_text() == "run\n"
            finished = job_json(job)["Finished"]
            assert [f["Status"] for f in finished] == ["canceled"]
            assert "recovered orphan" in again.log()


def test_deadline_while_running_stops_the_task(root: Path) -> None:
    write_task(root / "tasks", "start", "echo run >> runs; exec sleep 60\n")
    with Service(root):
        deadline = rfc3339(1.5)
        drop(root, "slow", json.dumps({"Todo": ["start"], "Deadline": deadline}))
        job = root / "error" / "slow"
        wait_for(job.is_dir, 15, what="the deadline to stop it")
        assert datetime.now(UTC) >= datetime.fromisoformat(deadline)
        (entry,) = job_json(job)["Finished"]
        assert entry["Status"] == "canceled"
        assert entry["Reason"] == f"deadline {deadline} passed"


def test_default_deadline_while_queued_returns_the_job_to_ready(root: Path) -> None:
    write_task(root / "tasks", "start", "echo run >> runs; [ -e block ] && exec sleep 60; true\n")
    with Service(root, "--workers", "1", "--default-deadline", "1.5") as svc:
        far = json.dumps({"Todo": ["start"], "Deadline": rfc3339(3600)})
        os.rename(make_job(root, "blocker", far, {"block": ""}), root / "queue" / "blocker")
        wait_for((root / "processing" / "blocker" / "runs").exists, what="the blocker to run")
        drop(root, "waiting")
        job = root / "data" / "waiting"
        wait_for(job.is_dir, 15, what="the deadline to send it back")
        assert not (job / "runs").exists()
        assert "passed while queued: back to data/" in (job / "LOG").read_text()
        assert (root / "processing" / "blocker").is_dir()  # its own Deadline is far off
        assert cancel(svc, "blocker")[0] == 202


def test_a_job_whose_own_deadline_passed_is_not_queued(root: Path) -> None:
    write_task(root / "tasks", "start", "echo run >> runs\n")
    with Service(root) as svc, svc.client() as c:
        assert c.put("/jobs/late").status_code == 201
        past = json.dumps({"Todo": ["start"], "Deadline": rfc3339(-5)})
        assert c.put("/jobs/late/files/JOB", content=past).status_code == 201
        r = c.post("/jobs/late/queue")
        assert (r.status_code, r.json()["code"]) == (409, "DeadlinePassed")
        assert "change or remove the Deadline" in r.json()["message"]
        assert (root / "data" / "late").is_dir()
        # moved in by hand, it is sent back to data/
        os.rename(root / "data" / "late", root / "queue" / "late")
        wait_for((root / "data" / "late").is_dir, 15, what="the job back in data/")
        assert not (root / "data" / "late" / "runs").exists()
        # with the Deadline moved on, it runs
        later = json.dumps({"Todo": ["start"], "Deadline": rfc3339(3600)})
        assert c.put("/jobs/late/files/JOB", content=later).status_code == 200
        assert c.post("/jobs/late/queue").status_code == 202
        wait_for((root / "success" / "late").is_dir, 15, what="the job to run")
