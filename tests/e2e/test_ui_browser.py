"""The dashboard in a real headless browser against the real service.

Chromium is Debian's (/usr/bin/chromium, or BATCHINGEST_CHROMIUM), driven by Playwright;
Playwright's own browser download is never used. Without the browser or the Python
package these tests skip and say why (scripts/test installs both where it can).

Screenshots go to each test's tmp_path; with BATCHINGEST_UI_SCREENSHOTS=DIR they are
also copied there (the README's pictures are made that way: see scripts/test).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_service import TOKEN, Service, make_job, wait_for, write_task

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("BATCHINGEST_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT = 30_000  # ms: the machine is shared, pages poll every 1-3 s


def _why_no_browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install -e '.[test]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set BATCHINGEST_CHROMIUM)"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One Chromium per module with a fresh profile; each test gets its own tab, and so
    its own sessionStorage."""
    why = _why_no_browser()
    if why:
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=ARGS,
            viewport={"width": 1280, "height": 900},
            accept_downloads=True,
        )
        context.set_default_timeout(WAIT)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    tab = browser.new_page()
    try:
        yield tab
    finally:
        tab.close()


def screenshot(page: Any, tmp_path: Path, name: str, full_page: bool = True) -> Path:
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=full_page)
    assert shot.stat().st_size > 1000
    keep = os.environ.get("BATCHINGEST_UI_SCREENSHOTS")
    if keep:
        shutil.copyfile(shot, Path(keep) / name)
    return shot


def log_in(page: Any, svc: Service, then: str = "/ui") -> None:
    page.goto(svc.url + then)
    page.wait_for_url("**/ui/login?next=*")
    page.fill("#token", TOKEN)
    page.click("#login-form button[type=submit]")
    page.wait_for_url(svc.url + then)


def queue_job(
    root: Path, name: str, job: str | None = None, files: dict[str, str] | None = None
) -> None:
    os.rename(make_job(root / "queue", name, job, files), root / "queue" / name)


def text_is(page: Any, selector: str, expected: str, timeout: float = 30) -> None:
    wait_for(
        lambda: page.inner_text(selector).strip() == expected,
        timeout=timeout,
        interval=0.2,
        what=f"{selector} to read {expected!r} (it reads {page.inner_text(selector)!r})",
    )


def log_has(page: Any, text: str) -> None:
    wait_for(lambda: text in page.inner_text("#log"), interval=0.2, what=f"{text!r} in the LOG")


def answer_dialog(page: Any, yes: bool) -> None:
    page.wait_for_selector("dialog#confirm[open]")
    page.click("#confirm-yes" if yes else "dialog#confirm button[value=no]")
    page.wait_for_selector("dialog#confirm", state="hidden")


# -- logging in --------------------------------------------------------------------------


def test_wrong_token_is_refused_and_kept_nowhere(
    root: Path, page: Any, browser: Any, tmp_path: Path
) -> None:
    with Service(root, "--no-processor") as svc:
        page.goto(svc.url + "/ui/jobs")
        page.wait_for_url("**/ui/login?next=%2Fui%2Fjobs")
        page.fill("#token", "not-the-token")
        page.click("#login-form button[type=submit]")
        page.wait_for_selector("#login-error:not([hidden])")
        assert "not valid" in page.inner_text("#login-error")
        assert page.evaluate("sessionStorage.length") == 0
        screenshot(page, tmp_path, "ui-login.png")
        # the right one then works, and goes where the operator was going
        page.fill("#token", TOKEN)
        page.click("#login-form button[type=submit]")
        page.wait_for_url(svc.url + "/ui/jobs")
        assert page.evaluate("sessionStorage.getItem('batchingest.token')") == TOKEN
        assert browser.cookies() == []
        assert TOKEN not in page.url
        # logging out forgets it, and the pages send us back to log in
        page.click("#logout")
        page.wait_for_url("**/ui/login")
        assert page.evaluate("sessionStorage.length") == 0
        page.goto(svc.url + "/ui")
        page.wait_for_url("**/ui/login?next=%2Fui")


def test_login_next_goes_nowhere_else(root: Path, page: Any) -> None:
    with Service(root, "--no-processor") as svc:
        page.goto(svc.url + "/ui/login?next=//example.org/x")
        page.fill("#token", TOKEN)
        page.click("#login-form button[type=submit]")
        page.wait_for_url(svc.url + "/ui")


# -- overview ------------------------------------------------------------------------------


def test_counts_move_as_jobs_run(root: Path, page: Any, tmp_path: Path) -> None:
    write_task(root / "tasks", "start", 'sleep 0.5; echo "done with $JOBNAME"\n')
    write_task(root / "tasks", "fail", "echo 'nothing to check'; exit 3\n")
    with Service(root, "--workers", "2") as svc:
        log_in(page, svc)
        text_is(page, "#count-success", "0")
        for i in range(6):
            queue_job(root, f"batch-{i:03d}")
        queue_job(root, "broken-1", '{"Todo": ["start", "fail"]}')
        wait_for(
            lambda: (
                int(page.inner_text("#count-queue")) + int(page.inner_text("#count-processing")) > 0
            ),
            interval=0.1,
            what="the queued jobs to show",
        )
        text_is(page, "#count-success", "6")
        text_is(page, "#count-error", "1")
        text_is(page, "#count-queue", "0")
        text_is(page, "#hour-finished", "7")
        assert "broken-1" in page.inner_text("#recent-errors")
        (root / "data" / "assembling").mkdir()
        text_is(page, "#count-ready", "1")
        screenshot(page, tmp_path, "ui-overview.png")


