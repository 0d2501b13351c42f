"""Report 2, sales by segment, through the real broker and consumer: customer and order and lead
events published to customer-svc's and sales-svc's exchanges, hand-computed figures per
dimension, the Jalali month at a Tehran day boundary, an order that arrives before its customer,
a redelivered and a replayed event counted once, a cancelled order, a customer who moves city,
an erased customer's aggregates kept, lead-to-purchase figures, HTTP through the gateway, bad
input naming the field, and a rebuild that gives the same answers as live."""

from __future__ import annotations

import datetime as dt
import uuid

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import timestamp_pb2

from crm.customer.v1 import customer_events_pb2 as cev
from crm.customer.v1 import customer_pb2
from crm.reporting.v1 import reporting_service_pb2 as rs
from crm.reporting.v1 import reporting_service_pb2_grpc as rsg
from crm.reporting.v1 import sales_report_pb2 as sp
from crm.sales.v1 import sales_events_pb2 as sales
from crm.type.v1 import date_pb2, money_pb2
from crm_chassis.errors import read_rpc_error
from crm_chassis.messaging.envelope import Event, new_event
from reporting_svc.__main__ import SPEC
from reporting_svc.sales_report import median
from reporting_svc.segments import age_band
from tests.support.harness import Broker, channel, gateway_client, md, start_service, token, wait_for

from .test_rebuild import publish

UTC = dt.UTC


def ts(at: dt.datetime) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(at)
    return t


def customer(n: int, version: int, *, kind="person", gender=None, birth=None, province="", city="",
             key="customer.created.v1", erased=False, role=0) -> Event:  # fmt: skip
    """kind: the type (person or organization); role: Customer.kind (CUSTOMER_KIND_*)."""
    c = customer_pb2.Customer(
        name=f"customers/c{n}", etag=f'"{version}"', province=province, city=city, erased=erased, kind=role,
        type=customer_pb2.CUSTOMER_TYPE_PERSON if kind == "person" else customer_pb2.CUSTOMER_TYPE_ORGANIZATION,
        gender={"f": customer_pb2.GENDER_FEMALE, "m": customer_pb2.GENDER_MALE, None: 0}[gender],
        create_time=ts(dt.datetime(2026, 10, 1, tzinfo=UTC)),
    )  # fmt: skip
    if birth:
        c.birth_date.CopyFrom(date_pb2.Date(year=birth.year, month=birth.month, day=birth.day))
    cls = {
        "customer.created.v1": cev.CustomerCreated,
        "customer.updated.v1": cev.CustomerUpdated,
        "customer.erased.v1": cev.CustomerErased,
    }[key]
    return new_event(domain="customer", source_service="customer-svc", routing_key=key, subject=c.name,
                     message=cls(customer=c))  # fmt: skip


def order(n: int, cust: int, lines, *, day: dt.date | None = None, at: dt.datetime | None = None,
          state="open", currency="IRR") -> Event:  # fmt: skip
    at = at or dt.datetime.combine(day, dt.time(9), tzinfo=UTC)
    msg = sales.OrderEvent(
        order=f"orders/o{n}", customer=f"customers/c{cust}", state=state, event_time=ts(at),
        total=money_pb2.Money(currency_code=currency),
        lines=[sales.LineFact(product=f"products/{p}", product_line=f"productLines/{pl}", quantity=str(q),
                              amount=money_pb2.Money(currency_code=currency, units=u)) for p, pl, q, u in lines],
    )  # fmt: skip
    if day:
        msg.order_date.CopyFrom(date_pb2.Date(year=day.year, month=day.month, day=day.day))
    key = "order.cancelled.v1" if state == "cancelled" else "order.placed.v1"
    return new_event(domain="sales", source_service="sales-svc", routing_key=key, subject=msg.order, message=msg)


def lead(n: int, cust: int, created: dt.datetime, version: int = 2) -> Event:
    msg = sales.LeadEvent(lead=f"leads/l{n}", status="converted", customer=f"customers/c{cust}",
                          create_time=ts(created), event_time=ts(created), version=version)  # fmt: skip
    return new_event(domain="sales", source_service="sales-svc", routing_key="lead.converted.v1", subject=msg.lead,
                     message=msg)  # fmt: skip


