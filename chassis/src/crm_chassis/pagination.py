"""Keyset pagination with opaque, tamper-proof page tokens (AIP-158).

A token carries the sort key of the last row returned plus a fingerprint of the query it
belongs to, signed with HMAC: a forged or edited token, or one reused with another filter,
is INVALID_ARGUMENT on `page_token`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

from .errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size(value: int, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE) -> int:
    if value < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    if value == 0:
        return default
    return min(value, maximum)


class PageTokens:
    def __init__(self, secret: str, purpose: str):
        self._key = hashlib.sha256(f"page-token:{purpose}:{secret}".encode()).digest()

    def _sig(self, payload: bytes) -> str:
        return base64.urlsafe_b64encode(hmac.new(self._key, payload, hashlib.sha256).digest()[:16]).decode().rstrip("=")

    @staticmethod
    def fingerprint(**query) -> str:
        return hashlib.sha256(json.dumps(query, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def encode(self, last_key: list, query_fingerprint: str = "") -> str:
        payload = json.dumps({"k": last_key, "q": query_fingerprint}, separators=(",", ":")).encode()
        body = base64.urlsafe_b64encode(payload).decode().rstrip("=")
        return f"{body}.{self._sig(payload)}"

    def decode(self, token: str, query_fingerprint: str = "") -> list | None:
        if not token:
            return None
        bad = InvalidArgument.field("page_token", "is not a valid page token for this query")
        body, _, sig = token.partition(".")
        try:
            payload = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (ValueError, TypeError):
            raise bad from None
        if not sig or not hmac.compare_digest(sig, self._sig(payload)):
            raise bad
        data = json.loads(payload)
        if data.get("q", "") != query_fingerprint or not isinstance(data.get("k"), list):
            raise bad
        return data["k"]
