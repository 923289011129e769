"""DTS staging: file ids, the manifest and progress files of a staging job, its status.

A staging request is an ordinary job named by a UUID whose JOB is `{"Todo": ["stage"]}`.
Two files in the job folder carry the staging-specific state:

- `MANIFEST.json` (written once by the API): the files to stage, each an id, its path
  relative to the archive (the staged copy lands at the same relative path under the
  staging area) and its size when requested.
- `PROGRESS.json` (rewritten atomically by the stage task, at most every half second and
  at the end): files and bytes staged so far and, after a failure, the error message.
  The status endpoint reads only this small file, so polling stays cheap however large
  the request.

Both are plain files an operator can read with `cat`. The archive and staging roots are
never taken from the manifest: the stage task uses its own settings and opens every
path beneath their descriptors without following a link (fs), so a hand-made manifest
cannot read or write outside the two areas.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchingest import fs
from batchingest.paths import InvalidPath, relpath_segments

log = logging.getLogger("batchingest.staging")

MANIFEST = "MANIFEST.json"
PROGRESS = "PROGRESS.json"
MANIFEST_VERSION = 1
# Hidden temporary copies in the staging area carry this prefix so a later run can tell
# them from anything else and remove the leftovers of a killed copy.
TEMP_PREFIX = ".batchingest-stage-"
TEMP_SUFFIX = ".tmp"


class StagingError(Exception):
    """Staging cannot be carried out as asked (bad manifest, unreadable catalog...)."""


class ArchiveUnavailable(StagingError):
    """The archive cannot be looked in now (not there, unreadable, out of descriptors, an
    I/O error): nothing can be said about the ids, so none is called missing."""


# What an id naming no file meets on its way: anything else is about the archive itself.
# A folder without search permission beneath the archive's top is a fact about the paths
# through it, which stays so however often the DTS asks again: those are not files here
# either (the archive's own top that cannot be opened is ArchiveUnavailable).
NO_SUCH_FILE = {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG,
                errno.EACCES, errno.EPERM}  # fmt: skip
# Archive folders the resolver keeps open in one request, the last used: ids come
# grouped by folder, so a few cover them, and 40 requests at once hold 160 descriptors,
# not thousands.
RESOLVE_KEEP = 4


def check_relpath(rel: str) -> str:
    """An archive-relative path, returned unchanged once it passes the one rule for
    relative paths (paths.relpath_segments: InvalidPath says which part it breaks).

    A path passing it cannot climb out of the folder it is joined to; it is opened
    beneath that folder's descriptor, where no symbolic link is followed (fs).
    """
    relpath_segments(rel)
    return rel


@dataclass(frozen=True)
class Entry:
    """One file of a staging request."""

    id: str
    path: str  # relative to the archive and to the staging area
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "size": self.size}


def split_rel(rel: str) -> tuple[str, str]:
    """(folder, name) of a checked relative path: "a/b/c" gives ("a/b", "c"), "c" ("", "c")."""
    parent, _, name = rel.rpartition("/")
    return parent, name


def stat_source(folders: fs.RecentFolders, rel: str) -> os.stat_result | None:
    """The lstat of the archive file at rel, or None unless it is a regular file there.

    The archive is user input like any endpoint folder: its folder is opened beneath the
    archive's descriptor and the name looked at without following it, so a link on the
    way or at the name (leading out or not), a '..', a FIFO or a device is not a file,
    nor is a name in a folder the service may not search. ArchiveUnavailable for any
    other error (EIO, EMFILE, ESTALE...): that says nothing about the file, and a "no
    such file" would be taken as final.
    """
    parent, name = split_rel(rel)
    try:
        with folders.open(parent) as dir_fd:
            st = os.stat(fs.one_name(name), dir_fd=dir_fd, follow_symlinks=False)
    except fs.UnsafePath:
        return None
    except OSError as e:
        if e.errno in NO_SUCH_FILE:
            return None
        raise ArchiveUnavailable(f"the archive cannot be read at {rel!r}: {e.strerror}") from e
    return st if stat.S_ISREG(st.st_mode) else None


class Catalog:
    """A tab-separated `id<TAB>relative/path` file, reloaded when it changes on disk.

    Blank lines and lines starting with '#' are skipped; so are lines whose path breaks
    the path rules (logged once per load). A later line for the same id wins.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int] | None = None
        self._ids: dict[str, str] = {}

    def ids(self) -> dict[str, str]:
        """The current id -> path map; raises StagingError if the file cannot be read."""
        with self._lock:
            try:
                st = os.stat(self.path)
            except OSError as e:
                raise StagingError(f"catalog {self.path} cannot be read: {e.strerror}") from e
            signature = (st.st_mtime_ns, st.st_size, st.st_ino)
            if signature != self._signature:
                try:
                    raw = self.path.read_bytes()
                except OSError as e:
                    raise StagingError(f"catalog {self.path} cannot be read: {e.strerror}") from e
                self._ids = parse_catalog(raw, str(self.path))
                self._signature = signature
                log.info("catalog %s loaded: %d ids", self.path, len(self._ids))
            return self._ids