def again(e: Event) -> Event:
    return Event(**{**e.__dict__, "id": str(uuid.uuid4())})


D = dt.date
NOV = lambda d: D(2026, 11, d)  # noqa: E731

# Phase 1: orders (c4's before c4 is known), a redelivery, a replay, a cancellation.
O1 = order(1, 1, [("p1", "l1", 2, 1_000_000), ("p2", "l1", 1, 500_000)], day=NOV(10))  # Aban 19
O2 = order(2, 1, [("p3", "l2", 1, 300_000)], at=dt.datetime(2026, 11, 21, 20, 45, tzinfo=UTC))  # Tehran 22nd 00:15
O3 = order(3, 2, [("p1", "l1", 1, 400_000)], at=dt.datetime(2026, 11, 21, 20, 15, tzinfo=UTC))  # Tehran 21st 23:45
O4 = order(4, 2, [("p2", "l1", 3, 1_500_000)], day=NOV(25))
O4_CANCEL = order(4, 2, [("p2", "l1", 3, 1_500_000)], day=NOV(25), state="cancelled",
                  at=dt.datetime(2026, 11, 26, 9, tzinfo=UTC))  # fmt: skip
O5 = order(5, 3, [("p1", "l1", 10, 400_000), ("p3", "l2", 5, 150_000)], day=NOV(25), currency="IRT")  # tomans
O6 = order(6, 4, [("p3", "l2", 2, 600_000)], day=NOV(26))
O7 = order(7, 5, [("p2", "l1", 1, 200_000)], day=NOV(12))
O8 = order(8, 1, [("p1", "l1", 1, 100)], day=NOV(25), currency="USD")
O9 = order(9, 2, [("p3", "l2", 1, 350_000)], day=NOV(28))
PHASE1 = [O1, O1, O2, O3, again(O3), O4, O4_CANCEL, again(O4), O5, O6, O7, O8, O9,
          lead(1, 1, dt.datetime(2026, 11, 1, 10, tzinfo=UTC)),
          lead(2, 2, dt.datetime(2026, 11, 21, 19, tzinfo=UTC)),  # Tehran 22:30 on the 21st: 0 days
          lead(3, 4, dt.datetime(2026, 10, 1, 10, tzinfo=UTC)),
          lead(4, 4, dt.datetime(2026, 11, 20, 10, tzinfo=UTC)),  # a later lead: the first one counts
          lead(5, 5, dt.datetime(2026, 11, 11, 10, tzinfo=UTC))]  # fmt: skip
# Phase 2: the customers (c2 moves city later, c5 is erased), published after phase 1 is applied.
PHASE2 = [
    customer(1, 1, gender="f", birth=D(1990, 6, 15), province="Tehran", city="Tehran"),
    customer(2, 1, gender="m", birth=D(2001, 11, 22), province="Isfahan", city="Isfahan"),
    customer(3, 1, kind="organization", province="Fars", city="Shiraz", role=customer_pb2.CUSTOMER_KIND_INTERMEDIARY),
    customer(5, 1, gender="m", birth=D(1985, 1, 1), province="Tehran", city="Tehran"),
]
PHASE3 = [
    customer(4, 1, gender="f", birth=D(1970, 3, 1), province="Tehran", city="Tehran"),
    customer(
        2,
        2,
        gender="m",
        birth=D(2001, 11, 22),
        province="Isfahan",
        city="Kashan",
        key="customer.updated.v1",
        role=customer_pb2.CUSTOMER_KIND_END_CONSUMER,
    ),
    customer(5, 2, province="Tehran", city="Tehran", key="customer.erased.v1", erased=True),
    customer(2, 1, gender="m", birth=D(2001, 11, 22), province="Isfahan", city="Isfahan"),  # older, again: ignored
]


@pytest.fixture(scope="module")
def own_broker():
    b = Broker()
    yield b
    b.close()


@pytest.fixture(scope="module")
def live(databases, own_broker):
    service = start_service(SPEC, databases.fresh("rep_sales_segments"), own_broker.url)
    assert service.consumer.ready.wait(10)
    yield service
    service.stop(0)


def handled(live) -> int:
    with live.ctx.engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(DISTINCT event_id) FROM inbox")).scalar()


def distinct(events) -> int:
    return len({e.id for e in events})


