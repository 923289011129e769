"""`GET /jobs` with `orderby`, `filter` or `fields` (see api/query.py for the syntax).

Without any of them the listing in api/jobs.py answers as it always has, from the
cached names alone. With them, each job is a Row, and its folder is looked at (one
statx, never opened) only when a time is needed: for every job when the filter or the
order uses `created` or `modified`, else only for the page shown. A job that moves or
goes while it is being listed is left out (or, looked at for the page only, shows null
times): the listing is a snapshot, like `ls`.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice, repeat
from typing import Any

from batchingest import filetimes
from batchingest.api import query
from batchingest.api.errors import ApiError
from batchingest.api.query import TEXT, TIME, WORD, Field
from batchingest.store import STATES, STATUS_OF_STATE, Store

# The columns a row can show, in the order shown; Name and Status unless `fields` says.
COLUMNS = ("Name", "Status", "Created", "Modified")
DEFAULT_COLUMNS = ("Name", "Status")
_UNKNOWN = object()
_RANK = {state: i for i, state in enumerate(STATES)}


class Row:
    __slots__ = ("_times", "name", "path", "state")

    def __init__(self, name: str, state: str, path: str) -> None:
        self.name = name
        self.state = state
        self.path = path
        self._times: Any = _UNKNOWN

    def times(self) -> filetimes.Times | None:
        """The folder's times, looked up once; None if the job is gone."""
        if self._times is _UNKNOWN:
            self._times = filetimes.folder_times(self.path)
        return self._times  # type: ignore[no-any-return]

    @property
    def gone(self) -> bool:
        return self._times is None

    def created(self) -> float:
        t = self.times()
        return float("-inf") if t is None else t.created  # a gone row is dropped later

    def modified(self) -> float:
        t = self.times()
        return float("-inf") if t is None else t.modified


FIELDS = (
    Field("name", TEXT, lambda r: r.name),
    # status words sort alphabetically: error, processing, queue, ready, success
    Field(
        "status", WORD, lambda r: STATUS_OF_STATE[r.state], words=tuple(STATUS_OF_STATE.values())
    ),
    Field("created", TIME, Row.created),
    Field("modified", TIME, Row.modified),
)


@dataclass(frozen=True)
class Query:
    test: query.Test | None
    keys: list[tuple[Field, bool]]
    columns: Sequence[str]


def asked(params: Any) -> bool:
    """Whether the request uses any list query (else the plain listing answers)."""
    return any(p in params for p in ("orderby", "filter", "fields"))


def parse(params: Any) -> Query:
    """The query parameters; a 400 InvalidParameter naming the wrong part."""
    try:
        test = query.parse_filter(params.getlist("filter"), FIELDS)
        keys = query.parse_orderby(params.get("orderby"), FIELDS)
        columns = query.parse_fields(params.get("fields"), COLUMNS) or DEFAULT_COLUMNS
    except query.QueryError as e:
        raise ApiError(400, "InvalidParameter", str(e)) from None
    return Query(test, keys, columns)


def _merged(per_state: Sequence[tuple[str, list[str]]]) -> Iterator[tuple[str, str]]:
    """(name, state) of every job by name, then state order, as the plain listing."""
    nonempty = [(state, names) for state, names in per_state if names]
    if len(nonempty) == 1:
        return zip(nonempty[0][1], repeat(nonempty[0][0]))
    merged: Iterator[tuple[str, int, str]] = heapq.merge(
        *[zip(names, repeat(_RANK[s]), repeat(s)) for s, names in nonempty]
    )
    return ((n, s) for n, _, s in merged)


def select(
    store: Store,
    per_state: Sequence[tuple[str, list[str]]],
    q: Query,
    window: tuple[int, int | None],
) -> tuple[int, list[dict[str, Any]]]:
    """(total, page) of the jobs (each state's sorted names) that pass the query.

    Blocking (a statx per job when a filter or order needs times): run in a thread.
    """
    prefixes = {state: f"{store.state_dir(state)}/" for state, _ in per_state}
    offset, stop = window
    if q.test is None and not q.keys:  # in name order already: only the page's rows
        page = [Row(n, s, prefixes[s] + n) for n, s in islice(_merged(per_state), offset, stop)]
        return sum(len(names) for _, names in per_state), [render(r, q.columns) for r in page]
    rows = [Row(n, s, prefixes[s] + n) for n, s in _merged(per_state)]
    if q.test is not None:
        rows = [r for r in rows if q.test(r)]
    query.sort(rows, q.keys)
    rows = [r for r in rows if not r.gone]  # looked at and found gone: not in the snapshot
    return len(rows), [render(r, q.columns) for r in rows[offset:stop]]


def render(row: Row, columns: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for column in columns:
        if column == "Name":
            out["Name"] = row.name
        elif column == "Status":
            out["Status"] = STATUS_OF_STATE[row.state]
        else:
            t = row.times()
            out[column] = None if t is None else filetimes.rfc3339(getattr(t, column.lower()))
    return out
