"""The JDP staging dialect, driven by a client that behaves as the DTS's JDP adapter.

`JdpClient` sends exactly what the DTS's `databases/jdp/database.go` sends (the
`Token <ORCID>_<secret>` header, the JSON body with its extra fields, integer request
ids, no credentials on status polls) and reads answers as that code does: an integer
`request_id` or a decoding error, and only the words new/pending/ready.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_service import TOKEN, Service, wait_for, write_task

from e2e.test_staging import Setup, dead, kill_task_groups, stall_stage, task_processes

SECRET = "dts-shared-secret-42"
ORCID = "0000-0002-1825-0097"
ORCID2 = "0000-0001-5109-3700"
JDP_WORDS = ("new", "pending", "ready")


class NotFound(Exception):
    pass


class StatusError(Exception):
    """The DTS logs these and polls again."""


class JdpClient:
    def __init__(self, base: str, orcid: str = ORCID, secret: str = SECRET) -> None:
        self.base = base
        self.auth = f"Token {orcid}_{secret}"

    def stage_files(self, ids: list[str]) -> int:
        body = {"ids": ids, "send_email": False, "api_version": "2", "include_private_data": 1}
        r = httpx.post(
            f"{self.base}/request_archived_files/",
            content=json.dumps(body),
            headers={"Authorization": self.auth, "Content-Type": "application/json"},
            timeout=None,  # the DTS sets no timeout
        )
        if r.status_code == 404:
            raise NotFound(ids)
        if r.status_code == 503:
            raise RuntimeError("unavailable")
        if r.status_code not in (200, 201, 204):
            raise RuntimeError(f"error {r.status_code}: {r.text}")
        request_id = r.json()["request_id"]
        # Go decodes into an int field: a string or a float fails
        if type(request_id) is not int:
            raise TypeError(f"request_id is not an integer: {request_id!r}")
        return request_id

    def staging_status(self, request_id: int) -> str:
        # no Authorization header: the DTS sends none on this call
        r = httpx.get(f"{self.base}/request_archived_files/requests/{request_id}", timeout=None)
        if r.status_code != 200:
            raise StatusError(f"{r.status_code}: {r.text}")
        word = r.json()["status"]
        if word not in JDP_WORDS:
            raise StatusError(f"unknown status {word!r}")
        return str(word)

    def wait_ready(self, request_id: int, timeout: float = 60) -> list[str]:
        seen: list[str] = []

        def ready() -> bool:
            word = self.staging_status(request_id)
            if not seen or seen[-1] != word:
                seen.append(word)
            return word == "ready"

        wait_for(ready, timeout=timeout, interval=0.02, what=f"request {request_id} ready")
        return seen


def args(setup: Setup, *more: str) -> tuple[str, ...]:
    return setup.args("--dts-dialect", "jdp", *more)


def env() -> dict[str, str]:
    return {"BATCHINGEST_DTS_SECRET": SECRET}


def manifest(root: Path, name: str) -> dict[str, Any]:
    found = [p for p in root.glob(f"*/{name}/MANIFEST.json")]
    assert len(found) == 1, found
    return dict(json.loads(found[0].read_bytes()))


def numbers(root: Path) -> list[str]:
    folder = root / ".jdp-requests"
    return sorted(os.listdir(folder)) if folder.exists() else []


def job_of(root: Path, number: int) -> str:
    return (root / ".jdp-requests" / str(number)).read_text().strip()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Any:
    setup = Setup(tmp_path_factory.mktemp("jdp"))
    with Service(setup.root, *args(setup), env=env()) as svc:
        yield setup, svc


def test_whole_staging_new_pending_ready_with_files_in_place(shared: Any) -> None:
    setup, svc = shared
    data = {f"p1/f{i}.fastq": os.urandom(50_000 + i) for i in range(5)}
    for rel, content in data.items():
        setup.add(rel, content)
    client = JdpClient(svc.url)
    number = client.stage_files(list(data))
    seen = client.wait_ready(number)
    # the words only ever move forward
    assert [JDP_WORDS.index(w) for w in seen] == sorted(JDP_WORDS.index(w) for w in seen)
    for rel, content in data.items():
        assert (setup.staging / rel).read_bytes() == content
    # the extra body fields and the requester are kept in the manifest
    request = manifest(setup.root, job_of(setup.root, number))["request"]
    assert request["requester"] == ORCID
    # and in the job's history: the CREATED event names who asked
    history = httpx.get(f"{svc.url}/jobs/{job_of(setup.root, number)}/events",
                        headers={"X-Api-Token": TOKEN}).json()["DATA"]  # fmt: skip
    created = [e for e in history if e["code"] == "CREATED"]
    assert created and created[0]["details"]["requester"] == ORCID
    assert request["body"] == {"send_email": False, "api_version": "2", "include_private_data": 1}


def test_numbers_increase_and_two_orcids_share_the_secret(shared: Any) -> None:
    setup, svc = shared
    setup.add("p2/a.txt", b"a")
    first = JdpClient(svc.url, ORCID).stage_files(["p2/a.txt"])
    second = JdpClient(svc.url, ORCID2).stage_files(["p2/a.txt"])
    assert second > first > 0
    assert manifest(setup.root, job_of(setup.root, second))["request"]["requester"] == ORCID2
    assert JdpClient(svc.url).wait_ready(second)[-1] == "ready"


def test_unknown_and_mixed_ids_are_not_found_and_create_nothing(shared: Any) -> None:
    setup, svc = shared
    setup.add("p3/real.txt", b"real")
    before = numbers(setup.root)
    jobs_before = setup.jobs()
    client = JdpClient(svc.url)
    for ids in (["p3/missing.txt"], ["p3/real.txt", "p3/missing.txt"]):
        with pytest.raises(NotFound):
            client.stage_files(ids)
    assert numbers(setup.root) == before
    assert setup.jobs() == jobs_before


def test_credentials(shared: Any) -> None:
    setup, svc = shared
    setup.add("p4/x.txt", b"x")
    with pytest.raises(RuntimeError, match="401"):
        JdpClient(svc.url, secret="wrong").stage_files(["p4/x.txt"])
    r = httpx.post(f"{svc.url}/request_archived_files/", json={"ids": ["p4/x.txt"]})
    assert r.status_code == 401 and r.json()["code"] == "Unauthorized"
    # the DTS credential opens the staging routes only, never the rest of the API
    dts = {"Authorization": f"Token {ORCID}_{SECRET}"}
    assert httpx.get(f"{svc.url}/jobs", headers=dts).status_code == 401
    assert (
        httpx.post(f"{svc.url}/dts/staging", json={"ids": ["p4/x.txt"]}, headers=dts).status_code
        == 201
    )
    # an API token works on the JDP route too
    r = httpx.post(
        f"{svc.url}/request_archived_files/",
        json={"ids": ["p4/x.txt"]},
        headers={"X-Api-Token": TOKEN},
    )
    assert r.status_code == 201 and type(r.json()["request_id"]) is int


def test_status_of_unknown_or_malformed_numbers(shared: Any) -> None:
    _, svc = shared
    for raw, code in (("999999", 404), ("abc", 400), ("-1", 400), ("9" * 40, 400)):
        r = httpx.get(f"{svc.url}/request_archived_files/requests/{raw}")
        assert r.status_code == code, (raw, r.text)
        assert r.json()["code"] in ("StagingRequestNotFound", "InvalidRequestId")


def test_new_until_claimed_failed_with_message(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.add("p5/keep.txt", b"keep")
    setup.add("p5/gone.txt", b"gone")
    api = Service(setup.root, *args(setup, "--no-processor"), env=env()).start()
    try:
        client = JdpClient(api.url)
        ok = client.stage_files(["p5/keep.txt"])
        bad = client.stage_files(["p5/gone.txt"])
        assert client.staging_status(ok) == "new" and client.staging_status(bad) == "new"
        (setup.archive / "p5" / "gone.txt").unlink()
        with Service(setup.root, *args(setup), env=env(), api=False):
            assert client.wait_ready(ok)[-1] == "ready"

            def failed() -> dict[str, Any] | None:
                r = httpx.get(f"{api.url}/request_archived_files/requests/{bad}")
                assert r.status_code == 200
                return r.json() if r.json()["status"] == "failed" else None

            doc = wait_for(failed, timeout=30, what="failed")
        assert "p5/gone.txt" in doc["message"]
        with pytest.raises(StatusError, match="failed"):
            client.staging_status(bad)  # the DTS logs it and polls on
    finally:
        api.stop()


def test_restart_mid_copy_then_ready_and_numbers_not_reused(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    rels = [f"big/f{i}.bin" for i in range(4)]
    for rel in rels:
        setup.add(rel, os.urandom(32 << 20))
    stalled = stall_stage(setup)
    svc = Service(setup.root, *args(setup, "--stage-parallel", "1"), env=env()).start()
    client = JdpClient(svc.url)
    try:
        number = client.stage_files(rels)
        wait_for(stalled.exists, timeout=120, what="the copy to hang after its first piece")
        assert setup.in_flight() or setup.temps(), "a copy in flight"
        rid = job_of(setup.root, number)
        tasks = task_processes(rid)
        svc.kill()
        assert kill_task_groups(tasks), "the stage task was still copying"
        wait_for(lambda: all(dead(p) for p in tasks), what="the task gone")
    finally:
        svc.stop()
    (setup.root / "tasks" / "stage").unlink()  # the built-in stage task from now on
    with Service(setup.root, *args(setup), env=env(), port=svc.port) as again:
        client = JdpClient(again.url)
        assert client.wait_ready(number, timeout=120)[-1] == "ready"
        for rel in rels:
            assert (setup.staging / rel).read_bytes() == (setup.archive / rel).read_bytes()
        setup.add("after.txt", b"after")
        assert client.stage_files(["after.txt"]) == number + 1


def test_without_the_dialect_the_routes_do_not_exist(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    with Service(setup.root, *setup.args()) as svc, svc.client() as c:
        assert c.post("/request_archived_files/", json={"ids": ["a"]}).status_code == 404
        # no token, no dialect: the status route is not public
        assert httpx.get(f"{svc.url}/request_archived_files/requests/1").status_code == 401


def test_pending_while_the_stage_task_runs(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.add("p6/a.txt", b"a" * 1000)
    # a site stage task that holds the job in processing/ for a while, then stages
    write_task(
        setup.root / "tasks",
        "stage",
        f"sleep 1.5\nexec {sys.executable} -m batchingest.tasks.stage\n",
    )
    with Service(setup.root, *args(setup), env=env()) as svc:
        client = JdpClient(svc.url)
        number = client.stage_files(["p6/a.txt"])
        seen = client.wait_ready(number)
    assert seen[-2:] == ["pending", "ready"] and set(seen) <= set(JDP_WORDS)
    assert (setup.staging / "p6/a.txt").read_bytes() == b"a" * 1000
