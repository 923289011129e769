"""The typed documents (api/models.py, api/globus/models.py): their patterns are the
server's rules, the documents the server builds are what they say, and a Globus path
served with other methods answers 405 listing them all."""

from __future__ import annotations

import os
import re
from datetime import UTC
from pathlib import Path
from typing import Any

import msgspec
import pytest
from test_api import assert_error, call, make_app

from batchingest import endpoints, transfers
from batchingest.api import models, staccato
from batchingest.api.errors import ApiError
from batchingest.api.globus import documents
from batchingest.api.globus import models as globus_models
from batchingest.endpoints import Endpoint, Item, PathError


def matches(pattern: str, text: str) -> bool:
    # JSON Schema's (ECMA 262) '$' is the end of the string, Python's \Z
    assert pattern.endswith("$")
    return re.search(pattern[:-1] + r"\Z", text) is not None


GLOBUS_PATHS = ["", "/", "~", "~/", "/~", "/~/", "a", "/a/b/", "~x", "/~x", "a/~", "/~/~",
                "//", "a//b", "./a", "a/..", "/..a", "/.a", ".", "..", "a\\b", "a\x00", "x" * 255,
                "x" * 256, "/a/" + "y" * 255, "~/a", "/~/a/b/", " ", "/ /", "a/./b"]  # fmt: skip


@pytest.mark.parametrize("raw", GLOBUS_PATHS)
def test_globus_path_patterns_are_what_the_server_enforces(raw: str) -> None:
    try:
        parts: list[str] | None = endpoints.split_path(raw)
    except PathError:
        parts = None
    assert matches(globus_models.PATH_PATTERN, raw) == (parts is not None)
    # what can be renamed or deleted: a path below the endpoint folder
    assert matches(globus_models.SUBPATH_PATTERN, raw) == bool(parts)


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("file:///a/b.txt", True),
        ("FILE://localhost/a/%C3%A9", True),
        ("file:///a/%2e%2e/x", True),  # well-formed: refused as outside (403), not as malformed
        ("file:///a/", True),
        ("file:///a//b", False),
        ("file:///a/%00", False),
        ("file:///a/%2F", False),
        ("file:///a/%C3", False),  # half a UTF-8 character
        ("file:///a/%ED%A0%80", False),  # a surrogate
        ("file:relative/x", False),
        ("file://otherhost/a", False),
        ("http://example.org/a", False),
        ("file:///a?b", False),
        ("file:///", False),
    ],
)
def test_file_url_pattern_is_what_staccato_reads(url: str, ok: bool) -> None:
    assert matches(models.FILE_URL_PATTERN, url) == ok
    if ok:  # the server then reads it as a path without complaint
        assert staccato.file_path(url, "source_url").startswith("/")


def test_integral_numbers_are_integers_and_nothing_else_is() -> None:
    body = b'{"source_url": "file:///a/b", "destination_url": "file:///a/c", "end_offset": 10.0}'
    assert models.decode(models.TransferRequest, body).end_offset == 10
    for bad in (b"10.5", b'"10"', b"true", b"-2"):
        with pytest.raises(ApiError) as refused:
            models.decode(models.TransferRequest, body.replace(b"10.0", bad))
        assert refused.value.status == 400 and "end_offset" in refused.value.message
    for broken in (b"", b"{", b"[]"):
        with pytest.raises(ApiError) as refused:
            models.decode(models.TransferRequest, broken, "ClientError.BadRequest")
        assert (refused.value.status, refused.value.code) == (400, "ClientError.BadRequest")


A, C = '"source_url": "file:///a/b"', '"destination_url": "file:///a/c"'


@pytest.mark.parametrize(
    ("fields", "told"),
    [
        ((A, C, '"end_offset": 10.5'), "got `float` - at `$.end_offset`"),
        ((A, C, '"end_offset": -2.0'), "Expected `int` >= -1 - at `$.end_offset`"),
        # a float where no number belongs is told as the float it was, not as an int
        (('"source_url": 5.0', C), "Expected `str`, got `float` - at `$.source_url`"),
        # an integral float is fine: the fault told is the next one
        (('"end_offset": 10.0', '"source_url": 5', C), "Expected `str`, got `int`"),
        ((A, '"end_offset": 10.0'), "missing required field `destination_url`"),
    ],
)
def test_a_refused_float_is_told_as_sent(fields: tuple[str, ...], told: str) -> None:
    body = ("{" + ", ".join(fields) + "}").encode()
    with pytest.raises(ApiError) as refused:
        models.decode(models.TransferRequest, body)
    assert told in refused.value.message


