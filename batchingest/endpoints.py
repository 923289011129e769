"""Endpoints: the folders the transfer APIs may read and write, by name.

An endpoint is a name, a folder and a stable id (`uuid5(NAMESPACE_URL,
"batchingest:endpoint:NAME")`, so the same name has the same id on every machine and
after every restart). They come from `--endpoint NAME=DIR` (or `BATCHINGEST_ENDPOINTS`,
comma-separated); with staging configured, `archive` (read-only) and `staging` exist too.

Everything inside an endpoint folder is user input, as inside a job folder. So a path on
an endpoint is parsed here into checked components (no `..`, `.`, empty segments, NUL or
backslash), and every file operation works on a descriptor of the endpoint folder through
`batchingest.fs`: nothing is opened by a path string, no symbolic link is ever followed
(a link is reported as what it is, and a path through one is refused), and nothing
outside the folder can be named at all.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from batchingest import fs

if TYPE_CHECKING:
    from batchingest.config import Config

MAX_PATH = 4096
# The service's own temporaries in endpoint folders (unfinished staged copies are
# `.batchingest-stage-*.tmp`): renaming one to a real name would show a partial file.
SERVICE_PREFIX = ".batchingest-"
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
# The answer of both transfer APIs when no endpoint is configured.
NOT_CONFIGURED = (
    "no endpoint is configured: start the service with --endpoint NAME=DIR "
    "(or --archive and --staging)"
)


class EndpointSpecError(ValueError):
    """A --endpoint setting that cannot be used."""


@dataclass(eq=False)
class PathError(Exception):
    """A file operation on an endpoint failed; `kind` says how, for the API to map."""

    # "invalid" (malformed or refused path), "link" (a symbolic link is in the way),
    # "missing", "exists", "not-dir", "read-only", "special" (FIFO, device...), "os"
    kind: str
    message: str
    errno: int = 0

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Endpoint:
    name: str
    path: Path
    read_only: bool = False

    @property
    def id(self) -> str:
        return endpoint_id(self.name)


def endpoint_id(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"batchingest:endpoint:{name}"))


def parse_spec(text: str) -> tuple[str, Path]:
    """`NAME=DIR` -> (NAME, absolute DIR); EndpointSpecError if malformed."""
    name, sep, folder = text.strip().partition("=")
    name = name.strip()
    if not sep or not folder.strip():
        raise EndpointSpecError(f"not NAME=DIR: {text!r}")
    if not _NAME.fullmatch(name):
        raise EndpointSpecError(
            f"bad endpoint name {name!r}: 1-64 characters of A-Z a-z 0-9 . _ -, "
            "not starting with '.'"
        )
    return name, Path(folder.strip()).absolute()


def parse_specs(text: str) -> list[tuple[str, Path]]:
    """The comma-separated form of BATCHINGEST_ENDPOINTS."""
    return [parse_spec(part) for part in text.split(",") if part.strip()]


class Endpoints:
    """The configured endpoints, found by id or by name."""

    def __init__(self, items: list[Endpoint]) -> None:
        self.items = items
        self._by_key: dict[str, Endpoint] = {}
        for ep in items:
            if ep.name in self._by_key:
                raise EndpointSpecError(
                    f"endpoint name {ep.name!r} is given twice (with --archive and "
                    "--staging, 'archive' and 'staging' are taken)"
                )
            self._by_key[ep.name] = ep
        for ep in items:
            self._by_key.setdefault(ep.id, ep)

    @classmethod
    def from_config(cls, cfg: Config) -> Endpoints:
        items = [Endpoint(name, Path(folder)) for name, folder in cfg.endpoints]
        if cfg.archive is not None and cfg.staging is not None:
            items.append(Endpoint("archive", cfg.archive, read_only=True))
            items.append(Endpoint("staging", cfg.staging))
        return cls(items)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Endpoint]:
        return iter(self.items)

    def find(self, ref: str) -> Endpoint | None:
        """The endpoint named ref, or whose id is ref (any case, with or without dashes)."""
        found = self._by_key.get(ref)
        if found is None:
            with contextlib.suppress(ValueError):
                found = self._by_key.get(str(uuid.UUID(ref)))
        return found

    def locate(self, path: str) -> tuple[Endpoint, list[str]] | None:
        """The endpoint whose folder holds the absolute local path, and the parts below it.

        Lexical only (no link is resolved, the configured folders are compared as given):
        the parts are then opened through fs like any other, so a link on the way is
        refused there. The longest matching folder wins; None if none holds the path,
        PathError("invalid") for a path with '.', '..' or empty segments.
        """
        if not path.startswith("/"):
            raise PathError("invalid", f"not an absolute path: {path[:100]!r}")
        parts = split_path(path) if path != "/" else []
        best: tuple[Endpoint, list[str]] | None = None
        for ep in self.items:
            base = [p for p in str(ep.path).split("/") if p]
            if parts[: len(base)] == base and (best is None or len(base) > _depth(best[0])):
                best = (ep, parts[len(base) :])
        return best


def _depth(ep: Endpoint) -> int:
    return len([p for p in str(ep.path).split("/") if p])


# -- paths ----------------------------------------------------------------------------------


def split_path(raw: str) -> list[str]:
    """The components of a path on an endpoint; [] names the endpoint folder itself.

    Paths are absolute within the endpoint folder: `/`, `/~/`, `~` and `` are the folder
    itself, `/a/b`, `/~/a/b`, `~/a/b` and `a/b` (relative to the home, which is the
    folder) are all the same. One trailing `/` is allowed. PathError("invalid") for `.`
    or `..` segments, empty segments, NUL, backslash, `~user`, over-long paths or names.
    """
    if len(raw) > MAX_PATH:
        raise PathError("invalid", f"path longer than {MAX_PATH} characters")
    if "\x00" in raw:
        raise PathError("invalid", "path contains a NUL byte")
    if "\\" in raw:
        raise PathError("invalid", "path contains a backslash")
    try:
        raw.encode()
    except UnicodeEncodeError:  # lone surrogates from JSON: no name we could list or show
        raise PathError("invalid", "path is not valid Unicode text") from None
    if raw in ("", "/", "~", "~/", "/~", "/~/"):
        return []
    if raw.startswith("~") and not raw.startswith("~/"):
        raise PathError("invalid", f"{raw[:100]!r}: '~user' homes do not exist here")
    rel = raw
    for prefix in ("/~/", "~/", "/"):
        if rel.startswith(prefix):
            rel = rel[len(prefix) :]
            break
    if rel.endswith("/"):
        rel = rel[:-1]
    parts = rel.split("/")
    for part in parts:
        if part == "":
            raise PathError("invalid", f"{raw[:100]!r} has an empty segment ('//')")
        if part in (".", ".."):
            raise PathError("invalid", f"{raw[:100]!r} has a '.' or '..' segment")
        if len(part.encode()) > 255:
            raise PathError("invalid", "a path segment is longer than 255 bytes")
    return parts


def show_path(parts: list[str], folder: bool = False) -> str:
    """The canonical form of a path on an endpoint: `/a/b`, folders with a trailing `/`."""
    text = "/" + "/".join(parts)
    if parts and parts[0] == "~":
        text = "/~" + text  # '/~' alone is the endpoint folder: spell a name '~' under it
    return text + "/" if folder and parts else text


# -- operations (blocking: call them from a thread) -----------------------------------------


@contextlib.contextmanager
def opened(ep: Endpoint) -> Iterator[int]:
    """A descriptor of the endpoint folder (the one trusted path string)."""
    try:
        fd = fs.open_root(ep.path)
    except OSError as e:
        raise PathError(
            "os", f"the folder of endpoint {ep.name!r} cannot be opened: {e.strerror}", e.errno or 0
        ) from None
    try:
        yield fd
    finally:
        os.close(fd)


def _failure(e: OSError, parts: list[str]) -> PathError:
    """The PathError for an OSError met while working on parts."""
    shown = show_path(parts)
    if isinstance(e, fs.UnsafePath):
        if e.errno == errno.ELOOP:
            return PathError("link", f"{shown}: a symbolic link is in the way (never followed)")
        return PathError("invalid", f"{shown}: {e.strerror}")
    if isinstance(e, FileNotFoundError):
        return PathError("missing", f"{shown}: no such file or folder")
    if isinstance(e, NotADirectoryError):
        return PathError("not-dir", f"{shown}: a part of this path is not a folder")
    if isinstance(e, FileExistsError) or e.errno == errno.ENOTEMPTY:
        return PathError("exists", f"{shown} exists")
    if isinstance(e, PermissionError) or e.errno == errno.EROFS:
        return PathError("read-only", f"{shown}: {e.strerror}", e.errno or 0)
    return PathError("os", f"{shown}: {e.strerror or e}", e.errno or 0)


@contextlib.contextmanager
def folder(root: int, parts: list[str]) -> Iterator[int]:
    """A descriptor of the folder parts beneath root (links refused)."""
    try:
        fd = os.dup(root) if not parts else fs.open_dir(root, "/".join(parts))
    except OSError as e:
        raise _failure(e, parts) from None
    try:
        yield fd
    finally:
        os.close(fd)


def lstat(root: int, parts: list[str]) -> os.stat_result:
    """lstat of parts beneath root: a link at the end is stat-ed itself, never followed."""
    if not parts:
        return os.fstat(root)
    try:
        st = fs.lstat(root, "/".join(parts))
    except OSError as e:
        raise _failure(e, parts) from None
    if st is None:
        raise PathError("missing", f"{show_path(parts)}: no such file or folder")
    return st


@dataclass(frozen=True)
class Item:
    """One name in a folder, as lstat sees it; link_target is set for a link."""

    name: str
    st: os.stat_result
    link_target: str | None = None


def read_link(dir_fd: int, name: str) -> str | None:
    """The text of a link (what it says, never where it leads); None if unreadable."""
    try:
        text = os.readlink(name, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        text.encode()
    except UnicodeEncodeError:  # bytes that are not UTF-8: shown, but never sent raw
        text = os.fsencode(text).decode(errors="replace")
    return text


def list_folder(ep: Endpoint, parts: list[str], hidden: bool = True) -> list[Item]:
    """The entries of the folder parts on ep; PathError("not-dir") for a file."""
    with opened(ep) as root:
        st = lstat(root, parts)
        if stat.S_ISLNK(st.st_mode):
            raise PathError("link", f"{show_path(parts)} is a symbolic link (never followed)")
        if not stat.S_ISDIR(st.st_mode):
            raise PathError("not-dir", f"{show_path(parts)} is not a folder")
        with folder(root, parts) as fd:
            items = []
            for entry in fs.entries(fd, hidden=hidden):
                try:
                    est = os.stat(entry.name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed while listing
                target = read_link(fd, entry.name) if stat.S_ISLNK(est.st_mode) else None
                items.append(Item(entry.name, est, target))
            return items


def stat_path(ep: Endpoint, parts: list[str]) -> Item:
    """What parts names on ep (a link is described, not followed)."""
    with opened(ep) as root:
        st = lstat(root, parts)
        target = None
        if stat.S_ISLNK(st.st_mode):
            with folder(root, parts[:-1]) as parent:
                target = read_link(parent, parts[-1])
        return Item(parts[-1] if parts else "/", st, target)


def _writable(ep: Endpoint, *paths: list[str]) -> None:
    if ep.read_only:
        raise PathError("read-only", f"endpoint {ep.name!r} is read-only", errno.EROFS)
    for parts in paths:
        if any(part.startswith(SERVICE_PREFIX) for part in parts):
            message = f"{show_path(parts)}: names starting with {SERVICE_PREFIX} are the service's"
            raise PathError("read-only", message, errno.EPERM)


def _name(parts: list[str]) -> str:
    """The last part, checked once more: with a dir_fd, an absolute name would ignore the
    descriptor (`/etc` is `/etc` whatever folder it is given with)."""
    name = parts[-1]
    if not name or "/" in name or "\x00" in name or name in (".", ".."):
        raise PathError("invalid", f"not a single name: {name[:100]!r}")
    return name


def make_folder(ep: Endpoint, parts: list[str]) -> None:
    """Create the folder parts on ep (its parent must exist): PathError("exists") if taken."""
    _writable(ep, parts)
    if not parts:
        raise PathError("exists", "/ is the endpoint folder itself, which exists")
    with opened(ep) as root, folder(root, parts[:-1]) as parent:
        try:
            os.mkdir(_name(parts), 0o777, dir_fd=parent)  # the umask decides, as mkdir(1)
        except OSError as e:
            raise _failure(e, parts) from None


def rename(ep: Endpoint, old: list[str], new: list[str]) -> None:
    """Rename old to new on ep; never replaces anything (PathError("exists") instead).

    Both parents are opened through fs (no link on the way), and the rename works on
    names in those descriptors, so a link at `old` is renamed itself, never followed.
    """
    _writable(ep, old, new)
    if not old:
        raise PathError("invalid", "/ is the endpoint folder itself: it cannot be renamed")
    if not new:
        raise PathError("exists", "/ is the endpoint folder itself, which exists")
    with opened(ep) as root:
        lstat(root, old)  # missing, or a link on the way: say so for the old path
        if len(new) > len(old) and new[: len(old)] == old:
            # a well-formed request the file system refuses, as rename(2) would (EINVAL)
            message = f"{show_path(old)} cannot be moved into itself"
            raise PathError("os", message, errno.EINVAL)
        with folder(root, old[:-1]) as src, folder(root, new[:-1]) as dst:
            _rename_in(src, dst, old, new)


def _rename_in(src: int, dst: int, old: list[str], new: list[str]) -> None:
    try:
        fs.rename_noreplace(_name(old), _name(new), src_dir_fd=src, dst_dir_fd=dst)
    except OSError as e:
        # rename(2) errors name neither side; say which one is at fault
        raise _failure(e, new if isinstance(e, FileExistsError) else old) from None
