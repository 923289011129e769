"""`GET /jobs` with `orderby`, `filter` or `fields` (see api/query.py for the syntax).

Without any of them the listing in api/jobs.py answers as it always has, from the
cached names alone. With them, each job is a Row, and its folder is looked at (one
statx, never opened) only when a time is needed: for every job when the filter or the
order uses `created` or `modified`, else only for the page shown. A job that moves or
goes while it is being listed is left out (or, looked at for the page only, shows null
times): the listing is a snapshot, like `ls`.
"""

from __future__ import annotations

import asyncio
import heapq
from bisect import bisect_left, bisect_right
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
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
    # the state folder's path (shared by its rows), not the job's: 110,000 rows made
    # for a filter must stay cheap to make and small
    __slots__ = ("_times", "folder", "name", "state")

    def __init__(self, name: str, state: str, folder: str) -> None:
        self.name = name
        self.state = state
        self.folder = folder
        self._times: Any = _UNKNOWN

    def times(self) -> filetimes.Times | None:
        """The folder's times, looked up once; None if the job is gone."""
        if self._times is _UNKNOWN:
            self._times = filetimes.folder_times(self.folder + self.name)
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


def page(
    per_state: Sequence[tuple[str, list[str]]], offset: int, stop: int | None
) -> Iterator[tuple[str, str]]:
    """(name, state) of the jobs at positions offset..stop of the merged listing: by
    name, then state order, each state's names sorted already.

    Where the page starts is found by bisection in each state's list, so page 1,000 of
    110,000 jobs costs what page 1 does; only the page itself is merged.
    """
    lists = [(_RANK[state], state, names) for state, names in per_state if names]
    starts = _split([(rank, names) for rank, _, names in lists], offset)
    count = None if stop is None else max(0, stop - offset)
    if len(lists) == 1:
        _, state, names = lists[0]
        end = None if count is None else starts[0] + count
        return zip(names[starts[0] : end], repeat(state))
    tails = [names[i:] if i else names for (_, _, names), i in zip(lists, starts, strict=True)]
    merged: Iterator[tuple[str, int, str]] = heapq.merge(
        *[zip(t, repeat(rank), repeat(s)) for (rank, s, _), t in zip(lists, tails, strict=True)]
    )
    return ((n, s) for n, _, s in islice(merged, count))


# A listing of more rows than this is sent as it is rendered, CHUNK_ROWS at a time, so
# 110,000 jobs never sit in memory as one 5 MB body (nor its rows as objects).
STREAM_FROM = 2_000
CHUNK_ROWS = 1_000


def body(rows: Iterable[tuple[str, str]]) -> bytes:
    """The plain listing `[{"Name", "Status"}, ...]` of (name, state) rows."""
    return b"[" + _rendered(rows) + b"]\n"


async def chunks(rows: Iterator[tuple[str, str]]) -> AsyncIterator[bytes]:
    """body(rows) in pieces of CHUNK_ROWS rows, letting other requests in between."""
    yield b"["
    first = True
    while piece := list(islice(rows, CHUNK_ROWS)):
        yield (b"" if first else b",") + _rendered(piece)
        first = False
        await asyncio.sleep(0)
    yield b"]\n"


def _rendered(rows: Iterable[tuple[str, str]]) -> bytes:
    # names and statuses are plain [A-Za-z0-9._-]: nothing needs escaping
    return ",".join([f'{{"Name":"{n}","Status":"{STATUS_OF_STATE[s]}"}}' for n, s in rows]).encode()


def _split(lists: Sequence[tuple[int, list[str]]], k: int) -> list[int]:
    """For each (rank, sorted names), how many of its names come before position k of
    the merge of all of them (by name, then rank)."""
    if k <= 0:
        return [0] * len(lists)
    if k >= sum(len(names) for _, names in lists):
        return [len(names) for _, names in lists]
    for rank, names in lists:  # the k-th job is in one of the lists: find it
        lo, hi = 0, len(names)
        while lo < hi:
            mid = (lo + hi) // 2
            before = [_before(other, r, names[mid], rank) for r, other in lists]
            ahead = sum(before)
            if ahead < k:
                lo = mid + 1
            elif ahead > k:
                hi = mid
            else:
                return before
    raise AssertionError("position not found in sorted lists")  # they were not sorted


def _before(names: list[str], rank: int, name: str, name_rank: int) -> int:
    """How many (n, rank) of names come before (name, name_rank)."""
    return (bisect_left if rank >= name_rank else bisect_right)(names, name)


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
        shown = [Row(n, s, prefixes[s]) for n, s in page(per_state, offset, stop)]
        return sum(len(names) for _, names in per_state), [render(r, q.columns) for r in shown]
    rows = [Row(n, s, prefixes[s]) for n, s in page(per_state, 0, None)]
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