def test_globus_documents_are_their_models(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / "l").symlink_to("f")
    ep = Endpoint("e", tmp_path)
    msgspec.convert(documents.endpoint_doc(ep), globus_models.Endpoint, strict=True)
    for name in ("f", "l"):
        item = Item(name, os.lstat(tmp_path / name), "f" if name == "l" else None)
        doc: dict[str, Any] = documents.file_doc(item)
        assert msgspec.convert(doc, globus_models.File, strict=True).name == name
    # a document cut down by fields= is still one
    cut = documents.select_fields(documents.endpoint_doc(ep), ["id"])
    assert msgspec.convert(cut, globus_models.Endpoint).display_name is msgspec.UNSET


def test_globus_405_lists_every_method_before_any_501(root: Path, tmp_path: Path) -> None:
    app, _ = make_app(root, endpoints=[("e", tmp_path)])
    at = "/globus/v0.10/endpoint/e"
    for method in ("POST", "PATCH", "OPTIONS"):
        reply = call(app, method, at)
        assert_error(reply, 405, "ClientError.MethodNotAllowed")
        assert reply.headers["allow"] == "DELETE, GET, HEAD, PUT"
    # updating or deleting an endpoint is Globus's own operation, not served here
    for method in ("PUT", "DELETE"):
        assert_error(call(app, method, at), 501, "NotImplemented")
    assert_error(call(app, "POST", "/globus/v0.10/bookmark_list"), 501, "NotImplemented")
    assert_error(call(app, "GET", "/globus/v0.10/nothing"), 404, "ClientError.NotFound")


def test_submissions_are_checked_by_their_models(root: Path, tmp_path: Path) -> None:
    endpoint = tmp_path / "endpoint"
    endpoint.mkdir()
    app, _ = make_app(root, endpoints=[("e", endpoint)])
    for path, body, where in [
        ("/globus/v0.10/transfer", b"", "not valid JSON"),
        ("/globus/v0.10/transfer", b'{"DATA_TYPE": "delete"}', "DATA_TYPE"),
        ("/globus/v0.10/delete",
         b'{"submission_id": "s", "endpoint": "e", "DATA": [{"path": "/"}]}', "$.DATA[0].path"),
        ("/globus/v0.10/operation/endpoint/e/rename",
         b'{"old_path": "", "new_path": "/b"}', "$.old_path"),
        ("/globus/v0.10/operation/endpoint/e/mkdir", b'{"path": "a", "local_user": "u"}',
         "$.local_user"),
    ]:  # fmt: skip
        reply = call(app, "POST", path, body)
        assert where in assert_error(reply, 400, "ClientError.BadRequest")["message"], reply.body
    assert not os.listdir(endpoint)


def test_feed_refuses_a_malformed_last_event_id(root: Path) -> None:
    app, _ = make_app(root)
    reply = call(app, "GET", "/events", headers={"Last-Event-ID": "nope"})
    assert_error(reply, 400, "InvalidCursor")
    assert call(app, "GET", "/events").status == 200


def test_endpoint_search_refuses_an_empty_scope(root: Path, tmp_path: Path) -> None:
    app, _ = make_app(root, endpoints=[("e", tmp_path)])
    reply = call(app, "GET", "/globus/v0.10/endpoint_search?filter_scope=")
    assert_error(reply, 400, "ClientError.BadRequest")
    found = call(app, "GET", "/globus/v0.10/endpoint_search").json()
    assert [d["name"] for d in found["DATA"]] == ["e"]


def test_an_empty_number_is_not_a_number(root: Path, tmp_path: Path) -> None:
    """An integer parameter given empty is a 400, as the spec's integer type says; left
    out, it has its default."""
    endpoint = tmp_path / "endpoint"
    endpoint.mkdir()
    app, _ = make_app(root, endpoints=[("e", endpoint)])
    for path, code in [
        ("/jobs?offset=", "InvalidParameter"),
        ("/jobs?limit=", "InvalidParameter"),
        ("/events?limit=", "InvalidParameter"),
        ("/globus/v0.10/operation/endpoint/e/ls?limit=", "ClientError.BadRequest"),
        ("/globus/v0.10/operation/endpoint/e/ls?show_hidden=", "ClientError.BadRequest"),
        ("/globus/v0.10/task_list?offset=", "ClientError.BadRequest"),
        ("/v1/transfers?limit=", "InvalidRequest"),
    ]:
        assert_error(call(app, "GET", path), 400, code)
        assert call(app, "GET", path.split("?")[0]).status == 200, path


