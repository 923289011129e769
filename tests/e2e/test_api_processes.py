"""Several API processes (`--api-processes 2`): the real service, real connections.

Every request here opens a connection of its own, so the kernel spreads them over both
processes; which process answered is read from the access line's pid.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_service import TOKEN, Service, alive, wait_for, write_task
from webhook_receiver import Receiver

from batchingest.config import Config

pytestmark = pytest.mark.e2e

HEADERS = {"X-Api-Token": TOKEN}
ALLOW = {"BATCHINGEST_WEBHOOK_ALLOW": "127.0.0.1"}


def extras(svc: Service) -> list[int]:
    """The pids of the service's extra API processes."""
    assert svc.proc is not None
    pid = svc.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    found = []
    for child in map(int, children):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"batchingest.apiprocs" in cmdline:
            found.append(child)
    return found


def started(svc: Service, count: int = 1) -> list[int]:
    """Wait until `count` extra processes are up and serving; their pids."""
    wait_for(lambda: svc.log().count("Started server process") >= count + 1, 30,
             what="the extra API processes")  # fmt: skip
    return wait_for(lambda: extras(svc) if len(extras(svc)) == count else None, 10,
                    what=f"{count} extra API process(es)")  # fmt: skip


def request(svc: Service, method: str, path: str, **kw: object) -> httpx.Response:
    """One request on a connection of its own."""
    return httpx.request(method, svc.url + path, headers=HEADERS, timeout=30, **kw)  # type: ignore[arg-type]


def pids_of(svc: Service, route: str) -> list[int]:
    """Which processes answered `route`, in order, from the access lines."""
    pattern = re.compile(rf"route={re.escape(route)} .* pid=(\d+)$", re.M)
    return [int(pid) for pid in pattern.findall(svc.log())]


def until_served_by(svc: Service, pid: int, act: Callable[[int], object], tries: int = 20) -> int:
    """Call act(i) until one of its requests was answered by `pid`; the attempts made."""
    for i in range(tries):
        before = svc.log().count(f"pid={pid}")
        act(i)
        time.sleep(0.1)  # access lines are written at the end of the loop's turn
        if svc.log().count(f"pid={pid}") > before:
            return i + 1
    raise AssertionError(f"no request reached process {pid} in {tries} tries")


def test_requests_reach_both_processes_and_readyz_answers_everywhere(root: Path) -> None:
    with Service(root, "--api-processes", "2") as svc:
        extra = started(svc)
        assert svc.proc is not None
        for _ in range(40):
            assert request(svc, "GET", "/jobs/nothing-here").status_code == 404
            assert request(svc, "GET", "/readyz").status_code == 200
        time.sleep(0.2)
        served = set(pids_of(svc, "/jobs/{id}"))
        assert served == {svc.proc.pid, *extra}
        assert set(pids_of(svc, "/readyz")) == {svc.proc.pid, *extra}


