"""Orders over real gRPC on a fresh database: direct creation with its totals, partial and full
deliveries, over-delivery refused naming the line, cancellation rules, late deliveries with the
days late, lists with filters and keyset pages, record-level access, etags."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

import grpc
import pytest

from crm.sales.v1 import orders_pb2 as pb
from crm.sales.v1 import orders_pb2_grpc, sales_events_pb2
from crm.type.v1 import date_pb2
from crm_chassis import money
from crm_chassis.errors import read_rpc_error
from sales_svc.orders import today

from .conftest import ADMIN, events, make_team, manager, rep


@pytest.fixture(scope="module")
def stub(ch):
    return orders_pb2_grpc.OrderServiceStub(ch)


def fails(call, *args, **kw):
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kw)
    return read_rpc_error(info.value)


def d(day: dt.date) -> date_pb2.Date:
    return date_pb2.Date(year=day.year, month=day.month, day=day.day)


def ago(days: int) -> dt.date:
    return today() - dt.timedelta(days=days)


def line(qty: str, price: str, planned: dt.date | None = None, currency="IRR", **kw) -> pb.OrderLine:
    m = pb.OrderLine(
        description=kw.pop("description", "Widget"),
        quantity=qty,
        unit_price=money.to_money(Decimal(price), currency),
        **kw,
    )
    if planned:
        m.planned_delivery_date.CopyFrom(d(planned))
    return m


def new_order(stub, lines, md=ADMIN, customer="customers/c-9", order_date=None, request_id="", **kw) -> pb.Order:
    o = pb.Order(customer=customer, currency_code=kw.pop("currency", "IRR"), lines=lines, **kw)
    if order_date:
        o.order_date.CopyFrom(d(order_date))
    return stub.CreateOrder(pb.CreateOrderRequest(order=o, request_id=request_id), metadata=md)


def amount(m) -> Decimal:
    return money.to_decimal(m)


def deliver(stub, order: pb.Order, quantities: dict[int, str], day: dt.date | None = None, md=ADMIN, etag=""):
    req = pb.RecordDeliveryRequest(
        name=order.name,
        etag=etag,
        deliveries=[pb.LineDelivery(line=order.lines[i].name, quantity=q) for i, q in quantities.items()],
    )
    if day:
        req.delivery_date.CopyFrom(d(day))
    return stub.RecordDelivery(req, metadata=md)


def test_create_directly_with_lines_and_totals(svc, stub):
    o = new_order(
        stub,
        [
            line("10", "120000", ago(-5), discount_percent="5", tax_rate="10"),
            line("1", "99999", tax_rate="9", description="Installation"),
        ],
        request_id="o-once",
    )
    # 10 × 120,000 = 1,200,000, 5% = 60,000, net 1,140,000, VAT 114,000;
    # 99,999, VAT 9% = 8,999.91 -> 9,000. Subtotal 1,299,999, discount 60,000, VAT 123,000.
    assert [amount(x.net_amount) for x in o.lines] == [1_140_000, 99_999]
    assert (amount(o.subtotal), amount(o.discount_total), amount(o.tax_total), amount(o.total)) == (
        1_299_999,
        60_000,
        123_000,
        1_362_999,
    )
    assert o.state == pb.ORDER_STATE_OPEN and o.owner == "ada" and o.order_date == d(today())
    assert o.lines[0].planned_delivery_date == d(ago(-5)) and o.lines[0].delivered_quantity == "0"
    again = new_order(stub, [line("1", "1")], request_id="o-once")
    assert again.name == o.name and len(again.lines) == 2  # the first result, no second order
    placed = [e for e in events(svc, "order.placed.v1", sales_events_pb2.OrderEvent) if e.order == o.name]
    assert len(placed) == 1 and amount(placed[0].total) == 1_362_999 and len(placed[0].lines) == 2


def test_bad_input_names_each_field(svc, stub):
    err = fails(stub.CreateOrder, pb.CreateOrderRequest(order=pb.Order(currency_code="IRR")), metadata=ADMIN)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {v.field for v in err.field_violations} == {"order.lines", "order.customer"}
    err = fails(
        stub.CreateOrder,
        pb.CreateOrderRequest(
            order=pb.Order(customer="customers/c-9", currency_code="IRR", lines=[line("1", "10", currency="USD")])
        ),
        metadata=ADMIN,
    )
    assert [v.field for v in err.field_violations] == ["order.lines[0].unit_price.currency_code"]
    err = fails(
        stub.CreateOrder,
        pb.CreateOrderRequest(order=pb.Order(customer="customers/c-9", currency_code="rial", lines=[line("1", "1")])),
        metadata=ADMIN,
    )
    assert [v.field for v in err.field_violations] == ["order.currency_code"]
    err = fails(
        stub.CreateOrder,
        pb.CreateOrderRequest(
            order=pb.Order(customer="customers/c-9", currency_code="IRR", lines=[line("0", "1"), line("x", "1")])
        ),
        metadata=ADMIN,
    )
    assert [v.field for v in err.field_violations] == ["order.lines[0].quantity", "order.lines[1].quantity"]
    err = fails(new_order, stub, [line("1000000000000", "100000000")])  # 1e20 rials: more than a column holds
    assert [v.field for v in err.field_violations] == ["order.lines[0].unit_price"]
    err = fails(new_order, stub, [line("1", "1")], team=f"teams/{uuid.uuid4()}")
    assert [v.field for v in err.field_violations] == ["order.team"]
    # A request_id someone else's order was made with: ALREADY_EXISTS, their order not shown.
    new_order(stub, [line("1", "1")], md=rep("kian"), request_id="kians-order")
    err = fails(new_order, stub, [line("1", "1")], md=rep("sara"), request_id="kians-order")
    assert (err.code, err.reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_TAKEN")


def test_partial_then_full_delivery(svc, stub):
    o = new_order(stub, [line("10", "1000", ago(-3)), line("2.5", "1000", ago(-3))])
    a = deliver(stub, o, {0: "4"})
    assert a.state == pb.ORDER_STATE_PARTIALLY_DELIVERED
    assert [x.delivered_quantity for x in a.lines] == ["4", "0"]
    assert not a.lines[0].HasField("actual_delivery_date")
    b = deliver(stub, a, {0: "6", 1: "1.5"}, day=today(), etag=a.etag)
    assert b.state == pb.ORDER_STATE_PARTIALLY_DELIVERED
    assert [x.delivered_quantity for x in b.lines] == ["10", "1.5"]
    assert b.lines[0].actual_delivery_date == d(today()) and not b.lines[1].HasField("actual_delivery_date")
    assert not [e for e in events(svc, "order.delivered.v1", sales_events_pb2.OrderEvent) if e.order == o.name]
    c = deliver(stub, b, {1: "1"})
    assert c.state == pb.ORDER_STATE_DELIVERED and c.lines[1].delivered_quantity == "2.5"
    delivered = [e for e in events(svc, "order.delivered.v1", sales_events_pb2.OrderEvent) if e.order == o.name]
    assert len(delivered) == 1 and delivered[0].state == "delivered"
    err = fails(deliver, stub, c, {0: "1"})
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ORDER_CLOSED")


def test_over_delivery_is_refused_naming_the_line(svc, stub):
    o = new_order(stub, [line("5", "1000"), line("3", "1000")])
    deliver(stub, o, {1: "2"})
    err = fails(deliver, stub, o, {0: "1", 1: "2"})
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "OVER_DELIVERY")
    assert err.metadata["line"] == o.lines[1].name and err.metadata["remaining"] == "1"
    assert o.lines[1].name in err.message
    got = stub.GetOrder(pb.GetOrderRequest(name=o.name), metadata=ADMIN)
    assert [x.delivered_quantity for x in got.lines] == ["0", "2"]  # nothing of the refused call stayed
    err = fails(deliver, stub, o, {0: "1"}, etag='"1"')
    assert err.code == grpc.StatusCode.ABORTED
    err = fails(deliver, stub, o, {0: "1"}, day=today() + dt.timedelta(days=1))
    assert [v.field for v in err.field_violations] == ["delivery_date"]
    other = new_order(stub, [line("1", "1")])
    err = fails(
        stub.RecordDelivery,
        pb.RecordDeliveryRequest(name=o.name, deliveries=[pb.LineDelivery(line=other.lines[0].name, quantity="1")]),
        metadata=ADMIN,
    )
    assert [v.field for v in err.field_violations] == ["deliveries[0].line"]


def test_cancel_rules(svc, stub):
    o = new_order(stub, [line("2", "1000")])
    err = fails(stub.CancelOrder, pb.CancelOrderRequest(name=o.name), metadata=ADMIN)
    assert [v.field for v in err.field_violations] == ["reason"]
    c = stub.CancelOrder(pb.CancelOrderRequest(name=o.name, reason="customer changed their mind"), metadata=ADMIN)
    assert c.state == pb.ORDER_STATE_CANCELLED and c.cancel_reason == "customer changed their mind"
    evs = [e for e in events(svc, "order.cancelled.v1", sales_events_pb2.OrderEvent) if e.order == o.name]
    assert len(evs) == 1 and evs[0].cancel_reason == "customer changed their mind"
    err = fails(stub.CancelOrder, pb.CancelOrderRequest(name=o.name, reason="again"), metadata=ADMIN)
    assert err.reason == "ORDER_CANCELLED"
    err = fails(deliver, stub, o, {0: "1"})
    assert err.reason == "ORDER_CLOSED"

    p = new_order(stub, [line("2", "1000")])
    deliver(stub, p, {0: "1"})
    err = fails(stub.CancelOrder, pb.CancelOrderRequest(name=p.name, reason="too late"), metadata=ADMIN)
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ORDER_HAS_DELIVERIES")


def test_late_deliveries_with_days_late(svc, stub):
    owner = f"late-{uuid.uuid4().hex[:6]}"
    md = rep(owner)
    o = new_order(
        stub,
        [
            line("4", "1000", ago(10), description="undelivered, 10 days late"),
            line("4", "1000", ago(5), description="delivered 3 days late"),
            line("4", "1000", ago(-5), description="not due yet"),
            line("4", "1000", ago(8), description="delivered on time"),
            line("4", "1000", ago(6), description="half delivered, 6 days late"),
        ],
        md=md,
        order_date=ago(20),
    )
    deliver(stub, o, {3: "4"}, day=ago(9), md=md)
    deliver(stub, o, {1: "4", 4: "2"}, day=ago(2), md=md)
    cancelled = new_order(stub, [line("1", "1", ago(10))], md=md, order_date=ago(20))
    stub.CancelOrder(pb.CancelOrderRequest(name=cancelled.name, reason="dropped"), metadata=md)

    seen, token = [], ""
    while True:
        page = stub.ListLateDeliveries(
            pb.ListLateDeliveriesRequest(filter=f'owner = "{owner}"', page_size=1, page_token=token), metadata=md
        )
        seen += page.late_deliveries
        token = page.next_page_token
        if not token:
            break
    assert [(x.line.description, x.days_late, x.outstanding) for x in seen] == [
        ("undelivered, 10 days late", 10, True),
        ("half delivered, 6 days late", 6, True),
        ("delivered 3 days late", 3, False),
    ]
    assert {x.order for x in seen} == {o.name} and seen[0].order_number == o.number
    # Counted at another day: a week from now the line not yet due is 2 days late.
    later = stub.ListLateDeliveries(
        pb.ListLateDeliveriesRequest(filter=f'order = "{o.name}"', as_of=d(ago(-7))), metadata=md
    )
    assert ("not due yet", 2) in [(x.line.description, x.days_late) for x in later.late_deliveries]
    # Another rep sees none of them.
    others = stub.ListLateDeliveries(pb.ListLateDeliveriesRequest(filter=f'owner = "{owner}"'), metadata=rep("zed"))
    assert not others.late_deliveries


def test_lists_filters_pages_and_access(svc, stub):
    team = make_team(svc, f"t-{uuid.uuid4().hex[:6]}", "mina", ["omid"])
    mine = [new_order(stub, [line("1", "10")], md=rep("omid"), customer="customers/c-omid") for _ in range(3)]
    stub.CancelOrder(pb.CancelOrderRequest(name=mine[0].name, reason="x"), metadata=rep("omid"))
    err = fails(stub.GetOrder, pb.GetOrderRequest(name=mine[1].name), metadata=rep("sara"))
    assert err.code == grpc.StatusCode.NOT_FOUND
    err = fails(deliver, stub, mine[1], {0: "1"}, md=rep("sara"))
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert not stub.ListOrders(
        pb.ListOrdersRequest(filter='customer = "customers/c-omid"'), metadata=rep("sara")
    ).orders
    assert stub.GetOrder(pb.GetOrderRequest(name=mine[1].name), metadata=manager("mina")).owner == "omid"

    seen, token = [], ""
    while True:
        page = stub.ListOrders(
            pb.ListOrdersRequest(filter='customer = "customers/c-omid"', page_size=2, page_token=token),
            metadata=rep("omid"),
        )
        seen += [x.name for x in page.orders]
        token = page.next_page_token
        if not token:
            break
    assert seen == [x.name for x in reversed(mine)]
    open_ = stub.ListOrders(
        pb.ListOrdersRequest(filter=f'customer = "customers/c-omid" AND state = OPEN AND order_date >= "{today()}"'),
        metadata=rep("omid"),
    )
    assert [x.name for x in open_.orders] == [x.name for x in reversed(mine[1:])]
    by_owner = stub.ListOrders(
        pb.ListOrdersRequest(filter='owner = "omid" AND state = ORDER_STATE_CANCELLED'), metadata=manager("mina")
    )
    assert [x.name for x in by_owner.orders] == [mine[0].name]
    err = fails(stub.ListOrders, pb.ListOrdersRequest(filter="state = SHIPPED"), metadata=ADMIN)
    assert [v.field for v in err.field_violations] == ["filter"]
    # A rep may not place an order in someone else's name.
    err = fails(new_order, stub, [line("1", "1")], md=rep("omid"), owner="sara")
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    assert team