def parse_catalog(raw: bytes, where: str = "catalog") -> dict[str, str]:
    ids: dict[str, str] = {}
    bad = 0
    first_bad = ""
    for number, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        file_id, tab, rel = line.partition("\t")
        try:
            if not tab or not file_id:
                raise InvalidPath("not id<TAB>path")
            ids[file_id] = check_relpath(rel)
        except InvalidPath as e:
            bad += 1
            first_bad = first_bad or f"line {number}: {e}"
    if bad:
        log.warning("%s: skipped %d bad lines (first: %s)", where, bad, first_bad)
    return ids


class Resolver:
    """Turns request ids into manifest entries: archive-relative paths or catalog ids."""

    def __init__(self, archive: Path, catalog: Path | None = None) -> None:
        self.archive = archive
        self.catalog = Catalog(catalog) if catalog is not None else None

    def resolve(self, ids: Iterable[str]) -> tuple[list[Entry], list[str], list[str]]:
        """Return (entries, invalid, unresolved).

        `invalid` are ids that can never be paths (in path mode: absolute, '..', hidden...);
        `unresolved` are ids naming no regular file inside the archive (a link on the
        way or at the name, a FIFO, a device or a folder included). Duplicate ids,
        and ids naming the same file, give one entry. ArchiveUnavailable when the archive
        cannot be looked in (see stat_source); StagingError for an unreadable catalog.
        """
        mapping = self.catalog.ids() if self.catalog is not None else None
        try:
            # looked in only: a 0711 archive (search, no read) is enough
            top = fs.open_root(self.archive, fs.LOOKUP)
        except OSError as e:  # missing (not mounted?), unreadable: not the ids' fault
            raise ArchiveUnavailable(
                f"the archive {self.archive} cannot be opened: {e.strerror}"
            ) from e
        folders = fs.RecentFolders(top, RESOLVE_KEEP, fs.lookup_dir)  # per request
        try:
            return self._resolve(ids, mapping, folders)
        finally:
            folders.close()
            os.close(top)

    def _resolve(
        self, ids: Iterable[str], mapping: dict[str, str] | None, folders: fs.RecentFolders
    ) -> tuple[list[Entry], list[str], list[str]]:
        entries: list[Entry] = []
        invalid: list[str] = []
        unresolved: list[str] = []
        seen_ids: set[str] = set()
        seen_paths: set[str] = set()
        for file_id in ids:
            if file_id in seen_ids:
                continue
            seen_ids.add(file_id)
            if mapping is None:
                try:
                    rel = check_relpath(file_id)
                except InvalidPath:
                    invalid.append(file_id)
                    continue
            else:
                found = mapping.get(file_id)
                if found is None:
                    unresolved.append(file_id)
                    continue
                rel = found
            st = stat_source(folders, rel)
            if st is None:
                unresolved.append(file_id)
                continue
            if rel in seen_paths:
                continue
            seen_paths.add(rel)
            entries.append(Entry(file_id, rel, st.st_size))
        return entries, invalid, unresolved


