"""Report 7, Customer 360: hand-built events of every service about two customers, delivered one
by one, in mixed consumer batches and again; the timeline newest first in keyset pages, filtered
by kind and source; a merge moves the merged customer's past and later events to the survivor,
an unmerge moves them back; bad input names its field; the gateway route."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest

from crm.campaign.v1 import campaign_events_pb2 as cev
from crm.customer.v1 import customer_events_pb2 as cust
from crm.customer.v1 import customer_pb2, resources_pb2
from crm.reporting.v1 import reporting_service_pb2 as rs
from crm.reporting.v1 import reporting_service_pb2_grpc as rsg
from crm.sales.v1 import sales_events_pb2 as sev
from crm.support.v1 import support_events_pb2 as tev
from crm.type.v1 import money_pb2
from crm_chassis.errors import read_rpc_error
from tests.support.harness import channel, gateway_client, md, token

from .conftest import Feed

T0 = dt.datetime(2026, 11, 1, 8, 0, tzinfo=dt.UTC)
C1, C2 = "customers/c1", "customers/c2"


def at(i: int) -> dt.datetime:
    return T0 + dt.timedelta(hours=i)


def customer(name: str, i: int):
    c = customer_pb2.Customer(name=name, acquisition_source="website", etag='"1"')
    c.create_time.FromDatetime(at(i))
    return Feed.event("customer", "customer.created.v1", cust.CustomerCreated(customer=c), name, at(i))


def ts(t: dt.datetime):
    from google.protobuf import timestamp_pb2

    out = timestamp_pb2.Timestamp()
    out.FromDatetime(t)
    return out


def irr(units: int):
    return money_pb2.Money(currency_code="IRR", units=units)


def life(who: str, start: int) -> list:
    """One of everything about `who`, an hour apart from `start`; the kinds in that order."""
    n = who.rsplit("/", 1)[1]
    e = Feed.event
    return [
        customer(who, start),
        e("customer", "note.added.v1",
          cust.NoteAdded(customer=who, note=resources_pb2.Note(name=f"{who}/notes/1", text="Wants a call back\nsoon")),
          who, at(start + 1)),
        e("sales", "lead.created.v1",
          sev.LeadEvent(lead=f"leads/{n}", customer=who, status="new", source="website", version=1,
                           create_time=ts(at(start + 2))), "", at(start + 2)),
        e("sales", "opportunity.won.v1",
          sev.OpportunityEvent(opportunity=f"opportunities/{n}", name="Big deal", customer=who, state="won",
                               amount=irr(5_000_000), version=3), "", at(start + 3)),
        e("sales", "order.placed.v1", sev.OrderEvent(order=f"orders/{n}", number="SO-1", customer=who, total=irr(5_000_000)),
          "", at(start + 4)),
        e("sales", "invoice.paid.v1",
          sev.InvoiceEvent(invoice=f"invoices/{n}", number="INV-1", customer=who, state="paid", total=irr(5_000_000)),
          "", at(start + 5)),
        e("support", "ticket.opened.v1",
          tev.TicketEvent(ticket=f"tickets/{n}", number="T-1", customer=who, complaint=True, version=1,
                            create_time=ts(at(start + 6))), "", at(start + 6)),
        e("support", "call.logged.v1",
          tev.CallEvent(call=f"calls/{n}", customer=who, direction="inbound", outcome="answered", version=1,
                          start_time=ts(at(start + 7))), "",
          at(start + 7)),
        e("support", "survey.answered.v1",
          tev.SurveyEvent(survey=f"surveys/{n}", customer=who, kind="csat", csat=4, answer_time=ts(at(start + 8))), "", at(start + 8)),
        e("campaign", "message.sent.v1",
          cev.MessageEvent(message=f"messages/{n}", campaign="campaigns/x", customer=who, channel="email"), "",
          at(start + 9)),
        e("campaign", "message.clicked.v1",
          cev.MessageEvent(message=f"messages/{n}", campaign="campaigns/x", customer=who, channel="email",
                           url="https://example.com/offer"), "", at(start + 10)),
        e("campaign", "response.recorded.v1",
          cev.ResponseEvent(response=f"responses/{n}", campaign="campaigns/x", customer=who, kind="form"), "",
          at(start + 11)),
        e("campaign", "points.earned.v1",
          cev.PointsEvent(entry=f"entries/{n}", account=f"accounts/{n}", customer=who, kind="earn", points=120,
                          balance=120), "", at(start + 12)),
        e("campaign", "tier.changed.v1",
          cev.TierEvent(account=f"accounts/{n}", customer=who, previous_tier="bronze", tier="silver", direction="up"),
          "", at(start + 13)),
    ]  # fmt: skip


KINDS = [
    "customer.created", "note.added", "lead.created", "opportunity.won", "order.placed", "invoice.paid",
    "ticket.opened", "call.logged", "survey.answered", "message.sent", "message.clicked", "response.recorded",
    "points.earned", "tier.changed",
]  # fmt: skip


@pytest.fixture(scope="module")
def stub(svc, feed):
    one, two = life(C1, 0), life(C2, 100)
    feed.deliver(*one[:7])
    assert feed.deliver_batch(*one[7:], one[0], one[3]) == 7  # the redelivered two: the inbox drops them
    assert feed.deliver_batch(*two) == len(two)  # one batch mixing every producer's keys
    # an event applied twice past the inbox (a replay keeps its id): the unique event id holds
    with svc.ctx.engine.begin() as conn:
        feed.handlers[("sales", "order.placed.v1")](conn, one[4])
    with channel(svc) as ch:
        yield rsg.ReportingServiceStub(ch)


def timeline(stub, customer=C1, **kw) -> rs.GetCustomerTimelineResponse:
    return stub.GetCustomerTimeline(rs.GetCustomerTimelineRequest(customer=customer, **kw), metadata=md("analyst"))


def all_pages(stub, customer=C1, size=4, **kw) -> list:
    out, token_ = [], ""
    for _ in range(20):
        page = timeline(stub, customer, page_size=size, page_token=token_, **kw)
        assert len(page.entries) <= size
        out += page.entries
        token_ = page.next_page_token
        if not token_:
            return out
    raise AssertionError("pages never ended")


def test_every_service_newest_first_in_keyset_pages(stub):
    entries = all_pages(stub)
    assert [e.kind for e in entries] == KINDS[::-1]  # each once, newest first
    assert [e.source for e in entries][:5] == ["campaign"] * 5
    assert entries[0].occur_time.ToDatetime(tzinfo=dt.UTC) == at(13)
    order = {e.kind: e for e in entries}
    assert order["order.placed"].ref == "orders/c1" and order["order.placed"].title == "Order SO-1 placed: 5000000 IRR"
    assert order["invoice.paid"].detail["total"]["units"] == "5000000"
    assert order["ticket.opened"].title == "Ticket T-1 opened (complaint)"
    assert order["note.added"].title == "Note: Wants a call back"
    assert order["tier.changed"].title == "Tier up: bronze → silver"
    assert order["points.earned"].detail["points"] == "120"
    assert all(e.origin_customer == C1 for e in entries)


def test_titles_in_persian_from_the_same_entries(stub):
    """language_code fa: every entry's title in Persian with Persian digits, made from its kind and
    figures; the same entries, refs and details as in English; an export in Persian too."""
    en, fa = all_pages(stub), all_pages(stub, language_code="fa")
    assert [(e.kind, e.ref, e.detail) for e in fa] == [(e.kind, e.ref, e.detail) for e in en]
    titles = {e.kind: e.title for e in fa}
    assert titles["order.placed"] == "سفارش SO-۱ ثبت شد: ۵٬۰۰۰٬۰۰۰ IRR"
    assert titles["opportunity.won"] == "فرصت Big deal به فروش رسید: ۵٬۰۰۰٬۰۰۰ IRR"
    assert titles["ticket.opened"] == "درخواست T-۱ باز شد (شکایت)"
    assert titles["note.added"] == "یادداشت: Wants a call back"
    assert titles["tier.changed"] == "سطح ارتقا: bronze ← silver"
    assert titles["points.earned"] == "۱۲۰ امتیاز کسب شد، مانده ۱۲۰"
    assert titles["call.logged"] == "تماس ورودی، پاسخ داده شد"
    assert titles["survey.answered"] == "نظرسنجی پاسخ داده شد: رضایت ۴ از ۵"
    assert titles["message.clicked"] == "پیام کمپین (ایمیل) کلیک شد: https://example.com/offer"
    assert titles["lead.created"] == "سرنخ ساخته شد (website)"
    assert titles["customer.created"] == "پرونده مشتری ساخته شد"
    for kind, title in titles.items():  # no English word left but names, codes and links
        words = [w for w in title.split() if "://" not in w for w in [w.strip(":()،")] if w.isascii() and w.isalpha()]
        assert set(words) <= {"IRR", "Big", "deal", "Wants", "a", "call", "back", "bronze", "silver", "website"}, kind
    req = rs.ExportCustomerTimelineRequest(customer=C1, format="csv", language_code="fa")
    text = b"".join(c.data for c in stub.ExportCustomerTimeline(req, metadata=md("analyst"))).decode("utf-8-sig")
    assert "سفارش SO-۱ ثبت شد" in text and "Order SO-1 placed" not in text


def test_kinds_and_sources_filter(stub):
    entries = all_pages(stub, kinds=["support", "points.earned.v1"], size=2)
    assert [e.kind for e in entries] == ["points.earned", "survey.answered", "call.logged", "ticket.opened"]


def test_a_customer_without_events_is_empty(stub):
    assert timeline(stub, "customers/nobody") == rs.GetCustomerTimelineResponse()


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"customer": "leads/1"}, "customer"),
        ({"customer": "customers/"}, "customer"),
        ({"customer": "customers/x:y"}, "customer"),
        ({"customer": "customers/" + "س" * 3000}, "customer"),
        ({"customer": "customers/a/b"}, "customer"),
        ({"customer": C1, "kinds": ["ticket.exploded"]}, "kinds[0]"),
        ({"customer": C1, "page_size": -1}, "page_size"),
        ({"customer": C1, "page_token": "not-a-token"}, "page_token"),
    ],
)
def test_bad_input_names_the_field(stub, kw, field):
    with pytest.raises(grpc.RpcError) as err:
        stub.GetCustomerTimeline(rs.GetCustomerTimelineRequest(**kw), metadata=md("analyst"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in read_rpc_error(err.value).field_violations] == [field]


def test_a_token_of_another_filter_is_refused(stub):
    first = timeline(stub, page_size=2)
    with pytest.raises(grpc.RpcError) as err:
        timeline(stub, page_size=2, page_token=first.next_page_token, kinds=["sales"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_gateway_route(svc, stub):
    client, clients = gateway_client(reporting=f"127.0.0.1:{svc.port}")
    try:
        r = client.get(
            "/v1/customers/c1/timeline?page_size=3&kinds=sales", headers={"Authorization": f"Bearer {token('analyst')}"}
        )
        assert r.status_code == 200, r.data
        body = r.get_json()
        assert [e["kind"] for e in body["entries"]] == ["invoice.paid", "order.placed", "opportunity.won"]
        assert body["nextPageToken"]
    finally:
        clients.close()


def test_a_merge_moves_the_merged_customers_timeline_to_the_survivor_and_an_unmerge_back(svc, feed, stub):
    survivor = customer_pb2.Customer(name=C1)
    survivor.create_time.FromDatetime(at(0))
    merge = Feed.event(
        "customer", "customer.merged.v1", cust.CustomerMerged(survivor=survivor, merged=[C2], merge="merges/m1"), C1,
        at(200),
    )  # fmt: skip
    late = Feed.event(
        "sales", "order.placed.v1", sev.OrderEvent(order="orders/late", number="SO-9", customer=C2), "", at(201)
    )
    feed.deliver(merge)
    feed.deliver_batch(late)
    entries = all_pages(stub, size=10)
    assert len(entries) == 2 * len(KINDS) + 2
    assert [(e.kind, e.origin_customer) for e in entries[:2]] == [("order.placed", C2), ("customer.merged", C1)]
    assert all_pages(stub, C2, size=50) == entries  # asking for the merged one: the survivor's timeline
    assert {e.origin_customer for e in entries} == {C1, C2}

    restored = customer_pb2.Customer(name=C2)
    restored.create_time.FromDatetime(at(100))
    feed.deliver(
        Feed.event("customer", "customer.unmerged.v1",
                   cust.CustomerUnmerged(survivor=survivor, restored=[restored], merge="merges/m1"), C1, at(300))
    )  # fmt: skip
    mine = all_pages(stub, C2, size=50)
    assert [e.kind for e in mine] == ["order.placed", *KINDS[::-1]] and {e.origin_customer for e in mine} == {C2}
    assert len(all_pages(stub, C1, size=50)) == len(KINDS) + 1  # its own and the merge


def test_an_entrys_detail_is_the_named_fields_as_json_format_makes_them():
    """_detail converts only the named fields: the same JSON as json_format over the whole
    message (enums by name, int64 as text, Money and dates as objects, lists), set fields only."""
    from google.protobuf import json_format

    from crm.customer.v1 import customer_events_pb2 as cust
    from crm.sales.v1 import sales_events_pb2 as sev
    from crm.support.v1 import support_events_pb2 as tev
    from crm.type.v1 import money_pb2
    from reporting_svc.timeline import _detail

    ticket = tev.TicketEvent(number="T-1", channel=2, complaint=True, priority=3, team="teams/a", version=7)
    ticket.create_time.GetCurrentTime()
    invoice = sev.InvoiceEvent(number="INV-9", state="paid", total=money_pb2.Money(currency_code="IRR", units=99))
    changed = cust.CustomerUpdated(changed_fields=["email", "city"])
    cases = [
        (ticket, ("number", "channel", "category", "complaint", "priority", "team", "assignee", "version")),
        (invoice, ("number", "kind", "state", "total", "paid_total", "due_date")),
        (changed, ("changed_fields",)),
        (changed, ()),
    ]
    for msg, fields in cases:
        full = json_format.MessageToDict(msg, preserving_proto_field_name=True)
        assert _detail(msg, *fields) == {f: full[f] for f in fields if f in full}, (type(msg).__name__, fields)
    assert _detail(ticket, "category") == {}
