"""The Globus Transfer API's JSON documents as typed models (msgspec, as api/models.py).

They are the schema of the /globus/ operations in /openapi.json, and the submissions
(transfer, delete, mkdir, rename) are decoded with them, so the spec's rules for a body
are the server's. Documents a `fields=` parameter may cut down (endpoint, file, task)
have every field but DATA_TYPE optional. Unknown fields of a submission are ignored,
as Globus does: the SDK sends many this service has no use for.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from batchingest import endpoints

# endpoints.split_path: absolute within the endpoint folder ('/', '/~/', '~/' or none
# before it), '/'-separated names that are not empty, '.' or '..', no NUL or backslash,
# one trailing '/' allowed. Its 255-byte limit on a name is a character limit here
# (the same for ASCII; JSON Schema cannot count bytes).
_C = r"[^/\\\x00]"  # a character of a name
_DOTS = rf"\.[^/\\\x00.]{_C}{{0,253}}|\.\.{_C}{{1,253}}"  # names starting with '.'
_NAME = rf"([^/\\\x00.]{_C}{{0,254}}|{_DOTS})"
_FIRST = rf"([^/\\\x00.~]{_C}{{0,254}}|{_DOTS})"  # unprefixed, '~x' would be a user's home
PATH_PATTERN = rf"^(|~|/~|(/~/|~/|/)({_NAME}(/{_NAME})*/?)?|{_FIRST}(/{_NAME})*/?)$"
# the same without the endpoint folder itself ('', '/', '~', ...): what can be renamed or deleted
_NOT_HOME = rf"([^/\\\x00.~]{_C}{{0,254}}|~{_C}{{1,254}}|{_DOTS})"  # '/~' is the folder
SUBPATH_PATTERN = (
    rf"^((/~/|~/){_NAME}(/{_NAME})*/?|/{_NOT_HOME}(/{_NAME})*/?|{_FIRST}(/{_NAME})*/?)$"
)
Subpath = Annotated[
    str,
    Meta(
        pattern=SUBPATH_PATTERN,
        max_length=endpoints.MAX_PATH,
        description="a path on the endpoint below its folder",
    ),
]
Path = Annotated[
    str,
    Meta(
        pattern=PATH_PATTERN,
        max_length=endpoints.MAX_PATH,
        description="a path on the endpoint: '/' (or '~/') is its folder",
    ),
]
Text = Annotated[str, Meta(min_length=1, max_length=256)]
Time = Annotated[str, Meta(description="YYYY-MM-DD HH:MM:SS+00:00")]
Unset = UnsetType
MAX_ITEMS = 100_000  # items in one task

# -- submissions -------------------------------------------------------------------------


class TransferItem(msgspec.Struct, omit_defaults=True):
    source_path: Path
    destination_path: Path
    DATA_TYPE: Literal["transfer_item"] = "transfer_item"
    recursive: bool | None = None


class DeleteItem(msgspec.Struct, omit_defaults=True):
    path: Subpath
    DATA_TYPE: Literal["delete_item"] = "delete_item"


# What transfers.parse_time reads (datetime.fromisoformat), of dates that exist: years
# 1900-2999 (any zone then stays a year of datetime's), 29 February of leap years only
_YEAR = "(19|2[0-9])[0-9]{2}"
_LEAP = "((19|2[0-9])(0[48]|[2468][048]|[13579][26])|2[048]00)"
_DATE = (
    f"({_YEAR}-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
    f"|02-(0[1-9]|1[0-9]|2[0-8]))|{_LEAP}-02-29)"
)
_CLOCK = r"([01][0-9]|2[0-3])(:[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?)?"
TIME_PATTERN = f"^{_DATE}([T ]{_CLOCK}(Z|[+-]([01][0-9]|2[0-3]):?[0-5][0-9])?)?$"
Deadline = Annotated[
    str,
    Meta(pattern=TIME_PATTERN, description="a date and time, ISO 8601 (UTC if no zone is given)"),
]
Label = Annotated[str, Meta(min_length=1, max_length=128)]
SyncLevel = Annotated[int, Meta(ge=0, le=3)] | Literal["exists", "size", "mtime", "checksum"]


class Submission(msgspec.Struct, omit_defaults=True, kw_only=True):
    """What every task submission has: its id (a second submission with the same id finds
    the first task), a label and a deadline."""

    submission_id: Text
    label: Label | None = None
    deadline: Deadline | None = None


class TransferSubmission(Submission, kw_only=True):
    """POST /transfer: copy items from one endpoint to another, as a job."""

    DATA_TYPE: Literal["transfer"] = "transfer"
    source_endpoint: Text
    destination_endpoint: Text
    DATA: Annotated[list[TransferItem], Meta(min_length=1, max_length=MAX_ITEMS)]
    sync_level: SyncLevel | None = None
    verify_checksum: bool | None = None
    preserve_timestamp: bool | None = None
    delete_destination_extra: bool | None = None
    encrypt_data: Annotated[bool | None, Meta(description="true: 501, not served")] = None


class DeleteSubmission(Submission, kw_only=True):
    """POST /delete: remove paths on an endpoint, as a job."""

    DATA_TYPE: Literal["delete"] = "delete"
    endpoint: Text
    DATA: Annotated[list[DeleteItem], Meta(min_length=1, max_length=MAX_ITEMS)]
    recursive: bool | None = None
    ignore_missing: bool | None = None


NoLocalUser = Annotated[None, Meta(description="not served: files are the service's")]


class Mkdir(msgspec.Struct, omit_defaults=True):
    path: Path
    DATA_TYPE: Literal["mkdir"] = "mkdir"
    local_user: NoLocalUser = None


class Rename(msgspec.Struct, omit_defaults=True):
    old_path: Subpath
    new_path: Subpath
    DATA_TYPE: Literal["rename"] = "rename"
    local_user: NoLocalUser = None


# -- answers -----------------------------------------------------------------------------


class Link(msgspec.Struct):
    DATA_TYPE: Literal["link"]
    href: str
    rel: str
    resource: str
    title: str


class Result(msgspec.Struct, omit_defaults=True):
    """What an action answers: mkdir_result, result, activation_result, *_result."""

    DATA_TYPE: str
    code: str
    message: str
    request_id: str
    resource: str
    task_id: str | Unset = UNSET
    submission_id: str | Unset = UNSET
    task_link: Link | Unset = UNSET
    activated: bool | Unset = UNSET
    expires_in: int | Unset = UNSET
    expire_time: Unset | None = UNSET
    subject: Unset | None = UNSET
    length: int | Unset = UNSET
    DATA: list[None] | Unset = UNSET
    oauth_server: Unset | None = UNSET


class SubmissionId(msgspec.Struct):
    DATA_TYPE: Literal["submission_id"]
    value: Annotated[str, Meta(description="a UUID")]


class ActivationRequirements(msgspec.Struct):
    DATA_TYPE: Literal["activation_requirements"]
    DATA: list[None]
    length: int
    activated: bool
    auto_activation_supported: bool
    expires_in: int
    expire_time: None
    oauth_server: None


def _fields(by_type: dict[Any, str]) -> list[tuple[str, Any]]:
    """(name, type) pairs from a table of types and the names of that type."""
    return [(name, kind) for kind, names in by_type.items() for name in names.split()]


def _document(
    name: str, doc: str, fields: list[tuple[str, Any]], optional: bool, data_type: str = ""
) -> Any:
    """A Globus document: DATA_TYPE (its name in snake case unless told), then its fields;
    every one optional (may be left out) in a document that `fields=` cuts down."""
    data_type = data_type or re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()
    typed = [(n, t | Unset, UNSET) if optional else (n, t) for n, t in fields]
    return msgspec.defstruct(
        name,
        [("DATA_TYPE", Literal.__getitem__(data_type)), *typed],
        omit_defaults=True,
        module=__name__,
        namespace={"__doc__": doc},
    )


def _page(name: str, item: Any, ints: str, **more: Any) -> Any:
    """A list document: DATA, the items, and its paging fields (integers, and more)."""
    fields = [("DATA", list[item]), *_fields({int: ints}), *more.items()]
    return _document(name, f"A page of {item.__name__} documents.", fields, optional=False)


_ENDPOINT_FIELDS = _fields({
    str: "id name display_name canonical_name username owner_string description "
    "entity_type default_directory",
    bool: "read_only activated",
    int: "expires_in",
    list[None]: "DATA",
    list[str]: "my_effective_roles",
    bool | None: "is_globus_connect is_go_storage gcp_connected gcp_paused shareable public "
    "acl_available acl_editable force_encryption disable_verify in_use non_functional "
    "s3_owner_activated",
    int | None: "max_concurrency max_parallelism preferred_concurrency preferred_parallelism",
    str | None: "expire_time globus_connect_setup_key host_endpoint host_endpoint_display_name "
    "host_endpoint_id host_path sharing_target_endpoint sharing_target_root_path network_use "
    "location organization department keywords contact_email contact_info info_link "
    "myproxy_dn myproxy_server oauth_server s3_url subscription_id",
})  # fmt: skip
Endpoint = _document("Endpoint", "An endpoint: a folder on this machine, always active, "
                     "never shared.", _ENDPOINT_FIELDS, optional=True)  # fmt: skip
_FILE_FIELDS = _fields({
    str: "name permissions user group",
    Literal["file", "dir", "invalid_symlink"]: "type",
    int: "size",
    int | None: "link_size",
    str | None: "last_modified link_target link_last_modified link_user link_group",
})  # fmt: skip
File = _document("File", "A file, folder or link (never followed: a link is an "
                 "invalid_symlink).", _FILE_FIELDS, optional=True)  # fmt: skip


class FatalError(msgspec.Struct):
    code: str
    description: str


_TASK_FIELDS = _fields({
    str: "task_id recursive_symlinks username",
    Literal["TRANSFER", "DELETE"]: "type",
    Literal["ACTIVE", "INACTIVE", "SUCCEEDED", "FAILED"]: "status",
    bool: "verify_checksum preserve_timestamp delete_destination_extra encrypt_data is_paused "
    "history_deleted",
    int: "subtasks_total subtasks_succeeded subtasks_failed subtasks_pending subtasks_canceled "
    "subtasks_retrying subtasks_expired subtasks_skipped_errors faults "
    "effective_bytes_per_second files directories files_skipped files_transferred "
    "bytes_transferred bytes_checksummed",
    int | None: "sync_level",
    bool | None: "is_ok",
    FatalError | None: "fatal_error",
    str | None: "label request_time completion_time deadline source_endpoint_id "
    "source_endpoint_display_name destination_endpoint_id destination_endpoint_display_name "
    "nice_status nice_status_short_description canceled_by_admin owner_id",
})  # fmt: skip
Task = _document("Task", "A transfer or delete task: a job of this service.", _TASK_FIELDS,
                 optional=True)  # fmt: skip
EndpointList = _page("EndpointList", Endpoint, "offset limit", has_next_page=bool)
FileList = _page(
    "FileList",
    File,
    "length total offset limit",
    **{name: str for name in ("path", "absolute_path", "endpoint")},
    **{name: bool for name in ("rename_supported", "symlink_supported")},
)
TaskList = _page("TaskList", Task, "length limit offset total")


class TaskEvent(msgspec.Struct):
    DATA_TYPE: Literal["event"]
    code: str
    description: str
    details: str
    is_error: bool
    time: str


TaskEventList = _document(
    "TaskEventList",
    "A page of a task's events, newest first.",
    [("DATA", list[TaskEvent]), *_fields({int: "length limit offset total"})],
    optional=False,
    data_type="event_list",
)


class SuccessfulTransfer(msgspec.Struct, forbid_unknown_fields=False):
    DATA_TYPE: Literal["successful_transfer"]
    source_path: str | None = None
    destination_path: str | None = None


class SuccessfulTransfers(msgspec.Struct):
    DATA_TYPE: Literal["successful_transfers"]
    marker: int
    next_marker: int | None
    DATA: list[SuccessfulTransfer]
