"""Query parameters of the Globus API: paging, booleans, fields, ls filter and orderby.

Filters (`filter=`, §4.2 of the reference): clauses `field:value` joined by `/` must all
hold; several `filter` parameters are alternatives (any may hold). For the text fields
(`name`, `type`, `permissions`, `user`, `group`) a value is `~GLOB`, `!~GLOB`, `=TEXT`,
`!=TEXT` or a comma-separated list of exact values; for `size` and `last_modified` it is
`A,B` (a range, either end may be empty; start included, end excluded), `>=X`, `<=X`,
`>X`, `<X`, `=X`, `!=X` or one exact value. Dates are `YYYY-MM-DD[ HH:MM:SS]` in UTC
(or RFC 3339). The parsing is api/query.py's, shared with `GET /jobs`.
"""

from __future__ import annotations

import fnmatch
import operator
from collections.abc import Callable
from typing import Any

from starlette.requests import Request

from batchingest.api import query as lists
from batchingest.api.errors import ApiError

Doc = dict[str, Any]
Test = Callable[[Doc], bool]

TEXT_FIELDS = ("name", "type", "permissions", "user", "group")
NUMBER_FIELDS = ("size", "last_modified")
SORTABLE = (*TEXT_FIELDS, *NUMBER_FIELDS)
# file documents carry their exact mtime under this key while they are filtered and sorted
MTIME = "_mtime"


def bad(message: str) -> ApiError:
    return ApiError(400, "ClientError.BadRequest", message)


def integer(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:  # given empty, it is not an integer: 400, as the spec's type says
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad(f"{name} must be an integer, not {raw[:50]!r}") from None
    if not low <= value <= high:
        raise bad(f"{name} must be from {low} to {high}, not {value}")
    return value


def boolean(request: Request, name: str, default: bool) -> bool:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if raw.lower() in ("1", "true", "yes"):
        return True
    if raw.lower() in ("0", "false", "no"):
        return False
    raise bad(f"{name} must be true or false (1 or 0), not {raw[:50]!r}")


def fields(request: Request) -> list[str] | None:
    raw = request.query_params.get("fields")
    if raw is None or not raw.strip():
        return None
    return [f.strip() for f in raw.split(",") if f.strip()]


def _glob(value: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(value, pattern)


def _mtime(doc: Doc) -> float:
    return float(doc[MTIME])


# The ls fields in the one list-query parser (api/query.py): globs for `~`, ranges
# that leave out their end, and comparisons (`>=X`, ...) for the numbers.
_FIELDS = (
    *(
        lists.Field(f, lists.TEXT, operator.itemgetter(f), like=_glob, end_included=False)
        for f in TEXT_FIELDS
    ),
    lists.Field("size", lists.NUMBER, operator.itemgetter("size"), end_included=False,
                operators=True),
    lists.Field("last_modified", lists.TIME, _mtime, end_included=False, operators=True),
)  # fmt: skip
_BY_NAME = {f.name: f for f in _FIELDS}


def file_filter(request: Request) -> Test | None:
    """The ls `filter` parameters as one test; None when there is none."""
    try:
        return lists.parse_filter(request.query_params.getlist("filter"), _FIELDS)
    except lists.QueryError as e:
        raise bad(str(e)) from None


def order_keys(request: Request) -> list[tuple[str, bool]]:
    """The `orderby` parameter (`name`, `size DESC`, ...; default by name) as (field, desc)."""
    raw = request.query_params.get("orderby") or "name ASC"
    try:
        return [(f.name, desc) for f, desc in lists.parse_orderby(raw, _FIELDS)]
    except lists.QueryError as e:
        raise bad(str(e)) from None


def sort(docs: list[Doc], keys: list[tuple[str, bool]]) -> None:
    lists.sort(docs, [(_BY_NAME[name], desc) for name, desc in keys])
