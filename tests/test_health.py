"""Heartbeats, back-off and GET /readyz in-process (the app on a real jobs root)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from batchingest.api.app import create_app
from batchingest.config import Config
from batchingest.health import Backoff, Progress, Readiness, probe_root
from batchingest.store import Store


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_names_what_is_overdue() -> None:
    clock = Clock()
    p = Progress(clock)
    assert p.stale() == []
    p.beat("processor", within=10)
    p.beat("webhooks", within=60)
    clock.now += 11
    assert p.stale() == ["processor"]
    p.beat("processor", within=10)
    assert p.stale() == []
    clock.now += 61
    assert p.stale() == ["processor", "webhooks"]
    p.retire("webhooks")
    assert p.stale() == ["processor"]


def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    b = Backoff(base=0.5, cap=4)
    assert [b.failed() for _ in range(6)] == [0.5, 1, 2, 4, 4, 4]
    b.reset()
    assert b.failed() == 0.5


def test_probe_root_says_what_is_wrong(root: Path) -> None:
    probe = root / ".readyz"
    assert probe_root(probe, root, 0) == []
    assert not probe.exists()
    [reason] = probe_root(probe, root, 1 << 60)
    assert "below --min-free" in reason


def ready(app: object) -> httpx.Response:
    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/readyz")  # no token

    return asyncio.run(get())


@pytest.fixture
def setup(root: Path) -> tuple[Config, Store, Progress]:
    return Config(root=root, tokens=["t0ken-for-tests"], min_free=0), Store(root), Progress()


def app_for(cfg: Config, store: Store, progress: Progress) -> object:
    readiness = Readiness.for_store(store, cfg.min_free, progress)
    return create_app(cfg, store, readiness)


def test_readyz_needs_no_token_and_says_ready(setup: tuple[Config, Store, Progress]) -> None:
    app = app_for(*setup)
    reply = ready(app)
    assert reply.status_code == 200
    assert reply.json() == {"status": "ready"}


def test_readyz_fails_while_a_loop_makes_no_progress(
    setup: tuple[Config, Store, Progress], caplog: pytest.LogCaptureFixture
) -> None:
    cfg, store, progress = setup
    app = app_for(cfg, store, progress)
    progress.beat("webhooks", within=-1)  # overdue at once
    reply = ready(app)
    assert reply.status_code == 503
    body = reply.json()
    assert body["code"] == "NotReady" and reply.headers["x-error-code"] == "NotReady"
    assert "webhooks" not in reply.text  # no details without a token
    assert "webhooks is not making progress" in caplog.text  # but in the log
    progress.beat("webhooks", within=60)
    assert ready(app).status_code == 200


def test_readyz_fails_below_min_free(root: Path) -> None:
    cfg = Config(root=root, tokens=["t0ken-for-tests"], min_free=1 << 60)
    assert ready(app_for(cfg, Store(root), Progress())).status_code == 503


@pytest.fixture
def immutable(root: Path) -> Iterator[Path]:
    """The root made immutable (chattr +i): not even root may create a file in it."""
    if subprocess.run(["chattr", "+i", str(root)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        yield root
    finally:
        subprocess.run(["chattr", "-i", str(root)], check=True)


def test_readyz_fails_when_the_root_is_not_writable(
    setup: tuple[Config, Store, Progress], immutable: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reply = ready(app_for(*setup))
    assert reply.status_code == 503
    assert "is not writable" in caplog.text


def test_each_readiness_probes_with_a_file_of_its_own(root: Path) -> None:
    """Two services sharing a root must not remove each other's probe mid-probe."""
    store = Store(root)
    a = Readiness.for_store(store, 0, Progress())
    b = Readiness.for_store(store, 0, Progress())
    assert a.probe != b.probe
    assert a.probe.parent == b.probe.parent == root and a.probe.name.startswith(".")


def test_the_health_and_limit_options(tmp_path: Path) -> None:
    from batchingest.config import parse_serve_args

    cfg = parse_serve_args(["--root", str(tmp_path)], environ={})
    assert (cfg.min_free, cfg.max_connections, cfg.max_header_size) == (1 << 30, 256, 64 << 10)
    assert (cfg.header_timeout, cfg.keep_alive) == (10.0, 5.0)
    env = {"BATCHINGEST_MIN_FREE": "512M", "BATCHINGEST_HEADER_TIMEOUT": "2.5"}
    cfg = parse_serve_args(
        ["--root", str(tmp_path), "--max-header-size", "16K", "--max-connections", "9"], env
    )
    assert (cfg.min_free, cfg.header_timeout) == (512 << 20, 2.5)
    assert (cfg.max_header_size, cfg.max_connections) == (16 << 10, 9)
    for bad in (
        ["--min-free", "lots"],
        ["--max-header-size", "100"],
        ["--header-timeout", "0"],
        ["--keep-alive", "inf"],
        ["--max-connections", "0"],
    ):
        with pytest.raises(SystemExit):
            parse_serve_args(["--root", str(tmp_path), *bad], environ={})
