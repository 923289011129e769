"""The JSON documents of the API as typed models: one source for validation and schema.

msgspec rather than pydantic: one small dependency with no others, it decodes and
validates a request body in one pass from bytes (no dict in between), and
`msgspec.json.schema_components` gives JSON Schema 2020-12, which is what OpenAPI 3.1
uses. Input documents are decoded with `decode(Model, body)`; the hand-tuned hot
routes keep writing their answers directly, and their schema comes from here.

The patterns and limits below are the ones the server enforces (store.valid_name,
paths.relpath_segments, api.staging); tests check both sides against the same values.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

from batchingest.api.errors import ApiError

# store.valid_name: 1-255 of [A-Za-z0-9._-], not starting with '.'
JOB_NAME_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}$"
# paths.relpath_segments: '/'-separated segments, none empty, '.', '..' or hidden, no
# backslash or control character. Its byte limits (255 a segment, 4095 in all) are
# character limits here: the same for ASCII, and JSON Schema cannot count bytes.
_SEGMENT = r"[^/.\\\x00-\x1f\x7f][^/\\\x00-\x1f\x7f]{0,254}"
FILE_PATH_PATTERN = rf"^{_SEGMENT}(/{_SEGMENT})*$"
MAX_PATH = 4095
UUID_PATTERN = r"^[0-9A-Fa-f]{8}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{12}$"
STATUSES = ("ready", "queue", "processing", "success", "error")

JobName = Annotated[
    str,
    Meta(
        pattern=JOB_NAME_PATTERN,
        description="1-255 of A-Z a-z 0-9 . _ -, not starting with '.'",
    ),
]
Status = Literal["ready", "queue", "processing", "success", "error"]


class Error(msgspec.Struct):
    """Every error: the same code is in the X-Error-Code header."""

    code: str
    message: str
    request_id: str
    resource: Annotated[str, Meta(description="the URL path that was asked for")]


class Job(msgspec.Struct):
    Name: JobName
    Status: Status


Time = Annotated[
    str | None, Meta(description="RFC 3339 UTC to the millisecond; null if the folder is gone")
]


class JobRow(msgspec.Struct, omit_defaults=True):
    """A job in a listing: Name and Status, or the fields asked for with ?fields=."""

    Name: JobName | None = None
    Status: Status | None = None
    Created: Annotated[Time, Meta(description="when the job folder was made")] = None
    Modified: Annotated[Time, Meta(description="the folder's last change (its ctime)")] = None


class JobInfo(msgspec.Struct, omit_defaults=True):
    """A job with its task lists as the processor reads them from its JOB file."""

    Name: JobName
    Status: Status
    Created: Annotated[Time, Meta(description="when the job folder was made")]
    Modified: Annotated[Time, Meta(description="the folder's last change (its ctime)")]
    Todo: Annotated[
        list[JobName] | None, Meta(description="tasks still to run; null if JOB is unreadable")
    ]
    Finished: Annotated[
        list[Any] | None,
        Meta(description="records of the tasks run, oldest first; null if JOB is unreadable"),
    ]
    Events: Annotated[int, Meta(ge=0, description="events in the job's history")] = 0
    JobError: Annotated[str, Meta(description="why JOB cannot be read, if it cannot")] = ""


class Uploaded(msgspec.Struct):
    path: Annotated[str, Meta(description="the file's path in the job folder")]
    size: Annotated[int, Meta(ge=0)]
    sha256: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]


class ServiceInfo(msgspec.Struct):
    name: str
    version: str


class Health(msgspec.Struct):
    status: str


class StagingRequest(msgspec.Struct, forbid_unknown_fields=False):
    """POST /dts/staging: the archive ids of the files to stage.

    At most --staging-max-ids ids (10000 by default): checked by the server, so not in
    the schema, which is the same for every configuration.
    """

    ids: Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1)]


class StagingPathsRequest(msgspec.Struct):
    """POST /dts/staging of a service without a catalog: ids are paths in the archive,
    with the rules of file paths in a job (an id breaking them is a 400 InvalidId)."""

    ids: Annotated[
        list[Annotated[str, Meta(pattern=FILE_PATH_PATTERN, max_length=MAX_PATH)]],
        Meta(min_length=1),
    ]


class StagingCreated(msgspec.Struct):
    request_id: Annotated[str, Meta(pattern=UUID_PATTERN)]


class StagingStatus(msgspec.Struct, omit_defaults=True):
    status: Literal["staging", "ready", "failed"]
    files_total: Annotated[int, Meta(ge=0)]
    files_staged: Annotated[int, Meta(ge=0)]
    bytes_total: Annotated[int, Meta(ge=0)]
    bytes_staged: Annotated[int, Meta(ge=0)]
    message: Annotated[str, Meta(description="why it failed (only when failed)")] = ""


# -- job history (api/events.py) --------------------------------------------------------

Cursor = Annotated[str, Meta(pattern=r"^[0-9a-f]{20}$", description="a place in the feed")]


class Event(msgspec.Struct, forbid_unknown_fields=False):
    """One event of a job's history, as recorded (batchingest.events.make_event)."""

    DATA_TYPE: Literal["event"]
    code: str
    time: Annotated[str, Meta(description="RFC 3339 UTC to the millisecond")]
    is_error: bool
    description: str
    details: dict[str, Any]
    state: Annotated[str, Meta(description="the job's status word after the event")]


