"""The Globus Transfer API's JSON documents as typed models (msgspec, as api/models.py).

They are the schema of the /globus/ operations in /openapi.json, and the submissions
(transfer, delete, mkdir, rename) are decoded with them, so the spec's rules for a body
are the server's. Documents a `fields=` parameter may cut down (endpoint, file, task)
have every field but DATA_TYPE optional. Unknown fields of a submission are ignored,
as Globus does: the SDK sends many this service has no use for.
"""

from __future__ import annotations

from typing import Annotated, Literal

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


Deadline = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=256,
        description="a date and time, ISO 8601 (UTC if no zone is given)",
    ),
]
Label = Annotated[str, Meta(min_length=1, max_length=128)]
SyncLevel = Annotated[int, Meta(ge=0, le=3)] | Literal["exists", "size", "mtime", "checksum"]


class TransferSubmission(msgspec.Struct, omit_defaults=True):
    """POST /transfer: copy items from one endpoint to another, as a job."""

    submission_id: Text
    source_endpoint: Text
    destination_endpoint: Text
    DATA: Annotated[list[TransferItem], Meta(min_length=1, max_length=MAX_ITEMS)]
    DATA_TYPE: Literal["transfer"] = "transfer"
    label: Label | None = None
    deadline: Deadline | None = None
    sync_level: SyncLevel | None = None
    verify_checksum: bool | None = None
    preserve_timestamp: bool | None = None
    delete_destination_extra: bool | None = None
    encrypt_data: Annotated[bool | None, Meta(description="true: 501, not served")] = None


class DeleteSubmission(msgspec.Struct, omit_defaults=True):
    """POST /delete: remove paths on an endpoint, as a job."""

    submission_id: Text
    endpoint: Text
    DATA: Annotated[list[DeleteItem], Meta(min_length=1, max_length=MAX_ITEMS)]
    DATA_TYPE: Literal["delete"] = "delete"
    label: Label | None = None
    deadline: Deadline | None = None
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


OptText = str | Unset | None
OptBool = bool | Unset | None
OptInt = int | Unset | None


class Endpoint(msgspec.Struct, omit_defaults=True):
    """An endpoint: a folder on this machine, always active, never shared."""

    DATA_TYPE: Literal["endpoint"]
    DATA: list[None] | Unset = UNSET
    id: str | Unset = UNSET
    name: str | Unset = UNSET
    display_name: str | Unset = UNSET
    canonical_name: str | Unset = UNSET
    username: str | Unset = UNSET
    owner_string: str | Unset = UNSET
    description: str | Unset = UNSET
    entity_type: str | Unset = UNSET
    read_only: bool | Unset = UNSET
    default_directory: str | Unset = UNSET
    activated: bool | Unset = UNSET
    expires_in: int | Unset = UNSET
    expire_time: OptText = UNSET
    is_globus_connect: OptBool = UNSET
    is_go_storage: OptBool = UNSET
    gcp_connected: OptBool = UNSET
    gcp_paused: OptBool = UNSET
    globus_connect_setup_key: OptText = UNSET
    host_endpoint: OptText = UNSET
    host_endpoint_display_name: OptText = UNSET
    host_endpoint_id: OptText = UNSET
    host_path: OptText = UNSET
    sharing_target_endpoint: OptText = UNSET
    sharing_target_root_path: OptText = UNSET
    shareable: OptBool = UNSET
    public: OptBool = UNSET
    acl_available: OptBool = UNSET
    acl_editable: OptBool = UNSET
    force_encryption: OptBool = UNSET
    disable_verify: OptBool = UNSET
    in_use: OptBool = UNSET
    non_functional: OptBool = UNSET
    my_effective_roles: list[str] | Unset = UNSET
    network_use: OptText = UNSET
    max_concurrency: OptInt = UNSET
    max_parallelism: OptInt = UNSET
    preferred_concurrency: OptInt = UNSET
    preferred_parallelism: OptInt = UNSET
    location: OptText = UNSET
    organization: OptText = UNSET
    department: OptText = UNSET
    keywords: OptText = UNSET
    contact_email: OptText = UNSET
    contact_info: OptText = UNSET
    info_link: OptText = UNSET
    myproxy_dn: OptText = UNSET
    myproxy_server: OptText = UNSET
    oauth_server: OptText = UNSET
    s3_owner_activated: OptBool = UNSET
    s3_url: OptText = UNSET
    subscription_id: OptText = UNSET


