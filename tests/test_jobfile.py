"""The JOB file: defaults, validation with clear messages, atomic saves, round trips."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchingest import jobfile
from batchingest.jobfile import JobFile, JobFileError


def test_missing_job_file_means_start(tmp_path: Path) -> None:
    job = jobfile.load(tmp_path)
    assert job == JobFile(todo=["start"], finished=[], extra={})


@pytest.mark.parametrize(
    "raw",
    [
        b"{}",
        b'{"Todo": [], "Finished": []}',
        b'{"Todo": []}',
        b'{"Finished": []}',
        b'{"Todo": null, "Finished": null}',
        b'  {"Todo": [], "Owner": "me"}\n',
    ],
)
def test_nothing_to_do_and_nothing_done_means_start(raw: bytes) -> None:
    job = jobfile.parse(raw)
    assert job.todo == ["start"] and job.finished == []


def test_todo_without_finished() -> None:
    job = jobfile.parse(b'{"Todo": ["a", "b"]}')
    assert job.todo == ["a", "b"] and job.finished == [] and job.extra == {}


def test_all_done_is_not_restarted() -> None:
    done = [{"Name": "start", "Start": "t0", "Finish": "t1", "Status": "ok"}]
    job = jobfile.parse(json.dumps({"Todo": [], "Finished": done}).encode())
    assert job.todo == [] and job.finished == done


def test_unknown_fields_kept_in_order_on_save(tmp_path: Path) -> None:
    raw = b'{"Zeta": 1, "Todo": ["a"], "Alpha": {"x": [1, 2]}, "Finished": [], "Mid": null}'
    job = jobfile.parse(raw)
    assert list(job.extra) == ["Zeta", "Alpha", "Mid"]
    job.finished.append({"Name": "a", "Status": "ok"})
    job.todo.pop(0)
    jobfile.save(tmp_path, job)
    saved = json.loads((tmp_path / "JOB").read_text())
    assert saved == {
        "Todo": [],
        "Finished": [{"Name": "a", "Status": "ok"}],
        "Zeta": 1,
        "Alpha": {"x": [1, 2]},
        "Mid": None,
    }
    assert [k for k in saved if k not in ("Todo", "Finished")] == ["Zeta", "Alpha", "Mid"]
    assert jobfile.load(tmp_path) == job


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"Todo: [a]", "not valid JSON"),
        (b'{"Todo": ["a"],}', "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b'["start"]', "must be a JSON object, not list"),
        (b'"start"', "must be a JSON object, not str"),
        (b"null", "must be a JSON object, not NoneType"),
        (b'{"Todo": "start"}', "Todo must be a list of task names"),
        (b'{"Todo": {"a": 1}}', "Todo must be a list of task names"),
        (b'{"Todo": [".x"]}', 'Todo[0] = ".x" is not a valid task name'),
        (b'{"Todo": ["ok", "a/b"]}', 'Todo[1] = "a/b" is not a valid task name'),
        (b'{"Todo": [""]}', 'Todo[0] = "" is not a valid task name'),
        (b'{"Todo": ["../x"]}', "is not a valid task name"),
        (b'{"Todo": ["a b"]}', "is not a valid task name"),
        (b'{"Todo": [1]}', "Todo[0] = 1 is not a valid task name"),
        (b'{"Todo": [null]}', "Todo[0] = null is not a valid task name"),
        (b'{"Todo": [["start"]]}', "is not a valid task name"),
        (b'{"Todo": ["a"], "Finished": {}}', "Finished must be a list"),
        (b'{"Todo": ["a"], "Finished": "start"}', "Finished must be a list"),
    ],
)
def test_bad_job_files_say_what_is_wrong(raw: bytes, message: str) -> None:
    with pytest.raises(JobFileError) as e:
        jobfile.parse(raw)
    assert message in str(e.value)
    assert str(e.value).startswith("JOB ")


def test_too_long_task_name() -> None:
    assert jobfile.parse(json.dumps({"Todo": ["t" * 255]}).encode()).todo == ["t" * 255]
    with pytest.raises(JobFileError, match=r"Todo\[0\] .* is not a valid task name"):
        jobfile.parse(json.dumps({"Todo": ["t" * 256]}).encode())


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000 + b"]" * 100_000,  # deeper than the decoder will go
        b'{"Todo": [], "Big": ' + b"9" * 5000 + b"}",  # longer than int() converts
    ],
)
def test_json_the_decoder_refuses_is_a_job_file_error(raw: bytes) -> None:
    with pytest.raises(JobFileError, match=r"^JOB "):
        jobfile.parse(raw)


def test_validate_refuses_non_objects() -> None:
    for value in (None, 1, "x", [], ["start"]):
        with pytest.raises(JobFileError):
            jobfile.validate(value)


def test_job_that_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "JOB").mkdir()
    with pytest.raises(JobFileError, match="folder"):
        jobfile.load(tmp_path)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    (tmp_path / "JOB").write_text("old, even if broken")
    (tmp_path / "data.bin").write_bytes(b"x")
    job = JobFile(todo=["b"], finished=[{"Name": "a", "Status": "ok"}], extra={"K": "v"})
    for _ in range(5):
        jobfile.save(tmp_path, job)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["JOB", "data.bin"]
    assert jobfile.load(tmp_path) == job
    assert (tmp_path / "JOB").read_bytes() == job.dumps()
    assert job.dumps().endswith(b"\n")


def test_write_atomic_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "JOB"
    target.write_text('{"Todo": ["old"]}')

    with pytest.raises(TypeError):
        jobfile.write_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_text() == '{"Todo": ["old"]}'
    assert [p.name for p in tmp_path.iterdir()] == ["JOB"]
    jobfile.write_atomic(target, b"new", durable=False)
    assert target.read_bytes() == b"new"


def test_now_rfc3339() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", jobfile.now_rfc3339())


def test_now_rfc3339_is_the_current_time_to_the_millisecond() -> None:
    for _ in range(50):  # across a change of second too (its text is kept per second)
        before = datetime.now(UTC)
        before = before.replace(microsecond=before.microsecond // 1000 * 1000)  # to the ms
        stamp = datetime.strptime(jobfile.now_rfc3339(), "%Y-%m-%dT%H:%M:%S.%f%z")
        after = datetime.now(UTC)
        assert before <= stamp <= after
        time.sleep(0.03)


# -- round trips -----------------------------------------------------------------------------

task_names = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-",
    min_size=1,
    max_size=40,
).filter(lambda n: not n.startswith("."))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
finished_entries = st.fixed_dictionaries(
    {
        "Name": task_names,
        "Start": st.just("2026-01-02T03:04:05.678Z"),
        "Finish": st.just("2026-01-02T03:04:06.000Z"),
        "Status": st.sampled_from(["ok", "error"]),
    },
    optional={"Code": st.integers(-255, 255)},
)
job_files = st.builds(
    JobFile,
    todo=st.lists(task_names, max_size=6),
    finished=st.lists(finished_entries, max_size=6),
    extra=st.dictionaries(
        st.text(max_size=10).filter(lambda k: k not in ("Todo", "Finished")),
        json_values,
        max_size=4,
    ),
).filter(lambda j: j.todo or j.finished)


@settings(max_examples=150)
@given(job_files)
def test_valid_job_files_round_trip(job: JobFile) -> None:
    again = jobfile.parse(job.dumps())
    assert again == job
    assert list(again.extra) == list(job.extra)
    assert again.dumps() == job.dumps()


@settings(max_examples=30, deadline=None)
@given(job=job_files)
def test_save_load_round_trip(tmp_path_factory: pytest.TempPathFactory, job: JobFile) -> None:
    folder = tmp_path_factory.mktemp("job")
    jobfile.save(folder, job)
    assert jobfile.load(folder) == job
    assert [p.name for p in folder.iterdir()] == ["JOB"]


@given(st.dictionaries(st.sampled_from(["Todo", "Finished", "X"]), json_values, max_size=3))
def test_any_json_object_either_loads_or_says_why(data: dict[str, Any]) -> None:
    raw = json.dumps(data).encode()
    try:
        job = jobfile.parse(raw)
    except JobFileError as e:
        assert str(e).startswith("JOB ")
        return
    assert job.todo or job.finished
    assert all(isinstance(t, str) for t in job.todo)


def test_a_job_over_the_size_cap_is_refused_by_path_and_by_content(tmp_path: Path) -> None:
    raw = json.dumps({"Todo": ["a"], "Pad": "x" * jobfile.JOB_LIMIT}).encode()
    with pytest.raises(JobFileError, match="larger than"):
        jobfile.parse(raw)  # what the API checks an uploaded JOB with
    (tmp_path / "JOB").write_bytes(raw)
    with pytest.raises(JobFileError, match="larger than"):
        jobfile.load(tmp_path)


def test_load_by_path_refuses_links(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "JOB").write_text('{"Todo": ["evil"]}')
    job = tmp_path / "job"
    job.mkdir()
    (job / "JOB").symlink_to(outside / "JOB")
    with pytest.raises(JobFileError, match="symbolic link"):
        jobfile.load(job)
    (tmp_path / "linked-job").symlink_to(outside)
    with pytest.raises(OSError):
        jobfile.load(tmp_path / "linked-job")
    assert jobfile.load(tmp_path / "gone") == JobFile()  # a job that moved on reads empty


@settings(max_examples=300)
@given(job_files, st.dictionaries(st.text(max_size=5), st.floats() | st.integers(), max_size=3))
def test_job_is_written_as_json_indents_it(job: JobFile, numbers: dict[str, Any]) -> None:
    # the fast path must not change one byte of what tools and curators have always read
    # (non-ASCII escaped, NaN, exponents, ints beyond 64 bits included)
    job.extra.update({f"n{k}": v for k, v in numbers.items()})
    assert job.dumps() == (json.dumps(job.to_json(), indent=2) + "\n").encode()


def test_plain_job_takes_the_fast_path_and_reads_alike() -> None:
    job = JobFile(todo=["a"], finished=[{"Name": "b", "Status": "ok"}], extra={"X": [1, {}]})
    expected = '{\n  "Todo": [\n    "a"\n  ],\n  "Finished": [\n    {\n      "Name": "b",'
    assert job.dumps().decode().startswith(expected)
    assert job.dumps().endswith(b'"X": [\n    1,\n    {}\n  ]\n}\n')
