"""GET /stuck: the jobs in processing/ that no live holder holds.

What `batchingest status --url` shows under "stuck", judged where the jobs root is (the
service's machine) by the rule its processor recovers jobs by (Store.stuck: the job's
`.lock` is free and its lease is absent or no longer holds it), with this service's
--host-id and --lease-timeout.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from batchingest import lease
from batchingest.api import openapi
from batchingest.api.common import json_response, run_blocking
from batchingest.api.openapi import Op
from batchingest.config import Config
from batchingest.store import Store


def routes(cfg: Config, store: Store) -> list[BaseRoute]:
    me = lease.Owner.here(cfg.host_id)  # the host name and boot id do not change

    async def stuck(request: Request) -> Response:
        names = await run_blocking(store.stuck, me, cfg.lease_timeout)
        return json_response({"stuck": names})

    return [Route("/stuck", stuck, methods=["GET"])]


_NAMES = {
    "type": "object",
    "required": ["stuck"],
    "properties": {"stuck": {"type": "array", "items": {"type": "string"}}},
}
OPS = (
    Op("get", "/stuck", "getStuckJobs", "operations",
       "jobs in processing/ with no live holder (a free .lock and no lease that still "
       "holds), as `batchingest status` shows them", {"200": _NAMES}),
)  # fmt: skip
OPENAPI_PATHS: dict[str, Any] = openapi.paths(OPS)
