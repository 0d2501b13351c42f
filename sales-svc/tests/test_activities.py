"""Activities and reminders: validation naming fields, record-level access, the agenda on
Asia/Tehran days, reminders as durable timers (fired once, moved, cancelled), lead touches, and
one HTTP route through the gateway."""

from __future__ import annotations

import datetime as dt
import time
import uuid

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2

from crm.sales.v1 import activities_pb2 as pb
from crm.sales.v1 import activities_pb2_grpc, sales_events_pb2
from crm_chassis import timers
from crm_chassis.errors import read_rpc_error
from sales_svc import activities as activities_module
from sales_svc.tables import leads, opportunities, pipelines, stages
from tests.support.harness import assert_problem, token, wait_for

from .conftest import ADMIN, events, make_team, manager, rep

UTC = dt.UTC
A = pb.Activity


@pytest.fixture(scope="module")
def stub(ch):
    return activities_pb2_grpc.ActivityServiceStub(ch)


def sub(prefix: str) -> str:
    """A subject of its own per test, so tests do not see each other's activities."""
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def new_lead(svc, owner: str, customer_id: str = "", team_id: str | None = None) -> str:
    with svc.ctx.engine.begin() as conn:
        return conn.execute(
            leads.insert()
            .values(given_name="Sara", family_name="Ahmadi", owner_id=owner, customer_id=customer_id, team_id=team_id)
            .returning(leads.c.id)
        ).scalar()


def new_opportunity(svc, owner: str, customer_id: str) -> str:
    with svc.ctx.engine.begin() as conn:
        pid = conn.execute(
            pipelines.insert().values(name=f"p-{uuid.uuid4().hex[:6]}").returning(pipelines.c.id)
        ).scalar()
        sid = conn.execute(
            stages.insert().values(pipeline_id=pid, position=0, name="New", probability=10).returning(stages.c.id)
        ).scalar()
        return conn.execute(
            opportunities.insert()
            .values(
                name="Deal",
                customer_id=customer_id,
                pipeline_id=pid,
                stage_id=sid,
                currency_code="IRR",
                probability=10,
                owner_id=owner,
            )
            .returning(opportunities.c.id)
        ).scalar()


def create(stub, md, request_id: str = "", **fields) -> pb.Activity:
    fields.setdefault("kind", A.KIND_TASK)
    fields.setdefault("subject", "Follow up")
    act = A(**{k: v for k, v in fields.items() if not isinstance(v, dt.datetime)})
    for k, v in fields.items():
        if isinstance(v, dt.datetime):
            getattr(act, k).FromDatetime(v)
    return stub.CreateActivity(pb.CreateActivityRequest(activity=act, request_id=request_id), metadata=md, timeout=10)


