"""Leases: taking over only what expired by the shared clock, through one winning rename."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import as_shared

from batchingest import lease
from batchingest.lease import LEASE, Owner
from batchingest.store import Store


@pytest.fixture
def store(root: Path) -> Store:
    """Leases are for shared file systems: the store as it is on one."""
    return as_shared(Store(root))


def owner(host: str, pid: int | None = None) -> Owner:
    return Owner(host, lease.boot_id(), os.getpid() if pid is None else pid)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


@pytest.fixture
def job(tmp_path: Path) -> int:
    folder = tmp_path / "job"
    folder.mkdir()
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    yield fd  # type: ignore[misc]
    os.close(fd)


def clock(tmp_path: Path) -> lease.Clock:
    return lease.Clock(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY), "here")


def test_a_live_lease_of_another_host_holds_until_it_expires(job: int, tmp_path: Path) -> None:
    a = lease.acquire(job, owner("a"), 60, clock(tmp_path))
    assert a is not None and a.broke is None
    doc = json.loads((tmp_path / "job" / LEASE).read_text())
    assert (doc["Host"], doc["Pid"], doc["Token"]) == ("a", os.getpid(), a.held.token)
    assert doc["Expires"] > doc["Renewed"] >= doc["Claimed"]
    assert lease.acquire(job, owner("b"), 60, clock(tmp_path)) is None
    assert a.held.is_ours(job)
    age(tmp_path / "job" / LEASE, 61)
    b = lease.acquire(job, owner("b"), 60, clock(tmp_path))
    assert b is not None and b.broke is not None and "(a) was not renewed for 6" in b.broke
    assert not a.held.is_ours(job) and not a.held.renew(job)  # a lost it, for good
    assert b.held.is_ours(job)
    assert os.listdir(tmp_path / "job") == [LEASE]  # the old one renamed away and gone


def test_a_renewal_racing_the_take_over_wins(job: int, tmp_path: Path) -> None:
    a = lease.acquire(job, owner("a"), 60, clock(tmp_path))
    assert a is not None
    age(tmp_path / "job" / LEASE, 61)
    found = lease.read(job)
    assert found is not None
    assert lease.stale(found, owner("b"), clock(tmp_path), 60) is not None
    assert a.held.renew(job)  # the holder renews between b's look and b's rename
    assert lease._take_away(job, found) is False
    assert a.held.is_ours(job)  # put back: still a's
    assert os.listdir(tmp_path / "job") == [LEASE]


def test_same_host_dead_pid_or_other_boot_is_stale_at_once(job: int, tmp_path: Path) -> None:
    now = clock(tmp_path)
    fresh = lease.acquire(job, owner("a", dead_pid()), 60, now)
    assert fresh is not None
    taken = lease.acquire(job, owner("a"), 60, now)
    assert taken is not None and taken.broke == "its processor is gone"
    rebooted = Owner("a", "another-boot", os.getpid())
    again = lease.acquire(job, rebooted, 60, now)
    assert again is not None and again.broke == "its host a restarted"
    # a live pid on this host is no proof of death: only the age counts then
    assert lease.acquire(job, Owner("a", "another-boot", os.getpid()), 60, now) is None


def test_the_shared_clock_is_the_file_systems(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        now = lease.shared_now(fd, "host/with odd:name")
        assert abs(now - time.time()) < 5
        assert os.listdir(tmp_path) == [".clock-host_with_odd_name"]
        (tmp_path / ".clock-x").mkdir()
        with pytest.raises(OSError):
            lease.shared_now(fd, "x")
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["link", "fifo", "folder"])
def test_a_lease_that_is_not_a_regular_file_keeps_the_job_from_being_taken(
    store: Store, kind: str, tmp_path: Path
) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("precious")
    folder = store.root / "queue" / "j"
    folder.mkdir()
    if kind == "link":
        (folder / LEASE).symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(folder / LEASE)
    else:
        (folder / LEASE).mkdir()
    assert store.claim("j") is None
    assert store.claim("j") is None  # warned once, still skipped
    assert store.find("j").state == "queue"  # type: ignore[union-attr]
    assert target.read_text() == "precious"


def test_a_job_another_host_is_claiming_is_left_to_it(store: Store) -> None:
    folder = store.root / "queue" / "j"
    folder.mkdir()
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        other = lease.acquire(fd, owner("b"), 60, lease.Clock(store.root_fd, "b"))
        assert other is not None
        assert store.claim("j") is None
        assert store.find("j").state == "queue"  # type: ignore[union-attr]
        assert other.held.is_ours(fd)  # untouched
        age(folder / LEASE, 61)  # b crashed between its lease and its rename
        hold = store.claim("j")
        assert hold is not None and hold.owned() and not other.held.is_ours(fd)
        store.finish(hold, "success")
        assert sorted(os.listdir(store.root / "success" / "j")) == []  # no .lease, no .lock
    finally:
        os.close(fd)


def lose_lock(store: Store, name: str) -> object:
    """Claim a job, then drop its flock but keep the lease: how a holder on another host
    looks where locks are not shared between machines."""
    hold = store.claim(name)
    assert hold is not None and hold.lease is not None
    os.close(hold.fd)
    hold.fd = -1
    return hold


def test_recovery_leaves_a_live_remote_holder_alone_until_its_lease_expires(
    store: Store,
) -> None:
    (store.root / "queue" / "j").mkdir()
    store.owner = owner("a")
    hold = lose_lock(store, "j")
    other = as_shared(Store(store.root))
    other.owner = owner("b")
    assert other.recover() == []  # the bug of issue 16: a live holder looked dead
    assert os.listdir(store.root / "processing") == ["j"]
    assert (store.root / "processing" / "j" / ".lock").exists()  # its .lock kept too
    age(store.root / "processing" / "j" / LEASE, 61)
    assert other.recover() == ["j"]
    assert not hold.owned()  # type: ignore[attr-defined]
    assert sorted(os.listdir(store.root / "queue" / "j")) == []
    hold.abandon()  # type: ignore[attr-defined]
    assert sorted(os.listdir(store.root / "queue" / "j")) == []


def test_the_renewer_keeps_leases_fresh_and_reports_a_lost_one(job: int, tmp_path: Path) -> None:
    a = lease.acquire(job, owner("a"), 60, clock(tmp_path))
    assert a is not None
    age(tmp_path / "job" / LEASE, 30)
    lost: list[str] = []
    renewer = lease.Renewer(0.05, lost.append)
    renewer.add("j", job, a.held)
    renewer.start()
    try:
        deadline = time.monotonic() + 5
        while time.time() - os.stat(tmp_path / "job" / LEASE).st_mtime > 5:
            assert time.monotonic() < deadline, "never renewed"
            time.sleep(0.01)
        assert lost == []
        os.unlink(tmp_path / "job" / LEASE)  # taken over
        while not lost:
            assert time.monotonic() < deadline, "loss never reported"
            time.sleep(0.01)
        assert lost == ["j"]
    finally:
        renewer.stop()


def test_the_renewer_runs_from_its_start_once_and_never_after_stop() -> None:
    """Started with the processor where leases are made (a local root starts none: see
    test_processor): a thread that cannot be had then stops the service at its start,
    never leaves a claimed job unrenewed."""
    renewer = lease.Renewer(0.05, lambda key: None)
    renewer.start()
    try:
        assert renewer._thread.is_alive()
        renewer.start()  # a second start starts no second thread
    finally:
        renewer.stop()
    assert not renewer._thread.is_alive()
    stopped = lease.Renewer(0.05, lambda key: None)
    stopped.stop()
    stopped.start()
    assert not stopped._thread.is_alive()


def test_watch_mode_says_why_it_polls(tmp_path: Path) -> None:
    assert lease.watch_mode(None, True) == "--force-polling is set"
    assert lease.watch_mode("NFS", False) == (
        "the jobs root is on NFS, where inotify does not see other machines' changes")  # fmt: skip
    assert lease.watch_mode(None, False) is None
    assert isinstance(lease.fs_type(tmp_path), int)
    assert lease.fs_type(tmp_path / "missing") is None


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs of this test's own, to fill up; skipped where mounting is not allowed."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_still_claims_and_renews_by_mtime(small_fs: Path) -> None:
    store = as_shared(Store(small_fs / "root"))
    store.init()
    (small_fs / "root" / "queue" / "j").mkdir()
    fd = os.open(small_fs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    hold = store.claim("j")  # the lease cannot hold its content: it is there, empty
    assert hold is not None and hold.lease is not None and hold.owned()
    path = small_fs / "root" / "processing" / "j" / LEASE
    age(path, 30)
    assert hold.lease.renew(hold.dir_fd)  # its mtime is renewed all the same
    assert time.time() - path.stat().st_mtime < 5
    store.finish(hold, "success")
    assert not (small_fs / "root" / "success" / "j" / LEASE).exists()


CHECK_WITHOUT_DESCRIPTORS = r"""
import os, resource, sys
from batchingest import lease
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
got = lease.acquire(fd, lease.Owner.here("a"), 60, lambda: 0.0)
limit = resource.getrlimit(resource.RLIMIT_NOFILE)


