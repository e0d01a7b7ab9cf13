"""The one token resolver: where an engine's bearer tokens come from, for servers and clients.

Two roles (docs/security.md): the **data** token (lookup, get, put, config and stats reads: what
inference pods hold) and the **admin** token (everything under ``/admin``: what the operator and
the backup Job hold; it may do everything the data token may).

Order, per role: an explicit token, else a token file (``--token-file`` /
``--admin-token-file``, else ``$KVCACHE_TOKEN_FILE`` / ``$KVCACHE_ADMIN_TOKEN_FILE``), else
``$KVCACHE_TOKEN`` / ``$KVCACHE_ADMIN_TOKEN``, else none. A token file is re-read at most once
a second (Secret rotation) by ``TokenSource``.
"""

from __future__ import annotations

import hmac
import math
import os
import threading
import time
from collections.abc import Callable, Mapping

__all__ = [
    "ADMIN",
    "DATA",
    "ROLES",
    "TokenError",
    "TokenSource",
    "read_token_file",
    "resolve_token",
    "role_of",
]

DATA = "data"
ADMIN = "admin"
ROLES = (DATA, ADMIN)

TOKEN_FILE_ENV = "KVCACHE_TOKEN_FILE"
TOKEN_ENV = "KVCACHE_TOKEN"
ADMIN_TOKEN_FILE_ENV = "KVCACHE_ADMIN_TOKEN_FILE"
ADMIN_TOKEN_ENV = "KVCACHE_ADMIN_TOKEN"
_ENV = {DATA: (TOKEN_FILE_ENV, TOKEN_ENV), ADMIN: (ADMIN_TOKEN_FILE_ENV, ADMIN_TOKEN_ENV)}


class TokenError(ValueError):
    """A token file that cannot be read or is empty; the message names the file."""


def read_token_file(path: str) -> str:
    """The stripped contents of a token file (TokenError naming it when unreadable or empty)."""
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read().strip()
    except OSError as exc:
        raise TokenError(f"token file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise TokenError(f"token file {path}: not UTF-8 text") from None
    if not token:
        raise TokenError(f"token file {path}: the file is empty")
    return token


def resolve_token(
    token_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    token: str | None = None,
    role: str = DATA,
) -> tuple[str | None, str | None]:
    """(token, token_file) of ``role``: the token to use now and the file to re-read it from
    (None: fixed)."""
    if role not in _ENV:
        raise ValueError(f"role: {role!r} is not one of {', '.join(ROLES)}")
    if token is not None:
        return token or None, None
    env = os.environ if environ is None else environ
    file_env, token_env = _ENV[role]
    path = token_file or env.get(file_env)
    if path:
        return read_token_file(path), path
    return env.get(token_env) or None, None


def role_of(authorization: str, tokens: Mapping[str, str | None]) -> str | None:
    """The role whose token an ``Authorization`` header carries (``Bearer <token>``), else None.

    Compared in constant time over bytes; a header that is not encodable text (a non-UTF-8
    header decoded with surrogates) carries no role. ``tokens`` maps role -> expected token;
    the admin role is tried first so one token configured for both roles is admin."""
    try:
        got = authorization.encode("utf-8")
    except UnicodeEncodeError:
        return None
    found = None
    for role in (ADMIN, DATA):
        expected = tokens.get(role)
        # every configured role is compared (no early exit: the time does not tell which matched)
        if expected is not None and hmac.compare_digest(got, f"Bearer {expected}".encode()) and found is None:
            found = role
    return found


class TokenSource:
    """A token that follows its file: re-read at most every ``recheck_s`` seconds; a file that
    becomes unreadable keeps the last good token (a Secret update is not atomic)."""

    def __init__(
        self,
        token: str | None,
        token_file: str | None,
        *,
        recheck_s: float = 1.0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self._token = token
        self._file = token_file
        self._recheck_s = recheck_s
        # a file not read yet (no token in hand) is read on the first get()
        self._checked = time.monotonic() if token is not None else -math.inf
        self._on_error = on_error
        self._lock = threading.Lock()

    @classmethod
    def resolve(
        cls,
        token_file: str | None = None,
        environ: Mapping[str, str] | None = None,
        *,
        token: str | None = None,
        role: str = DATA,
    ) -> TokenSource:
        return cls(*resolve_token(token_file, environ, token=token, role=role))

    @property
    def file(self) -> str | None:
        return self._file

    def get(self) -> str | None:
        if self._file is None:
            return self._token
        now = time.monotonic()
        with self._lock:
            if now - self._checked >= self._recheck_s:
                self._checked = now
                # keep the last good token while the file is being replaced
                try:
                    self._token = read_token_file(self._file)
                except TokenError as exc:
                    if self._on_error is not None:
                        self._on_error(str(exc))
            return self._token