def error(call) -> tuple[grpc.StatusCode, list[str], str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    view = read_rpc_error(info.value)
    return view.code, [v.field for v in view.field_violations], view.reason or ""


def names(resp) -> list[str]:
    return [x.name for x in resp.activities]


def test_create_on_a_lead_copies_its_customer_touches_it_and_publishes(svc, stub):
    owner = sub("rita")
    customer_id = str(uuid.uuid4())
    lead_id = new_lead(svc, owner, customer_id)
    due = dt.datetime.now(UTC) + dt.timedelta(days=2)
    act = create(
        stub,
        rep(owner),
        kind=A.KIND_CALL,
        subject="Intro call",
        lead=f"leads/{lead_id}",
        direction=A.DIRECTION_OUTBOUND,
        due_time=due,
        remind_time=due - dt.timedelta(hours=1),
    )
    assert act.name.startswith("activities/") and act.regarding == f"leads/{lead_id}"
    assert act.customer == f"customers/{customer_id}" and act.owner == owner and act.creator == owner
    assert act.etag == '"1"' and not act.done
    got = stub.GetActivity(pb.GetActivityRequest(name=act.name), metadata=rep(owner), timeout=10)
    assert got == act
    with svc.ctx.engine.connect() as conn:
        touched, version = conn.execute(
            sa.select(leads.c.touch_time, leads.c.version).where(leads.c.id == lead_id)
        ).one()
        reminder = timers.get(conn, activities_module.REMINDER, act.name.split("/")[1])
    assert touched is not None and abs((touched - act.create_time.ToDatetime(UTC)).total_seconds()) < 1
    assert version == 1  # a touch is not an edit of the lead
    assert reminder is not None and reminder.due_at == act.remind_time.ToDatetime(UTC)
    [ev] = [e for e in events(svc, "activity.created.v1", sales_events_pb2.ActivityEvent) if e.activity == act.name]
    assert (ev.kind, ev.regarding, ev.customer, ev.owner) == ("call", act.regarding, act.customer, owner)


def test_an_opportunity_or_a_customer_can_be_what_it_is_about(svc, stub):
    owner = sub("omid")
    cid = str(uuid.uuid4())
    opp = new_opportunity(svc, owner, cid)
    on_opp = create(stub, rep(owner), kind=A.KIND_MEETING, opportunity=f"opportunities/{opp}")
    assert on_opp.regarding == f"opportunities/{opp}" and on_opp.customer == f"customers/{cid}"
    on_customer = create(stub, rep(owner), kind=A.KIND_EMAIL, customer=f"customers/{cid}")
    assert on_customer.regarding == f"customers/{cid}"
    # a customer's list holds both: about the customer and about their opportunity
    listed = stub.ListActivities(pb.ListActivitiesRequest(parent=f"customers/{cid}"), metadata=rep(owner), timeout=10)
    assert set(names(listed)) == {on_opp.name, on_customer.name}
    only_opp = stub.ListActivities(
        pb.ListActivitiesRequest(parent=f"opportunities/{opp}"), metadata=rep(owner), timeout=10
    )
    assert names(only_opp) == [on_opp.name]


def test_the_same_request_id_creates_one_activity(svc, stub):
    owner = sub("reza")
    lead_id = new_lead(svc, owner)
    rid = uuid.uuid4().hex
    first = create(stub, rep(owner), rid, lead=f"leads/{lead_id}")
    again = create(stub, rep(owner), rid, lead=f"leads/{lead_id}", subject="something else")
    assert again == first
    with svc.ctx.engine.connect() as conn:
        n = conn.execute(sa.text("SELECT count(*) FROM activities WHERE request_id = :r"), {"r": rid}).scalar()
    assert n == 1
    # another caller cannot replay someone else's key to read their activity
    code, _, reason = error(lambda: create(stub, rep(sub("eve")), rid, customer=f"customers/{uuid.uuid4()}"))
    assert code == grpc.StatusCode.ALREADY_EXISTS and reason == "REQUEST_ID_REUSED"


def test_bad_input_names_the_fields(svc, stub):
    owner = sub("nima")
    lead_id = new_lead(svc, owner)
    other_lead = new_lead(svc, sub("someone"))
    cust = f"customers/{uuid.uuid4()}"
    due = dt.datetime(2026, 5, 1, 9, tzinfo=UTC)
    cases = {
        "no regarding": (dict(), ["activity.regarding"]),
        "two regardings": (dict(lead=f"leads/{lead_id}", customer=cust), ["activity.lead", "activity.customer"]),
        "remind after due": (
            dict(customer=cust, due_time=due, remind_time=due + dt.timedelta(minutes=5)),
            ["activity.remind_time"],
        ),
        "remind without due": (dict(customer=cust, remind_time=due), ["activity.remind_time"]),
        "unknown lead": (dict(lead=f"leads/{uuid.uuid4()}"), ["activity.lead"]),
        "another rep's lead": (dict(lead=f"leads/{other_lead}"), ["activity.lead"]),
        "not a lead name": (dict(lead="leads/42"), ["activity.lead"]),
        "no kind": (dict(kind=A.KIND_UNSPECIFIED, customer=cust), ["activity.kind"]),
        "empty subject": (dict(subject="  ", customer=cust), ["activity.subject"]),
        "call outcome": (dict(kind=A.KIND_CALL, customer=cust, outcome="sold_everything"), ["activity.outcome"]),
        "meeting direction": (
            dict(kind=A.KIND_MEETING, customer=cust, direction=A.DIRECTION_INBOUND),
            ["activity.direction"],
        ),
        "negative duration": (dict(customer=cust, duration_seconds=-1), ["activity.duration_seconds"]),
        "unknown team": (dict(customer=cust, team=f"teams/{uuid.uuid4()}"), ["activity.team"]),
    }
    for what, (fields, expected) in cases.items():
        md = ADMIN if what == "unknown team" else rep(owner)
        code, fields_named, _ = error(lambda f=fields, m=md: create(stub, m, **f))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, what
        assert sorted(fields_named) == sorted(expected), (what, fields_named)
    with svc.ctx.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM activities WHERE owner_id = :o"), {"o": owner}).scalar() == 0


def test_a_rep_sees_only_their_own_and_a_manager_their_teams(svc, stub):
    ali, bita, outsider = sub("ali"), sub("bita"), sub("cyrus")
    boss, other_boss = sub("boss"), sub("boss2")
    make_team(svc, f"team-{uuid.uuid4().hex[:6]}", boss, [ali])
    make_team(svc, f"team-{uuid.uuid4().hex[:6]}", other_boss, [outsider])
    mine = create(stub, rep(ali), lead=f"leads/{new_lead(svc, ali)}")
    theirs = create(stub, rep(bita), lead=f"leads/{new_lead(svc, bita)}")

    code, _, _ = error(lambda: stub.GetActivity(pb.GetActivityRequest(name=theirs.name), metadata=rep(ali), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND
    listed = stub.ListActivities(pb.ListActivitiesRequest(page_size=1000), metadata=rep(ali), timeout=10)
    assert mine.name in names(listed) and theirs.name not in names(listed)
    assert {x.owner for x in listed.activities} == {ali}
    # nor change or complete it
    code, _, _ = error(
        lambda: stub.CompleteActivity(pb.CompleteActivityRequest(name=theirs.name), metadata=rep(ali), timeout=10)
    )
    assert code == grpc.StatusCode.NOT_FOUND

    # the manager of ali's team sees ali's, not bita's; another team's manager sees neither
    by_boss = stub.ListActivities(pb.ListActivitiesRequest(page_size=1000), metadata=manager(boss), timeout=10)
    assert mine.name in names(by_boss) and theirs.name not in names(by_boss)
    assert stub.GetActivity(pb.GetActivityRequest(name=mine.name), metadata=manager(boss), timeout=10) == mine
    code, _, _ = error(
        lambda: stub.GetActivity(pb.GetActivityRequest(name=mine.name), metadata=manager(other_boss), timeout=10)
    )
    assert code == grpc.StatusCode.NOT_FOUND

    # a rep cannot give an activity to someone else; the manager can, within the team
    code, _, reason = error(lambda: create(stub, rep(ali), customer=f"customers/{uuid.uuid4()}", owner=bita))
    assert code == grpc.StatusCode.PERMISSION_DENIED and reason == "ASSIGNMENT_NOT_ALLOWED"
    given = create(stub, manager(boss), customer=f"customers/{uuid.uuid4()}", owner=ali)
    assert given.owner == ali and given.creator == boss
    code, _, _ = error(lambda: create(stub, manager(boss), customer=f"customers/{uuid.uuid4()}", owner=bita))
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_overdue_and_today_follow_the_tehran_day(svc, stub, monkeypatch):
    # 2026-03-20 21:00 UTC is 00:30 on 2026-03-21 in Tehran (UTC+03:30): "today" there began
    # at 20:30 UTC the day before, so the UTC date would put these on the wrong days.
    now = dt.datetime(2026, 3, 20, 21, 0, tzinfo=UTC)
    monkeypatch.setattr(activities_module, "clock", lambda: now)
    owner = sub("tara")
    cust = f"customers/{uuid.uuid4()}"

    def at(when, **kw):
        return create(stub, rep(owner), customer=cust, due_time=when, subject=when.isoformat(), **kw).name

    late_week = at(dt.datetime(2026, 3, 14, 8, 0, tzinfo=UTC))  # overdue
    late_tehran_yesterday = at(dt.datetime(2026, 3, 20, 20, 20, tzinfo=UTC))  # 23:50 on the 20th in Tehran
    early_today = at(dt.datetime(2026, 3, 20, 20, 40, tzinfo=UTC))  # 00:10 on the 21st: today, and overdue
    late_today = at(dt.datetime(2026, 3, 21, 20, 25, tzinfo=UTC))  # 23:55 on the 21st: today
    tomorrow = at(dt.datetime(2026, 3, 21, 20, 35, tzinfo=UTC))  # 00:05 on the 22nd
    done_late = at(dt.datetime(2026, 3, 15, 8, 0, tzinfo=UTC), done=True)  # done: not overdue
    create(stub, rep(sub("other")), customer=cust, due_time=dt.datetime(2026, 3, 10, tzinfo=UTC))  # not the caller's

    def view(v, md=None, **kw):
        return stub.ListActivities(pb.ListActivitiesRequest(view=v, **kw), metadata=md or rep(owner), timeout=10)

    overdue = view(pb.ListActivitiesRequest.VIEW_OVERDUE)
    assert names(overdue) == [late_week, late_tehran_yesterday, early_today]  # oldest first
    today = view(pb.ListActivitiesRequest.VIEW_TODAY)
    assert names(today) == [early_today, late_today]
    assert tomorrow not in names(today) and done_late not in names(overdue)
    # keyset pages walk the same order
    page1 = view(pb.ListActivitiesRequest.VIEW_OVERDUE, page_size=2)
    page2 = view(pb.ListActivitiesRequest.VIEW_OVERDUE, page_size=2, page_token=page1.next_page_token)
    assert names(page1) + names(page2) == names(overdue) and not page2.next_page_token
    # a view is the caller's own, even for an admin; its order is fixed
    assert names(view(pb.ListActivitiesRequest.VIEW_OVERDUE, md=ADMIN)) == []
    code, fields, _ = error(lambda: view(pb.ListActivitiesRequest.VIEW_TODAY, order_by="create_time"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fields == ["order_by"]
    # and the agenda's index serves it
    with svc.ctx.engine.connect() as conn:
        conn.execute(sa.text("SET enable_seqscan = off"))
        plan = " ".join(
            r[0]
            for r in conn.execute(
                sa.text(
                    "EXPLAIN SELECT * FROM activities WHERE owner_id = :o AND NOT done AND due_time < now() "
                    "ORDER BY due_time, id LIMIT 51"
                ),
                {"o": owner},
            )
        )
    assert "activities_agenda" in plan, plan


def test_list_filters_orders_and_pages(svc, stub):
    owner = sub("lili")
    lead_id = new_lead(svc, owner)
    made = [
        create(stub, rep(owner), lead=f"leads/{lead_id}", kind=A.KIND_CALL if i % 2 else A.KIND_TASK) for i in range(5)
    ]
    on_lead = pb.ListActivitiesRequest(parent=f"leads/{lead_id}", page_size=2)
    seen, token = [], ""
    while True:
        on_lead.page_token = token
        page = stub.ListActivities(on_lead, metadata=rep(owner), timeout=10)
        seen += names(page)
        token = page.next_page_token
        if not token:
            break
    assert seen == [m.name for m in reversed(made)]  # newest first
    calls = stub.ListActivities(
        pb.ListActivitiesRequest(filter=f'kind = CALL AND lead = "leads/{lead_id}"', order_by="create_time"),
        metadata=rep(owner),
        timeout=10,
    )
    assert names(calls) == [made[1].name, made[3].name]
    for req, field in (
        (pb.ListActivitiesRequest(filter="colour = 1"), "filter"),
        (pb.ListActivitiesRequest(order_by="subject"), "order_by"),
        (pb.ListActivitiesRequest(parent="invoices/1"), "parent"),
        (pb.ListActivitiesRequest(page_token="nope"), "page_token"),
    ):
        code, fields, _ = error(lambda r=req: stub.ListActivities(r, metadata=rep(owner), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and fields == [field]


def reminders_of(svc, name: str) -> list:
    return [e for e in events(svc, "activity.reminder_due.v1", sales_events_pb2.ActivityEvent) if e.activity == name]


def test_a_reminder_fires_from_its_timer_once(svc, stub):
    owner = sub("mina")
    remind = dt.datetime.now(UTC) + dt.timedelta(seconds=1)
    act = create(
        stub,
        rep(owner),
        customer=f"customers/{uuid.uuid4()}",
        due_time=remind + dt.timedelta(minutes=30),
        remind_time=remind,
    )
    key = act.name.split("/")[1]
    [ev] = wait_for(lambda: reminders_of(svc, act.name), timeout=20, what="the reminder event")
    assert ev.owner == owner and ev.remind_time == act.remind_time and ev.due_time == act.due_time
    # the consumer's de-duplication key: the event's subject and the remind time
    [raw] = [e for e in events(svc, "activity.reminder_due.v1") if e.subject == act.name]
    assert raw.subject == act.name
    with svc.ctx.engine.connect() as conn:
        timer = timers.get(conn, activities_module.REMINDER, key)
        firings = conn.execute(
            sa.text("SELECT count(*) FROM timer_firings WHERE kind = :k AND key = :key AND ok"),
            {"k": activities_module.REMINDER, "key": key},
        ).scalar()
    assert timer is None and firings == 1  # a one-shot timer is gone once it fired
    time.sleep(2.5)  # more polls of the timer worker: nothing fires again
    assert len(reminders_of(svc, act.name)) == 1


def test_moving_the_reminder_moves_its_timer_and_stale_etags_are_refused(svc, stub):
    owner = sub("parsa")
    due = dt.datetime.now(UTC) + dt.timedelta(days=3)
    act = create(stub, rep(owner), customer=f"customers/{uuid.uuid4()}", due_time=due, remind_time=due)
    key = act.name.split("/")[1]
    changed = A(name=act.name, etag=act.etag)
    changed.remind_time.FromDatetime(due - dt.timedelta(days=1))
    mask = field_mask_pb2.FieldMask(paths=["remind_time"])
    moved = stub.UpdateActivity(pb.UpdateActivityRequest(activity=changed, update_mask=mask), metadata=rep(owner))
    assert moved.etag == '"2"' and moved.remind_time == changed.remind_time
    with svc.ctx.engine.connect() as conn:
        assert timers.get(conn, activities_module.REMINDER, key).due_at == due - dt.timedelta(days=1)
    code, _, reason = error(
        lambda: stub.UpdateActivity(pb.UpdateActivityRequest(activity=changed, update_mask=mask), metadata=rep(owner))
    )
    assert code == grpc.StatusCode.ABORTED and reason == "ETAG_MISMATCH"
    # moving due before the reminder names due_time; clearing the reminder cancels the timer
    early = A(name=act.name)
    early.due_time.FromDatetime(due - dt.timedelta(days=2))
    code, fields, _ = error(
        lambda: stub.UpdateActivity(
            pb.UpdateActivityRequest(activity=early, update_mask=field_mask_pb2.FieldMask(paths=["due_time"])),
            metadata=rep(owner),
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fields == ["activity.due_time"]
    code, fields, _ = error(
        lambda: stub.UpdateActivity(
            pb.UpdateActivityRequest(activity=early, update_mask=field_mask_pb2.FieldMask(paths=["kind"])),
            metadata=rep(owner),
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fields == ["update_mask"]
    cleared = stub.UpdateActivity(
        pb.UpdateActivityRequest(
            activity=A(name=act.name), update_mask=field_mask_pb2.FieldMask(paths=["remind_time"])
        ),
        metadata=rep(owner),
    )
    assert not cleared.HasField("remind_time")
    with svc.ctx.engine.connect() as conn:
        assert timers.get(conn, activities_module.REMINDER, key) is None


def test_completing_cancels_the_reminder_and_touches_the_lead(svc, stub):
    owner = sub("sina")
    lead_id = new_lead(svc, owner)
    remind = dt.datetime.now(UTC) + dt.timedelta(seconds=2)
    act = create(
        stub,
        rep(owner),
        kind=A.KIND_CALL,
        lead=f"leads/{lead_id}",
        due_time=remind + dt.timedelta(minutes=5),
        remind_time=remind,
    )
    key = act.name.split("/")[1]
    with svc.ctx.engine.begin() as conn:  # forget the create's touch, to see the completion's
        conn.execute(leads.update().where(leads.c.id == lead_id).values(touch_time=None))
    code, fields, _ = error(
        lambda: stub.CompleteActivity(
            pb.CompleteActivityRequest(name=act.name, outcome="great"), metadata=rep(owner), timeout=10
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fields == ["outcome"]
    done = stub.CompleteActivity(
        pb.CompleteActivityRequest(name=act.name, outcome="answered", duration_seconds=240, etag=act.etag),
        metadata=rep(owner),
        timeout=10,
    )
    assert done.done and done.HasField("complete_time") and (done.outcome, done.duration_seconds) == ("answered", 240)
    with svc.ctx.engine.connect() as conn:
        assert timers.get(conn, activities_module.REMINDER, key) is None
        assert conn.execute(sa.select(leads.c.touch_time).where(leads.c.id == lead_id)).scalar() is not None
    [ev] = [e for e in events(svc, "activity.completed.v1", sales_events_pb2.ActivityEvent) if e.activity == act.name]
    assert (ev.outcome, ev.duration_seconds, ev.complete_time) == ("answered", 240, done.complete_time)
    code, _, reason = error(
        lambda: stub.CompleteActivity(pb.CompleteActivityRequest(name=act.name), metadata=rep(owner), timeout=10)
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and reason == "ACTIVITY_ALREADY_DONE"
    time.sleep(3.5)  # past the remind time, with the worker polling: no reminder
    assert reminders_of(svc, act.name) == []


def test_deleting_removes_it_and_its_reminder(svc, stub):
    owner = sub("dara")
    due = dt.datetime.now(UTC) + dt.timedelta(days=1)
    act = create(stub, rep(owner), customer=f"customers/{uuid.uuid4()}", due_time=due, remind_time=due)
    stub.DeleteActivity(pb.DeleteActivityRequest(name=act.name, etag=act.etag), metadata=rep(owner), timeout=10)
    code, _, _ = error(lambda: stub.GetActivity(pb.GetActivityRequest(name=act.name), metadata=rep(owner), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND
    with svc.ctx.engine.connect() as conn:
        assert timers.get(conn, activities_module.REMINDER, act.name.split("/")[1]) is None


def test_http_routes_through_the_gateway(svc):
    from crm_gateway import create_app
    from crm_gateway.clients import Clients

    clients = Clients({"customer": "127.0.0.1:9", "sales": f"127.0.0.1:{svc.port}", "reporting": "127.0.0.1:9"})
    try:
        http = create_app(clients).test_client()
        owner = sub("hadi")
        lead_id = new_lead(svc, owner)
        headers = {"Authorization": f"Bearer {token('sales_rep', owner)}"}
        made = http.post(
            "/v1/activities",
            json={"kind": "KIND_CALL", "subject": "Call back", "lead": f"leads/{lead_id}"},
            headers={**headers, "Idempotency-Key": uuid.uuid4().hex},
        )
        assert made.status_code == 201, made.get_data(as_text=True)
        name = made.get_json()["name"]
        listed = http.get(f"/v1/activities?parent=leads/{lead_id}", headers=headers)
        assert listed.status_code == 200 and [x["name"] for x in listed.get_json()["activities"]] == [name]
        done = http.post(f"/v1/{name}:complete", json={"outcome": "busy"}, headers=headers)
        assert done.status_code == 200 and done.get_json()["done"] is True
        bad = http.post("/v1/activities", json={"kind": "KIND_TASK", "subject": "x"}, headers=headers)
        assert_problem(bad, 400, "regarding")  # the gateway names body fields without "activity."
    finally:
        clients.close()