# -- manifest and progress -------------------------------------------------------------


def manifest_bytes(
    entries: list[Entry],
    archive: Path,
    staging: Path,
    request: str,
    details: dict[str, Any] | None = None,
) -> bytes:
    """The manifest, one file per line so that it stays readable and diffable.

    details: what else the client said or proved (the DTS requester, fields of the
    request body this service does not act on), kept for the record.
    """
    head: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "request_id": request,
        "archive": str(archive),
        "staging": str(staging),
        "files_total": len(entries),
        "bytes_total": sum(e.size for e in entries),
    }
    if details:
        head["request"] = details
    lines = [json.dumps(e.to_json(), ensure_ascii=False) for e in entries]
    text = json.dumps(head, ensure_ascii=False)[:-1] + ', "files": [\n'
    text += ",\n".join(lines) + "\n]}\n"
    return text.encode()


# Limits of what is read from a job folder (user input: a 96 MiB PROGRESS.json or a
# MANIFEST.json linked to /dev/zero must be a clear error, not a stall).
PROGRESS_LIMIT = 64 << 10  # a few numbers and one error message
LOG_TAIL = 8192  # the status message is the LOG's last line, read from this much tail
# The request body the API accepts: staging_max_ids ids of up to 4096 bytes each,
# JSON-quoted, and at least 1 MiB.
BYTES_PER_ID = 4200
# A manifest line holds an id as it came in the body, a path (at most 4096 bytes, 8194
# JSON-quoted) and a size.
MANIFEST_BYTES_PER_FILE = 8300


def body_limit(max_ids: int) -> int:
    """The largest request body accepted with max_ids ids at most."""
    return max(1 << 20, max_ids * BYTES_PER_ID)


def manifest_limit(max_ids: int) -> int:
    """The largest MANIFEST.json a request of at most max_ids ids can have produced."""
    return (64 << 10) + body_limit(max_ids) + max_ids * MANIFEST_BYTES_PER_FILE


def _unreadable(name: str, e: OSError) -> str:
    """Why a file of a job folder cannot be read (a link, a FIFO, too large...)."""
    return f"{name} cannot be read: {e.strerror or e}"


def read_manifest(dir_fd: int, limit: int) -> bytes:
    """The raw MANIFEST.json of the job folder dir_fd, no link followed, at most limit bytes."""
    try:
        raw = fs.read_file(dir_fd, MANIFEST, limit)
    except OSError as e:
        raise StagingError(_unreadable(MANIFEST, e)) from None
    if raw is None:
        raise StagingError(f"no {MANIFEST} in the job folder")
    return raw


def load_manifest(dir_fd: int, limit: int) -> list[Entry]:
    """Read and check a job's manifest; StagingError says what is wrong."""
    return parse_manifest(read_manifest(dir_fd, limit))


def parse_manifest(raw: bytes) -> list[Entry]:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise StagingError(f"{MANIFEST} cannot be read: {e}") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list):
        raise StagingError(f"{MANIFEST} has no list 'files'")
    entries: list[Entry] = []
    for i, item in enumerate(files):
        if not isinstance(item, dict):
            raise StagingError(f"{MANIFEST} files[{i}] is not an object")
        rel, size, file_id = item.get("path"), item.get("size", 0), item.get("id", "")
        if not isinstance(rel, str) or not isinstance(size, int) or not isinstance(file_id, str):
            raise StagingError(f"{MANIFEST} files[{i}] needs a string path and integer size")
        try:
            check_relpath(rel)
        except InvalidPath as e:
            raise StagingError(f"{MANIFEST} files[{i}] path {rel[:300]!r}: {e}") from None
        entries.append(Entry(file_id, rel, size))
    return entries


@dataclass
class Progress:
    files_total: int = 0
    files_staged: int = 0
    bytes_total: int = 0
    bytes_staged: int = 0
    error: str | None = None
    # bytes this run of the stage task copied (bytes_staged counts files found already
    # staged too): the processor adds them to batchingest_staged_bytes_total
    bytes_copied: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "files_total": self.files_total,
            "files_staged": self.files_staged,
            "bytes_total": self.bytes_total,
            "bytes_staged": self.bytes_staged,
            "error": self.error,
            "bytes_copied": self.bytes_copied,
        }


