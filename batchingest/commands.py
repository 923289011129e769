"""The operator commands: jobs, show, logs, events, queue, cancel, requeue, status.

Each works on a jobs root on this machine (`--root`) or against a running service
(`--url`, with a token from BATCHINGEST_TOKEN or `--token-file`), and renders once what
either source answers, so both print the same. Results go to stdout; progress and
errors go to stderr. Exit status: 0 done, 1 the command failed (no such job, the service
refused or cannot be reached, a job could not be moved), 2 a usage error found before
anything was asked (a bad flag, job name or status, no root or URL, no token).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from batchingest import lease
from batchingest.config import ConfigError, absolute_path, env_name, setting_from_env
from batchingest.sources import (
    FAILURE,
    USAGE,
    CommandError,
    LocalSource,
    LogPiece,
    Source,
    check_states,
)
from batchingest.store import STATES, STATUS_OF_STATE, Store, valid_name

TOKEN_ENV = "BATCHINGEST_TOKEN"
URL_ENV = env_name("url")
FOLLOW_INTERVAL = 0.5  # seconds between looks at a followed LOG or event list
INTERRUPTED = 130  # Ctrl-C, as a shell reports it


# -- where the answers come from --------------------------------------------------------


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def read_token(path: Path) -> str:
    """The first token in a token file (one per line, `#` comments), as serve reads it."""
    from batchingest.api.auth import TokenError, read_token_file

    try:
        tokens = read_token_file(path)
    except TokenError as e:
        raise CommandError(str(e), USAGE) from None
    if not tokens:
        raise CommandError(f"no token in {path}", USAGE)
    return tokens[0]


def open_source(args: argparse.Namespace) -> Source:
    """--url or --root (a flag wins over the variables; BATCHINGEST_URL over _ROOT)."""
    url, root = args.url, args.root
    if url is None and root is None:
        url = _env(URL_ENV)
        if url is None and _env(env_name("root")) is not None:
            root = absolute_path(os.environ[env_name("root")])
    if url is not None and root is not None:
        raise CommandError("give --url or --root, not both", USAGE)
    if url is not None:
        return _http_source(url, args)
    if root is None:
        raise CommandError(
            f"--url (or {URL_ENV}) or --root (or BATCHINGEST_ROOT) is required", USAGE
        )
    store = Store(root)
    if not store.root.is_dir():
        raise CommandError(f"no jobs root at {store.root}", USAGE)
    # leases are judged (status: stuck jobs) with serve's --host-id and --lease-timeout,
    # from the same variables
    try:
        store.owner = lease.Owner.here(setting_from_env("host_id") or "")
        store.lease_timeout = setting_from_env("lease_timeout") or store.lease_timeout
    except ConfigError as e:
        raise CommandError(str(e), USAGE) from None
    return LocalSource(store)


def _http_source(url: str, args: argparse.Namespace) -> Source:
    from batchingest.client import HttpSource

    if not url.startswith(("http://", "https://")):
        raise CommandError(f"--url must start with http:// or https://, not {url[:100]!r}", USAGE)
    token = _env(TOKEN_ENV)
    if token is None:
        token_file = args.token_file
        if token_file is None and _env(env_name("token-file")) is not None:
            token_file = absolute_path(os.environ[env_name("token-file")])
        if token_file is None:
            raise CommandError(f"no API token: set {TOKEN_ENV} or give --token-file", USAGE)
        token = read_token(token_file)
    return HttpSource(url, token)


def job_name(value: str) -> str:
    """argparse type for JOB: the name rules, checked before anything is asked."""
    if not valid_name(value):
        raise argparse.ArgumentTypeError(
            f"invalid job name {value[:100]!r}: "
            "use 1-255 of A-Z a-z 0-9 . _ -, not starting with '.'"
        )
    return value


def positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1: {value[:50]!r}")
    return int(value)


# -- output --------------------------------------------------------------------------


def out(line: str = "") -> None:
    print(line, flush=True)


def print_json(data: Any) -> None:
    out(json.dumps(data, ensure_ascii=False, indent=2))


class Progress:
    """Progress of a long operation on stderr: a live line on a terminal, else plain lines."""

    def __init__(self, total: int, verb: str, stream: TextIO | None = None) -> None:
        self.total = total
        self.verb = verb
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty()
        self.done = 0

    def step(self, name: str, note: str = "") -> None:
        self.done += 1
        text = f"{self.verb} {self.done}/{self.total}: {name}{note}"
        if self.live:
            self.stream.write(f"\r\x1b[K{text}")  # rewrite the one line in place
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live and self.done:
            self.stream.write("\n")
            self.stream.flush()


# -- the commands -----------------------------------------------------------------------


def cmd_jobs(source: Source, args: argparse.Namespace) -> int:
    jobs = source.list_jobs(check_states(args.status))
    if args.json:
        print_json([{"Name": j.get("Name"), "Status": j.get("Status")} for j in jobs])
        return 0
    width = max((len(str(j.get("Name"))) for j in jobs), default=4)
    for j in jobs:
        out(f"{j.get('Name')!s:<{width}}  {j.get('Status')}")
    return 0


def cmd_show(source: Source, args: argparse.Namespace) -> int:
    info = source.job_info(args.job)
    if args.json:
        print_json(info)
        return 0
    out(f"Name:     {info.get('Name')}")
    out(f"Status:   {info.get('Status')}")
    if info.get("JobError"):
        out(f"JOB:      {info['JobError']}")
        return 0
    todo = info.get("Todo") or []
    out(f"Todo:     {', '.join(map(str, todo)) if todo else '(nothing)'}")
    finished = info.get("Finished") or []
    out(f"Finished: {len(finished)}")
    for record in finished:
        out("  " + finished_line(record))
    return 0


def finished_line(record: Any) -> str:
    """One task run of a JOB's Finished list (written by the processor, or by hand)."""
    if not isinstance(record, dict):
        return json.dumps(record, ensure_ascii=False)
    name, status = record.get("Name"), record.get("Status")
    line = f"{name}  {status}  {record.get('Start')} .. {record.get('Finish')}"
    if record.get("Reason"):
        line += f"  {record['Reason']}"
    return line