class EndpointList(msgspec.Struct):
    DATA_TYPE: Literal["endpoint_list"]
    DATA: list[Endpoint]
    offset: int
    limit: int
    has_next_page: bool


class File(msgspec.Struct, omit_defaults=True):
    """A file, folder or link (never followed: a link is an invalid_symlink)."""

    DATA_TYPE: Literal["file"]
    name: str | Unset = UNSET
    type: Literal["file", "dir", "invalid_symlink"] | Unset = UNSET
    size: int | Unset = UNSET
    last_modified: OptText = UNSET
    permissions: str | Unset = UNSET
    user: str | Unset = UNSET
    group: str | Unset = UNSET
    link_target: OptText = UNSET
    link_size: OptInt = UNSET
    link_last_modified: OptText = UNSET
    link_user: OptText = UNSET
    link_group: OptText = UNSET


class FileList(msgspec.Struct):
    DATA_TYPE: Literal["file_list"]
    DATA: list[File]
    path: str
    absolute_path: str
    endpoint: str
    rename_supported: bool
    symlink_supported: bool
    length: int
    total: int
    offset: int
    limit: int


TaskStatus = Literal["ACTIVE", "INACTIVE", "SUCCEEDED", "FAILED"]


class FatalError(msgspec.Struct):
    code: str
    description: str


class Task(msgspec.Struct, omit_defaults=True):
    """A transfer or delete task: a job of this service."""

    DATA_TYPE: Literal["task"]
    task_id: str | Unset = UNSET
    type: Literal["TRANSFER", "DELETE"] | Unset = UNSET
    status: TaskStatus | Unset = UNSET
    label: OptText = UNSET
    request_time: OptText = UNSET
    completion_time: OptText = UNSET
    deadline: OptText = UNSET
    source_endpoint_id: OptText = UNSET
    source_endpoint_display_name: OptText = UNSET
    destination_endpoint_id: OptText = UNSET
    destination_endpoint_display_name: OptText = UNSET
    subtasks_total: int | Unset = UNSET
    subtasks_succeeded: int | Unset = UNSET
    subtasks_failed: int | Unset = UNSET
    subtasks_pending: int | Unset = UNSET
    subtasks_canceled: int | Unset = UNSET
    subtasks_retrying: int | Unset = UNSET
    subtasks_expired: int | Unset = UNSET
    subtasks_skipped_errors: int | Unset = UNSET
    sync_level: OptInt = UNSET
    verify_checksum: bool | Unset = UNSET
    preserve_timestamp: bool | Unset = UNSET
    delete_destination_extra: bool | Unset = UNSET
    encrypt_data: bool | Unset = UNSET
    recursive_symlinks: str | Unset = UNSET
    fatal_error: FatalError | Unset | None = UNSET
    nice_status: OptText = UNSET
    nice_status_short_description: OptText = UNSET
    is_paused: bool | Unset = UNSET
    is_ok: OptBool = UNSET
    canceled_by_admin: OptText = UNSET
    history_deleted: bool | Unset = UNSET
    faults: int | Unset = UNSET
    owner_id: OptText = UNSET
    username: str | Unset = UNSET
    effective_bytes_per_second: int | Unset = UNSET
    files: int | Unset = UNSET
    directories: int | Unset = UNSET
    files_skipped: int | Unset = UNSET
    files_transferred: int | Unset = UNSET
    bytes_transferred: int | Unset = UNSET
    bytes_checksummed: int | Unset = UNSET


class TaskList(msgspec.Struct):
    DATA_TYPE: Literal["task_list"]
    DATA: list[Task]
    length: int
    limit: int
    offset: int
    total: int


class TaskEvent(msgspec.Struct):
    DATA_TYPE: Literal["event"]
    code: str
    description: str
    details: str
    is_error: bool
    time: str


class TaskEventList(msgspec.Struct):
    DATA_TYPE: Literal["event_list"]
    DATA: list[TaskEvent]
    length: int
    limit: int
    offset: int
    total: int


class SuccessfulTransfer(msgspec.Struct, forbid_unknown_fields=False):
    DATA_TYPE: Literal["successful_transfer"]
    source_path: str | None = None
    destination_path: str | None = None


class SuccessfulTransfers(msgspec.Struct):
    DATA_TYPE: Literal["successful_transfers"]
    marker: int
    next_marker: int | None
    DATA: list[SuccessfulTransfer]
