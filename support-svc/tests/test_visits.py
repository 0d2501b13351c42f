"""Field-service visits: booking a field technician's slot (the database refuses overlaps, also
between concurrent bookings), the day list, rescheduling, cancelling and completing with parts
and the customer's sign-off."""

from __future__ import annotations

import datetime as dt
import threading

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import timestamp_pb2

from crm.support.v1 import visits_pb2 as pb
from crm.support.v1 import visits_pb2_grpc
from crm.type.v1 import date_pb2
from crm_chassis.dates import TEHRAN
from crm_chassis.errors import read_rpc_error
from support_svc import customer_projection
from support_svc.tables import ticket_messages
from tests.support.customers import customer_message

from .conftest import agent_md, make_agent, open_ticket, rt

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 200
MD = agent_md("dispatcher")
# 2026-03-10 in Tehran
DAY = dt.date(2026, 3, 10)


def at(hour: int, minute: int = 0, day: dt.date = DAY) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(hour, minute), tzinfo=TEHRAN)


def ts(t: dt.datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(t)
    return out


@pytest.fixture(scope="module")
def stub(ch):
    return visits_pb2_grpc.VisitServiceStub(ch)


@pytest.fixture(scope="module")
def techs(svc):
    make_agent(svc, "tech-a", skills=("field", "network"))
    make_agent(svc, "tech-b", skills=("field",))
    make_agent(svc, "desk-c", skills=("billing",))
    return "agents/tech-a", "agents/tech-b", "agents/desk-c"


@pytest.fixture(scope="module")
def ticket(svc):
    handlers = customer_projection.subscriptions(rt(svc))[0].handlers
    e = customer_message("customer.created.v1", mobile="+989121110000", address="تهران، خیابان ولیعصر، پلاک ۱۰")
    with svc.ctx.engine.begin() as conn:
        handlers[e.routing_key](conn, e)
    return open_ticket(svc, channel="phone", contact_address="+989121110000", subject="مودم کار نمی‌کند")


def book(stub, ticket, tech, start, travel=30, work=60, **kw):
    visit = pb.Visit(
        ticket=f"tickets/{ticket.id}",
        technician=tech,
        start_time=ts(start),
        travel_minutes=travel,
        work_minutes=work,
        **kw,
    )
    return stub.BookVisit(pb.BookVisitRequest(visit=visit), metadata=MD)


def failure(fn):
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), read_rpc_error(err.value)


def ticket_bodies(svc, ticket_id):
    with svc.ctx.engine.connect() as conn:
        return [
            r.body
            for r in conn.execute(
                sa.select(ticket_messages.c.body)
                .where(ticket_messages.c.ticket_id == ticket_id, ticket_messages.c.kind == "system")
                .order_by(ticket_messages.c.create_time)
            )
        ]


def test_a_booking_holds_travel_and_work_and_an_overlap_is_refused(svc, stub, techs, ticket):
    a, b, _ = techs
    v = book(stub, ticket, a, at(10), travel=30, work=60)
    assert v.state == pb.Visit.STATE_BOOKED and v.technician == a and v.customer
    assert v.address == "تهران، خیابان ولیعصر، پلاک ۱۰"  # from the customer's record
    assert v.slot_start_time.ToDatetime(tzinfo=dt.UTC) == at(9, 30)
    assert v.slot_end_time.ToDatetime(tzinfo=dt.UTC) == at(11)
    assert any(v.name in body for body in ticket_bodies(svc, ticket.id))

    # 10:45 with 20 minutes' travel starts at 10:25, inside the first visit
    code, view = failure(lambda: book(stub, ticket, a, at(10, 45), travel=20))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert [f.field for f in view.field_violations] == ["visit.start_time"]
    assert view.metadata["conflict"] == v.name
    # right after the first one (travel from 11:00) is fine: the slot's end is open
    after = book(stub, ticket, a, at(11, 30), travel=30, work=30, address="دفتر مرکزی")
    assert after.address == "دفتر مرکزی"
    # another technician at the same time is fine
    assert book(stub, ticket, b, at(10), travel=30, work=60).technician == b