@pytest.fixture(scope="module")
def stub(live, own_broker):
    publish(own_broker.url, PHASE1)
    wait_for(lambda: handled(live) == distinct(PHASE1), 20, "phase 1 applied")
    with channel(live) as ch:
        s = rsg.ReportingServiceStub(ch)
        # before its customer is known, c4's order counts under "unknown"
        first = {r.gender: r.orders for r in get(s, dimensions=["gender"]).rows}
        assert first == {"unknown": 7}
        publish(own_broker.url, PHASE2)
        wait_for(lambda: handled(live) == distinct(PHASE1 + PHASE2), 20, "phase 2 applied")
        publish(own_broker.url, PHASE3)
        wait_for(lambda: handled(live) == distinct(PHASE1 + PHASE2 + PHASE3), 20, "phase 3 applied")
        yield s


def get(stub, **kw) -> sp.GetSalesReportResponse:
    return stub.GetSalesReport(sp.GetSalesReportRequest(**kw), metadata=md("analyst"))


def figures(r) -> tuple:
    return (r.orders, r.customers, r.quantity, r.revenue.units)


def test_totals_and_currency(stub):
    resp = get(stub)
    assert resp.currency_code == "IRR" and len(resp.rows) == 1
    assert figures(resp.total) == (7, 5, "24", 8_850_000)  # o4 cancelled, o8 in dollars, o5 tomans as rials
    assert resp.total.average_order_value.units == 1_264_286  # 8,850,000 / 7, to whole rials
    usd = get(stub, currency_code="usd")
    assert figures(usd.total) == (1, 1, "1", 100) and usd.currency_code == "USD"


def test_per_customer_dimension(stub):
    def by(dim):
        return {getattr(r, dim): figures(r) for r in get(stub, dimensions=[dim]).rows}

    assert by("gender") == {  # c4's order moved from unknown; the erased c5's stays male
        "female": (3, 2, "6", 2_400_000),
        "male": (3, 2, "3", 950_000),
        "unknown": (1, 1, "15", 5_500_000),
    }
    assert by("age_band") == {  # on the order's day: c2 is 24 on 21 Nov, 25 on the 28th
        "35-44": (3, 2, "5", 2_000_000),
        "18-24": (1, 1, "1", 400_000),
        "25-34": (1, 1, "1", 350_000),
        "55-64": (1, 1, "2", 600_000),
        "unknown": (1, 1, "15", 5_500_000),
    }
    assert by("city") == {  # c2 moved to Kashan: its past sales moved with it
        "Tehran": (4, 3, "7", 2_600_000),
        "Kashan": (2, 1, "2", 750_000),
        "Shiraz": (1, 1, "15", 5_500_000),
    }
    assert by("province") == {
        "Tehran": (4, 3, "7", 2_600_000),
        "Isfahan": (2, 1, "2", 750_000),
        "Fars": (1, 1, "15", 5_500_000),
    }
    assert by("customer_type") == {"person": (6, 4, "9", 3_350_000), "organization": (1, 1, "15", 5_500_000)}
    # Customer.kind: c2 became an end consumer in its update (its past sales moved with it)
    assert by("customer_kind") == {
        "unknown": (4, 3, "7", 2_600_000),
        "end_consumer": (2, 1, "2", 750_000),
        "intermediary": (1, 1, "15", 5_500_000),
    }
    fa = get(stub, dimensions=["gender", "customer_type", "customer_kind"], language_code="fa")
    labels = {(r.gender_label, r.customer_type_label, r.customer_kind_label) for r in fa.rows}
    assert labels == {
        ("زن", "حقیقی", "نامشخص"),
        ("مرد", "حقیقی", "نامشخص"),
        ("مرد", "حقیقی", "مصرف‌کننده نهایی"),
        ("نامشخص", "حقوقی", "واسطه"),
    }


def test_per_product_and_line_an_order_counts_once(stub):
    rows = {r.product: figures(r) for r in get(stub, dimensions=["product"]).rows}
    assert rows == {
        "products/p1": (3, 3, "13", 5_400_000),
        "products/p2": (2, 2, "2", 700_000),
        "products/p3": (4, 4, "9", 2_750_000),
    }
    lines = {r.product_line: figures(r) for r in get(stub, dimensions=["product_line"]).rows}
    # o1 has two lines of l1: one order
    assert lines == {"productLines/l1": (4, 4, "15", 6_100_000), "productLines/l2": (4, 4, "9", 2_750_000)}
    both = get(stub, dimensions=["product_line", "gender"])
    assert {(r.product_line, r.gender): r.orders for r in both.rows}[("productLines/l1", "female")] == 1


