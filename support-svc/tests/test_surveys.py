"""CSAT and expectation surveys (support_svc/surveys.py): a resolved ticket gets a survey whose
signed link is posted on the ticket; the link works through the gateway's public routes without
a bearer token; forged, expired and repeated answers are refused; the zone of tolerance and the
CSAT summaries are computed right (checked against numbers worked out by hand)."""

from __future__ import annotations

import datetime as dt
import re
import time

import grpc
import pytest
import sqlalchemy as sa

from crm.support.v1 import support_events_pb2 as ev
from crm.support.v1 import surveys_pb2 as pb
from crm.support.v1 import surveys_pb2_grpc
from crm_chassis import timers
from crm_chassis.errors import read_rpc_error
from support_svc.surveys import (
    expectation_levels,
    make_token,
    summarize,
    survey_answers,
    surveys,
    use_cases,
    zone_of,
)
from support_svc.tables import ticket_messages, tickets
from tests.support.harness import assert_problem, gateway_client

from .conftest import ADMIN, add_message, agent_md, events, make_team, manager_md, open_ticket, rt

URL = re.compile(r"http://localhost:8080/v1/surveys/(\S+)")
D = ev.DimensionScore


@pytest.fixture(scope="module")
def stub(ch):
    return surveys_pb2_grpc.SurveyServiceStub(ch)


@pytest.fixture(scope="module")
def http(svc):
    client, clients = gateway_client(hops=1, support=f"127.0.0.1:{svc.port}")
    yield client
    clients.close()


