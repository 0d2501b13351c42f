"""TicketService and CategoryService over real gRPC on a fresh database: create with every field
and each bad field named, idempotent creates and messages, list filters and keyset pages,
Persian search, etags and update masks, the state RPCs, assignment, replies, attachments,
history, export, categories, and the HTTP routes through the gateway."""

from __future__ import annotations

import csv
import datetime as dt
import io
import uuid

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2

from crm.support.v1 import support_events_pb2 as ev
from crm.support.v1 import ticket_pb2 as tpb
from crm.support.v1 import tickets_pb2 as pb
from crm.support.v1 import tickets_pb2_grpc
from crm_chassis.errors import read_rpc_error
from support_svc.tables import tickets
from tests.support.harness import assert_problem, token

from .conftest import agent_md, events, make_agent, make_team, manager_md

AGENT = agent_md("omid")
MANAGER = manager_md("mina")
S = tpb.Ticket.State


@pytest.fixture(scope="module")
def stub(ch):
    return tickets_pb2_grpc.TicketServiceStub(ch)


@pytest.fixture(scope="module")
def cats(ch):
    return tickets_pb2_grpc.CategoryServiceStub(ch)


@pytest.fixture(scope="module")
def team(svc):
    return make_team(svc, "پشتیبانی فنی")


@pytest.fixture(scope="module")
def omid(svc, team):
    return make_agent(svc, "omid", teams=[team])


def fails(call, code: grpc.StatusCode):
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    return read_rpc_error(info.value)


def fields_of(view) -> list[str]:
    return [v.field for v in view.field_violations]


def new_ticket(stub, md=AGENT, body="سلام", **fields) -> tpb.Ticket:
    fields.setdefault("subject", "کالا خراب رسید")
    fields.setdefault("channel", tpb.CHANNEL_PHONE)
    return stub.CreateTicket(pb.CreateTicketRequest(ticket=tpb.Ticket(**fields), body=body), metadata=md)


def new_category(cats, key=None, **fields) -> pb.Category:
    key = key or f"c_{uuid.uuid4().hex[:8]}"
    fields.setdefault("display_name", key)
    return cats.CreateCategory(pb.CreateCategoryRequest(category=pb.Category(key=key, **fields)), metadata=MANAGER)


def tid_of(t: tpb.Ticket) -> str:
    return t.name.split("/")[1]


# -- create ---------------------------------------------------------------------------------------


def test_create_with_every_field(svc, stub, cats, team, omid):
    cat = new_category(cats, display_name="شکایت", complaint=True, team=f"teams/{team}")
    customer = f"customers/{uuid.uuid4()}"
    req = pb.CreateTicketRequest(
        ticket=tpb.Ticket(
            subject="  تماس تلفنی: مودم کار نمی‌کند ",
            channel=tpb.CHANNEL_PHONE,
            customer=customer,
            contact_address="0912 123 4567",
            contact_name="علی رضایی",
            category=cat.name,
            priority=tpb.PRIORITY_HIGH,
            product="products/modem-x",
            order="ORD-1403-77",
            team=f"teams/{team}",
            assignee="agents/omid",
            tags=["VIP", " modem ", "vip"],
            custom_fields={"serial_number": "SN-1"},
            language="fa",
            state=S.STATE_CLOSED,  # output only: ignored
        ),
        body="مشتری گفت مودم از دیروز قطع است.",
        attachments=[
            tpb.Attachment(filename="C:\\photos\\modem.jpg", content_type="image/jpeg", content=b"\xff\xd8jpg")
        ],
    )
    t = stub.CreateTicket(req, metadata=AGENT)
    assert t.subject == "تماس تلفنی: مودم کار نمی‌کند" and t.number.startswith("T-")
    assert t.channel == tpb.CHANNEL_PHONE and t.state == S.STATE_NEW
    assert t.customer == customer and t.contact_address == "+989121234567" and t.contact_name == "علی رضایی"
    assert t.category == cat.name and t.complaint  # the category's complaint flag
    assert t.priority == tpb.PRIORITY_HIGH and t.product == "products/modem-x" and t.order == "ORD-1403-77"
    assert t.team == f"teams/{team}" and t.assignee == "agents/omid"
    assert list(t.tags) == ["vip", "modem"] and dict(t.custom_fields) == {"serial_number": "SN-1"}
    assert t.message_count == 1 and t.etag
    msgs = stub.ListTicketMessages(pb.ListTicketMessagesRequest(parent=t.name), metadata=AGENT).messages
    assert len(msgs) == 1 and msgs[0].kind == tpb.TicketMessage.KIND_CUSTOMER
    assert msgs[0].body == "مشتری گفت مودم از دیروز قطع است."
    assert [(a.filename, a.content_type, a.size_bytes) for a in msgs[0].attachments] == [("modem.jpg", "image/jpeg", 5)]
    opened = events(svc, "ticket.opened.v1", ev.TicketEvent, subject=t.name)
    assert len(opened) == 1 and opened[0].actor == "omid" and opened[0].complaint
    assert stub.GetTicket(pb.GetTicketRequest(name=t.name), metadata=AGENT) == t


