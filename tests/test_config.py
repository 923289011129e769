"""Settings: flags, BATCHINGEST_* environment variables, defaults and bad values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from batchingest.config import (
    SECRET_ENV,
    Config,
    ConfigError,
    env_bool,
    env_name,
    env_of,
    flag_of,
    options,
    parse_bool,
    parse_serve_args,
)


def parse(*argv: str, **env: str) -> Config:
    return parse_serve_args(list(argv), environ=env)


def test_defaults(tmp_path: Path) -> None:
    cfg = parse("--root", str(tmp_path))
    assert cfg.root == tmp_path
    assert (cfg.workers, cfg.poll_interval, cfg.grace) == (2, 2.0, 30.0)
    assert cfg.task_timeout is None and cfg.force_polling is False
    assert cfg.api and cfg.processor
    assert cfg.tasks is None and cfg.tasks_dir == tmp_path / "tasks"
    assert cfg.tokens == [] and cfg.webhook_allow == []
    assert not cfg.staging_enabled


def test_env_names() -> None:
    assert env_name("root") == "BATCHINGEST_ROOT"
    assert env_name("poll-interval") == "BATCHINGEST_POLL_INTERVAL"
    assert "BATCHINGEST_TOKENS" in SECRET_ENV


def test_root_is_required() -> None:
    with pytest.raises(ConfigError, match=r"--root \(or BATCHINGEST_ROOT\) is required"):
        parse()


def test_root_from_env_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = parse(BATCHINGEST_ROOT="jobs", BATCHINGEST_TASKS="t")
    assert cfg.root == tmp_path / "jobs"
    assert cfg.tasks == tmp_path / "t" and cfg.tasks_dir == tmp_path / "t"


def test_flags_win_over_env(tmp_path: Path) -> None:
    cfg = parse(
        "--root",
        str(tmp_path / "flag"),
        "--workers",
        "7",
        "--poll-interval",
        "0.25",
        BATCHINGEST_ROOT=str(tmp_path / "env"),
        BATCHINGEST_WORKERS="3",
        BATCHINGEST_POLL_INTERVAL="9",
        BATCHINGEST_GRACE="4.5",
    )
    assert cfg.root == tmp_path / "flag"
    assert cfg.workers == 7 and cfg.poll_interval == 0.25
    assert cfg.grace == 4.5  # no flag given: the environment counts


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        (" on ", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
        ("", False),
    ],
)
def test_booleans_from_env(value: str, expected: bool) -> None:
    cfg = parse(
        BATCHINGEST_ROOT="/r", BATCHINGEST_FORCE_POLLING=value, BATCHINGEST_STAGE_VERIFY=value
    )
    assert cfg.force_polling is expected and cfg.stage_verify is expected


def test_boolean_flags() -> None:
    cfg = parse("--root", "/r", "--force-polling", "--no-api", BATCHINGEST_FORCE_POLLING="0")
    assert cfg.force_polling is True  # the switch on the command line wins
    assert cfg.api is False and cfg.processor is True
    cfg = parse("--root", "/r", BATCHINGEST_NO_PROCESSOR="true")
    assert cfg.api is True and cfg.processor is False


def test_no_api_and_no_processor_together_is_refused() -> None:
    with pytest.raises(ConfigError, match="leave nothing to run"):
        parse("--root", "/r", "--no-api", BATCHINGEST_NO_PROCESSOR="1")


@pytest.mark.parametrize(
    ("var", "value", "reason"),
    [
        ("BATCHINGEST_FORCE_POLLING", "maybe", "not a boolean: 'maybe'"),
        ("BATCHINGEST_WORKERS", "0", "must be at least 1"),
        ("BATCHINGEST_WORKERS", "two", "invalid literal"),
        ("BATCHINGEST_POLL_INTERVAL", "-1", "not negative: -1"),
        ("BATCHINGEST_POLL_INTERVAL", "nan", "must be a number of seconds, not negative: nan"),
        ("BATCHINGEST_GRACE", "soon", "could not convert"),
        ("BATCHINGEST_PORT", "http", "invalid literal"),
        ("BATCHINGEST_MAX_UPLOAD", "-5", "must not be negative"),
        ("BATCHINGEST_WEBHOOK_RETRIES", "-1", "must not be negative"),
        ("BATCHINGEST_STAGE_PARALLEL", "0", "must be at least 1"),
        ("BATCHINGEST_STAGE_VERIFY", "maybe", "not a boolean: 'maybe'"),
        ("BATCHINGEST_NO_API", "2", "not a boolean: '2'"),
        ("BATCHINGEST_PORT", "0", "from 1 to 65535"),
        ("BATCHINGEST_PORT", "65536", "from 1 to 65535"),
        ("BATCHINGEST_LOG_LEVEL", "verbose", "must be one of debug, info, warning, error"),
        ("BATCHINGEST_WEBHOOK_BACKOFF", "soon", "could not convert"),
    ],
)
def test_bad_env_values_exit_with_a_clear_message(var: str, value: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(BATCHINGEST_ROOT="/r", **{var: value})
    message = str(e.value)
    assert message.startswith(f"bad {var}: ")
    assert reason in message


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--workers", "0"),
        ("--workers", "x"),
        ("--grace", "-3"),
        ("--task-timeout", "nan"),
        ("--port", "eighty"),
    ],
)
def test_bad_flag_values_exit(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse("--root", "/r", flag, value)
    assert e.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_empty_env_values_count_as_unset(tmp_path: Path) -> None:
    """`BATCHINGEST_ROOT= batchingest serve` must not quietly serve the current folder."""
    with pytest.raises(ConfigError, match="is required"):
        parse(BATCHINGEST_ROOT="")
    cfg = parse(
        "--root",
        str(tmp_path),
        BATCHINGEST_TASKS="",
        BATCHINGEST_WORKERS="",
        BATCHINGEST_WEBHOOK_SECRET="",
    )
    assert cfg.tasks is None and cfg.tasks_dir == tmp_path / "tasks"
    assert cfg.workers == 2 and cfg.webhook_secret is None


def test_lists_and_secrets(tmp_path: Path) -> None:
    cfg = parse(
        "--root",
        str(tmp_path),
        "--webhook-allow",
        "example.org, 10.0.0.0/8,",
        BATCHINGEST_TOKENS=" a ,b,,c ",
        BATCHINGEST_WEBHOOK_SECRET="s3cret",
    )
    assert cfg.tokens == ["a", "b", "c"]
    assert cfg.webhook_allow == ["example.org", "10.0.0.0/8"]
    # secrets stay out of the printed settings (and so out of logs)
    assert "s3cret" not in repr(cfg) and "'a'" not in repr(cfg)


def test_task_env(tmp_path: Path) -> None:
    cfg = parse("--root", str(tmp_path))
    no_transfers = {"BATCHINGEST_TRANSFER_ENDPOINTS": "[]", "BATCHINGEST_TRANSFER_MAX_RATE": "0"}
    assert cfg.task_env() == {
        "BATCHINGEST_STAGE_PARALLEL": "4",
        "BATCHINGEST_STAGE_VERIFY": "0",
        **no_transfers,
    }
    cfg = parse(
        "--root",
        str(tmp_path),
        "--archive",
        "/arch",
        "--staging",
        "/stage",
        "--stage-verify",
        "--catalog",
        "/cat.tsv",
        BATCHINGEST_STAGE_PARALLEL="8",
    )
    assert cfg.staging_enabled
    assert cfg.task_env() == {
        "BATCHINGEST_ARCHIVE": "/arch",
        "BATCHINGEST_STAGING": "/stage",
        "BATCHINGEST_CATALOG": "/cat.tsv",
        "BATCHINGEST_STAGING_MAX_IDS": "10000",
        "BATCHINGEST_STAGE_PARALLEL": "8",
        "BATCHINGEST_STAGE_VERIFY": "1",
        # the transfer task learns the endpoints (here archive and staging) from its settings
        "BATCHINGEST_TRANSFER_ENDPOINTS": json.dumps(
            [["archive", "/arch", True], ["staging", "/stage", False]]
        ),
        "BATCHINGEST_TRANSFER_MAX_RATE": "0",
    }


def test_command_line_errors(tmp_path: Path) -> None:
    """The real command: a missing root and a bad env value are one clear line, exit != 0."""
    env = {"PATH": "/usr/bin:/bin"}
    run = [sys.executable, "-m", "batchingest.cli", "serve"]
    p = subprocess.run(run, env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert "--root (or BATCHINGEST_ROOT) is required" in p.stderr
    assert "Traceback" not in p.stderr
    p = subprocess.run(
        run,
        env={**env, "BATCHINGEST_ROOT": str(tmp_path), "BATCHINGEST_WORKERS": "-2"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.returncode == 2
    assert "bad BATCHINGEST_WORKERS: must be at least 1: -2" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "queue").exists()  # nothing was started


def test_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tasks run in the job folder, so relative paths from the command line must not leak."""
    monkeypatch.chdir(tmp_path)
    cfg = parse_serve_args(
        ["--root", "r", "--archive", "a", "--staging", "s", "--catalog", "c.tsv",
         "--token-file", "t", "--tasks", "k"],
        environ={},
    )  # fmt: skip
    for value in (cfg.root, cfg.archive, cfg.staging, cfg.catalog, cfg.token_file, cfg.tasks):
        assert value is not None and value.is_absolute() and value.parent == tmp_path
    assert cfg.task_env()["BATCHINGEST_ARCHIVE"] == str(tmp_path / "a")