def test_a_job_made_through_both_processes_runs_with_webhooks_and_ordered_events(
    root: Path,
) -> None:
    write_task(root / "tasks", "start", "echo started\n")
    names: list[str] = []
    with Receiver() as rx, Service(root, "--api-processes", "2", env=ALLOW) as svc:
        started(svc)
        # the kernel spreads connections over the two processes by a hash, so six jobs
        # all land on one process once in 32 runs: make jobs until both have queued one
        while len(names) < 6 or len(set(pids_of(svc, "/jobs/{id}/queue"))) < 2:
            assert len(names) < 40, "every queue request reached the same process"
            name = f"job-{len(names)}"
            names.append(name)
            assert request(svc, "PUT", f"/jobs/{name}").status_code == 201
            hook = f"http://127.0.0.1:{rx.port}/hook"
            assert request(svc, "PUT", f"/jobs/{name}/files/WEBHOOK", content=hook).is_success
            assert request(svc, "PUT", f"/jobs/{name}/files/data.txt", content=b"x").is_success
            assert request(svc, "POST", f"/jobs/{name}/queue").status_code == 202
            time.sleep(0.05)  # access lines are written at the end of the loop's turn
        rx.wait(3 * len(names), timeout=30)
        time.sleep(0.2)
        queued_by = set(pids_of(svc, "/jobs/{id}/queue"))
        histories = {n: request(svc, "GET", f"/jobs/{n}/events").json()["DATA"] for n in names}
        feed = request(svc, "GET", "/events?limit=1000").json()["DATA"]
    assert len(queued_by) == 2  # both processes queued jobs
    for name in names:
        assert (root / "success" / name).is_dir()
        states = [
            (e["job_state"], e["previous_state"]) for e in rx.events() if e["job_name"] == name
        ]
        assert states == [("queue", "ready"), ("processing", "queue"), ("success", "processing")]
        codes = [e["code"] for e in histories[name]]
        job_codes = [c for c in codes if not c.startswith("WEBHOOK_")]
        assert job_codes == ["CREATED", "FILE_UPLOADED", "FILE_UPLOADED", "QUEUED", "CLAIMED",
                             "TASK_STARTED", "TASK_SUCCEEDED", "SUCCEEDED"]  # fmt: skip
        delivered = [e["details"]["state"] for e in histories[name] if e["code"].startswith("WEB")]
        assert delivered == ["queue", "processing", "success"]
        assert histories[name][3]["details"] == {"by": "api", "from": "ready"}
        # the feed, written by both processes, holds the same events in the same order
        # (a delivery's event, written by another thread, may pass a task's in the feed)
        in_feed = [e["code"] for e in feed if e["job"] == name]
        assert [c for c in in_feed if not c.startswith("WEBHOOK_")] == job_codes
        assert sorted(in_feed) == sorted(codes)


def test_cancel_through_an_extra_process_stops_the_task_at_once(root: Path) -> None:
    write_task(root / "tasks", "start", "exec sleep 60\n")
    with Service(root, "--api-processes", "2") as svc:
        (extra,) = started(svc)
        took: list[float] = []

        def cancel_one(i: int) -> None:
            name = f"sleeper-{i}"
            assert request(svc, "PUT", f"/jobs/{name}").status_code == 201
            assert request(svc, "POST", f"/jobs/{name}/queue").status_code == 202
            wait_for(lambda: (root / "processing" / name / "LOG").exists(), 20,
                     what=f"{name} to run")  # fmt: skip
            t0 = time.monotonic()
            answer = request(svc, "POST", f"/jobs/{name}/cancel")
            assert answer.status_code == 202, answer.text
            wait_for(lambda: (root / "error" / name).is_dir(), 60, what=f"{name} canceled")
            took.append(time.monotonic() - t0)
            finished = json.loads((root / "error" / name / "JOB").read_text())["Finished"]
            assert finished[-1]["Status"] == "canceled"

        until_served_by(svc, extra, cancel_one)
    # stopped by its SIGTERM at once (woken through the main process, or at the watcher's
    # next look 50 ms later), not by the SIGKILL after the grace, nor by its own end
    assert min(took) < Config(root=root).cancel_grace


def test_an_extra_process_killed_is_started_again(root: Path) -> None:
    with Service(root, "--api-processes", "2") as svc:
        (first,) = started(svc)
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: "ended unexpectedly" in svc.log(), 10, what="the main process to see it")
        (second,) = started(svc, 1)
        assert second != first
        wait_for(lambda: svc.log().count("Started server process") >= 3, 20, what="a new one")
        for _ in range(20):
            assert request(svc, "GET", "/healthz").status_code == 200
        assert svc.proc is not None and svc.proc.poll() is None


def test_sigterm_stops_every_process_with_exit_status_0(root: Path) -> None:
    svc = Service(root, "--api-processes", "3").start()
    try:
        pids = started(svc, 2)
    finally:
        code = svc.stop()
    assert code == 0
    assert not any(alive(pid) for pid in pids)
    assert "stopped unexpectedly" not in svc.log()


def test_kill_9_of_the_main_process_takes_the_extras_with_it(root: Path) -> None:
    svc = Service(root, "--api-processes", "2").start()
    try:
        (extra,) = started(svc)
        svc.kill()
        wait_for(lambda: not alive(extra), 10, what="the extra process to go")
    finally:
        svc.stop()


