"""campaign-svc started in-process on a fresh database per test module (relay off: tests read the
events from the outbox table), plus helpers to feed it other services' events and read its own."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from campaign_svc.__main__ import SPEC
from campaign_svc.runtime import Campaign
from crm_chassis.messaging.envelope import Event, new_event
from crm_chassis.messaging.outbox import row_to_event
from crm_chassis.messaging.tables import outbox
from tests.support.harness import channel, md, start_service

ADMIN = md("admin", "ada")
MARKETER = md("marketer", "mina")


@pytest.fixture(scope="module")
def svc(request, databases, broker):
    service = start_service(
        SPEC, databases.fresh(request.module.__name__.rsplit(".", 1)[-1][:20]), broker.url, relay=False
    )
    yield service
    service.stop(0)


@pytest.fixture(scope="module")
def ch(svc):
    with channel(svc) as c:
        yield c


def rt(svc) -> Campaign:
    """The service's runtime (unit of work, timers, hooks, senders)."""
    return svc.ctx.shared["runtime"]


def events(svc, routing_key: str, message_cls=None, subject: str | None = None) -> list:
    """The events of this routing key in the outbox, oldest first (parsed if a class is given)."""
    q = sa.select(outbox).where(outbox.c.routing_key == routing_key).order_by(outbox.c.id)
    if subject is not None:
        q = q.where(outbox.c.subject == subject)
    with svc.ctx.engine.connect() as conn:
        rows = conn.execute(q).all()
    evs = [row_to_event(r) for r in rows]
    return [e.parse(message_cls) for e in evs] if message_cls else evs


def event_of(domain: str, routing_key: str, message, subject: str = "") -> Event:
    """An event of another service as its consumer receives it."""
    return new_event(
        domain=domain, source_service=f"{domain}-svc", routing_key=routing_key, subject=subject, message=message
    )


def deliver(svc, *evs: Event) -> None:
    """Run the service's handlers of these events, each in its own transaction (as the consumer
    does, without the broker: the merged subscription of the event's producer)."""
    subs = {s.domain: s for s in SPEC.subscriptions(svc.ctx)}
    for e in evs:
        handler = subs[e.exchange.split(".")[1]].handlers[e.routing_key]
        with svc.ctx.engine.begin() as conn:
            handler(conn, e)


def row(svc, table: sa.Table, **where):
    with svc.ctx.engine.connect() as conn:
        return conn.execute(sa.select(table).filter_by(**where)).one_or_none()
