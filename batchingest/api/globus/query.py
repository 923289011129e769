"""Query parameters of the Globus API: paging, booleans, fields, ls filter and orderby.

Filters (`filter=`, §4.2 of the reference): clauses `field:value` joined by `/` must all
hold; several `filter` parameters are alternatives (any may hold). For the text fields
(`name`, `type`, `permissions`, `user`, `group`) a value is `~GLOB`, `!~GLOB`, `=TEXT`,
`!=TEXT` or a comma-separated list of exact values; for `size` and `last_modified` it is
`A,B` (a range, either end may be empty; start included, end excluded), `>=X`, `<=X`,
`>X`, `<X`, `=X`, `!=X` or one exact value. Dates are `YYYY-MM-DD[ HH:MM:SS]` in UTC.
"""

from __future__ import annotations

import fnmatch
import operator
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request

from batchingest.api.errors import ApiError

Doc = dict[str, Any]
Test = Callable[[Doc], bool]

TEXT_FIELDS = ("name", "type", "permissions", "user", "group")
NUMBER_FIELDS = ("size", "last_modified")
SORTABLE = (*TEXT_FIELDS, *NUMBER_FIELDS)
# file documents carry their exact mtime under this key while they are filtered and sorted
MTIME = "_mtime"
_OPS: list[tuple[str, Callable[[Any, Any], bool]]] = [
    (">=", operator.ge), ("<=", operator.le), ("!=", operator.ne),
    (">", operator.gt), ("<", operator.lt), ("=", operator.eq),
]  # fmt: skip


def bad(message: str) -> ApiError:
    return ApiError(400, "ClientError.BadRequest", message)


def integer(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
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
    if raw is None or raw == "":
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


def _date(text: str) -> float:
    text = text.strip().removesuffix("+00:00")
    for form in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"):
        try:
            return datetime.strptime(text, form).replace(tzinfo=UTC).timestamp()
        except ValueError:
            continue
    raise bad(f"not a date (YYYY-MM-DD[ HH:MM:SS]): {text[:50]!r}")


def _number(field: str, text: str) -> float:
    if field == "last_modified":
        return _date(text)
    try:
        return float(text)
    except ValueError:
        raise bad(f"{field} needs a number, not {text[:50]!r}") from None


def _text_test(field: str, value: str) -> Test:
    if value.startswith("!~"):
        return lambda d: not fnmatch.fnmatchcase(str(d[field]), value[2:])
    if value.startswith("~"):
        return lambda d: fnmatch.fnmatchcase(str(d[field]), value[1:])
    if value.startswith("!="):
        return lambda d: d[field] != value[2:]
    if value.startswith("="):
        return lambda d: d[field] == value[1:]
    allowed = set(value.split(","))
    return lambda d: d[field] in allowed


def _number_test(field: str, value: str, key: Callable[[Doc], float]) -> Test:
    for symbol, op in _OPS:
        if value.startswith(symbol):
            limit = _number(field, value[len(symbol) :])
            return lambda d: bool(op(key(d), limit))
    if "," in value:
        start_text, _, end_text = value.partition(",")
        start = _number(field, start_text) if start_text.strip() else float("-inf")
        end = _number(field, end_text) if end_text.strip() else float("inf")
        return lambda d: start <= key(d) < end
    exact = _number(field, value)
    return lambda d: key(d) == exact


def _mtime(doc: Doc) -> float:
    return float(doc[MTIME])


def _clause(clause: str) -> Test:
    field, sep, value = clause.partition(":")
    field = field.strip()
    if not sep:
        raise bad(f"filter clause {clause[:100]!r} is not FIELD:VALUE")
    if field in TEXT_FIELDS:
        return _text_test(field, value)
    if field == "size":
        return _number_test(field, value, lambda d: float(d["size"]))
    if field == "last_modified":
        return _number_test(field, value, _mtime)
    raise bad(f"cannot filter on {field[:50]!r}; fields: {', '.join(SORTABLE)}")


def file_filter(request: Request) -> Test | None:
    """The ls `filter` parameters as one test; None when there is none."""
    alternatives: list[list[Test]] = []
    for raw in request.query_params.getlist("filter"):
        if raw.strip():
            alternatives.append([_clause(c) for c in raw.split("/") if c.strip()])
    if not alternatives:
        return None
    return lambda d: any(all(test(d) for test in tests) for tests in alternatives)


def order_keys(request: Request) -> list[tuple[str, bool]]:
    """The `orderby` parameter (`name`, `size DESC`, ...; default by name) as (field, desc)."""
    raw = request.query_params.get("orderby") or "name ASC"
    keys: list[tuple[str, bool]] = []
    for part in raw.split(","):
        words = part.split()
        if not words:
            continue
        direction = words[1].upper() if len(words) > 1 else "ASC"
        if words[0] not in SORTABLE or direction not in ("ASC", "DESC") or len(words) > 2:
            raise bad(f"cannot order by {part.strip()[:100]!r}; fields: {', '.join(SORTABLE)}")
        keys.append((words[0], direction == "DESC"))
    return keys


def sort(docs: list[Doc], keys: list[tuple[str, bool]]) -> None:
    for field, descending in reversed(keys):  # stable sorts, last key first
        if field == "last_modified":
            docs.sort(key=_mtime, reverse=descending)
        else:
            docs.sort(key=lambda d, f=field: d[f], reverse=descending)  # type: ignore[misc]
