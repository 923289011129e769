"""A client generated from /openapi.json works unedited against the live service.

openapi-python-client generates a package from the document the service serves
(fetched without a token, as `generate --url` does), with no warning; the test imports
that package and runs a whole job through it, typed: create, upload with a
Content-Digest, queue, status until done, download, delete; then a Staccato transfer
until complete, and the history of the job behind it.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_service import TOKEN, Service, write_task

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PACKAGE = "batchingest_client"


def generate(url: str, out: Path) -> str:
    """Generate the client package into out; the generator's output, for its warnings."""
    spec = out.parent / "openapi.json"
    spec.write_bytes(httpx.get(url + "/openapi.json", timeout=10).content)  # no token
    bin_dir = Path(sys.executable).parent
    run = subprocess.run(
        [str(bin_dir / "openapi-python-client"), "generate", "--path", str(spec),
         "--output-path", str(out), "--meta", "none"],
        capture_output=True,
        text=True,
        timeout=300,
        # its post-generation hooks run ruff, found on PATH
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"},
    )  # fmt: skip
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    return output


@pytest.fixture
def client_package(tmp_path: Path) -> Iterator[Path]:
    """A folder to generate into, importable as PACKAGE while the test runs."""
    folder = tmp_path / "gen"
    folder.mkdir()
    sys.path.insert(0, str(folder))
    try:
        yield folder / PACKAGE
    finally:
        sys.path.remove(str(folder))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def api(name: str) -> Any:
    return importlib.import_module(f"{PACKAGE}.api.{name}")


def test_generated_client_runs_a_job(root: Path, client_package: Path) -> None:
    write_task(root / "tasks", "shout", "tr a-z A-Z < in.txt > out.txt\n")
    folder = root.parent / "endpoint"
    folder.mkdir()
    (folder / "source.bin").write_bytes(bytes(range(256)) * 64)
    with Service(root, f"--endpoint=data={folder}") as svc:
        output = generate(svc.url, client_package)
        assert "warning" not in output.lower(), output
        assert "error" not in output.lower(), output
        gen = importlib.import_module(PACKAGE)
        models = importlib.import_module(f"{PACKAGE}.models")
        types = importlib.import_module(f"{PACKAGE}.types")
        client = gen.AuthenticatedClient(base_url=svc.url, token=TOKEN)

        created = api("jobs.put_job").sync_detailed("shouting", client=client)
        assert created.status_code == 201
        assert isinstance(created.parsed, models.JobInfo)
        assert created.parsed.status == models.JobInfoStatus.READY

        fill(client, models, types)
        queued = api("jobs.queue_job").sync_detailed("shouting", client=client)
        assert queued.status_code == 202 and isinstance(queued.parsed, models.JobInfo)

        deadline = time.monotonic() + 60
        info = api("jobs.get_job").sync("shouting", client=client)
        while info.status != models.JobInfoStatus.SUCCESS:
            assert info.status != models.JobInfoStatus.ERROR, info
            assert time.monotonic() < deadline, info
            time.sleep(0.1)
            info = api("jobs.get_job").sync("shouting", client=client)
        assert info.todo == [] and len(info.finished) == 1

        listed = api("jobs.get_jobs").sync(client=client, status="success")
        assert [(j.name, j.status) for j in listed] == [("shouting", models.JobStatus.SUCCESS)]
        got = api("files.get_file").sync_detailed("shouting", "out.txt", client=client)
        assert got.status_code == 200 and got.content == b"HELLO, WORLD\n"
        again = api("files.get_file").sync_detailed(
            "shouting", "out.txt", client=client, if_none_match=got.headers["etag"]
        )
        assert again.status_code == 304

        gone = api("jobs.delete_job").sync_detailed("shouting", client=client)
        assert gone.status_code == 204
        missing = api("jobs.get_job").sync_detailed("shouting", client=client)
        assert missing.status_code == 404 and isinstance(missing.parsed, models.Error)
        assert missing.parsed.code == models.ErrorCode.JOBNOTFOUND
        transfer_and_read_its_history(client, models, folder)


def fill(client: Any, models: Any, types: Any) -> None:
    """JOB and in.txt uploaded with their Content-Digest; a wrong digest refused, typed."""

    def upload(path: str, data: bytes) -> Any:
        digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
        return api("files.put_file").sync_detailed(
            "shouting",
            path,
            client=client,
            body=types.File(payload=data),
            content_digest=f"sha-256=:{digest}:",
        )

    for path, data in [("JOB", b'{"Todo": ["shout"]}'), ("in.txt", b"hello, world\n")]:
        reply = upload(path, data)
        assert reply.status_code == 201, reply.content
        assert isinstance(reply.parsed, models.Uploaded)
        assert reply.parsed.sha256 == hashlib.sha256(data).hexdigest()
    bad = api("files.put_file").sync_detailed(
        "shouting", "x.txt", client=client, body=types.File(payload=b"x"),
        content_digest="sha-256=:" + base64.b64encode(b"\0" * 32).decode() + ":",
    )  # fmt: skip
    assert bad.status_code == 400 and isinstance(bad.parsed, models.Error)
    assert bad.parsed.code == models.ErrorCode.DIGESTMISMATCH


def transfer_and_read_its_history(client: Any, models: Any, folder: Path) -> None:
    """A Staccato transfer made, followed and found in the history, all typed."""
    asked = models.TransferRequest(
        source_url=f"file://{folder}/source.bin",
        destination_url=f"file://{folder}/copy.bin",
        start_offset=256,
        end_offset=1024,
    )
    made = api("staccato.create_transfer").sync_detailed(client=client, body=asked)
    assert made.status_code == 201 and isinstance(made.parsed, models.Transfer), made.content
    deadline = time.monotonic() + 60
    doc = made.parsed
    while doc.state != models.TransferState.STATE_COMPLETE:
        assert doc.state not in (models.TransferState.STATE_ERROR,), doc
        assert time.monotonic() < deadline, doc
        time.sleep(0.1)
        doc = api("staccato.get_transfer").sync(doc.id, client=client)
    assert doc.progress == 768
    source, copy = (folder / "source.bin").read_bytes(), (folder / "copy.bin").read_bytes()
    assert copy[256:1024] == source[256:1024]
    history = api("events.get_job_events").sync(doc.id, client=client, limit=100)
    assert isinstance(history, models.JobEventList) and history.total == len(history.data)
    codes = [e.code for e in history.data]
    assert codes[0] == "QUEUED" and codes[-1] == "SUCCEEDED", codes
    outside = models.TransferRequest(
        source_url="file:///etc/passwd", destination_url=asked.destination_url
    )
    refused = api("staccato.create_transfer").sync_detailed(client=client, body=outside)
    assert refused.status_code == 403 and isinstance(refused.parsed, models.Error)
    assert refused.parsed.code == models.ErrorCode.OUTSIDEENDPOINTS
