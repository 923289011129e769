"""batchingest.lean: the service imports uvicorn's and prometheus-client's submodules
without their packages' __init__, and code that uses those packages as usual still can."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

# what the packages' __init__ would import and the service never uses
NOT_LOADED = (
    "click",
    "watchfiles",
    "multiprocessing",
    "http.server",
    "urllib.request",
    "wsgiref",
    "h11",
    "logging.handlers",
    "socketserver",
    "email.parser",
    "html.entities",
)


def run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_service_does_not_load_what_it_does_not_use(tmp_path: Path) -> None:
    out = run(f"""
        import sys
        from pathlib import Path
        from batchingest import cli
        # `serve` sets up the packages, imports the service, then stops: no such root
        assert cli.main(["serve", "--root", {str(tmp_path / "missing")!r}]) == 2
        import batchingest.metrics, batchingest.webhooks, batchingest.service
        from batchingest.api.app import create_app
        from batchingest.config import Config
        from batchingest.store import Store
        root = Path({str(tmp_path / "root")!r})
        store = Store(root)
        store.init()
        cfg = Config(root=root, tokens=["t"])
        batchingest.service.http_config(cfg, create_app(cfg, store)).load()
        print(sorted(m for m in {NOT_LOADED!r} if m in sys.modules))
    """)
    assert out.strip() == "[]"


def test_the_packages_work_as_usual_after() -> None:
    out = run("""
        from batchingest import lean
        lean.service_packages()
        import batchingest.service, batchingest.metrics
        import uvicorn
        from prometheus_client import Counter, generate_latest, CollectorRegistry
        import prometheus_client.parser
        registry = CollectorRegistry()
        Counter("things", "things counted", registry=registry).inc()
        assert b"things_total 1.0" in generate_latest(registry)
        assert callable(uvicorn.run) and uvicorn.Config is batchingest.service.UvicornConfig
        import logging, logging.config, http.client, html
        from http import cookies
        logging.config.dictConfig({"version": 1, "incremental": True})
        assert http.client.responses[404] == "Not Found" and html.escape("<") == "&lt;"
        assert cookies.SimpleCookie("a=1")["a"].value == "1"
        import sys
        assert sys.modules["http.cookies"] is cookies
        assert logging.config.__name__ == "logging.config"
        print(uvicorn.__version__)
    """)
    assert out.strip()[0].isdigit()


def test_a_package_imported_before_is_left_as_it_is() -> None:
    out = run("""
        import uvicorn, sys
        from batchingest import lean
        lean.service_packages()
        import batchingest.service
        print("click" in sys.modules, uvicorn.Server is batchingest.service.Server)
    """)
    assert out.split() == ["True", "True"]
