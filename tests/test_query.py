"""List queries on `GET /jobs` against a model: hypothesis makes job folders in a real
jobs root, then filters, orders, field lists, statuses and pages, and the API's answer
must be what a plain model computes from the jobs and their times.

The model is written independently of api/query.py: it compares rows key by key
(functools.cmp_to_key) instead of stable sorts, and reads the filter from the
structure hypothesis drew, not from the text sent.
"""

from __future__ import annotations

import ctypes
import functools
import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.datastructures import QueryParams
from starlette.requests import Request
from test_api import call, make_app

from batchingest import filetimes
from batchingest.api import joblist, query
from batchingest.api.errors import ApiError
from batchingest.api.globus import query as globus_query
from batchingest.store import STATES, STATUS_OF_STATE, Store

NAMES = ("a", "a-1", "a-2", "ab", "b", "b.x", "B", "ba", "c_1")
PREFIXES = ("a", "a-", "b", "B", "c", "x", "")
STATUSES = tuple(STATUS_OF_STATE.values())
COLUMNS = ("Name", "Status", "Created", "Modified")
RANK = {STATUS_OF_STATE[s]: i for i, s in enumerate(STATES)}


@dataclass(frozen=True)
class Job:
    name: str
    status: str
    created: int  # milliseconds, as shown
    modified: int

    def value(self, field: str) -> Any:
        return {"name": self.name, "status": self.status}.get(field) or getattr(self, field)


def ms(text: str) -> int:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return round(moment.timestamp() * 1000)


# -- times as a client writes them, and the instant each one means -----------------------


def _format(at_ms: int, form: str) -> tuple[str, int]:
    """A time in one of the accepted forms, and the millisecond it stands for."""
    moment = datetime.fromtimestamp(at_ms // 1000, UTC) + timedelta(milliseconds=at_ms % 1000)
    if form == "date":
        day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        return day.strftime("%Y-%m-%d"), round(day.timestamp() * 1000)
    if form == "seconds":
        whole = moment.replace(microsecond=0)
        return whole.strftime("%Y-%m-%d %H:%M:%S"), round(whole.timestamp() * 1000)
    if form == "rfc3339":
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z", at_ms
    if form == "offset":  # the same instant, written in another zone
        local = moment.astimezone(timezone(timedelta(hours=-5, minutes=-30)))
        return local.isoformat(timespec="milliseconds"), at_ms
    assert form == "no-zone"  # RFC 3339 without a zone: UTC
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f"), at_ms


FORMS = ("date", "seconds", "rfc3339", "offset", "no-zone")


# -- drawing queries: (text sent, structure the model uses) --------------------------------


@st.composite
def bound(draw: st.DrawFn, jobs: list[Job]) -> tuple[str, int | None]:
    if draw(st.booleans()):
        return "", None
    if jobs and draw(st.integers(0, 3)):
        near = draw(st.sampled_from(jobs))
        at = getattr(near, draw(st.sampled_from(["created", "modified"])))
        at += draw(st.sampled_from([-1, 0, 0, 1, -86_400_000]))
    else:
        at = draw(st.integers(0, 4_000_000_000_000))
    text, value = _format(at, draw(st.sampled_from(FORMS)))
    return text, value


@st.composite
def clause(draw: st.DrawFn, jobs: list[Job]) -> tuple[str, Any]:
    kind = draw(st.sampled_from(["name", "status", "created", "modified"]))
    if kind == "status":
        words = draw(st.lists(st.sampled_from(STATUSES), min_size=1, max_size=3, unique=True))
        return f"status:{','.join(words)}", ("in", kind, set(words))
    if kind == "name":
        op = draw(st.sampled_from(["list", "=", "!=", "~", "!~"]))
        if op == "list":
            names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3))
            return f"name:{','.join(names)}", ("in", kind, set(names))
        text = draw(st.sampled_from(PREFIXES if "~" in op else NAMES))
        return f"name:{op}{text}", (op, kind, text)
    (low_text, low), (high_text, high) = draw(bound(jobs)), draw(bound(jobs))
    return f"{kind}:{low_text},{high_text}", ("range", kind, (low, high))


def holds(job: Job, test: tuple[str, str, Any]) -> bool:
    op, field, arg = test
    value = job.value(field)
    if op == "in":
        return value in arg  # type: ignore[no-any-return]
    if op in ("=", "!="):
        return (value == arg) == (op == "=")  # type: ignore[no-any-return]
    if op in ("~", "!~"):
        return value.startswith(arg) == (op == "~")  # type: ignore[no-any-return]
    low, high = arg
    return (low is None or low <= value) and (high is None or value <= high)  # type: ignore[no-any-return]