def test_jalali_months_at_the_tehran_day_boundary(stub):
    months = get(stub, period="month", calendar="jalali")
    assert [(r.period_key, r.period_label, *figures(r)) for r in months.rows] == [
        ("1405-08", "Aban 1405", 3, 3, "5", 2_100_000),  # o1, o3 (20:15 UTC on 21 Nov), o7
        ("1405-09", "Azar 1405", 4, 4, "19", 6_750_000),  # o2 (20:45 UTC on 21 Nov: Tehran's 22nd)
    ]
    assert months.total.customers == 5  # c1 and c2 bought in both months: distinct over the range
    days = {r.period_key: r.orders for r in get(stub, period="day", calendar="jalali").rows}
    assert days["1405-08-30"] == 1 and days["1405-09-01"] == 1
    fa = get(stub, period="month", calendar="jalali", language_code="fa", start_date=date(2026, 11, 22))
    assert [r.period_label for r in fa.rows] == ["آذر ۱۴۰۵"] and fa.total.orders == 4


def date(y, m, d) -> date_pb2.Date:
    return date_pb2.Date(year=y, month=m, day=d)


def test_lead_to_purchase(stub):
    resp = get(stub)
    t = resp.lead_to_purchase_total
    # c1 9 days, c2 0 (lead 22:30 Tehran on the day of its order), c4 56 (its first lead), c5 1
    assert (t.customers, t.average_days, t.median_days) == (4, 16.5, 5.0)
    assert [(b.label, b.customers) for b in t.buckets] == [
        ("0", 1), ("1-7", 1), ("8-30", 1), ("31-90", 1), ("91-180", 0), ("181-365", 0), ("366+", 0)
    ]  # fmt: skip
    months = get(stub, period="month", calendar="jalali", dimensions=["gender", "product"])
    rows = {(r.period_key, r.gender): (r.customers, round(r.average_days, 4), r.median_days)
            for r in months.lead_to_purchase}  # fmt: skip
    assert rows == {("1405-08", "female"): (1, 9.0, 9.0), ("1405-08", "male"): (2, 0.5, 0.5),
                    ("1405-09", "female"): (1, 56.0, 56.0)}  # fmt: skip


def test_empty_period_is_an_empty_answer(stub):
    resp = get(stub, start_date=date(2030, 1, 1), period="month", dimensions=["city"])
    assert list(resp.rows) == [] and not resp.HasField("total") and list(resp.lead_to_purchase) == []


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"dimensions": ["city", "colour"]}, "dimensions[1]"),
        ({"period": "decade"}, "period"),
        ({"calendar": "lunar"}, "calendar"),
        ({"currency_code": "rial"}, "currency_code"),
        ({"start_date": date(2026, 11, 2), "end_date": date(2026, 11, 1)}, "end_date"),
        ({"start_date": date(2026, 2, 30)}, "start_date"),
    ],
)
def test_bad_input_names_the_field(stub, kw, field):
    with pytest.raises(grpc.RpcError) as info:
        get(stub, **kw)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert read_rpc_error(info.value).field_violations[0].field == field


def test_export_csv_and_xlsx(stub):
    def export(**kw):
        req = sp.ExportSalesReportRequest(**kw)
        return list(stub.ExportSalesReport(req, metadata=md()))

    chunks = export(period="month", calendar="jalali", dimensions=["gender"], language_code="fa", format="csv")
    lines = b"".join(c.data for c in chunks).decode("utf-8-sig").strip().splitlines()
    assert lines[0] == "دوره,جنسیت,سفارش‌ها,مشتریان,تعداد,درآمد,میانگین ارزش سفارش"
    assert len(lines) == 1 + len(get(stub, period="month", calendar="jalali", dimensions=["gender"]).rows)
    assert chunks[0].filename.endswith(".csv") and chunks[0].row_count == len(lines) - 1
    lead_csv = export(table="lead_to_purchase", format="csv")
    text = b"".join(c.data for c in lead_csv).decode("utf-8-sig").splitlines()
    assert text[0].startswith("Period,Customers,Average days to purchase,Median days to purchase,days 0")
    assert text[1] == "All,4,16.5,5.0,1,1,1,1,0,0,0"
    xlsx = export(format="xlsx", dimensions=["product"])
    assert xlsx[0].content_type.endswith("spreadsheetml.sheet") and xlsx[0].row_count == 3
    for kw, field in (({"format": "pdfx"}, "format"), ({"format": "csv", "table": "x"}, "table")):
        with pytest.raises(grpc.RpcError) as info:
            export(**kw)
        assert read_rpc_error(info.value).field_violations[0].field == field


