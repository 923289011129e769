"""Settings for `batchingest serve`, from flags and `BATCHINGEST_*` environment variables.

Every flag `--some-flag` can also be given as `BATCHINGEST_SOME_FLAG`; a flag on the
command line wins over the environment, which wins over the default. Keeping the whole
set of settings in one dataclass lets the processor, the API, webhooks and staging
share one picture of the service without passing flags around.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ENV_PREFIX = "BATCHINGEST_"

# Settings that must never reach a task's environment or a log line.
SECRET_ENV = ("BATCHINGEST_TOKENS", "BATCHINGEST_WEBHOOK_SECRET")


@dataclass
class Config:
    root: Path
    tasks: Path | None = None
    workers: int = 2
    poll_interval: float = 2.0
    force_polling: bool = False
    task_timeout: float | None = None
    grace: float = 30.0
    # HTTP API
    api: bool = True
    processor: bool = True
    host: str = "127.0.0.1"
    port: int = 15000
    tokens: list[str] = field(default_factory=list, repr=False)
    token_file: Path | None = None
    max_upload: int = 0
    # webhooks
    webhook_timeout: float = 10.0
    webhook_retries: int = 5
    webhook_secret: str | None = field(default=None, repr=False)
    webhook_allow: list[str] = field(default_factory=list)
    webhook_backoff: float | None = None
    # staging
    archive: Path | None = None
    staging: Path | None = None
    catalog: Path | None = None
    stage_parallel: int = 4
    stage_verify: bool = False
    staging_max_ids: int = 10_000
    log_level: str = "info"

    @property
    def tasks_dir(self) -> Path:
        return self.tasks if self.tasks is not None else self.root / "tasks"

    @property
    def staging_enabled(self) -> bool:
        return self.archive is not None and self.staging is not None

    def task_env(self) -> dict[str, str]:
        """Settings that built-in tasks read, as environment variables."""
        env: dict[str, str] = {}
        if self.archive is not None:
            env["BATCHINGEST_ARCHIVE"] = str(self.archive)
        if self.staging is not None:
            env["BATCHINGEST_STAGING"] = str(self.staging)
        if self.catalog is not None:  # the stage task resolves ids through it again
            env["BATCHINGEST_CATALOG"] = str(self.catalog)
        if self.staging_enabled:  # bounds the MANIFEST.json the stage task reads
            env["BATCHINGEST_STAGING_MAX_IDS"] = str(self.staging_max_ids)
        env["BATCHINGEST_STAGE_PARALLEL"] = str(self.stage_parallel)
        env["BATCHINGEST_STAGE_VERIFY"] = "1" if self.stage_verify else "0"
        return env


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {value!r}")


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return n


def _non_negative_int(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {value}")
    return n


def _seconds(value: str) -> float:
    s = float(value)
    if not s >= 0:  # written so that nan, which compares false to everything, is refused too
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not negative: {value}")
    return s


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


# (flag, type, default, help). Booleans are switches on the command line and
# "1"/"true"/"0"/"false" in the environment.
_OPTIONS: list[tuple[str, object, object, str]] = [
    ("root", Path, None, "the jobs root (required)"),
    ("tasks", Path, None, "folder of task executables (default ROOT/tasks)"),
    ("workers", _positive_int, 2, "jobs processed at the same time"),
    ("poll-interval", _seconds, 2.0, "seconds between rescans of queue/"),
    ("force-polling", bool, False, "do not rely on inotify (NFS and other shared file systems)"),
    ("task-timeout", _seconds, None, "seconds a task may run before it is killed (default none)"),
    ("grace", _seconds, 30.0, "seconds running tasks get to finish on SIGTERM/SIGINT"),
    ("no-api", bool, False, "run only the processor"),
    ("no-processor", bool, False, "run only the HTTP API"),
    ("host", str, "127.0.0.1", "address the HTTP API listens on"),
    ("port", int, 15000, "port the HTTP API listens on"),
    ("tokens", _csv, [], "comma-separated API tokens (prefer the environment variable)"),
    ("token-file", Path, None, "file of API tokens, one per line, # comments"),
    ("max-upload", _non_negative_int, 0, "largest accepted upload in bytes (0 = no limit)"),
    ("webhook-timeout", _seconds, 10.0, "connect and total timeout of one webhook POST"),
    ("webhook-retries", _non_negative_int, 5, "retries of a failed webhook delivery"),
    ("webhook-secret", str, None, "HMAC secret to sign webhook POSTs with"),
    ("webhook-allow", _csv, [], "comma-separated host names / CIDR ranges webhooks may reach"),
    ("webhook-backoff", _seconds, None, "seconds before the first webhook retry, doubling (10)"),
    ("archive", Path, None, "archive folder staged files are copied from"),
    ("staging", Path, None, "staging area files are copied into"),
    ("catalog", Path, None, "tab-separated file of id<TAB>relative/path"),
    ("stage-parallel", _positive_int, 4, "files copied at the same time by the stage task"),
    ("stage-verify", bool, False, "compare SHA-256 of source and copy when staging"),
    ("staging-max-ids", _positive_int, 10_000, "most ids in one staging request"),
    ("log-level", str, "info", "debug, info, warning or error"),
]


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.replace("-", "_").upper()


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, kind, _default, help_text in _OPTIONS:
        env = env_name(flag)
        if kind is bool:
            parser.add_argument(
                f"--{flag}", action="store_true", default=None, help=f"{help_text} [{env}]"
            )
        else:
            parser.add_argument(f"--{flag}", type=kind, default=None, help=f"{help_text} [{env}]")  # type: ignore[arg-type]


def config_from_args(
    args: argparse.Namespace,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Merge parsed flags with the environment; flags win."""
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for flag, kind, default, _help in _OPTIONS:
        attr = flag.replace("-", "_")
        value = getattr(args, attr, None)
        # an empty variable counts as unset: BATCHINGEST_ROOT= must not mean "the current folder"
        if value is None and environ.get(env_name(flag), "") != "":
            raw = environ[env_name(flag)]
            try:
                value = _bool(raw) if kind is bool else kind(raw)  # type: ignore[operator]
            except (ValueError, argparse.ArgumentTypeError) as e:
                raise SystemExit(f"batchingest: bad {env_name(flag)}: {e}") from None
        values[attr] = default if value is None else value
    if values["root"] is None:
        raise SystemExit("batchingest: --root (or BATCHINGEST_ROOT) is required")
    no_api = bool(values.pop("no_api"))
    no_processor = bool(values.pop("no_processor"))
    if no_api and no_processor:
        raise SystemExit("batchingest: --no-api and --no-processor together leave nothing to run")
    cfg = Config(**values)  # type: ignore[arg-type]
    cfg.api = not no_api
    cfg.processor = not no_processor
    # Tasks run in the job folder, not where the service started: every path is absolute.
    cfg.root = Path(cfg.root).absolute()
    for attr in ("tasks", "token_file", "archive", "staging", "catalog"):
        value = getattr(cfg, attr)
        if value is not None:
            setattr(cfg, attr, Path(value).absolute())
    return cfg


def parse_serve_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Config:
    parser = argparse.ArgumentParser(prog="batchingest serve")
    add_serve_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)), environ)
