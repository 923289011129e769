"""Job names and file paths from URLs: nothing outside a job folder, ever.

Starlette hands path parameters over percent-decoded, so `%2e%2e` arrives as `..`;
every check here runs on decoded segments. A path is refused (400) for: `.` or `..`
segments, NUL bytes, backslashes, empty segments, an absolute path, a hidden segment
(names starting with '.' are the service's own temporary and lock files), or a real
location (after symlinks) outside the job folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from batchingest.api.errors import ApiError
from batchingest.store import valid_name

MAX_PATH = 4096


def bad_path(message: str) -> ApiError:
    return ApiError(400, "InvalidPath", message)


def job_name(raw: str) -> str:
    if not valid_name(raw):
        shown = raw[:300].encode("unicode_escape").decode()
        raise ApiError(
            400,
            "InvalidName",
            f"invalid job name {shown!r}: use 1-255 characters of A-Z a-z 0-9 . _ -, "
            "not starting with '.'",
        )
    return raw


def segments(raw: str, *, allow_empty: bool) -> list[str]:
    """Split a relative file path into checked segments.

    allow_empty: the path may be empty (the job folder itself) or end in '/', as when
    listing a folder; never for PUT or DELETE, which would hit the job folder.
    """
    if len(raw) > MAX_PATH:
        raise bad_path(f"path longer than {MAX_PATH} characters")
    if "\x00" in raw:
        raise bad_path("path contains a NUL byte")
    if "\\" in raw:
        raise bad_path("path contains a backslash")
    if raw.startswith("/"):
        raise bad_path("path must be relative to the job folder")
    if allow_empty and raw.endswith("/"):
        raw = raw[:-1]
    if raw == "":
        if allow_empty:
            return []
        raise bad_path("path is empty: it would name the job folder itself")
    parts = raw.split("/")
    for part in parts:
        if part == "":
            raise bad_path("path has an empty segment ('//' or a trailing '/')")
        if part in (".", ".."):
            raise bad_path("path has a '.' or '..' segment")
        if part.startswith("."):
            raise bad_path(f"hidden names are reserved for the service: {part[:100]!r}")
        if len(part.encode()) > 255:
            raise bad_path("path segment longer than 255 bytes")
    return parts


def resolve(job_dir: Path, parts: list[str]) -> Path:
    """The real location of parts inside job_dir; 400 if symlinks lead outside it.

    A missing tail is fine (realpath keeps it as given), so this serves uploads too.
    """
    base = os.path.realpath(job_dir)
    target = os.path.realpath(os.path.join(base, *parts)) if parts else base
    if target != base and not target.startswith(base + os.sep):
        raise bad_path("path leads outside the job folder")
    return Path(target)


def unsafe_url_path(path: str) -> bool:
    """True if a decoded URL path has a '.'/'..' segment, a NUL or a backslash.

    Checked for every /jobs request before routing, so that `/jobs/a/%2e%2e/b` is a
    400 even where no route would match it.
    """
    if "\x00" in path or "\\" in path:
        return True
    if "." not in path:
        return False
    return any(seg in (".", "..") for seg in path.split("/"))