class FeedEvent(Event, forbid_unknown_fields=False):
    """An event of the root-wide feed: the job it happened to, and where it is."""

    job: Annotated[str, Meta(description="the job's name when it happened")]
    cursor: Cursor


def feed_event(event: dict[str, Any], cursor: str) -> FeedEvent:
    """A recorded event of the feed (batchingest.events.Feed.read) as its document."""
    return msgspec.convert({"DATA_TYPE": "event", **event, "cursor": cursor}, FeedEvent)


class JobEventList(msgspec.Struct):
    """GET /jobs/{id}/events: a page of the job's history, oldest first."""

    DATA_TYPE: Literal["event_list"]
    total: Annotated[int, Meta(ge=0)]
    offset: Annotated[int, Meta(ge=0)]
    limit: Annotated[int, Meta(ge=1)]
    DATA: list[Event]


class FeedEventList(msgspec.Struct):
    """GET /events: every job's events after a cursor; next_cursor while there are more."""

    DATA_TYPE: Literal["event_list"]
    DATA: list[FeedEvent]
    next_cursor: Cursor | None


# -- Staccato transfers (api/staccato.py) -------------------------------------------------

# A file:// URL of an absolute path on this machine (no host but localhost, no query or
# fragment), '/'-separated names that are not empty, in URL characters; percent escapes
# only of printable ASCII other than '/' and '\', or of whole UTF-8 characters. A
# name of 255 characters at most (so never over 255 bytes decoded).
_HEX = "[0-9A-Fa-f]"
_CONT = "%[89ABab][0-9A-Fa-f]"
_ESCAPE = (
    f"%(2[0-9A-Ea-e]|[34]{_HEX}|5[0-9ABDEFabdef]|6{_HEX}|7[0-9A-Ea-e])"
    f"|%[Cc][2-9A-Fa-f]{_CONT}|%[Dd]{_HEX}{_CONT}"
    f"|%[Ee]0%[ABab]{_HEX}{_CONT}|%[Ee][1-9A-Ca-cEeFf]{_CONT}{_CONT}|%[Ee][Dd]%[89][0-9A-Fa-f]{_CONT}"
    f"|%[Ff]0%[9ABab]{_HEX}{_CONT}{_CONT}|%[Ff][1-3]{_CONT}{_CONT}{_CONT}|%[Ff]4%8{_HEX}{_CONT}{_CONT}"
)
_URL_NAME = rf"([-!$&'()*+,.0-9:;=@A-Z_a-z~]|{_ESCAPE}){{1,255}}"
FILE_URL_PATTERN = rf"^[Ff][Ii][Ll][Ee]://(localhost)?(/{_URL_NAME})+/?$"
FileUrl = Annotated[
    str, Meta(pattern=FILE_URL_PATTERN, description="file:// URL of a path in an endpoint folder")
]
Offset = Annotated[int, Meta(ge=0, description="a byte offset")]
EndOffset = Annotated[int, Meta(ge=-1, description="a byte offset; -1: the end of the source")]


