"""CTI: signed call events from a PBX become call logs with their tickets, durations, callbacks
and after-call work; through gRPC and (the public route) the gateway."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import uuid

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2

from crm.support.v1 import calls_pb2 as pb
from crm.support.v1 import calls_pb2_grpc
from crm.support.v1 import support_events_pb2 as ev
from crm_chassis.errors import read_rpc_error
from support_svc import customer_projection
from support_svc.calls import calls as call_rows
from support_svc.calls import derive, parse_event
from support_svc.tables import agents, ticket_messages, tickets
from tests.support.customers import customer_message
from tests.support.harness import assert_problem, md, token

from .conftest import agent_md, events, make_agent, open_ticket, rt

KEY = b"dev-cti-key"
PBX = "dev-pbx"
PUBLIC = md("public_channel", "gateway:public")
T0 = dt.datetime(2026, 3, 1, 10, 0, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def stub(ch):
    return calls_pb2_grpc.CallServiceStub(ch)


def body_of(call_id, event, at, **fields) -> bytes:
    data = {"call_id": call_id, "event": event, "direction": "inbound", "time": at.isoformat(), **fields}
    return json.dumps(data).encode()


def signed(body: bytes, key: bytes = KEY) -> str:
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def post(stub, call_id, event, at, key=KEY, **fields) -> pb.PostCallEventResponse:
    body = body_of(call_id, event, at, **fields)
    req = pb.PostCallEventRequest(pbx=PBX, body=body, signature=signed(body, key))
    return stub.PostCallEvent(req, metadata=PUBLIC)


def customer(svc, mobile: str) -> str:
    handlers = customer_projection.subscriptions(rt(svc))[0].handlers
    e = customer_message("customer.created.v1", display_name="سارا", mobile=mobile)
    with svc.ctx.engine.begin() as conn:
        handlers[e.routing_key](conn, e)
    return e.subject.removeprefix("customers/")


def call_row(svc, name: str):
    with svc.ctx.engine.connect() as conn:
        return conn.execute(sa.select(call_rows).where(call_rows.c.id == name.removeprefix("calls/"))).one()


def messages(svc, ticket_id):
    with svc.ctx.engine.connect() as conn:
        return conn.execute(
            sa.select(ticket_messages)
            .where(ticket_messages.c.ticket_id == ticket_id)
            .order_by(ticket_messages.c.create_time, ticket_messages.c.id)
        ).all()


def busy_until(svc, agent_id):
    with svc.ctx.engine.connect() as conn:
        return conn.execute(sa.select(agents.c.busy_until).where(agents.c.id == agent_id)).scalar()


def fresh_mobile() -> str:
    return "+98912" + str(uuid.uuid4().int)[:7]


def test_durations_and_outcomes_come_from_the_times():
    assert derive(T0, T0 + dt.timedelta(seconds=12), T0 + dt.timedelta(seconds=92), "normal") == (12, 80, "answered")
    assert derive(T0, None, T0 + dt.timedelta(seconds=30), "no_answer") == (30, 0, "missed")
    assert derive(T0, None, T0 + dt.timedelta(seconds=5), "abandoned").outcome == "abandoned"
    assert derive(T0, None, None, "") == (0, 0, "")
    # clocks a little apart never give negative seconds
    assert derive(T0, T0 - dt.timedelta(seconds=1), T0 + dt.timedelta(seconds=3), "normal")[:2] == (0, 4)
    e = parse_event(body_of("c", "new", T0, caller="09121234567"), "IR")
    assert e.number == "+989121234567" and e.time == T0


def test_a_signed_call_is_logged_once_with_its_customer_ticket_and_times(svc, stub):
    mobile = fresh_mobile()
    cid = customer(svc, mobile)
    make_agent(svc, "omid")
    national = "0" + mobile.removeprefix("+98")  # the PBX shows the national form
    cid_ = f"1700000000.{uuid.uuid4().hex[:6]}"
    seq = [
        ("new", T0, {"caller": national, "callee": "02188776655", "queue": "support"}),
        ("answered", T0 + dt.timedelta(seconds=12), {"caller": national, "agent": "omid"}),
        ("hangup", T0 + dt.timedelta(seconds=92), {"caller": national, "cause": "normal"}),
    ]
    names = {post(stub, cid_, e, at, **f).call for e, at, f in seq}
    assert len(names) == 1
    name = names.pop()
    call = stub.GetCall(pb.GetCallRequest(name=name), metadata=agent_md("omid"))
    assert call.customer == f"customers/{cid}" and call.number == mobile and call.caller == mobile
    assert call.queue == "support" and call.agent == "agents/omid"
    assert call.queue_seconds == 12 and call.talk_seconds == 80
    assert call.outcome == pb.Call.OUTCOME_ANSWERED and call.direction == pb.Call.DIRECTION_INBOUND
    assert call.start_time.ToDatetime(tzinfo=dt.UTC) == T0
    assert call.end_time.ToDatetime(tzinfo=dt.UTC) == T0 + dt.timedelta(seconds=92)
    # a new phone ticket for the customer, assigned to the agent who answered, with the summary
    tid = call.ticket.removeprefix("tickets/")
    with svc.ctx.engine.connect() as conn:
        t = conn.execute(sa.select(tickets).where(tickets.c.id == tid)).one()
    assert t.channel == "phone" and t.customer_id == cid and t.subject == f"تماس از {mobile}"
    assert t.assignee_id == "omid" and t.contact_address == mobile
    bodies = [m.body for m in messages(svc, tid)]
    assert len(bodies) == 2 and "مکالمه 80 ثانیه" in bodies[-1] and name in bodies[-1]
    logged = events(svc, "call.logged.v1", ev.CallEvent, subject=name)
    assert len(logged) == 1
    assert (logged[0].outcome, logged[0].queue_seconds, logged[0].talk_seconds) == ("answered", 12, 80)
    assert logged[0].customer == f"customers/{cid}" and logged[0].ticket == call.ticket
    assert logged[0].version == int(call.etag.strip('"'))  # a consumer keeps the newest by it
    # after-call work: the agent is busy until end + 60 s (the default)
    assert busy_until(svc, "omid") == T0 + dt.timedelta(seconds=92 + 60)

    # the same events again change nothing
    again = [post(stub, cid_, e, at, **f) for e, at, f in seq]
    assert all(r.duplicate and r.call == name for r in again)
    same = stub.GetCall(pb.GetCallRequest(name=name), metadata=agent_md("omid"))
    assert same == call
    assert len(events(svc, "call.logged.v1", subject=name)) == 1
    assert len(messages(svc, tid)) == 2
    with svc.ctx.engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).where(call_rows.c.external_id == cid_)).scalar()
    assert n == 1


def test_a_call_joins_the_customers_open_phone_ticket(svc, stub):
    mobile = fresh_mobile()
    cid = customer(svc, mobile)
    t = open_ticket(svc, subject="اینترنت قطع است", channel="phone", contact_address=mobile, body="قطعی")
    assert t.customer_id == cid
    call_id = uuid.uuid4().hex
    r = post(stub, call_id, "new", T0, caller=mobile, queue="support")
    assert call_row(svc, r.call).ticket_id == str(t.id)  # linked on `new`
    post(stub, call_id, "answered", T0 + dt.timedelta(seconds=3), caller=mobile, agent="agent-x")
    post(stub, call_id, "hangup", T0 + dt.timedelta(seconds=40), caller=mobile)
    row = call_row(svc, r.call)
    assert row.ticket_id == str(t.id) and row.outcome == "answered"
    with svc.ctx.engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).where(tickets.c.customer_id == cid)).scalar()
    assert n == 1  # no second ticket
    assert "مکالمه 37 ثانیه" in messages(svc, t.id)[-1].body


def test_events_out_of_order_still_give_the_right_call(svc, stub):
    make_agent(svc, "neda")
    mobile = fresh_mobile()
    call_id = uuid.uuid4().hex
    # hangup before answered: logged as missed at first, corrected when `answered` arrives
    post(stub, call_id, "new", T0, caller=mobile, queue="sales")
    r = post(stub, call_id, "hangup", T0 + dt.timedelta(seconds=100), caller=mobile)
    assert call_row(svc, r.call).outcome == "missed"
    post(stub, call_id, "answered", T0 + dt.timedelta(seconds=20), caller=mobile, agent="neda")
    row = call_row(svc, r.call)
    assert (row.outcome, row.queue_seconds, row.talk_seconds) == ("answered", 20, 80)
    assert row.ticket_id is not None  # every answered call has a ticket
    assert events(svc, "call.logged.v1", ev.CallEvent, subject=r.call)[-1].outcome == "answered"
    assert busy_until(svc, "neda") == T0 + dt.timedelta(seconds=160)
    open_ = stub.ListCallbacks(pb.ListCallbacksRequest(filter=f'number = "{mobile}"'), metadata=agent_md("neda"))
    assert [(c.state, c.outcome) for c in open_.callbacks] == [(pb.Callback.STATE_DONE, "answered")]

    # answered and hangup before new: the start comes from `new` when it arrives
    other = uuid.uuid4().hex
    post(stub, other, "answered", T0 + dt.timedelta(seconds=15), caller=mobile, agent="neda")
    r2 = post(stub, other, "hangup", T0 + dt.timedelta(seconds=75), caller=mobile)
    assert call_row(svc, r2.call).queue_seconds == 0
    post(stub, other, "new", T0 + dt.timedelta(seconds=5), caller=mobile)
    row = call_row(svc, r2.call)
    assert (row.start_time, row.queue_seconds, row.talk_seconds) == (T0 + dt.timedelta(seconds=5), 10, 60)
    assert events(svc, "call.logged.v1", ev.CallEvent, subject=r2.call)[-1].queue_seconds == 10


def test_a_missed_call_leaves_a_callback_that_an_agent_completes(svc, stub):
    mobile = fresh_mobile()
    cid = customer(svc, mobile)
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    post(stub, first, "new", T0, caller=mobile, queue="support")
    r = post(stub, first, "hangup", T0 + dt.timedelta(seconds=45), caller=mobile, cause="no_answer")
    row = call_row(svc, r.call)
    assert (row.outcome, row.queue_seconds, row.talk_seconds, row.ticket_id) == ("missed", 45, 0, None)
    assert events(svc, "call.logged.v1", ev.CallEvent, subject=r.call)[0].outcome == "missed"
    post(stub, second, "new", T0 + dt.timedelta(minutes=5), caller=mobile)
    r2 = post(stub, second, "hangup", T0 + dt.timedelta(minutes=5, seconds=9), caller=mobile, cause="abandoned")
    assert call_row(svc, r2.call).outcome == "abandoned"

    found = stub.ListCallbacks(
        pb.ListCallbacksRequest(filter=f'state = OPEN AND customer = "customers/{cid}"'), metadata=agent_md("omid")
    ).callbacks
    assert len(found) == 1  # one open callback per number
    callback = found[0]
    assert callback.number == mobile and callback.missed_count == 2 and callback.call == r2.call
    assert callback.queue == "support"
    with pytest.raises(grpc.RpcError) as err:
        stub.CompleteCallback(
            pb.CompleteCallbackRequest(name=callback.name, outcome="sleep"), metadata=agent_md("omid")
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in read_rpc_error(err.value).field_violations] == ["outcome"]
    done = stub.CompleteCallback(
        pb.CompleteCallbackRequest(name=callback.name, outcome="reached", note="حل شد", etag=callback.etag),
        metadata=agent_md("omid"),
    )
    assert done.state == pb.Callback.STATE_DONE and done.completed_by == "omid" and done.outcome == "reached"
    with pytest.raises(grpc.RpcError) as err:
        stub.CompleteCallback(
            pb.CompleteCallbackRequest(name=callback.name, outcome="reached"), metadata=agent_md("omid")
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # a new missed call after that opens a new callback
    third = uuid.uuid4().hex
    post(stub, third, "hangup", T0 + dt.timedelta(hours=1), caller=mobile, cause="no_answer")
    again = stub.ListCallbacks(
        pb.ListCallbacksRequest(filter=f'number = "{mobile}" AND state = OPEN'), metadata=agent_md("omid")
    )
    assert [c.missed_count for c in again.callbacks] == [1]


def test_an_answered_outbound_call_to_the_number_closes_its_callback(svc, stub):
    mobile = fresh_mobile()
    post(stub, uuid.uuid4().hex, "hangup", T0, caller=mobile, cause="no_answer")
    out = uuid.uuid4().hex
    kw = {"direction": "outbound", "caller": "101", "callee": mobile}
    post(stub, out, "new", T0 + dt.timedelta(minutes=10), **kw)
    post(stub, out, "answered", T0 + dt.timedelta(minutes=10, seconds=8), agent="omid", **kw)
    r = post(stub, out, "hangup", T0 + dt.timedelta(minutes=12), **kw)
    row = call_row(svc, r.call)
    assert row.direction == "outbound" and row.number == mobile and row.callee == mobile and row.caller == "101"
    found = stub.ListCallbacks(pb.ListCallbacksRequest(filter=f'number = "{mobile}"'), metadata=agent_md("omid"))
    assert [(c.state, c.outcome) for c in found.callbacks] == [(pb.Callback.STATE_DONE, "reached_by_call")]


def test_a_bad_signature_is_unauthenticated_and_a_bad_field_is_named(svc, stub):
    body = body_of("x1", "new", T0, caller="09120000001")
    for req in (
        pb.PostCallEventRequest(pbx=PBX, body=body, signature=signed(body, b"wrong-key")),
        pb.PostCallEventRequest(pbx=PBX, body=body),
        pb.PostCallEventRequest(pbx="other-pbx", body=body, signature=signed(body)),
        pb.PostCallEventRequest(pbx=PBX, body=body + b" ", signature=signed(body)),
    ):
        with pytest.raises(grpc.RpcError) as err:
            stub.PostCallEvent(req, metadata=PUBLIC)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with svc.ctx.engine.connect() as conn:
        assert not conn.execute(sa.select(sa.func.count()).where(call_rows.c.external_id == "x1")).scalar()

    bad = json.dumps({"call_id": "x2", "event": "ringing", "direction": "sideways", "time": "yesterday"}).encode()
    with pytest.raises(grpc.RpcError) as err:
        stub.PostCallEvent(pb.PostCallEventRequest(pbx=PBX, body=bad, signature=signed(bad)), metadata=PUBLIC)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {v.field for v in read_rpc_error(err.value).field_violations} == {"event", "direction", "time"}
    # staff cannot post events, and the public role cannot read calls
    with pytest.raises(grpc.RpcError) as err:
        stub.ListCalls(pb.ListCallsRequest(), metadata=PUBLIC)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture(scope="module")
def http(svc):
    from crm_gateway import create_app
    from crm_gateway.clients import Clients

    clients = Clients(
        {
            "customer": "127.0.0.1:9",
            "sales": "127.0.0.1:9",
            "support": f"127.0.0.1:{svc.port}",
            "reporting": "127.0.0.1:9",
        }
    )
    return create_app(clients).test_client()


def test_the_gateway_route_takes_signed_events_without_a_token(svc, http):
    mobile = fresh_mobile()
    body = body_of("h-" + uuid.uuid4().hex, "hangup", T0, caller=mobile, cause="busy")
    resp = http.post(f"/v1/cti/{PBX}:event", data=body, headers={"X-Crm-Signature": "sha256=" + "0" * 64})
    assert_problem(resp, 401)
    resp = http.post(f"/v1/cti/{PBX}:event", data=body)
    assert_problem(resp, 401)
    resp = http.post(
        f"/v1/cti/{PBX}:event", data=body, headers={"X-Crm-Signature": signed(body), "Content-Type": "application/json"}
    )
    assert resp.status_code == 200, resp.get_data(as_text=True)
    name = resp.get_json()["call"]
    assert call_row(svc, name).outcome == "busy"
    bad = json.dumps({"call_id": "h2", "event": "new", "direction": "inbound", "caller": mobile}).encode()
    resp = http.post(f"/v1/cti/{PBX}:event", data=bad, headers={"X-Crm-Signature": signed(bad)})
    assert_problem(resp, 400, field="time")
    # staff read it back over HTTP with a bearer token
    resp = http.get(f"/v1/{name}", headers={"Authorization": f"Bearer {token('support_agent', 'omid')}"})
    assert resp.status_code == 200 and resp.get_json()["outcome"] == "OUTCOME_BUSY"


def test_calls_are_listed_by_filter_in_keyset_pages_and_updated_with_an_etag(svc, stub):
    make_agent(svc, "lale")
    mobile = fresh_mobile()
    names = []
    for i in range(3):
        call_id = uuid.uuid4().hex
        at = T0 + dt.timedelta(days=2, minutes=i)
        post(stub, call_id, "new", at, caller=mobile, queue="vip")
        post(stub, call_id, "answered", at + dt.timedelta(seconds=2), caller=mobile, agent="lale")
        names.append(post(stub, call_id, "hangup", at + dt.timedelta(seconds=30), caller=mobile).call)
    md_ = agent_md("lale")
    seen, token_ = [], ""
    while True:
        page = stub.ListCalls(
            pb.ListCallsRequest(filter='agent = "agents/lale" AND outcome = ANSWERED', page_size=2, page_token=token_),
            metadata=md_,
        )
        seen += [c.name for c in page.calls]
        token_ = page.next_page_token
        if not token_:
            break
    assert seen == names[::-1]  # newest first
    assert not stub.ListCalls(pb.ListCallsRequest(filter='queue = "vip" AND direction = OUTBOUND'), metadata=md_).calls
    with pytest.raises(grpc.RpcError) as err:
        stub.ListCalls(pb.ListCallsRequest(filter="colour = 1"), metadata=md_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    call = stub.GetCall(pb.GetCallRequest(name=names[0]), metadata=md_)
    other = open_ticket(svc, subject="پیگیری", channel="phone", contact_address=mobile)
    updated = stub.UpdateCall(
        pb.UpdateCallRequest(
            call=pb.Call(
                name=call.name, disposition="resolved", note="ok", ticket=f"tickets/{other.id}", etag=call.etag
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["disposition", "note", "ticket"]),
        ),
        metadata=md_,
    )
    assert updated.disposition == "resolved" and updated.ticket == f"tickets/{other.id}" and updated.etag != call.etag
    assert events(svc, "call.logged.v1", ev.CallEvent, subject=call.name)[-1].disposition == "resolved"
    assert any(call.name in m.body for m in messages(svc, other.id))
    with pytest.raises(grpc.RpcError) as err:  # the old etag is stale
        stub.UpdateCall(
            pb.UpdateCallRequest(
                call=pb.Call(name=call.name, disposition="sale", etag=call.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["disposition"]),
            ),
            metadata=md_,
        )
    assert err.value.code() == grpc.StatusCode.ABORTED
    for c, field in (
        (pb.Call(name=call.name, disposition="Not A Key"), "call.disposition"),
        (pb.Call(name=call.name, ticket="tickets/00000000-0000-0000-0000-000000000000"), "call.ticket"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            stub.UpdateCall(
                pb.UpdateCallRequest(call=c, update_mask=field_mask_pb2.FieldMask(paths=["disposition", "ticket"])),
                metadata=md_,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in [v.field for v in read_rpc_error(err.value).field_violations]


def test_erasing_the_customer_blanks_their_calls_and_callbacks(svc, stub):
    """customer.erased.v1: the numbers of the customer's calls and missed-call callbacks go, the
    call facts (times, outcome) stay; another customer's calls keep theirs."""
    from support_svc.calls import callbacks

    mobile, other = fresh_mobile(), fresh_mobile()
    cid = customer(svc, mobile)
    customer(svc, other)
    for number, call_id in ((mobile, f"er-{uuid.uuid4().hex[:8]}"), (other, f"er-{uuid.uuid4().hex[:8]}")):
        post(stub, call_id, "new", T0, caller=number, queue="support")
        post(stub, call_id, "hangup", T0 + dt.timedelta(seconds=20), caller=number, queue="support", cause="no_answer")
    erased = customer_message("customer.erased.v1", cid=cid, version=9)
    handlers = customer_projection.subscriptions(rt(svc))[0].handlers
    with svc.ctx.engine.begin() as conn:
        handlers[erased.routing_key](conn, erased)
    with svc.ctx.engine.connect() as conn:
        mine = conn.execute(sa.select(call_rows).where(call_rows.c.customer_id == cid)).all()
        cbs = conn.execute(sa.select(callbacks).where(callbacks.c.customer_id == cid)).all()
        kept = conn.execute(sa.select(call_rows.c.number).where(call_rows.c.number == other)).all()
    assert mine and all(r.number == "" and r.caller == "" for r in mine)
    assert all(r.outcome == "missed" and r.queue_seconds == 20 for r in mine)
    assert cbs and all(r.number == "" for r in cbs)
    assert kept