def log_pieces(source: Source, name: str, follow: bool) -> Iterator[bytes]:
    """The job's LOG from its start; with follow, then what is appended, until stopped."""
    offset = 0
    while True:
        piece: LogPiece | None = source.read_log(name, offset)
        if piece is not None and piece.size < offset:
            sys.stderr.write(f"batchingest: the LOG of {name} was replaced; from its start:\n")
            offset = 0
            continue
        if piece is not None and piece.data:
            offset += len(piece.data)
            yield piece.data
            continue
        if not follow:
            return
        time.sleep(FOLLOW_INTERVAL)


def cmd_logs(source: Source, args: argparse.Namespace) -> int:
    stdout = sys.stdout.buffer
    for data in log_pieces(source, args.job, args.follow):
        stdout.write(data)
        stdout.flush()
    return 0


def event_line(event: dict[str, Any]) -> str:
    fields = (event.get("time"), event.get("job"), event.get("code"), event.get("description"))
    return "  ".join("" if f is None else str(f) for f in fields)


def cmd_events(source: Source, args: argparse.Namespace) -> int:
    """Every event after --after, page by page; with -f, then new ones as they come.

    --json prints one JSON array, or with -f one JSON object per line (JSON Lines).
    """
    after: str | None = args.after
    collected: list[dict[str, Any]] = []
    while True:
        events, next_cursor = source.events(after, args.limit)
        for event in events:
            if args.json and not args.follow:
                collected.append(event)
            else:
                out(json.dumps(event, ensure_ascii=False) if args.json else event_line(event))
        if events and isinstance(events[-1], dict) and events[-1].get("cursor") is not None:
            after = str(events[-1]["cursor"])
        after = next_cursor or after
        if next_cursor is None and not args.follow:
            if args.json:
                print_json(collected)
            return 0
        if next_cursor is None:
            time.sleep(FOLLOW_INTERVAL)


def cmd_queue(source: Source, args: argparse.Namespace) -> int:
    status, moved = source.queue(args.job)
    out(f"{args.job}: queued" if moved else f"{args.job}: already {status}, left as it is")
    return 0


def cmd_cancel(source: Source, args: argparse.Namespace) -> int:
    info = source.cancel(args.job)
    out(f"{args.job}: cancel requested (status {info.get('Status', 'unknown')})")
    return 0


def confirm(question: str) -> bool:
    """Ask on the terminal; refuse (a usage error) where there is none to ask on."""
    if not sys.stdin.isatty():
        raise CommandError("no terminal to confirm on: add --yes to go ahead", USAGE)
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def cmd_requeue(source: Source, args: argparse.Namespace) -> int:
    names = [str(j["Name"]) for j in source.list_jobs(["error"])]
    if not names:
        out("no failed jobs")
        return 0
    if not args.yes:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        if not confirm(f"Move {len(names)} failed job(s) ({shown}) to queue/?"):
            out("nothing moved")
            return FAILURE
    progress = Progress(len(names), "requeue")
    failed: list[str] = []
    for name in names:
        try:
            status, moved = source.queue(name)
        except CommandError as e:
            failed.append(f"{name}: {e}")
            progress.step(name, " (failed)")
            continue
        progress.step(name, "" if moved else f" (already {status})")
    progress.close()
    out(f"requeued {len(names) - len(failed)} of {len(names)} failed job(s)")
    for line in failed:
        print(line, file=sys.stderr)
    return FAILURE if failed else 0