def test_no_in_a_variable_means_off_for_every_switch() -> None:
    """One boolean reader: "no" used to leave some switches on, depending on who read it."""
    switches = [f.name for f, opt in options() if opt.switch]
    assert {"force_polling", "stage_verify", "api", "processor", "init"} <= set(switches)
    default = parse(BATCHINGEST_ROOT="/r")
    env = {env_of(f, opt) for f, opt in options() if opt.switch}
    assert {"BATCHINGEST_NO_API", "BATCHINGEST_STAGE_VERIFY"} <= env
    cfg = parse(BATCHINGEST_ROOT="/r", **dict.fromkeys(env, "no"))
    assert cfg == default
    assert cfg.api and cfg.processor and not cfg.stage_verify
    assert cfg.task_env()["BATCHINGEST_STAGE_VERIFY"] == "0"


@pytest.mark.parametrize(("value", "expected"), [("yes", True), ("No", False), (" ", None)])
def test_env_bool(value: str, expected: bool | None) -> None:
    name = "BATCHINGEST_SOMETHING"
    for default in (True, False):
        want = default if expected is None else expected
        assert env_bool(name, default, {name: value}) is want
    assert env_bool(name, True, {}) is True
    with pytest.raises(ValueError, match="not a boolean"):
        parse_bool("y")