class TransferRequest(msgspec.Struct, forbid_unknown_fields=False):
    """POST /v1/transfers: copy [start_offset, end_offset) of a file into the same bytes
    of another, both inside endpoint folders."""

    source_url: FileUrl
    destination_url: FileUrl
    start_offset: Offset | None = None
    end_offset: EndOffset | None = None
    source_options: dict[str, Any] | None = None
    destination_options: dict[str, Any] | None = None


class TransferAction(msgspec.Struct, forbid_unknown_fields=False):
    """POST /v1/transfers/{id}/action."""

    xferaction: Annotated[Literal["cancel"], Meta(description="the one action")]


TransferState = Literal[
    "STATE_NEW", "STATE_RUNNING", "STATE_CANCELING", "STATE_CANCELED", "STATE_ERRORING",
    "STATE_ERROR", "STATE_COMPLETE", "STATE_DELETED",
]  # fmt: skip


class Transfer(msgspec.Struct):
    """A Staccato transfer: a job named by its id."""

    id: Annotated[str, Meta(pattern=UUID_PATTERN)]
    source_url: str
    destination_url: str
    state: TransferState
    progress: Annotated[int, Meta(ge=0, description="bytes copied and flushed")]
    start_offset: Offset
    end_offset: EndOffset
    source_options: dict[str, Any]
    destination_options: dict[str, Any]


MODELS: tuple[type[msgspec.Struct], ...] = (
    Error,
    Job,
    JobRow,
    JobInfo,
    Uploaded,
    ServiceInfo,
    Health,
    StagingRequest,
    StagingPathsRequest,
    StagingCreated,
    StagingStatus,
)

T = TypeVar("T")


def decode(model: type[T], body: bytes, code: str = "InvalidRequest") -> T:
    """body as a model: 400 with `code` saying where it is wrong, if it is not one."""
    try:
        return msgspec.json.decode(body, type=model)
    except msgspec.ValidationError as e:
        wrong = e
    except msgspec.DecodeError as e:
        raise ApiError(400, code, f"request body is not valid JSON: {e}") from None
    # JSON Schema counts 5.0 as an integer, so the server does too (and nothing else:
    # msgspec's lax mode would also take "5"). Only a float where an int belongs reads
    # the body again; any other fault is told at once, as it was sent.
    if _INT_GOT_FLOAT.search(str(wrong)):
        try:
            return msgspec.convert(_integral(msgspec.json.decode(body)), type=model)
        except msgspec.ValidationError as e:
            wrong = e
    raise ApiError(400, code, f"request body: {wrong}") from None


_INT_GOT_FLOAT = re.compile(r"Expected `[^`]*\bint\b[^`]*`, got `float`")


def _integral(node: Any) -> Any:
    if isinstance(node, float) and node.is_integer() and abs(node) < 2**63:
        return int(node)
    if isinstance(node, dict):
        return {k: _integral(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_integral(v) for v in node]
    return node


def schemas() -> dict[str, Any]:
    """The components/schemas of every model, with $refs into it."""
    _, components = msgspec.json.schema_components(
        (*MODELS, *REFERENCED.values()), ref_template="#/components/schemas/{name}"
    )
    _complete(components)
    return components


def _complete(node: Any) -> None:
    """Arrays of anything get `items: {}` (msgspec leaves it out; client generators
    then drop the whole document), and enums say their type."""
    if isinstance(node, dict):
        if node.get("type") == "array" and "items" not in node:
            node["items"] = {}
        enum = node.get("enum")
        if enum and "type" not in node and all(isinstance(v, str) for v in enum):
            node["type"] = "string"
        for value in node.values():
            _complete(value)
    elif isinstance(node, list):
        for value in node:
            _complete(value)


# every model a spec has referred to, by name: schemas() gives theirs too
REFERENCED: dict[str, type[Any]] = {}


def ref(model: type[Any]) -> dict[str, str]:
    REFERENCED.setdefault(model.__name__, model)
    return {"$ref": f"#/components/schemas/{model.__name__}"}
