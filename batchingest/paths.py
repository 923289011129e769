"""What a relative path inside a job (or the archive, or the staging area) may be.

One set of rules for every relative path the service takes from a user: file paths in
API URLs, archive ids of staging requests, manifest entries. A path passing them is a
list of plain names; joined to any folder it stays inside that folder as far as the
names go (symbolic links are another matter: those are refused when the path is
opened, see batchingest.fs).

The rules: relative and '/'-separated; no empty, '.' or '..' segment; no hidden segment
(names starting with '.' are the service's own: locks, temporaries); no backslash and
no control character (NUL included); valid UTF-8; at most MAX_PATH bytes in all and
MAX_COMPONENT bytes per segment (the Linux limits, so a valid path never fails with
ENAMETOOLONG for its own length).
"""

from __future__ import annotations

import re

MAX_PATH = 4095  # PATH_MAX (4096) counts the terminating NUL
MAX_COMPONENT = 255

_BAD_CHAR = re.compile(r"[\x00-\x1f\x7f\\]")


class InvalidPath(ValueError):
    """A relative path that breaks the rules; the message says which rule."""


def relpath_segments(rel: str, *, allow_empty: bool = False) -> list[str]:
    """The segments of a relative path, checked; InvalidPath saying what is wrong.

    allow_empty: '' (the folder itself) gives [] and one trailing '/' is allowed, as
    when listing a folder; otherwise an empty path is an error.
    """
    if not isinstance(rel, str):
        raise InvalidPath("not a string")
    try:
        size = len(rel.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidPath("not valid UTF-8") from None
    if size > MAX_PATH:
        raise InvalidPath(f"longer than {MAX_PATH} bytes")
    bad = _BAD_CHAR.search(rel)
    if bad:
        if bad[0] == "\\":
            raise InvalidPath("contains a backslash")
        if bad[0] == "\x00":
            raise InvalidPath("contains a NUL byte")
        raise InvalidPath("contains a control character")
    if rel.startswith("/"):
        raise InvalidPath("not relative (starts with '/')")
    if allow_empty and rel.endswith("/"):
        rel = rel[:-1]
    if rel == "":
        if allow_empty:
            return []
        raise InvalidPath("empty path")
    parts = rel.split("/")
    for part in parts:
        if part == "":
            raise InvalidPath("empty path segment ('//' or a trailing '/')")
        if part in (".", ".."):
            raise InvalidPath(f"'{part}' path segment")
        if part.startswith("."):
            raise InvalidPath(f"hidden path segment {part[:100]!r} (reserved for the service)")
        if len(part.encode("utf-8")) > MAX_COMPONENT:
            raise InvalidPath(f"path segment longer than {MAX_COMPONENT} bytes")
    return parts
