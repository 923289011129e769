"""The JSON documents of the Globus Transfer API: endpoints, files, results, lists."""

from __future__ import annotations

import functools
import grp
import pwd
import stat
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request

from batchingest.endpoints import Endpoint, Item

PREFIX = "/globus"
VERSION_PREFIX = "/globus/v0.10"


def resource(request: Request) -> str:
    """The request's path relative to the API root, as Globus documents name it."""
    path: str = request.scope.get("path", "")
    return path[len(VERSION_PREFIX) :] if path.startswith(VERSION_PREFIX + "/") else path


def result(
    request: Request, data_type: str, code: str, message: str, **more: Any
) -> dict[str, Any]:
    """A result document (mkdir_result, result, activation_result...)."""
    from batchingest.api.app import REQUEST_ID

    return {
        "DATA_TYPE": data_type,
        "code": code,
        "message": message,
        "request_id": request.scope.get(REQUEST_ID, ""),
        "resource": resource(request),
        **more,
    }


def endpoint_doc(ep: Endpoint) -> dict[str, Any]:
    """An endpoint document: a folder on this machine, always active, never shared."""
    what = "read-only folder" if ep.read_only else "folder"
    return {
        "DATA_TYPE": "endpoint",
        "DATA": [],
        "id": ep.id,
        "name": ep.name,
        "display_name": ep.name,
        "canonical_name": f"batchingest#{ep.name}",
        "username": "batchingest",
        "owner_string": "batchingest",
        "description": f"batchingest endpoint {ep.name!r}: a {what} on this machine",
        "entity_type": "GCSv5_mapped_collection",
        "read_only": ep.read_only,
        "default_directory": "/~/",
        "activated": True,
        "expires_in": -1,
        "expire_time": None,
        "is_globus_connect": False,
        "is_go_storage": False,
        "gcp_connected": None,
        "gcp_paused": None,
        "globus_connect_setup_key": None,
        "host_endpoint": None,
        "host_endpoint_display_name": None,
        "host_endpoint_id": None,
        "host_path": None,
        "sharing_target_endpoint": None,
        "sharing_target_root_path": None,
        "shareable": False,
        "public": False,
        "acl_available": False,
        "acl_editable": False,
        "force_encryption": False,
        "disable_verify": False,
        "in_use": False,
        "non_functional": False,
        "my_effective_roles": [],
        "network_use": "normal",
        "max_concurrency": 4,
        "max_parallelism": 8,
        "preferred_concurrency": 2,
        "preferred_parallelism": 4,
        "location": None,
        "organization": None,
        "department": None,
        "keywords": None,
        "contact_email": None,
        "contact_info": None,
        "info_link": None,
        "myproxy_dn": None,
        "myproxy_server": None,
        "oauth_server": None,
        "s3_owner_activated": False,
        "s3_url": None,
        "subscription_id": None,
    }


# Globus's word for an inode. A symbolic link is never followed, so it can never be used
# as what it points at: Globus calls such a link `invalid_symlink`.
_FILE_TYPES = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "invalid_symlink"}


def file_type(mode: int) -> str | None:
    """Globus's word for an inode; None for what is never served (FIFO, device, socket)."""
    return _FILE_TYPES.get(stat.S_IFMT(mode))


def timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(int(seconds), UTC).strftime("%Y-%m-%d %H:%M:%S+00:00")


def user_name(uid: int) -> str:
    return _account_name(pwd.getpwuid, uid)


def group_name(gid: int) -> str:
    return _account_name(grp.getgrgid, gid)


@functools.lru_cache(maxsize=512)
def _account_name(lookup: Callable[[int], Sequence[Any]], number: int) -> str:
    """The name of a user or group (the first field of its passwd or group entry); the
    number itself where the system knows no such account (files from another host)."""
    try:
        return str(lookup(number)[0])
    except KeyError:
        return str(number)


def file_doc(item: Item, times: bool = True) -> dict[str, Any]:
    """A file document, from lstat: a link describes itself, in the fields and link_*.

    times=False leaves the two time strings None, for add_times once the document is
    known to be shown (formatting them is a third of the cost of a large listing).
    """
    st = item.st
    link = item.link_target is not None or stat.S_ISLNK(st.st_mode)
    doc: dict[str, Any] = {
        "DATA_TYPE": "file",
        "name": item.name,
        "type": file_type(st.st_mode),
        "size": st.st_size,
        "last_modified": timestamp(st.st_mtime) if times else None,
        "permissions": f"{stat.S_IMODE(st.st_mode):04o}",
        "user": user_name(st.st_uid),
        "group": group_name(st.st_gid),
        "link_target": item.link_target if link else None,
        "link_size": st.st_size if link else None,
        "link_last_modified": timestamp(st.st_mtime) if link and times else None,
        "link_user": user_name(st.st_uid) if link else None,
        "link_group": group_name(st.st_gid) if link else None,
    }
    return doc


def add_times(doc: dict[str, Any], mtime: float) -> dict[str, Any]:
    doc["last_modified"] = timestamp(mtime)
    if doc["type"] == "invalid_symlink":
        doc["link_last_modified"] = doc["last_modified"]
    return doc


def select_fields(doc: dict[str, Any], fields: list[str] | None) -> dict[str, Any]:
    """The `fields=` query parameter: only those fields (and DATA_TYPE) of a document."""
    if fields is None:
        return doc
    return {k: v for k, v in doc.items() if k == "DATA_TYPE" or k in fields}
