"""Forecasts: figures against hand-computed examples (weighted, by category, omitted excluded,
won in the period as closed), Jalali quarter boundaries, currency conversion, per-product split,
access, snapshots against actual revenue, the weekly freeze, the sales cycle, bad input, HTTP.

Rows go straight into the core tables (the RPCs that write them belong to other parts). Each
test uses its own owners, so the module's one database serves them all."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from decimal import Decimal

import grpc
import pytest
import sqlalchemy as sa

from crm.sales.v1 import forecasts_pb2 as pb
from crm.sales.v1 import forecasts_pb2_grpc
from crm.sales.v1 import sales_events_pb2 as sev
from crm.type.v1 import date_pb2, money_pb2
from crm_chassis import timers
from crm_chassis.errors import read_rpc_error
from crm_chassis.money import to_decimal
from sales_svc.forecast_tables import forecast_snapshots
from sales_svc.forecasts import FREEZE_KEY, FREEZE_KIND
from sales_svc.tables import (
    invoices,
    leads,
    opportunities,
    opportunity_lines,
    pipelines,
    product_lines,
    products,
    stages,
)
from tests.support.harness import assert_problem, token, wait_for

from .conftest import ADMIN, events, make_team, manager, rep

TEHRAN = zoneinfo.ZoneInfo("Asia/Tehran")
UTC = dt.UTC


@pytest.fixture(scope="module")
def stub(ch):
    return forecasts_pb2_grpc.ForecastServiceStub(ch)


@pytest.fixture(scope="module")
def catalog(svc):
    """A pipeline with one stage, two product lines and three products."""
    with svc.ctx.engine.begin() as conn:
        pl1 = conn.execute(product_lines.insert().values(code="pl1", name="Software").returning(product_lines.c.id))
        pl1 = pl1.scalar()
        pl2 = conn.execute(
            product_lines.insert().values(code="pl2", name="Hardware").returning(product_lines.c.id)
        ).scalar()
        pids = {}
        for sku, line in (("P1", pl1), ("P2", pl1), ("P3", pl2)):
            pids[sku] = conn.execute(
                products.insert().values(sku=sku, name=f"Product {sku}", product_line_id=line).returning(products.c.id)
            ).scalar()
        pipe = conn.execute(pipelines.insert().values(name="Default").returning(pipelines.c.id)).scalar()
        stage = conn.execute(
            stages.insert().values(pipeline_id=pipe, position=0, name="Open", probability=10).returning(stages.c.id)
        ).scalar()
    return {"pipeline": pipe, "stage": stage, "pl1": pl1, "pl2": pl2, **pids}


def tehran(y, m, d, hh=12, mm=0) -> dt.datetime:
    return dt.datetime(y, m, d, hh, mm, tzinfo=TEHRAN)


def add_opp(svc, catalog, owner, amount, *, lines=(), **kw) -> str:
    """One opportunity (and its lines: (product sku or None, amount)) straight in the table."""
    values = {
        "name": "deal",
        "pipeline_id": catalog["pipeline"],
        "stage_id": catalog["stage"],
        "amount": Decimal(amount),
        "currency_code": "IRR",
        "probability": 50,
        "owner_id": owner,
        **kw,
    }
    with svc.ctx.engine.begin() as conn:
        oid = conn.execute(opportunities.insert().values(values).returning(opportunities.c.id)).scalar()
        for i, (sku, line_amount) in enumerate(lines):
            conn.execute(
                opportunity_lines.insert().values(
                    opportunity_id=oid,
                    position=i,
                    product_id=catalog[sku] if sku else None,
                    quantity=1,
                    unit_price=line_amount,
                    amount=line_amount,
                )
            )
    return oid


def add_invoice(svc, owner, total, tax, issue_date, kind="invoice", state="issued", currency="IRR"):
    with svc.ctx.engine.begin() as conn:
        conn.execute(
            invoices.insert().values(
                kind=kind,
                customer_id="c1",
                owner_id=owner,
                currency_code=currency,
                state=state,
                issue_date=issue_date,
                subtotal=Decimal(total) - Decimal(tax),
                tax_total=Decimal(tax),
                total=Decimal(total),
            )
        )


def money(m: money_pb2.Money) -> Decimal:
    return to_decimal(m)


def figures(f: pb.ForecastFigures) -> dict:
    out = {
        name: money(getattr(f, name))
        for name in (
            "open_amount",
            "weighted_amount",
            "pipeline_amount",
            "best_case_amount",
            "commit_amount",
            "closed_amount",
            "omitted_amount",
            "won_amount",
        )
    }
    out.update(open_count=f.open_count, won_count=f.won_count, omitted_count=f.omitted_count)
    return out


def bad_request(call, field: str, code=grpc.StatusCode.INVALID_ARGUMENT):
    with pytest.raises(grpc.RpcError) as err:
        call()
    view = read_rpc_error(err.value)
    assert view.code == code, view
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert field in [v.field for v in view.field_violations], view
    return view


def test_figures_against_a_hand_computed_quarter(svc, catalog, stub):
    me = "rep-hand"
    add_opp(
        svc,
        catalog,
        me,
        1_000_000,
        probability=50,
        forecast_category="pipeline",
        expected_close_date=dt.date(2026, 4, 10),
    )
    add_opp(
        svc,
        catalog,
        me,
        2_000_000,
        probability=80,
        forecast_category="commit",
        expected_close_date=dt.date(2026, 5, 15),
    )
    add_opp(
        svc,
        catalog,
        me,
        3_000_000,
        probability=30,
        forecast_category="best_case",
        expected_close_date=dt.date(2026, 6, 30),
    )
    add_opp(
        svc,
        catalog,
        me,
        5_000_000,
        probability=90,
        forecast_category="omitted",
        expected_close_date=dt.date(2026, 5, 1),
    )
    # won in the quarter: closed (whatever the close date expected)
    add_opp(
        svc,
        catalog,
        me,
        4_000_000,
        state="won",
        forecast_category="closed",
        close_time=tehran(2026, 5, 20),
        expected_close_date=dt.date(2026, 9, 1),
    )
    # 00:30 on 1 April in Tehran is still 31 March in UTC: Q2 by the Tehran day
    add_opp(svc, catalog, me, 100, state="won", forecast_category="closed", close_time=tehran(2026, 4, 1, 0, 30))
    # 23:30 on 31 March in Tehran: Q1
    add_opp(svc, catalog, me, 50, state="won", forecast_category="closed", close_time=tehran(2026, 3, 31, 23, 30))
    # none of these count in Q2
    add_opp(
        svc,
        catalog,
        me,
        7_000_000,
        state="lost",
        close_time=tehran(2026, 5, 2),
        expected_close_date=dt.date(2026, 5, 2),
    )
    add_opp(svc, catalog, me, 9_000_000, expected_close_date=dt.date(2026, 7, 1))  # next quarter
    add_opp(svc, catalog, me, 8_000_000, expected_close_date=dt.date(2026, 5, 3), delete_time=tehran(2026, 4, 1))

    f = stub.GetForecast(pb.GetForecastRequest(period="2026-Q2"), metadata=rep(me))
    assert (f.calendar, f.unit, f.group_by, f.currency_code) == ("gregorian", "quarter", "none", "IRR")
    assert [p.label for p in f.periods] == ["2026-Q2"]
    assert len(f.period_totals) == 1
    assert figures(f.period_totals[0].figures) == {
        "open_amount": 6_000_000,  # 1 + 2 + 3 million: the omitted 5 million is in no total
        "weighted_amount": 500_000 + 1_600_000 + 900_000,
        "pipeline_amount": 1_000_000,
        "best_case_amount": 3_000_000,
        "commit_amount": 2_000_000,
        "closed_amount": 4_000_100,
        "omitted_amount": 5_000_000,
        "won_amount": 4_000_100,
        "open_count": 3,
        "won_count": 2,
        "omitted_count": 1,
    }
    # two quarters by owner, from a range
    f = stub.GetForecast(
        pb.GetForecastRequest(
            calendar="gregorian", unit="quarter", start="2026-02-01", end="2026-06-30", group_by="owner"
        ),
        metadata=rep(me),
    )
    assert [p.label for p in f.periods] == ["2026-Q1", "2026-Q2"]
    rows = {(r.period, r.group): figures(r.figures) for r in f.rows}
    assert set(rows) == {("2026-Q1", me), ("2026-Q2", me)}
    assert rows["2026-Q1", me]["closed_amount"] == 50 and rows["2026-Q1", me]["open_count"] == 0
    assert rows["2026-Q2", me]["weighted_amount"] == 3_000_000
    # months: April has the 1 million and the 100 won at 00:30 on 1 April
    f = stub.GetForecast(pb.GetForecastRequest(period="2026-04"), metadata=rep(me))
    assert figures(f.period_totals[0].figures)["open_amount"] == 1_000_000
    assert figures(f.period_totals[0].figures)["won_amount"] == 100


def test_jalali_quarter_boundaries(svc, catalog, stub):
    me = "rep-jalali"
    add_opp(svc, catalog, me, 111, expected_close_date=dt.date(2026, 3, 20))  # 1404/12/29: last day of 1404-Q4
    add_opp(svc, catalog, me, 222, expected_close_date=dt.date(2026, 3, 21))  # 1405/01/01: first day of 1405-Q1
    add_opp(svc, catalog, me, 333, expected_close_date=dt.date(2026, 6, 21))  # 1405/03/31: last day of 1405-Q1
    add_opp(svc, catalog, me, 444, expected_close_date=dt.date(2026, 6, 22))  # 1405/04/01: first day of 1405-Q2
    f = stub.GetForecast(
        pb.GetForecastRequest(calendar="jalali", unit="quarter", start="2026-03-01", end="2026-07-01"), metadata=rep(me)
    )
    assert [(p.label, p.start_date.month, p.start_date.day) for p in f.periods] == [
        ("1404-Q4", 12, 22),
        ("1405-Q1", 3, 21),
        ("1405-Q2", 6, 22),
    ]
    assert f.periods[1].end_date == date_pb2.Date(year=2026, month=6, day=22)
    assert [money(t.figures.open_amount) for t in f.period_totals] == [111, 555, 444]
    # the label alone says the calendar; Jalali start and end days are read too
    one = stub.GetForecast(pb.GetForecastRequest(period="1405-Q1"), metadata=rep(me))
    assert (one.calendar, [p.label for p in one.periods]) == ("jalali", ["1405-Q1"])
    assert money(one.period_totals[0].figures.open_amount) == 555
    months = stub.GetForecast(
        pb.GetForecastRequest(calendar="jalali", unit="month", start="1405/01/01", end="1405/01/31"), metadata=rep(me)
    )
    assert [p.label for p in months.periods] == ["1405/01"]
    assert money(months.period_totals[0].figures.open_amount) == 222
    year = stub.GetForecast(pb.GetForecastRequest(period="1405"), metadata=rep(me))
    assert money(year.period_totals[0].figures.open_amount) == 222 + 333 + 444


def test_currency_conversion_with_stored_rates_and_irt(svc, catalog, stub):
    me = "rep-fx"

    def set_rate(cur, day, rate):
        return stub.SetExchangeRate(
            pb.SetExchangeRateRequest(
                exchange_rate=pb.ExchangeRate(
                    currency_code=cur, rate_date=date_pb2.Date(year=day.year, month=day.month, day=day.day), rate=rate
                )
            ),
            metadata=ADMIN,
        )

    set_rate("USD", dt.date(2027, 1, 1), "999")
    got = set_rate("USD", dt.date(2027, 1, 1), "1000000")  # the same day again: replaced
    assert (got.name, got.rate, got.reporting_currency_code) == ("exchangeRates/USD-2027-01-01", "1000000", "IRR")
    set_rate("USD", dt.date(2027, 2, 15), "1200000.5")
    add_opp(svc, catalog, me, 100, currency_code="USD", expected_close_date=dt.date(2027, 2, 10), probability=50)
    add_opp(svc, catalog, me, 10, currency_code="USD", state="won", close_time=tehran(2027, 2, 20))
    add_opp(svc, catalog, me, 500, currency_code="IRT", expected_close_date=dt.date(2027, 3, 1), probability=100)
    f = stub.GetForecast(pb.GetForecastRequest(period="2027-Q1"), metadata=rep(me))
    t = figures(f.period_totals[0].figures)
    assert t["open_amount"] == 100 * 1_000_000 + 500 * 10  # the rate of 1 Jan (on or before 10 Feb); IRT × 10
    assert t["weighted_amount"] == 50 * 1_000_000 + 5000
    assert t["won_amount"] == Decimal("12000005")  # 10 × 1,200,000.5 (the rate of 15 Feb)
    assert f.period_totals[0].figures.won_amount.currency_code == "IRR"

    listed = stub.ListExchangeRates(pb.ListExchangeRatesRequest(filter='currency_code = "USD"'), metadata=rep(me))
    assert [(x.rate_date.month, x.rate) for x in listed.exchange_rates] == [(2, "1200000.5"), (1, "1000000")]
    page = stub.ListExchangeRates(pb.ListExchangeRatesRequest(page_size=1), metadata=rep(me))
    nxt = stub.ListExchangeRates(
        pb.ListExchangeRatesRequest(page_size=1, page_token=page.next_page_token), metadata=rep(me)
    )
    assert page.exchange_rates[0].name != nxt.exchange_rates[0].name

    # no EUR rate: the forecast says so, naming the currency
    add_opp(svc, catalog, "rep-fx-eur", 10, currency_code="EUR", expected_close_date=dt.date(2027, 2, 1))
    view = bad_request(
        lambda: stub.GetForecast(pb.GetForecastRequest(period="2027-Q1"), metadata=rep("rep-fx-eur")),
        "",
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert view.reason == "EXCHANGE_RATE_MISSING" and view.metadata["currency_code"] == "EUR" and "EUR" in view.message
    # a rate dated after the opportunity does not help
    set_rate("EUR", dt.date(2027, 2, 2), "1300000")
    bad_request(
        lambda: stub.GetForecast(pb.GetForecastRequest(period="2027-Q1"), metadata=rep("rep-fx-eur")),
        "",
        grpc.StatusCode.FAILED_PRECONDITION,
    )

    # rates that need none, bad rates, a rep setting one
    bad_request(lambda: set_rate("IRT", dt.date(2027, 1, 1), "10"), "exchange_rate.currency_code")
    bad_request(lambda: set_rate("IRR", dt.date(2027, 1, 1), "1"), "exchange_rate.currency_code")
    bad_request(lambda: set_rate("usd", dt.date(2027, 1, 1), "1"), "exchange_rate.currency_code")
    for rate in ("", "abc", "-5", "0", "NaN", "1e30"):
        bad_request(lambda rate=rate: set_rate("USD", dt.date(2027, 1, 1), rate), "exchange_rate.rate")
    bad_request(
        lambda: stub.SetExchangeRate(
            pb.SetExchangeRateRequest(exchange_rate=pb.ExchangeRate(currency_code="USD", rate="1")), metadata=ADMIN
        ),
        "exchange_rate.rate_date",
    )
    bad_request(
        lambda: stub.SetExchangeRate(
            pb.SetExchangeRateRequest(
                exchange_rate=pb.ExchangeRate(
                    currency_code="USD", rate_date=date_pb2.Date(year=2027, month=1, day=1), rate="1"
                )
            ),
            metadata=rep(me),
        ),
        "",
        grpc.StatusCode.PERMISSION_DENIED,
    )


def test_per_product_split_comes_from_the_lines(svc, catalog, stub):
    me = "rep-product"
    add_opp(
        svc,
        catalog,
        me,
        1000,
        probability=50,
        expected_close_date=dt.date(2028, 5, 1),
        lines=[("P1", 600), ("P2", 400)],
    )
    add_opp(
        svc,
        catalog,
        me,
        200,
        probability=100,
        forecast_category="commit",
        expected_close_date=dt.date(2028, 5, 2),
        lines=[("P1", 200)],
    )
    add_opp(svc, catalog, me, 70, probability=10, expected_close_date=dt.date(2028, 5, 3))  # no lines
    f = stub.GetForecast(pb.GetForecastRequest(period="2028-Q2", group_by="product"), metadata=rep(me))
    rows = {r.group: (r.group_display_name, figures(r.figures)) for r in f.rows}
    p1, p2 = f"products/{catalog['P1']}", f"products/{catalog['P2']}"
    assert set(rows) == {p1, p2, ""}
    assert rows[p1][0] == "Product P1"
    assert (rows[p1][1]["open_amount"], rows[p1][1]["weighted_amount"], rows[p1][1]["open_count"]) == (800, 500, 2)
    assert rows[p1][1]["commit_amount"] == 200 and rows[p1][1]["pipeline_amount"] == 600
    assert (rows[p2][1]["open_amount"], rows[p2][1]["weighted_amount"], rows[p2][1]["open_count"]) == (400, 200, 1)
    assert (rows[""][1]["open_amount"], rows[""][1]["weighted_amount"]) == (70, 7)
    total = figures(f.period_totals[0].figures)
    assert (total["open_amount"], total["weighted_amount"], total["open_count"]) == (1270, 707, 3)  # 3 deals, not 4
    # and by product line: the opportunity's own line
    add_opp(svc, catalog, me, 5, expected_close_date=dt.date(2028, 6, 1), product_line_id=catalog["pl2"])
    f = stub.GetForecast(pb.GetForecastRequest(period="2028-Q2", group_by="product_line"), metadata=rep(me))
    rows = {r.group: (r.group_display_name, money(r.figures.open_amount)) for r in f.rows}
    assert rows == {"": ("", 1270), f"productLines/{catalog['pl2']}": ("Hardware", 5)}


def test_access_scope_of_the_forecast(svc, catalog, stub):
    add_opp(svc, catalog, "rep-a", 10, expected_close_date=dt.date(2029, 1, 5))
    add_opp(svc, catalog, "rep-b", 20, expected_close_date=dt.date(2029, 1, 6))
    team = make_team(svc, "forecast-team-a", "mgr-a", ["rep-a"])
    add_opp(svc, catalog, "rep-c", 40, expected_close_date=dt.date(2029, 1, 7), team_id=team)  # assigned to the team

    def owners(md):
        f = stub.GetForecast(pb.GetForecastRequest(period="2029-Q1", group_by="owner"), metadata=md)
        return {r.group: money(r.figures.open_amount) for r in f.rows}

    assert owners(rep("rep-a")) == {"rep-a": 10}  # not rep-b's
    assert owners(rep("rep-b")) == {"rep-b": 20}
    assert owners(manager("mgr-a")) == {"rep-a": 10, "rep-c": 40}
    assert owners(ADMIN) == {"rep-a": 10, "rep-b": 20, "rep-c": 40}
    f = stub.GetForecast(pb.GetForecastRequest(period="2029-Q1", group_by="team"), metadata=manager("mgr-a"))
    assert {(r.group, r.group_display_name): money(r.figures.open_amount) for r in f.rows} == {
        ("", ""): 10,
        (f"teams/{team}", "forecast-team-a"): 40,
    }


def test_snapshot_against_won_and_invoiced_revenue(svc, catalog, stub):
    boss, me = "mgr-snap", "rep-snap"
    make_team(svc, "forecast-team-snap", boss, [me])
    # 1406-Q1 is 2027-03-21 .. 2027-06-21
    late = add_opp(
        svc,
        catalog,
        me,
        1_000_000,
        probability=50,
        forecast_category="commit",
        expected_close_date=dt.date(2027, 4, 10),
    )
    add_opp(svc, catalog, me, 2_000_000, state="won", close_time=tehran(2027, 4, 5))
    req = pb.SubmitForecastRequest(
        period="1406-Q1",
        owner=me,
        adjusted_commit=money_pb2.Money(currency_code="IRR", units=2_500_000),
        note="the big one signs in May",
        request_id="snap-1",
    )
    snap = stub.SubmitForecast(req, metadata=manager(boss))
    assert snap.name.startswith("forecastSnapshots/") and (snap.owner, snap.submitter, snap.kind) == (
        me,
        boss,
        "submitted",
    )
    assert (snap.period.label, snap.calendar, snap.unit) == ("1406-Q1", "jalali", "quarter")
    fig = figures(snap.figures)
    assert (fig["weighted_amount"], fig["commit_amount"], fig["closed_amount"]) == (500_000, 1_000_000, 2_000_000)
    assert money(snap.adjusted_commit) == 2_500_000 and snap.note == req.note
    assert stub.SubmitForecast(req, metadata=manager(boss)).name == snap.name  # the same request: the same snapshot
    plain = stub.SubmitForecast(pb.SubmitForecastRequest(period="1406-Q1", owner=me), metadata=manager(boss))
    assert not plain.HasField("adjusted_commit")
    with svc.ctx.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).where(forecast_snapshots.c.owner_id == me)).scalar() == 2
    # each stored snapshot published forecast_snapshot.created.v1 once (not the idempotent retry)
    published = [e for e in events(svc, "forecast_snapshot.created.v1") if e.subject in (snap.name, plain.name)]
    assert [e.subject for e in published] == [snap.name, plain.name]
    first_ev = published[0].parse(sev.ForecastSnapshotEvent)
    assert (first_ev.forecast_snapshot, first_ev.period, first_ev.calendar, first_ev.unit, first_ev.owner) == (
        snap.name, "1406-Q1", "jalali", "quarter", me,
    )  # fmt: skip
    assert (first_ev.kind, first_ev.submitter, first_ev.currency_code) == ("submitted", boss, "IRR")
    assert (money(first_ev.weighted_amount), money(first_ev.commit_amount), money(first_ev.closed_amount)) == (
        500_000, 1_000_000, 2_000_000,
    )  # fmt: skip
    assert money(first_ev.adjusted_commit) == 2_500_000 and first_ev.open_count == 1 and first_ev.won_count == 1
    assert (first_ev.period_start_date.year, first_ev.period_start_date.month, first_ev.period_start_date.day) == (
        2027, 3, 21,
    )  # fmt: skip
    assert first_ev.create_time.ToDatetime(tzinfo=UTC) == snap.create_time.ToDatetime(tzinfo=UTC)
    assert not published[1].parse(sev.ForecastSnapshotEvent).HasField("adjusted_commit")

    # then: the commit wins, invoices go out, a credit note comes back; a draft does not count
    with svc.ctx.engine.begin() as conn:
        conn.execute(
            opportunities.update().where(opportunities.c.id == late).values(state="won", close_time=tehran(2027, 5, 1))
        )
    add_invoice(svc, me, 3_300_000, 300_000, dt.date(2027, 4, 20))
    add_invoice(svc, me, 550_000, 50_000, dt.date(2027, 5, 10), kind="credit_note")
    add_invoice(svc, me, 9_000_000, 0, dt.date(2027, 5, 11), state="draft")
    add_invoice(svc, me, 7_000_000, 0, dt.date(2027, 6, 22))  # 1406/04/01: the next quarter

    cmp = stub.CompareForecast(pb.CompareForecastRequest(period="1406-Q1", owner=me), metadata=manager(boss))
    assert len(cmp.comparisons) == 1
    row = cmp.comparisons[0]
    assert (row.period, row.owner) == ("1406-Q1", me)
    assert money(row.won_revenue) == 3_000_000
    assert money(row.invoiced_revenue) == 3_000_000 - 500_000  # net of tax, minus the credit note
    first, second = row.snapshots
    assert first.snapshot == snap.name
    assert money(first.weighted_forecast) == 2_500_000  # closed 2,000,000 + weighted 500,000
    assert money(first.commit_forecast) == 2_500_000  # the manager's adjusted commit
    assert money(first.weighted_error) == 500_000 and first.weighted_error_percent == 20.0
    assert money(first.commit_error) == 500_000 and first.commit_error_percent == 20.0
    assert money(second.commit_forecast) == 3_000_000  # closed + commit, unadjusted
    assert money(second.commit_error) == 0 and second.commit_error_percent == 0.0

    # who may see and submit
    listed = stub.ListForecastSnapshots(pb.ListForecastSnapshotsRequest(filter=f'owner = "{me}"'), metadata=rep(me))
    assert [s.name for s in listed.forecast_snapshots] == [plain.name, snap.name]  # newest first
    page = stub.ListForecastSnapshots(pb.ListForecastSnapshotsRequest(page_size=1), metadata=rep(me))
    assert page.next_page_token and page.forecast_snapshots[0].name == plain.name
    rest = stub.ListForecastSnapshots(
        pb.ListForecastSnapshotsRequest(page_size=1, page_token=page.next_page_token), metadata=rep(me)
    )
    assert [s.name for s in rest.forecast_snapshots] == [snap.name]
    assert (
        stub.ListForecastSnapshots(pb.ListForecastSnapshotsRequest(), metadata=rep("rep-other")).forecast_snapshots
        == []
    )
    assert stub.GetForecastSnapshot(pb.GetForecastSnapshotRequest(name=snap.name), metadata=rep(me)).name == snap.name
    bad_request(
        lambda: stub.GetForecastSnapshot(pb.GetForecastSnapshotRequest(name=snap.name), metadata=rep("rep-other")),
        "",
        grpc.StatusCode.NOT_FOUND,
    )
    assert (
        stub.CompareForecast(pb.CompareForecastRequest(period="1406-Q1"), metadata=rep("rep-other")).comparisons == []
    )
    bad_request(
        lambda: stub.SubmitForecast(pb.SubmitForecastRequest(period="1406-Q1", owner=me), metadata=rep(me)),
        "",
        grpc.StatusCode.PERMISSION_DENIED,
    )
    view = bad_request(
        lambda: stub.SubmitForecast(
            pb.SubmitForecastRequest(period="1406-Q1", owner="rep-other"), metadata=manager(boss)
        ),
        "",
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert view.metadata["field"] == "owner"
    bad_request(
        lambda: stub.SubmitForecast(
            pb.SubmitForecastRequest(
                period="1406-Q1", owner=me, adjusted_commit=money_pb2.Money(currency_code="USD", units=1)
            ),
            metadata=manager(boss),
        ),
        "adjusted_commit.currency_code",
    )
    bad_request(lambda: stub.SubmitForecast(pb.SubmitForecastRequest(owner=me), metadata=manager(boss)), "period")


def test_the_weekly_timer_freezes_the_current_and_next_period(svc, catalog, stub):
    me = "rep-weekly"
    # 1404-Q1 is 2025-03-21 .. 2025-06-21, 1404-Q2 from 2025-06-22
    add_opp(svc, catalog, me, 100, probability=40, expected_close_date=dt.date(2025, 5, 1))
    add_opp(svc, catalog, me, 200, probability=40, expected_close_date=dt.date(2025, 7, 1))
    add_opp(svc, catalog, me, 300, state="won", close_time=tehran(2025, 4, 2))
    with svc.ctx.engine.begin() as conn:
        armed = timers.get(conn, FREEZE_KIND, FREEZE_KEY)
        assert armed is not None and armed.cron == "0 18 * * wed"  # armed by the migration / at start
        assert timers.reschedule(conn, FREEZE_KIND, FREEZE_KEY, dt.datetime(2025, 6, 1, 10, tzinfo=UTC))
    svc.ctx.shared["runtime"].timers.wake()

    def frozen():
        with svc.ctx.engine.connect() as conn:
            return conn.execute(
                sa.select(forecast_snapshots)
                .where(forecast_snapshots.c.owner_id == me)
                .order_by(forecast_snapshots.c.period_start)
            ).all()

    rows = wait_for(lambda: len(frozen()) == 2 and frozen(), timeout=30, what="the weekly freeze")
    assert [(r.period, r.kind, r.submitter) for r in rows] == [
        ("1404-Q1", "weekly", "system"),
        ("1404-Q2", "weekly", "system"),
    ]
    assert (rows[0].weighted_amount, rows[0].closed_amount, rows[0].open_count) == (40, 300, 1)
    assert (rows[1].weighted_amount, rows[1].closed_amount) == (80, 0)
    # the freeze published one forecast_snapshot.created.v1 per snapshot, in its transaction
    frozen_events = {
        e.subject: e.parse(sev.ForecastSnapshotEvent)
        for e in events(svc, "forecast_snapshot.created.v1")
        if e.subject in {f"forecastSnapshots/{r.id}" for r in rows}
    }
    assert len(frozen_events) == 2
    q1 = frozen_events[f"forecastSnapshots/{rows[0].id}"]
    assert (q1.period, q1.kind, q1.submitter, q1.owner) == ("1404-Q1", "weekly", "system", me)
    assert (money(q1.weighted_amount), money(q1.closed_amount), q1.open_count) == (40, 300, 1)
    with svc.ctx.engine.connect() as conn:
        again = timers.get(conn, FREEZE_KIND, FREEZE_KEY)
    assert again.cron == "0 18 * * wed" and again.due_at > dt.datetime.now(UTC)  # the next Wednesday
    nxt = again.due_at.astimezone(TEHRAN)
    assert (nxt.weekday(), nxt.hour, nxt.minute) == (2, 18, 0)
    # the frozen figures are listed and compared like a submitted one
    cmp = stub.CompareForecast(pb.CompareForecastRequest(period="1404-Q1", owner=me), metadata=rep(me))
    assert money(cmp.comparisons[0].snapshots[0].weighted_forecast) == 340
    assert money(cmp.comparisons[0].won_revenue) == 300


def test_sales_cycle_statistics(svc, catalog, stub):
    me = "rep-cycle"

    def won_from_lead(source, created, won, line=None, amount=1):
        with svc.ctx.engine.begin() as conn:
            lid = conn.execute(
                leads.insert().values(source=source, owner_id=me, create_time=created).returning(leads.c.id)
            ).scalar()
        add_opp(
            svc,
            catalog,
            me,
            amount,
            state="won",
            close_time=won,
            lead_id=lid,
            source=source,
            product_line_id=catalog[line] if line else None,
        )

    t0 = dt.datetime(2029, 6, 1, tzinfo=UTC)
    won_from_lead("exhibition", t0, t0 + dt.timedelta(days=10), "pl1")
    won_from_lead("exhibition", t0, t0 + dt.timedelta(days=30), "pl1")
    won_from_lead("exhibition", t0, t0 + dt.timedelta(days=20), "pl2")
    won_from_lead("web", t0 + dt.timedelta(days=4), t0 + dt.timedelta(days=8), "pl2")
    won_from_lead("web", t0, dt.datetime(2030, 1, 5, tzinfo=UTC))  # won in 2030: not in 2029
    add_opp(svc, catalog, me, 1, state="won", close_time=t0)  # no lead: no cycle

    got = stub.GetSalesCycle(pb.GetSalesCycleRequest(period="2029"), metadata=rep(me))
    rows = {r.group: (r.count, r.mean_days, r.median_days, r.p90_days) for r in got.rows}
    assert rows == {"exhibition": (3, 20.0, 20.0, pytest.approx(28.0)), "web": (1, 4.0, 4.0, 4.0)}
    assert [r.group for r in got.rows] == ["exhibition", "web"]  # most wins first
    assert (got.total.count, got.total.mean_days, got.total.median_days) == (4, 16.0, 15.0)
    assert got.total.p90_days == pytest.approx(27.0)  # 20 + 0.7 × (30 − 20)
    assert (got.start_date.year, got.end_date.year) == (2029, 2030)

    by_line = stub.GetSalesCycle(pb.GetSalesCycleRequest(period="2029", group_by="product_line"), metadata=rep(me))
    rows = {r.group_display_name: (r.count, r.mean_days, r.median_days, r.p90_days) for r in by_line.rows}
    assert rows == {
        "Software": (2, 20.0, 20.0, pytest.approx(28.0)),  # 10, 30
        "Hardware": (2, 12.0, 12.0, pytest.approx(18.4)),  # 4, 20
    }
    assert stub.GetSalesCycle(pb.GetSalesCycleRequest(period="2029"), metadata=rep("rep-nobody")).total.count == 0


def test_bad_period_unit_group_by_name_the_field(stub):
    cases = [
        (pb.GetForecastRequest(period="2026-Q5"), "period"),
        (pb.GetForecastRequest(period="1405/13"), "period"),
        (pb.GetForecastRequest(period="next quarter"), "period"),
        (pb.GetForecastRequest(unit="week"), "unit"),
        (pb.GetForecastRequest(calendar="lunar"), "calendar"),
        (pb.GetForecastRequest(group_by="region"), "group_by"),
        (pb.GetForecastRequest(start="yesterday"), "start"),
        (pb.GetForecastRequest(start="2026-05-01", end="2026-04-01"), "end"),
        (pb.GetForecastRequest(end="2026-04-01"), "start"),
        (pb.GetForecastRequest(period="2026-Q1", unit="month"), "period"),
        (pb.GetForecastRequest(period="2026-Q1", calendar="jalali"), "period"),
        (pb.GetForecastRequest(unit="month", start="2000-01-01", end="2026-01-01"), "end"),
    ]
    for req, field in cases:
        bad_request(lambda req=req: stub.GetForecast(req, metadata=ADMIN), field)
    bad_request(lambda: stub.GetSalesCycle(pb.GetSalesCycleRequest(group_by="owner"), metadata=ADMIN), "group_by")
    bad_request(lambda: stub.CompareForecast(pb.CompareForecastRequest(unit="day"), metadata=ADMIN), "unit")
    bad_request(
        lambda: stub.ListForecastSnapshots(pb.ListForecastSnapshotsRequest(filter="colour = 1"), metadata=ADMIN),
        "filter",
    )
    bad_request(lambda: stub.GetForecastSnapshot(pb.GetForecastSnapshotRequest(name="x/1"), metadata=ADMIN), "name")


def test_http_route_through_the_gateway(svc, catalog):
    from crm_gateway import create_app
    from crm_gateway.clients import Clients

    me = "rep-http"
    add_opp(svc, catalog, me, 1234, probability=50, expected_close_date=dt.date(2031, 2, 1))
    app = create_app(Clients({"customer": "127.0.0.1:9", "sales": f"127.0.0.1:{svc.port}", "reporting": "127.0.0.1:9"}))
    http = app.test_client()
    auth = {"Authorization": f"Bearer {token('sales_rep', me)}"}
    resp = http.get("/v1/forecast?period=2031-Q1&group_by=owner", headers=auth)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["rows"][0]["group"] == me
    assert body["rows"][0]["figures"]["weightedAmount"] == {"currencyCode": "IRR", "units": "617"}
    assert_problem(http.get("/v1/forecast?period=2031-Q1&unit=week", headers=auth), 400, "unit")
    assert_problem(http.get("/v1/forecast:salesCycle?group_by=colour", headers=auth), 400, "group_by")
    resp = http.get("/v1/forecast:salesCycle?period=2031", headers=auth)
    assert resp.status_code == 200, resp.get_data(as_text=True)