def test_metrics_add_up_every_process_whichever_answers(root: Path) -> None:
    with Service(root, "--api-processes", "2") as svc:
        started(svc)
        for _ in range(30):
            assert request(svc, "GET", "/jobs/nothing-here").status_code == 404
        counted = re.compile(r'^batchingest_http_requests_total\{method="GET",'
                             r'route="/jobs/\{id\}",status="404"\} (\S+)$', re.M)  # fmt: skip
        for _ in range(12):
            text = request(svc, "GET", "/metrics").text
            assert [float(v) for v in counted.findall(text)] == [30.0]
            assert "batchingest_jobs{" in text  # the gauges read from disk are there too
        time.sleep(0.2)
        assert len(pids_of(svc, "/jobs/{id}")) == 30
    # the counters' folder goes with the service
    assert not [p for p in Path("/dev/shm").glob(f"batchingest-control-{svc.proc.pid}-*")]  # type: ignore[union-attr]


def stream_events(svc: Service, count: int, ready: threading.Event) -> list[dict[str, Any]]:
    """The first `count` events of a live stream on a connection of its own."""
    got: list[dict[str, Any]] = []
    hdrs = {**HEADERS, "Accept": "text/event-stream"}
    with (
        httpx.Client(base_url=svc.url, timeout=30) as c,
        c.stream("GET", "/events", headers=hdrs) as r,
    ):
        assert r.status_code == 200
        ready.set()
        for line in r.iter_lines():
            if line.startswith("data: "):
                got.append(json.loads(line[6:]))
                if len(got) == count:
                    break
    return got


def test_live_streams_on_every_process_see_each_others_events(root: Path) -> None:
    write_task(root / "tasks", "start", "true\n")
    with Service(root, "--api-processes", "2") as svc:
        started(svc)
        streams: list[list[dict[str, Any]]] = [[] for _ in range(6)]
        readers = []
        for got in streams:
            ready = threading.Event()
            reader = threading.Thread(target=lambda got=got, ready=ready: got.extend(
                stream_events(svc, 6, ready)))  # fmt: skip
            reader.start()
            assert ready.wait(30)
            readers.append(reader)
        assert request(svc, "PUT", "/jobs/streamed").status_code == 201
        assert request(svc, "POST", "/jobs/streamed/queue").status_code == 202
        for reader in readers:
            reader.join(30)
    # (six streams: on both processes but for a 1 in 32 chance; the events come from both)
    for got in streams:
        assert [e["code"] for e in got] == ["CREATED", "QUEUED", "CLAIMED", "TASK_STARTED",
                                            "TASK_SUCCEEDED", "SUCCEEDED"]  # fmt: skip


def test_moves_refused_in_the_main_process_are_refused_in_the_extra_one(root: Path) -> None:
    with Service(root, "--api-processes", "2", "--no-processor") as svc:
        (extra,) = started(svc)
        assert request(svc, "PUT", "/jobs/twice").status_code == 201
        answers: list[int] = []

        def queue_again(i: int) -> None:
            answers.append(request(svc, "POST", "/jobs/twice/queue").status_code)
            assert request(svc, "POST", f"/jobs/none-{i}/queue").status_code == 404

        until_served_by(svc, extra, queue_again)
        queue_again(99)
        # queued once (202), then found in queue/ already (200) whichever process asked
        assert answers[0] == 202 and set(answers[1:]) == {200}
        assert (root / "queue" / "twice").is_dir()
        cancel = request(svc, "POST", "/jobs/twice/cancel")  # queued: back to data/ at once
        assert cancel.status_code == 202 and cancel.json()["Status"] == "ready"
        assert (root / "data" / "twice").is_dir()


def test_a_port_taken_stops_the_start_and_one_process_logs_as_before(root: Path) -> None:
    with Service(root, "--api-processes", "2") as first:
        started(first)
        second = Service(root.parent / "other", "--api-processes", "2", port=first.port)
        second.start(wait=False)
        assert second.proc is not None
        assert second.proc.wait(30) == 2
        assert "cannot listen on" in second.log()
        second.stop()
    with Service(root) as single:
        assert request(single, "GET", "/jobs/nothing-here").status_code == 404
        time.sleep(0.2)
        line = next(x for x in single.log().splitlines() if "route=/jobs/{id}" in x)
        assert "pid=" not in line
        assert extras(single) == []
