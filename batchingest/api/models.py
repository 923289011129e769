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
        raise ApiError(400, code, f"request body: {e}") from None
    except msgspec.DecodeError as e:
        raise ApiError(400, code, f"request body is not valid JSON: {e}") from None


def schemas(*extra: type[Any]) -> dict[str, Any]:
    """The components/schemas of every model (and of extra ones), with $refs into it."""
    _, components = msgspec.json.schema_components(
        (*MODELS, *extra), ref_template="#/components/schemas/{name}"
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


def ref(model: type[Any]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}