def write_progress(dir_fd: int, progress: Progress, *, durable: bool = False) -> None:
    """Replace the PROGRESS.json of the job folder dir_fd (a link there is replaced too)."""
    content = (json.dumps(progress.to_json()) + "\n").encode()
    fs.write_atomic(dir_fd, PROGRESS, content, durable=durable)


def load_progress(dir_fd: int) -> Progress | None:
    """The job's progress, None if there is none; StagingError if it cannot be read.

    Unknown or malformed fields read as 0 (and no error), so a hand-edited file still
    gives a status.
    """
    try:
        raw = fs.read_file(dir_fd, PROGRESS, PROGRESS_LIMIT)
    except OSError as e:
        raise StagingError(_unreadable(PROGRESS, e)) from None
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise StagingError(f"{PROGRESS} is not JSON") from None
    if not isinstance(data, dict):
        raise StagingError(f"{PROGRESS} is not a JSON object")
    p = Progress()
    for name in ("files_total", "files_staged", "bytes_total", "bytes_staged", "bytes_copied"):
        value = data.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            setattr(p, name, value)
    error = data.get("error")
    p.error = error if isinstance(error, str) else None
    return p


def read_progress(dir_fd: int) -> Progress | None:
    """The job's progress, or None if there is none or it is unreadable."""
    try:
        return load_progress(dir_fd)
    except StagingError:
        return None


def last_log_line(dir_fd: int, limit: int = LOG_TAIL) -> str | None:
    """The last line a task wrote to the job's LOG, reading only its tail.

    The service's own `---- task X: error, exit status 1 ----` markers say less than
    the task's last words, so they are used only when the task said nothing.
    """
    # imported here: the stage task, which starts once per request, never needs it
    from batchingest.jobdir import read_log_tail

    try:
        tail = read_log_tail(dir_fd, limit)
    except OSError:  # a link, a FIFO, a folder: no words to show
        return None
    marker = None
    for line in reversed(tail.text.splitlines()):
        line = line.strip()
        if not line:
            continue
        if " batchingest: ---- " in line:
            if line.endswith(": begin ----"):
                break  # the failed task said nothing itself
            marker = marker or line
            continue
        return line[:2000]
    return marker[:2000] if marker else None


# The staging status (what the DTS is told) of a job in each state. The DTS knows "ready"
# (done) and keeps polling anything else, so a failure says "failed".
STAGING_STATUS_OF_STATE = {
    "data": "staging",
    "queue": "staging",
    "processing": "staging",
    "success": "ready",
    "error": "failed",
}


def is_staging_job(dir_fd: int) -> bool:
    """A job with a MANIFEST.json entry (of any kind: a bad one fails the stage task)."""
    return fs.lstat(dir_fd, MANIFEST) is not None


def status(dir_fd: int, state: str) -> dict[str, Any]:
    """The DTS status document of the staging job in the folder dir_fd, in state."""
    problem = None
    try:
        progress = load_progress(dir_fd) or Progress()
    except StagingError as e:
        progress, problem = Progress(), str(e)
    result: dict[str, Any] = {"status": STAGING_STATUS_OF_STATE[state]}
    if state == "success":
        # The job finished every task: all files are there, whatever a replacement
        # stage task wrote (or did not write) as progress.
        progress.files_staged = progress.files_total
        progress.bytes_staged = progress.bytes_total
    result.update(
        files_total=progress.files_total,
        files_staged=min(progress.files_staged, progress.files_total),
        bytes_total=progress.bytes_total,
        bytes_staged=min(progress.bytes_staged, progress.bytes_total),
    )
    if state == "error":
        result["message"] = (
            progress.error
            or last_log_line(dir_fd)
            or problem
            or "staging failed (no message in the LOG)"
        )
    return result