@st.composite
def queries(draw: st.DrawFn, jobs: list[Job]) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    params: list[tuple[str, str]] = []
    model: dict[str, Any] = {"filters": [], "order": [], "columns": ["Name", "Status"]}
    for _ in range(draw(st.integers(0, 2))):
        drawn = draw(st.lists(clause(jobs), min_size=1, max_size=3))
        params.append(("filter", "/".join(text for text, _ in drawn)))
        model["filters"].append([test for _, test in drawn])
    if draw(st.booleans()):
        order = draw(
            st.lists(st.sampled_from(["name", "status", "created", "modified"]), max_size=3)
        )
        parts = []
        for field in order:
            direction = draw(st.sampled_from(["", " asc", " DESC", " desc"]))
            parts.append(field + direction)
            model["order"].append((field, "desc" in direction.lower()))
        params.append(("orderby", ",".join(parts)))
    if draw(st.booleans()):
        cols = draw(st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=4, unique=True))
        params.append(("fields", ",".join(draw(st.sampled_from([c, c.lower()])) for c in cols)))
        model["columns"] = [c for c in COLUMNS if c in cols]
    if not params:  # at least one list query: the plain listing is tested elsewhere
        params.append(("orderby", ""))
    if draw(st.booleans()):
        statuses = draw(st.lists(st.sampled_from(STATUSES), min_size=1, max_size=3, unique=True))
        params.append(("status", ",".join(statuses)))
        model["statuses"] = set(statuses)
    model["offset"] = draw(st.none() | st.integers(0, 10))
    model["limit"] = draw(st.none() | st.integers(0, 10))
    for key in ("offset", "limit"):
        if model[key] is not None:
            params.append((key, str(model[key])))
    return params, model


def expected(jobs: list[Job], model: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    rows = [j for j in jobs if j.status in model.get("statuses", STATUSES)]
    if model["filters"]:
        rows = [j for j in rows if any(all(holds(j, t) for t in f) for f in model["filters"])]

    def compare(a: Job, b: Job) -> int:
        for field, descending in model["order"]:
            x, y = a.value(field), b.value(field)
            if x != y:
                return (1 if x > y else -1) * (-1 if descending else 1)
        x, y = (a.name, RANK[a.status]), (b.name, RANK[b.status])
        return (x > y) - (x < y)

    rows.sort(key=functools.cmp_to_key(compare))
    offset = model["offset"] or 0
    page = rows[offset:] if model["limit"] is None else rows[offset : offset + model["limit"]]
    return len(rows), [show(j, model["columns"]) for j in page]


def show(job: Job, columns: list[str]) -> dict[str, Any]:
    everything = {"Name": job.name, "Status": job.status, "Created": job.created}
    everything["Modified"] = job.modified
    return {c: everything[c] for c in columns}


# -- the property --------------------------------------------------------------------------

jobsets = st.lists(
    st.tuples(st.sampled_from(NAMES), st.sampled_from(STATES), st.booleans()),
    max_size=8,
    unique_by=lambda t: (t[0], t[1]),
)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(made=jobsets, data=st.data())
def test_list_queries_match_the_model(
    tmp_path: Path, made: list[tuple[str, str, bool]], data: st.DataObject
) -> None:
    root = tmp_path / uuid.uuid4().hex
    Store(root).init()
    for name, state, pause in made:
        (root / state / name).mkdir()
        if pause:
            time.sleep(0.002)  # so that times differ, and some are equal
    app, _ = make_app(root)
    listed = call(app, "GET", "/jobs?fields=Name,Status,Created,Modified").json()
    jobs = [Job(j["Name"], j["Status"], ms(j["Created"]), ms(j["Modified"])) for j in listed]
    assert sorted((j.name, j.status) for j in jobs) == sorted(
        (name, STATUS_OF_STATE[state]) for name, state, _ in made
    )
    for job in jobs:  # Modified is the folder's ctime, to the millisecond
        st_ = os.lstat(root / STATES[RANK[job.status]] / job.name)
        assert job.modified == st_.st_ctime_ns // 1_000_000
        assert job.created <= job.modified
    params, model = data.draw(queries(jobs))
    reply = call(app, "GET", "/jobs?" + urlencode(params))
    assert reply.status == 200, reply.body
    total, page = expected(jobs, model)
    got = reply.json()
    for row in got:
        for column in ("Created", "Modified"):
            if column in row:
                row[column] = ms(row[column])
    assert got == page
    assert reply.headers["x-total-count"] == str(total)


# -- the parser alone ------------------------------------------------------------------------


@given(
    st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1)),
    st.integers(-14 * 60, 14 * 60),
)
def test_parse_time_reads_rfc3339_in_any_zone(moment: datetime, minutes: int) -> None:
    zone = timezone(timedelta(minutes=minutes))
    aware = moment.replace(tzinfo=zone)
    text = aware.isoformat(timespec="microseconds")
    assert query.parse_time(text) == aware.timestamp()
    assert query.parse_time(text.replace("T", " ")) == aware.timestamp()
    naive = moment.isoformat(timespec="seconds")  # no zone: UTC
    assert query.parse_time(naive) == moment.replace(microsecond=0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    "text",
    ["", "2026", "2026-1-1", "2026-01-01T", "2026-01-01 25:00:00", "2026-02-30", "01/02/2026",
     "2026-01-01T00:00:00+2", "2026-01-01T00:00:00.Z", "now"],
)  # fmt: skip
def test_parse_time_refuses(text: str) -> None:
    with pytest.raises(query.QueryError, match="time"):
        query.parse_time(text)


