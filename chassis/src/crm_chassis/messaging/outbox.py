"""Transactional outbox: `enqueue` writes the event row in the caller's transaction; the
`OutboxRelay` thread publishes unpublished rows in batches with pipelined publisher confirms
and marks them published.

- Nothing lost: a row is marked only after the broker confirmed it; a broker outage leaves the
  rows waiting and the relay retries with back-off.
- Replicas share the work: rows are claimed with FOR UPDATE SKIP LOCKED.
- At-least-once: a crash between confirm and commit republishes; consumers are idempotent.
- Quiet when idle: polls make no spans (SQL instrumentation suppressed), and the broker
  connection's heartbeats are serviced between polls, so the broker never drops it as dead.
- Each PRODUCER span times the publish of its messages up to the broker's confirms.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import time

import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from .. import metrics
from ..db import is_database_unavailable, untraced
from ..telemetry import extract_context, inject_headers
from ..workers import PollingWorker
from .envelope import Event
from .publisher import ConfirmingPublisher, PublishError
from .tables import outbox

log = logging.getLogger("crm.outbox")


# The outbox row of an event, column by column: enqueue inserts it, bulk writers (imports)
# COPY it. One definition, so the two cannot drift apart.
OUTBOX_COLUMNS = (
    "event_id",
    "exchange",
    "routing_key",
    "event_type",
    "source",
    "subject",
    "dataschema",
    "payload",
    "trace_headers",
    "occurred_at",
)


def outbox_row(event: Event, trace_headers) -> tuple:
    """The event's values in OUTBOX_COLUMNS order; trace_headers as the caller stores them
    (a dict for an INSERT, JSON text for COPY)."""
    return (
        event.id,
        event.exchange,
        event.routing_key,
        event.type,
        event.source,
        event.subject,
        event.dataschema,
        event.data,
        trace_headers,
        event.time,
    )


def enqueue(conn: sa.Connection, event: Event) -> None:
    """Add the event to the outbox inside the caller's (open) transaction."""
    # Parameters, not .values(): one cached statement for every event.
    conn.execute(outbox.insert(), dict(zip(OUTBOX_COLUMNS, outbox_row(event, inject_headers()), strict=True)))


def row_to_event(row) -> Event:
    """An outbox row as the event it carries."""
    return Event(
        id=str(row.event_id),
        type=row.event_type,
        source=row.source,
        subject=row.subject,
        time=row.occurred_at,
        exchange=row.exchange,
        routing_key=row.routing_key,
        data=bytes(row.payload),
        dataschema=row.dataschema,
        trace_headers=dict(row.trace_headers or {}),
    )


# Mark a batch sent: one array parameter, not one bind parameter per row (500 of them cost
# more than the UPDATE). Its commit need not wait for the disk (synchronous_commit off for this
# transaction, set in the same statement): a crash that loses the mark publishes the rows
# again, which consumers absorb (inbox) like any redelivery.
_MARK = sa.text(
    "WITH async_commit AS (SELECT set_config('synchronous_commit', 'off', true)) "
    "UPDATE outbox SET published_at = now(), attempts = attempts + 1 "
    "WHERE id = ANY(CAST(:ids AS bigint[])) AND EXISTS (SELECT 1 FROM async_commit)"
)


