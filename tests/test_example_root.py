"""The example jobs root's task scripts, run directly through the task interface."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parent.parent / "jobs_root_example"
STATES = ("data", "queue", "processing", "success", "error")


@pytest.fixture
def ex(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(EXAMPLE, root, symlinks=True)
    return root


def run_task(root: Path, job: Path, task: str) -> tuple[int, str, list[str]]:
    """Run one task as the processor does; return (exit status, output, JOBCONTROL lines)."""
    control = job.parent / f".control-{job.name}-{task}"
    control.write_text("")
    env = dict(os.environ, JOBPATH=str(job), JOBNAME=job.name, JOBCONTROL=str(control))
    proc = subprocess.run(
        [str(root / "tasks" / task)],
        cwd=job,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=30,
    )
    lines = control.read_text().splitlines()
    control.unlink()
    return proc.returncode, proc.stdout, lines


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout_is_a_ready_root() -> None:
    for state in STATES:
        assert (EXAMPLE / state / ".gitkeep").is_file()
    for task in ("start", "checksum", "check-required", "verify-checksums"):
        path = EXAMPLE / "tasks" / task
        assert os.access(path, os.X_OK), f"{task} is not executable"
        assert path.read_text().startswith(("#!/bin/sh\n", "#!/usr/bin/env python3\n"))
    for job in ("example-ok", "example-fails"):
        assert (EXAMPLE / "data" / job / "README.txt").read_text().startswith(job)
    # example-ok shows the default task list: no JOB file at all
    assert not (EXAMPLE / "data" / "example-ok" / "JOB").exists()


def test_start_on_example_ok_adds_all_checks(ex: Path) -> None:
    rc, out, control = run_task(ex, ex / "data" / "example-ok", "start")
    assert rc == 0, out
    assert control == ["addtask:check-required", "addtask:verify-checksums", "addtask:checksum"]
    assert "adding task check-required" in out


def test_start_on_example_fails_skips_verify(ex: Path) -> None:
    rc, out, control = run_task(ex, ex / "data" / "example-fails", "start")
    assert rc == 0, out
    assert control == ["addtask:check-required", "addtask:checksum"]


def test_start_on_bare_job_only_checksums(ex: Path) -> None:
    job = ex / "data" / "bare"
    job.mkdir()
    (job / "a.bin").write_bytes(b"x")
    rc, out, control = run_task(ex, job, "start")
    assert (rc, control) == (0, ["addtask:checksum"]), out


def test_checksum_manifest_is_correct(ex: Path) -> None:
    job = ex / "data" / "example-ok"
    # files the manifest must leave out: the service's own and hidden ones
    (job / "JOB").write_text('{"Todo": ["checksum"]}')
    (job / "LOG").write_text("log line\n")
    (job / ".lock").write_text("")
    (job / ".work").mkdir()
    (job / ".work" / "tmp").write_text("wip")
    rc, out, _ = run_task(ex, job, "checksum")
    assert rc == 0, out
    lines = (job / "SHA256SUMS").read_text().splitlines()
    listed = {}
    for line in lines:
        digest, name = line.split("  ", 1)
        listed[name] = digest
    expected = {
        "README.txt",
        "REQUIRED",
        "manifest-sha256.txt",
        "metadata.csv",
        "pages/page-001.txt",
        "pages/page-002.txt",
    }
    assert set(listed) == expected
    assert [n for n in listed] == sorted(expected)
    for name, digest in listed.items():
        assert digest == sha256(job / name), name
    assert not [p for p in job.iterdir() if p.name.startswith(".SHA256SUMS")]
    # the manifest is what `sha256sum -c` understands
    if shutil.which("sha256sum"):
        check = subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=job)
        assert check.returncode == 0


def test_checksum_rerun_replaces_manifest_and_escapes_odd_names(ex: Path) -> None:
    job = ex / "data" / "odd"
    job.mkdir()
    (job / "back\\slash").write_bytes(b"1")
    (job / "with space").write_bytes(b"2")
    (job / "SHA256SUMS").write_text("stale\n")
    rc, out, _ = run_task(ex, job, "checksum")
    assert rc == 0, out
    text = (job / "SHA256SUMS").read_text()
    assert "stale" not in text
    odd = sha256(job / "back\\slash")
    assert "\\" + odd + "  back\\\\slash\n" in text
    assert f"{sha256(job / 'with space')}  with space\n" in text
    if shutil.which("sha256sum"):
        assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=job).returncode == 0


def test_checksum_does_not_follow_symlinks_out_of_the_job(ex: Path, tmp_path: Path) -> None:
    secret = tmp_path / "outside.txt"
    secret.write_text("not part of the job")
    job = ex / "data" / "linked"
    job.mkdir()
    (job / "real.txt").write_text("in the job")
    (job / "link.txt").symlink_to(secret)
    rc, out, _ = run_task(ex, job, "checksum")
    assert rc == 0, out
    assert (job / "SHA256SUMS").read_text().splitlines() == [
        f"{sha256(job / 'real.txt')}  real.txt"
    ]
    assert "skipping symbolic link link.txt" in out


def test_check_required_passes_on_example_ok(ex: Path) -> None:
    rc, out, control = run_task(ex, ex / "data" / "example-ok", "check-required")
    assert (rc, control) == (0, []), out
    assert "all 3 required files present" in out


def test_check_required_fails_readably_on_example_fails(ex: Path) -> None:
    rc, out, _ = run_task(ex, ex / "data" / "example-fails", "check-required")
    assert rc == 1
    assert "missing: page-002.txt" in out
    assert "FAILED: job example-fails lacks required files: page-002.txt(missing)" in out
    # the files that are there are not blamed
    assert "metadata.csv(" not in out


def test_check_required_names_empty_outside_and_crlf(ex: Path) -> None:
    job = ex / "data" / "mixed"
    job.mkdir()
    (job / "empty.txt").write_bytes(b"")
    (job / "ok.txt").write_bytes(b"x")
    (job / "sub").mkdir()
    (job / "REQUIRED").write_bytes(b"ok.txt\r\n\r\n  empty.txt \r\nsub\r\n../../etc/passwd\r\n")
    rc, out, _ = run_task(ex, job, "check-required")
    assert rc == 1, out
    assert "empty.txt(empty)" in out
    assert "sub(not-a-file)" in out
    assert "../../etc/passwd(outside)" in out
    assert "ok.txt(" not in out


def test_check_required_without_required_file_fails(ex: Path) -> None:
    job = ex / "data" / "none"
    job.mkdir()
    rc, out, _ = run_task(ex, job, "check-required")
    assert rc == 1
    assert "has no REQUIRED file" in out


def test_verify_checksums(ex: Path) -> None:
    job = ex / "data" / "example-ok"
    rc, out, _ = run_task(ex, job, "verify-checksums")
    assert rc == 0, out
    assert "all 3 files match" in out
    (job / "pages" / "page-002.txt").write_text("tampered\n")
    (job / "metadata.csv").unlink()
    rc, out, _ = run_task(ex, job, "verify-checksums")
    assert rc == 1
    assert "pages/page-002.txt(checksum)" in out
    assert "metadata.csv(missing)" in out
    assert "pages/page-001.txt: OK" in out


def test_verify_checksums_rejects_malformed_and_outside_lines(ex: Path) -> None:
    job = ex / "data" / "bad-manifest"
    job.mkdir()
    (job / "a").write_text("a")
    (job / "manifest-sha256.txt").write_text(
        f"{sha256(job / 'a')} *a\nnot a line\n{'0' * 64}  ../x\n"
    )
    rc, out, _ = run_task(ex, job, "verify-checksums")
    assert rc == 1, out
    assert "a: OK" in out
    assert "line 2(malformed)" in out
    assert "../x(outside)" in out
