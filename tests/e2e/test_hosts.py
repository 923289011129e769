"""Several hosts on one shared jobs root, each service on its own FUSE mount (bindfs).

Every change is visible through every mount, but inotify does not cross mounts and
`flock` is not shared between them: as on NFS with `local_lock=all`, Lustre without
`-o flock` or many FUSE network file systems. Only the leases keep each job with one
host. Skipped, with the reason, where bindfs or FUSE is not available.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_service import Service, alive, make_job, wait_for, write_task

from batchingest.store import Store

pytestmark = pytest.mark.e2e

# A task appends "JOBNAME TASK HOST PID EVENT" to the ledger, outside the jobs root.
TASK = """\
echo "$JOBNAME {task} $BATCHINGEST_HOST_ID $$ begin" >> "$LEDGER"
{body}
echo "$JOBNAME {task} $BATCHINGEST_HOST_ID $$ end" >> "$LEDGER"
"""


def _why_no_fuse() -> str | None:
    if shutil.which("bindfs") is None:
        return "bindfs is not installed (scripts/test installs it as root on Debian)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine (FUSE unavailable, e.g. in this container)"
    if shutil.which("fusermount3") is None and shutil.which("fusermount") is None:
        return "fusermount is not installed"
    return None


def _unmount(path: Path) -> None:
    tool = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount"
    for _ in range(50):
        if subprocess.run([tool, "-u", str(path)], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)  # busy: a process of ours is still leaving


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[list[Path]]:
    """Three bindfs mounts of tmp_path/shared, each a separate host's view of the root."""
    why = _why_no_fuse()
    if why is not None:
        pytest.skip(why)
    shared = tmp_path / "shared"
    Store(shared / "root").init()
    (shared / "root" / "tasks").mkdir()
    made: list[Path] = []
    try:
        for i in range(3):
            view = tmp_path / f"host{i}"
            view.mkdir()
            done = subprocess.run(["bindfs", str(shared), str(view)], capture_output=True)
            if done.returncode != 0:
                pytest.skip(f"bindfs cannot mount here: {done.stderr.decode().strip()}")
            made.append(view)
        yield [view / "root" for view in made]
    finally:
        for view in made:
            _unmount(view)


def host(root: Path, name: str, ledger: Path, *args: str) -> Service:
    """A service on one host's view; its tasks see the host's name in the environment."""
    env = {"BATCHINGEST_HOST_ID": name, "LEDGER": str(ledger)}
    return Service(root, "--poll-interval", "0.2", *args, api=False, env=env)


def ledger_lines(ledger: Path) -> list[list[str]]:
    if not ledger.exists():
        return []
    return [line.split() for line in ledger.read_text().splitlines() if line.strip()]


def drop(root: Path, name: str, todo: list[str]) -> None:
    os.rename(make_job(root, name, json.dumps({"Todo": todo})), root / "queue" / name)


def kill_tree(svc: Service, ledger: Path, job: str) -> None:
    """kill -9 of a service and of the task it runs (tasks run in their own group)."""
    svc.kill()
    for fields in ledger_lines(ledger):
        if fields[0] == job:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(fields[3]), signal.SIGKILL)


@pytest.mark.parametrize("hosts", [2, 3])
def test_many_jobs_on_several_hosts_run_every_task_exactly_once(
    mounts: list[Path], tmp_path: Path, hosts: int
) -> None:
    ledger = tmp_path / "ledger"
    tasks = mounts[0] / "tasks"
    for t in ("a", "b", "c"):
        write_task(tasks, t, TASK.format(task=t, body="sleep 0.0$(($$ % 3))"))
    rng = random.Random(hosts)
    plan = {f"j{i:03d}": rng.sample(["a", "b", "c"], rng.randint(1, 2)) for i in range(500)}
    services = [host(mounts[i], f"h{i}", ledger) for i in range(hosts)]
    try:
        for svc in services:
            svc.start()
        for i, (name, todo) in enumerate(plan.items()):
            drop(mounts[i % hosts], name, todo)  # arriving through every host's view
        done = mounts[0] / "success"
        wait_for(lambda: len(os.listdir(done)) == len(plan), 400, 0.2, "every job to succeed")
    finally:
        for svc in services:
            svc.stop()
    assert sorted(os.listdir(done)) == sorted(plan)
    runs = Counter((f[0], f[1]) for f in ledger_lines(ledger) if f[4] == "begin")
    assert runs == Counter((name, t) for name, todo in plan.items() for t in todo)
    assert all(n == 1 for n in runs.values())
    ran_on = Counter(f[2] for f in ledger_lines(ledger) if f[4] == "begin")
    assert len(ran_on) == hosts  # every host did its share
    for svc in services:
        assert "recovered" not in svc.log()
        assert "on a FUSE file system" in svc.log()  # no inotify across mounts: polling


