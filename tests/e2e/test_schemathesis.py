"""Schemathesis against the live service: the spec says what the server really does.

A bounded, deterministic run (every check, stateful phase included) against the real
service with staging and two endpoints configured, over every operation in the
document: jobs, files, staging, the Globus and Staccato transfer APIs, job history,
metrics and the service's own. Zero failures or the test fails, with Schemathesis's
report in the message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from live_service import TOKEN, Service

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# 416 answers a valid-looking Range beyond the end of the file: no schema can know the
# file's size, so a valid request may get it. 501 and 502 are the Globus API's documented
# answers (a feature not served; a file operation that failed on the endpoint, e.g. a
# mkdir of a folder that exists), not server faults. Staccato answers a transition its
# state does not allow (deleting a running transfer) with 400 IllegalTransition, as
# Staccato does. Endpoints, paths and URLs are mostly ones that exist, so that transfers
# and tasks are made and the operations on them (reached through the spec's links) find
# them.
CONFIG = """
[dictionaries.endpoints]
values = ["src", "dst"]
[dictionaries.paths]
values = ["/d/a.txt", "/d/", "/d/copy.txt", "/new/"]
[dictionaries.urls]
values = ["file://{src}/d/a.txt", "file://{dst}/d/copy.txt", "file://{dst}/d/new.txt"]

[parameters]
"path.endpoint" = "src"
"body.source_endpoint" = {{ dictionary = "endpoints", probability = 0.8 }}
"body.destination_endpoint" = {{ dictionary = "endpoints", probability = 0.8 }}
"body.endpoint" = {{ dictionary = "endpoints", probability = 0.8 }}
"body.DATA[*].source_path" = {{ dictionary = "paths", probability = 0.8 }}
"body.DATA[*].destination_path" = {{ dictionary = "paths", probability = 0.8 }}
"body.DATA[*].path" = {{ dictionary = "paths", probability = 0.8 }}
"body.source_url" = {{ dictionary = "urls", probability = 0.8 }}
"body.destination_url" = {{ dictionary = "urls", probability = 0.8 }}

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "416", "429", "5xx"]

[checks.not_a_server_error]
expected-statuses = ["2xx", "3xx", "4xx", "501", "502"]

[[operations]]
include-path-regex = "^/v1/transfers/"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "404"]
"""
EXAMPLES = 25  # per operation and phase: about a minute for 71 operations on 2 cores


@pytest.mark.timeout(600)  # about a minute alone; more beside the rest of the suite
def test_schemathesis_finds_nothing(tmp_path: Path) -> None:
    archive, staging = tmp_path / "archive", tmp_path / "staging"
    (archive / "d").mkdir(parents=True)
    (archive / "d" / "a.txt").write_bytes(b"hello\n")
    staging.mkdir()
    for name in ("src", "dst"):
        (tmp_path / name / "d").mkdir(parents=True)
    (tmp_path / "src" / "d" / "a.txt").write_bytes(b"hello\n")
    config = CONFIG.format(src=tmp_path / "src", dst=tmp_path / "dst")
    (tmp_path / "schemathesis.toml").write_text(config)
    endpoints = [f"--endpoint={name}={tmp_path / name}" for name in ("src", "dst")]
    args = ("--archive", str(archive), "--staging", str(staging), *endpoints)
    with Service(tmp_path / "root", *args) as svc:
        # readable without a token, as a generator or a fuzzer fetches it
        spec = httpx.get(svc.url + "/openapi.json", timeout=10).json()
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        cmd = [
            str(Path(sys.executable).with_name("schemathesis")),
            "--config-file", str(tmp_path / "schemathesis.toml"),
            "--no-color",
            "run", str(tmp_path / "spec.json"),
            "--url", svc.url,
            "--header", f"X-Api-Token: {TOKEN}",
            "--checks", "all",
            "--phases", "examples,coverage,fuzzing,stateful",
            "--max-examples", str(EXAMPLES),
            "--generation-deterministic",
            "--workers", "1",  # hypothesis's AST parsing is not thread-safe on 3.11
            "--request-timeout", "20",
            "--report-dir", str(tmp_path / "report"),
        ]  # fmt: skip
        run = subprocess.run(
            cmd,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=540,
            env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
        )
        log = svc.log()
    print(run.stdout[-3000:])  # the summary (requests generated, time), with pytest -s
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    assert "0 failures" in run.stdout or "passed" in run.stdout, run.stdout[-5000:]
    assert " failed" not in run.stdout.split("SUMMARY")[-1], run.stdout[-5000:]
    assert "Traceback" not in log