def error(call) -> tuple[grpc.StatusCode, list[str], str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    view = read_rpc_error(info.value)
    return view.code, [v.field for v in view.field_violations], view.reason or ""


def resolve(svc, tid, actor="omid"):
    r = rt(svc)
    with r.uow.begin() as tx:
        r.tickets.change_state(tx, tid, "resolved", actor)


def survey_rows(svc, tid):
    with svc.ctx.engine.connect() as conn:
        return conn.execute(sa.select(surveys).where(surveys.c.ticket_id == tid).order_by(surveys.c.create_time)).all()


def posted_links(svc, tid) -> list[str]:
    """Fire the due timers, then the survey links posted on the ticket (oldest first)."""
    r = rt(svc)
    deadline = time.monotonic() + 5
    while True:
        r.timers.run_once()
        with svc.ctx.engine.connect() as conn:
            pending = conn.execute(
                sa.select(sa.func.count()).where(surveys.c.ticket_id == tid, surveys.c.delivery == "pending")
            ).scalar()
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    with svc.ctx.engine.connect() as conn:
        bodies = conn.execute(
            sa.select(ticket_messages.c.body)
            .where(ticket_messages.c.ticket_id == tid, ticket_messages.c.author == "survey")
            .order_by(ticket_messages.c.create_time)
        ).scalars()
        return [t for body in bodies for t in URL.findall(body)]


def resolved_ticket(svc, assignee="omid", team_id=None, language="fa", **values):
    t = open_ticket(
        svc, contact_address="reza@example.ir", assignee_id=assignee, team_id=team_id, language=language, **values
    )
    add_message(svc, t.id, "agent", "بررسی شد و مشکل برطرف شد.", author=assignee)
    resolve(svc, t.id, assignee)
    return t


def csat_token(svc, **kw) -> tuple[object, str]:
    t = resolved_ticket(svc, **kw)
    links = posted_links(svc, t.id)
    assert len(links) == 1
    return t, links[0]


# -- sending --------------------------------------------------------------------------------------
def test_resolving_a_ticket_posts_one_signed_link_as_a_survey_reply(svc, stub):
    t = resolved_ticket(svc)
    [row] = survey_rows(svc, t.id)
    assert (row.kind, row.state, row.agent_id, row.delivery) == ("csat", "sent", "omid", "pending")
    links = posted_links(svc, t.id)
    assert len(links) == 1
    assert links[0] == use_cases(rt(svc)).token(survey_rows(svc, t.id)[0])
    with svc.ctx.engine.connect() as conn:
        msg = conn.execute(
            sa.select(ticket_messages).where(ticket_messages.c.ticket_id == t.id, ticket_messages.c.author == "survey")
        ).one()
    assert msg.kind == "agent" and "T-" in msg.body  # the ticket's channel delivers it like any reply
    row = survey_rows(svc, t.id)[0]
    assert row.delivery == "posted" and row.message_id == msg.id
    expire_days = (row.expire_time - row.send_time).total_seconds() / 86400
    assert expire_days == pytest.approx(14)

    # reopened by the customer and resolved again while unanswered: still the one open survey
    add_message(svc, t.id, "customer", "هنوز مشکل دارم")
    add_message(svc, t.id, "agent", "دوباره بررسی شد", author="omid")
    resolve(svc, t.id)
    assert len(survey_rows(svc, t.id)) == 1
    listed = stub.ListSurveys(pb.ListSurveysRequest(filter=f'ticket = "tickets/{t.id}"'), metadata=agent_md("omid"))
    assert [s.state for s in listed.surveys] == [pb.SURVEY_STATE_SENT]
    assert listed.surveys[0].agent == "agents/omid" and listed.surveys[0].message.endswith(str(msg.id))

    # a ticket nobody can be asked about (no customer, no contact) gets none
    anonymous = open_ticket(svc, channel="phone", body="", kind="system")
    resolve(svc, anonymous.id)
    assert survey_rows(svc, anonymous.id) == []


def test_a_held_ticket_delays_the_survey_post_instead_of_deadlocking_the_change(svc):
    """survey.deliver holds its timer row while it runs; a change holding the ticket may be
    waiting for that row (a resolve schedules survey.deliver again). The handler takes the
    ticket with NOWAIT: a held ticket fails this firing (retried), it never waits for the lock."""
    from crm_chassis.work_tables import timers as timer_table

    t = resolved_ticket(svc)
    with svc.ctx.engine.connect() as holder:  # an agent's change holds the ticket right now
        holder.execute(sa.select(tickets.c.id).where(tickets.c.id == t.id).with_for_update())
        started = time.monotonic()
        rt(svc).timers.run_once()
        assert time.monotonic() - started < 5  # not the lock_timeout: it did not wait
        with svc.ctx.engine.connect() as conn:
            row = conn.execute(
                sa.select(timer_table).where(timer_table.c.kind == "survey.deliver", timer_table.c.key == str(t.id))
            ).one()
        assert row.attempts == 1 and "lock" in (row.last_error or "").lower()
        assert survey_rows(svc, t.id)[0].delivery == "pending"
        holder.rollback()
    with svc.ctx.engine.begin() as conn:  # the retry's back-off, skipped
        conn.execute(
            timer_table.update()
            .where(timer_table.c.kind == "survey.deliver", timer_table.c.key == str(t.id))
            .values(next_attempt_at=sa.func.now(), due_at=sa.func.now())
        )
    assert len(posted_links(svc, t.id)) == 1


# -- the public link through the gateway ----------------------------------------------------------
def test_the_link_answers_through_the_gateway_without_a_bearer_token(svc, http):
    t, token = csat_token(svc)
    page = http.get(f"/v1/surveys/{token}")  # no Authorization header
    assert page.status_code == 200, page.get_data(as_text=True)
    body = page.get_json()
    assert body["kind"] == "SURVEY_KIND_CSAT" and body["state"] == "SURVEY_STATE_SENT"
    assert "راضی" in body["promptFa"] and body["promptEn"]
    assert [q["key"] for q in body["questions"]] == ["speed", "knowledge"]
    assert body["ticketNumber"].startswith("T-")

    sent = http.post(
        f"/v1/surveys/{token}:submit",
        json={"csat": 4, "comment": "خوب بود، کمی دیر", "answers": [{"question": "speed", "score": 3}]},
        headers={"X-Forwarded-For": "203.0.113.7"},
    )
    assert sent.status_code == 200, sent.get_data(as_text=True)
    assert sent.get_json()["state"] == "SURVEY_STATE_ANSWERED" and sent.get_json()["complete"]

    [row] = survey_rows(svc, t.id)
    assert (row.state, row.csat, row.comment, row.answer_address) == ("answered", 4, "خوب بود، کمی دیر", "203.0.113.7")
    with svc.ctx.engine.connect() as conn:
        answers = conn.execute(sa.select(survey_answers).where(survey_answers.c.survey_id == row.id)).all()
    assert [(a.question, a.score) for a in answers] == [("speed", 3)]
    [event] = events(svc, "survey.answered.v1", ev.SurveyEvent, subject=f"surveys/{row.id}")
    assert event.ticket == f"tickets/{t.id}" and event.agent == "agents/omid" and event.kind == "csat"
    assert event.csat == 4 and event.answer_time.ToDatetime().year >= 2026

    # answering twice: 409, the first answer stays
    again = http.post(f"/v1/surveys/{token}:submit", json={"csat": 1})
    assert_problem(again, 409)
    assert survey_rows(svc, t.id)[0].csat == 4
    assert len(events(svc, "survey.answered.v1", subject=f"surveys/{row.id}")) == 1


def test_a_tampered_or_unknown_token_is_401(svc, http, stub):
    _, token = csat_token(svc)
    head, sig = token.split(".")
    forged_sig = head + "." + ("A" if sig[0] != "A" else "B") + sig[1:]
    other_id = make_token(b"x" * 32, "00000000-0000-4000-8000-000000000000", "n", dt.datetime.now(dt.UTC))
    for bad in (forged_sig, other_id, "not-a-token", head):
        assert_problem(http.get(f"/v1/surveys/{bad}"), 401)
        assert_problem(http.post(f"/v1/surveys/{bad}:submit", json={"csat": 5}), 401)
    # signed with another secret (someone who guessed the scheme but not the key)
    row = survey_rows(svc, _.id)[0]
    assert_problem(http.get(f"/v1/surveys/{make_token(b'guess' * 8, str(row.id), row.nonce, row.expire_time)}"), 401)
    code, _fields, reason = error(
        lambda: stub.GetSurveyByToken(pb.GetSurveyByTokenRequest(token=forged_sig), metadata=ADMIN)
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED and reason == "SURVEY_LINK_INVALID"
    assert http.get(f"/v1/surveys/{token}").status_code == 200  # the real one still works


def test_an_expired_link_is_refused_and_the_expiry_timer_marks_it(svc, http, stub):
    t, token = csat_token(svc)
    row = survey_rows(svc, t.id)[0]
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    with svc.ctx.engine.begin() as conn:
        conn.execute(surveys.update().where(surveys.c.id == row.id).values(expire_time=past))
    old = use_cases(rt(svc)).token(survey_rows(svc, t.id)[0])
    assert old != token
    assert_problem(http.get(f"/v1/surveys/{token}"), 401)  # the expiry is signed: the old link is not valid now
    resp = http.post(f"/v1/surveys/{old}:submit", json={"csat": 5})
    body = assert_problem(resp, 400)  # authentic but expired: FAILED_PRECONDITION
    assert "expired" in body["detail"]
    code, _, reason = error(lambda: stub.GetSurveyByToken(pb.GetSurveyByTokenRequest(token=old), metadata=ADMIN))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and reason == "SURVEY_EXPIRED"
    # the expiry timer (fired now, as if its time had come) marks it expired
    with svc.ctx.engine.begin() as conn:
        timers.schedule(conn, "survey.expire", str(row.id), past)
    rt(svc).timers.run_once()
    assert survey_rows(svc, t.id)[0].state == "expired"
    assert survey_rows(svc, t.id)[0].csat is None


def test_bad_answers_are_refused_naming_the_field(svc, http, stub):
    t, token = csat_token(svc)
    assert_problem(http.post(f"/v1/surveys/{token}:submit", json={"csat": 6}), 400, "csat")
    assert_problem(http.post(f"/v1/surveys/{token}:submit", json={"comment": "no score"}), 400, "csat")
    assert_problem(http.post(f"/v1/surveys/{token}:submit", json={"csat": 3, "comment": "x" * 2001}), 400, "comment")
    code, fields, _ = error(
        lambda: stub.SubmitSurvey(
            pb.SubmitSurveyRequest(
                token=token,
                csat=3,
                answers=[pb.QuestionAnswer(question="speed", score=0), pb.QuestionAnswer(question="price", score=3)],
            ),
            metadata=ADMIN,
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and set(fields) == {"answers[0].score", "answers[1].question"}
    assert survey_rows(svc, t.id)[0].state == "sent"  # nothing stored
    too_big = http.post(f"/v1/surveys/{token}:submit", data=b"{" + b" " * 17000 + b"}", content_type="application/json")
    assert too_big.status_code == 413


# -- the expectation survey -----------------------------------------------------------------------
def levels(**dims) -> list:
    """dimension=(desired, adequate, predicted, perceived)"""
    return [D(dimension=k, desired=v[0], adequate=v[1], predicted=v[2], perceived=v[3]) for k, v in dims.items()]


FIVE = dict(
    reliability=(8, 5, 6, 0),
    responsiveness=(9, 6, 7, 0),
    assurance=(7, 4, 5, 0),
    empathy=(6, 3, 6, 0),
    tangibles=(5, 2, 3, 0),
)


def test_expectation_survey_asks_expectations_first_and_perception_after_resolution(svc, http, stub):
    t = open_ticket(svc, contact_address="mina@example.ir", assignee_id="sara")
    sent = stub.SendExpectationSurvey(
        pb.SendExpectationSurveyRequest(parent=f"tickets/{t.id}"), metadata=agent_md("sara")
    )
    assert sent.created and sent.survey.kind == pb.SURVEY_KIND_EXPECTATION
    again = stub.SendExpectationSurvey(
        pb.SendExpectationSurveyRequest(parent=f"tickets/{t.id}"), metadata=agent_md("sara")
    )
    assert not again.created and again.survey.name == sent.survey.name
    [first] = posted_links(svc, t.id)
    assert sent.url.endswith(first)
    page = http.get(f"/v1/surveys/{first}").get_json()
    assert page["askExpectations"] and not page.get("askPerceived", False)
    assert [d["labelFa"] for d in page["dimensions"]] == [
        "قابلیت اطمینان",
        "پاسخگویی",
        "اطمینان‌بخشی",
        "همدلی",
        "ملموسات",
    ]

    def submit(token, dims, **kw):
        return http.post(
            f"/v1/surveys/{token}:submit",
            json={
                "dimensions": [
                    {
                        "dimension": d.dimension,
                        "desired": d.desired,
                        "adequate": d.adequate,
                        "predicted": d.predicted,
                        "perceived": d.perceived,
                    }
                    for d in dims
                ],
                **kw,
            },
        )

    bad = dict(FIVE, assurance=(4, 7, 5, 0))  # adequate above desired, the third dimension
    assert_problem(submit(first, levels(**bad)), 400, "dimensions[2].adequate")
    early = dict(FIVE, reliability=(8, 5, 6, 7))  # perceived before resolution
    assert_problem(submit(first, levels(**early)), 400, "dimensions[0].perceived")
    partial = {k: v for k, v in FIVE.items() if k != "tangibles"}
    assert_problem(submit(first, levels(**partial)), 400, "dimensions")
    assert_problem(submit(first, levels(**dict(FIVE, empathy=(10, 3, 6, 0)))), 400, "dimensions[3].desired")

    ok = submit(first, levels(**FIVE))
    assert ok.status_code == 200, ok.get_data(as_text=True)
    assert ok.get_json()["complete"] and ok.get_json()["state"] == "SURVEY_STATE_SENT"
    assert_problem(submit(first, levels(**FIVE)), 409)  # the first phase is answered once
    assert events(svc, "survey.answered.v1", subject=f"surveys/{sent.survey.name.rsplit('/', 1)[1]}") == []

    # resolved: a renewed link (the first stops working) asks the perceived levels
    add_message(svc, t.id, "agent", "انجام شد", author="sara")
    resolve(svc, t.id, "sara")
    links = posted_links(svc, t.id)
    assert len(links) == 3  # the first link, then one message with the CSAT and the perception links
    second = next(
        tok for tok in links[1:] if http.get(f"/v1/surveys/{tok}").get_json()["kind"] == "SURVEY_KIND_EXPECTATION"
    )
    assert_problem(http.get(f"/v1/surveys/{first}"), 401)
    page = http.get(f"/v1/surveys/{second}").get_json()
    assert page["askPerceived"] and not page.get("askExpectations", False)
    perceived = {k: (0, 0, 0, p) for k, p in zip(FIVE, (4, 7, 5, 7, 3), strict=True)}
    assert_problem(submit(second, levels(**dict(perceived, empathy=(0, 0, 0, 0)))), 400, "dimensions[3].perceived")
    assert_problem(submit(second, levels(**dict(perceived, empathy=(9, 0, 0, 7)))), 400, "dimensions[3].desired")
    done = submit(second, levels(**perceived), comment="خوب بود")
    assert done.status_code == 200 and done.get_json()["state"] == "SURVEY_STATE_ANSWERED"

    survey_id = sent.survey.name.rsplit("/", 1)[1]
    [event] = events(svc, "survey.answered.v1", ev.SurveyEvent, subject=f"surveys/{survey_id}")
    assert event.kind == "expectation" and event.agent == "agents/sara" and event.csat == 0
    assert [(d.dimension, d.desired, d.adequate, d.predicted, d.perceived) for d in event.dimensions][:2] == [
        ("reliability", 8, 5, 6, 4),
        ("responsiveness", 9, 6, 7, 7),
    ]
    result = stub.GetExpectationResult(pb.GetExpectationResultRequest(name=sent.survey.name), metadata=agent_md("x"))
    r = {d.dimension: d for d in result.dimensions}
    # reliability: zone [5, 8], predicted 6 in it, perceived 4 below: MSA 4-5 = -1, MSS 4-8 = -4
    assert (r["reliability"].zone_width, r["reliability"].msa, r["reliability"].mss) == (3, -1, -4)
    assert r["reliability"].perceived_position == pb.ZONE_POSITION_BELOW
    assert r["reliability"].predicted_position == pb.ZONE_POSITION_IN
    # empathy: zone [3, 6], perceived 7 above: MSS +1 (delight); tangibles [2, 5], 3 in it
    assert r["empathy"].perceived_position == pb.ZONE_POSITION_ABOVE and r["empathy"].mss == 1
    assert r["tangibles"].perceived_position == pb.ZONE_POSITION_IN and r["tangibles"].label_fa == "ملموسات"
    got = stub.GetSurvey(pb.GetSurveyRequest(name=sent.survey.name), metadata=manager_md("m"))
    assert got.state == pb.SURVEY_STATE_ANSWERED and got.comment == "خوب بود" and len(got.dimensions) == 5


def test_zone_of_tolerance_on_a_hand_computed_case(svc, stub):
    """Three customers, two dimensions (desired, adequate, predicted, perceived):

        customer A: reliability (8, 5, 9, 4)   empathy (7, 4, 5, 8)
        customer B: reliability (9, 6, 7, 7)   empathy (6, 3, 2, 5)
        customer C: reliability (7, 4, 3, 8)   empathy (9, 5, 6, 3)

    reliability: desired (8+9+7)/3 = 8, adequate (5+6+4)/3 = 5, predicted (9+7+3)/3 = 19/3,
      perceived (4+7+8)/3 = 19/3, width (3+3+3)/3 = 3,
      MSA = perceived - adequate = (-1 + 1 + 4)/3 = 4/3, MSS = perceived - desired = (-4 - 2 + 1)/3 = -5/3;
      perceived: A 4 < 5 below, B 7 in [6, 9], C 8 > 7 above -> 1/3, 1/3, 1/3;
      predicted: A 9 > 8 above, B 7 in, C 3 < 4 below -> 1/3, 1/3, 1/3.
    empathy: desired (7+6+9)/3 = 22/3, adequate (4+3+5)/3 = 4, predicted (5+2+6)/3 = 13/3,
      perceived (8+5+3)/3 = 16/3, width (3+3+4)/3 = 10/3,
      MSA = (4 + 2 - 2)/3 = 4/3, MSS = (1 - 1 - 6)/3 = -2;
      perceived: A 8 > 7 above, B 5 in [3, 6], C 3 < 5 below -> 1/3, 1/3, 1/3;
      predicted: A 5 in [4, 7], B 2 < 3 below, C 6 in [5, 9] -> below 1/3, in 2/3, above 0.
    """
    answers = {
        "A": {"reliability": (8, 5, 9, 4), "empathy": (7, 4, 5, 8)},
        "B": {"reliability": (9, 6, 7, 7), "empathy": (6, 3, 2, 5)},
        "C": {"reliability": (7, 4, 3, 8), "empathy": (9, 5, 6, 3)},
    }
    third = 1 / 3
    expected = {
        "reliability": dict(
            count=3, desired=8, adequate=5, predicted=19 / 3, perceived=19 / 3, zone_width=3, msa=4 / 3, mss=-5 / 3
        ),
        "empathy": dict(
            count=3,
            desired=22 / 3,
            adequate=4,
            predicted=13 / 3,
            perceived=16 / 3,
            zone_width=10 / 3,
            msa=4 / 3,
            mss=-2,
        ),
    }
    shares = {
        "reliability": ((third, third, third), (third, third, third)),
        "empathy": ((third, third, third), (third, 2 * third, 0)),
    }
    # the pure functions
    a = zone_of("reliability", 8, 5, 9, 4)
    assert (a.width, a.msa, a.mss, a.perceived_position, a.predicted_position) == (3, -1, -4, "below", "above")
    assert (a.predicted_msa, a.predicted_mss) == (4, 1)
    flat = [(dim, *v) for per in answers.values() for dim, v in per.items()]
    stats = summarize(flat + [("empathy", 9, 1, 1, None)])  # an unfinished answer does not count
    for dim, want in expected.items():
        for k, v in want.items():
            assert getattr(stats[dim], k) == pytest.approx(v), (dim, k)
        assert stats[dim].perceived_shares == pytest.approx(shares[dim][0])
        assert stats[dim].predicted_shares == pytest.approx(shares[dim][1])

    # the same through the service: a two-dimension template (English tickets), three customers
    tmpl = stub.CreateSurveyTemplate(
        pb.CreateSurveyTemplateRequest(
            survey_template=pb.SurveyTemplate(
                kind=pb.SURVEY_KIND_EXPECTATION,
                display_name="Two dimensions",
                language="en",
                prompt_en="Rate 1-9",
                dimensions=[
                    pb.SurveyDimension(key="reliability", label_fa="قابلیت اطمینان", label_en="Reliability"),
                    pb.SurveyDimension(key="empathy", label_fa="همدلی", label_en="Empathy"),
                ],
                active=True,
            )
        ),
        metadata=manager_md("boss"),
    )
    team = make_team(svc, "zone-team")
    uc = use_cases(rt(svc))
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    for who, dims in answers.items():
        t = open_ticket(svc, contact_address=f"{who}@example.com", language="en", team_id=team, assignee_id="zed")
        sent = stub.SendExpectationSurvey(pb.SendExpectationSurveyRequest(parent=f"tickets/{t.id}"), metadata=ADMIN)
        assert sent.survey.template == tmpl.name
        first = [D(dimension=k, desired=v[0], adequate=v[1], predicted=v[2]) for k, v in dims.items()]
        stub.SubmitSurvey(pb.SubmitSurveyRequest(token=sent.url.rsplit("/", 1)[1], dimensions=first), metadata=ADMIN)
        resolve(svc, t.id, "zed")
        row = next(r for r in survey_rows(svc, t.id) if r.kind == "expectation")
        second = [D(dimension=k, perceived=v[3]) for k, v in dims.items()]
        stub.SubmitSurvey(pb.SubmitSurveyRequest(token=uc.token(row), dimensions=second), metadata=ADMIN)
    req = pb.SummarizeExpectationsRequest(team=f"teams/{team}")
    req.start_time.FromDatetime(start)
    req.end_time.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5))
    summary = stub.SummarizeExpectations(req, metadata=agent_md("zed"))
    assert summary.survey_count == 3
    got = {d.dimension: d for d in summary.dimensions}
    assert set(got) == {"reliability", "empathy"}
    for dim, want in expected.items():
        for k, v in want.items():
            assert getattr(got[dim], k) == pytest.approx(v), (dim, k)
        p, r = got[dim].perceived_shares, got[dim].predicted_shares
        assert (p.below, p.within, p.above) == pytest.approx(shares[dim][0])
        assert (r.below, r.within, r.above) == pytest.approx(shares[dim][1])
    with svc.ctx.engine.connect() as conn:  # stored as given
        assert conn.execute(sa.select(sa.func.count()).select_from(expectation_levels)).scalar() >= 6


# -- staff: summaries, lists, templates -----------------------------------------------------------
def test_csat_summary_per_agent_and_team(svc, stub):
    team = make_team(svc, "csat-team")
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    for agent, score in (("ali", 5), ("ali", 4), ("nika", 2)):
        _, token = csat_token(svc, assignee=agent, team_id=team)
        stub.SubmitSurvey(pb.SubmitSurveyRequest(token=token, csat=score), metadata=ADMIN)
    csat_token(svc, assignee="ali", team_id=team)  # sent, unanswered: not counted
    req = pb.SummarizeCsatRequest(team=f"teams/{team}")
    req.start_time.FromDatetime(start)
    req.end_time.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5))
    summary = stub.SummarizeCsat(req, metadata=manager_md("boss"))
    by = {g.group: g for g in summary.agents}
    assert list(by) == ["agents/ali", "agents/nika"]  # most answers first
    assert (by["agents/ali"].count, by["agents/ali"].average, list(by["agents/ali"].distribution)) == (
        2,
        4.5,
        [0, 0, 0, 1, 1],
    )
    assert by["agents/ali"].satisfied_share == 1.0
    assert (by["agents/nika"].count, by["agents/nika"].average, list(by["agents/nika"].distribution)) == (
        1,
        2,
        [0, 1, 0, 0, 0],
    )
    assert [(g.group, g.count) for g in summary.teams] == [(f"teams/{team}", 3)]
    assert summary.overall.count == 3 and summary.overall.average == pytest.approx(11 / 3)
    assert summary.overall.satisfied_share == pytest.approx(2 / 3)

    code, fields, _ = error(lambda: stub.SummarizeCsat(pb.SummarizeCsatRequest(), metadata=ADMIN))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and set(fields) == {"start_time", "end_time"}

    # the list: filter by agent and state, keyset pages
    f = f'agent = "agents/ali" AND team = "teams/{team}" AND state = answered'
    page1 = stub.ListSurveys(pb.ListSurveysRequest(filter=f, page_size=1), metadata=agent_md("ali"))
    page2 = stub.ListSurveys(
        pb.ListSurveysRequest(filter=f, page_size=1, page_token=page1.next_page_token), metadata=agent_md("ali")
    )
    assert page1.next_page_token and not page2.next_page_token
    assert sorted(s.csat for s in [*page1.surveys, *page2.surveys]) == [4, 5]
    code, fields, _ = error(lambda: stub.ListSurveys(pb.ListSurveysRequest(filter="colour = 1"), metadata=ADMIN))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fields == ["filter"]
    # agents read, only managers change templates, the public role only answers links
    code, _, _ = error(lambda: stub.SummarizeCsat(req, metadata=[("authorization", "Bearer x")]))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_csat_templates_with_several_questions(svc, stub, http):
    def create(**kw):
        return stub.CreateSurveyTemplate(
            pb.CreateSurveyTemplateRequest(survey_template=pb.SurveyTemplate(**kw)), metadata=manager_md("boss")
        )

    code, fields, _ = error(
        lambda: create(
            kind=pb.SURVEY_KIND_CSAT,
            display_name="",
            language="de",
            questions=[pb.SurveyQuestion(key="Speed!", text_fa="?"), pb.SurveyQuestion(key="a", text_fa="")],
        )
    )
    assert set(fields) == {
        "survey_template.display_name",
        "survey_template.language",
        "survey_template.questions[0].key",
        "survey_template.questions[1].text_fa",
    }
    code, _, _ = error(
        lambda: stub.CreateSurveyTemplate(
            pb.CreateSurveyTemplateRequest(
                survey_template=pb.SurveyTemplate(kind=pb.SURVEY_KIND_CSAT, display_name="x")
            ),
            metadata=agent_md("omid"),
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    questions = [
        pb.SurveyQuestion(key="speed", text_fa="سرعت", text_en="Speed"),
        pb.SurveyQuestion(key="clarity", text_fa="وضوح", text_en="Clarity"),
        pb.SurveyQuestion(key="courtesy", text_fa="ادب", text_en="Courtesy"),
    ]
    first = create(
        kind=pb.SURVEY_KIND_CSAT, display_name="English CSAT", language="en", questions=questions, active=True
    )
    second = create(
        kind=pb.SURVEY_KIND_CSAT, display_name="English CSAT 2", language="en", questions=questions[:1], active=True
    )
    assert not stub.GetSurveyTemplate(pb.GetSurveyTemplateRequest(name=first.name), metadata=ADMIN).active
    upd = pb.SurveyTemplate(name=first.name, etag=first.etag, active=True)
    stale = pb.UpdateSurveyTemplateRequest(survey_template=upd, update_mask={"paths": ["active"]})
    code, _, _ = error(lambda: stub.UpdateSurveyTemplate(stale, metadata=manager_md("boss")))
    assert code == grpc.StatusCode.ABORTED  # deactivating it moved its version
    now = stub.GetSurveyTemplate(pb.GetSurveyTemplateRequest(name=first.name), metadata=ADMIN)
    upd = pb.SurveyTemplate(name=first.name, etag=now.etag, active=True)
    stub.UpdateSurveyTemplate(
        pb.UpdateSurveyTemplateRequest(survey_template=upd, update_mask={"paths": ["active"]}),
        metadata=manager_md("boss"),
    )
    assert not stub.GetSurveyTemplate(pb.GetSurveyTemplateRequest(name=second.name), metadata=ADMIN).active

    # an English ticket's survey asks the three questions, and keeps them after the template changes
    t, token = csat_token(svc, language="en")
    assert [q["key"] for q in http.get(f"/v1/surveys/{token}").get_json()["questions"]] == [
        "speed",
        "clarity",
        "courtesy",
    ]
    cur = stub.GetSurveyTemplate(pb.GetSurveyTemplateRequest(name=first.name), metadata=ADMIN)
    stub.UpdateSurveyTemplate(
        pb.UpdateSurveyTemplateRequest(
            survey_template=pb.SurveyTemplate(name=first.name, etag=cur.etag, questions=questions[2:]),
            update_mask={"paths": ["questions"]},
        ),
        metadata=manager_md("boss"),
    )
    assert len(http.get(f"/v1/surveys/{token}").get_json()["questions"]) == 3
    resp = http.post(
        f"/v1/surveys/{token}:submit",
        json={"csat": 5, "answers": [{"question": q.key, "score": 5 - i} for i, q in enumerate(questions)]},
    )
    assert resp.status_code == 200
    got = stub.GetSurvey(
        pb.GetSurveyRequest(name=f"tickets/{t.id}/surveys/{survey_rows(svc, t.id)[0].id}"), metadata=ADMIN
    )
    assert {a.question: a.score for a in got.answers} == {"speed": 5, "clarity": 4, "courtesy": 3}
    assert got.template == first.name

    code, _, reason = error(
        lambda: stub.DeleteSurveyTemplate(pb.DeleteSurveyTemplateRequest(name=first.name), metadata=manager_md("boss"))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and reason == "SURVEY_TEMPLATE_IN_USE"
    stub.DeleteSurveyTemplate(pb.DeleteSurveyTemplateRequest(name=second.name), metadata=manager_md("boss"))
    listed = stub.ListSurveyTemplates(
        pb.ListSurveyTemplatesRequest(filter='kind = csat AND language = "en"'), metadata=ADMIN
    )
    assert [x.name for x in listed.survey_templates] == [first.name]


def test_expectation_survey_on_open_waits_for_the_first_agent_reply(svc, http):
    """SURVEY_EXPECTATION_ON_OPEN: the survey is made with the ticket, its link goes out after
    the first agent reply (so the automatic post never counts as the first response)."""
    import dataclasses

    uc = use_cases(rt(svc))
    saved = uc.settings
    uc.settings = dataclasses.replace(saved, expectation_on_open=True)
    try:
        t = open_ticket(svc, contact_address="neda@example.ir")
        nobody = open_ticket(svc, channel="phone", body="", kind="system")
    finally:
        uc.settings = saved
    [row] = survey_rows(svc, t.id)
    assert (row.kind, row.delivery) == ("expectation", "waiting")
    assert survey_rows(svc, nobody.id) == []
    assert posted_links(svc, t.id) == []
    add_message(svc, t.id, "agent", "سلام، در حال بررسی هستیم.", author="omid")
    [link] = posted_links(svc, t.id)
    assert http.get(f"/v1/surveys/{link}").get_json()["askExpectations"]
    with svc.ctx.engine.connect() as conn:
        first_reply = conn.execute(
            sa.select(ticket_messages.c.create_time).where(
                ticket_messages.c.ticket_id == t.id, ticket_messages.c.author == "omid"
            )
        ).scalar_one()
    from support_svc.ticketing import Tickets

    with svc.ctx.engine.connect() as conn:
        assert Tickets.get(conn, t.id).first_response_time == first_reply


def test_the_public_role_only_answers_links(svc, stub):
    from tests.support.harness import md

    public = md("public_channel", "gateway:public")
    req = pb.SummarizeCsatRequest()
    req.start_time.FromDatetime(dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    req.end_time.FromDatetime(dt.datetime.now(dt.UTC))
    for call in (
        lambda: stub.SummarizeCsat(req, metadata=public),
        lambda: stub.ListSurveys(pb.ListSurveysRequest(), metadata=public),
        lambda: stub.SendExpectationSurvey(
            pb.SendExpectationSurveyRequest(parent="tickets/00000000-0000-4000-8000-000000000000"), metadata=public
        ),
    ):
        code, _, _ = error(call)
        assert code == grpc.StatusCode.PERMISSION_DENIED
    code, fields, _ = error(lambda: stub.GetSurveyByToken(pb.GetSurveyByTokenRequest(), metadata=public))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fields == ["token"]


def test_openapi_documents_the_survey_links_as_public(http):
    doc = http.get("/openapi.json").get_json()
    get = doc["paths"]["/v1/surveys/{token}"]["get"]
    submit = doc["paths"]["/v1/surveys/{token}:submit"]["post"]
    for op in (get, submit):
        assert op["security"] == [] and "30 requests a minute" in op["description"]
        assert "16384 bytes" in op["description"] and "429" in op["responses"]
    assert doc["paths"]["/v1/surveys"]["get"].get("security") != []  # the staff list needs a token
