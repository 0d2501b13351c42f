"""Migration 0016's coarse tables against the daily rollups they are read instead of, over
events delivered in-process (one by one and in set-based batches), with facts that move
between keys: tickets reassigned to another agent and team and closed again in another month,
a call's agent corrected, invoices paid again on another day, moved to another customer, and
credited.

- support_monthly holds, per Gregorian month and per Jalali month, the sums of support_daily's
  days; the desk report by month, quarter, year and all answers the same from support_monthly
  plus the ragged edges as from support_daily alone, over ranges starting and ending on and
  off month boundaries of both calendars.
- customer_value_summary is the GROUP BY of customer_value_daily's non-zero rows; Pareto and
  RFM (counts, segment pages, one customer) answer the same from it (with the customers active
  after the range's end read from the daily rollup) as from the daily rollup.
"""

from __future__ import annotations

import datetime as dt
import random

import pytest
import sqlalchemy as sa

from crm.sales.v1 import sales_events_pb2 as sales
from crm.support.v1 import support_events_pb2 as sev
from crm.support.v1 import ticket_pb2
from crm.type.v1 import money_pb2
from reporting_svc import periods, support_report, value
from reporting_svc.tables import SUPPORT_MEASURES

UTC = dt.UTC
CHANNELS = [ticket_pb2.Channel.Value(c) for c in ("CHANNEL_EMAIL", "CHANNEL_WEB", "CHANNEL_PHONE")]
# Tehran is UTC+3:30: an instant after 20:30 UTC is on the next Tehran day (and month, at a month's end)
FIRST, DAYS = dt.datetime(2025, 12, 1, tzinfo=UTC), 460  # 2025-12-01 .. 2027-03-05


def _instant(rng: random.Random) -> dt.datetime:
    day = FIRST + dt.timedelta(days=rng.randrange(DAYS))
    return day + dt.timedelta(hours=rng.choice([1, 9, 20, 21, 23]), minutes=rng.choice([0, 29, 31, 45]))


def _moved(event, feed, version: int, **changes):
    """The ticket's last event again, as a later version with `changes` (a reassignment)."""
    msg = sev.TicketEvent()
    msg.ParseFromString(event.data)
    for k, v in changes.items():
        if isinstance(v, dt.datetime):
            getattr(msg, k).FromDatetime(v)
        else:
            setattr(msg, k, v)
    msg.version = version
    return feed.event("support", "ticket.assigned.v1", msg, msg.ticket, event.time)


def _call(feed, n: int, agent: str, at: dt.datetime, version: int):
    msg = sev.CallEvent(call=f"calls/k{n}", direction="inbound", agent=agent, outcome="answered", version=version)
    msg.start_time.FromDatetime(at)
    return feed.event("support", "call.logged.v1", msg, msg.call, at)


def _invoice(feed, n: int, customer: str, at: dt.datetime, net: int, *, state="paid", kind="invoice", cur="IRR"):
    msg = sales.InvoiceEvent(
        invoice=f"invoices/m{n}", customer=f"customers/{customer}", kind=kind, state=state,
        total=money_pb2.Money(currency_code=cur, units=net), tax_total=money_pb2.Money(currency_code=cur),
    )  # fmt: skip
    msg.event_time.FromDatetime(at)
    key = "invoice.credited.v1" if kind == "credit_note" else f"invoice.{state}.v1"
    return feed.event("sales", key, msg, msg.invoice, at)


def _deliver(feed, events, rng: random.Random) -> None:
    """Half one by one (Rollup.apply), half in shuffled batches of 25 (Facts.apply_many, rollup_upsert)."""
    events = list(events)
    rng.shuffle(events)
    half = len(events) // 2
    feed.deliver(*events[:half])
    rest = events[half:]
    for i in range(0, len(rest), 25):
        feed.deliver_batch(*rest[i : i + 25])


