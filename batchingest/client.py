"""A small HTTP client of the service's API, as a source for the operator commands.

It answers what `LocalSource` (batchingest.sources) answers, through the documented
routes: `GET /jobs`, `GET /jobs/{id}`, `GET /jobs/{id}/files/LOG` with `Range`,
`POST /jobs/{id}/queue`, and (where the service has them) `GET /events` and
`POST /jobs/{id}/cancel`. Every failure becomes a CommandError with the service's own
message; the token is sent, never shown.
"""

from __future__ import annotations

import re
import ssl
from typing import Any

import httpx

from batchingest.sources import LOG_CHUNK, LOG_FILE, CommandError, LogPiece, no_job
from batchingest.store import STATES, STATUS_OF_STATE

TIMEOUT = 30.0
_CONTENT_RANGE = re.compile(r"bytes (?:\d+-\d+|\*)/(\d+)")


class HttpSource:
    """A running service at url, asked with one API token."""

    def __init__(self, url: str, token: str, timeout: float = TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        try:
            self.http = httpx.Client(
                base_url=self.url,
                headers={"X-Api-Token": token, "User-Agent": "batchingest-cli"},
                timeout=timeout,
                # plain http has no certificates to check: a broken SSL_CERT_FILE must
                # not stop a command talking to http://127.0.0.1
                verify=not self.url.startswith("http://"),
            )
        except (OSError, ssl.SSLError) as e:
            raise CommandError(f"cannot set up TLS for {self.url}: {e}") from None

    def describe(self) -> str:
        return f"service {self.url}"

    def close(self) -> None:
        self.http.close()

    # -- one request ---------------------------------------------------------------

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One request; CommandError if the service cannot be reached or refuses the token."""
        try:
            r = self.http.request(method, path, **kw)
        except httpx.ConnectError as e:
            raise CommandError(f"cannot reach the service at {self.url}: {_reason(e)}") from None
        except httpx.TimeoutException:
            raise CommandError(f"no answer from {self.url} within {self.timeout} s") from None
        except httpx.HTTPError as e:
            raise CommandError(f"request to {self.url} failed: {_reason(e)}") from None
        if r.status_code == 401:
            raise CommandError(
                f"the service at {self.url} refused the API token (401): "
                "check BATCHINGEST_TOKEN or --token-file"
            )
        return r

    def json(self, r: httpx.Response) -> Any:
        try:
            return r.json()
        except ValueError:
            kind = r.headers.get("content-type", "no content type")
            raise CommandError(
                f"{self.url} did not answer like a batchingest service "
                f"(HTTP {r.status_code}, {kind})"
            ) from None

    def code(self, r: httpx.Response) -> str | None:
        """The `code` of an error answer (JobNotFound, NotFound, ...), if it has one."""
        body = self.json(r)
        return str(body.get("code")) if isinstance(body, dict) else None

    def document(self, r: httpx.Response, shape: type, what: str) -> Any:
        """The JSON of a 200 answer, which must be a `shape` (list, dict); CommandError
        with the service's own words for any other status."""
        if r.status_code != 200:
            raise self.fail(r)
        body = self.json(r)
        if not isinstance(body, shape):
            raise CommandError(f"{self.url}{r.request.url.path} did not answer with {what}")
        return body

    def fail(self, r: httpx.Response) -> CommandError:
        """The service's error, said as it said it."""
        body = self.json(r)
        if isinstance(body, dict) and "message" in body:
            code = body.get("code", "error")
            return CommandError(f"{body['message']} ({code}, HTTP {r.status_code})")
        return CommandError(f"HTTP {r.status_code} from {self.url}")

    # -- jobs ----------------------------------------------------------------------

    def list_jobs(self, states: list[str]) -> list[dict[str, Any]]:
        params = {}
        if list(states) != list(STATES):
            params["status"] = ",".join(STATUS_OF_STATE[s] for s in states)
        r = self.request("GET", "/jobs", params=params)
        jobs: list[dict[str, Any]] = self.document(r, list, "a list of jobs")
        return jobs

    def job_info(self, name: str) -> dict[str, Any]:
        r = self.request("GET", f"/jobs/{name}")
        if r.status_code == 404:
            raise no_job(name)
        info: dict[str, Any] = self.document(r, dict, "a job")
        return info

    def read_log(self, name: str, offset: int) -> LogPiece | None:
        """Up to LOG_CHUNK bytes of LOG from offset, with a Range request."""
        headers = {"Range": f"bytes={offset}-{offset + LOG_CHUNK - 1}"}
        r = self.request("GET", f"/jobs/{name}/files/{LOG_FILE}", headers=headers)
        if r.status_code == 416:  # nothing past offset: the size is in Content-Range
            m = _CONTENT_RANGE.fullmatch(r.headers.get("content-range", ""))
            return LogPiece(b"", int(m.group(1)) if m else offset)
        if r.status_code == 404:
            if self.code(r) == "JobNotFound":
                raise no_job(name)
            return None  # FileNotFound: no LOG yet
        if r.status_code == 400:  # InvalidPath: a link leading out of the job
            raise CommandError(f"the LOG of {name!r} cannot be read: {self.fail(r)}")
        if r.status_code == 200:  # the whole file (Range ignored)
            return LogPiece(r.content[offset:], len(r.content))
        if r.status_code != 206:
            raise self.fail(r)
        m = _CONTENT_RANGE.fullmatch(r.headers.get("content-range", ""))
        return LogPiece(r.content, int(m.group(1)) if m else offset + len(r.content))

    def queue(self, name: str) -> tuple[str, bool]:
        r = self.request("POST", f"/jobs/{name}/queue")
        if r.status_code == 404:
            raise no_job(name)
        if r.status_code not in (200, 202):
            raise self.fail(r)
        return str(self.json(r).get("Status", "queue")), r.status_code == 202

    # -- routes a service may not have yet -------------------------------------------

    def missing_route(self, r: httpx.Response, what: str) -> CommandError | None:
        """A 404 for the route itself (not for a job): this service cannot do `what` yet."""
        if r.status_code not in (404, 405):
            return None
        if self.code(r) in ("NotFound", "MethodNotAllowed"):
            return CommandError(f"the service at {self.url} has no {what} (an older version)")
        return None

    def cancel(self, name: str) -> dict[str, Any]:
        r = self.request("POST", f"/jobs/{name}/cancel")
        missing = self.missing_route(r, "way to cancel a job")
        if missing is not None:
            raise missing
        if r.status_code == 404:
            raise no_job(name)
        if r.status_code not in (200, 202):
            raise self.fail(r)
        info = self.json(r)
        return info if isinstance(info, dict) else {"Name": name}

    def events(self, after: str | None, limit: int) -> tuple[list[dict[str, Any]], str | None]:
        params: dict[str, str | int] = {"limit": limit}
        if after is not None:
            params["after"] = after
        r = self.request("GET", "/events", params=params)
        missing = self.missing_route(r, "job history (GET /events)")
        if missing is not None:
            raise missing
        body = self.document(r, dict, "an event list")
        if not isinstance(body.get("DATA"), list):
            raise CommandError(f"{self.url}/events did not answer with an event list")
        cursor = body.get("next_cursor")
        return body["DATA"], None if cursor in (None, "") else str(cursor)

    def stuck(self) -> list[str] | None:
        """The service's own look (GET /stuck); None from a service without that route."""
        r = self.request("GET", "/stuck")
        if self.missing_route(r, "GET /stuck") is not None:
            return None
        body = self.document(r, dict, "a list of stuck jobs")
        names = body.get("stuck")
        if not isinstance(names, list):
            raise CommandError(f"{self.url}/stuck did not answer with a list of stuck jobs")
        return [str(n) for n in names]


def _reason(e: Exception) -> str:
    """The innermost reason of a transport error ("[Errno 111] Connection refused")."""
    text = str(e) or type(e).__name__
    return text.splitlines()[-1]