def test_every_setting_is_a_field_with_a_flag_and_a_variable() -> None:
    """One table: each Config field that is a setting has a flag, a variable and help."""
    seen = {}
    for f, opt in options():
        flag = flag_of(f, opt)
        seen[flag] = env_name(flag)
        assert opt.help
    # the names operators already use, unchanged
    for flag in ("root", "tasks", "workers", "poll-interval", "force-polling", "task-timeout",
                 "grace", "no-api", "no-processor", "host", "port", "tokens", "token-file",
                 "max-upload", "webhook-timeout", "webhook-retries", "webhook-secret",
                 "webhook-allow", "webhook-backoff", "archive", "staging", "catalog",
                 "stage-parallel", "stage-verify", "staging-max-ids", "log-level"):  # fmt: skip
        assert flag in seen, flag
    assert SECRET_ENV == (
        "BATCHINGEST_TOKENS",
        "BATCHINGEST_WEBHOOK_SECRET",
        "BATCHINGEST_DTS_SECRET",
    )


def test_webhook_backoff_comes_through_config() -> None:
    assert parse(BATCHINGEST_ROOT="/r").webhook_backoff == 10.0
    assert parse(BATCHINGEST_ROOT="/r", BATCHINGEST_WEBHOOK_BACKOFF="0.05").webhook_backoff == 0.05
    assert parse("--root", "/r", "--webhook-backoff", "3").webhook_backoff == 3.0
    assert Config(root=Path("/r")).webhook_backoff == 10.0


def test_init_and_log_level(tmp_path: Path) -> None:
    cfg = parse("--root", str(tmp_path))
    assert cfg.init is False and cfg.log_level == "info"
    cfg = parse(BATCHINGEST_ROOT=str(tmp_path), BATCHINGEST_INIT="1", BATCHINGEST_LOG_LEVEL="DEBUG")
    assert cfg.init is True and cfg.log_level == "debug"
    assert parse("--root", str(tmp_path), "--init").init is True


def test_empty_root_flag_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """`--root "$UNSET"` must not mean the current folder either."""
    with pytest.raises(SystemExit) as e:
        parse("--root", "")
    assert e.value.code == 2
    assert "argument --root: must not be empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "status", "said"),
    [
        ("no", 0, "stage: 1 files, 5 bytes"),
        ("off", 0, "stage: 1 files, 5 bytes"),
        ("yes", 0, "verifying SHA-256"),
        ("maybe", 2, "ERROR stage: bad BATCHINGEST_STAGE_VERIFY: not a boolean: 'maybe'"),
    ],
)
def test_stage_task_reads_booleans_as_the_service_does(
    tmp_path: Path, value: str, status: int, said: str
) -> None:
    """A hand-written `stage` wrapper passing "no" used to get SHA-256 verification."""
    import os

    from batchingest.staging import MANIFEST, Resolver, manifest_bytes

    archive, staging, job = tmp_path / "archive", tmp_path / "staging", tmp_path / "job"
    for d in (archive, staging, job):
        d.mkdir()
    (archive / "a.txt").write_bytes(b"hello")
    entries, _, _ = Resolver(archive).resolve(["a.txt"])
    (job / MANIFEST).write_bytes(manifest_bytes(entries, archive, staging, "job"))
    env = {**os.environ, "JOBPATH": str(job), "JOBNAME": "job", "BATCHINGEST_ARCHIVE": str(archive),
           "BATCHINGEST_STAGING": str(staging), "BATCHINGEST_STAGE_VERIFY": value}  # fmt: skip
    p = subprocess.run([sys.executable, "-m", "batchingest.tasks.stage"], cwd=job, env=env,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == status, p.stdout + p.stderr
    assert said in p.stdout and "Traceback" not in p.stderr
    assert ("verifying SHA-256" in p.stdout) is (value == "yes")


def test_dts_dialect_and_secret(tmp_path: Path) -> None:
    assert parse("--root", str(tmp_path), "--dts-dialect", "JDP").dts_dialect == "jdp"
    assert parse("--root", str(tmp_path), "--dts-dialect", "none").dts_dialect is None
    with pytest.raises((SystemExit, ConfigError)):
        parse("--root", str(tmp_path), "--dts-dialect", "globus")
    cfg = parse("--root", str(tmp_path), BATCHINGEST_DTS_SECRET="s3cret")
    assert cfg.dts_secret == "s3cret" and "s3cret" not in repr(cfg)
    assert "BATCHINGEST_DTS_SECRET" in SECRET_ENV