def test_a_technician_without_the_field_skill_is_refused(stub, techs, ticket):
    _, _, desk = techs
    code, view = failure(lambda: book(stub, ticket, desk, at(8)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f.field for f in view.field_violations] == ["visit.technician"]
    code, view = failure(lambda: book(stub, ticket, "agents/nobody", at(8)))
    assert [f.field for f in view.field_violations] == ["visit.technician"]
    code, view = failure(
        lambda: stub.BookVisit(
            pb.BookVisitRequest(visit=pb.Visit(ticket=f"tickets/{ticket.id}", technician=techs[0], work_minutes=0)),
            metadata=MD,
        )
    )
    assert {f.field for f in view.field_violations} == {"visit.start_time", "visit.work_minutes"}


def test_of_two_concurrent_overlapping_bookings_exactly_one_wins(svc, techs, ticket, stub):
    make_agent(svc, "tech-race", skills=("field",))
    results: list = []
    barrier = threading.Barrier(2)

    def one(minute: int):
        barrier.wait()
        try:
            results.append(book(stub, ticket, "agents/tech-race", at(14, minute), travel=10, work=60))
        except grpc.RpcError as err:
            results.append(err.code())

    threads = [threading.Thread(target=one, args=(m,)) for m in (0, 15)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    won = [r for r in results if isinstance(r, pb.Visit)]
    assert len(won) == 1 and results.count(grpc.StatusCode.ALREADY_EXISTS) == 1


def test_the_day_list_is_the_technicians_visits_of_the_tehran_day_by_start(svc, stub, ticket):
    make_agent(svc, "tech-day", skills=("field",))
    tech = "agents/tech-day"
    late = book(stub, ticket, tech, at(16), travel=0, work=30)
    early = book(stub, ticket, tech, at(0, 30), travel=0, work=30)  # 00:30 Tehran: the day before in UTC
    book(stub, ticket, tech, at(9, day=DAY + dt.timedelta(days=1)), travel=0, work=30)
    mid = book(stub, ticket, tech, at(12), travel=0, work=30)
    day = date_pb2.Date(year=DAY.year, month=DAY.month, day=DAY.day)
    page = stub.ListVisits(pb.ListVisitsRequest(technician=tech, day=day), metadata=MD)
    assert [v.name for v in page.visits] == [early.name, mid.name, late.name]
    first = stub.ListVisits(pb.ListVisitsRequest(technician=tech, day=day, page_size=2), metadata=MD)
    rest = stub.ListVisits(
        pb.ListVisitsRequest(technician=tech, day=day, page_size=2, page_token=first.next_page_token), metadata=MD
    )
    assert [v.name for v in (*first.visits, *rest.visits)] == [early.name, mid.name, late.name]
    assert not rest.next_page_token
    code, view = failure(
        lambda: stub.ListVisits(
            pb.ListVisitsRequest(technician=tech, page_token=first.next_page_token, page_size=2), metadata=MD
        )
    )
    assert [f.field for f in view.field_violations] == ["page_token"]  # a token of another query
    # a cancelled visit frees its slot and leaves the BOOKED filter
    stub.CancelVisit(pb.CancelVisitRequest(name=mid.name, reason="مشتری در سفر است", etag=mid.etag), metadata=MD)
    booked = stub.ListVisits(pb.ListVisitsRequest(technician=tech, day=day, filter="state = BOOKED"), metadata=MD)
    assert [v.name for v in booked.visits] == [early.name, late.name]
    again = book(stub, ticket, tech, at(12), travel=0, work=30)
    assert again.state == pb.Visit.STATE_BOOKED


def test_reschedule_keeps_the_overlap_rule_and_checks_the_etag(stub, svc, ticket):
    make_agent(svc, "tech-move", skills=("field",))
    tech = "agents/tech-move"
    one = book(stub, ticket, tech, at(9), travel=0, work=60)
    two = book(stub, ticket, tech, at(13), travel=0, work=60)
    code, view = failure(
        lambda: stub.RescheduleVisit(
            pb.RescheduleVisitRequest(name=two.name, start_time=ts(at(9, 30)), etag=two.etag), metadata=MD
        )
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS and view.metadata["conflict"] == one.name
    moved = stub.RescheduleVisit(
        pb.RescheduleVisitRequest(name=two.name, start_time=ts(at(15)), travel_minutes=45, etag=two.etag), metadata=MD
    )
    assert moved.start_time.ToDatetime(tzinfo=dt.UTC) == at(15) and moved.travel_minutes == 45
    assert moved.work_minutes == 60 and moved.slot_start_time.ToDatetime(tzinfo=dt.UTC) == at(14, 15)
    code, _ = failure(
        lambda: stub.RescheduleVisit(
            pb.RescheduleVisitRequest(name=two.name, start_time=ts(at(17)), etag=two.etag), metadata=MD
        )
    )
    assert code == grpc.StatusCode.ABORTED


def test_completion_records_parts_and_the_sign_off(svc, stub, ticket):
    make_agent(svc, "tech-done", skills=("field",))
    v = book(stub, ticket, "agents/tech-done", at(10), travel=15, work=90, note="مودم را ببرید")
    # a sign-off is required unless the customer was absent; a signature must be an image
    code, view = failure(
        lambda: stub.CompleteVisit(pb.CompleteVisitRequest(name=v.name, outcome=pb.VISIT_OUTCOME_FIXED), metadata=MD)
    )
    assert {f.field for f in view.field_violations} == {"sign_off.signer_name", "sign_off.signature"}
    code, view = failure(
        lambda: stub.CompleteVisit(
            pb.CompleteVisitRequest(
                name=v.name,
                outcome=pb.VISIT_OUTCOME_FIXED,
                parts=[pb.VisitPart(quantity=0)],
                sign_off=pb.SignOff(signer_name="x", signature=b"GIF89a" + b"\0" * 10),
            ),
            metadata=MD,
        )
    )
    assert {f.field for f in view.field_violations} == {"parts[0].sku", "parts[0].quantity", "sign_off.signature"}
    code, view = failure(
        lambda: stub.CompleteVisit(
            pb.CompleteVisitRequest(
                name=v.name,
                outcome=pb.VISIT_OUTCOME_FIXED,
                sign_off=pb.SignOff(signer_name="x", signature=PNG + b"\0" * (1024 * 1024)),
            ),
            metadata=MD,
        )
    )
    assert [f.field for f in view.field_violations] == ["sign_off.signature"]

    signed = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=1)
    done = stub.CompleteVisit(
        pb.CompleteVisitRequest(
            name=v.name,
            outcome=pb.VISIT_OUTCOME_FIXED,
            parts=[pb.VisitPart(sku="MDM-100", name="مودم", quantity=1), pb.VisitPart(name="کابل شبکه", quantity=3)],
            actual_work_minutes=75,
            sign_off=pb.SignOff(signer_name="سارا رضایی", signature=PNG, sign_time=ts(signed)),
            etag=v.etag,
        ),
        metadata=MD,
    )
    assert done.state == pb.Visit.STATE_COMPLETED and done.outcome == pb.VISIT_OUTCOME_FIXED
    assert [(p.sku, p.name, p.quantity) for p in done.parts] == [("MDM-100", "مودم", 1), ("", "کابل شبکه", 3)]
    assert done.actual_work_minutes == 75 and done.sign_off.signer_name == "سارا رضایی"
    assert done.sign_off.signature_content_type == "image/png" and done.sign_off.signature_size_bytes == len(PNG)
    assert not done.sign_off.signature  # only GetVisit returns the image
    got = stub.GetVisit(pb.GetVisitRequest(name=v.name), metadata=MD)
    assert got.sign_off.signature == PNG and got.sign_off.sign_time.ToDatetime(tzinfo=dt.UTC) == signed
    listed = stub.ListVisits(pb.ListVisitsRequest(technician="agents/tech-done"), metadata=MD).visits
    assert listed[0].sign_off.signature_size_bytes == len(PNG) and not listed[0].sign_off.signature
    assert len(listed[0].parts) == 2
    assert any("بازدید فنی انجام شد" in b and "کابل شبکه × 3" in b for b in ticket_bodies(svc, ticket.id))
    # a completed visit cannot be completed, cancelled or moved again
    for call in (
        lambda: stub.CancelVisit(pb.CancelVisitRequest(name=v.name, reason="x"), metadata=MD),
        lambda: stub.RescheduleVisit(pb.RescheduleVisitRequest(name=v.name, start_time=ts(at(18))), metadata=MD),
        lambda: stub.CompleteVisit(
            pb.CompleteVisitRequest(name=v.name, outcome=pb.VISIT_OUTCOME_CUSTOMER_ABSENT), metadata=MD
        ),
    ):
        code, _ = failure(call)
        assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_a_booking_retried_with_its_request_id_is_one_visit(svc, stub, ticket):
    make_agent(svc, "tech-retry", skills=("field",))
    visit = pb.Visit(
        ticket=f"tickets/{ticket.id}", technician="agents/tech-retry", start_time=ts(at(8)), work_minutes=30
    )
    first = stub.BookVisit(pb.BookVisitRequest(visit=visit, request_id="req-visit-1"), metadata=MD)
    again = stub.BookVisit(pb.BookVisitRequest(visit=visit, request_id="req-visit-1"), metadata=MD)
    assert first.name == again.name
