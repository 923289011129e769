"""The `batchingest` command: `serve` runs the service, `status` shows a jobs root."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from batchingest import __version__
from batchingest.config import add_serve_arguments, config_from_args, env_name
from batchingest.store import STATES, STATUS_OF_STATE, Store


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # watchfiles reports every batch of changes at INFO; that is our business, not the log's
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    # httpx logs every webhook request at INFO; our own line per attempt says more
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed: a faster loop for the HTTP API, same semantics."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def cmd_serve(args: argparse.Namespace) -> int:
    from batchingest.service import StartError, serve

    cfg = config_from_args(args)
    _setup_logging(cfg.log_level)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve(cfg))
    except StartError as e:
        logging.getLogger("batchingest").error("%s", e)
        print(f"batchingest: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    root = args.root or os.environ.get(env_name("root"))
    if not root:
        print("batchingest status: --root (or BATCHINGEST_ROOT) is required", file=sys.stderr)
        return 2
    store = Store(Path(root))
    if not store.root.is_dir():
        print(f"batchingest status: no jobs root at {store.root}", file=sys.stderr)
        return 2
    jobs = store.list()
    counts = {state: 0 for state in STATES}
    for job in jobs:
        counts[job.state] += 1
    print(f"jobs root {store.root}")
    print(f"{'state':<12}{'jobs':>8}")
    for state in STATES:
        print(f"{STATUS_OF_STATE[state]:<12}{counts[state]:>8}")
    print(f"{'total':<12}{len(jobs):>8}")
    for state in ("processing", "error"):
        names = [j.name for j in jobs if j.state == state]
        if names:
            print(f"\n{state}:")
            for name in names:
                print(f"  {name}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="batchingest", description="A filesystem-backed batch ingest service."
    )
    parser.add_argument("--version", action="version", version=f"batchingest {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the processor and the HTTP API")
    add_serve_arguments(p_serve)
    p_serve.set_defaults(func=cmd_serve)
    p_status = sub.add_parser("status", help="jobs per state in a jobs root")
    p_status.add_argument(
        "--root", type=Path, default=None, help="the jobs root [BATCHINGEST_ROOT]"
    )
    p_status.set_defaults(func=cmd_status)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
