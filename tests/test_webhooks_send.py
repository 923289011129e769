"""send.py: URLs and credentials, which addresses a webhook may reach, one POST."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import urllib.parse

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from webhook_receiver import Receiver

from batchingest.webhooks.send import (
    ANSWER_READ_MAX,
    AllowList,
    BadTarget,
    address_kind,
    parse_target,
    post,
)


def check(allow: AllowList, host: str) -> str | None:
    return asyncio.run(allow.check(host, 80))


# -- URLs and credentials -----------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    user=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1),
    password=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=4),
)
def test_credentials_decoded_and_never_shown(user: str, password: str) -> None:
    q = urllib.parse.quote
    target = parse_target(f"https://{q(user, safe='')}:{q(password, safe='')}@h.example/p?a=1")
    assert target.url.userinfo == b""
    assert str(target.url) == "https://h.example/p?a=1"
    assert base64.b64decode(target.auth.split()[1]).decode() == f"{user}:{password}"
    # shown is exactly scheme, the user, ***, the rest: no room for the password
    prefix, _, rest = target.shown.rpartition("@")
    assert rest == "h.example/p?a=1"
    assert prefix.startswith("https://") and prefix.endswith(":***")
    assert urllib.parse.unquote(prefix[len("https://") : -len(":***")]) == user


def test_target_parsing() -> None:
    assert str(parse_target("example.org:81/x").url) == "http://example.org:81/x"
    assert parse_target("https://bob@h/x").shown == "https://bob@h/x"
    assert parse_target("https://bob@h/x").auth == "Basic " + base64.b64encode(b"bob:").decode()
    for bad in ("ftp://h/x", "http:///x"):
        with pytest.raises(BadTarget):
            parse_target(bad)


# -- where a request may go ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.1.2.3", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("100.64.0.1", "non-public"),
    ],
)
def test_special_addresses_refused_by_default(host: str, kind: str) -> None:
    assert address_kind(ipaddress.ip_address(host)) == kind
    with pytest.raises(BadTarget, match=f"is a {kind} address, refused unless named in"):
        check(AllowList.parse([]), host)


def test_public_addresses_allowed_by_default() -> None:
    allow = AllowList.parse([])
    for host in ("8.8.8.8", "2001:4860::1"):
        assert address_kind(ipaddress.ip_address(host)) is None
        assert check(allow, host) == host  # the request goes to the address checked


def test_a_name_resolving_to_loopback_is_refused_by_default() -> None:
    with pytest.raises(BadTarget, match=r"host localhost resolves to .* is a loopback address"):
        check(AllowList.parse([]), "localhost")
    # decimal and hex forms of 127.0.0.1 are resolved like names, and refused the same
    for host in ("2130706433", "0x7f.1"):
        with pytest.raises(BadTarget, match="loopback"):
            check(AllowList.parse([]), host)


def test_naming_an_address_opts_in_and_restricts() -> None:
    allow = AllowList.parse(["127.0.0.1"])
    assert check(allow, "127.0.0.1") == "127.0.0.1"
    # pinned to the checked address (localhost may resolve to ::1 as well)
    assert check(AllowList.parse(["127.0.0.1", "::1"]), "localhost") in ("127.0.0.1", "::1")
    with pytest.raises(BadTarget, match="is not in --webhook-allow"):
        check(allow, "127.0.0.2")
    with pytest.raises(BadTarget, match="is not in --webhook-allow"):
        check(allow, "8.8.8.8")  # a list is exactly what it lists...
    both = AllowList.parse(["public", "10.0.0.0/8"])
    assert check(both, "8.8.8.8") == "8.8.8.8"  # ...unless it says `public`
    assert check(both, "10.9.9.9") == "10.9.9.9"
    with pytest.raises(BadTarget, match="is not in --webhook-allow"):
        check(both, "192.168.0.1")


def test_allow_list_parsing() -> None:
    assert AllowList.parse([]).public and not AllowList.parse([]).listed
    allow = AllowList.parse(["10.0.0.0/8", "*.example.org", "a.test", "::1"])
    assert allow.listed and not allow.public
    assert allow.names_host("x.example.org") and allow.names_host("A.TEST.")
    assert not allow.names_host("example.org.evil") and not allow.names_host("b.test")
    assert check(allow, "10.1.2.3") == "10.1.2.3"
    assert check(allow, "::1") == "::1"
    assert check(allow, "x.example.org") is None  # named: trusted as such
    with pytest.raises(BadTarget):
        check(allow, "192.168.0.1")


# -- one POST -------------------------------------------------------------------------------


def test_only_status_and_size_of_the_answer_are_reported() -> None:
    secret_page = b"internal admin page: root password hunter2\n" * 10

    async def attempt(url: str) -> str:
        async with httpx.AsyncClient(trust_env=False) as client:
            result = await post(client, parse_target(url), b"{}", event_id="e",
                                secret=None, timeout=5)  # fmt: skip
        return result.describe()

    with Receiver([403], answer=secret_page) as rx:
        text = asyncio.run(attempt(rx.url))
    assert text == f"HTTP 403, {len(secret_page)} bytes"
    with Receiver(answer=b"x" * (ANSWER_READ_MAX * 4)) as rx:
        text = asyncio.run(attempt(rx.url))
    assert text == f"HTTP 200, over {ANSWER_READ_MAX} bytes"
