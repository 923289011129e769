"""What the dashboard shows, read from the jobs root through Store and fs.py.

Counts come from `Store.job_names`, which keeps each state's listing while its folder is
unchanged, so the overview stays cheap with 100,000 jobs. When a job arrived in its
state is taken from its folder's ctime: a rename sets it, a user cannot set it back
(`cp -p` and `touch` set mtime only), and it costs one `stat` of the folder entry (never
followed) per job, done once per job and kept while the job stays where it is. Writing
into a job folder later moves it too, so these times are an approximation until the
service keeps an event history.
"""

from __future__ import annotations

import bisect
import contextlib
import heapq
import math
import os
import re
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice, repeat
from typing import Any

from batchingest import fs
from batchingest.store import FINAL, JobNotFound, State, Store

HOUR = 3600.0
BUCKETS = 12  # the last hour in 5-minute bars
MAX_LIST = 500  # rows a list page may ask for
MAX_ENTRIES = 2000  # names of one folder the file view lists
NAMED = 20  # names shown per group on the overview
# Staging requests are jobs named by their request id (batchingest.staging).
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Past this many jobs come or gone, a state's Listing is built again rather than changed.
_UPDATE_MOST = 2_000
SORTS = ("name", "-name", "state", "-state", "changed", "-changed")


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Listing:
    """One state's jobs with when each arrived, and what the overview needs of them,
    worked out once per listing rather than on every look."""

    names: list[str]
    times: dict[str, float]
    stamps: list[float] = field(default_factory=list)  # every time, ascending
    latest: list[tuple[float, str]] = field(default_factory=list)  # NAMED newest
    requests: list[tuple[float, str]] = field(default_factory=list)  # staging, newest first
    by_time: list[tuple[float, str]] = field(default_factory=list)  # (time, name), ascending

    def __post_init__(self) -> None:
        if not self.by_time:
            self.by_time = sorted((t, n) for n, t in self.times.items())
            self.stamps = [t for t, _ in self.by_time]
            self.requests = sorted(
                ((t, n) for n, t in self.times.items() if is_request(n)), reverse=True
            )
        self.latest = self.by_time[: -NAMED - 1 : -1]

    def since(self, t: float) -> int:
        """How many arrived at t or later."""
        return len(self.stamps) - bisect.bisect_left(self.stamps, t)

    def changed(self, names: list[str], gone: list[str], new: dict[str, float]) -> Listing:
        """This listing with the jobs gone taken out and the new ones put in, each in
        its place: a few bisections each, where building it again sorts every job."""
        times = dict(self.times)
        by_time, stamps = self.by_time.copy(), self.stamps.copy()
        requests = self.requests.copy()
        for name in gone:
            row = (times.pop(name), name)
            i = bisect.bisect_left(by_time, row)
            del by_time[i], stamps[i]
            if is_request(name):
                requests.remove(row)
        for name, t in new.items():
            times[name] = t
            i = bisect.bisect_left(by_time, (t, name))
            by_time.insert(i, (t, name))
            stamps.insert(i, t)
            if is_request(name):
                requests.append((t, name))
        requests.sort(reverse=True)
        return Listing(names, times, stamps, [], requests, by_time)


def is_request(name: str) -> bool:
    # the length and dash first: a cheap test that rules out almost every other name
    return len(name) == 36 and name[8] == "-" and bool(_UUID.fullmatch(name))