def test_http_through_the_gateway(stub, live):
    client, clients = gateway_client(reporting=f"127.0.0.1:{live.port}")
    try:
        auth = {"Authorization": f"Bearer {token('analyst')}"}
        r = client.get("/v1/reports/sales?period=month&calendar=jalali&dimensions=city&start_date=2026-11-22",
                       headers=auth)  # fmt: skip
        assert r.status_code == 200, r.data
        body = r.get_json()
        assert {(x["periodKey"], x["city"], x["orders"]) for x in body["rows"]} == {
            ("1405-09", "Tehran", "2"), ("1405-09", "Kashan", "1"), ("1405-09", "Shiraz", "1")
        }  # fmt: skip
        assert body["total"]["revenue"]["units"] == "6750000"
        r = client.get("/v1/reports/sales:export?format=csv&dimensions=gender", headers={**auth, "Accept": "text/csv"})
        assert r.status_code == 200 and r.mimetype == "text/csv", r.data
        assert r.data.decode("utf-8-sig").splitlines()[0].startswith("Period,Gender,Orders")
        r = client.get("/v1/reports/sales?dimensions=colour", headers=auth)
        assert r.status_code == 400 and "dimensions[0]" in r.get_data(as_text=True)
    finally:
        clients.close()


def test_age_bands_and_median():
    assert age_band(D(2001, 11, 22), NOV(21)) == "18-24" and age_band(D(2001, 11, 22), NOV(22)) == "25-34"
    assert age_band(D(2010, 1, 1), NOV(1)) == "0-17" and age_band(D(1950, 1, 1), NOV(1)) == "65+"
    assert age_band(None, NOV(1)) == "unknown"
    assert median({3: 1}) == 3 and median({0: 1, 1: 1, 9: 1, 56: 1}) == 5 and median({2: 2, 7: 1}) == 2


def merged(survivor: Event, *names: str) -> Event:
    c = survivor.parse(cev.CustomerCreated).customer
    msg = cev.CustomerMerged(survivor=c, merged=list(names), merge="merges/m1")
    return new_event(domain="customer", source_service="customer-svc", routing_key="customer.merged.v1",
                     subject=c.name, message=msg)  # fmt: skip


def test_a_merge_moves_orders_and_the_first_lead_to_the_survivor(stub, live, own_broker):
    events = [
        customer(6, 1, gender="f", birth=D(1980, 5, 5), province="Razavi Khorasan", city="Mashhad"),
        customer(7, 1),  # the duplicate: nothing known
        order(10, 7, [("p1", "l1", 1, 100_000)], day=NOV(27)),
        lead(7, 7, dt.datetime(2026, 11, 20, 10, tzinfo=UTC)),
    ]
    total = distinct(PHASE1 + PHASE2 + PHASE3)
    publish(own_broker.url, events)
    wait_for(lambda: handled(live) == total + 4, 20, "the duplicate's events")
    assert {r.city: r.orders for r in get(stub, dimensions=["city"]).rows}["unknown"] == 1
    survivor = customer(6, 2, gender="f", birth=D(1980, 5, 5), province="Razavi Khorasan", city="Mashhad")
    publish(own_broker.url, [merged(survivor, "customers/c7")])
    wait_for(lambda: handled(live) == total + 5, 20, "the merge")
    late = order(11, 7, [("p2", "l1", 2, 50_000)], day=NOV(29))  # names the merged customer
    publish(own_broker.url, [late])
    wait_for(lambda: handled(live) == total + 6, 20, "the late order")
    cities = {r.city: figures(r) for r in get(stub, dimensions=["city"]).rows}
    assert "unknown" not in cities and cities["Mashhad"] == (2, 1, "3", 150_000)
    assert get(stub).total.customers == 6
    t = get(stub, dimensions=["city"]).lead_to_purchase
    assert [(r.customers, r.average_days) for r in t if r.city == "Mashhad"] == [(1, 7.0)]  # 20 Nov -> 27 Nov