@pytest.fixture(scope="module")
def loaded(svc, feed, ev):
    rng = random.Random(16)
    support, invoices = [], []
    for n in range(1, 161):
        created = _instant(rng)
        agent, team = f"agents/a{rng.randrange(6)}", f"teams/t{rng.randrange(3)}"
        steps = ev.tickets(
            n, agent=agent, team=team, channel=rng.choice(CHANNELS), created=created,
            first_response=rng.choice([None, 300, 7200]), resolved=rng.choice([None, 86400, 40 * 86400]),
            closed=created + dt.timedelta(days=rng.choice([1, 20, 45])) if rng.random() < 0.7 else None,
            exchanges=rng.randrange(5), complaint=rng.random() < 0.2,
        )  # fmt: skip
        support += steps
        if rng.random() < 0.3:  # reassigned (another agent and team), closed again 40 days later
            support.append(
                _moved(
                    steps[-1],
                    feed,
                    9,
                    assignee=f"agents/a{rng.randrange(6)}",
                    team=f"teams/t{rng.randrange(3)}",
                    close_time=created + dt.timedelta(days=40),
                )  # fmt: skip
            )
        if rng.random() < 0.4:
            support.append(ev.csat(n, n, agent, rng.randint(1, 5), created + dt.timedelta(days=2), team=team))
        if rng.random() < 0.15:
            support.append(ev.breach(n, "first_response", agent, created + dt.timedelta(hours=5), team=team))
    for n in range(1, 61):
        at = _instant(rng)
        support.append(_call(feed, n, f"agents/a{rng.randrange(6)}", at, 1))
        if rng.random() < 0.3:  # the agent corrected
            support.append(_call(feed, n, f"agents/a{rng.randrange(6)}", at, 2))
    for n in range(1, 241):
        customer = f"v{int(40 * rng.random() ** 2)}"
        at = _instant(rng)
        net = rng.choice([100, 250, 1000, 4000])
        invoices.append(_invoice(feed, n, customer, at - dt.timedelta(days=3), net, state="issued"))
        if rng.random() < 0.85:
            invoices.append(_invoice(feed, n, customer, at, net))
            later = at + dt.timedelta(days=rng.choice([1, 35]))
            if rng.random() < 0.15:  # paid again later (another day, maybe another month)
                invoices.append(_invoice(feed, n, customer, later, net))
            elif rng.random() < 0.15:  # moved to another customer
                invoices.append(_invoice(feed, n, f"v{rng.randrange(40)}", later, net))
        if rng.random() < 0.08:
            invoices.append(_invoice(feed, 1000 + n, customer, at + dt.timedelta(days=2), net // 2, kind="credit_note"))
        if rng.random() < 0.05:
            invoices.append(_invoice(feed, 2000 + n, customer, at, 77, cur="USD"))
    _deliver(feed, support, rng)
    _deliver(feed, invoices, rng)
    return svc


def _nonzero(conn, sql: str) -> list:
    return [tuple(r) for r in conn.execute(sa.text(sql)).all()]


def test_support_monthly_is_support_daily_per_month_in_both_calendars(loaded):
    measures = ", ".join(SUPPORT_MEASURES)
    sums = ", ".join(f"sum({m})::bigint AS {m}" for m in SUPPORT_MEASURES)
    nonzero = " OR ".join(f"{m} <> 0" for m in SUPPORT_MEASURES)
    with loaded.ctx.engine.connect() as conn:
        monthly = _nonzero(
            conn, f"SELECT calendar, month, team, agent, channel, {measures} FROM support_monthly WHERE {nonzero} "
            "ORDER BY 1, 2, 3, 4, 5",
        )  # fmt: skip
        daily = _nonzero(
            conn, f"""SELECT * FROM (
                SELECT 'gregorian' AS calendar, date_trunc('month', day)::date AS month, team, agent, channel, {sums}
                FROM support_daily GROUP BY 2, 3, 4, 5
                UNION ALL SELECT 'jalali', day - (jalali_day_of_month(day) - 1), team, agent, channel, {sums}
                FROM support_daily GROUP BY 2, 3, 4, 5) x WHERE {nonzero} ORDER BY 1, 2, 3, 4, 5""",
        )  # fmt: skip
        moved = conn.execute(sa.text("SELECT count(*) FROM ticket_facts WHERE version = 9")).scalar()
    assert monthly == daily
    assert len({r[1] for r in monthly if r[0] == "jalali"}) >= 15 and moved >= 30
    # a Jalali month starts on the Gregorian date of its 1st, not on a Gregorian 1st
    assert any(r[1].day != 1 for r in monthly if r[0] == "jalali")


def _edges() -> list[dt.date | None]:
    """Range ends on and off the month boundaries of both calendars, and open ends."""
    out: list[dt.date | None] = [None]
    for day in (dt.date(2025, 12, 1), dt.date(2026, 1, 21), dt.date(2026, 3, 21), dt.date(2026, 6, 22),
                dt.date(2026, 9, 30), dt.date(2026, 11, 21), dt.date(2026, 11, 22), dt.date(2027, 2, 19)):  # fmt: skip
        out += [day, day - dt.timedelta(days=1), day + dt.timedelta(days=9)]
    return out


def test_the_desk_report_from_support_monthly_is_the_daily_answer(loaded):
    edges = _edges()
    ranges = [(s, e) for s in edges for e in edges if s is None or e is None or s <= e]
    served = 0
    with loaded.ctx.engine.connect() as conn:
        for i, (start, end) in enumerate(ranges):
            for period in ("month", "quarter", "year", "all"):
                for calendar in ("gregorian", "jalali"):
                    dims = [[], ["team"], ["agent", "channel"]][(i + len(period)) % 3]
                    q = {"start": start, "end": end, "period": period, "calendar": calendar, "lang": "fa", "dims": dims}
                    assert support_report.report(conn, q) == support_report.report(conn, q, monthly=False), q
                    served += periods.whole_months(start, end, "gregorian" if period == "all" else calendar) is not None
        # and the daily periods (day, week, weekday) still read support_daily: the same answer
        q = {"start": dt.date(2026, 1, 5), "end": dt.date(2026, 4, 2), "calendar": "jalali", "lang": "en", "dims": []}
        for period in ("day", "week", "weekday", "day_of_month"):
            assert support_report.report(conn, {**q, "period": period}).rows
    assert served > 1000  # most of them read whole months from support_monthly
    # one with numbers: Jalali months over the whole range, totals equal to the daily rollup's
    q = {"start": None, "end": None, "period": "month", "calendar": "jalali", "lang": "en", "dims": []}
    with loaded.ctx.engine.connect() as conn:
        got = support_report.report(conn, q)
        requests = conn.execute(sa.text("SELECT sum(requests) FROM support_daily")).scalar()
    assert got.total.requests == requests == 160 and len(got.rows) >= 15


def test_whole_months_of_both_calendars():
    j = "jalali"
    # Aban 1405 = 2026-10-23 .. 2026-11-21; Azar 1405 starts 2026-11-22
    assert periods.whole_months(dt.date(2026, 10, 23), dt.date(2026, 11, 21), j) == (
        dt.date(2026, 10, 23), dt.date(2026, 11, 22))  # fmt: skip
    assert periods.whole_months(dt.date(2026, 10, 24), dt.date(2026, 11, 21), j) is None
    assert periods.whole_months(dt.date(2026, 10, 1), dt.date(2026, 11, 30), "gregorian") == (
        dt.date(2026, 10, 1), dt.date(2026, 12, 1))  # fmt: skip
    assert periods.whole_months(dt.date(2026, 10, 2), dt.date(2026, 12, 30), "gregorian") == (
        dt.date(2026, 11, 1), dt.date(2026, 12, 1))  # fmt: skip
    assert periods.whole_months(None, dt.date(2026, 12, 30), j) == (None, dt.date(2026, 12, 22))
    assert periods.whole_months(dt.date(2026, 3, 20), None, j) == (dt.date(2026, 3, 21), None)  # Nowruz 1405
    assert periods.month_start(dt.date(2026, 3, 20), j) == dt.date(2026, 2, 20)  # Esfand 1404


def test_customer_value_summary_is_the_daily_rollup_per_customer(loaded):
    with loaded.ctx.engine.connect() as conn:
        summary = _nonzero(conn, "SELECT * FROM customer_value_summary ORDER BY 1, 2")
        daily = _nonzero(
            conn, """SELECT customer_id, currency, min(day), max(day), max(day) FILTER (WHERE purchases > 0),
                   count(*) FILTER (WHERE purchases > 0), sum(purchases), sum(revenue), sum(credit_notes)
            FROM customer_value_daily WHERE revenue <> 0 OR purchases <> 0 OR credit_notes <> 0
            GROUP BY 1, 2 ORDER BY 1, 2""",
        )  # fmt: skip
        zero_rows = conn.execute(
            sa.text("SELECT count(*) FROM customer_value_daily WHERE revenue = 0 AND purchases = 0")
        ).scalar()
    assert summary == daily and len(summary) >= 30
    assert zero_rows > 0  # invoices moved off a day or a customer left rows behind


def test_pareto_and_rfm_from_the_summary_are_the_daily_answers(loaded):
    ends = [None, dt.date(2026, 6, 1), dt.date(2026, 11, 21), dt.date(2026, 12, 31), dt.date(2027, 3, 31)]
    with loaded.ctx.engine.connect() as conn:
        for cur in ("IRR", "USD"):
            for end in ends:
                for start in (None, dt.date(2026, 2, 10)):
                    a = value.pareto(conn, cur, start, end, summary=True)
                    assert a == value.pareto(conn, cur, start, end, summary=False, work_mem=None), (cur, start, end)
                as_of = end or dt.date(2027, 4, 1)
                counts = value.rfm_counts(conn, cur, None, as_of, summary=True)
                assert counts == value.rfm_counts(conn, cur, None, as_of, summary=False, work_mem=None)
                for segment in value.SEGMENT_IDS:
                    page = value.rfm_page(conn, cur, None, as_of, segment, None, 7, summary=True)
                    assert page == value.rfm_page(conn, cur, None, as_of, segment, None, 7, summary=False)
                    if page:  # the next page after the first's last
                        after = [str(page[-1].monetary), page[-1].customer_id]
                        assert value.rfm_page(conn, cur, None, as_of, segment, after, 7, summary=True) == (
                            value.rfm_page(conn, cur, None, as_of, segment, after, 7, summary=False))  # fmt: skip
                one = value.rfm_page(conn, cur, None, as_of, None, None, 1, customer="v0", summary=True)
                assert one == value.rfm_page(conn, cur, None, as_of, None, None, 1, customer="v0", summary=False)
        # the end cuts some customers' days off: those are read from the daily rollup
        late = conn.execute(
            sa.text("SELECT count(DISTINCT customer_id) FROM customer_value_daily WHERE day > '2026-11-21'")
        ).scalar()
        assert late >= 5
        assert value.pareto(conn, "IRR", None, None)["customers"] >= 30
        assert sum(n for _, n, _ in value.rfm_counts(conn, "IRR", None, dt.date(2026, 11, 21), summary=True)) >= 20
