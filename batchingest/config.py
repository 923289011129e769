"""Settings for `batchingest serve`, from flags and `BATCHINGEST_*` environment variables.

Every setting is written once, as a field of `Config` whose metadata says how to parse it
and what `--help` says about it; the flag (`--some-flag`), the variable
(`BATCHINGEST_SOME_FLAG`), the parser and the help text with its default are all derived
from that one line. A flag on the command line wins over the environment, which wins over
the default. Keeping the whole set of settings in one dataclass lets the processor, the
API, webhooks and staging share one picture of the service without passing flags around.

To add a setting: add one field with `setting(default, help, parse=...)`; nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchingest.flags import env_bool as env_bool
from batchingest.flags import parse_bool
from batchingest.logs import parse_format

ENV_PREFIX = "BATCHINGEST_"


class ConfigError(Exception):
    """A setting is missing or bad: the command stops with this message and exit status 2."""


# -- parsers: each takes the text of a flag or variable and raises on a bad value --------


def _checked(name: str, parse: Callable[[str], Any], ok: Callable[[Any], bool], why: str) -> Any:
    """A parser: parse(value), refused with `why` unless ok(result)."""

    def parser(value: str) -> Any:
        result = parse(value)
        if not ok(result):
            raise argparse.ArgumentTypeError(f"{why}: {value}")
        return result

    parser.__name__ = name  # argparse names the parser in its own messages
    return parser


_positive_int = _checked("int", int, lambda n: n >= 1, "must be at least 1")
_non_negative_int = _checked("int", int, lambda n: n >= 0, "must not be negative")
_port = _checked("int", int, lambda n: 1 <= n <= 65535, "must be a port number from 1 to 65535")
# written so that nan, which compares false to everything, is refused too
_seconds = _checked("float", float, lambda s: s >= 0, "must be a number of seconds, not negative")


def _dialect(value: str) -> str | None:
    v = value.strip().lower()
    if v in ("", "none"):
        return None
    if v != "jdp":
        raise argparse.ArgumentTypeError(f"unknown DTS dialect {value!r} (known: jdp, none)")
    return v


_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _bytes(value: str) -> int:
    """Bytes, or with a binary suffix: 512K, 100M, 1G, 2T."""
    v = value.strip().upper().removesuffix("B").removesuffix("I")
    number, suffix = (v[:-1], v[-1]) if v and v[-1] in _SIZE_SUFFIXES else (v, "")
    try:
        return int(number) * _SIZE_SUFFIXES[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size in bytes (e.g. 512M, 1G): {value}") from None


_size = _checked("size", _bytes, lambda n: n >= 0, "must not be negative")
_header_size = _checked(
    "size", _bytes, lambda n: n >= 1024, "must be at least 1K, or no request fits"
)
_positive_seconds = _checked(
    "float", _seconds, lambda s: 0 < s < 1e9, "must be more than 0 seconds, and finite"
)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _endpoint(value: str) -> tuple[str, Path]:
    from batchingest.endpoints import EndpointSpecError, parse_spec

    try:
        return parse_spec(value)
    except EndpointSpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def absolute_path(value: str) -> Path:
    # Tasks run in the job folder, not where the service started: every path is absolute.
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return Path(value).absolute()


LOG_LEVELS = ("debug", "info", "warning", "error")


def _log_level(value: str) -> str:
    v = value.strip().lower()
    if v not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LOG_LEVELS)}: {value!r}")
    return v


# -- the table -------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """How one Config field is given on the command line and in the environment."""

    help: str
    parse: Callable[[str], Any]
    flag: str  # without the leading "--"; "" means the field name with dashes
    shown: str | None  # the default as --help writes it; None: the default itself
    secret: bool  # kept out of repr() (and so out of logs) and out of task environments
    repeat: bool = False  # the flag may be given again and again; the variable is a list
    env: str = ""  # the variable's name when it is not derived from the flag

    @property
    def switch(self) -> bool:
        """A flag without a value; given, it turns the setting away from its default."""
        return self.parse is parse_bool


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    parse: Callable[[str], Any] = str,
    flag: str = "",
    shown: str | None = None,
    secret: bool = False,
    repeat: bool = False,
    env: str = "",
) -> Any:
    """A Config field that is also a flag and a variable (see the module's docstring).

    repeat: a list setting whose flag is given once per item (`--endpoint A=/a
    --endpoint B=/b`) and whose variable holds the items comma-separated; parse reads
    one item.
    """
    meta = {"option": Option(help, parse, flag, shown, secret, repeat, env)}
    if isinstance(default, list):
        items = list(default)
        return field(default_factory=lambda: list(items), metadata=meta, repr=not secret)
    return field(default=default, metadata=meta, repr=not secret)


def seconds(
    default: float | None, help: str, *, positive: bool = False, shown: str | None = None
) -> Any:
    """A setting in seconds: any number from 0, or (positive) more than 0 and finite."""
    return setting(default, help, parse=_positive_seconds if positive else _seconds, shown=shown)


@dataclass
class Config:
    root: Path = setting(help="the jobs root, an existing folder (required)", parse=absolute_path)
    init: bool = setting(False, "create the jobs root if it does not exist", parse=parse_bool)
    tasks: Path | None = setting(
        None, "folder of task executables", parse=absolute_path, shown="ROOT/tasks"
    )
    workers: int = setting(2, "jobs processed at the same time", parse=_positive_int)
    poll_interval: float = seconds(2.0, "seconds between rescans of queue/")
    force_polling: bool = setting(
        False, "do not rely on inotify (NFS and other shared file systems)", parse=parse_bool
    )
    # several hosts on one shared root (see README, "Deployment on shared file systems")
    host_id: str = setting("", "this host's name in job leases", shown="the host name")
    shared_root: bool = setting(
        False,
        "the jobs root is on a local file system here but other machines mount it too "
        "(exported over NFS, say): give jobs leases as on a shared file system",
        parse=parse_bool,
    )
    lease_renew: float = seconds(
        10.0, "seconds between renewals of the leases of held jobs", positive=True
    )
    lease_timeout: float = seconds(
        60.0,
        "seconds an unrenewed lease holds before another host takes the job over",
        positive=True,
    )
    task_timeout: float | None = seconds(
        None, "seconds a task may run before it is stopped", shown="none"
    )
    grace: float = seconds(30.0, "seconds running tasks get to finish on SIGTERM/SIGINT")
    cancel_grace: float = seconds(10.0, "seconds a canceled task gets between SIGTERM and SIGKILL")
    default_deadline: float | None = seconds(
        None,
        "seconds a job without its own Deadline may take from entering queue/",
        positive=True,
        shown="none",
    )
    # HTTP API
    api: bool = setting(True, "run only the processor", parse=parse_bool, flag="no-api")
    processor: bool = setting(True, "run only the HTTP API", parse=parse_bool, flag="no-processor")
    host: str = setting("127.0.0.1", "address the HTTP API listens on")
    port: int = setting(15000, "port the HTTP API listens on", parse=_port)
    tokens: list[str] = setting(
        [],
        "comma-separated API tokens (prefer the environment variable: flags show in ps)",
        parse=_csv,
        shown="none; one is kept in ROOT/.api-token",
        secret=True,
    )
    token_file: Path | None = setting(
        None, "file of API tokens, one per line, # comments", parse=absolute_path, shown="none"
    )
    api_processes: int = setting(
        1, "processes serving the HTTP API on the one port (the first also runs the processor)",
        parse=_positive_int,
    )  # fmt: skip
    # HTTP connection limits (see README, "Running it in production")
    max_connections: int = setting(
        256, "open HTTP connections at most; more get 503", parse=_positive_int
    )
    header_timeout: float = seconds(
        10.0, "seconds a request line and headers may take", positive=True
    )
    max_header_size: int = setting(
        64 << 10, "largest request line and headers, bytes", parse=_header_size, shown="64K"
    )
    keep_alive: float = seconds(
        5.0, "seconds an idle keep-alive connection stays open", positive=True
    )
    body_timeout: float = seconds(
        60.0, "seconds a request body may go without a byte; then closed", positive=True
    )
    min_free: int = setting(
        1 << 30, "GET /readyz fails below this much free space in the root", parse=_size,
        shown="1G",
    )  # fmt: skip
    max_upload: int = setting(
        0, "largest accepted upload in bytes", parse=_non_negative_int, shown="0, no limit"
    )
    events_keep: int = setting(
        7, "days the root-wide event feed is kept (job histories stay with their jobs)",
        parse=_positive_int,
    )  # fmt: skip
    # webhooks
    webhook_timeout: float = seconds(10.0, "connect and total timeout of one webhook POST, seconds")
    webhook_retries: int = setting(
        5, "retries of a failed webhook delivery", parse=_non_negative_int
    )
    webhook_secret: str | None = setting(
        None, "HMAC secret to sign webhook POSTs with", shown="none: unsigned", secret=True
    )
    webhook_allow: list[str] = setting(
        [],
        "comma-separated host names, CIDR ranges and `public`: where webhooks may go",
        parse=_csv,
        shown="none: public addresses only",
    )
    webhook_backoff: float = seconds(10.0, "seconds before the first webhook retry, doubling")
    # staging
    archive: Path | None = setting(
        None, "archive folder staged files are copied from", parse=absolute_path, shown="none"
    )
    staging: Path | None = setting(
        None, "staging area files are copied into", parse=absolute_path, shown="none"
    )
    catalog: Path | None = setting(
        None, "tab-separated file of id<TAB>relative/path", parse=absolute_path, shown="none"
    )
    stage_parallel: int = setting(
        4, "files copied at the same time by the stage task", parse=_positive_int
    )
    stage_verify: bool = setting(
        False, "compare SHA-256 of source and copy when staging", parse=parse_bool
    )
    staging_max_ids: int = setting(10_000, "most ids in one staging request", parse=_positive_int)
    dts_dialect: str | None = setting(
        None, "also serve this DTS client dialect: jdp", parse=_dialect, shown="none"
    )
    dts_secret: str | None = setting(
        None,
        "secret shared with DTS clients (Authorization: Token USER_SECRET)",
        shown="none",
        secret=True,
    )
    dts_secret_file: Path | None = setting(
        None, "file holding the DTS secret on its first line", parse=absolute_path, shown="none"
    )
    # transfer APIs: (NAME, DIR) of --endpoint, see batchingest.endpoints
    endpoints: list[tuple[str, Path]] = setting(
        [],
        "NAME=DIR: a folder the transfer APIs may read and write, once per endpoint",
        parse=_endpoint,
        flag="endpoint",
        env="BATCHINGEST_ENDPOINTS",
        shown="none",
        repeat=True,
    )
    transfer_max_rate: int = setting(
        0,
        "bytes per second one transfer task may copy (K, M, G suffixes); 0: no limit",
        parse=_size,
    )
    log_level: str = setting("info", "the service log: " + ", ".join(LOG_LEVELS), parse=_log_level)
    log_format: str = setting(
        "text", "the service log's format: text, or json (one object a line)", parse=parse_format
    )

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
        # the transfer task takes endpoint folders from here, never from a job's files
        table = [[name, str(folder), False] for name, folder in self.endpoints]
        if self.archive is not None and self.staging is not None:
            table += [["archive", str(self.archive), True], ["staging", str(self.staging), False]]
        env["BATCHINGEST_TRANSFER_ENDPOINTS"] = json.dumps(table)
        env["BATCHINGEST_TRANSFER_MAX_RATE"] = str(self.transfer_max_rate)
        return env


# -- deriving flags and variables from the table ----------------------------------------


def options() -> Iterator[tuple[dataclasses.Field[Any], Option]]:
    """Every setting, in the order of the dataclass (which is the order of --help)."""
    for f in dataclasses.fields(Config):
        opt = f.metadata.get("option")
        if isinstance(opt, Option):
            yield f, opt


def flag_of(f: dataclasses.Field[Any], opt: Option) -> str:
    return opt.flag or f.name.replace("_", "-")


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.replace("-", "_").upper()


def env_of(f: dataclasses.Field[Any], opt: Option) -> str:
    """The variable of a setting: BATCHINGEST_ plus its flag, unless it names its own."""
    return opt.env or env_name(flag_of(f, opt))


# Settings that must never reach a task's environment or a log line.
SECRET_ENV = tuple(env_of(f, opt) for f, opt in options() if opt.secret)


def _help(f: dataclasses.Field[Any], opt: Option) -> str:
    env = env_of(f, opt)
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    if opt.switch or required:
        text = f"{opt.help} [{env}]"
    else:
        shown = opt.shown if opt.shown is not None else str(f.default)
        text = f"{opt.help} (default: {shown}) [{env}]"
    return text.replace("%", "%%")  # argparse formats help text with %


_METAVARS: dict[Callable[[str], Any], str] = {
    absolute_path: "PATH",
    _positive_int: "N",
    _non_negative_int: "N",
    _seconds: "SECONDS",
    _port: "PORT",
    _csv: "LIST",
    _log_level: "LEVEL",
    _size: "SIZE",
    _header_size: "SIZE",
    _positive_seconds: "SECONDS",
}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    for f, opt in options():
        flag = "--" + flag_of(f, opt)
        if opt.switch:
            parser.add_argument(
                flag, dest=f.name, action="store_true", default=None, help=_help(f, opt)
            )
        elif opt.repeat:
            metavar = _METAVARS.get(opt.parse, "TEXT")
            parser.add_argument(
                flag, dest=f.name, type=opt.parse, action="append", default=None,
                metavar=metavar, help=_help(f, opt),
            )  # fmt: skip
        else:
            metavar = _METAVARS.get(opt.parse, "TEXT")
            parser.add_argument(
                flag, dest=f.name, type=opt.parse, default=None, metavar=metavar, help=_help(f, opt)
            )


def _from_env(f: dataclasses.Field[Any], opt: Option, environ: Mapping[str, str]) -> Any:
    """The variable's value, parsed; None when unset or empty."""
    name = env_of(f, opt)
    raw = environ.get(name, "")
    # an empty variable counts as unset: BATCHINGEST_ROOT= must not mean "the current folder"
    if raw.strip() == "":
        return None
    try:
        return [opt.parse(item) for item in _csv(raw)] if opt.repeat else opt.parse(raw)
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise ConfigError(f"bad {name}: {e}") from None


def setting_from_env(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """One setting from its BATCHINGEST_* variable, parsed as serve parses it (None when
    unset), for the operator commands that must judge as the service does."""
    for f, opt in options():
        if f.name == name:
            return _from_env(f, opt, os.environ if environ is None else environ)
    raise KeyError(name)


def config_from_args(
    args: argparse.Namespace,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Merge parsed flags with the environment (flags win); raise ConfigError if bad."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f, opt in options():
        value = getattr(args, f.name, None)
        if value is None:
            value = _from_env(f, opt, environ)
        if opt.switch:
            # a switch given (flag or true variable) turns the setting away from its default
            if value:
                values[f.name] = not f.default
        elif value is not None:
            values[f.name] = value
    if "root" not in values:
        raise ConfigError("--root (or BATCHINGEST_ROOT) is required")
    cfg = Config(**values)
    if not cfg.api and not cfg.processor:
        raise ConfigError("--no-api and --no-processor together leave nothing to run")
    _check_endpoints(cfg)
    return cfg


def _check_endpoints(cfg: Config) -> None:
    from batchingest.endpoints import Endpoints, EndpointSpecError

    try:
        Endpoints.from_config(cfg)  # names given twice, or taken by archive/staging
    except EndpointSpecError as e:
        raise ConfigError(str(e)) from None


def parse_serve_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Config:
    """The settings of `batchingest serve ARGV` (for tests and embedding)."""
    parser = argparse.ArgumentParser(prog="batchingest serve")
    add_serve_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)), environ)
