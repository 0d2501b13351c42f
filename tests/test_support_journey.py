"""A customer's request through the call center, the way a desk drives it: customer-svc and
support-svc in process (relays and consumers on, real RabbitMQ), mail through support-svc's real
SMTP endpoint and out to a real SMTP sink, the gateway's app in front.

A manager sets up a team (least loaded, its own address), two agents and an SLA policy; the
customer, known to customer-svc, writes to the team's address; the ticket is matched to the
customer (from customer-svc's events, no call) and offered to the agent online; the agent
accepts and replies (the reply leaves by mail with the ticket number in its subject); the
customer answers the reply (threaded by In-Reply-To); the agent resolves; the survey link goes
out by mail and the customer answers it through the public route without a token; the queue
view is empty again; every step's event leaves through the broker."""

from __future__ import annotations

import datetime as dt
import re
import smtplib
import urllib.parse
from email.message import EmailMessage

import pytest
import sqlalchemy as sa

from crm_chassis.messaging.tables import outbox
from customer_svc.__main__ import SPEC as CUSTOMER
from support_svc.__main__ import SPEC as SUPPORT
from support_svc.smtp_sink import Sink
from tests.support.harness import free_port, start_service, token, wait_for

TEAM_ADDRESS = "help@journey.test"


def as_(roles: str, sub: str) -> dict:
    return {"Authorization": f"Bearer {token(roles, sub)}"}


ADMIN, MANAGER, OMID, LEILA = (
    as_("admin", "ada"),
    as_("support_manager", "maryam"),
    as_("support_agent", "omid"),
    as_("support_agent", "leila"),
)


def ok(resp, status: int = 200) -> dict:
    assert resp.status_code == status, resp.get_data(as_text=True)
    return resp.get_json()


@pytest.fixture(scope="module")
def stack(databases, broker, tmp_path_factory):
    from crm_gateway import create_app
    from crm_gateway.clients import Clients

    sink = Sink(tmp_path_factory.mktemp("journey-mail"), port=free_port()).start()
    customer = start_service(CUSTOMER, databases.fresh("sj_customer"), broker.url)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAIL_IN_PORT", "0")
        mp.setenv("SMTP_PORT", str(sink.port))
        mp.setenv("MAIL_DOMAIN", "journey.test")
        mp.setenv("SURVEY_BASE_URL", "https://crm.journey.test")
        support = start_service(SUPPORT, databases.fresh("sj_support"), broker.url)
    clients = Clients(
        {
            "customer": f"127.0.0.1:{customer.port}",
            "sales": "127.0.0.1:9",
            "support": f"127.0.0.1:{support.port}",
            "reporting": "127.0.0.1:9",
        }
    )
    yield customer, support, sink, create_app(clients).test_client()
    clients.close()
    support.stop(0)
    customer.stop(0)
    sink.stop()


def mail_in(support, message: EmailMessage) -> None:
    port = support.ctx.shared["runtime"].extra["mail_in"].port
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.send_message(message)


def sent_to(sink, address: str) -> list:
    return [m for m in sink.messages() if address in (m["To"] or "")]


