"""Write keys: where a request may carry one, and a constant-time check against the accepted ones.

Segment's HTTP API takes the key as the Basic-auth user with an empty password, or as `writeKey`
in the body; Jitsu also takes it from the `X-Auth-Token` header and the `token` query parameter
(jitsucom/jitsu server/middleware/token_auth.go). Keys are never logged or echoed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from typing import Any

# Checked in this order; the first one present is the request's key.
KEY_HEADERS = ("X-Write-Key", "X-Auth-Token")
KEY_QUERY_PARAMETERS = ("writeKey", "token")
BODY_FIELD = "writeKey"


class WriteKeys:
    """The accepted keys, kept as SHA-256 digests so every comparison takes the same time
    whatever the key's length or how many leading characters a guess gets right."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(key) for key in keys if key]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def accepts(self, candidate: str | None) -> bool:
        if not candidate:
            return False
        digest = _digest(candidate)
        matched = False
        for accepted in self._digests:  # no early exit: the time does not tell which key matched
            matched |= hmac.compare_digest(digest, accepted)
        return matched


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def key_from_basic_auth(authorization: str | None) -> str | None:
    """`Basic base64(key:)` -> key. The key is the user; a client that put it in the password
    (`:key`) is forgiven, since the user would otherwise be empty."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "basic" or not credentials:
        return None
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, _, password = decoded.partition(":")
    return user or password or None


def key_from_request(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The key carried outside the body: Basic auth, then the key headers, then the query string.

    None only when the request carries no key outside the body: then the body must be read for
    its `writeKey`. A Basic credential that cannot be read (not base64, not UTF-8, empty) is a key
    that is wrong, `""`, not a missing one, so the request is refused before its body is read."""
    authorization = headers.get("Authorization")
    key = key_from_basic_auth(authorization)
    if key:
        return key
    for name in KEY_HEADERS:
        if headers.get(name):
            return headers[name].strip()
    for name in KEY_QUERY_PARAMETERS:
        if query.get(name):
            return query[name]
    if authorization and authorization.strip().partition(" ")[0].lower() == "basic":
        return ""
    return None


def key_from_body(document: dict[str, Any]) -> str | None:
    value = document.get(BODY_FIELD)
    return value if isinstance(value, str) and value else None
