"""RebuildProjections: replay the event log (the crm.events.log stream) into fresh tables while
the live ones keep serving, then swap them in.

The job (crm_chassis.jobs, kind "reporting.rebuild"):

1. makes schema rebuild_<job> with an empty copy of every projected table (CREATE TABLE ...
   LIKE ... INCLUDING ALL) and records it in projection_rebuilds: from that commit on, the live
   consumer applies every event to the shadow tables too (projection.wrap);
2. reads the stream's end (the last offset, from a consumer attached at "last"): the replay stops there, as
   every later event reaches the shadow tables through the live consumer;
3. consumes the stream from its first offset (x-stream-offset, prefetch-limited), applying each
   event's bare handler with the tables translated to the shadow schema, 500 events per
   transaction, each committed with its checkpoint (the next offset). An event no handler can
   read (a poison event) is skipped and counted;
4. swaps in one transaction: locks projection_rebuilds (so no consumer transaction is between
   its read of the shadow schema and its writes), moves the live tables to a retired schema and
   the rebuilt ones to public, drops the retired schema.

A restart mid-rebuild resumes: the job is taken over (chassis jobs) and continues from its last
checkpoint's offset into the same shadow schema (handlers are version-guarded, so an event
seen twice changes nothing). A rebuild started while another is queued or running returns that
one. A failed or cancelled rebuild leaves its shadow schema until the next rebuild, which drops
it first.
"""

from __future__ import annotations

import logging

import pika
import sqlalchemy as sa

from crm_chassis import jobs
from crm_chassis.messaging.envelope import MalformedEvent, from_amqp
from crm_chassis.messaging.publisher import url_parameters
from crm_chassis.messaging.topology import EVENT_LOG_STREAM

from .projection import apply_events, in_schema
from .tables import PROJECTED, projection_rebuilds

log = logging.getLogger("reporting.rebuild")

KIND = "reporting.rebuild"
BATCH = 500


def dispatch_table(projections) -> dict:
    """(domain, routing key) -> [(bare handler, Requires or None)], one per projection reading it."""
    table: dict = {}
    for p in projections:
        for key, h in p.handlers.items():
            table.setdefault((p.domain, key), []).append((h, p.requires.get(key)))
    return table


def stream_length(amqp_url: str, settle: float = 0.3) -> int:
    """The offset after the stream's last message (0 for an empty stream). A consumer attached
    at "last" receives the whole last chunk; the highest offset in it is the last one. (A
    declare's message count is not used: the broker updates it only with its statistics.)"""
    conn = pika.BlockingConnection(url_parameters(amqp_url))
    try:
        ch = conn.channel()
        ch.queue_declare(EVENT_LOG_STREAM, durable=True, arguments={"x-queue-type": "stream"})
        ch.basic_qos(prefetch_count=1000)
        last = -1
        for method, props, _ in ch.consume(
            EVENT_LOG_STREAM, arguments={"x-stream-offset": "last"}, inactivity_timeout=settle
        ):
            if method is None:
                break
            last = max(last, int((props.headers or {}).get("x-stream-offset", -1)))
            ch.basic_ack(method.delivery_tag)
        ch.cancel()
        return last + 1
    finally:
        conn.close()


def _prepare(conn: sa.Connection, job_id: str) -> str:
    leftover = conn.execute(sa.select(projection_rebuilds.c.shadow_schema)).scalar()
    schema = f"rebuild_{job_id.replace('-', '')[:12]}"
    for s in {leftover, schema} - {None}:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{s}" CASCADE'))
    conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    for t in PROJECTED:
        conn.execute(sa.text(f'CREATE TABLE "{schema}"."{t.name}" (LIKE public."{t.name}" INCLUDING ALL)'))
    conn.execute(projection_rebuilds.delete())
    conn.execute(projection_rebuilds.insert().values(id=1, job_id=job_id, shadow_schema=schema))
    return schema


def swap(conn: sa.Connection, schema: str) -> None:
    retired = f"retired_{schema.removeprefix('rebuild_')}"
    conn.execute(sa.text("LOCK TABLE projection_rebuilds IN ACCESS EXCLUSIVE MODE"))
    conn.execute(sa.text(f'CREATE SCHEMA "{retired}"'))
    for t in PROJECTED:
        conn.execute(sa.text(f'ALTER TABLE public."{t.name}" SET SCHEMA "{retired}"'))
        conn.execute(sa.text(f'ALTER TABLE "{schema}"."{t.name}" SET SCHEMA public'))
    _keep_index_names(conn, retired)
    conn.execute(projection_rebuilds.delete())
    conn.execute(sa.text(f'DROP SCHEMA "{retired}" CASCADE'))
    conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))


def _readable(batch: list, table: dict) -> tuple[list, int]:
    """(event, handler) of the deliveries some handler reads, and how many were unreadable."""
    found, skipped = [], 0
    for method, props, body in batch:
        try:
            event = from_amqp(method, props, body)
        except MalformedEvent:
            skipped += 1
            continue
        domain = event.exchange.removeprefix("crm.").removesuffix(".events")
        entries = table.get((domain, event.routing_key), [])
        readable = [h for h, requires in entries if requires is None or not requires.problem(event)]
        if len(readable) < len(entries):
            skipped += 1
        found.extend((event, h) for h in readable)
    return found, skipped


