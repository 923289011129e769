"""API tokens: where they come from and how a request proves it has one.

Tokens come from `BATCHINGEST_TOKENS` / `--tokens` and `--token-file`. With none
configured the service makes one and keeps it in `ROOT/.api-token` (mode 0600), so a
fresh service is usable at once and never open. Tokens are compared in constant time
against every configured token, and are never logged.

A token file others can read may have given its tokens away, so the service refuses to
start with it (exit status 2, saying why): `ROOT/.api-token` must have no group or
other permissions at all, a `--token-file` none for others (a group, say root:ingest
0640, is allowed). `chmod` it, or delete `ROOT/.api-token` to get a fresh token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
from pathlib import Path

from batchingest import fs
from batchingest.config import Config
from batchingest.jobfile import write_atomic
from batchingest.service import StartError
from batchingest.store import Store

log = logging.getLogger("batchingest.api")

TOKEN_FILE_NAME = "api-token"  # store.service_path(...) -> ROOT/.api-token
REQUESTER = "batchingest.requester"  # scope key: the DTS user a request came from
# The user part of a DTS token: an ORCID (0000-0002-1825-0097) or a similar plain id.
_DTS_USER = re.compile(rb"[A-Za-z0-9.:-]{1,64}")


class TokenError(StartError):
    """The configured tokens cannot be used (unreadable or exposed token file, ...)."""


TOKEN_FILE_LIMIT = 1 << 20


def read_token_file(path: Path, forbidden: int = stat.S_IRWXO, hint: str = "") -> list[str]:
    """One token per line; blank lines and lines starting with '#' are skipped.

    A file with any of the `forbidden` permission bits, or that is not a regular file,
    is refused rather than read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise TokenError(f"token file {path} is not a regular file")
            if st.st_mode & forbidden:
                raise TokenError(
                    f"token file {path} is open to others (mode {stat.S_IMODE(st.st_mode):04o}),"
                    " so its tokens may be known: replace them and chmod"
                    f" {_private(st.st_mode, forbidden):o} it{hint}"
                )
            text = fs.read_fd(fd, TOKEN_FILE_LIMIT, str(path)).decode("utf-8")
        finally:
            os.close(fd)
    except (OSError, UnicodeDecodeError) as e:
        raise TokenError(f"cannot read token file {path}: {e}") from e
    tokens = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            tokens.append(line)
    return tokens


def _private(mode: int, forbidden: int) -> int:
    return stat.S_IMODE(mode) & ~forbidden


def _generated_token(store: Store) -> str:
    """Reuse ROOT/.api-token if it holds a token, else write a new one there (0600).

    An existing one that group or others may read is refused (TokenError): the token
    in it may be known, and reusing it silently would keep it working.
    """
    path = store.service_path(TOKEN_FILE_NAME)
    if not os.path.lexists(path):
        existing = []
    else:
        hint = " (or delete it: a new token is then made at start)"
        existing = read_token_file(path, stat.S_IRWXG | stat.S_IRWXO, hint)
    if existing:
        log.info("no API token configured: using the one in %s", path)
        return existing[0]
    token = secrets.token_urlsafe(32)
    write_atomic(path, (token + "\n").encode())  # private: 0600
    log.warning("no API token configured: generated one in %s (mode 0600)", path)
    return token


def load_tokens(cfg: Config, store: Store) -> list[bytes]:
    tokens = [t for t in cfg.tokens if t]
    if cfg.token_file is not None:
        tokens += read_token_file(cfg.token_file)
    if not tokens:
        tokens = [_generated_token(store)]
    return [t.encode() for t in tokens]


class TokenChecker:
    """Finds the token in a request's raw ASGI headers and checks it."""

    def __init__(self, tokens: list[bytes]) -> None:
        if not tokens:
            raise ValueError("at least one token is needed")
        self.tokens = tokens
        self.labels = [token_label(t) for t in tokens]

    def valid(self, candidate: bytes) -> bool:
        return self.which(candidate) is not None

    def which(self, candidate: bytes) -> int | None:
        """The index of the token candidate is, or None."""
        found = None
        # no early exit: the time taken must not tell which token came close
        for i, token in enumerate(self.tokens):
            if hmac.compare_digest(candidate, token):
                found = i
        return found

    def check(self, headers: list[tuple[bytes, bytes]]) -> bool:
        return self.label(headers) is not None

    def label(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """The label (token_label) of the valid token the headers carry, or None."""
        for key, value in headers:
            i = None
            if key == b"x-api-token":
                i = self.which(value.strip())
            elif key == b"authorization":
                scheme, _, rest = value.strip().partition(b" ")
                # "Token" is how DTS clients send theirs
                if scheme.lower() in (b"bearer", b"token"):
                    i = self.which(rest.strip())
            if i is not None:
                return self.labels[i]
        return None


def token_label(token: bytes) -> str:
    """How logs name a token: `sha256:` and the first 4 hex digits of its SHA-256.

    Stable while the token is in use, the same wherever it is configured, and 16 bits of
    a hash say nothing usable about the token. An operator finds it with
    `printf %s TOKEN | sha256sum | cut -c1-4`.
    """
    return "sha256:" + hashlib.sha256(token).hexdigest()[:4]


class DtsSecret:
    """The DTS's form of credential: `Authorization: Token <user>_<secret>`.

    The DTS sends its user's ORCID and a secret shared with this service, joined by
    an underscore. Any user id is accepted with the right secret; the id is kept as
    the requester of what the request creates. ORCIDs hold no underscore, so the first
    one separates the two.
    """

    def __init__(self, secret: str) -> None:
        if not secret:
            raise TokenError("the DTS secret is empty")
        self.secret = secret.encode()

    def user(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        for key, value in headers:
            if key != b"authorization":
                continue
            scheme, _, rest = value.strip().partition(b" ")
            if scheme.lower() != b"token":
                continue
            user, sep, secret = rest.strip().partition(b"_")
            # compare even when the user part is malformed: the time must not tell
            good = hmac.compare_digest(secret, self.secret)
            if sep and good and _DTS_USER.fullmatch(user):
                return user.decode()
        return None


def load_dts_secret(cfg: Config) -> DtsSecret | None:
    """The DTS secret from --dts-secret or the first line of --dts-secret-file."""
    secret = cfg.dts_secret
    if secret is None and cfg.dts_secret_file is not None:
        lines = read_token_file(cfg.dts_secret_file)
        if not lines:
            raise TokenError(f"no secret in {cfg.dts_secret_file}")
        secret = lines[0]
    return DtsSecret(secret) if secret else None
