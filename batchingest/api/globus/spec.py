"""The Globus Transfer API's operations in /openapi.json, as a table (openapi.Op rows).

The documents are globus/models.py's; the parameters and their limits are the ones
operations.py, tasks.py and query.py check. `filter` (ls, task_list) is described in
the summaries, not given a pattern: its grammar (§4 of the Globus reference) is the one
of api/query.py, values and dates included. Routes not served (ACLs, bookmarks, ...)
are not operations: they answer 501 NotImplemented, 405 or 404 through the fallback.
"""

from __future__ import annotations

from typing import Any

from batchingest import endpoints
from batchingest.api import models as api_models
from batchingest.api import openapi
from batchingest.api.globus import models, operations, query, tasks
from batchingest.api.globus.documents import PREFIX
from batchingest.api.openapi import Op, links, param, with_links

_V = PREFIX + "/v0.10"
_EP = f"{_V}/endpoint/{{endpoint}}"
_OP = f"{_V}/operation/endpoint/{{endpoint}}"
_TASK = f"{_V}/task/{{task_id}}"

_ENDPOINT = param(
    "endpoint", "path", "an endpoint's id or name", {"type": "string", "minLength": 1}
)
_TASK_ID = param(
    "task_id", "path", "a task id", {"type": "string", "pattern": api_models.UUID_PATTERN}
)
_FIELDS = param("fields", "query", "comma-separated fields: only those (and DATA_TYPE) are shown")
_PATH_SCHEMA = {"type": "string", "pattern": models.PATH_PATTERN, "maxLength": endpoints.MAX_PATH}
_PATH = param("path", "query", "a path on the endpoint; its folder if none", _PATH_SCHEMA)


def _window(limit: tuple[int, int], offset: int) -> tuple[dict[str, Any], ...]:
    return (
        param("limit", "query", "at most this many", {"type": "integer", "minimum": limit[0],
                                                      "maximum": limit[1]}),
        param("offset", "query", "skip this many first", {"type": "integer", "minimum": 0,
                                                         "maximum": offset}),
    )  # fmt: skip


def _orderby(keys: tuple[str, ...], default: str) -> dict[str, Any]:
    """orderby=: comma-separated keys, each optionally followed by ASC or DESC."""
    key = f"({'|'.join(keys)})( ([Aa][Ss][Cc]|[Dd][Ee][Ss][Cc]))?"
    return param("orderby", "query", f"keys to sort on, first first, e.g. '{default}'",
                 {"type": "string", "pattern": f"^({key}(,{key})*)?$"})  # fmt: skip


_SCOPE = param(
    "filter_scope",
    "query",
    "endpoints here: all of them, or none",
    {"type": "string", "enum": [*operations.SCOPES_ALL, *operations.SCOPES_NONE]},
)
_LS_PARAMS = (
    _PATH,
    param(
        "show_hidden", "query", "names starting with '.' too (default true)", {"type": "boolean"}
    ),
    *_window((0, operations.LS_LIMIT), 1 << 62),
    _orderby(query.SORTABLE, "type DESC,name"),
    _FIELDS,
)
_TASK_LINKS = links(
    ("getTask", "getTaskEvents", "getSuccessfulTransfers", "cancelTask"), "task_id", "task_id"
)
_SUBMITTED = {
    "202": with_links(models.Result, "accepted: a task was made", _TASK_LINKS),
    "200": with_links(
        models.Result, "Duplicate: a task with this submission id exists", _TASK_LINKS
    ),
}
_WRITE = (
    "ClientError.BadRequest",
    "ClientError.RequestTooLarge",
    "EndpointNotFound",
    "PermissionDenied",
    "EndpointsNotConfigured",
)
_FILE_OP = (
    "ClientError.BadRequest",
    "ClientError.NotFound",
    "EndpointNotFound",
    "EndpointsNotConfigured",
)
_IN_TASK = ("TaskNotFound", "EndpointsNotConfigured")
_NOT_SERVED = ("NotImplemented",)


def _failed(name: str) -> tuple[str, ...]:
    """ExternalError.<name> and its reasons: 502, as Globus answers a failed operation."""
    return tuple(
        f"ExternalError.{name}{r}" for r in ("", ".Exists", ".NotDirectory", ".PermissionDenied")
    )