def answers(stub):
    return [
        get(stub),
        get(stub, dimensions=["gender", "age_band", "city"]),
        get(stub, dimensions=["product"], period="month", calendar="jalali"),
        get(stub, dimensions=["product_line", "customer_type", "customer_kind"], period="week"),
        get(stub, dimensions=["province"], period="day", currency_code="USD"),
    ]


def test_consumer_batches_give_the_same_answers_as_one_by_one(databases, broker):
    """The consumer's batches (projection.apply_events: runs of customer events set-based, the
    rest one by one in order), shuffled with replays, against one by one in publishing order;
    without the erasure, whose effect depends on what arrived before it."""
    import random

    from .conftest import Feed

    survivor = customer(6, 2, gender="f", birth=D(1980, 5, 5), province="Razavi Khorasan", city="Mashhad")
    todo = [e for e in PHASE1 + PHASE2 + PHASE3 if e.routing_key != "customer.erased.v1"]
    todo += [customer(6, 1, gender="f", birth=D(1980, 5, 5), province="Razavi Khorasan", city="Mashhad"),
             customer(7, 1), order(10, 7, [("p1", "l1", 1, 100_000)], day=NOV(27)),
             lead(7, 7, dt.datetime(2026, 11, 20, 10, tzinfo=UTC)), merged(survivor, "customers/c7"),
             order(11, 7, [("p2", "l1", 2, 50_000)], day=NOV(29))]  # fmt: skip
    one = start_service(SPEC, databases.fresh("rep_sales_one"), broker.url, consumers=False)
    many = start_service(SPEC, databases.fresh("rep_sales_many"), broker.url, consumers=False)
    try:
        Feed(one).deliver(*todo)
        shuffled = todo[:-6] + [again(e) for e in todo[:-6:3]]
        random.Random(12).shuffle(shuffled)
        feed = Feed(many)
        for i in range(0, len(shuffled), 9):
            feed.deliver_batch(*shuffled[i : i + 9])
        feed.deliver_batch(*todo[-6:-1])  # the duplicate, its merge; then the late order alone
        feed.deliver_batch(todo[-1])
        with channel(one) as a, channel(many) as b:
            first, second = answers(rsg.ReportingServiceStub(a)), answers(rsg.ReportingServiceStub(b))
        assert first[0].total.orders == 9 and first[0].lead_to_purchase_total.customers == 5
        assert first == second
    finally:
        one.stop(0)
        many.stop(0)


def test_rebuild_gives_the_same_answers(stub, live):
    before = answers(stub)
    with live.ctx.engine.begin() as conn:  # damage the live tables: only a real swap repairs them
        conn.execute(sa.text("UPDATE sales_daily SET revenue = revenue * 3"))
        conn.execute(sa.text("DELETE FROM sales_buyers_daily"))
        conn.execute(sa.text("DELETE FROM lead_purchase_daily"))
        conn.execute(sa.text("UPDATE customer_demo_facts SET city = 'nowhere'"))
    assert answers(stub) != before
    job = stub.RebuildProjections(rs.RebuildProjectionsRequest(request_id="sales1"), metadata=md())

    def finished():
        j = stub.GetProjectionRebuild(rs.GetProjectionRebuildRequest(name=job.name), metadata=md())
        return j if j.state in ("succeeded", "failed", "cancelled") else None

    done = wait_for(finished, 30, "the rebuild")
    assert (done.state, done.error) == ("succeeded", "")
    assert answers(stub) == before
    with live.ctx.engine.connect() as conn:  # the erased customer's personal values are gone there too
        row = conn.execute(
            sa.text("SELECT birth_date, gender, erased FROM customer_demo_facts WHERE customer_id = 'c5'")
        )
        assert tuple(row.one()) == (None, "unknown", True)
        frozen = conn.execute(sa.text("SELECT age_band, gender, frozen FROM sales_order_facts WHERE order_id = 'o7'"))
        assert tuple(frozen.one()) == (None, None, True)
