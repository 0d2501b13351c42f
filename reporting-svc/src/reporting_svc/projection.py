"""The projection framework of reporting-svc.

A projection is a module (a part in PARTS) with a `PROJECTION = Projection(...)`: the producer
domain it reads, its handlers per routing key and what each requires of its event. Every
handler is wrapped (`wrap`) so that, in the consumer's one transaction per delivery (whose
inbox row makes a redelivery a no-op):

- the producer's lag row (projection_sources) records the newest event time applied;
- while a rebuild is in progress, the event is applied to the rebuild's shadow schema as well
  (the same handler, its tables translated to that schema), so the rebuilt tables miss nothing
  that arrived during the replay.

Building blocks for handlers:

- `apply_versioned(conn, table, key, values)`: upsert an entity's fact only if its version is
  newer than the stored one; returns (applied, old row). Out-of-order and replayed events leave
  the newest state. An advisory lock on the key serialises two replicas on one entity.
- `Rollup(table, keys, measures).apply(conn, old, new)`: add to the rollup the difference
  between a fact's new contributions and its old ones (each a list of (key dict, measures)).
  Rollups therefore stay equal to a sum over the facts, whatever the order of events.

Handlers use SQLAlchemy Core only (no hand-written table names): the rebuild runs them with
`schema_translate_map` pointing at its shadow schema.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from crm_chassis.dates import TEHRAN
from crm_chassis.messaging.consumer import Requires, Subscription
from crm_chassis.messaging.envelope import Event

from .tables import projection_rebuilds, projection_sources

Handler = Callable[[sa.Connection, Event], None]
Contribution = tuple[Mapping[str, object], Mapping[str, int | Decimal]]


def tehran_day(t: dt.datetime) -> dt.date:
    """The business day (Asia/Tehran) of an instant: the `day` of every rollup."""
    return t.astimezone(TEHRAN).date()


@dataclass
class Projection:
    name: str
    domain: str  # the producer: crm.<domain>.events
    handlers: dict[str, Handler]
    requires: dict[str, Requires] = field(default_factory=dict)
    tables: list[sa.Table] = field(default_factory=list)  # what it writes (documentation, checks)

    def subscription(self) -> Subscription:
        return Subscription(
            domain=self.domain,
            handlers={k: wrap(self.domain, h) for k, h in self.handlers.items()},
            requires=dict(self.requires),
        )


@contextlib.contextmanager
def in_schema(conn: sa.Connection, schema: str | None):
    """Run Core statements on `conn` against `schema` instead of the default one."""
    before = conn.get_execution_options().get("schema_translate_map")
    conn.execution_options(schema_translate_map={None: schema})
    try:
        yield conn
    finally:
        conn.execution_options(schema_translate_map=before or {None: None})


def shadow_schema(conn: sa.Connection) -> str | None:
    """The schema of the rebuild in progress, or None."""
    with in_schema(conn, None):
        return conn.execute(sa.select(projection_rebuilds.c.shadow_schema)).scalar()


def track(conn: sa.Connection, domain: str, event_time: dt.datetime) -> None:
    with in_schema(conn, None):
        stmt = pg_insert(projection_sources).values(
            domain=domain, last_event_time=event_time, last_applied_at=sa.func.now(), applied_events=1
        )
        t = projection_sources
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["domain"],
                set_={
                    "last_event_time": sa.func.greatest(t.c.last_event_time, stmt.excluded.last_event_time),
                    "last_applied_at": stmt.excluded.last_applied_at,
                    "applied_events": t.c.applied_events + 1,
                },
            )
        )


def wrap(domain: str, handler: Handler) -> Handler:
    def handle(conn: sa.Connection, event: Event) -> None:
        shadow = shadow_schema(conn)  # first: the rebuild's swap locks this table before the others
        handler(conn, event)
        if shadow:
            with in_schema(conn, shadow):
                handler(conn, event)
        track(conn, domain, event.time)

    handle.__wrapped__ = handler  # the bare handler, as the rebuild replays it
    return handle


def apply_versioned(
    conn: sa.Connection, table: sa.Table, key: Mapping[str, object], values: Mapping[str, object]
) -> tuple[bool, sa.Row | None]:
    """Store the fact `key` + `values` (which include `version`) unless a version at least as
    new is stored. Returns (applied, the row it replaced or None)."""
    lock_key = f"{table.name}:" + "|".join(str(key[k]) for k in sorted(key))
    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtextextended(lock_key, 0))))
    cond = sa.and_(*(table.c[k] == v for k, v in key.items()))
    old = conn.execute(sa.select(table).where(cond)).first()
    if old is not None and old.version >= values["version"]:
        return False, old
    row = {**key, **values}
    if old is None:
        conn.execute(table.insert().values(row))
    else:
        conn.execute(table.update().where(cond).values(values))
    return True, old


@dataclass(frozen=True)
class Rollup:
    table: sa.Table
    keys: tuple[str, ...]
    measures: tuple[str, ...]

    def apply(self, conn: sa.Connection, old: Iterable[Contribution], new: Iterable[Contribution]) -> None:
        """Add new - old to the rollup rows, one statement for every key touched."""
        delta: dict[tuple, dict[str, int]] = {}
        for sign, contribs in ((-1, old), (1, new)):
            for key, measures in contribs:
                k = tuple(key[c] for c in self.keys)
                acc = delta.setdefault(k, dict.fromkeys(self.measures, 0))
                for m, v in measures.items():
                    acc[m] += sign * v
        rows = [
            {**dict(zip(self.keys, k, strict=True)), **m} for k, m in delta.items() if any(v != 0 for v in m.values())
        ]
        if not rows:
            return
        stmt = pg_insert(self.table).values(rows)
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=list(self.keys),
                set_={m: self.table.c[m] + getattr(stmt.excluded, m) for m in self.measures},
            )
        )


def subscriptions(projections: Iterable[Projection]) -> list[Subscription]:
    return [p.subscription() for p in projections]
