"""GET /metrics and the JSON service log of the real service, with real jobs and tasks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
from live_service import TOKEN, Service, make_job, wait_for, write_task
from prometheus_client.parser import text_string_to_metric_families
from webhook_receiver import Receiver

from batchingest.api.auth import token_label

pytestmark = pytest.mark.e2e


def value(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def drop(root: Path, name: str, job: str | None = None) -> None:
    os.rename(make_job(root, name, job), root / "queue" / name)


def landed(root: Path, names: list[str]) -> bool:
    return all((root / "success" / n).is_dir() or (root / "error" / n).is_dir() for n in names)


def test_metrics_and_json_log_of_a_working_service(root: Path) -> None:
    write_task(root / "tasks", "start", "echo fine\n")
    write_task(root / "tasks", "bad", "echo failing >&2; exit 3\n")
    with Service(root, "--log-format", "json") as svc:
        drop(root, "ok-1")
        drop(root, "fails-1", '{"Todo": ["bad"]}')
        drop(root, "typo-1", '{"Todo": ["no-such-task-xyz"]}')
        names = ["ok-1", "fails-1", "typo-1"]
        wait_for(lambda: landed(root, names), what="the three jobs to finish")
        payload = os.urandom(1000)
        with svc.client() as c:
            assert c.put("/jobs/api-1").status_code == 201
            put = c.put("/jobs/api-1/files/data.bin", content=payload)
            assert put.status_code == 201, put.text
            assert c.get("/jobs/api-1/files/data.bin").content == payload
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.get(f"{svc.url}/metrics").status_code == 401
        reply = httpx.get(f"{svc.url}/metrics", headers=bearer)
        assert reply.status_code == 200
        text = reply.text
        log = svc.log()

    finished = "batchingest_jobs_finished_total"
    assert value(text, finished, result="success") == 1
    assert value(text, finished, result="error") == 2
    assert value(text, "batchingest_jobs", state="success") == 1
    assert value(text, "batchingest_jobs", state="error") == 2
    assert value(text, "batchingest_jobs", state="data") == 1
    assert value(text, "batchingest_jobs", state="queue") == 0
    failures = "batchingest_task_failures_total"
    assert value(text, failures, task="bad", reason="exit") == 1
    assert value(text, failures, task="(unknown)", reason="unknown-task") == 1
    assert "no-such-task-xyz" not in text  # a JOB's words never become a label
    assert value(text, "batchingest_task_duration_seconds_count", task="start") == 1
    assert value(text, "batchingest_pickup_latency_seconds_count") == 3
    assert 0 <= value(text, "batchingest_pickup_latency_seconds_sum") < 30
    assert value(text, "batchingest_workers_busy") == 0
    assert value(text, "batchingest_uploaded_bytes_total") == 1000
    assert value(text, "batchingest_downloaded_bytes_total") == 1000
    files = "/jobs/{id}/files/{path:path}"
    http = "batchingest_http_requests_total"
    assert value(text, http, method="PUT", route=files, status="201") == 1
    assert value(text, http, method="GET", route=files, status="200") == 1
    assert value(text, http, method="GET", route="(unmatched)", status="401") == 1

    # the service log: one JSON object a line, every line
    records = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert records and all(r["time"].endswith("Z") for r in records)
    (error_line,) = [r for r in records if "fails-1 finished: error" in r["message"]]
    assert error_line["message"].endswith(": exit status 3")
    assert error_line["job"] == "fails-1"
    (typo_line,) = [r for r in records if "typo-1 finished: error" in r["message"]]
    assert typo_line["message"].endswith(": unknown task no-such-task-xyz")
    assert all(r.get("job") == "ok-1" for r in records if "ok-1" in r["message"])
    access = [r for r in records if r["logger"] == "batchingest.access"]
    (upload,) = [r for r in access if r["method"] == "PUT" and r["route"] == files]
    assert upload["request_id"] == put.headers["x-request-id"]
    assert upload["status"] == 201 and upload["token"] == token_label(TOKEN.encode())
    (download,) = [r for r in access if r["method"] == "GET" and r["route"] == files]
    assert download["bytes"] == 1000
    assert TOKEN not in log


def test_webhook_deliveries_are_counted_and_logged_with_their_job(root: Path) -> None:
    write_task(root / "tasks", "start", "echo fine\n")
    env = {"BATCHINGEST_WEBHOOK_ALLOW": "127.0.0.1", "BATCHINGEST_WEBHOOK_BACKOFF": "0.05"}
    # the first POST gets a 500 and is retried; every other one is accepted
    with Receiver([500]) as rx, Service(root, "--log-format", "json", env=env) as svc:
        os.rename(make_job(root, "hooked", None, {"WEBHOOK": f"{rx.url}/h"}),
                  root / "queue" / "hooked")  # fmt: skip
        rx.wait(3)  # queue, processing, success
        wait_for(lambda: not list((root / ".outbox").glob("*.json")), 10, what="outbox to empty")
        text = httpx.get(f"{svc.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
        log = svc.log()
    deliveries = "batchingest_webhook_deliveries_total"
    assert value(text, deliveries, outcome="delivered") == 3
    assert value(text, deliveries, outcome="retried") == 1
    assert value(text, deliveries, outcome="failed") == 0
    assert value(text, "batchingest_webhook_outbox_events", queue="pending") == 0
    records = [json.loads(line) for line in log.splitlines() if line.strip()]
    about = [r for r in records if r["logger"] == "batchingest.webhooks"]
    assert about and all(r.get("job") == "hooked" for r in about), about


def test_bytes_staged_and_transferred_are_counted_once(tmp_path: Path) -> None:
    archive, staging, data = tmp_path / "archive", tmp_path / "staging", tmp_path / "data"
    for folder in (archive, staging, data):
        folder.mkdir()
    (archive / "a.bin").write_bytes(os.urandom(100_000))
    (data / "whole.bin").write_bytes(os.urandom(5000))
    args = ("--archive", str(archive), "--staging", str(staging), "--endpoint", f"data={data}")
    bearer = {"Authorization": f"Bearer {TOKEN}"}

    def scrape(svc: Service) -> tuple[float, float]:
        text = httpx.get(f"{svc.url}/metrics", headers=bearer).text
        return (value(text, "batchingest_staged_bytes_total"),
                value(text, "batchingest_transferred_bytes_total"))  # fmt: skip

    def stage(c: httpx.Client) -> None:
        rid = c.post("/dts/staging", json={"ids": ["a.bin"]}).json()["request_id"]
        wait_for(lambda: c.get("/dts/staging", params={"id": rid}).json()["status"] == "ready",
                 what="staging to be ready")  # fmt: skip

    with Service(tmp_path / "root", *args) as svc, svc.client() as c:
        assert scrape(svc) == (0, 0)
        stage(c)
        assert scrape(svc) == (100_000, 0)
        stage(c)  # the file is staged already: nothing is copied
        assert scrape(svc) == (100_000, 0)
        assert c.post("/dts/staging", json={"ids": ["../a.bin"]}).status_code == 400
        for _ in range(2):
            r = c.post("/dts/staging", json={"ids": ["a.bin"]}, headers={"Idempotency-Key": "k1"})
            assert r.status_code in (200, 201), r.text
        text = httpx.get(f"{svc.url}/metrics", headers=bearer).text
        requests = "batchingest_staging_requests_total"
        assert [value(text, requests, status=s) for s in ("accepted", "replayed", "rejected")] == [
            3,
            1,
            1,
        ]
        r = c.post("/v1/transfers", json={
            "source_url": f"file://{data / 'whole.bin'}", "destination_url":
            f"file://{data / 'part.bin'}", "start_offset": 1000, "end_offset": 4000,
        })  # fmt: skip
        assert r.status_code == 201, r.text
        tid = r.json()["id"]
        wait_for(lambda: c.get(f"/v1/transfers/{tid}").json()["state"] == "STATE_COMPLETE",
                 what="the transfer to complete")  # fmt: skip
        assert scrape(svc) == (100_000, 3000)
