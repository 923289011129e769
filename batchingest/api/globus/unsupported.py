"""Globus features that are not served: each answers a clear 501, never a silent success.

The fallback route of batchingest.api.globus answers every path that matches one of
these (a path served for other methods answers 405 first: PUT and DELETE of an
endpoint are real routes answering 501, GlobusApi.not_served).

Tasks are served (tasks.py); the rest (managing endpoints,
sharing, ACLs, roles, bookmarks, servers, pause rules, tunnels...) has no meaning for
folders configured on the command line.
"""

from __future__ import annotations

CONFIGURED = "endpoints are configured on the service's command line (--endpoint NAME=DIR)"

# (path below /globus, why it is not served)
UNSUPPORTED: list[tuple[str, str]] = [
    ("/v0.10/task/{task_id}/pause_info", "pause rules are not supported"),
    ("/v0.10/task/{task_id}/skipped_errors", "skip_source_errors is not supported"),
    ("/v0.10/endpoint_manager/{rest:path}", "administrator routes are not served"),
    ("/v0.10/endpoint", CONFIGURED),
    ("/v0.10/endpoint/{endpoint}/deactivate", "endpoints here are always active"),
    ("/v0.10/endpoint/{endpoint}/server_list", "endpoints here have no GridFTP servers"),
    ("/v0.10/endpoint/{endpoint}/server/{rest:path}", "endpoints here have no GridFTP servers"),
    ("/v0.10/endpoint/{endpoint}/server", "endpoints here have no GridFTP servers"),
    ("/v0.10/endpoint/{endpoint}/access_list", "access rules (ACLs) are not supported"),
    ("/v0.10/endpoint/{endpoint}/access", "access rules (ACLs) are not supported"),
    ("/v0.10/endpoint/{endpoint}/access/{rest:path}", "access rules (ACLs) are not supported"),
    ("/v0.10/endpoint/{endpoint}/role_list", "endpoint roles are not supported"),
    ("/v0.10/endpoint/{endpoint}/role", "endpoint roles are not supported"),
    ("/v0.10/endpoint/{endpoint}/role/{rest:path}", "endpoint roles are not supported"),
    ("/v0.10/endpoint/{endpoint}/my_shared_endpoint_list", "shared endpoints are not supported"),
    ("/v0.10/endpoint/{endpoint}/shared_endpoint_list", "shared endpoints are not supported"),
    ("/v0.10/endpoint/{endpoint}/subscription", "subscriptions are not supported"),
    ("/v0.10/shared_endpoint", "shared endpoints are not supported"),
    ("/v0.10/bookmark_list", "bookmarks are not supported"),
    ("/v0.10/bookmark", "bookmarks are not supported"),
    ("/v0.10/bookmark/{rest:path}", "bookmarks are not supported"),
    ("/v0.10/operation/endpoint/{endpoint}/symlink", "symbolic links are never made or followed"),
    ("/v0.10/private/{rest:path}", "private routes are not served"),
    ("/v0.10/tunnels", "tunnels are not supported"),
    ("/v0.10/tunnels/{rest:path}", "tunnels are not supported"),
    ("/v0.10/stream_access_points/{rest:path}", "streams are not supported"),
    ("/v0.10/my_effective_pause_rule_list", "pause rules are not supported"),
]