def test_requeue_all_failed(root: Path, page: Any, tmp_path: Path) -> None:
    # fails until the operator has fixed what it needs (a file beside the task)
    write_task(root / "tasks", "start", '[ -e "$(dirname "$0")/fixed" ] || exit 1\n')
    with Service(root) as svc:
        for i in range(3):
            queue_job(root, f"needs-fix-{i}")
        log_in(page, svc)
        text_is(page, "#count-error", "3")
        (root / "tasks" / "fixed").touch()
        page.click("#requeue-failed")
        assert "Move all 3 failed jobs" in page.inner_text("#confirm-text")
        answer_dialog(page, yes=False)  # thought better of it: nothing moves
        time.sleep(0.5)
        assert len(os.listdir(root / "error")) == 3
        page.click("#requeue-failed")
        answer_dialog(page, yes=True)
        text_is(page, "#requeue-result", "3 requeued")
        text_is(page, "#count-success", "3")
        text_is(page, "#count-error", "0")
        assert sorted(os.listdir(root / "success")) == [f"needs-fix-{i}" for i in range(3)]


# -- one job -------------------------------------------------------------------------------


def test_follow_log_live(root: Path, page: Any, tmp_path: Path) -> None:
    write_task(
        root / "tasks",
        "start",
        'i=0; while [ ! -e "$JOBPATH/stop" ]; do i=$((i+1)); echo "tick $i"; sleep 0.2; done\n'
        'echo addtask:checksum >> "$JOBCONTROL"\n',
    )
    write_task(root / "tasks", "checksum", "sha256sum data.txt > SHA256SUMS\n")
    with Service(root) as svc:
        queue_job(root, "live-1", files={"data.txt": "some data\n", "sub/more.txt": "x\n"})
        log_in(page, svc, "/ui/jobs/live-1")
        text_is(page, "#job-status", "processing")
        log_has(page, "tick 3")
        log_has(page, "tick 12")  # still growing, without reloading the page
        assert page.inner_text("#timeline .running .task-name") == "start"
        (root / "processing" / "live-1" / "stop").touch()
        text_is(page, "#job-status", "success")
        log_has(page, "task checksum: ok")
        assert [t.inner_text() for t in page.query_selector_all("#timeline .task-name")] == [
            "start",
            "checksum",
        ]
        page.wait_for_selector("#files >> text=SHA256SUMS")
        # a download goes through the API with the token, and is the file's bytes
        with page.expect_download() as info:
            page.click("#files tr:has-text('data.txt') button:has-text('Download')")
        saved = tmp_path / "download.txt"
        info.value.save_as(saved)
        assert saved.read_text() == "some data\n"
        page.click("#files button:has-text('sub/')")
        page.wait_for_selector("#files >> text=more.txt")
        assert "/sub" in page.inner_text("#files-path")
        page.click("#files button:has-text('↑ ..')")
        page.wait_for_selector("#files >> text=SHA256SUMS")
        wait_for(
            lambda: page.inner_text("#events-note") or page.query_selector("#events tr"),
            interval=0.2,
            what="the events, or a note that there are none",
        )
        if page.query_selector("#events tr"):
            # an event's details read as words, never as an object's name
            events_text = page.inner_text("#events")
            assert "[object Object]" not in events_text
            assert "CLAIMED" in events_text and "pid:" in events_text
        screenshot(page, tmp_path, "ui-job.png")


def test_cancel_running_job(root: Path, page: Any) -> None:
    write_task(root / "tasks", "start", "echo started; sleep 60\n")
    with Service(root) as svc:
        queue_job(root, "long-1")
        log_in(page, svc, "/ui/jobs/long-1")
        text_is(page, "#job-status", "processing")
        page.click("#act-cancel")
        answer_dialog(page, yes=True)
        wait_for(
            lambda: page.inner_text("#job-status").strip() not in ("processing", "queue", ""),
            interval=0.2,
            what="the job to stop",
        )
        with svc.client() as c:
            assert c.get("/jobs/long-1").json()["Status"] not in ("processing", "queue")


def test_queue_and_delete_ask_first(root: Path, page: Any) -> None:
    write_task(root / "tasks", "start", "echo ok\n")
    with Service(root) as svc:
        with svc.client() as c:
            assert c.put("/jobs/assembled").status_code == 201
        log_in(page, svc, "/ui/jobs/assembled")
        text_is(page, "#job-status", "ready")
        page.click("#act-delete")
        answer_dialog(page, yes=False)
        assert (root / "data" / "assembled").is_dir()
        page.click("#act-queue")
        answer_dialog(page, yes=True)
        text_is(page, "#job-status", "success")
        page.click("#act-delete")
        assert "cannot be undone" in page.inner_text("#confirm-text")
        answer_dialog(page, yes=True)
        page.wait_for_url(svc.url + "/ui/jobs")
        with svc.client() as c:
            assert c.get("/jobs/assembled").status_code == 404


