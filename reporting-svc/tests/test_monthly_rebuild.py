"""Migration 0016's tables through the real broker: support and invoice events published to the
producers' exchanges build support_monthly and customer_value_summary live; RebuildProjections
replays the event log into fresh tables and swaps them in: the rebuilt tables hold the same rows
(both are damaged first, so only a real swap passes), and the reports read from them answer as
from the daily rollups."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from crm.reporting.v1 import reporting_service_pb2 as rs
from crm.reporting.v1 import reporting_service_pb2_grpc as rsg
from crm.sales.v1 import sales_events_pb2 as sales
from crm.support.v1 import support_events_pb2 as sev
from crm.support.v1 import ticket_pb2
from crm.type.v1 import money_pb2
from crm_chassis.messaging.envelope import new_event
from reporting_svc import support_report, value
from reporting_svc.__main__ import SPEC
from tests.support.harness import channel, md, start_service, wait_for

from .test_rebuild import publish

UTC = dt.UTC
EMAIL = ticket_pb2.Channel.Value("CHANNEL_EMAIL")


@pytest.fixture(scope="module")
def live(databases, own_broker):
    service = start_service(SPEC, databases.fresh("rep_monthly_rebuild"), own_broker.url)
    assert service.consumer.ready.wait(10)
    yield service
    service.stop(0)


def reassigned(event, version: int, **changes):
    msg = sev.TicketEvent()
    msg.ParseFromString(event.data)
    for k, v in changes.items():
        getattr(msg, k).FromDatetime(v) if isinstance(v, dt.datetime) else setattr(msg, k, v)
    msg.version = version
    return new_event(domain="support", source_service="support-svc", routing_key="ticket.assigned.v1",
                     subject=msg.ticket, message=msg)  # fmt: skip


def invoice(n: int, customer: str, at: dt.datetime, net: int, kind="invoice"):
    msg = sales.InvoiceEvent(
        invoice=f"invoices/r{n}", customer=f"customers/{customer}", kind=kind, state="paid",
        total=money_pb2.Money(currency_code="IRR", units=net), tax_total=money_pb2.Money(currency_code="IRR"),
    )  # fmt: skip
    msg.event_time.FromDatetime(at)
    key = "invoice.credited.v1" if kind == "credit_note" else "invoice.paid.v1"
    return new_event(domain="sales", source_service="sales-svc", routing_key=key, subject=msg.invoice, message=msg)


def applied(live) -> int:
    with live.ctx.engine.connect() as conn:
        return conn.execute(sa.text("SELECT coalesce(sum(applied_events), 0) FROM projection_sources")).scalar()


def tables(live) -> tuple[list, list]:
    with live.ctx.engine.connect() as conn:
        monthly = conn.execute(
            sa.text(
                "SELECT * FROM support_monthly WHERE requests <> 0 OR closed <> 0 OR csat_count <> 0 "
                "OR sla_breaches <> 0 ORDER BY 1, 2, 3, 4, 5"
            )  # fmt: skip
        ).all()
        summary = conn.execute(sa.text("SELECT * FROM customer_value_summary ORDER BY 1, 2")).all()
    return [tuple(r) for r in monthly], [tuple(r) for r in summary]


def test_rebuild_makes_the_same_monthly_rollup_and_summary(live, own_broker, ev):
    t0 = dt.datetime(2026, 10, 20, 21, 0, tzinfo=UTC)  # Tehran 2026-10-21, Jalali 1405-07-29
    first = ev.tickets(1, agent="agents/a", team="teams/x", channel=EMAIL, created=t0, first_response=60,
                       closed=t0 + dt.timedelta(days=3))  # fmt: skip
    second = ev.tickets(2, agent="agents/b", team="teams/y", channel=EMAIL, created=t0 + dt.timedelta(days=40))
    events = [
        *first,
        # reassigned to another agent and team, closed again a month later (another month in both calendars)
        reassigned(first[-1], 7, assignee="agents/c", team="teams/y", close_time=t0 + dt.timedelta(days=33)),
        *second,
        ev.csat(1, 1, "agents/a", 5, t0 + dt.timedelta(days=1), team="teams/x"),
        ev.breach(2, "first_response", "agents/b", t0 + dt.timedelta(days=40, hours=2), team="teams/y"),
        invoice(1, "p", t0, 1000),
        invoice(1, "q", t0 + dt.timedelta(days=35), 1000),  # the same invoice, moved to q on another day
        invoice(2, "p", t0 + dt.timedelta(days=50), 300),
        invoice(3, "p", t0 + dt.timedelta(days=52), 100, kind="credit_note"),
        invoice(4, "r", t0 + dt.timedelta(days=2), 700),
    ]
    publish(own_broker.url, events)
    wait_for(lambda: applied(live) == len(events), 15, "the live consumer to apply every event")
    before = tables(live)
    monthly, summary = before
    assert {(r[0], r[3]) for r in monthly if r[5]} == {("gregorian", "agents/c"), ("jalali", "agents/c"),
                                                     ("gregorian", "agents/b"), ("jalali", "agents/b")}  # fmt: skip
    assert [(r[0], r[5], r[6], r[7], r[8]) for r in summary] == [
        ("p", 1, 1, 200, 1),  # its first invoice moved to q: 300 paid, 100 credited
        ("q", 1, 1, 1000, 0),
        ("r", 1, 1, 700, 0),
    ]
    with live.ctx.engine.begin() as conn:  # damage both: only a real swap repairs them
        conn.execute(sa.text("UPDATE support_monthly SET requests = requests + 100"))
        conn.execute(sa.text("DELETE FROM customer_value_summary WHERE customer_id = 'p'"))
    assert tables(live) != before
    with channel(live) as ch:
        stub = rsg.ReportingServiceStub(ch)
        job = stub.RebuildProjections(rs.RebuildProjectionsRequest(request_id="m1"), metadata=md())

        def finished():
            j = stub.GetProjectionRebuild(rs.GetProjectionRebuildRequest(name=job.name), metadata=md())
            return j if j.state in ("succeeded", "failed", "cancelled") else None

        done = wait_for(finished, 20, "the rebuild")
    assert (done.state, done.error) == ("succeeded", "")
    assert tables(live) == before
    with live.ctx.engine.connect() as conn:
        for calendar in ("gregorian", "jalali"):
            q = {"start": dt.date(2026, 10, 1), "end": dt.date(2027, 1, 15), "period": "month", "calendar": calendar,
                 "lang": "en", "dims": ["agent"]}  # fmt: skip
            assert support_report.report(conn, q) == support_report.report(conn, q, monthly=False)
        assert value.rfm_counts(conn, "IRR", None, dt.date(2026, 12, 1), summary=True) == value.rfm_counts(
            conn, "IRR", None, dt.date(2026, 12, 1), summary=False
        )