_EP_ERRORS = ("EndpointNotFound", "EndpointsNotConfigured")
_CHANGE = (*_FILE_OP, "ClientError.RequestTooLarge")
_WHY = "not served: endpoints are configured on the service's command line"
_ACTIVATE = "always AlreadyActivated"
_LS = (
    "a folder's entries, by name unless orderby= says; filter= clauses (name, type, "
    "permissions, user, group, size, last_modified) as in the Globus reference"
)
_TASKS = (
    "tasks, newest first unless orderby= says; filter= clauses (task_id, type, status, "
    "label, request_time, completion_time) as in the Globus reference"
)
_MARKER = param(
    "marker",
    "query",
    "where the page starts",
    {"type": "integer", "minimum": 0, "maximum": 1 << 40},
)
_SEARCH = (
    param("filter_fulltext", "query", "words to look for"),
    _SCOPE,
    *_window((1, operations.SEARCH_LIMIT), operations.SEARCH_MAX - 1),
    _FIELDS,
)

OPS = (
    Op("get", _EP, "getEndpoint", "globus", "an endpoint document, by id or name",
       {"200": models.Endpoint}, _EP_ERRORS, (_ENDPOINT, _FIELDS)),
    Op("put", _EP, "updateEndpoint", "globus", _WHY, {}, _NOT_SERVED, (_ENDPOINT,)),
    Op("delete", _EP, "deleteEndpoint", "globus", _WHY, {}, _NOT_SERVED, (_ENDPOINT,)),
    Op("get", f"{_V}/endpoint_search", "endpointSearch", "globus",
       "endpoints whose id, name or description hold every word of filter_fulltext",
       {"200": models.EndpointList}, ("ClientError.BadRequest", "EndpointsNotConfigured"), _SEARCH),
    Op("get", f"{_OP}/ls", "listFolder", "globus", _LS, {"200": models.FileList},
       (*_FILE_OP, *_failed("DirListingFailed")), (_ENDPOINT, *_LS_PARAMS)),
    Op("get", f"{_OP}/stat", "statPath", "globus", "one file, folder or link, never followed",
       {"200": models.File}, (*_FILE_OP, *_failed("StatFailed")), (_ENDPOINT, _PATH, _FIELDS)),
    Op("post", f"{_OP}/mkdir", "makeFolder", "globus", "create a folder: 202 DirectoryCreated",
       {"202": models.Result}, (*_CHANGE, *_failed("MkdirFailed")), (_ENDPOINT,), models.Mkdir),
    Op("post", f"{_OP}/rename", "renamePath", "globus", "rename, never replacing anything",
       {"200": models.Result}, (*_CHANGE, *_failed("RenameFailed")), (_ENDPOINT,), models.Rename),
    Op("get", f"{_V}/submission_id", "getSubmissionId", "globus", "a new submission id",
       {"200": models.SubmissionId}, ("EndpointsNotConfigured",)),
    *(Op("post", f"{_EP}/{verb.lower()}", f"{verb[:1].lower()}{verb[1:]}Endpoint", "globus",
         _ACTIVATE, {"200": models.Result}, _EP_ERRORS, (_ENDPOINT,))
      for verb in ("Autoactivate", "Activate")),
    Op("get", f"{_EP}/activation_requirements", "getActivationRequirements", "globus",
       "none: endpoints here are always active", {"200": models.ActivationRequirements},
       _EP_ERRORS, (_ENDPOINT,)),
    Op("post", f"{_V}/transfer", "submitTransfer", "globus", "submit a transfer task (a job)",
       _SUBMITTED, (*_WRITE, "NotImplemented"), (), models.TransferSubmission),
    Op("post", f"{_V}/delete", "submitDelete", "globus", "submit a delete task (a job)",
       _SUBMITTED, _WRITE, (), models.DeleteSubmission),
    Op("get", f"{_V}/task_list", "getTaskList", "globus", _TASKS, {"200": models.TaskList},
       ("ClientError.BadRequest", "EndpointsNotConfigured"),
       (*_window((0, tasks.LIST_LIMIT), 1 << 40),
        _orderby(tasks.TASK_ORDER, "request_time DESC"), _FIELDS)),
    Op("get", _TASK, "getTask", "globus", "one task document", {"200": models.Task}, _IN_TASK,
       (_TASK_ID, _FIELDS)),
    Op("get", f"{_TASK}/event_list", "getTaskEvents", "globus", "the task's events, newest first",
       {"200": models.TaskEventList}, ("ClientError.BadRequest", *_IN_TASK),
       (_TASK_ID, *_window((0, tasks.EVENT_LIMIT), 1 << 40))),
    Op("get", f"{_TASK}/successful_transfers", "getSuccessfulTransfers", "globus",
       "files copied, a page of 1000 from marker", {"200": models.SuccessfulTransfers},
       ("ClientError.BadRequest", *_IN_TASK), (_TASK_ID, _MARKER)),
    Op("post", f"{_TASK}/cancel", "cancelTask", "globus", "cancel a task", {"200": models.Result},
       _IN_TASK, (_TASK_ID,)),
)  # fmt: skip

OPENAPI_PATHS = openapi.paths(OPS)
