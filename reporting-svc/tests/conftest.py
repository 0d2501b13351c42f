"""reporting-svc tests: the service in-process on a fresh database per module, and a feed that
delivers other services' events through the consumer's own idempotent path (inbox + the
wrapped handlers of the merged subscriptions), without the broker."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from google.protobuf import timestamp_pb2

from crm.support.v1 import support_events_pb2 as sev
from crm.support.v1 import ticket_pb2
from crm_chassis.messaging.consumer import EventConsumer
from crm_chassis.messaging.envelope import Event, new_event
from reporting_svc.__main__ import SPEC
from tests.support.harness import Broker, start_service


def ts(value: dt.datetime) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(value)
    return t


class Feed:
    """Events as support-svc publishes them, delivered as the consumer would."""

    def __init__(self, service):
        self.service = service
        subs = SPEC.subscriptions(service.ctx)
        self.consumer = EventConsumer(service.ctx.engine, "amqp://unused", "reporting-svc", subs)
        self.handlers = {(s.domain, k): h for s in subs for k, h in s.handlers.items()}
        self.subs = {s.domain: s for s in subs}
        self.requires = {(s.domain, k): r for s in subs for k, r in s.requires.items()}

    def deliver(self, *events: Event) -> list[bool]:
        done = []
        for e in events:
            domain = e.exchange.removeprefix("crm.").removesuffix(".events")
            req = self.requires.get((domain, e.routing_key))
            assert req is None or req.problem(e) is None, req.problem(e)
            done.append(self.consumer.handle(e, self.handlers.get((domain, e.routing_key))))
        return done

    def deliver_batch(self, *events: Event) -> int:
        """The events in one transaction, as the consumer handles a batch: runs of one routing key
        go to the subscription's batch handler (set-based). Returns how many were new."""
        return self.consumer.handle_batch([(self.subs[e.exchange.split(".")[1]], e) for e in events])

    @staticmethod
    def event(domain: str, routing_key: str, message, subject: str = "", when: dt.datetime | None = None) -> Event:
        e = new_event(
            domain=domain, source_service=f"{domain}-svc", routing_key=routing_key, subject=subject, message=message
        )
        if when is not None:
            e.time = when
        return e

    @staticmethod
    def again(e: Event) -> Event:
        """The same event replayed from the stream under a new id (the inbox does not catch it)."""
        return Event(**{**e.__dict__, "id": str(uuid.uuid4())})


def ticket_events(
    n: int,
    *,
    agent: str,
    channel: int,
    created: dt.datetime,
    first_response: int | None = None,
    resolved: int | None = None,
    closed: dt.datetime | None = None,
    exchanges: int = 0,
    complaint: bool = False,
    policy: bool = True,
    fr_met: bool = True,
    res_met: bool = True,
    team: str = "teams/desk",
) -> list[Event]:
    """The ticket's events in order (opened, first_responded, resolved, closed): each carries the
    ticket after the change, with its version."""
    name = f"tickets/00000000-0000-4000-8000-{n:012d}"
    base = dict(
        ticket=name,
        number=f"T-{n:06d}",
        channel=channel,
        complaint=complaint,
        team=team,
        assignee=agent,
        create_time=ts(created),
        sla_policy="slaPolicies/std" if policy else "",
    )
    steps = [("ticket.opened.v1", {}, created)]
    if first_response is not None:
        at = created + dt.timedelta(seconds=first_response)
        steps.append(
            ("ticket.first_responded.v1", {"first_response_time": ts(at), "sla_first_response_met": fr_met}, at)
        )
    if resolved is not None:
        at = created + dt.timedelta(seconds=resolved)
        steps.append(("ticket.resolved.v1", {"resolve_time": ts(at), "sla_resolution_met": res_met}, at))
    if closed is not None:
        steps.append(("ticket.closed.v1", {"close_time": ts(closed)}, closed))
    out, acc = [], {}
    for version, (key, change, at) in enumerate(steps, start=1):
        acc.update(change)
        msg = sev.TicketEvent(
            **base, **acc, exchange_count=exchanges if version == len(steps) else min(exchanges, version - 1),
            event_time=ts(at), version=version, state=ticket_pb2.Ticket.State.Value("STATE_OPEN"),
        )  # fmt: skip
        out.append(Feed.event("support", key, msg, name, at))
    return out


def csat(n: int, ticket: int, agent: str, score: int, at: dt.datetime, team: str = "teams/desk") -> Event:
    msg = sev.SurveyEvent(
        survey=f"surveys/s{n}",
        ticket=f"tickets/00000000-0000-4000-8000-{ticket:012d}",
        agent=agent,
        team=team,
        kind="csat",
        csat=score,
        answer_time=ts(at),
    )
    return Feed.event("support", "survey.answered.v1", msg, msg.survey, at)


def breach(ticket: int, metric: str, agent: str, at: dt.datetime, team: str = "teams/desk") -> Event:
    msg = sev.SlaEvent(
        ticket=f"tickets/00000000-0000-4000-8000-{ticket:012d}",
        policy="slaPolicies/std",
        metric=metric,
        event_time=ts(at),
        team=team,
        assignee=agent,
    )
    return Feed.event("support", "ticket.sla_breached.v1", msg, msg.ticket, at)


def lead(n: int, source: str, status: str, created: dt.datetime, version: int, at: dt.datetime | None = None) -> Event:
    from crm.sales.v1 import sales_events_pb2 as sales

    msg = sales.LeadEvent(
        lead=f"leads/l{n}", status=status, source=source, create_time=ts(created), version=version,
        event_time=ts(at or created),
    )  # fmt: skip
    key = {"new": "lead.created.v1", "converted": "lead.converted.v1"}.get(status, "lead.updated.v1")
    return Feed.event("sales", key, msg, msg.lead, at or created)


def opportunity(
    n: int, source: str, state: str, currency: str, units: int, closed: dt.datetime | None, version: int
) -> Event:
    from crm.sales.v1 import sales_events_pb2 as sales
    from crm.type.v1 import money_pb2

    msg = sales.OpportunityEvent(
        opportunity=f"opportunities/o{n}", state=state, source=source, version=version,
        amount=money_pb2.Money(currency_code=currency, units=units),
    )  # fmt: skip
    if closed is not None:
        msg.close_time.CopyFrom(ts(closed))
    key = {"won": "opportunity.won.v1", "lost": "opportunity.lost.v1", "open": "opportunity.reopened.v1"}[state]
    return Feed.event("sales", key, msg, msg.opportunity, closed)


@pytest.fixture(scope="module")
def svc(request, databases, broker):
    service = start_service(
        SPEC, databases.fresh("rep_" + request.module.__name__.rsplit(".", 1)[-1][:16]), broker.url, consumers=False
    )
    yield service
    service.stop(0)


@pytest.fixture(scope="module")
def own_broker():
    """A RabbitMQ vhost of the module's own (its event log holds only the module's events)."""
    b = Broker()
    yield b
    b.close()


@pytest.fixture(scope="module")
def feed(svc) -> Feed:
    return Feed(svc)


@pytest.fixture(scope="session")
def ev():
    """The event builders above: ev.tickets(...), ev.csat(...), ev.breach(...), ev.ts(...)."""
    import types

    return types.SimpleNamespace(
        tickets=ticket_events, csat=csat, breach=breach, lead=lead, opportunity=opportunity, ts=ts, again=Feed.again
    )