class OutboxRelay(PollingWorker):
    name = "outbox-relay"

    def __init__(
        self,
        engine: sa.Engine,
        amqp_url: str,
        declare,  # callable(channel): declares the exchanges the rows go to
        batch_size: int = 500,
        poll_seconds: float = 0.5,
        max_backoff: float = 5.0,
        retention_hours: float = 72.0,
    ):
        self.engine = engine
        self.retention_hours = retention_hours
        self._next_cleanup = 0.0
        self.publisher = ConfirmingPublisher(amqp_url, declare)
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.max_backoff = max_backoff
        super().__init__()
        self.published_total = 0
        self.broker_up = False
        self._tracer = trace.get_tracer("crm.outbox")
        metrics.track_relay(self)

    # -- lifecycle ---------------------------------------------------------------------------
    def stop(self, timeout: float = 10.0) -> None:
        self._signal_stop()
        self._join(timeout)
        self.publisher.close()

    # -- work --------------------------------------------------------------------------------
    def relay_once(self) -> int:
        """Publish one batch; return how many rows were published (0 when none waited)."""
        with contextlib.ExitStack() as stack:
            conn, rows = self._claim(stack)
            if not rows:
                return 0
            spans, messages = self._prepare(rows)
            try:
                # On failure this raises: the transaction rolls back and the rows stay unpublished.
                self.publisher.publish_batch(messages)
            except BaseException as exc:
                for span in spans:
                    span.record_exception(exc)
                    span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
                    span.end()
                raise
            for span in spans:  # the batch is confirmed: each span timed its messages' publish
                span.end()
            self._mark(conn, rows)
        self.published_total += len(rows)
        return len(rows)

    def _claim(self, stack: contextlib.ExitStack):
        """A transaction (entered on `stack`) and the next batch of unpublished rows it locked.
        The poll, its UPDATE and its connection make no spans: an idle relay traces nothing."""
        with untraced():
            conn = stack.enter_context(self.engine.begin())
            rows = conn.execute(
                sa.select(outbox)
                .where(outbox.c.published_at.is_(None))
                .order_by(outbox.c.id)
                .limit(self.batch_size)
                .with_for_update(skip_locked=True)
            ).all()
        return conn, rows

    @staticmethod
    def _mark(conn, rows) -> None:
        with untraced():
            conn.execute(_MARK, {"ids": [r.id for r in rows]})

    def relay_backlog(self, deadline: float | None = None, until_stopped: bool = True) -> int:
        """Publish until the outbox is empty (or `deadline`, a time.monotonic()), two batches in
        flight: while the broker confirms one, the next is read (its rows locked in a second
        transaction; SKIP LOCKED keeps the two apart) and sent. A batch is marked published and
        committed only once all of it is confirmed, oldest first; a failure rolls back every
        batch in flight (their rows are published again: at least once, as always)."""
        inflight: collections.deque = collections.deque()  # (stack, conn, rows, spans, receipt)
        total = 0
        try:
            while True:
                while (
                    len(inflight) < 2
                    and not (until_stopped and self._stopping.is_set())
                    and (deadline is None or time.monotonic() < deadline)
                ):
                    stack = contextlib.ExitStack()
                    try:
                        conn, rows = self._claim(stack)
                        if not rows:
                            stack.close()
                            break
                        spans, messages = self._prepare(rows)
                    except BaseException as exc:  # not in flight yet: roll its transaction back here
                        stack.__exit__(type(exc), exc, exc.__traceback__)
                        raise
                    # From here the batch is in flight; the handler below rolls it back on failure.
                    inflight.append((stack, conn, rows, spans, None))
                    inflight[-1] = (stack, conn, rows, spans, self.publisher.publish(messages))
                if not inflight:
                    return total
                stack, conn, rows, spans, receipt = inflight[0]
                self.publisher.wait_confirmed(receipt)
                for span in spans:
                    span.end()
                self._mark(conn, rows)
                inflight.popleft()
                stack.close()  # COMMIT
                total += len(rows)
                self.published_total += len(rows)
        except BaseException as exc:
            while inflight:
                stack, _conn, _rows, spans, _last = inflight.popleft()
                for span in spans:
                    span.record_exception(exc)
                    span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
                    span.end()
                stack.__exit__(type(exc), exc, exc.__traceback__)  # ROLLBACK: the rows stay unpublished
            raise

    def _prepare(self, rows) -> tuple[list, list]:
        """The batch's messages and their PRODUCER spans (started, not ended).

        One span per run of consecutive rows written in the same trace, and its context in each
        of their messages: an event written by one request gets a span of its own, an import
        chunk's thousand events share one (per-message spans cost the relay a third of its time
        on an import). Rows keep their order. A span ends when the whole batch is confirmed."""
        spans, messages = [], []
        runs = itertools.groupby(map(row_to_event, rows), key=lambda e: e.trace_headers.get("traceparent", ""))
        for _, group in runs:
            events = list(group)
            first = events[0]
            attributes = {
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "send",
                "messaging.destination.name": first.exchange,
                "messaging.rabbitmq.destination.routing_key": first.routing_key,
            }
            if len(events) == 1:
                attributes["messaging.message.id"] = first.id
            else:
                attributes["messaging.batch.message_count"] = len(events)
            span = self._tracer.start_span(
                f"{first.exchange} publish",
                context=extract_context(first.trace_headers),
                kind=SpanKind.PRODUCER,
                attributes=attributes,
            )
            spans.append(span)
            headers = inject_headers(context=trace.set_span_in_context(span))
            messages += [(e.exchange, e.routing_key, e.data, e.amqp_properties(trace_headers=headers)) for e in events]
        return spans, messages

    def cleanup(self, batch: int = 10_000) -> int:
        """Delete rows published more than retention_hours ago (a bounded batch per call; the
        partial index keeps unpublished rows cheap to find however many published ones remain)."""
        with untraced(), self.engine.begin() as conn:
            return conn.execute(
                sa.text(
                    "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE published_at < now() - make_interval("
                    "secs => :secs) ORDER BY id LIMIT :n)"
                ),
                {"secs": self.retention_hours * 3600, "n": batch},
            ).rowcount

    def drain(self, timeout: float = 30.0) -> int:
        """Publish until the outbox is empty (used on shutdown, by tests and tools)."""
        return self.relay_backlog(deadline=time.monotonic() + timeout, until_stopped=False)

    def _wait_for_work(self) -> None:
        """Wait for a wake-up or the next poll, keeping the broker connection alive meanwhile
        (heartbeats are serviced at least every second, from this thread, which owns it)."""
        deadline = time.monotonic() + self.poll_seconds
        while True:
            self.publisher.keepalive()
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._wake.wait(min(remaining, 1.0)):
                break
        self._wake.clear()

    def _run(self) -> None:
        backoff = 0.2
        database_down = False
        while not self._stopping.is_set():
            try:
                n = self.relay_once()
                if n >= self.batch_size:  # a backlog (an import): pipeline the batches
                    n += self.relay_backlog()
                if not self.broker_up:
                    self.broker_up = True
                    log.info("relay connected to broker")
                if database_down:
                    database_down = False
                    log.info("relay's database available again")
                backoff = 0.2
                if time.monotonic() >= self._next_cleanup:
                    self._next_cleanup = time.monotonic() + 600
                    self.cleanup()
                self._wait_for_work()
            except (PublishError, OSError) as exc:
                if self.broker_up or backoff == 0.2:
                    log.warning("broker unavailable; events wait in the outbox", extra={"error": str(exc)})
                self.broker_up = False
                self.publisher.close()
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
            except sa.exc.SQLAlchemyError as exc:
                if not is_database_unavailable(exc):
                    log.warning("outbox database error", extra={"error": str(exc)})
                elif not database_down:  # one line per outage, not one per retry
                    database_down = True
                    log.warning("relay's database unavailable; it retries with back-off", extra={"error": str(exc)})
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
            except Exception:
                log.exception("outbox relay error")
                self.publisher.close()
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
        # Final flush so events of the last calls before shutdown leave now, if the broker is up.
        if self.broker_up:
            try:
                self.drain(timeout=5.0)
            except Exception as exc:  # they stay in the outbox for the next start
                log.warning("final outbox flush failed", extra={"error": str(exc)})
