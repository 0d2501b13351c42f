"""Settings from the environment, validated once at start.

A bad setting stops the process with a message naming the variable, instead of failing
later in some unrelated place.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlparse


class ConfigError(SystemExit):
    """Raised (and exits the process) when a setting is missing or malformed."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("configuration error:\n  " + "\n  ".join(problems))


DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_JWT_SECRET = "crm-dev-secret-change-me-in-production-0123456789"  # dev only; k8s injects a Secret


@dataclass(frozen=True)
class Settings:
    service_name: str
    grpc_port: int
    database_url: str | None
    amqp_url: str
    jwt_secret: str
    jwt_algorithm: str
    jwt_issuer: str
    jwt_audience: str
    grpc_max_workers: int
    shutdown_grace_seconds: float
    log_level: str
    otel_endpoint: str | None
    run_dir: str
    relay_batch_size: int
    relay_poll_seconds: float
    consumer_prefetch: int
    consumer_delivery_limit: int
    consumer_batch: int = 200  # CONSUMER_BATCH: deliveries handled in one transaction (1: one each)
    consumer_batch_wait: float = 0.0  # CONSUMER_BATCH_WAIT_MS / 1000: how long a batch waits for more
    consumer_threads: int = 1  # CONSUMER_THREADS: competing consumers of the same queues in this process
    # CONSUMER_DOMAINS: the producers (event domains) whose queues this process consumes; empty: all
    consumer_domains: tuple[str, ...] = ()
    roles_file: str | None = None  # ROLES_FILE: the role -> permission policy (else the default)
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def embedded_db_name(self) -> str:
        return self.service_name.replace("-", "_")


def _int(env: Mapping[str, str], name: str, default: int, problems: list[str], lo: int, hi: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        problems.append(f"{name}={raw!r} is not an integer")
        return default
    if not lo <= value <= hi:
        problems.append(f"{name}={value} is out of range [{lo}, {hi}]")
    return value


def _float(env: Mapping[str, str], name: str, default: float, problems: list[str]) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        problems.append(f"{name}={raw!r} is not a number")
        return default
    if value < 0:
        problems.append(f"{name}={value} must not be negative")
    return value


def load_settings(
    service_name: str | None = None,
    default_port: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Read and check every setting; raise ConfigError naming each bad one."""
    env = os.environ if env is None else env
    problems: list[str] = []

    name = env.get("SERVICE_NAME") or service_name or ""
    if not name:
        problems.append("SERVICE_NAME is required")
    elif not all(c.isalnum() or c == "-" for c in name):
        problems.append(f"SERVICE_NAME={name!r} may hold only letters, digits and '-'")

    port = _int(env, "GRPC_PORT", default_port or 0, problems, 1, 65535)
    if not port and "GRPC_PORT" not in env:
        problems.append("GRPC_PORT is required")

    database_url = env.get("DATABASE_URL") or None
    if database_url:
        scheme = urlparse(database_url).scheme
        if not scheme.startswith("postgresql"):
            problems.append(f"DATABASE_URL must be a postgresql:// URL, got scheme {scheme!r}")

    amqp_url = env.get("AMQP_URL") or DEFAULT_AMQP_URL
    if urlparse(amqp_url).scheme not in ("amqp", "amqps"):
        problems.append("AMQP_URL must be an amqp:// or amqps:// URL")

    jwt_secret = env.get("JWT_SECRET") or DEFAULT_JWT_SECRET
    jwt_algorithm = env.get("JWT_ALGORITHM", "HS256")
    if jwt_algorithm not in ("HS256", "HS384", "HS512"):
        problems.append(f"JWT_ALGORITHM={jwt_algorithm!r} is not supported (HS256, HS384, HS512)")
    if len(jwt_secret) < 32:
        problems.append("JWT_SECRET must be at least 32 characters")

    log_level = env.get("LOG_LEVEL", "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        problems.append(f"LOG_LEVEL={log_level!r} is not one of DEBUG, INFO, WARNING, ERROR")

    otel_endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None
    if otel_endpoint and urlparse(otel_endpoint).scheme not in ("http", "https"):
        problems.append("OTEL_EXPORTER_OTLP_ENDPOINT must be an http:// or https:// URL")

    roles_file = env.get("ROLES_FILE") or None
    if roles_file and not os.path.isfile(roles_file):
        problems.append(f"ROLES_FILE={roles_file!r} is not a file")

    settings = Settings(
        service_name=name,
        grpc_port=port,
        database_url=database_url,
        amqp_url=amqp_url,
        jwt_secret=jwt_secret,
        jwt_algorithm=jwt_algorithm,
        jwt_issuer=env.get("JWT_ISSUER", "crm-dev"),
        jwt_audience=env.get("JWT_AUDIENCE", "crm"),
        grpc_max_workers=_int(env, "GRPC_MAX_WORKERS", 10, problems, 1, 256),
        shutdown_grace_seconds=_float(env, "SHUTDOWN_GRACE_SECONDS", 10.0, problems),
        log_level=log_level,
        otel_endpoint=otel_endpoint,
        run_dir=env.get("CRM_RUN_DIR", os.path.join(os.getcwd(), ".run")),
        relay_batch_size=_int(env, "OUTBOX_BATCH_SIZE", 500, problems, 1, 10000),
        relay_poll_seconds=_float(env, "OUTBOX_POLL_SECONDS", 0.5, problems),
        consumer_prefetch=_int(env, "CONSUMER_PREFETCH", 400, problems, 1, 10000),
        consumer_delivery_limit=_int(env, "CONSUMER_DELIVERY_LIMIT", 5, problems, 1, 1000),
        consumer_batch=_int(env, "CONSUMER_BATCH", 200, problems, 1, 10000),
        consumer_batch_wait=_int(env, "CONSUMER_BATCH_WAIT_MS", 0, problems, 0, 10000) / 1000,
        consumer_threads=_int(env, "CONSUMER_THREADS", 1, problems, 1, 16),
        consumer_domains=tuple(d.strip() for d in env.get("CONSUMER_DOMAINS", "").split(",") if d.strip()),
        roles_file=roles_file,
    )
    if problems:
        raise ConfigError(problems)
    return settings


def phone_region(env: Mapping[str, str] | None = None) -> str:
    """DEFAULT_PHONE_REGION: the ISO 3166-1 alpha-2 region of phone numbers written without a
    country code (IR unless set); ConfigError for anything else."""
    region = (os.environ if env is None else env).get("DEFAULT_PHONE_REGION", "IR").upper()
    if len(region) != 2 or not region.isalpha():
        raise ConfigError([f"DEFAULT_PHONE_REGION={region!r} must be an ISO 3166-1 alpha-2 code such as IR"])
    return region
