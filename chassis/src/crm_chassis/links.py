"""Signed links: a token that carries a few text fields (and an optional expiry) and an HMAC over
them, for links mailed to people who have no account (unsubscribe, double opt-in confirmation,
tracked clicks, open pixels). The token is the only credential the public route gets.

    links = Signer(secret, "unsubscribe")
    token = links.sign("email", "a@b.ir", "marketing")
    channel, address, purpose = links.open(token)       # Unauthenticated if forged or tampered

    confirm = Signer(secret, "opt-in")
    token = confirm.sign("42", expire_time=now + dt.timedelta(days=7))
    (entry_id,) = confirm.open(token)                    # LinkExpired past the expiry

The purpose is part of what is signed, so a token made for one purpose never opens as another.
The fields travel base64url-encoded (readable by whoever holds the link: put ids in it, not
secrets). Tokens are short enough for a URL path segment.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
from collections.abc import Iterable, Mapping

from .errors import FailedPrecondition, Unauthenticated

TOKEN_LIMIT = 2048
_SEP = "\x1f"  # between fields (unit separator: never in an id, an address or a purpose)


def b64(raw: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class LinkExpired(FailedPrecondition):
    """An authentic link past its expiry."""


class Signer:
    def __init__(self, secret: bytes | str, purpose: str, *, reason: str = "LINK_INVALID"):
        self._secret = secret.encode() if isinstance(secret, str) else secret
        self.purpose = purpose
        self.reason = reason

    def _mac(self, body: str) -> bytes:
        return hmac.new(self._secret, f"{self.purpose}{_SEP}{body}".encode(), hashlib.sha256).digest()[:20]

    def sign(self, *fields: str, expire_time: dt.datetime | None = None) -> str:
        """The token of these fields (none may contain the unit separator)."""
        if any(_SEP in f for f in fields):
            raise ValueError("a signed field may not contain \\x1f")
        expiry = str(int(expire_time.timestamp())) if expire_time is not None else ""
        body = _SEP.join((expiry, *fields))
        return b64(body.encode()) + "." + b64(self._mac(body))

    def open(self, token: str, now: dt.datetime | None = None) -> list[str]:
        """The fields of an authentic token; Unauthenticated if it is forged, tampered or not a
        token; LinkExpired (FAILED_PRECONDITION) if authentic but past its expiry."""
        try:
            head, dot, sig = (token or "").partition(".")
            if not head or not dot or not sig or len(token) > TOKEN_LIMIT:
                raise ValueError
            body = unb64(head).decode()
            ok = hmac.compare_digest(unb64(sig), self._mac(body))
        except (ValueError, TypeError, UnicodeDecodeError):
            ok = False
        if not ok:
            raise Unauthenticated("the link is not valid", reason=self.reason)
        expiry, *fields = body.split(_SEP)
        if expiry:
            if not expiry.isdigit():  # signed with our key but not by this code: not a link of ours
                raise Unauthenticated("the link is not valid", reason=self.reason)
            now = now or dt.datetime.now(dt.UTC)
            if int(expiry) < now.timestamp():
                raise LinkExpired("the link has expired", reason="LINK_EXPIRED")
        return fields


# -- the settings of signed links and keyed public routes -------------------------------------
def link_secret(given: str, jwt_secret: str, purpose: str) -> bytes:
    """A links' signing secret: the one given (a setting), else one derived from the suite's
    JWT secret for this purpose (so each kind of link has its own key without more settings)."""
    return given.encode() if given else hashlib.sha256(f"{purpose}:{jwt_secret}".encode()).digest()


def key_list(env: Mapping[str, str], name: str, default: str = "") -> tuple[str, ...]:
    """A comma-separated list of keys from a setting (`default` when unset or empty)."""
    return tuple(k.strip() for k in (env.get(name) or default).split(",") if k.strip())


def key_matches(given: str, keys: Iterable[str]) -> bool:
    """Whether `given` is one of `keys`, compared in constant time."""
    return bool(given) and any(hmac.compare_digest(given.encode(), k.encode()) for k in keys)