def test_a_killed_host_is_taken_over_after_its_lease_and_never_before(
    mounts: list[Path], tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    body = '[ "$BATCHINGEST_HOST_ID" = a ] && sleep 60'
    write_task(mounts[0] / "tasks", "slow", TASK.format(task="slow", body=body))
    timeout, renew = 3.0, 0.5
    lease = ("--lease-timeout", str(timeout), "--lease-renew", str(renew))
    a = host(mounts[0], "a", ledger, *lease).start()
    b = host(mounts[1], "b", ledger, *lease)
    try:
        drop(mounts[0], "j1", ["slow"])
        wait_for(lambda: ledger_lines(ledger), 60, what="the task to start on a")
        b.start()
        # alive and renewing: b never takes it, however long it runs
        time.sleep(2 * timeout)
        assert [f[2] for f in ledger_lines(ledger)] == ["a"]
        assert "recovered" not in b.log()
        kill_tree(a, ledger, "j1")
        killed = time.monotonic()
        wait_for(lambda: "recovered j1" in b.log(), 60, 0.05, "b to take j1 over")
        taken = time.monotonic() - killed
        # the last renewal was at most `renew` before the kill; then one poll (0.2 s)
        assert timeout - renew <= taken <= timeout + 0.2 + 3.0, taken  # + slack for load
        assert "recovered j1: back to queue/ (its lease (a) was not renewed" in b.log()
        wait_for(lambda: (mounts[1] / "success" / "j1").is_dir(), 60, 0.05, "b to finish j1")
    finally:
        a.stop()
        b.stop()
    hosts = [(f[2], f[4]) for f in ledger_lines(ledger)]
    assert hosts == [("a", "begin"), ("b", "begin"), ("b", "end")]
    finished = json.loads((mounts[1] / "success" / "j1" / "JOB").read_text())["Finished"]
    assert [(f["Name"], f["Status"]) for f in finished] == [("slow", "ok")]


def test_a_frozen_host_does_not_finish_or_move_the_job_it_lost(
    mounts: list[Path], tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    # a's task ends only when the test lets it (however slowly this machine runs), or
    # when it is stopped: so an end of it in the ledger can only be a task left running
    release = tmp_path / "release"
    body = (
        f'if [ "$BATCHINGEST_HOST_ID" = a ]; then until [ -e "{release}" ]; do sleep 0.05; done; fi'
    )
    write_task(mounts[0] / "tasks", "t", TASK.format(task="t", body=body))
    lease = ("--lease-timeout", "2", "--lease-renew", "0.3")
    a = host(mounts[0], "a", ledger, *lease).start()
    b = host(mounts[1], "b", ledger, *lease)
    try:
        drop(mounts[0], "j1", ["t"])
        wait_for(lambda: ledger_lines(ledger), 60, what="the task to start on a")
        task = int(ledger_lines(ledger)[0][3])
        b.start()
        # freeze a whole: the service and its task (SIGSTOP, as a hung host)
        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGSTOP)
        os.killpg(task, signal.SIGSTOP)
        wait_for(lambda: (mounts[1] / "success" / "j1").is_dir(), 60, 0.05, "b to take over")
        os.killpg(task, signal.SIGCONT)
        os.kill(a.proc.pid, signal.SIGCONT)
        wait_for(lambda: "leaving the job alone" in a.log(), 60, what="a to see it lost j1")
        wait_for(lambda: not alive(task), 60, what="a to stop its task")
        assert a.proc.poll() is None  # a lives on
    finally:
        release.touch()  # a task left running (the test failed) ends now
        a.stop()
        b.stop()
    events = [(f[2], f[4]) for f in ledger_lines(ledger)]
    assert ("a", "end") not in events  # a's task was stopped when a woke
    assert events.count(("b", "end")) == 1
    assert os.listdir(mounts[0] / "success") == ["j1"]  # moved once: no j1-001
    assert not os.listdir(mounts[0] / "processing") and not os.listdir(mounts[0] / "queue")
    finished = json.loads((mounts[1] / "success" / "j1" / "JOB").read_text())["Finished"]
    assert [(f["Name"], f["Status"]) for f in finished] == [("t", "ok")]


def test_on_one_mount_a_dead_holder_is_recovered_at_once(root: Path, tmp_path: Path) -> None:
    """Locks shared (one mount, one machine): no waiting for the lease to expire."""
    ledger = tmp_path / "ledger"
    body = '[ "$(wc -l < "$LEDGER")" -le 1 ] && sleep 60'  # only the first run is slow
    write_task(root / "tasks", "slow", TASK.format(task="slow", body=body))
    # the same host: both services know each other's pids and boot
    timeout = 600.0
    a = host(root, "a", ledger).start()
    b = host(root, "a", ledger, "--lease-timeout", str(timeout))
    try:
        drop(root, "j1", ["slow"])
        wait_for(lambda: ledger_lines(ledger), 60, what="the task to start")
        b.start()
        time.sleep(1)
        assert "recovered" not in b.log()  # a lives: its job stays with it
        kill_tree(a, ledger, "j1")
        killed = time.monotonic()
        wait_for(lambda: "recovered j1" in b.log(), 60, 0.02, "b to recover j1")
        # at b's next poll (0.2 s on a quiet machine): far sooner than the lease expires
        assert time.monotonic() - killed < timeout / 10
        assert "recovered j1: back to queue/ (its processor is gone)" in b.log()
    finally:
        a.stop()
        b.stop()


def test_polling_finds_jobs_arriving_together_whatever_the_folder_mtime(root: Path) -> None:
    """Several jobs in one second, and a queue/ whose mtime is set back: all run."""
    write_task(root / "tasks", "start", "true\n")
    queue = root / "queue"
    before = os.stat(queue)
    with Service(root, "--force-polling", "--poll-interval", "0.2", api=False) as svc:
        for i in range(5):
            os.rename(make_job(root, f"p{i}"), queue / f"p{i}")
        # as a coarse network file system would show it: no change to the folder's mtime
        os.utime(queue, ns=(before.st_atime_ns, before.st_mtime_ns))
        for i in range(5):
            wait_for(lambda i=i: (root / "success" / f"p{i}").is_dir(), 20, what=f"p{i}")  # type: ignore[misc]
        assert "polling queue/ every 0.2s: --force-polling is set" in svc.log()