@dataclass
class ChangeTimes:
    """Per state: when each job arrived there (folder ctime), kept between calls.

    A state's listing from Store.job_names is the same list object while the folder is
    unchanged; then everything is reused as it is. When it changed, only the names not
    seen before are looked at.
    """

    store: Store
    _cache: dict[State, Listing] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def listing(self, state: State) -> Listing:
        names = self.store.job_names(state)
        with self._lock:
            old = self._cache.get(state)
            if old is not None and old.names is names:
                return old
            before = old.times if old is not None else {}
            changes = None if old is None else self.store.name_changes(state, old.names, names)
            if changes is not None:  # the store knows what changed: look at those only
                gone = [n for n in changes if n in before]  # a job back again: its new time
                new = stat_times(self.store, state, [n for n, there in changes.items() if there])
            else:
                now = set(names)  # set differences run at C speed
                gone = list(before.keys() - now)
                new = stat_times(self.store, state, now - before.keys())
            if old is not None and len(gone) + len(new) <= _UPDATE_MOST:
                self._cache[state] = old.changed(names, gone, new)
            else:
                dropped = set(gone)
                times = {n: before[n] for n in names if n in before and n not in dropped}
                times.update(new)
                self._cache[state] = Listing(names, times)
            return self._cache[state]

    def of(self, state: State) -> dict[str, float]:
        return self.listing(state).times


def stat_times(store: Store, state: State, names: Iterable[str]) -> dict[str, float]:
    """Folder ctimes of the named jobs of one state; a job gone meanwhile is left out.

    Each job folder entry is looked at with lstat beneath the state folder's descriptor:
    nothing is followed and nothing inside a job is opened.
    """
    found: dict[str, float] = {}
    try:
        dir_fd = os.open(
            store.state_dir(state), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        )
    except OSError:
        return found
    try:
        for name in names:
            with contextlib.suppress(OSError):
                found[name] = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_ctime
    finally:
        os.close(dir_fd)
    return found


def overview(store: Store, times: ChangeTimes, now: float | None = None) -> dict[str, Any]:
    """Counts per state, the last hour's finished jobs, and what is running or staging.

    With the listings unchanged this is a few bisections of sorted times: no pass over
    the jobs, so it costs the same with 100 jobs or 100,000.
    """
    now = time.time() if now is None else now
    since = now - HOUR
    counts = {state.status: len(store.job_names(state)) for state in State}
    final = {state: times.listing(state) for state in FINAL}
    edges = [since + i * HOUR / BUCKETS for i in range(BUCKETS)] + [math.inf]
    buckets = [
        {
            "start": iso(edges[i]),
            **{s.status: final[s].since(edges[i]) - final[s].since(edges[i + 1]) for s in FINAL},
        }
        for i in range(BUCKETS)
    ]
    succeeded, failed = final[State.SUCCESS].since(since), final[State.ERROR].since(since)
    staging = [
        {"id": n, "status": s.status}
        for s in (State.PROCESSING, State.QUEUE, State.DATA)
        for n in store.job_names(s)
        if is_request(n)
    ][:NAMED]
    finals = heapq.merge(
        *[[(t, n, s) for t, n in final[s].requests[:NAMED] if t >= since] for s in FINAL],
        reverse=True,
    )
    staging += [{"id": n, "status": s.status} for _, n, s in finals][: NAMED - len(staging)]
    return {
        "time": iso(now),
        "counts": counts,
        "total": sum(counts.values()),
        "hour": {
            "since": iso(since),
            "finished": succeeded + failed,
            "success": succeeded,
            "error": failed,
            "per_minute": round((succeeded + failed) / 60, 2),
            "buckets": buckets,
            "source": "job folder change times (ctime) in success/ and error/",
        },
        "processing": store.job_names(State.PROCESSING)[:NAMED],
        "recent_errors": [
            {"name": n, "time": iso(t)} for t, n in final[State.ERROR].latest if t >= since
        ],
        "staging": staging,
    }


@dataclass(frozen=True)
class ListQuery:
    states: tuple[State, ...]
    text: str = ""
    sort: str = "name"
    offset: int = 0
    limit: int = 50