# -- the folder times --------------------------------------------------------------------------


def test_folder_times(tmp_path: Path) -> None:
    assert ctypes.sizeof(filetimes._Statx) == 256  # the kernel's struct statx
    (tmp_path / "job").mkdir()
    before = time.time()
    (tmp_path / "job" / "f").write_text("x")  # an entry added: the folder's ctime moves
    t = filetimes.folder_times(str(tmp_path / "job"))
    assert t is not None
    st_ = os.lstat(tmp_path / "job")
    assert t.modified == st_.st_ctime_ns // 1_000_000 / 1000 >= before - 0.01
    assert t.created <= t.modified
    # never follows a link, and only folders have times here
    (tmp_path / "link").symlink_to("job")
    os.mkfifo(tmp_path / "fifo")
    for name in ("link", "fifo", "job/f", "missing", "job/f/below"):
        assert filetimes.folder_times(str(tmp_path / name)) is None


# -- the same parser under the Globus ls rules ---------------------------------------------


def _ls(params: list[tuple[str, str]], docs: list[dict[str, Any]]) -> list[str]:
    request = Request({"type": "http", "query_string": urlencode(params).encode(), "headers": []})
    test = globus_query.file_filter(request)
    kept = [d for d in docs if test is None or test(d)]
    globus_query.sort(kept, globus_query.order_keys(request))
    return [d["name"] for d in kept]


def test_globus_ls_rules_differ_where_they_should() -> None:
    docs = [
        {"name": n, "type": "file", "size": s, globus_query.MTIME: t}
        for n, s, t in [("f1.txt", 1, 946684800.0), ("f10.txt", 10, 946684801.0), ("g", 5, 0.0)]
    ]
    # `~` is a whole-name glob there, a prefix for job names
    assert _ls([("filter", "name:~f1*.txt")], docs) == ["f1.txt", "f10.txt"]
    assert _ls([("filter", "name:~f1")], docs) == []
    # a range leaves out its end there, and numbers take comparisons
    assert _ls([("filter", "size:1,10")], docs) == ["f1.txt", "g"]
    assert _ls([("filter", "last_modified:,2000-01-01 00:00:01")], docs) == ["f1.txt", "g"]
    assert _ls([("filter", "size:>=5"), ("orderby", "size desc")], docs) == ["f10.txt", "g"]
    with pytest.raises(ApiError) as e:
        _ls([("filter", "size:>lots")], docs)
    assert (e.value.status, e.value.code) == (400, "ClientError.BadRequest")
    assert "'lots'" in e.value.message


def test_a_job_gone_during_the_listing(root: Path) -> None:
    """Listed, then gone before its folder is looked at: left out of a listing that
    filters or orders on times, and shown with null times where only the page needs them."""
    store = Store(root)
    store.create("here")
    per_state = [("data", ["gone", "here"])]  # the names as listed a moment earlier

    def select(params: str, window: tuple[int, int | None] = (0, None)) -> Any:
        return joblist.select(store, per_state, joblist.parse(QueryParams(params)), window)

    total, page = select("orderby=modified&fields=Name")
    assert (total, page) == (1, [{"Name": "here"}])
    total, page = select("filter=created:2000-01-01,&fields=Name")
    assert (total, page) == (1, [{"Name": "here"}])
    total, page = select("fields=Name,Modified")
    assert total == 2 and page[0] == {"Name": "gone", "Modified": None}
    assert page[1]["Modified"] is not None
    # not looked at when no time is needed
    assert select("filter=name:~g", (0, 1)) == (1, [{"Name": "gone", "Status": "ready"}])