@pytest.mark.parametrize(
    "text",
    ["2026-01-01", "2026-12-31T23:59:59.999999Z", "2024-02-29 10:00+01:00", "2000-02-29T10",
     "2026-02-29", "1900-02-29", "2026-04-31", "2026-13-01", "0001-01-01", "9999-12-31T23:59-05:00",
     "2026-01-01T24:00", "tomorrow", "2026-01-01T10:00:00+0530", "2026-01-01T10:00:00+05:30"],
)  # fmt: skip
def test_deadline_pattern_is_what_the_server_reads(text: str) -> None:
    """A deadline the pattern admits is one the server reads, in UTC, without failing."""
    if matches(globus_models.TIME_PATTERN, text):
        assert transfers.parse_time(text).astimezone(UTC).year < 3000
    else:
        assert text in ("2026-02-29", "1900-02-29", "2026-04-31", "2026-13-01", "0001-01-01",
                        "9999-12-31T23:59-05:00", "2026-01-01T24:00", "tomorrow")  # fmt: skip


def test_globus_orderby_patterns_are_what_the_server_reads(root: Path, tmp_path: Path) -> None:
    """What the spec's orderby patterns admit, ls and task_list sort by; what they do not
    is (mostly) refused: only other spellings of the same keys are read too."""
    (tmp_path / "a").write_text("a")
    app, _ = make_app(root, endpoints=[("e", tmp_path)])
    spec = call(app, "GET", "/openapi.json").json()["paths"]
    ls = "/globus/v0.10/operation/endpoint/{endpoint}/ls"
    for path, at in [(ls, "/globus/v0.10/operation/endpoint/e/ls"),
                     ("/globus/v0.10/task_list", "/globus/v0.10/task_list")]:  # fmt: skip
        (found,) = [p for p in spec[path]["get"]["parameters"] if p["name"] == "orderby"]
        pattern = found["schema"]["pattern"]
        for raw in ("name", "size DESC,name asc", "request_time DESC", "type", "nope", "name up"):
            listed = call(app, "GET", f"{at}?orderby={raw.replace(' ', '%20')}").status
            assert (listed == 200) == matches(pattern, raw), (path, raw, listed)


def test_globus_task_documents_are_their_models(root: Path, tmp_path: Path) -> None:
    """A submitted task's documents, as the API answers them, decode as their models."""
    (tmp_path / "a.txt").write_text("a")
    app, _ = make_app(root, endpoints=[("e", tmp_path)])
    body = (b'{"DATA_TYPE": "transfer", "submission_id": "s-1", "source_endpoint": "e",'
            b' "destination_endpoint": "e", "label": "x", "deadline": "2999-01-01",'
            b' "DATA": [{"source_path": "/a.txt", "destination_path": "/b.txt"}]}')  # fmt: skip
    for status in (202, 200):  # accepted, then the same submission again: Duplicate
        reply = call(app, "POST", "/globus/v0.10/transfer", body)
        assert reply.status == status, reply.body
        result = msgspec.json.decode(reply.body, type=globus_models.Result)
    task = f"/globus/v0.10/task/{result.task_id}"
    for path, model in [
        (task, globus_models.Task),
        ("/globus/v0.10/task_list", globus_models.TaskList),
        (f"{task}/event_list", globus_models.TaskEventList),
        (f"{task}/successful_transfers", globus_models.SuccessfulTransfers),
        ("/globus/v0.10/endpoint_search", globus_models.EndpointList),
        ("/globus/v0.10/operation/endpoint/e/ls", globus_models.FileList),
        ("/globus/v0.10/submission_id", globus_models.SubmissionId),
        ("/globus/v0.10/endpoint/e/activation_requirements", globus_models.ActivationRequirements),
    ]:
        reply = call(app, "GET", path)
        assert reply.status == 200, (path, reply.body)
        msgspec.json.decode(reply.body, type=model, strict=True)
    listed = msgspec.json.decode(call(app, "GET", "/globus/v0.10/task_list").body)
    assert [t["label"] for t in listed["DATA"]] == ["x"]