def _ordered(store: Store, times: ChangeTimes, q: ListQuery) -> Iterator[tuple[str, State]]:
    """Every job of the asked states in the asked order, lazily: each state's listing is
    sorted already (by name, or by time in its Listing), so they are merged, never
    sorted again, and a page stops the merge once it has its rows."""
    key, reverse = q.sort.lstrip("-"), q.sort.startswith("-")
    states = sorted(q.states, key=list(State).index, reverse=reverse)

    def each(items: list[Any]) -> Iterator[Any]:
        return reversed(items) if reverse else iter(items)

    if key == "changed":
        by_time = [((t, n, s) for t, n in each(times.listing(s).by_time)) for s in states]
        return ((n, s) for _, n, s in heapq.merge(*by_time, reverse=reverse))
    if key == "state":
        return ((n, s) for s in states for n in each(store.job_names(s)))
    rank = {s: i for i, s in enumerate(State)}
    by_name = [zip(each(store.job_names(s)), repeat(rank[s]), repeat(s)) for s in states]
    return ((n, s) for n, _, s in heapq.merge(*by_name, reverse=reverse))


def list_jobs(store: Store, times: ChangeTimes, q: ListQuery) -> dict[str, Any]:
    """One page of jobs filtered by state and by a part of the name (any case), sorted."""
    text = q.text.lower()
    rows = _ordered(store, times, q)
    if text:
        rows = ((n, s) for n, s in rows if text in n.lower())
        total = sum(text in n.lower() for s in q.states for n in store.job_names(s))
    else:
        total = sum(len(store.job_names(s)) for s in q.states)
    page = list(islice(rows, q.offset, q.offset + q.limit))
    changed: dict[tuple[str, State], float] = {}
    for state in q.states:
        mine = [n for n, s in page if s == state]
        if mine:
            changed.update(((n, state), t) for n, t in stat_times(store, state, mine).items())
    jobs = []
    for name, state in page:
        t = changed.get((name, state))
        jobs.append({"name": name, "status": state.status, "changed": iso(t) if t else None})
    return {"total": total, "offset": q.offset, "limit": q.limit, "jobs": jobs}


def folder_entries(store: Store, name: str, parts: list[str]) -> list[dict[str, Any]] | None:
    """Names, kinds and sizes in a job folder (or a folder in it); None if no such job.

    Read through the job's descriptor (Store.open_job) and fs.open_dir: no link is
    followed. At most MAX_ENTRIES, sorted by name; hidden names are the service's.
    """

    def read(job: Any) -> list[dict[str, Any]] | None:
        try:
            dir_fd = store.open_job(job)
        except FileNotFoundError:
            return None  # moved on meanwhile: Store.read looks for it again
        try:
            sub = fs.open_dir(dir_fd, "/".join(parts)) if parts else dir_fd
            try:
                found = []
                for entry in fs.entries(sub):
                    found.append({"name": entry.name, "type": _kind(entry), "size": entry.size})
                    if len(found) >= MAX_ENTRIES:
                        break
                return sorted(found, key=lambda e: str(e["name"]))
            finally:
                if sub != dir_fd:
                    os.close(sub)
        finally:
            os.close(dir_fd)

    found = store.read(name, read)
    return None if found is None else found[1]


def _kind(entry: fs.Entry) -> str:
    if entry.is_dir:
        return "dir"
    if entry.is_file:
        return "file"
    return "link" if stat.S_ISLNK(entry.mode) else "other"


def requeue_failed(store: Store) -> dict[str, Any]:
    """Move every job in error/ back to queue/ (exactly those: a job of the same name in
    another state is not touched). Jobs that cannot be moved are named with why."""
    moved, failed = [], []
    for name in list(store.job_names(State.ERROR)):
        try:
            store.move(name, State.ERROR, State.QUEUE)
            moved.append(name)
        except JobNotFound:
            continue  # moved on meanwhile (requeued by someone else, deleted)
        except FileExistsError:
            failed.append({"name": name, "reason": "a job of that name is already queued"})
        except OSError as e:
            failed.append({"name": name, "reason": e.strerror or str(e)})
    return {"requeued": len(moved), "jobs": moved[:1000], "failed": failed[:1000]}
