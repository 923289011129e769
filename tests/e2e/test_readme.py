"""The README's first blocks, pasted as one block each, against the real service.

A newcomer copies these into a shell while `scripts/serve` runs; they must work as
pasted, in one go, and say what their comments promise.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
from live_service import Service, wait_for

REPO = Path(__file__).parent.parent.parent
README = (REPO / "README.md").read_text()


def block(containing: str) -> str:
    """The README's sh block holding `containing`."""
    for found in re.findall(r"```sh\n(.*?)```", README, re.S):
        if containing in found:
            return str(found)
    raise AssertionError(f"no sh block in README.md with {containing!r}")


def paste(script: str, cwd: Path, port: int) -> subprocess.CompletedProcess[str]:
    script = script.replace("localhost:15000", f"localhost:{port}")
    return subprocess.run(["bash", "-e", "-c", script], cwd=cwd, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_quick_start_as_one_block_then_again(tmp_path: Path) -> None:
    root = tmp_path / "jobs_root_example"
    shutil.copytree(REPO / "jobs_root_example", root, symlinks=True)
    script = block('T="X-Api-Token:')
    # no token configured, as with scripts/serve: the service keeps one in .api-token
    with Service(root, env={"BATCHINGEST_TOKENS": ""}) as svc:
        first = paste(script, tmp_path, svc.port)
        assert first.returncode == 0, first.stderr
        outputs = first.stdout.splitlines()
        assert '"Status":"success"' in outputs[-2] or any(
            '"Name":"hello","Status":"success"' in line for line in outputs
        ), first.stdout
        assert "---- task start: ok" in first.stdout  # the LOG, printed last
        # every JSON answer ends in a newline: one answer a line
        assert first.stdout.startswith("[") and '"example-ok"' in outputs[0]
        again = paste(script, tmp_path, svc.port)
        assert again.returncode == 0, again.stderr
        assert "nothing to run: every task in JOB is finished" in again.stdout


def test_hand_drop_block_as_pasted_and_names_stay_unique(tmp_path: Path) -> None:
    root = tmp_path / "jobs_root_example"
    shutil.copytree(REPO / "jobs_root_example", root, symlinks=True)
    script = block("cp -r data/$j queue/")
    with Service(root, "--tasks", str(root / "tasks"), env={"BATCHINGEST_TOKENS": ""}) as svc:
        pasted = paste(script, tmp_path, svc.port)
        assert pasted.returncode == 0, pasted.stderr
        assert "check-required: FAILED" in pasted.stdout
        assert '"Name": "checksum"' in pasted.stdout or '"checksum"' in pasted.stdout
        wait_for(lambda: (root / "success" / "try-example-fails").is_dir(), 30,
                 what="the mended example to succeed")  # fmt: skip
        token = (root / ".api-token").read_text().strip()
        jobs = httpx.get(f"{svc.url}/jobs", headers={"X-Api-Token": token}).json()
    names = [j["Name"] for j in jobs]
    assert len(names) == len(set(names)), names
    # the examples in data/ are untouched, ready for the next try
    assert (root / "data" / "example-ok").is_dir() and (root / "data" / "example-fails").is_dir()
