"""One webhook URL: parsing, credentials, where it may go, signing, one POST attempt.

Anyone who can write a job's WEBHOOK file (every API client) chooses where the service
sends requests, so by default only public addresses are reached: loopback, private,
link-local and other special addresses are refused unless `--webhook-allow` names them.
The receiver's answer is read only to count its size, and only its status and size are
reported: an API client reading the LOG must not get a reply from an internal service.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import ipaddress
import re
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import batchingest

if TYPE_CHECKING:
    import httpx  # imported where used: a service with no webhooks need not load it

# An answer is read (to reuse the connection) up to this many bytes, then cut off.
ANSWER_READ_MAX = 64 * 1024
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class BadTarget(ValueError):
    """The URL cannot be used (bad syntax, unknown scheme, refused by the allow-list)."""


@dataclass(frozen=True)
class Target:
    url: httpx.URL  # what is requested: no credentials, query kept
    shown: str  # for logs: any password replaced by ***
    auth: str | None = field(default=None, repr=False)  # Authorization header value
    secrets: tuple[str, ...] = field(default=(), repr=False)  # never to be logged

    @property
    def host(self) -> str:
        return self.url.host

    @property
    def port(self) -> int:
        return self.url.port or (443 if self.url.scheme == "https" else 80)


def parse_target(raw: str) -> Target:
    """Parse a WEBHOOK line; a URL without a scheme is taken as http://."""
    import httpx

    text = raw if "://" in raw else "http://" + raw
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, ValueError) as e:
        userinfo = re.search(r"://([^/@]*)@", text)
        hidden = userinfo.group(1).split(":", 1)[1:] if userinfo else []
        raise BadTarget(f"not a valid URL: {redact(str(e), hidden)}") from None
    if url.scheme not in ("http", "https"):
        raise BadTarget(f"scheme {url.scheme!r} is not http or https")
    if not url.host:
        raise BadTarget("URL has no host")
    clean = url.copy_with(username=None, password=None, fragment=None)
    auth = None
    secrets: tuple[str, ...] = ()
    shown = str(clean)
    if url.userinfo:
        user, password = url.username, url.password
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        auth = f"Basic {token}"
        raw_user = url.userinfo.split(b":", 1)[0].decode("ascii", errors="replace")
        shown = (
            str(clean).replace("://", f"://{raw_user}:***@", 1)
            if password
            else (str(clean).replace("://", f"://{raw_user}@", 1))
        )
        raw_pass = url.userinfo.partition(b":")[2].decode("ascii", errors="replace")
        secrets = tuple(s for s in {password, raw_pass, token} if s)
    return Target(clean, shown, auth, secrets)


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


# -- where a request may go ----------------------------------------------------------

ALLOW_PUBLIC = "public"  # the --webhook-allow entry standing for every public address


def address_kind(addr: IPAddress) -> str | None:
    """What makes an address special ("loopback", "private", ...); None if public."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1 reaches 127.0.0.1
    for kind, special in (
        ("loopback", addr.is_loopback),
        ("unspecified", addr.is_unspecified),  # 0.0.0.0 connects to this machine
        ("link-local", addr.is_link_local),  # 169.254.169.254: cloud metadata
        ("multicast", addr.is_multicast),
        ("private", addr.is_private),
        ("reserved", addr.is_reserved),
    ):
        if special:
            return kind
    return None if addr.is_global else "non-public"  # 100.64.0.0/10 and the like


@dataclass(frozen=True)
class AllowList:
    names: frozenset[str]
    suffixes: tuple[str, ...]  # from "*.example.org": ".example.org"
    networks: tuple[IPNetwork, ...]
    public: bool  # every public address is allowed

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        """No entry: every public address. Else exactly what is listed (`public` too)."""
        names: set[str] = set()
        suffixes: list[str] = []
        networks: list[IPNetwork] = []
        public = False
        for entry in (e.strip() for e in entries):
            if not entry:
                continue
            if entry.lower() == ALLOW_PUBLIC:
                public = True
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            name = entry.lower().rstrip(".")
            if name.startswith("*."):
                suffixes.append(name[1:])
            else:
                names.add(name)
        if not (names or suffixes or networks):
            public = True
        return cls(frozenset(names), tuple(suffixes), tuple(networks), public)

    @property
    def listed(self) -> bool:
        """Whether --webhook-allow listed anything (else the public-only default)."""
        return bool(self.names or self.suffixes or self.networks)

    def names_host(self, host: str) -> bool:
        h = host.lower().rstrip(".")
        return h in self.names or any(h.endswith(s) for s in self.suffixes)

    def covers(self, addr: IPAddress) -> bool:
        return any(addr.version == n.version and addr in n for n in self.networks)

    def refusal(self, addr: IPAddress) -> str | None:
        """Why a request may not go to addr; None if it may."""
        if self.covers(addr):
            return None
        kind = address_kind(addr)
        if kind is None and self.public:
            return None
        if kind is not None and not self.listed:
            return f"a {kind} address, refused unless named in --webhook-allow"
        return "not in --webhook-allow"

    async def check(self, host: str, port: int) -> str | None:
        """Where a request to host may go: None for "as named", else the address to use.

        A host listed by name is trusted as such. Otherwise every address it resolves to
        must be allowed (public, or in a listed range), and the request then goes to the
        address checked, so a name that resolves differently a moment later (DNS
        rebinding) cannot slip by. Raises BadTarget when refused; OSError when the name
        does not resolve.
        """
        if self.names_host(host):
            return None
        try:
            addrs: list[IPAddress] = [ipaddress.ip_address(host)]
        except ValueError:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
            addrs = list(dict.fromkeys(ipaddress.ip_address(i[4][0]) for i in infos))
        if not addrs:
            raise BadTarget(f"host {host} resolves to no address")
        for addr in addrs:
            why = self.refusal(addr)
            if why is not None:
                where = f" resolves to {addr}" if str(addr) != host else ""
                raise BadTarget(f"host {host}{where} is {why}")
        return str(addrs[0])


# -- one attempt ---------------------------------------------------------------------


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """X-Batchingest-Signature: hex HMAC-SHA256 of "<timestamp>.<body>"."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def standard_key(secret: str) -> bytes:
    """The Standard Webhooks key of a secret: `whsec_<base64>` decoded, else its bytes.

    Receivers verify with the published libraries by passing the same secret: a
    `whsec_...` string as it is, any other secret as bytes (`Webhook(secret.encode())`).
    """
    if secret.startswith("whsec_"):
        with contextlib.suppress(binascii.Error, ValueError):
            key = base64.b64decode(secret[len("whsec_") :] + "==")
            if key:
                return key
    return secret.encode()


