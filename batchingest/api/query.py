"""List queries in the Globus conventions (§4 of the Transfer API reference): `filter`,
`orderby` and `fields`, for any list whose rows have named fields.

A list declares its fields (`Field`: a name, a kind and how to get the value from a
row); this module parses the parameters against them and raises QueryError, whose
message names the part that is wrong, for the caller to answer as its API's 400.

Filters: clauses `field:value` joined by `/` must all hold; several `filter` parameters
are alternatives (any may hold). By kind, a value is:

- text: `~TEXT` (the field's `like` test: a prefix for job names, a glob for file
  names), `!~TEXT`, `=TEXT`, `!=TEXT`, or a comma-separated list of exact values;
- word: a comma-separated list of the field's known words (an unknown one is an error);
- number and time: `A,B`, a range where either end may be empty (the end is included
  or not as the field says), or for lists that allow them `>=X`, `<=X`, `>X`, `<X`,
  `=X`, `!=X` or one exact value. Times are `YYYY-MM-DD`, `YYYY-MM-DD HH:MM:SS` or
  RFC 3339 (`2026-01-02T03:04:05.678Z`, `+02:00`), UTC when no zone is given.

Orderby: `field [asc|desc]`, several comma-separated, the first deciding first.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

Row = Any
Test = Callable[[Row], bool]

TEXT, WORD, NUMBER, TIME = "text", "word", "number", "time"
_OPS: list[tuple[str, Callable[[Any, Any], bool]]] = [
    (">=", operator.ge), ("<=", operator.le), ("!=", operator.ne),
    (">", operator.gt), ("<", operator.lt), ("=", operator.eq),
]  # fmt: skip
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})(?:[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?)?"
    r"([Zz]|[+-]\d{2}:\d{2})?"  # a zone after a bare date too: its midnight there
)
_LIMIT = 100  # longest piece of user input repeated in a message


class QueryError(ValueError):
    """A malformed `filter`, `orderby` or `fields`; the message names the wrong part."""


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # TEXT, WORD, NUMBER or TIME
    key: Callable[[Row], Any]
    words: tuple[str, ...] = ()  # WORD: the values there are
    like: Callable[[str, str], bool] = str.startswith  # TEXT `~`: (value, pattern)
    end_included: bool = True  # NUMBER/TIME ranges `A,B`
    operators: bool = False  # NUMBER/TIME: also `>=X`, `=X`, ... and one exact value


def _cut(text: str) -> str:
    return repr(text[:_LIMIT])


def parse_time(text: str) -> float:
    """Seconds since the epoch of a date or time; UTC unless a zone is given."""
    m = _RFC3339.fullmatch(text.strip())
    if m is None:
        raise QueryError(
            f"not a time: {_cut(text)} (use YYYY-MM-DD, YYYY-MM-DD HH:MM:SS or RFC 3339)"
        )
    y, mo, d, h, mi, s, frac, zone = m.groups()
    iso = f"{y}-{mo}-{d}T{h or '00'}:{mi or '00'}:{s or '00'}"
    if frac:
        iso += frac[:7].ljust(7, "0")  # datetime takes microseconds: cut, never round up
    iso += "+00:00" if zone is None or zone in "Zz" else zone
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        raise QueryError(f"not a valid time: {_cut(text)}") from None
    return moment.astimezone(UTC).timestamp()


def _value(field: Field, text: str) -> float:
    if field.kind == TIME:
        return parse_time(text)
    try:
        return float(text)
    except ValueError:
        raise QueryError(f"{field.name} needs a number, not {_cut(text)}") from None


def _text_test(field: Field, value: str) -> Test:
    key, like = field.key, field.like
    for prefix in ("!~", "~", "!=", "="):
        if value.startswith(prefix):
            return _compare(prefix, key, like, value[len(prefix) :])
    allowed = set(value.split(","))
    return lambda r: key(r) in allowed


def _compare(
    how: str, key: Callable[[Row], Any], like: Callable[[str, str], bool], text: str
) -> Test:
    if how == "!~":
        return lambda r: not like(str(key(r)), text)
    if how == "~":
        return lambda r: like(str(key(r)), text)
    if how == "!=":
        return lambda r: bool(key(r) != text)
    return lambda r: bool(key(r) == text)


def _word_test(field: Field, value: str) -> Test:
    allowed = {w.strip() for w in value.split(",") if w.strip()}
    unknown = sorted(allowed - set(field.words))
    if unknown or not allowed:
        what = f"unknown {field.name} {_cut(unknown[0])}" if unknown else f"no {field.name}"
        raise QueryError(f"{what} in filter; use {', '.join(field.words)}")
    key = field.key
    return lambda r: key(r) in allowed


def _range_test(field: Field, value: str) -> Test:
    key = field.key
    if field.operators:
        for symbol, op in _OPS:
            if value.startswith(symbol):
                limit = _value(field, value[len(symbol) :])
                return lambda r: bool(op(key(r), limit))
    if "," not in value:
        if field.operators:
            exact = _value(field, value)
            return lambda r: bool(key(r) == exact)
        raise QueryError(
            f"{field.name} needs a range FROM,TO (either may be empty), not {_cut(value)}"
        )
    start_text, _, end_text = value.partition(",")
    start = _value(field, start_text) if start_text.strip() else float("-inf")
    end = _value(field, end_text) if end_text.strip() else float("inf")
    if field.end_included:
        return lambda r: bool(start <= key(r) <= end)
    return lambda r: bool(start <= key(r) < end)


def _field(fields: dict[str, Field], name: str) -> Field | None:
    return fields.get(name) or fields.get(name.lower())


def _clause(fields: dict[str, Field], clause: str) -> Test:
    name, sep, value = clause.partition(":")
    if not sep:
        raise QueryError(f"filter clause {_cut(clause)} is not FIELD:VALUE")
    field = _field(fields, name.strip())
    if field is None:
        raise QueryError(f"cannot filter on {_cut(name.strip())}; fields: {', '.join(fields)}")
    try:
        if field.kind == TEXT:
            return _text_test(field, value)
        if field.kind == WORD:
            return _word_test(field, value)
        return _range_test(field, value)
    except QueryError as e:
        raise QueryError(f"filter clause {_cut(clause)}: {e}") from None


def parse_filter(raws: Iterable[str], fields: Sequence[Field]) -> Test | None:
    """The `filter` parameters as one test; None when there is none."""
    table = {f.name: f for f in fields}
    alternatives: list[list[Test]] = []
    for raw in raws:
        if raw.strip():
            alternatives.append([_clause(table, c) for c in raw.split("/") if c.strip()])
    if not alternatives:
        return None
    # a single clause (the usual case) is tested directly: a filter runs once per row
    each = [tests[0] if len(tests) == 1 else _every(tests) for tests in alternatives]
    if len(each) == 1:
        return each[0]
    return lambda r: any(test(r) for test in each)


def _every(tests: list[Test]) -> Test:
    return lambda r: all(test(r) for test in tests)


def parse_orderby(raw: str | None, fields: Sequence[Field]) -> list[tuple[Field, bool]]:
    """The `orderby` parameter as (field, descending) pairs, first key first."""
    table = {f.name: f for f in fields}
    keys: list[tuple[Field, bool]] = []
    for part in (raw or "").split(","):
        words = part.split()
        if not words:
            continue
        field = _field(table, words[0])
        direction = words[1].upper() if len(words) > 1 else "ASC"
        if field is None or direction not in ("ASC", "DESC") or len(words) > 2:
            raise QueryError(
                f"cannot order by {_cut(part.strip())}; fields: {', '.join(table)}, "
                "each optionally followed by asc or desc"
            )
        keys.append((field, direction == "DESC"))
    return keys


def sort(rows: list[Row], keys: Sequence[tuple[Field, bool]]) -> None:
    """Sort in place; rows equal on every key keep their order (stable sorts)."""
    for field, descending in reversed(keys):
        rows.sort(key=field.key, reverse=descending)


def parse_fields(raw: str | None, known: Sequence[str]) -> list[str] | None:
    """The `fields` parameter as known field names (in the order of `known`), or None.

    Names are matched ignoring case; an unknown one is a QueryError.
    """
    if raw is None or not raw.strip():
        return None
    by_fold = {k.lower(): k for k in known}
    asked = set()
    for name in (n.strip() for n in raw.split(",")):
        if not name:
            continue
        if name.lower() not in by_fold:
            raise QueryError(f"unknown field {_cut(name)} in fields; use {', '.join(known)}")
        asked.add(by_fold[name.lower()])
    return [k for k in known if k in asked] or None
