"""Public routes: the few the world outside reaches without a user's bearer token (a web form,
a PBX's call events, a messenger's webhook, a survey link). Each is declared in routes.PUBLIC
with its limits; the gateway

- skips the bearer check (the service checks what authenticates the caller instead: a webhook's
  signature or secret header, a link's signed token, a form's site key);
- refuses a body over the route's `max_bytes` with 413 before reading it;
- limits requests per client address per minute (429 with Retry-After; per gateway process, so
  N gunicorn workers allow up to N times the figure);
- calls the service as the `public_channel` role with a short-lived token it mints itself, and
  forwards the client's address (x-forwarded-for) for the service's records.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

PUBLIC_ROLE = "public_channel"
PUBLIC_SUBJECT = "gateway:public"


@dataclass(frozen=True)
class Public:
    per_minute: int = 60  # requests per client address per minute, per gateway process
    max_bytes: int = 64 * 1024  # of the request body
    # The bytes field the raw request body fills (so the service can check a signature over the
    # exact bytes); None: the body is JSON transcoded as for any route.
    raw_body: str | None = None
    # request field <- HTTP header (e.g. "signature": "X-Crm-Signature")
    headers: dict[str, str] = field(default_factory=dict)
    # The request field the client's address fills, if the request has it.
    client_address: str | None = None
    # The bytes field of the response answered as it is (an open pixel), with the response's
    # `content_type` field as its Content-Type; None: the response is JSON.
    raw_response: str | None = None
    # The text field of the response that is a redirect's target: the gateway answers 302 with it
    # as the Location (a tracked click); None: no redirect.
    redirect: str | None = None
    # Cache-Control of a raw or redirect response ("" for none).
    cache_control: str = ""
    description: str = ""


class RateLimiter:
    """A fixed one-minute window per (route, client): cheap, and bounded in memory."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._counts: dict[tuple[str, str, int], int] = {}
        self._lock = threading.Lock()

    def allow(self, route: str, client: str, per_minute: int) -> tuple[bool, int]:
        """(allowed, seconds until the window resets)."""
        now = self.clock()
        window = int(now // 60)
        key = (route, client, window)
        with self._lock:
            if len(self._counts) > 10_000:
                self._counts = {k: v for k, v in self._counts.items() if k[2] == window}
            n = self._counts.get(key, 0) + 1
            self._counts[key] = n
        return n <= per_minute, max(1, int(60 - now % 60))


class PublicToken:
    """The gateway's own token for public calls, minted with the suite's signing secret and
    renewed before it expires."""

    def __init__(self, verifier, ttl_seconds: int = 900):
        self.verifier = verifier
        self.ttl = ttl_seconds
        self._token = ""
        self._until = 0.0
        self._lock = threading.Lock()

    def header(self) -> str:
        with self._lock:
            if time.time() > self._until:
                self._token = self.verifier.mint(PUBLIC_SUBJECT, [PUBLIC_ROLE], ttl_seconds=self.ttl)
                self._until = time.time() + self.ttl / 2
            return f"Bearer {self._token}"
