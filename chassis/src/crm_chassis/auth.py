"""JWT authentication and the role -> permission policy, shared by every service and the gateway.

Each RPC declares the permission it needs in its contract (crm_chassis.permissions); which
roles grant which permissions is configuration: roles.toml beside this module by default, or
the file ROLES_FILE names (a platform team's ConfigMap), loaded and checked at start.

Every service checks the caller itself (zero trust): the gateway forwards the caller's bearer
token as gRPC metadata and the service verifies it again. Production tokens come from an OIDC
provider; for local runs a shared secret signs development tokens (`python -m crm_gateway token`).
"""

from __future__ import annotations

import difflib
import os
import pathlib
import re
import threading
import time
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import jwt

from .config import ConfigError
from .errors import PermissionDenied, Unauthenticated

DEFAULT_ROLES_FILE = pathlib.Path(__file__).with_name("roles.toml")
_ROLE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class RolePolicy:
    """Which role grants which permissions ("*": every one), read from a roles file."""

    roles: Mapping[str, frozenset[str]]
    source: str = "<given>"
    _grants: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def grants(self, roles: tuple[str, ...]) -> frozenset[str]:
        """The union of what these roles grant (unknown roles grant nothing)."""
        hit = self._grants.get(roles)
        if hit is None:
            hit = frozenset().union(*(self.roles.get(r, frozenset()) for r in roles))
            if len(self._grants) < 1024:
                self._grants[roles] = hit
        return hit

    @property
    def known_roles(self) -> frozenset[str]:
        return frozenset(self.roles)


def load_roles(path: str | os.PathLike | None = None, known: Collection[str] | None = None) -> RolePolicy:
    """Read a roles file (TOML: a [roles] table of role = [permission, ...]); the default one
    if `path` is None. Every permission must be "*" or in `known` (the permissions the contracts
    declare) when given. Raises ConfigError naming ROLES_FILE and each problem."""
    where = pathlib.Path(path) if path else DEFAULT_ROLES_FILE
    label = f"ROLES_FILE={where}" if path else f"the default roles file {where}"
    try:
        data = tomllib.loads(where.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"{label}: cannot be read ({exc.strerror or exc})"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{label}: not valid TOML ({exc})"]) from None
    problems: list[str] = []
    table = data.get("roles")
    if not isinstance(table, dict) or not table:
        raise ConfigError([f"{label}: needs a [roles] table of role = [permission, ...]"])
    extra = sorted(set(data) - {"roles"})
    if extra:
        problems.append(f"{label}: unknown top-level keys {extra} (only [roles] is read)")
    roles: dict[str, frozenset[str]] = {}
    for role, perms in table.items():
        if not _ROLE_NAME.match(role):
            problems.append(f"{label}: role {role!r} must be lower_snake_case")
        if not isinstance(perms, list) or not all(isinstance(p, str) for p in perms):
            problems.append(f"{label}: role {role!r} must be a list of permission names")
            continue
        for perm in perms:
            if perm != "*" and known is not None and perm not in known:
                close = difflib.get_close_matches(perm, sorted(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                problems.append(
                    f"{label}: role {role!r} grants {perm!r}, which no contract declares{hint} "
                    f"(declared: {', '.join(sorted(known))})"
                )
        roles[role] = frozenset(perms)
    if problems:
        raise ConfigError(problems)
    return RolePolicy(roles, str(where))


_policy: RolePolicy | None = None
_policy_lock = threading.Lock()


def use_roles(policy: RolePolicy) -> None:
    """Make `policy` the process's (each service and the gateway at start, from ROLES_FILE)."""
    global _policy
    _policy = policy


def role_policy() -> RolePolicy:
    """The process's policy; the default roles file until a service or the gateway starts."""
    global _policy
    if _policy is None:
        with _policy_lock:
            if _policy is None:
                _policy = load_roles()
    return _policy


@dataclass(frozen=True)
class Principal:
    subject: str
    roles: tuple[str, ...]

    def permissions(self) -> frozenset[str]:
        return role_policy().grants(self.roles)

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
        known = role_policy().known_roles
        unknown = [r for r in roles if r not in known]
        if unknown:
            raise ValueError(f"unknown roles {unknown}; known roles: {sorted(known)}")
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


def configure_roles(settings) -> RolePolicy:
    """Load the roles file the settings name (ROLES_FILE, else the default), check it against
    the permissions the contracts declare, and make it the process's policy. Run at start by
    every service and the gateway: a bad file stops the process with ConfigError."""
    from .permissions import declared_permissions

    policy = load_roles(settings.roles_file, declared_permissions())
    use_roles(policy)
    return policy