# -- the job list ----------------------------------------------------------------------------


def test_job_list_filters_sorts_and_pages(root: Path, page: Any, tmp_path: Path) -> None:
    for i in range(60):
        (root / "success" / f"scan-{i:03d}").mkdir()
    for i in range(4):
        (root / "error" / f"broken-{i}").mkdir()
    (root / "data" / "scan-new").mkdir()
    with Service(root, "--no-processor") as svc:
        log_in(page, svc, "/ui/jobs")
        text_is(page, "#page-info", "1-50 of 65")
        assert page.inner_text("#job-rows tr:first-child td:first-child") == "broken-0"
        page.click("#next")
        text_is(page, "#page-info", "51-65 of 65")
        assert page.is_disabled("#next")
        page.select_option("#f-status", "error")
        text_is(page, "#page-info", "1-4 of 4")
        assert "status=error" in page.url
        page.select_option("#f-status", "")
        page.fill("#f-q", "SCAN-05")
        text_is(page, "#page-info", "1-10 of 10")
        page.select_option("#f-sort", "-name")
        wait_for(
            lambda: page.inner_text("#job-rows tr:first-child td:first-child") == "scan-059",
            interval=0.2,
            what="name Z-A",
        )
        page.fill("#f-q", "")
        page.select_option("#f-sort", "-changed")
        wait_for(
            lambda: page.inner_text("#job-rows tr:first-child td:first-child") == "scan-new",
            interval=0.2,
            what="newest first",
        )
        screenshot(page, tmp_path, "ui-jobs.png", full_page=False)
        page.click("#job-rows a:has-text('scan-new')")
        page.wait_for_url(svc.url + "/ui/jobs/scan-new")


def test_pages_load_nothing_from_elsewhere(root: Path, page: Any) -> None:
    with Service(root, "--no-processor") as svc:
        seen: list[str] = []
        page.on("request", lambda r: seen.append(r.url))
        log_in(page, svc)
        page.goto(svc.url + "/ui/jobs")
        page.wait_for_selector("#job-rows tr")
        assert seen and all(u.startswith(svc.url + "/") or u.startswith("data:") for u in seen), (
            seen
        )
        assert all(TOKEN not in u for u in seen)
        # the service answers no CORS preflight: another site's page cannot add the header
        r = httpx.options(
            svc.url + "/ui/api/requeue-failed",
            headers={
                "Origin": "https://evil.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "x-api-token",
            },
        )
        assert "access-control-allow-origin" not in r.headers


def test_staging_requests_with_progress(root: Path, page: Any, tmp_path: Path) -> None:
    archive, staging = tmp_path / "archive", tmp_path / "staging"
    (archive / "run-1").mkdir(parents=True)
    staging.mkdir()
    (archive / "run-1" / "a.fastq").write_bytes(b"A" * 3000)
    (archive / "run-1" / "b.fastq").write_bytes(b"B" * 1000)
    with Service(root, "--archive", str(archive), "--staging", str(staging)) as svc:
        with svc.client() as c:
            r = c.post("/dts/staging", json={"ids": ["run-1/a.fastq", "run-1/b.fastq"]})
            assert r.status_code == 201, r.text
            rid = r.json()["request_id"]
        log_in(page, svc)
        row = f"#staging .staging-row:has(a:text-is('{rid}'))"
        page.wait_for_selector(row)
        text_is(page, f"{row} .badge", "ready")  # staging has finished
        assert "2/2 files" in page.inner_text(row)
        bar = page.query_selector(f"{row} progress")
        assert bar.get_attribute("value") == bar.get_attribute("max") == "4000"
        staged = {p.name: p.stat().st_size for p in staging.rglob("*.fastq")}
        assert staged == {"a.fastq": 3000, "b.fastq": 1000}


def test_no_staging_says_so(root: Path, page: Any) -> None:
    uuid_name = "0b9a3c1e-8d2f-4c55-9a77-0123456789ab"
    (root / "data" / uuid_name).mkdir()  # looks like a request, but staging is not set up
    with Service(root, "--no-processor") as svc:
        log_in(page, svc)
        text_is(page, "#staging", "staging is not available on this service")
        text_is(page, "#transfers", "transfers are not available on this service")


def test_a_service_gone_away_shows_and_clears(root: Path, page: Any) -> None:
    svc = Service(root, "--no-processor").start()
    try:
        log_in(page, svc)
        text_is(page, "#count-ready", "0")
        assert page.is_hidden("#problem")
        svc.stop()
        page.wait_for_selector("#problem:not([hidden])")
        assert "Cannot reach the service" in page.inner_text("#problem")
        (root / "data" / "while-away").mkdir()
        svc = Service(root, "--no-processor", port=svc.port).start()
        text_is(page, "#count-ready", "1")  # the same tab, still logged in
        page.wait_for_selector("#problem", state="hidden")
    finally:
        svc.stop()