_INDEXES = sa.text(
    "SELECT tablename, indexname, regexp_replace(indexdef, '^(CREATE (UNIQUE )?INDEX )\\S+ ON \\S+?\\.', '\\1 ON ') AS body "
    "FROM pg_indexes WHERE schemaname = :s"
)


def _keep_index_names(conn: sa.Connection, retired: str) -> None:
    """The swapped-in tables' indexes get the names the live ones had (CREATE TABLE ... LIKE
    names them itself), so later migrations find the indexes they name."""
    old = {(r.tablename, r.body): r.indexname for r in conn.execute(_INDEXES, {"s": retired})}
    for r in conn.execute(_INDEXES, {"s": "public"}).all():
        name = old.get((r.tablename, r.body))
        if name and name != r.indexname:
            conn.execute(sa.text(f'ALTER INDEX public."{r.indexname}" RENAME TO "{name}"'))


def apply_batch(conn: sa.Connection, schema: str, table: dict, batch: list) -> int:
    """Apply (method, properties, body) deliveries to the shadow schema; returns how many were
    skipped (unreadable, or a handler failed on them). The batch runs set-based in one savepoint;
    if that fails, it runs again event by event, one savepoint each, so only a poison event is
    left out."""
    events, skipped = _readable(batch, table)
    with in_schema(conn, schema):
        try:
            with conn.begin_nested():
                apply_events(conn, events)
            return skipped
        except sa.exc.DBAPIError as exc:
            if exc.connection_invalidated or isinstance(exc, sa.exc.OperationalError):
                raise
        except Exception as exc:
            log.warning("a rebuild batch failed set-based; applying it event by event", extra={"error": repr(exc)})
        for event, handler in events:
            try:
                with conn.begin_nested():
                    handler(conn, event)
            except sa.exc.OperationalError:
                raise
            except Exception:  # a poison event: the rest of the log still counts
                log.exception("rebuild skipped an event its handler failed on", extra={"event_id": event.id})
                skipped += 1
    return skipped


def run(ctx: jobs.JobContext, amqp_url: str, projections) -> dict:
    cp = ctx.checkpoint
    if cp is None:
        with ctx.step() as conn:
            schema = _prepare(conn, ctx.id)
        end = stream_length(amqp_url)  # after the shadow tables exist: later events reach them live
        with ctx.step() as conn:
            cp = {"schema": schema, "end": end, "next": 0}
            ctx.save(conn, checkpoint=cp, total=end, processed=0, message="replaying the event log")
    if cp.get("swapped"):  # the swap committed; only the job's end was lost
        return {"events": cp["next"]}
    schema, end, nxt = cp["schema"], cp["end"], cp["next"]
    table = dispatch_table(projections)
    if nxt < end:
        nxt = _replay(ctx, amqp_url, table, cp, schema, nxt, end)
    with ctx.step() as conn:
        swap(conn, schema)
        ctx.save(conn, checkpoint={**cp, "next": nxt, "swapped": True}, processed=nxt, message="swapped in")
    log.info("projections rebuilt", extra={"events": nxt, "schema": schema})
    return {"events": nxt}


def _replay(ctx: jobs.JobContext, amqp_url: str, table: dict, cp: dict, schema: str, nxt: int, end: int) -> int:
    """Apply the log's events [nxt, end) in batches, each committed with its checkpoint."""
    conn_amqp = pika.BlockingConnection(url_parameters(amqp_url))
    ch = conn_amqp.channel()
    try:
        ch.basic_qos(prefetch_count=BATCH * 2)  # a stream needs a prefetch limit
        batch, last_tag = [], None
        for method, props, body in ch.consume(
            EVENT_LOG_STREAM, arguments={"x-stream-offset": nxt}, inactivity_timeout=2.0
        ):
            if method is not None:
                offset = int((props.headers or {}).get("x-stream-offset", nxt))
                last_tag = method.delivery_tag
                if offset < end:
                    batch.append((method, props, body))
                    nxt = offset + 1
                else:
                    nxt = end
            if batch and (len(batch) >= BATCH or nxt >= end or method is None):
                with ctx.step() as conn:
                    skipped = apply_batch(conn, schema, table, batch)
                    ctx.save(
                        conn,
                        checkpoint={**cp, "next": nxt},
                        processed=nxt,
                        increment={"skipped": skipped} if skipped else None,
                    )
                ch.basic_ack(last_tag, multiple=True)  # credit for the next deliveries
                batch = []
            if nxt >= end:
                break
            if method is None:
                ctx.check()
        return nxt
    finally:
        # A stream refuses nack (which closing a channel with unacked deliveries sends): ack what
        # was delivered (an ack on a stream only grants credit) before letting go.
        try:
            ch.basic_ack(0, multiple=True)
            ch.cancel()
            conn_amqp.close()
        except pika.exceptions.AMQPError as exc:
            log.warning("closing the event log consumer", extra={"error": repr(exc)})


def worker(rt):
    return rt.once("jobs", lambda: jobs.JobWorker(rt.engine, poll_seconds=0.5))


def workers(rt):
    from . import PROJECTIONS

    w = worker(rt)
    w.register(KIND, lambda ctx: run(ctx, rt.settings.amqp_url, PROJECTIONS()))
    return [w]