def check():
    keep = len(os.listdir("/proc/self/fd"))  # counts the listing's own descriptor too
    resource.setrlimit(resource.RLIMIT_NOFILE, (keep - 1, limit[1]))
    try:
        print("ours" if got.held.is_ours(fd) else "lost")
    except OSError as e:
        print("raised", e.errno)
    resource.setrlimit(resource.RLIMIT_NOFILE, limit)


check()
os.rename(os.path.join(sys.argv[1], ".lease"), os.path.join(sys.argv[1], "old"))
with open(os.path.join(sys.argv[1], ".lease"), "w") as f:
    f.write("another host's")
check()
"""


def test_no_descriptor_left_still_tells_a_lost_lease(tmp_path: Path) -> None:
    """Out of descriptors, the check stats `.lease` instead of opening it: a job held then
    can still be moved on (and free its descriptors), and a replaced lease is still lost."""
    (tmp_path / "job").mkdir()
    out = subprocess.run([sys.executable, "-c", CHECK_WITHOUT_DESCRIPTORS, str(tmp_path / "job")],
                         capture_output=True, text=True, check=True).stdout.split("\n")  # fmt: skip
    assert out[:2] == ["ours", "lost"]


def test_a_lease_this_process_left_behind_does_not_delay_the_job(store: Store) -> None:
    """A release that could not remove `.lease` (no descriptors left) leaves it in
    queue/: this process knows it holds nothing by it and claims the job at once."""
    (store.root / "queue" / "j").mkdir()
    hold = store.claim("j")
    assert hold is not None and hold.lease is not None
    store.move("j", "processing", "queue")
    hold.lease.close()  # as if its removal had failed
    hold.lease = None
    hold.release()
    assert (store.root / "queue" / "j" / LEASE).exists()
    again = store.claim("j")
    assert again is not None and again.owned()
    store.finish(again, "success")
    assert os.listdir(store.root / "success" / "j") == []


@pytest.mark.parametrize("local", [True, False])
def test_a_replaced_lease_is_lost_whichever_way_it_is_checked(
    job: int, tmp_path: Path, local: bool
) -> None:
    """By lstat (a local root) or by open (a shared one), the same answers."""
    a = lease.acquire(job, owner("a"), 60, clock(tmp_path), local)
    assert a is not None and a.held.local is local
    assert a.held.is_ours(job) and a.held.is_ours(job)
    path = tmp_path / "job" / LEASE
    os.rename(path, tmp_path / "job" / "aside")
    path.write_text("{}")  # another holder's, in its place
    assert not a.held.is_ours(job)
    os.unlink(path)
    os.rename(tmp_path / "job" / "aside", path)
    assert not a.held.is_ours(job)  # once lost, never ours again
    b = lease.acquire(job, owner("b"), 60, clock(tmp_path), local)
    assert b is None  # a's file is back in place and fresh: it holds the job
    os.unlink(path)
    os.symlink(tmp_path / "job" / "elsewhere", path)
    c = Path(tmp_path / "c")
    c.mkdir()
    cfd = os.open(c, os.O_RDONLY | os.O_DIRECTORY)
    try:
        got = lease.acquire(cfd, owner("c"), 60, clock(tmp_path), local)
        assert got is not None
        os.rename(c / LEASE, c / "real")
        os.symlink(c / "real", c / LEASE)  # a link to the very file is not the lease
        assert not got.held.is_ours(cfd)
    finally:
        os.close(cfd)


def test_on_a_local_root_a_held_job_has_no_lease_unless_the_root_is_exported(root: Path) -> None:
    """No other host can see a local file system: the folder's lock alone holds the job,
    and no file is made for it; --shared-root (a local root exported to other machines)
    gives leases all the same."""
    store = Store(root)
    (root / "queue" / "j").mkdir()
    hold = store.claim("j")
    assert hold is not None and hold.lease is None and hold.owned()
    assert os.listdir(root / "processing" / "j") == []
    store.finish(hold, "success")
    store.leases = True
    store.move("j", "success", "queue")
    hold = store.claim("j")
    assert hold is not None and hold.lease is not None and hold.owned()
    assert os.listdir(root / "processing" / "j") == [LEASE]  # and still no .lock
    store.finish(hold, "success")
    assert os.listdir(root / "success" / "j") == []


def test_a_local_root_still_respects_a_live_lease_when_recovering(root: Path) -> None:
    """A lease another host left (a root exported without --shared-root on this side,
    or before it was set) still keeps recovery away while it lives."""
    remote = as_shared(Store(root))
    remote.owner = owner("b")
    (root / "queue" / "j").mkdir()
    hold = lose_lock(remote, "j")
    here = Store(root)
    assert here.recover() == []
    age(root / "processing" / "j" / LEASE, 61)
    assert here.recover() == ["j"]
    hold.abandon()  # type: ignore[attr-defined]


def test_the_root_of_the_tests_is_a_local_file_system(tmp_path: Path) -> None:
    kind = lease.fs_type(tmp_path)
    assert lease.shared_fs(tmp_path) == lease.shared_kind(kind)
    # unknown: treated as shared, by the lease's check and by the choice of inotify
    assert lease.shared_fs(tmp_path / "missing") == "a file system whose type cannot be read"
    store = Store(tmp_path)
    assert store.shared_fs == lease.shared_fs(tmp_path)


@pytest.mark.parametrize("kind", [0xEF53, 0x58465342, 0x9123683E, 0x01021994, 0x2FC12FC1])
def test_the_known_local_file_systems_are_local(kind: int) -> None:
    assert lease.shared_kind(kind) is None


def test_a_file_system_not_known_to_be_local_counts_as_shared() -> None:
    """A shared file system missing from any table (BeeGFS here) must get leases and
    polling, or its machines would not see each other's claims."""
    assert lease.shared_kind(0x6969) == "NFS"
    assert lease.shared_kind(0x5346414F) == "AFS"
    beegfs = lease.shared_kind(0x19830326)
    assert beegfs == "a file system of type 0x19830326, not known to be local"
    assert lease.watch_mode(beegfs, False) is not None
    assert lease.shared_kind(None) == "a file system whose type cannot be read"
