"""Staccato v1 (/v1/transfers) against the real service, over raw HTTP.

Transfers are jobs run by the built-in transfer task. The service copies at most 40 MB/s
per transfer (--transfer-max-rate), so a transfer of a few dozen MiB is still running
when a test cancels it or kills the service.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_service import Service, task_pids

pytestmark = pytest.mark.e2e

RATE = 40 << 20
UNSEEN = "UNSEEN-5eed"


class Place:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.data, self.ro, self.outside = tmp / "data", tmp / "archive", tmp / "outside"
        for folder in (self.data, self.ro, self.outside, tmp / "staging"):
            folder.mkdir()
        (self.outside / "secret").write_text(UNSEEN)
        os.symlink(self.outside, self.data / "out")
        (self.ro / "kept").write_bytes(b"k" * 100)
        self.service = Service(
            tmp / "root", "--endpoint", f"data={self.data}", "--archive", str(self.ro),
            "--staging", str(tmp / "staging"), "--workers", "1",
            "--transfer-max-rate", str(RATE),
        )  # fmt: skip

    def url(self, path: Path) -> str:
        return f"file://{path}"

    def client(self) -> httpx.Client:
        return self.service.client()


@pytest.fixture(scope="module")
def place(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Place]:
    p = Place(tmp_path_factory.mktemp("staccato"))
    p.service.start()
    try:
        yield p
    finally:
        p.service.stop()
    assert "Traceback" not in p.service.log()


def wait_state(c: httpx.Client, tid: str, states: tuple[str, ...], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = c.get(f"/v1/transfers/{tid}").json()
        if doc["state"] in states:
            return dict(doc)
        time.sleep(0.05)
    raise AssertionError(f"{tid} never reached {states}: {doc}")


def post(c: httpx.Client, **body: Any) -> httpx.Response:
    return c.post("/v1/transfers", json=body)


def test_ranges_build_one_file(place: Place) -> None:
    source = place.data / "whole.bin"
    source.write_bytes(os.urandom(5 << 20))
    target = place.data / "new" / "deep" / "built.bin"  # folders created as needed
    c = place.client()
    made = []
    for start, end in ((0, 1 << 20), (1 << 20, 3 << 20), (3 << 20, 99 << 20)):
        r = post(c, source_url=place.url(source), destination_url=place.url(target),
                 start_offset=start, end_offset=end, source_options={"a": 1})  # fmt: skip
        assert r.status_code == 201, r.text
        doc = r.json()
        assert set(doc) == {"id", "source_url", "destination_url", "state", "progress",
                            "start_offset", "end_offset", "source_options",
                            "destination_options"}  # fmt: skip
        assert doc["state"] in ("STATE_NEW", "STATE_RUNNING") and doc["source_options"] == {"a": 1}
        assert r.headers["Location"] == f"/v1/transfers/{doc['id']}"
        made.append(doc["id"])
    for tid in made:
        done = wait_state(c, tid, ("STATE_COMPLETE", "STATE_ERROR"))
        assert done["state"] == "STATE_COMPLETE", done
    assert target.read_bytes() == source.read_bytes()
    assert [wait_state(c, t, ("STATE_COMPLETE",))["progress"] for t in made] == [
        1 << 20, 2 << 20, 2 << 20,
    ]  # fmt: skip
    # bytes outside the range are left as they were
    patch = place.data / "patch.bin"
    patch.write_bytes(b"." * 1000)
    r = post(c, source_url=place.url(source), destination_url=place.url(patch),
             start_offset=100, end_offset=200)  # fmt: skip
    wait_state(c, r.json()["id"], ("STATE_COMPLETE",))
    assert patch.read_bytes() == b"." * 100 + source.read_bytes()[100:200] + b"." * 800
    # the job behind it
    assert c.get(f"/jobs/{made[0]}").json()["Status"] == "success"


def test_bad_requests(place: Place) -> None:
    c = place.client()
    src = place.data / "small.txt"
    src.write_bytes(b"0123456789")
    good = {"source_url": place.url(src), "destination_url": place.url(place.data / "d.txt")}
    for change in (
        {"start_offset": -2}, {"end_offset": -5}, {"start_offset": "1"},
        {"start_offset": -1}, {"end_offset": True},
        {"source_url": "http://example.org/x"}, {"source_url": "s3://bucket/x"},
        {"source_url": "not a url"}, {"source_url": 5}, {"destination_url": None},
        {"source_url": "file://otherhost" + str(src)}, {"source_url": "file:relative/x"},
        {"source_url": place.url(src) + "%00"}, {"source_options": [1]},
        {"destination_url": place.url(place.data / "small.txt" / "x")},
    ):  # fmt: skip
        r = post(c, **{**good, **change})
        assert r.status_code == 400, (change, r.text)
        assert set(r.json()) >= {"code", "message", "request_id", "resource"}
    for change in (
        {"source_url": place.url(place.outside / "secret")},
        {"source_url": f"file://{place.data}/../outside/secret"},
        {"source_url": f"file://{place.data}/out/secret"},
        {"source_url": f"file://{place.data}/%2e%2e/outside/secret"},
        {"destination_url": place.url(place.outside / "written")},
        {"destination_url": f"file://{place.data}/out/written"},
        {"destination_url": place.url(place.ro / "kept")},
        {"source_url": "file:///etc/passwd"},
    ):
        r = post(c, **{**good, **change})
        assert r.status_code == 403, (change, r.text)
        assert UNSEEN not in r.text
    assert post(c, **{**good, "source_url": place.url(place.data / "nope")}).status_code == 404
    # well-formed, but not a range of this source
    for change in ({"start_offset": 11}, {"start_offset": 5, "end_offset": 3}):
        r = post(c, **{**good, **change})
        assert (r.status_code, r.json()["code"]) == (416, "RangeNotSatisfiable"), r.text
    assert c.post("/v1/transfers", content=b"{").status_code == 400
    assert c.get("/v1/transfers/" + "0" * 8).status_code == 404
    assert c.get("/v1/transfers/4b86e181-8c83-447e-aada-af9232af7da0").status_code == 404
    assert sorted(os.listdir(place.outside)) == ["secret"]
    assert (place.ro / "kept").read_bytes() == b"k" * 100
    # within range, end beyond the file: to the end
    r = post(c, **good, start_offset=4, end_offset=10_000)
    assert r.status_code == 201
    wait_state(c, r.json()["id"], ("STATE_COMPLETE",))
    assert (place.data / "d.txt").read_bytes() == b"\0" * 4 + b"456789"


def test_list_delete_and_illegal_transitions(place: Place) -> None:
    c = place.client()
    src = place.data / "list.bin"
    src.write_bytes(b"l" * 1000)
    big = place.data / "slow.bin"
    big.write_bytes(os.urandom(80 << 20))
    slow = post(c, source_url=place.url(big), destination_url=place.url(place.data / "s.out"))
    slow_id = slow.json()["id"]
    made = [post(c, source_url=place.url(src), destination_url=place.url(place.data / f"l{i}"))
            .json()["id"] for i in range(5)]  # fmt: skip
    # one worker, busy with the slow one: these wait, NEW
    waiting = c.get(f"/v1/transfers/{made[0]}").json()
    assert waiting["state"] == "STATE_NEW"
    r = c.delete(f"/v1/transfers/{made[0]}")
    assert r.status_code == 400 and "delete" in r.text and "STATE_NEW" in r.text
    wait_state(c, slow_id, ("STATE_RUNNING",))
    while c.get(f"/v1/transfers/{slow_id}").json()["progress"] == 0:
        time.sleep(0.05)
    r = c.delete(f"/v1/transfers/{slow_id}")
    assert r.status_code == 400 and "STATE_RUNNING" in r.text
    r = c.post(f"/v1/transfers/{slow_id}/action", json={"xferaction": "pause"})
    assert r.status_code == 400
    # cancel while running: 202, CANCELING, then CANCELED; progress kept
    r = c.post(f"/v1/transfers/{slow_id}/action", json={"xferaction": "cancel"})
    assert r.status_code == 202 and r.json()["state"] in ("STATE_CANCELING", "STATE_CANCELED")
    canceled = wait_state(c, slow_id, ("STATE_CANCELED",))
    assert 0 < canceled["progress"] < 80 << 20
    r = c.post(f"/v1/transfers/{slow_id}/action", json={"xferaction": "cancel"})
    assert r.status_code == 400 and "cancel" in r.text and "STATE_CANCELED" in r.text
    for tid in made:
        wait_state(c, tid, ("STATE_COMPLETE",))
    r = c.post(f"/v1/transfers/{made[1]}/action", json={"xferaction": "cancel"})
    assert r.status_code == 400 and "STATE_COMPLETE" in r.text
    # paging: next is the last id of the previous page, with a Link header while more
    seen: list[str] = []
    url = "/v1/transfers?limit=2"
    while url:
        r = c.get(url)
        assert r.status_code == 200
        page = r.json()
        assert isinstance(page, list) and len(page) <= 2
        seen += [d["id"] for d in page]
        link = r.headers.get("Link")
        url = link[1 : link.index(">")] if link else ""
    assert {*made, slow_id} <= set(seen) and len(seen) == len(set(seen))
    assert seen.index(made[0]) < seen.index(made[4])  # creation order
    assert c.delete(f"/v1/transfers/{made[2]}").status_code == 204
    assert c.get(f"/v1/transfers/{made[2]}").json()["state"] == "STATE_DELETED"
    assert made[2] not in [d["id"] for d in c.get("/v1/transfers?limit=1000").json()]
    assert c.delete(f"/v1/transfers/{made[2]}").status_code == 400
    assert c.delete(f"/v1/transfers/{slow_id}").status_code == 204  # canceled: deletable
    assert c.get("/v1/transfers?limit=0").status_code == 400
    assert c.get("/v1/transfers?next=nope").status_code == 400
    # a queued one canceled goes back to data/, CANCELED
    later = [post(c, source_url=place.url(big), destination_url=place.url(place.data / f"q{i}"))
             .json()["id"] for i in range(2)]  # fmt: skip
    r = c.post(f"/v1/transfers/{later[1]}/action", json={"xferaction": "cancel"})
    assert r.status_code == 202
    assert wait_state(c, later[1], ("STATE_CANCELED",))["progress"] == 0
    assert c.get(f"/jobs/{later[1]}").json()["Status"] == "ready"
    c.post(f"/v1/transfers/{later[0]}/action", json={"xferaction": "cancel"})
    wait_state(c, later[0], ("STATE_CANCELED",))


def test_progress_survives_kill_9(tmp_path: Path) -> None:
    place = Place(tmp_path)
    source = place.data / "big.bin"
    source.write_bytes(os.urandom(96 << 20))
    target = place.data / "copy.bin"
    place.service.start()
    try:
        c = place.client()
        tid = post(c, source_url=place.url(source), destination_url=place.url(target)).json()["id"]
        seen = [0]
        while seen[-1] < 32 << 20:
            doc = c.get(f"/v1/transfers/{tid}").json()
            seen.append(doc["progress"])
            time.sleep(0.05)
        place.service.kill()
        for pid in task_pids(place.tmp / "root"):
            os.kill(pid, signal.SIGKILL)  # the task too: nothing finishes behind our back
        time.sleep(0.2)
        place.service.start()
        c = place.client()
        while True:
            doc = c.get(f"/v1/transfers/{tid}").json()
            seen.append(doc["progress"])
            if doc["state"] in ("STATE_COMPLETE", "STATE_ERROR"):
                break
            time.sleep(0.05)
        assert doc["state"] == "STATE_COMPLETE", doc
        assert seen == sorted(seen), "progress went back"
        assert seen[-1] == 96 << 20
        assert target.read_bytes() == source.read_bytes()
        log = c.get(f"/jobs/{tid}/files/LOG").text
        assert "resuming at offset" in log
    finally:
        place.service.stop()
