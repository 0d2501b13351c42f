"""Lead scoring and assignment (LeadRuleService, lead_rules.on_lead_saved, the untouched timer).

Until the leads part is merged, leads are inserted straight into the core `leads` table and
`on_lead_saved` is called in the same transaction, as LeadService will call it.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2, timestamp_pb2

from crm.sales.v1 import lead_rules_pb2 as pb
from crm.sales.v1 import lead_rules_pb2_grpc, sales_events_pb2, sales_service_pb2, sales_service_pb2_grpc
from crm_chassis import timers
from crm_chassis.audit import audit_entries
from crm_chassis.auth import Principal
from crm_chassis.errors import read_rpc_error
from crm_chassis.messaging.outbox import row_to_event
from crm_chassis.messaging.tables import outbox
from crm_chassis.work_tables import timers as timer_table
from sales_svc import lead_rules, rules_assignment
from sales_svc.rules_tables import assignment_cursors, assignment_rules, lead_behaviors, scoring_rules
from sales_svc.runtime import sales
from sales_svc.tables import leads, product_lines, team_members, teams
from tests.support.harness import md, token, wait_for

ADMIN = md("admin", "ada")
RR = pb.ASSIGNMENT_STRATEGY_ROUND_ROBIN
LEAST = pb.ASSIGNMENT_STRATEGY_LEAST_OPEN
FIXED = pb.ASSIGNMENT_STRATEGY_FIXED_OWNER


@pytest.fixture(scope="module")
def stub(ch):
    return lead_rules_pb2_grpc.LeadRuleServiceStub(ch)


@pytest.fixture(autouse=True)
def no_rules(svc):
    """Each test starts without rules (their effects on one another's leads would blur them)."""
    with svc.ctx.engine.begin() as conn:
        conn.execute(assignment_cursors.delete())
        conn.execute(assignment_rules.delete())
        conn.execute(scoring_rules.delete())
        conn.execute(timer_table.delete())
    yield


def error_of(fn):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return read_rpc_error(info.value)


def new_lead(svc, principal=None, **values) -> str:
    """A lead written as LeadService writes one: the row, then the hook, in one transaction."""
    with sales(svc.ctx).uow.begin() as tx:
        lid = tx.execute(leads.insert().values(**values).returning(leads.c.id)).scalar()
        lead_rules.on_lead_saved(tx, lid, True, principal)
    return str(lid)


def update_lead(svc, lid, principal, **values) -> None:
    with sales(svc.ctx).uow.begin() as tx:
        tx.execute(leads.update().where(leads.c.id == lid).values(**values, version=leads.c.version + 1))
        lead_rules.on_lead_saved(tx, lid, False, principal)


def lead(svc, lid):
    with svc.ctx.engine.connect() as conn:
        return conn.execute(sa.select(leads).where(leads.c.id == lid)).one()


def team(svc, name, members, manager="boss") -> str:
    with svc.ctx.engine.begin() as conn:
        tid = conn.execute(teams.insert().values(name=name, manager_id=manager).returning(teams.c.id)).scalar()
        conn.execute(team_members.insert(), [{"team_id": tid, "member_id": m} for m in members])
    return str(tid)


def events(svc, routing_key, subject=None):
    with svc.ctx.engine.connect() as conn:
        q = sa.select(outbox).where(outbox.c.routing_key == routing_key).order_by(outbox.c.id)
        if subject:
            q = q.where(outbox.c.subject == subject)
        return [row_to_event(r).parse(sales_events_pb2.LeadEvent) for r in conn.execute(q)]


def audit_actions(svc, resource):
    with svc.ctx.engine.connect() as conn:
        return (
            conn.execute(
                sa.select(audit_entries.c.action)
                .where(audit_entries.c.resource == resource)
                .order_by(audit_entries.c.id)
            )
            .scalars()
            .all()
        )


def scoring(stub, name, points, filter=None, request_id="", **behavior):
    rule = pb.ScoringRule(display_name=name, points=points)
    if filter is not None:
        rule.profile.filter = filter
    else:
        rule.behavior.CopyFrom(pb.BehaviorCondition(**behavior))
    return stub.CreateScoringRule(pb.CreateScoringRuleRequest(scoring_rule=rule, request_id=request_id), metadata=ADMIN)


def assignment(stub, name, strategy, position=0, team_id=None, owner="", hours=0.0, active=True, **match):
    rule = pb.AssignmentRule(
        display_name=name,
        position=position,
        active=active,
        strategy=strategy,
        team=f"teams/{team_id}" if team_id else "",
        owner=owner,
        untouched_hours=hours,
        match=pb.AssignmentMatch(**match),
    )
    return stub.CreateAssignmentRule(pb.CreateAssignmentRuleRequest(assignment_rule=rule), metadata=ADMIN)


def record(stub, lid, kind, key="", when=None, metadata=ADMIN):
    req = pb.RecordLeadBehaviorRequest(lead=f"leads/{lid}", kind=kind, idempotency_key=key)
    if when is not None:
        req.time.CopyFrom(timestamp_pb2.Timestamp(seconds=int(when.timestamp())))
    return stub.RecordLeadBehavior(req, metadata=metadata)


def explain(stub, lid, metadata=ADMIN):
    return stub.ExplainLeadScore(pb.ExplainLeadScoreRequest(lead=f"leads/{lid}"), metadata=metadata)


# -- scoring ---------------------------------------------------------------------------------
def test_profile_rules_score_in_sql_and_explain(svc, stub):
    bank = scoring(stub, "Banks in Tehran", 20, 'industry = "bank" AND province = "Tehran"')
    student = scoring(stub, "Students", -5, 'job_title = "student"')
    vip = scoring(stub, "VIP tag", 7, "tags:vip")
    both = new_lead(svc, industry="bank", province="Tehran", job_title="student", tags=["vip"])
    one = new_lead(svc, industry="bank", province="Tehran")
    none = new_lead(svc, industry="bank", province="Fars")
    assert [lead(svc, x).score for x in (both, one, none)] == [22, 20, 0]
    assert lead(svc, both).version == 1  # scored inside the lead's own write: no extra version

    why = explain(stub, both)
    assert why.score == 22
    assert [(c.rule, c.points, c.times) for c in why.contributions] == [
        (bank.name, 20, 1),
        (vip.name, 7, 1),
        (student.name, -5, 1),
    ]
    assert explain(stub, none).contributions == []
    # An update that changes a field rescored by on_lead_saved.
    update_lead(svc, none, None, province="Tehran")
    assert lead(svc, none).score == 20
    # An inactive rule counts for nothing.
    stub.UpdateScoringRule(
        pb.UpdateScoringRuleRequest(
            scoring_rule=pb.ScoringRule(name=bank.name, active=False, etag=bank.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["active"]),
        ),
        metadata=ADMIN,
    )
    assert explain(stub, both).score == 2


def test_behavior_rules_count_min_window_and_cap_and_are_idempotent(svc, stub):
    clicks = scoring(stub, "Two clicks", 10, kind="email_click", min_count=2)
    visits = scoring(stub, "Visits", 5, kind="website_visit", cap=3)
    scoring(stub, "Recent response", 30, kind="campaign_response", window_days=7)
    lid = new_lead(svc, industry="retail")
    assert record(stub, lid, "email_click", "evt-1").score == 0  # one click: below min_count
    again = record(stub, lid, "email_click", "evt-1")
    assert again.duplicate and again.score == 0
    assert lead(svc, lid).version == 1  # no score change: no new version
    assert record(stub, lid, "EMAIL_CLICK", "evt-2").score == 10  # kinds are case-insensitive
    v = lead(svc, lid).version
    assert v == 2
    for i in range(4):
        record(stub, lid, "website_visit", f"visit-{i}")
    assert lead(svc, lid).score == 10 + 15  # capped at 3 visits
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    assert record(stub, lid, "campaign_response", "c-old", when=old).score == 25  # outside the window
    assert record(stub, lid, "campaign_response", "c-new").score == 55
    assert record(stub, lid, "campaign_response", "c-new").duplicate
    # Without a key nothing is deduplicated.
    record(stub, lid, "email_click")
    why = explain(stub, lid)
    assert why.score == 55 == lead(svc, lid).score
    got = {c.display_name: (c.points, c.times) for c in why.contributions}
    assert got == {"Two clicks": (10, 1), "Visits": (15, 3), "Recent response": (30, 1)}
    assert why.contributions[0].display_name == "Recent response"
    # Each score change published the lead, with its score and version.
    published = events(svc, "lead.updated.v1", f"leads/{lid}")
    assert [e.score for e in published] == [10, 15, 20, 25, 55]
    assert published[-1].version == lead(svc, lid).version
    assert clicks.name and visits.name
    # Behaviour leaving a window lowers the score at the next rescore, which runs daily too.
    with svc.ctx.engine.begin() as conn:
        assert timers.get(conn, "lead.rescore", "daily").cron == "30 3 * * *"
        conn.execute(
            lead_behaviors.update()
            .where(lead_behaviors.c.idempotency_key == "c-new")
            .values(time=sa.func.now() - sa.text("interval '8 days'"))
        )
    assert stub.RescoreLeads(pb.RescoreLeadsRequest(), metadata=ADMIN).changed == 1
    assert lead(svc, lid).score == 25


def test_a_rule_change_rescores_every_lead(svc, stub):
    ids = [new_lead(svc, industry="oil") for _ in range(3)] + [new_lead(svc, industry="gas")]
    rule = scoring(stub, "Oil", 7, 'industry = "oil"')  # rescored in the background (timer)
    wait_for(lambda: [lead(svc, x).score for x in ids] == [7, 7, 7, 0], 15, "the background rescore")
    versions = [lead(svc, x).version for x in ids]
    assert versions == [2, 2, 2, 1]  # version bumped only where the score changed
    rule = stub.UpdateScoringRule(
        pb.UpdateScoringRuleRequest(
            scoring_rule=pb.ScoringRule(name=rule.name, points=9, etag=rule.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["points"]),
        ),
        metadata=ADMIN,
    )
    wait_for(lambda: lead(svc, ids[0]).score == 9, 15, "the rescore after the update")
    with svc.ctx.engine.begin() as conn:
        conn.execute(leads.update().where(leads.c.id == ids[1]).values(score=0))
    assert stub.RescoreLeads(pb.RescoreLeadsRequest(), metadata=ADMIN).changed == 1
    assert stub.RescoreLeads(pb.RescoreLeadsRequest(), metadata=ADMIN).changed == 0
    stub.DeleteScoringRule(pb.DeleteScoringRuleRequest(name=rule.name), metadata=ADMIN)
    wait_for(lambda: all(lead(svc, x).score == 0 for x in ids), 15, "the rescore after the delete")


# -- assignment ------------------------------------------------------------------------------
def test_round_robin_takes_turns_and_records_the_assignment(svc, stub):
    tid = team(svc, "RR web", ["rb", "ra", "rc"])
    rule = assignment(stub, "Web leads", RR, team_id=tid, sources=["Web"])
    ids = [new_lead(svc, source="web") for _ in range(7)]
    rows = [lead(svc, x) for x in ids]
    assert [r.owner_id for r in rows] == ["ra", "rb", "rc", "ra", "rb", "rc", "ra"]
    assert all(str(r.team_id) == tid and r.assign_time is not None for r in rows)
    assert audit_actions(svc, f"leads/{ids[0]}") == ["lead.assign"]
    ev = events(svc, "lead.assigned.v1", f"leads/{ids[0]}")
    assert len(ev) == 1 and ev[0].owner == "ra" and ev[0].team == f"teams/{tid}"
    # A lead that has an owner, or another source, is left alone.
    assert lead(svc, new_lead(svc, source="web", owner_id="me")).owner_id == "me"
    assert lead(svc, new_lead(svc, source="phone")).owner_id == ""
    # A member joining takes their turn in order.
    with svc.ctx.engine.begin() as conn:
        conn.execute(team_members.insert().values(team_id=tid, member_id="rab"))
    assert [lead(svc, new_lead(svc, source="web")).owner_id for _ in range(3)] == ["rab", "rb", "rc"]
    assert rule.name


def test_round_robin_is_fair_under_concurrent_creates(svc, stub):
    tid = team(svc, "RR concurrent", ["c1", "c2", "c3"])
    assignment(stub, "Concurrent", RR, team_id=tid, sources=["burst"])
    owners, errors = [], []

    def worker():
        try:
            for _ in range(5):
                owners.append(lead(svc, new_lead(svc, source="burst")).owner_id)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert Counter(owners) == {"c1": 10, "c2": 10, "c3": 10}


def test_territory_match_position_and_active(svc, stub):
    assignment(stub, "Disabled", FIXED, position=0, owner="nobody", active=False)
    assignment(stub, "Tehran", FIXED, position=1, owner="tehran_rep", provinces=["تهران"])
    assignment(stub, "Shiraz", FIXED, position=2, owner="shiraz_rep", cities=["شیراز"])  # Persian yeh
    with svc.ctx.engine.begin() as conn:
        pl = conn.execute(
            product_lines.insert().values(code="solar", name="Solar").returning(product_lines.c.id)
        ).scalar()
    assignment(stub, "Solar", FIXED, position=3, owner="solar_rep", product_lines=[f"productLines/{pl}"])
    assignment(stub, "Everything else", FIXED, position=9, owner="fallback")
    assert lead(svc, new_lead(svc, province="تهران", city="شيراز")).owner_id == "tehran_rep"  # first wins
    assert lead(svc, new_lead(svc, province="Fars", city="شيراز")).owner_id == "shiraz_rep"  # Arabic yeh
    assert lead(svc, new_lead(svc, province="Fars", product_line_id=pl)).owner_id == "solar_rep"
    assert lead(svc, new_lead(svc, province="Gilan")).owner_id == "fallback"


def test_least_open_picks_the_member_with_fewest_open_leads(svc, stub):
    tid = team(svc, "Least", ["lx", "ly", "lz"])
    with svc.ctx.engine.begin() as conn:
        for owner, status, n in (
            ("lx", "new", 2),
            ("ly", "contacted", 1),
            ("ly", "converted", 3),
            ("lz", "qualified", 2),
        ):
            conn.execute(leads.insert(), [{"owner_id": owner, "status": status}] * n)
    assignment(stub, "Least open", LEAST, team_id=tid, sources=["least"])
    assert lead(svc, new_lead(svc, source="least")).owner_id == "ly"  # 1 open (converted ones do not count)
    # Now lx, ly and lz have 2 open each: ties go by subject.
    assert lead(svc, new_lead(svc, source="least")).owner_id == "lx"
    assert lead(svc, new_lead(svc, source="least")).owner_id == "ly"
    assert lead(svc, new_lead(svc, source="least")).owner_id == "lz"


# -- untouched leads ---------------------------------------------------------------------------
def _fire_now(svc, lid):
    with svc.ctx.engine.begin() as conn:
        assert timers.reschedule(
            conn, rules_assignment.UNTOUCHED, lid, dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        )
    sales(svc.ctx).timers.wake()


def test_an_untouched_lead_goes_to_the_next_member(svc, stub):
    tid = team(svc, "Untouched", ["u1", "u2", "u3"])
    assignment(stub, "Two business hours", RR, team_id=tid, hours=2, sources=["slow"])
    lid = new_lead(svc, source="slow")
    first = lead(svc, lid)
    assert first.owner_id == "u1"
    with svc.ctx.engine.connect() as conn:
        t = timers.get(conn, rules_assignment.UNTOUCHED, lid)
    assert t.due_at == rules_assignment.calendar().add(first.assign_time, 2)
    assert t.payload["owner"] == "u1"
    _fire_now(svc, lid)
    second = wait_for(lambda: (r := lead(svc, lid)).owner_id != "u1" and r, 15, "the reassignment")
    assert second.owner_id == "u2" and second.version == first.version + 1
    assert second.assign_time > first.assign_time and str(second.team_id) == tid
    assert audit_actions(svc, f"leads/{lid}") == ["lead.assign", "lead.reassign_untouched"]
    ev = events(svc, "lead.assigned.v1", f"leads/{lid}")
    assert [e.owner for e in ev] == ["u1", "u2"] and ev[-1].version == second.version
    # The new owner has their own untouched time; the next firing goes on to u3.
    with svc.ctx.engine.connect() as conn:
        assert timers.get(conn, rules_assignment.UNTOUCHED, lid).payload["owner"] == "u2"
    _fire_now(svc, lid)
    assert wait_for(lambda: lead(svc, lid).owner_id == "u3", 15, "the second reassignment")


def test_a_touched_or_closed_lead_is_not_reassigned(svc, stub):
    tid = team(svc, "Touchy", ["t1", "t2"])
    assignment(stub, "One hour", RR, team_id=tid, hours=1, sources=["touch"])
    touched = new_lead(svc, source="touch")
    owner = lead(svc, touched).owner_id
    update_lead(svc, touched, Principal("someone_else", ("sales_manager",)), description="not the owner")
    with svc.ctx.engine.connect() as conn:
        assert timers.get(conn, rules_assignment.UNTOUCHED, touched) is not None  # another's edit is no touch
    update_lead(svc, touched, Principal(owner, ("sales_rep",)), status="contacted")
    row = lead(svc, touched)
    assert row.touch_time is not None and row.touch_time > row.assign_time
    with svc.ctx.engine.connect() as conn:
        assert timers.get(conn, rules_assignment.UNTOUCHED, touched) is None  # cancelled

    via_activity = new_lead(svc, source="touch")
    closed = new_lead(svc, source="touch")
    with sales(svc.ctx).uow.begin() as tx:
        lead_rules.touch(tx, via_activity)  # what the activities part calls
        tx.execute(leads.update().where(leads.c.id == closed).values(status="disqualified"))
    owners = {x: lead(svc, x).owner_id for x in (via_activity, closed)}
    # Even a timer that fires anyway (armed before the touch) changes nothing.
    with svc.ctx.engine.begin() as conn:
        for x in (touched, via_activity):
            timers.schedule(
                conn, rules_assignment.UNTOUCHED, x, dt.datetime.now(dt.UTC), {"owner": lead(svc, x).owner_id}
            )
    for x in (touched, via_activity, closed):
        with svc.ctx.engine.begin() as conn:
            timers.reschedule(conn, rules_assignment.UNTOUCHED, x, dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    sales(svc.ctx).timers.wake()

    def all_fired():
        with svc.ctx.engine.connect() as conn:
            return all(
                (t := timers.get(conn, rules_assignment.UNTOUCHED, x)) is None or t.state != "scheduled"
                for x in (touched, via_activity, closed)
            )

    wait_for(all_fired, 15, "the timers to fire")
    assert lead(svc, touched).owner_id == owner
    assert {x: lead(svc, x).owner_id for x in (via_activity, closed)} == owners
    assert "lead.reassign_untouched" not in audit_actions(svc, f"leads/{closed}")


# -- the RPCs ----------------------------------------------------------------------------------
def test_rule_crud(svc, stub, ch):
    a = scoring(stub, "Banks", 5, 'industry = "bank"', request_id="rq-1")
    b = scoring(stub, "Banks", 5, 'industry = "bank"', request_id="rq-1")
    assert a == b and a.active
    with svc.ctx.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(scoring_rules)).scalar() == 1
    assert stub.GetScoringRule(pb.GetScoringRuleRequest(name=a.name), metadata=ADMIN) == a
    c = scoring(stub, "Clicks", 1, kind="email_click")
    off = stub.UpdateScoringRule(
        pb.UpdateScoringRuleRequest(
            scoring_rule=pb.ScoringRule(name=c.name, active=False, behavior=pb.BehaviorCondition(kind="web_visit")),
            update_mask=field_mask_pb2.FieldMask(paths=["active", "behavior"]),
        ),
        metadata=ADMIN,
    )
    assert not off.active and off.behavior.kind == "web_visit" and off.etag == '"2"'
    listed = stub.ListScoringRules(pb.ListScoringRulesRequest(filter="active = true"), metadata=ADMIN)
    assert [r.name for r in listed.scoring_rules] == [a.name]
    stale = error_of(
        lambda: stub.UpdateScoringRule(
            pb.UpdateScoringRuleRequest(
                scoring_rule=pb.ScoringRule(name=c.name, points=3, etag=c.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["points"]),
            ),
            metadata=ADMIN,
        )
    )
    assert stale.code == grpc.StatusCode.ABORTED
    stub.DeleteScoringRule(pb.DeleteScoringRuleRequest(name=c.name), metadata=ADMIN)
    gone = error_of(lambda: stub.GetScoringRule(pb.GetScoringRuleRequest(name=c.name), metadata=ADMIN))
    assert gone.code == grpc.StatusCode.NOT_FOUND and gone.reason == "SCORING_RULE_NOT_FOUND"

    tid = team(svc, "CRUD", ["x"])
    later = assignment(stub, "Later", RR, position=5, team_id=tid)
    first = assignment(stub, "First", FIXED, position=1, owner="o1", cities=["Qom"])
    page = stub.ListAssignmentRules(pb.ListAssignmentRulesRequest(page_size=1), metadata=ADMIN)
    assert [r.name for r in page.assignment_rules] == [first.name] and page.next_page_token
    rest = stub.ListAssignmentRules(
        pb.ListAssignmentRulesRequest(page_size=1, page_token=page.next_page_token), metadata=ADMIN
    )
    assert [r.name for r in rest.assignment_rules] == [later.name]
    moved = stub.UpdateAssignmentRule(
        pb.UpdateAssignmentRuleRequest(
            assignment_rule=pb.AssignmentRule(name=later.name, position=0, untouched_hours=4.5, etag=later.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["position", "untouched_hours"]),
        ),
        metadata=ADMIN,
    )
    assert moved.position == 0 and moved.untouched_hours == 4.5 and moved.team == f"teams/{tid}"
    assert stub.GetAssignmentRule(pb.GetAssignmentRuleRequest(name=first.name), metadata=ADMIN).match.cities == ["Qom"]
    # A team an assignment rule uses cannot be deleted.
    teams_stub = sales_service_pb2_grpc.SalesServiceStub(ch)
    in_use = error_of(
        lambda: teams_stub.DeleteTeam(sales_service_pb2.DeleteTeamRequest(name=f"teams/{tid}"), metadata=ADMIN)
    )
    assert in_use.reason == "TEAM_IN_USE" and "1 assignment rules" in in_use.message
    stub.DeleteAssignmentRule(pb.DeleteAssignmentRuleRequest(name=later.name, etag=moved.etag), metadata=ADMIN)
    assert (
        teams_stub.DeleteTeam(sales_service_pb2.DeleteTeamRequest(name=f"teams/{tid}"), metadata=ADMIN).removed_members
        == 1
    )


def test_validation_errors_name_the_fields(svc, stub):
    def fields(fn):
        err = error_of(fn)
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT, err
        return {v.field for v in err.field_violations}

    def create_scoring(rule):
        return lambda: stub.CreateScoringRule(pb.CreateScoringRuleRequest(scoring_rule=rule), metadata=ADMIN)

    def create_assignment(rule):
        return lambda: stub.CreateAssignmentRule(pb.CreateAssignmentRuleRequest(assignment_rule=rule), metadata=ADMIN)

    assert fields(create_scoring(pb.ScoringRule(points=0, profile=pb.ProfileCondition(filter="colour = 1")))) == {
        "scoring_rule.display_name",
        "scoring_rule.points",
        "scoring_rule.profile.filter",
    }
    assert fields(create_scoring(pb.ScoringRule(display_name="x", points=1))) == {"scoring_rule.condition"}
    assert fields(
        create_scoring(
            pb.ScoringRule(display_name="x", points=1, behavior=pb.BehaviorCondition(kind="has space", window_days=-1))
        )
    ) == {"scoring_rule.behavior.kind", "scoring_rule.behavior.window_days"}
    assert fields(create_assignment(pb.AssignmentRule(display_name="x", strategy=RR))) == {"assignment_rule.team"}
    assert fields(create_assignment(pb.AssignmentRule(display_name="x"))) == {"assignment_rule.strategy"}
    assert fields(create_assignment(pb.AssignmentRule(display_name="x", strategy=FIXED, untouched_hours=2))) == {
        "assignment_rule.owner",
        "assignment_rule.untouched_hours",
    }
    assert fields(
        create_assignment(
            pb.AssignmentRule(
                display_name="x",
                strategy=LEAST,
                team="teams/00000000-0000-0000-0000-000000000000",
                match=pb.AssignmentMatch(product_lines=["lines/1"]),
            )
        )
    ) == {"assignment_rule.team", "assignment_rule.match.product_lines[0]"}
    lid = new_lead(svc, owner_id="someone")
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    assert fields(lambda: record(stub, lid, "no spaces please", when=future)) == {"kind", "time"}
    assert fields(lambda: record(stub, "nope", "email_click")) == {"lead"}
    # A lead outside the caller's scope does not exist for them.
    hidden = error_of(lambda: explain(stub, lid, metadata=md("sales_rep", "another_rep")))
    assert hidden.code == grpc.StatusCode.NOT_FOUND and hidden.reason == "LEAD_NOT_FOUND"
    assert explain(stub, lid, metadata=md("sales_rep", "someone")).lead == f"leads/{lid}"
    # Rules are admin's.
    rep_denied = error_of(
        lambda: stub.ListScoringRules(pb.ListScoringRulesRequest(), metadata=md("sales_manager", "boss"))
    )
    assert rep_denied.code == grpc.StatusCode.PERMISSION_DENIED


def test_http_routes_through_the_gateway(svc, stub):
    from crm_gateway import create_app
    from crm_gateway.clients import Clients
    from tests.support.harness import assert_problem

    app = create_app(Clients({"customer": "127.0.0.1:9", "sales": f"127.0.0.1:{svc.port}", "reporting": "127.0.0.1:9"}))
    http = app.test_client()
    auth = {"Authorization": f"Bearer {token('admin', 'ada')}"}
    ok = http.post(
        "/v1/scoringRules",
        json={"displayName": "Banks", "points": 12, "profile": {"filter": 'industry = "bank"'}},
        headers=auth,
    )
    assert ok.status_code == 201, ok.get_data(as_text=True)
    assert ok.get_json()["name"].startswith("scoringRules/")
    bad = http.post("/v1/scoringRules", json={"displayName": "Zero", "profile": {"filter": "x ="}}, headers=auth)
    assert_problem(bad, 400, "points")  # the gateway names fields within the body
    lid = new_lead(svc, industry="bank")
    score = http.get(f"/v1/leads/{lid}/score", headers=auth)
    assert score.status_code == 200 and score.get_json()["score"] == 12
    rec = http.post(
        f"/v1/leads/{lid}:recordBehavior", json={"kind": "website_visit", "idempotencyKey": "w1"}, headers=auth
    )
    assert rec.status_code == 200 and rec.get_json()["score"] == 12
