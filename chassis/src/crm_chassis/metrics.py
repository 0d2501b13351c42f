"""Metrics of a service's event plumbing, for a platform team's dashboards and alerts.

Exported over OTLP with the traces when OTEL_EXPORTER_OTLP_ENDPOINT is set (telemetry.py; every
OTEL_METRIC_EXPORT_INTERVAL ms, 60,000 by default), under the process's `service.name`:

- `crm.consumer.events` (counter, by `outcome`: processed, duplicate, failed, dead_lettered):
  what the service's consumers did with the events delivered to them;
- `crm.consumer.queue.messages` (gauge, by `queue`): messages ready in each of the service's
  queues, read by a passive declare every QUEUE_CHECK_SECONDS (only in a process that exports
  metrics): how many events it is behind;
- `crm.consumer.held` (gauge): deliveries held unacknowledged while the database is down;
- `crm.outbox.published` (counter): events the outbox relay published;
- `crm.outbox.pending` and `crm.outbox.pending.age` (gauges, events and seconds): committed
  events not yet published, and how long the oldest has waited: the broker is down or the relay
  is behind.

Nothing is counted on the hot path: the instruments are observed, at export time, from the
counters the consumers and relays keep anyway. A process without a meter provider (no
endpoint) observes nothing.
"""

from __future__ import annotations

import collections
import logging
import time
import weakref

import sqlalchemy as sa
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

log = logging.getLogger("crm.metrics")

QUEUE_CHECK_SECONDS = 15.0
_consumers: weakref.WeakSet = weakref.WeakSet()
_relays: weakref.WeakSet = weakref.WeakSet()


def exporting() -> bool:
    """Whether this process has an SDK meter provider (an OTLP endpoint, or a test's reader):
    else nothing is observed and readings made for it would be wasted."""
    from opentelemetry.sdk.metrics import MeterProvider

    return isinstance(metrics.get_meter_provider(), MeterProvider)


def track_consumer(consumer) -> None:
    _consumers.add(consumer)


def track_relay(relay) -> None:
    _relays.add(relay)


def _consumer_events(options: CallbackOptions):
    totals: collections.Counter = collections.Counter()
    for c in list(_consumers):
        totals["processed"] += c.processed
        totals["duplicate"] += c.duplicates
        totals["failed"] += c.failures
        totals["dead_lettered"] += c.dead_lettered
    return [Observation(n, {"outcome": outcome}) for outcome, n in totals.items()]


def _queue_messages(options: CallbackOptions):
    depths: dict[str, int] = {}
    for c in list(_consumers):  # competing consumers see the same queue: the newest reading
        depths.update(c.queue_depths)
    return [Observation(n, {"queue": q}) for q, n in sorted(depths.items())]


def _held(options: CallbackOptions):
    if not _consumers:
        return []
    return [Observation(sum(c.held for c in list(_consumers)))]


def _published(options: CallbackOptions):
    if not _relays:
        return []
    return [Observation(sum(r.published_total for r in list(_relays)))]


_PENDING = sa.text(
    "SELECT count(*), coalesce(extract(epoch FROM now() - min(occurred_at)), 0) FROM outbox WHERE published_at IS NULL"
)


def _pending_rows() -> list[tuple[int, float]]:
    out = []
    for engine in {id(r.engine): r.engine for r in list(_relays)}.values():
        try:
            with engine.connect() as conn:
                n, age = conn.execute(_PENDING).one()
            out.append((int(n), float(age)))
        except sa.exc.SQLAlchemyError as exc:  # the database is down: no reading this time
            log.debug("outbox pending not read", extra={"error": str(exc)})
    return out


# One query per collection for both outbox gauges: `_pending` (registered, so observed, first)
# reads the rows and keeps them with the time; `_pending_age` takes them if they are that
# collection's (under a second old), else reads them itself.
_read: tuple[float, list[tuple[int, float]]] | None = None


def _pending(options: CallbackOptions):
    global _read
    rows = _pending_rows()
    _read = (time.monotonic(), rows)
    return [Observation(n) for n, _age in rows]


def _pending_age(options: CallbackOptions):
    global _read
    kept, _read = _read, None
    rows = kept[1] if kept is not None and time.monotonic() - kept[0] < 1.0 else _pending_rows()
    return [Observation(age) for _n, age in rows]


_meter = metrics.get_meter("crm.messaging")
for _create, _name, _callback, _unit, _description in (
    (_meter.create_observable_counter, "crm.consumer.events", _consumer_events, "{event}",
     "events handled by the consumers, by outcome"),
    (_meter.create_observable_gauge, "crm.consumer.queue.messages", _queue_messages, "{message}",
     "messages ready in each queue"),
    (_meter.create_observable_gauge, "crm.consumer.held", _held, "{message}",
     "deliveries held while the database is down"),
    (_meter.create_observable_counter, "crm.outbox.published", _published, "{event}",
     "events the outbox relay published"),
    (_meter.create_observable_gauge, "crm.outbox.pending", _pending, "{event}",
     "committed events not yet published"),
    (_meter.create_observable_gauge, "crm.outbox.pending.age", _pending_age, "s",
     "how long the oldest unpublished event has waited"),
):  # fmt: skip
    _create(_name, [_callback], unit=_unit, description=_description)
