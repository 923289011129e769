"""GET /jobs/{id} answered by the service's HTTP protocol (api.app.QuickJobInfo) against
the same request answered by the app, on the real service over raw sockets: the same
status, headers and body, the same access line and metrics."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from live_service import TOKEN, Service, wait_for
from prometheus_client.parser import text_string_to_metric_families

from batchingest.api.auth import token_label

pytestmark = pytest.mark.e2e


def ask(svc: Service, method: str, path: str, *headers: str, by_app: bool = False) -> bytes:
    """One request on its own connection, its whole answer. by_app: with an empty chunked
    body, which the protocol leaves to the app (a request with a body is the app's)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: x", "Connection: close", *headers]
    if by_app:
        lines.append("Transfer-Encoding: chunked")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"0\r\n\r\n" if by_app else b"")
    with socket.create_connection(("127.0.0.1", svc.port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def without_date(answer: bytes) -> bytes:
    return b"\r\n".join(x for x in answer.split(b"\r\n") if not x.startswith(b"date: "))


def count(metrics: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics):
        for s in family.samples:
            if s.name == "batchingest_http_requests_total" and s.labels == labels:
                return float(s.value)
    return 0.0


def test_job_info_at_once_is_what_the_app_answers(root: Path) -> None:
    with Service(root, "--no-processor", "--log-format", "json") as svc:
        with svc.client() as client:
            assert client.put("/jobs/j").status_code == 201
        (root / "data" / "j" / "JOB").write_text('{"Todo": ["b"], "Finished": []}')
        token = f"X-Api-Token: {TOKEN}"
        cases = [
            ("GET", "/jobs/j", token),
            ("GET", "/jobs/j?fields=any", token),
            ("HEAD", "/jobs/j", token),
            ("GET", "/jobs/nothere", token),
            ("HEAD", "/jobs/nothere", token),
            ("GET", "/jobs/j", "X-Api-Token: wrong"),  # the app's 401, both ways
            ("GET", "/jobs/.j", token),  # the app's 400, both ways
        ]
        for i, (method, path, auth) in enumerate(cases):
            rid = f"X-Request-Id: case-{i}"
            quick = ask(svc, method, path, auth, rid)
            by_app = ask(svc, method, path, auth, rid, by_app=True)
            assert without_date(quick) == without_date(by_app), (method, path)
            assert quick.startswith(b"HTTP/1.1 ")
        found = ask(svc, "GET", "/jobs/j", token)
        assert json.loads(found.partition(b"\r\n\r\n")[2])["Todo"] == ["b"]
        with svc.client() as client:
            metrics = client.get("/metrics").text
        # each case twice, counted under the route's template (or none: 400, 401)
        assert count(metrics, method="GET", route="/jobs/{id}", status="200") == 5
        assert count(metrics, method="HEAD", route="/jobs/{id}", status="200") == 2
        assert count(metrics, method="GET", route="/jobs/{id}", status="404") == 2
        assert count(metrics, method="GET", route="(unmatched)", status="401") == 2

        def access_lines() -> list[dict[str, object]]:
            records = [json.loads(x) for x in svc.log().splitlines() if x.startswith("{")]
            return [r for r in records if r["logger"] == "batchingest.access"]

        wait_for(lambda: len(access_lines()) >= 2 * len(cases) + 3, what="access lines")
        lines = {}
        for r in access_lines():
            lines.setdefault(r["request_id"], []).append(r)
        label = token_label(TOKEN.encode())
        for i, (method, _path, auth) in enumerate(cases):
            quick_line, app_line = lines[f"case-{i}"]
            different = {k for k in quick_line if quick_line[k] != app_line[k]}
            assert different <= {"time", "duration_ms"}, (i, quick_line, app_line)
            assert quick_line["method"] == method
            assert quick_line["token"] == (label if auth == token else "-")
