"""The `batchingest` command: `serve` runs the service; the operator commands (jobs,
show, logs, events, queue, cancel, requeue, status) live in batchingest.commands.

Exit status: 0 when done, 2 for every usage or start-up error (a bad flag or variable, a
missing or unusable root, a port already taken), each told in one line on stderr; the
operator commands exit 1 when what they were asked could not be done.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence

from batchingest import __version__, logs
from batchingest.commands import add_commands
from batchingest.config import (
    Config,
    ConfigError,
    add_serve_arguments,
    config_from_args,
)

USAGE_ERROR = 2
log = logging.getLogger("batchingest")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed: a faster loop for the HTTP API, same semantics."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _fail(prog: str, message: str) -> int:
    """A usage or start-up error: one line, in argparse's form, and exit status 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return USAGE_ERROR


def _check_folders(cfg: Config) -> str | None:
    """Why the service cannot start on these folders, or None; warns of a missing tasks folder."""
    # A mistyped --root must not quietly become a new, empty jobs root.
    if not cfg.init and not cfg.root.is_dir():
        return f"jobs root {cfg.root} is not usable: no such folder (--init creates it)"
    if cfg.processor and not cfg.tasks_dir.is_dir():
        log.warning("no tasks folder at %s: only built-in tasks can run", cfg.tasks_dir)
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    from batchingest import lean

    lean.service_packages()  # before uvicorn and prometheus-client are imported
    from batchingest.service import ServiceFailed, StartError, serve

    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        return _fail(args.prog, str(e))
    logs.setup(cfg.log_level, cfg.log_format)
    problem = _check_folders(cfg)
    if problem is not None:
        return _fail(args.prog, problem)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve(cfg))
    except StartError as e:
        return _fail(args.prog, str(e))
    except ServiceFailed as e:
        print(f"{args.prog}: {e}", file=sys.stderr)
        return 1  # a failure while running, not a usage or start-up error
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchingest", description="A filesystem-backed batch ingest service."
    )
    parser.add_argument("--version", action="version", version=f"batchingest {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser(
        "serve",
        help="run the processor and the HTTP API",
        description="Run the processor and the HTTP API on a jobs root.",
        epilog="Every flag can also be given as the BATCHINGEST_* variable shown in "
        "brackets; a flag on the command line wins. Booleans take 1/true/yes or 0/false/no.",
    )
    add_serve_arguments(p_serve)
    p_serve.set_defaults(func=cmd_serve, prog=p_serve.prog)
    add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