def test_create_names_every_bad_field(stub):
    req = pb.CreateTicketRequest(
        ticket=tpb.Ticket(
            subject="x" * 301,
            customer="people/1",
            contact_address="not a phone",
            contact_name="n" * 201,
            category="categories/1",
            priority=99,
            product="p" * 201,
            order="o" * 201,
            team="teams/abc",
            assignee="agents/",
            tags=["", "t" * 41],
            custom_fields={"Bad Key": "v", "ok_key": "v" * 1001},
            language="Persian",
        ),
        body="b" * 100_001,
        attachments=[
            tpb.Attachment(filename="", content_type="not a type", content=b""),
            tpb.Attachment(filename="big.bin", content=b"\0" * (10 * 1024 * 1024 + 1)),
        ],
        first_message_kind=tpb.TicketMessage.KIND_AGENT,
        request_id="r" * 129,
    )
    view = fails(lambda: stub.CreateTicket(req, metadata=AGENT), grpc.StatusCode.INVALID_ARGUMENT)
    expected = {
        "ticket.subject",
        "ticket.channel",
        "ticket.customer",
        "ticket.contact_name",
        "ticket.category",
        "ticket.priority",
        "ticket.product",
        "ticket.order",
        "ticket.team",
        "ticket.assignee",
        "ticket.tags[0]",
        "ticket.tags[1]",
        "ticket.custom_fields.Bad Key",
        "ticket.custom_fields.ok_key",
        "ticket.language",
        "body",
        "attachments[0].filename",
        "attachments[0].content_type",
        "attachments[0].content",
        "attachments[1].content",
        "first_message_kind",
        "request_id",
    }
    assert expected <= set(fields_of(view)), set(fields_of(view)) ^ expected
    # a phone ticket's contact must be a phone number; an e-mail one an address
    bad_phone = fails(lambda: new_ticket(stub, contact_address="hello"), grpc.StatusCode.INVALID_ARGUMENT)
    assert fields_of(bad_phone) == ["ticket.contact_address"]
    bad_mail = fails(
        lambda: new_ticket(stub, channel=tpb.CHANNEL_EMAIL, contact_address="ali@"), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert fields_of(bad_mail) == ["ticket.contact_address"]


def test_create_checks_references_and_total_attachment_size(svc, stub, cats):
    missing = fails(
        lambda: new_ticket(
            stub, category=f"categories/{uuid.uuid4()}", team=f"teams/{uuid.uuid4()}", assignee="agents/nobody"
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(fields_of(missing)) == {"ticket.category", "ticket.team", "ticket.assignee"}
    old = new_category(cats)
    cats.DeleteCategory(pb.DeleteCategoryRequest(name=old.name), metadata=MANAGER)  # unused: deleted
    gone = fails(lambda: new_ticket(stub, category=old.name), grpc.StatusCode.INVALID_ARGUMENT)
    assert fields_of(gone) == ["ticket.category"]
    files = [tpb.Attachment(filename=f"f{i}.bin", content=b"x" * (9 * 1024 * 1024)) for i in range(3)]
    big = fails(
        lambda: stub.CreateTicket(
            pb.CreateTicketRequest(ticket=tpb.Ticket(subject="s", channel=tpb.CHANNEL_AGENT), attachments=files),
            metadata=AGENT,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields_of(big) == ["attachments"]


def test_create_is_idempotent_by_request_id(svc, stub):
    rid = str(uuid.uuid4())
    req = pb.CreateTicketRequest(ticket=tpb.Ticket(subject="یک بار", channel=tpb.CHANNEL_AGENT), request_id=rid)
    first = stub.CreateTicket(req, metadata=AGENT)
    again = stub.CreateTicket(req, metadata=AGENT)
    assert again.name == first.name
    with svc.ctx.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).where(tickets.c.request_id == rid)).scalar() == 1
    assert len(events(svc, "ticket.opened.v1", subject=first.name)) == 1


# -- list, pages, search ----------------------------------------------------------------------------


def test_list_filters_against_a_hand_built_set(svc, stub, cats, omid):
    tag = f"set{uuid.uuid4().hex[:6]}"
    complaint = new_category(cats, complaint=True)
    a = new_ticket(stub, tags=[tag], assignee="agents/omid", priority=tpb.PRIORITY_URGENT)
    b = new_ticket(stub, tags=[tag], category=complaint.name)
    c = new_ticket(stub, tags=[tag], channel=tpb.CHANNEL_AGENT, priority=tpb.PRIORITY_LOW)
    stub.ResolveTicket(pb.ResolveTicketRequest(name=c.name), metadata=AGENT)
    with svc.ctx.engine.begin() as conn:  # a's was opened last week
        conn.execute(
            tickets.update().where(tickets.c.id == tid_of(a)).values(create_time=sa.func.now() - dt.timedelta(days=7))
        )

    def names(flt, order_by=""):
        resp = stub.ListTickets(
            pb.ListTicketsRequest(filter=f"tags:{tag} AND ({flt})", order_by=order_by), metadata=AGENT
        )
        return [t.name for t in resp.tickets]

    assert names("state = RESOLVED") == [c.name]
    assert set(names("state = STATE_NEW")) == {a.name, b.name}
    assert names("complaint = true") == [b.name]
    assert names('assignee = "agents/omid"') == [a.name]
    assert set(names("assignee = null")) == {b.name, c.name}
    assert names(f'category = "{complaint.name}"') == [b.name]
    assert names("channel = CHANNEL_AGENT") == [c.name]
    assert names("priority >= HIGH") == [a.name]
    week_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(days=3)).isoformat().replace("+00:00", "Z")
    assert names(f'create_time < "{week_ago}"') == [a.name]
    assert set(names(f'create_time >= "{week_ago}"')) == {b.name, c.name}
    assert names(f'number = "{b.number}"') == [b.name]
    assert names("state != CLOSED", "create_time desc") == [c.name, b.name, a.name]  # newest first
    assert names("state != CLOSED", "priority desc") == [a.name, b.name, c.name]  # urgent, normal, low
    bad = fails(
        lambda: stub.ListTickets(pb.ListTicketsRequest(filter="colour = red"), metadata=AGENT),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields_of(bad) == ["filter"]
    bad = fails(
        lambda: stub.ListTickets(pb.ListTicketsRequest(order_by="subject"), metadata=AGENT),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields_of(bad) == ["order_by"]


@pytest.mark.parametrize("order_by", ["", "update_time", "priority desc, create_time"])
def test_keyset_walk_has_no_duplicates_or_gaps(svc, stub, order_by):
    tag = f"walk{uuid.uuid4().hex[:6]}"
    made = {new_ticket(stub, tags=[tag], priority=tpb.PRIORITY_LOW + i % 4, body="").name for i in range(11)}
    seen, token, pages = [], "", 0
    while True:
        resp = stub.ListTickets(
            pb.ListTicketsRequest(filter=f"tags:{tag}", order_by=order_by, page_size=3, page_token=token),
            metadata=AGENT,
        )
        seen += [t.name for t in resp.tickets]
        pages += 1
        token = resp.next_page_token
        if not token:
            break
    assert pages == 4 and len(seen) == 11 and set(seen) == made
    bad = fails(
        lambda: stub.ListTickets(pb.ListTicketsRequest(filter="tags:other", page_token=token or "x.y"), metadata=AGENT),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields_of(bad) == ["page_token"]


def test_persian_search_finds_arabic_letters_and_zwnj_variants(svc, stub):
    marker = uuid.uuid4().hex[:6]
    # stored with Arabic yeh and kaf, and a zero-width non-joiner
    t = new_ticket(stub, subject=f"مشكل در پرداخت مي\u200cخواهم {marker}", tags=["بانك"])
    other = new_ticket(stub, subject=f"چیز دیگری {marker}")

    def found(q, flt='tags:"بانک"'):
        resp = stub.SearchTickets(pb.SearchTicketsRequest(query=q, filter=flt), metadata=AGENT)
        return [x.name for x in resp.tickets]

    assert found("مشکل") == [t.name]  # Persian kaf
    assert found("می خواهم") == [t.name]  # Persian yeh, a space for the ZWNJ
    assert found("مي\u200cخواهم") == [t.name]
    assert found("پرداخت", flt="") == [t.name]
    assert found(t.number, flt="") == [t.name]  # the exact number
    assert found(t.number.replace("T-", "t-").lstrip(), flt="") == [t.name]
    assert found(marker, flt="") == [other.name, t.name]  # newest first
    view = fails(
        lambda: stub.SearchTickets(pb.SearchTicketsRequest(query="  "), metadata=AGENT),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields_of(view) == ["query"]


# -- update -------------------------------------------------------------------------------------------


def test_update_with_a_stale_etag_is_aborted_and_the_mask_limits_the_change(svc, stub, cats, team):
    t = new_ticket(stub, product="old-product", tags=["a"])
    stale = t.etag
    changed = stub.UpdateTicket(
        pb.UpdateTicketRequest(
            ticket=tpb.Ticket(
                name=t.name, etag=t.etag, subject="موضوع تازه", product="IGNORED", priority=tpb.PRIORITY_URGENT
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["subject", "priority"]),
        ),
        metadata=AGENT,
    )
    assert changed.subject == "موضوع تازه" and changed.priority == tpb.PRIORITY_URGENT
    assert changed.product == "old-product" and list(changed.tags) == ["a"] and changed.etag != stale
    fails(
        lambda: stub.UpdateTicket(
            pb.UpdateTicketRequest(
                ticket=tpb.Ticket(name=t.name, etag=stale, subject="lost update"),
                update_mask=field_mask_pb2.FieldMask(paths=["subject"]),
            ),
            metadata=AGENT,
        ),
        grpc.StatusCode.ABORTED,
    )
    cat = new_category(cats, complaint=True)
    moved = stub.UpdateTicket(
        pb.UpdateTicketRequest(
            ticket=tpb.Ticket(name=t.name, category=cat.name, team=f"teams/{team}", tags=["X", "y"]),
            update_mask=field_mask_pb2.FieldMask(paths=["category", "team", "tags"]),
        ),
        metadata=AGENT,
    )
    assert moved.complaint and moved.team == f"teams/{team}" and list(moved.tags) == ["x", "y"]
    found = stub.SearchTickets(pb.SearchTicketsRequest(query="تازه", filter="tags:x"), metadata=AGENT).tickets
    assert [x.name for x in found] == [t.name]  # search_text follows the subject
    for paths, field in ((["state"], "update_mask"), (["assignee"], "update_mask"), (["subject"], "ticket.subject")):
        view = fails(
            lambda p=paths: stub.UpdateTicket(
                pb.UpdateTicketRequest(ticket=tpb.Ticket(name=t.name), update_mask=field_mask_pb2.FieldMask(paths=p)),
                metadata=AGENT,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert fields_of(view) == [field]
    history = stub.ListTicketHistory(pb.ListTicketHistoryRequest(parent=t.name), metadata=AGENT)
    updates = [e for e in history.entries if e.action == "update"]
    assert {c.field for c in updates[-1].changes} == {"subject", "priority"}
    assert updates[0].actor == "omid"


# -- states and assignment ------------------------------------------------------------------------------


def test_state_rpcs_and_wrong_transitions(svc, stub):
    t = new_ticket(stub)
    w = stub.SetTicketState(pb.SetTicketStateRequest(name=t.name, state=S.STATE_WAITING_ON_CUSTOMER), metadata=AGENT)
    assert w.state == S.STATE_WAITING_ON_CUSTOMER
    fails(
        lambda: stub.ResolveTicket(pb.ResolveTicketRequest(name=t.name, etag=t.etag), metadata=AGENT),
        grpc.StatusCode.ABORTED,
    )
    r = stub.ResolveTicket(pb.ResolveTicketRequest(name=t.name, etag=w.etag, reason="fixed"), metadata=AGENT)
    assert r.state == S.STATE_RESOLVED and r.HasField("resolve_time")
    assert events(svc, "ticket.resolved.v1", ev.TicketEvent, subject=t.name)[-1].reason == "fixed"
    view = fails(
        lambda: stub.SetTicketState(pb.SetTicketStateRequest(name=t.name, state=S.STATE_OPEN), metadata=AGENT),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert view.reason == "INVALID_TRANSITION"
    again = stub.ReopenTicket(pb.ReopenTicketRequest(name=t.name), metadata=AGENT)
    assert again.state == S.STATE_REOPENED
    closed = stub.CloseTicket(pb.CloseTicketRequest(name=t.name), metadata=AGENT)
    assert closed.state == S.STATE_CLOSED and closed.HasField("close_time")
    assert stub.CloseTicket(pb.CloseTicketRequest(name=t.name), metadata=AGENT).state == S.STATE_CLOSED
    for call in (
        lambda: stub.ReopenTicket(pb.ReopenTicketRequest(name=t.name), metadata=AGENT),
        lambda: stub.ResolveTicket(pb.ResolveTicketRequest(name=t.name), metadata=AGENT),
    ):
        fails(call, grpc.StatusCode.FAILED_PRECONDITION)
    fresh = new_ticket(stub)
    fails(
        lambda: stub.ReopenTicket(pb.ReopenTicketRequest(name=fresh.name), metadata=AGENT),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    view = fails(
        lambda: stub.SetTicketState(pb.SetTicketStateRequest(name=fresh.name, state=S.STATE_RESOLVED), metadata=AGENT),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields_of(view) == ["state"]
    fails(
        lambda: stub.ResolveTicket(pb.ResolveTicketRequest(name=f"tickets/{uuid.uuid4()}"), metadata=AGENT),
        grpc.StatusCode.NOT_FOUND,
    )
    history = stub.ListTicketHistory(pb.ListTicketHistoryRequest(parent=t.name), metadata=AGENT)
    states = [i.state for i in history.intervals]
    assert states == [S.STATE_CLOSED, S.STATE_REOPENED, S.STATE_RESOLVED, S.STATE_WAITING_ON_CUSTOMER, S.STATE_NEW]
    assert not history.intervals[0].HasField("end_time") and history.intervals[-1].HasField("end_time")
    assert all(i.duration_seconds >= 0 for i in history.intervals)


def test_assign_and_unassign(svc, stub, omid):
    t = new_ticket(stub)
    a = stub.AssignTicket(pb.AssignTicketRequest(name=t.name, assignee="agents/omid", reason="VIP"), metadata=MANAGER)
    assert a.assignee == "agents/omid"
    assigned = events(svc, "ticket.assigned.v1", ev.TicketEvent, subject=t.name)
    assert assigned[-1].assignee == "agents/omid" and assigned[-1].reason == "VIP" and assigned[-1].actor == "mina"
    view = fails(
        lambda: stub.AssignTicket(pb.AssignTicketRequest(name=t.name, assignee="agents/ghost"), metadata=MANAGER),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields_of(view) == ["assignee"]
    fails(
        lambda: stub.AssignTicket(pb.AssignTicketRequest(name=t.name, assignee="", etag=t.etag), metadata=MANAGER),
        grpc.StatusCode.ABORTED,
    )
    u = stub.AssignTicket(pb.AssignTicketRequest(name=t.name, assignee=""), metadata=MANAGER)
    assert u.assignee == ""
    assert len(events(svc, "ticket.assigned.v1", subject=t.name)) == 2


# -- messages and attachments ------------------------------------------------------------------------------


def test_reply_counts_an_exchange_and_messages_list_oldest_first(svc, stub):
    t = new_ticket(stub, body="سوال مشتری")
    add = stub.AddTicketMessage
    note = add(
        pb.AddTicketMessageRequest(
            parent=t.name, message=tpb.TicketMessage(kind=tpb.TicketMessage.KIND_NOTE, body="یادداشت داخلی")
        ),
        metadata=AGENT,
    )
    assert note.author == "omid"
    assert stub.GetTicket(pb.GetTicketRequest(name=t.name), metadata=AGENT).exchange_count == 0
    rid = str(uuid.uuid4())
    reply_req = pb.AddTicketMessageRequest(
        parent=t.name, message=tpb.TicketMessage(kind=tpb.TicketMessage.KIND_AGENT, body="پاسخ"), request_id=rid
    )
    reply = add(reply_req, metadata=AGENT)
    assert add(reply_req, metadata=AGENT).name == reply.name  # a retry adds nothing
    after = stub.GetTicket(pb.GetTicketRequest(name=t.name), metadata=AGENT)
    assert after.exchange_count == 1 and after.state == S.STATE_OPEN and after.HasField("first_response_time")
    assert after.message_count == 3
    said = add(
        pb.AddTicketMessageRequest(
            parent=t.name,
            message=tpb.TicketMessage(
                kind=tpb.TicketMessage.KIND_CUSTOMER, body="گفت هنوز خراب است", channel=tpb.CHANNEL_PHONE
            ),
        ),
        metadata=AGENT,
    )
    assert said.kind == tpb.TicketMessage.KIND_CUSTOMER and said.channel == tpb.CHANNEL_PHONE
    add(
        pb.AddTicketMessageRequest(
            parent=t.name, message=tpb.TicketMessage(kind=tpb.TicketMessage.KIND_AGENT, body="دوباره")
        ),
        metadata=AGENT,
    )
    assert stub.GetTicket(pb.GetTicketRequest(name=t.name), metadata=AGENT).exchange_count == 2
    walked, token = [], ""
    while True:
        page = stub.ListTicketMessages(
            pb.ListTicketMessagesRequest(parent=t.name, page_size=2, page_token=token), metadata=AGENT
        )
        walked += [m.body for m in page.messages]
        token = page.next_page_token
        if not token:
            break
    assert walked == ["سوال مشتری", "یادداشت داخلی", "پاسخ", "گفت هنوز خراب است", "دوباره"]
    no_notes = stub.ListTicketMessages(
        pb.ListTicketMessagesRequest(parent=t.name, filter="kind != NOTE"), metadata=AGENT
    )
    assert "یادداشت داخلی" not in [m.body for m in no_notes.messages]
    for msg, field in (
        (tpb.TicketMessage(kind=tpb.TicketMessage.KIND_SYSTEM, body="x"), "message.kind"),
        (tpb.TicketMessage(kind=tpb.TicketMessage.KIND_AGENT, body="  "), "message.body"),
    ):
        view = fails(
            lambda m=msg: add(pb.AddTicketMessageRequest(parent=t.name, message=m), metadata=AGENT),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert fields_of(view) == [field]
    fails(
        lambda: add(
            pb.AddTicketMessageRequest(
                parent=f"tickets/{uuid.uuid4()}", message=tpb.TicketMessage(kind=tpb.TicketMessage.KIND_NOTE, body="x")
            ),
            metadata=AGENT,
        ),
        grpc.StatusCode.NOT_FOUND,
    )


def test_attachment_download_returns_the_same_bytes(svc, stub):
    t = new_ticket(stub)
    content = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4: several chunks
    pdf = b"%PDF-1.4 small"
    msg = stub.AddTicketMessage(
        pb.AddTicketMessageRequest(
            parent=t.name,
            message=tpb.TicketMessage(
                kind=tpb.TicketMessage.KIND_NOTE,
                attachments=[
                    tpb.Attachment(filename="scan.bin", content=content),
                    tpb.Attachment(filename="فاکتور.pdf", content_type="application/pdf", content=pdf),
                ],
            ),
        ),
        metadata=AGENT,
    )
    assert sorted(a.size_bytes for a in msg.attachments) == [len(pdf), len(content)]
    for position, listed in enumerate(msg.attachments, start=1):
        chunks = list(
            stub.GetAttachment(pb.GetAttachmentRequest(name=f"{msg.name}/attachments/{position}"), metadata=AGENT)
        )
        head = chunks[0]
        assert head.filename == listed.filename and head.size_bytes == listed.size_bytes
        data = b"".join(c.data for c in chunks[1:])
        assert data == (content if listed.filename == "scan.bin" else pdf)
        assert head.content_type == (
            "application/pdf" if listed.filename.endswith(".pdf") else "application/octet-stream"
        )
        if listed.filename == "scan.bin":
            assert len(chunks) == 1 + 5  # 1 MiB in 256 KiB chunks and the tail
        # The attachment's own name downloads the same file.
        assert listed.name.startswith(f"{msg.name}/attachments/")
        by_name = list(stub.GetAttachment(pb.GetAttachmentRequest(name=listed.name), metadata=AGENT))
        assert b"".join(c.data for c in by_name[1:]) == data
    fails(
        lambda: list(stub.GetAttachment(pb.GetAttachmentRequest(name=f"{msg.name}/attachments/3"), metadata=AGENT)),
        grpc.StatusCode.NOT_FOUND,
    )
    other = new_ticket(stub)
    wrong = f"{other.name}/messages/{msg.name.rsplit('/', 1)[1]}/attachments/1"
    fails(
        lambda: list(stub.GetAttachment(pb.GetAttachmentRequest(name=wrong), metadata=AGENT)), grpc.StatusCode.NOT_FOUND
    )
    view = fails(
        lambda: list(stub.GetAttachment(pb.GetAttachmentRequest(name="tickets/x"), metadata=AGENT)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields_of(view) == ["name"]


# -- export -------------------------------------------------------------------------------------------------


def test_export_csv_has_the_rows(svc, stub):
    tag = f"exp{uuid.uuid4().hex[:6]}"
    made = [new_ticket(stub, subject=f"صادرات {i}", tags=[tag]) for i in range(3)]
    chunks = list(
        stub.ExportTickets(
            pb.ExportTicketsRequest(
                format=pb.TICKET_EXPORT_FORMAT_CSV,
                filter=f"tags:{tag}",
                fields=["number", "subject", "state", "tags"],
                language_code="fa",
            ),
            metadata=MANAGER,
        )
    )
    head = chunks[0]
    assert head.content_type.startswith("text/csv") and head.filename.endswith(".csv") and head.row_count == 3
    text = b"".join(c.data for c in chunks[1:]).decode("utf-8-sig")
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["شماره", "موضوع", "وضعیت", "برچسب‌ها"]
    assert [r[0] for r in rows[1:]] == [t.number for t in reversed(made)]  # newest first
    assert rows[1][1] == "صادرات 2" and rows[1][2] == "new" and rows[1][3] == tag
    xlsx = list(
        stub.ExportTickets(
            pb.ExportTicketsRequest(format=pb.TICKET_EXPORT_FORMAT_XLSX, query=made[0].number), metadata=MANAGER
        )
    )
    assert xlsx[0].row_count == 1 and xlsx[1].data[:2] == b"PK"
    for req, field in (
        (pb.ExportTicketsRequest(), "format"),
        (pb.ExportTicketsRequest(format=pb.TICKET_EXPORT_FORMAT_CSV, fields=["password"]), "fields"),
        (pb.ExportTicketsRequest(format=pb.TICKET_EXPORT_FORMAT_CSV, filter="nope = 1"), "filter"),
    ):
        view = fails(lambda r=req: list(stub.ExportTickets(r, metadata=MANAGER)), grpc.StatusCode.INVALID_ARGUMENT)
        assert fields_of(view) == [field]
    fails(
        lambda: list(stub.ExportTickets(pb.ExportTicketsRequest(format=pb.TICKET_EXPORT_FORMAT_CSV), metadata=AGENT)),
        grpc.StatusCode.PERMISSION_DENIED,
    )


# -- categories ----------------------------------------------------------------------------------------------


def test_category_crud_and_the_complaint_flag(svc, stub, cats, team):
    key = f"complaint_{uuid.uuid4().hex[:6]}"
    c = new_category(cats, key, display_name="شکایت", complaint=True, skill="billing", team=f"teams/{team}")
    assert c.active and c.complaint and c.skill == "billing" and c.team == f"teams/{team}"
    fails(lambda: new_category(cats, key), grpc.StatusCode.ALREADY_EXISTS)
    view = fails(
        lambda: new_category(cats, "Bad Key", display_name="", skill="x y", team="teams/1"),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(fields_of(view)) == {"category.key", "category.display_name", "category.skill", "category.team"}
    fails(
        lambda: cats.CreateCategory(
            pb.CreateCategoryRequest(category=pb.Category(key="k", display_name="k")), metadata=AGENT
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    # the category's complaint flag and default team go onto its tickets
    t = new_ticket(stub, category=c.name)
    assert t.complaint and t.team == f"teams/{team}"
    plain = new_category(cats, complaint=False)
    recategorised = stub.UpdateTicket(
        pb.UpdateTicketRequest(
            ticket=tpb.Ticket(name=t.name, category=plain.name),
            update_mask=field_mask_pb2.FieldMask(paths=["category"]),
        ),
        metadata=AGENT,
    )
    assert not recategorised.complaint
    u = cats.UpdateCategory(
        pb.UpdateCategoryRequest(
            category=pb.Category(name=c.name, etag=c.etag, display_name="شکایت مشتری", skill="field"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        ),
        metadata=MANAGER,
    )
    assert u.display_name == "شکایت مشتری" and u.skill == "billing" and u.etag != c.etag
    fails(
        lambda: cats.UpdateCategory(
            pb.UpdateCategoryRequest(
                category=pb.Category(name=c.name, etag=c.etag, complaint=False),
                update_mask=field_mask_pb2.FieldMask(paths=["complaint"]),
            ),
            metadata=MANAGER,
        ),
        grpc.StatusCode.ABORTED,
    )
    view = fails(
        lambda: cats.UpdateCategory(
            pb.UpdateCategoryRequest(
                category=pb.Category(name=c.name, key="other"), update_mask=field_mask_pb2.FieldMask(paths=["key"])
            ),
            metadata=MANAGER,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields_of(view) == ["update_mask"]
    # in use by a ticket: deactivated, not deleted
    new_ticket(stub, category=c.name)
    gone = cats.DeleteCategory(pb.DeleteCategoryRequest(name=c.name), metadata=MANAGER)
    assert gone.deactivated and not gone.category.active
    listed = [x.name for x in cats.ListCategories(pb.ListCategoriesRequest(page_size=1000), metadata=AGENT).categories]
    assert c.name not in listed and plain.name in listed
    everything = cats.ListCategories(pb.ListCategoriesRequest(show_inactive=True, page_size=1000), metadata=AGENT)
    assert c.name in [x.name for x in everything.categories]
    assert cats.GetCategory(pb.GetCategoryRequest(name=c.name), metadata=AGENT).active is False
    unused = new_category(cats)
    assert not cats.DeleteCategory(pb.DeleteCategoryRequest(name=unused.name), metadata=MANAGER).deactivated
    fails(lambda: cats.GetCategory(pb.GetCategoryRequest(name=unused.name), metadata=AGENT), grpc.StatusCode.NOT_FOUND)
    keys, token = [], ""
    while True:
        page = cats.ListCategories(pb.ListCategoriesRequest(page_size=2, page_token=token), metadata=AGENT)
        keys += [x.key for x in page.categories]
        token = page.next_page_token
        if not token:
            break
    assert keys == sorted(keys) and len(keys) == len(set(keys)) == len(listed)


# -- HTTP through the gateway ---------------------------------------------------------------------------------


def test_http_create_get_and_a_bad_field(svc):
    from crm_gateway import create_app
    from crm_gateway.clients import Clients

    app = create_app(
        Clients(
            {
                "customer": "127.0.0.1:9",
                "sales": "127.0.0.1:9",
                "support": f"127.0.0.1:{svc.port}",
                "reporting": "127.0.0.1:9",
            }
        )
    )
    http = app.test_client()
    auth = {"Authorization": f"Bearer {token('support_agent', 'omid')}"}
    resp = http.post(
        "/v1/tickets",
        json={
            "ticket": {"subject": "تماس: قطعی اینترنت", "channel": "CHANNEL_PHONE", "contactAddress": "09121112233"},
            "body": "از صبح قطع است",
        },
        headers={**auth, "Idempotency-Key": str(uuid.uuid4())},
    )
    assert resp.status_code == 201, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["contactAddress"] == "+989121112233" and body["state"] == "STATE_NEW"
    assert resp.headers["Location"] == f"/v1/{body['name']}" and resp.headers["ETag"] == body["etag"]
    got = http.get(f"/v1/{body['name']}", headers=auth)
    assert got.status_code == 200 and got.get_json()["number"] == body["number"]
    assert_problem(
        http.post("/v1/tickets", json={"ticket": {"channel": "CHANNEL_PHONE"}}, headers=auth), 400, "ticket.subject"
    )
    msg = http.post(
        f"/v1/{body['name']}/messages",
        json={
            "kind": "KIND_NOTE",
            "attachments": [
                {"filename": "a.txt", "contentType": "text/plain", "content": "aGVsbG8="},
                {"filename": "رسید.txt", "contentType": "text/plain", "content": "aGVsbG8="},
            ],
        },
        headers=auth,
    )
    assert msg.status_code == 201, msg.get_data(as_text=True)
    download = http.get(f"/v1/{msg.get_json()['name']}/attachments/1", headers=auth)
    assert download.status_code == 200 and download.data == b"hello" and download.content_type.startswith("text/plain")
    assert len(msg.get_json()["attachments"]) == 2, msg.get_json()
    persian = http.get(f"/v1/{msg.get_json()['name']}/attachments/2", headers=auth)
    assert persian.status_code == 200 and persian.data == b"hello", persian.get_data(as_text=True)
    downloads = {r.headers["Content-Disposition"] for r in (download, persian)}
    for header in downloads:
        header.encode("latin-1")  # what an HTTP server can send
    assert 'attachment; filename="a.txt"' in downloads
    assert "filename*=UTF-8''%D8%B1%D8%B3%DB%8C%D8%AF.txt" in " ".join(downloads)
    listed = http.get("/v1/tickets?filter=state%20%3D%20NEW&page_size=1", headers=auth)
    assert listed.status_code == 200 and len(listed.get_json()["tickets"]) == 1
