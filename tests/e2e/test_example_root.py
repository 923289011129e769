"""The shipped example jobs root, run by the real service."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from live_service import Service, wait_for

EXAMPLE = Path(__file__).parent.parent.parent / "jobs_root_example"

pytestmark = pytest.mark.e2e


def test_example_jobs_succeed_and_fail_as_documented(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(EXAMPLE, root, symlinks=True)
    with Service(root, "--tasks", str(root / "tasks"), api=False) as svc:
        for name in ("example-ok", "example-fails"):
            os.rename(root / "data" / name, root / "queue" / name)
        ok = root / "success" / "example-ok"
        failed = root / "error" / "example-fails"
        wait_for(lambda: ok.is_dir() and failed.is_dir(), timeout=30, what="both examples done")
        service_log = svc.log()

    # example-ok ran start and the three checks it added, and now carries a manifest
    job = json.loads((ok / "JOB").read_text())
    assert job["Todo"] == []
    done = [(t["Name"], t["Status"]) for t in job["Finished"]]
    assert done == [
        ("start", "ok"),
        ("check-required", "ok"),
        ("verify-checksums", "ok"),
        ("checksum", "ok"),
    ]
    sums = (ok / "SHA256SUMS").read_text()
    assert "  pages/page-002.txt\n" in sums
    assert "  JOB\n" not in sums and "  LOG\n" not in sums
    check = subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=ok)
    assert check.returncode == 0
    assert "all 3 required files present" in (ok / "LOG").read_text()

    # example-fails stops at check-required with a line naming the missing file
    log = (failed / "LOG").read_text()
    assert "FAILED: job example-fails lacks required files: page-002.txt(missing)" in log
    job = json.loads((failed / "JOB").read_text())
    assert job["Todo"] == ["check-required", "checksum"]
    assert [(t["Name"], t["Status"]) for t in job["Finished"]] == [
        ("start", "ok"),
        ("check-required", "error"),
    ]
    assert not (failed / "SHA256SUMS").exists()
    assert "example-ok" in service_log and "example-fails" in service_log


def test_example_fails_resumes_after_fix(tmp_path: Path) -> None:
    """The fix described in example-fails/README.txt works."""
    root = tmp_path / "root"
    shutil.copytree(EXAMPLE, root, symlinks=True)
    with Service(root, "--tasks", str(root / "tasks"), api=False):
        os.rename(root / "data" / "example-fails", root / "queue" / "example-fails")
        failed = root / "error" / "example-fails"
        wait_for(failed.is_dir, timeout=30, what="example-fails in error/")
        (failed / "page-002.txt").write_text("Page two.\n")
        os.rename(failed, root / "queue" / "example-fails")
        done = root / "success" / "example-fails"
        wait_for(done.is_dir, timeout=30, what="example-fails in success/")
    names = [t["Name"] for t in json.loads((done / "JOB").read_text())["Finished"]]
    # start is not run again: the job resumed at the task that failed
    assert names == ["start", "check-required", "check-required", "checksum"]
    assert "  page-002.txt\n" in (done / "SHA256SUMS").read_text()