def sign_standard(secret: str, event_id: str, timestamp: str, body: bytes) -> str:
    """webhook-signature per the Standard Webhooks specification: v1,<base64 HMAC-SHA256
    of "<id>.<timestamp>.<body>">."""
    signed = f"{event_id}.{timestamp}.".encode() + body
    mac = hmac.new(standard_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


@dataclass
class Result:
    status: int | None = None  # None: no HTTP answer
    error: str = ""
    size: int = 0  # bytes of the answer read (at most ANSWER_READ_MAX + a chunk)
    retry_after: float | None = None

    @property
    def reason(self) -> str:
        """Why a delivery ended or is retried, in short: the status or the error."""
        return f"HTTP {self.status}" if self.status is not None else self.error

    def describe(self) -> str:
        """Status and size only: the answer itself is never shown."""
        if self.status is None:
            return self.error
        if self.size > ANSWER_READ_MAX:
            return f"HTTP {self.status}, over {ANSWER_READ_MAX} bytes"
        return f"HTTP {self.status}, {self.size} bytes"

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status == 429 or self.status >= 500


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: rare for webhooks, the backoff applies


def _headers(target: Target, body: bytes, event_id: str, secret: str | None) -> dict[str, str]:
    """The headers of one POST: its event id, the target's credentials, the signatures."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"batchingest/{batchingest.__version__}",
        "X-Batchingest-Event-Id": event_id,
    }
    if target.auth:
        headers["Authorization"] = target.auth
    if secret:
        ts = str(int(time.time()))
        headers["X-Batchingest-Timestamp"] = ts
        headers["X-Batchingest-Signature"] = sign(secret, ts, body)
        # the same, in the Standard Webhooks shape, for receivers using its libraries
        headers["webhook-id"] = event_id
        headers["webhook-timestamp"] = ts
        headers["webhook-signature"] = sign_standard(secret, event_id, ts, body)
    return headers


async def post(
    client: httpx.AsyncClient,
    target: Target,
    body: bytes,
    *,
    event_id: str,
    secret: str | None,
    timeout: float,
    address: str | None = None,
) -> Result:
    """POST body once; never raises for network trouble, reports it in the Result."""
    import httpx

    headers = _headers(target, body, event_id, secret)
    url = target.url
    extensions: dict[str, str] = {}
    if address is not None:
        # connect to the checked address; Host header and TLS name stay the URL's
        headers["Host"] = url.netloc.decode("ascii")
        if url.scheme == "https":
            extensions["sni_hostname"] = url.host
        url = url.copy_with(host=address)
    try:
        async with asyncio.timeout(timeout):
            async with client.stream(
                "POST", url, content=body, headers=headers, extensions=extensions
            ) as resp:
                size = 0
                async for part in resp.aiter_raw():
                    size += len(part)
                    if size > ANSWER_READ_MAX:
                        break
                return Result(
                    resp.status_code,
                    size=size,
                    retry_after=_retry_after(resp.headers.get("Retry-After")),
                )
    except TimeoutError:
        return Result(error=f"timed out after {timeout:g}s")
    except (httpx.HTTPError, OSError) as e:
        name = type(e).__name__
        detail = redact(str(e), target.secrets) or name
        return Result(error=f"{name}: {detail}" if detail != name else name)
