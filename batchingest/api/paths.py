"""Job names and file paths from URLs: nothing outside a job folder, ever.

Starlette hands path parameters over percent-decoded, so `%2e%2e` arrives as `..`;
every check here runs on decoded segments. A file path follows the rules of
batchingest.paths (relative, no '.', '..', empty or hidden segments, no backslash or
control character, length limits); a 400 InvalidPath says which rule it broke.
Symbolic links are refused where the path is opened (batchingest.fs), not here.
"""

from __future__ import annotations

from batchingest.api.errors import ApiError, bad_path
from batchingest.paths import InvalidPath, relpath_segments
from batchingest.store import valid_name


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
    """Split a relative file path into checked segments; 400 InvalidPath if it breaks a rule.

    allow_empty: the path may be empty (the job folder itself) or end in '/', as when
    listing a folder; never for PUT or DELETE, which would hit the job folder.
    """
    try:
        return relpath_segments(raw, allow_empty=allow_empty)
    except InvalidPath as e:
        raise bad_path(f"invalid path: {e}") from None


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
