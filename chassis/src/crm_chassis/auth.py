"""JWT authentication and role -> permission policy, shared by every service and the gateway.

Every service checks the caller itself (zero trust): the gateway forwards the caller's bearer
token as gRPC metadata and the service verifies it again. Production tokens come from an OIDC
provider; for local runs a shared secret signs development tokens (`python -m crm_gateway token`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

from .errors import PermissionDenied, Unauthenticated

# The permission policy: which role may do what. One copy for the whole suite.
# Sales and support managers hold the same rights over customers and reports.
_MANAGER = frozenset(
    {
        "customers.read",
        "customers.write",
        "customers.delete",
        "customers.pii",
        "customers.catalog",
        "customers.export",
        "customers.import",
        "customers.merge",
        "notes.write",
        "reports.read",
    }
)
ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    "admin": frozenset({"*"}),
    # customers.pii: sees national id, birth-certificate number and birth date unmasked.
    "sales_manager": _MANAGER,
    "sales_rep": frozenset({"customers.read", "customers.write", "notes.write"}),
    "support_manager": _MANAGER,
    "support_agent": frozenset({"customers.read", "customers.write", "notes.write"}),
    "marketer": frozenset(
        {"customers.read", "customers.catalog", "customers.export", "customers.import", "reports.read"}
    ),
    "analyst": frozenset({"customers.read", "customers.export", "reports.read"}),
    # admin ("*") alone has customers.erase, customers.admin (sources, custom fields) and audit.read.
}
KNOWN_ROLES = frozenset(ROLE_PERMISSIONS)


@dataclass(frozen=True)
class Principal:
    subject: str
    roles: tuple[str, ...]

    def permissions(self) -> frozenset[str]:
        perms: set[str] = set()
        for role in self.roles:
            perms |= ROLE_PERMISSIONS.get(role, frozenset())
        return frozenset(perms)

    def has(self, permission: str) -> bool:
        perms = self.permissions()
        return "*" in perms or permission in perms

    def require(self, permission: str) -> None:
        if not self.has(permission):
            raise PermissionDenied(
                f"permission {permission!r} is not granted to roles {list(self.roles)}",
                reason="PERMISSION_DENIED",
                metadata={"permission": permission},
            )


class TokenVerifier:
    def __init__(self, secret: str, algorithm: str = "HS256", issuer: str = "crm-dev", audience: str = "crm"):
        self.secret = secret
        self.algorithm = algorithm
        self.issuer = issuer
        self.audience = audience
        self._cache: dict[str, tuple[Principal, float]] = {}

    def mint(self, subject: str, roles: list[str], ttl_seconds: int = 8 * 3600) -> str:
        unknown = [r for r in roles if r not in KNOWN_ROLES]
        if unknown:
            raise ValueError(f"unknown roles {unknown}; known roles: {sorted(KNOWN_ROLES)}")
        now = int(time.time())
        claims = {
            "sub": subject,
            "roles": roles,
            "iss": self.issuer,
            "aud": self.audience,
            "iat": now,
            "exp": now + ttl_seconds,
        }
        return jwt.encode(claims, self.secret, algorithm=self.algorithm)

    def verify(self, token: str) -> Principal:
        """Check signature, expiry, issuer and audience. A token already verified is served
        from a small cache until it expires (verification is ~6% of a primary-key read)."""
        hit = self._cache.get(token)
        if hit is not None and hit[1] > time.time():
            return hit[0]
        principal, exp = self._verify(token)
        if len(self._cache) >= 4096:
            self._cache.clear()
        self._cache[token] = (principal, exp)
        return principal

    def _verify(self, token: str) -> tuple[Principal, float]:
        try:
            claims = jwt.decode(
                token,
                self.secret,
                algorithms=[self.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token has expired", reason="TOKEN_EXPIRED") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"invalid token: {exc}", reason="TOKEN_INVALID") from None
        roles = claims.get("roles") or []
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise Unauthenticated("invalid token: roles must be a list of strings", reason="TOKEN_INVALID")
        return Principal(subject=str(claims["sub"]), roles=tuple(roles)), float(claims["exp"])

    def verify_header(self, value: str | None) -> Principal:
        if not value:
            raise Unauthenticated("missing bearer token", reason="TOKEN_MISSING")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("authorization must be 'Bearer <token>'", reason="TOKEN_INVALID")
        return self.verify(token.strip())

    @classmethod
    def from_settings(cls, settings) -> TokenVerifier:
        return cls(settings.jwt_secret, settings.jwt_algorithm, settings.jwt_issuer, settings.jwt_audience)