def test_a_mailed_request_is_offered_answered_resolved_and_rated(stack):
    customer_svc, support_svc, sink, http = stack
    # customer-svc knows the customer; support-svc learns of them from the event.
    person = ok(
        http.post(
            "/v1/customers",
            json={
                "type": "CUSTOMER_TYPE_PERSON",
                "givenName": "سارا",
                "familyName": "کریمی",
                "email": "sara@journey.test",
            },
            headers=ADMIN,
        ),
        201,
    )
    with support_svc.ctx.engine.connect() as conn:
        wait_for(
            lambda: conn.execute(sa.text("SELECT 1 FROM customer_refs WHERE email = 'sara@journey.test'")).first(),
            what="the customer projected into support-svc",
        )

    # The desk: a least-loaded team with its own address, two agents (one online), an SLA.
    team = ok(
        http.post(
            "/v1/support/teams",
            json={
                "displayName": "پشتیبانی سفارش‌ها",
                "manager": "maryam",
                "strategy": "ROUTING_STRATEGY_LEAST_LOADED",
                "offerTimeoutSeconds": 300,
                "emailAddress": TEAM_ADDRESS,
            },
            headers=MANAGER,
        ),
        201,
    )
    for sub, name in (("omid", "امید"), ("leila", "لیلا")):
        ok(http.post(f"/v1/agents?agent_id={sub}", json={"displayName": name, "capacity": 10}, headers=MANAGER), 201)
    ok(
        http.post(
            f"/v1/support/{team['name']}:addMembers", json={"agents": ["agents/omid", "agents/leila"]}, headers=MANAGER
        )
    )
    ok(http.post("/v1/agents/omid:setPresence", json={"presence": "PRESENCE_ONLINE"}, headers=OMID))
    policy = ok(
        http.post(
            "/v1/slaPolicies",
            json={"displayName": "عادی", "firstResponseMinutes": 240, "resolutionMinutes": 2400},
            headers=MANAGER,
        ),
        201,
    )

    # The customer writes to the team's address.
    m = EmailMessage()
    m["From"] = "Sara Karimi <sara@journey.test>"
    m["To"] = TEAM_ADDRESS
    m["Subject"] = "سفارش ۱۲۳ خراب رسید"
    m["Message-ID"] = "<first@client.journey.test>"
    m.set_content("سلام، بستهٔ سفارش ۱۲۳ شکسته رسید.")
    mail_in(support_svc, m)
    tickets = ok(http.get("/v1/tickets", headers=OMID))["tickets"]
    assert len(tickets) == 1
    ticket = tickets[0]
    assert ticket["customer"] == person["name"] and ticket["team"] == team["name"]
    assert ticket["channel"] == "CHANNEL_EMAIL" and ticket["state"] == "STATE_NEW"
    sla = ok(http.get(f"/v1/{ticket['name']}/sla", headers=OMID))
    assert sla["policy"] == policy["name"]

    # Offered to the one agent online; they accept it.
    offers = ok(http.get("/v1/ticketOffers?parent=agents/me", headers=OMID))["offers"]
    assert [o["ticket"] for o in offers] == [ticket["name"]]
    assert ok(http.get("/v1/ticketOffers?parent=agents/me", headers=LEILA)).get("offers", []) == []
    ok(http.post(f"/v1/{offers[0]['name']}:accept", json={}, headers=OMID))
    ticket = ok(http.get(f"/v1/{ticket['name']}", headers=OMID))
    assert ticket["assignee"] == "agents/omid"

    # The reply leaves by mail, the ticket number in its subject.
    ok(
        http.post(
            f"/v1/{ticket['name']}/messages",
            json={"kind": "KIND_AGENT", "body": "پوزش می‌خواهیم؛ جایگزین فردا ارسال می‌شود."},
            headers=OMID,
        ),
        201,
    )
    support_svc.ctx.shared["runtime"].timers.wake()
    wait_for(lambda: sent_to(sink, "sara@journey.test"), what="the reply in the sink")
    reply = sent_to(sink, "sara@journey.test")[0]
    assert f"[{ticket['number']}]" in reply["Subject"] and reply["In-Reply-To"] == "<first@client.journey.test>"

    # The customer answers the reply: threaded into the same ticket, a second exchange waiting.
    answer = EmailMessage()
    answer["From"] = "sara@journey.test"
    answer["To"] = TEAM_ADDRESS
    answer["Subject"] = "Re: " + reply["Subject"]
    answer["In-Reply-To"] = reply["Message-ID"]
    answer["Message-ID"] = "<second@client.journey.test>"
    answer.set_content("ممنون، منتظرم.")
    mail_in(support_svc, answer)
    ticket = ok(http.get(f"/v1/{ticket['name']}", headers=OMID))
    assert ticket["messageCount"] == 3 and ticket["exchangeCount"] == 1
    assert len(ok(http.get("/v1/tickets", headers=OMID))["tickets"]) == 1

    # Resolved: the survey link goes out by mail; the customer answers it without a token.
    ok(http.post(f"/v1/{ticket['name']}:resolve", json={"reason": "replacement sent"}, headers=OMID))
    rt = support_svc.ctx.shared["runtime"]

    def survey_mail():
        rt.timers.wake()
        for msg in sent_to(sink, "sara@journey.test"):
            body = msg.get_body(preferencelist=("plain",)).get_content()
            found = re.search(r"https://crm\.journey\.test/v1/surveys/([A-Za-z0-9_.=-]+)", body)
            if found:
                return found.group(1)
        return None

    link_token = wait_for(survey_mail, what="the survey link in the sink")
    path = "/v1/surveys/" + urllib.parse.quote(link_token)
    assert ok(http.get(path))["kind"]
    ok(http.post(path + ":submit", json={"csat": 5, "comment": "سریع و مؤدب"}))
    day = dt.timedelta(days=1)
    now = dt.datetime.now(dt.UTC)
    period = urllib.parse.urlencode({"start_time": (now - day).isoformat(), "end_time": (now + day).isoformat()})
    summary = ok(http.get(f"/v1/surveys:summarizeCsat?{period}", headers=MANAGER))
    assert summary["overall"]["count"] == 1 and summary["overall"]["average"] == 5

    # Nothing waits in the queue; every step's event left through the broker.
    queue = ok(http.get(f"/v1/queue?team={team['name']}", headers=OMID))
    assert all(t.get("open", 0) == 0 and t.get("unassigned", 0) == 0 for t in queue["teams"])
    expected = {
        "ticket.opened.v1",
        "ticket.offered.v1",
        "ticket.offer_accepted.v1",
        "ticket.assigned.v1",
        "ticket.first_responded.v1",
        "ticket.message_added.v1",
        "ticket.resolved.v1",
        "survey.answered.v1",
    }
    with support_svc.ctx.engine.connect() as conn:

        def published():
            rows = conn.execute(sa.select(outbox.c.routing_key, outbox.c.published_at)).all()
            keys = {r.routing_key for r in rows}
            return expected <= keys and all(r.published_at is not None for r in rows)

        wait_for(published, what="every event sent by the relay")