def cmd_status(source: Source, args: argparse.Namespace) -> int:
    jobs = source.list_jobs(list(STATES))
    counts = {STATUS_OF_STATE[s]: 0 for s in STATES}
    for j in jobs:
        counts[str(j["Status"])] = counts.get(str(j["Status"]), 0) + 1
    processing = [str(j["Name"]) for j in jobs if j["Status"] == "processing"]
    failed = [str(j["Name"]) for j in jobs if j["Status"] == "error"]
    stuck = source.stuck()
    if args.json:
        print_json({"source": source.describe(), "counts": counts, "total": len(jobs),
                    "processing": processing, "error": failed, "stuck": stuck})  # fmt: skip
        return 0
    out(source.describe())
    out(f"{'state':<12}{'jobs':>8}")
    for status, n in counts.items():
        out(f"{status:<12}{n:>8}")
    out(f"{'total':<12}{len(jobs):>8}")
    # the jobs that may need a person: running (or left behind by a crash) and failed
    for title, names in (("processing", processing), ("error", failed)):
        if names:
            out(f"\n{title}:")
            for name in names:
                out(f"  {name}")
    if stuck is None:
        out("\nstuck: not known (a service without GET /stuck: an older version)")
    elif stuck:
        out("\nstuck (in processing/, no live holder):")
        for name in stuck:
            out(f"  {name}")
    return 0


# -- argument parsing ---------------------------------------------------------------------

Command = Callable[[Source, argparse.Namespace], int]


def run(func: Command, args: argparse.Namespace) -> int:
    """Open the source, run the command, and turn every failure into one stderr line."""
    prog = args.prog
    try:
        source = open_source(args)
    except CommandError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.status
    try:
        return func(source, args)
    except CommandError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return INTERRUPTED
    except BrokenPipeError:
        # `batchingest logs JOB | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        source.close()


def _common(p: argparse.ArgumentParser) -> None:
    where = p.add_argument_group("where (one of)")
    where.add_argument("--root", type=absolute_path, default=None, metavar="PATH",
                       help="a jobs root on this machine [BATCHINGEST_ROOT]")  # fmt: skip
    where.add_argument(
        "--url",
        default=None,
        metavar="URL",
        help=f"a running service, e.g. http://127.0.0.1:15000 [{URL_ENV}]",
    )
    where.add_argument("--token-file", type=absolute_path, default=None, metavar="FILE",
                       help=f"with --url: the first token in FILE, if {TOKEN_ENV} is not set "
                       "[BATCHINGEST_TOKEN_FILE]")  # fmt: skip


def add_commands(sub: Any) -> None:
    """Add the operator commands to the `batchingest` parser's subcommands."""
    table: list[tuple[str, Command, str, list[str]]] = [
        ("jobs", cmd_jobs, "list jobs (--status ready,error ...)", ["status", "json"]),
        ("show", cmd_show, "one job: status, tasks to do, tasks run", ["job", "json"]),
        ("logs", cmd_logs, "print a job's LOG (-f: and follow it)", ["job", "follow"]),
        ("events", cmd_events, "job history (-f: and follow it)", ["follow", "json", "events"]),
        ("queue", cmd_queue, "move a job to queue/ (from ready, error or success)", ["job"]),
        ("cancel", cmd_cancel, "stop a queued or processing job", ["job"]),
        ("requeue", cmd_requeue, "move every failed job back to queue/", ["failed", "yes"]),
        ("status", cmd_status, "jobs per state; the failed ones and those stuck", ["json"]),
    ]
    for name, func, text, extras in table:
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        _common(p)
        _add_extras(p, extras)
        p.set_defaults(func=lambda args, f=func: run(f, args), prog=p.prog)


def _add_extras(p: argparse.ArgumentParser, extras: list[str]) -> None:
    if "job" in extras:
        p.add_argument("job", type=job_name, metavar="JOB", help="the job's name")
    if "status" in extras:
        p.add_argument("--status", default=None, metavar="S[,S...]",
                       help="only these: ready, queue, processing, success, error")  # fmt: skip
    if "json" in extras:
        p.add_argument("--json", action="store_true", help="one JSON document (see README)")
    if "follow" in extras:
        p.add_argument("-f", "--follow", action="store_true", help="keep printing what comes")
    if "events" in extras:
        p.add_argument("--after", default=None, metavar="CURSOR", help="only events after this")
        p.add_argument("--limit", type=positive, default=100, metavar="N",
                       help="events per request (default: 100)")  # fmt: skip
    if "failed" in extras:
        p.add_argument("--failed", action="store_true", required=True,
                       help="every job in error/ (required: says which jobs)")  # fmt: skip
    if "yes" in extras:
        p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
