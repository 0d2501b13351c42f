"""From lead to cash over HTTP, the way a sales team drives it: customer-svc and sales-svc in
process (relays on, real RabbitMQ), the gateway's app in front. A manager sets up a team and a
priced product; a rep works a lead, converts it (the customer lands in customer-svc), wins the
opportunity, quotes it, the customer accepts, the order is delivered, invoiced and paid; the
manager's forecast shows the win; every event leaves through the broker; another rep sees none
of it."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from crm_chassis.messaging.tables import outbox
from customer_svc.__main__ import SPEC as CUSTOMER
from sales_svc.__main__ import SPEC as SALES
from tests.support.harness import start_service, wait_for
from tests.support.journeys import as_, irr, ok, sales_desk


@pytest.fixture(scope="module")
def stack(databases, broker):
    from crm_gateway import create_app
    from crm_gateway.clients import Clients

    customer = start_service(CUSTOMER, databases.fresh("journey_customer"), broker.url)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUSTOMER_SVC_ADDR", f"127.0.0.1:{customer.port}")
        sales = start_service(SALES, databases.fresh("journey_sales"), broker.url)
        clients = Clients(
            {"customer": f"127.0.0.1:{customer.port}", "sales": f"127.0.0.1:{sales.port}", "reporting": "127.0.0.1:9"}
        )
        yield customer, sales, create_app(clients).test_client()
        clients.close()
        sales.stop(0)
        customer.stop(0)


ADMIN, MANAGER, REZA, OMID = (
    as_("admin", "ada"),
    as_("sales_manager", "maryam"),
    as_("sales_rep", "reza"),
    as_("sales_rep", "omid"),
)


def test_a_lead_becomes_cash_and_every_step_is_published(stack):
    customer_svc, sales_svc, http = stack
    # The manager's team and a priced product.
    _, product = sales_desk(http, ADMIN, "Tehran North", "maryam", "reza")

    # A rep's lead, Persian as typed (Arabic yeh, Persian digits), qualified and converted.
    lead = ok(
        http.post(
            "/v1/leads",
            json={
                "givenName": "علي",
                "familyName": "كريمي",
                "organizationName": "شرکت نمونه",
                "email": "Ali.Karimi@Example.ir",
                "mobile": "۰۹۱۲۳۴۵۶۷۸۹",
                "source": "exhibition",
                "productLine": product["productLine"],
            },
            headers=REZA,
        ),
        201,
    )
    assert lead["owner"] == "reza" and lead["email"] == "ali.karimi@example.ir" and lead["mobile"] == "+989123456789"
    ok(http.post(f"/v1/{lead['name']}:qualify", json={}, headers=REZA))
    conv = ok(http.post(f"/v1/{lead['name']}:convert", json={"opportunityName": "ERP for Namooneh"}, headers=REZA))
    assert conv["customerCreated"]
    customer = ok(http.get(f"/v1/{conv['customer']}", headers=REZA))
    assert customer["email"] == "ali.karimi@example.ir" and customer["acquisitionSource"] == "exhibition"

    # The opportunity: two licences at 50,000,000 rials, 10 % off; won.
    opp = ok(http.get(f"/v1/{conv['opportunity']}", headers=REZA))
    assert opp["owner"] == "reza" and opp["customer"] == conv["customer"] and opp["source"] == "exhibition"
    opp = ok(
        http.patch(
            f"/v1/{opp['name']}?update_mask=lines,expectedCloseDate",
            json={
                "lines": [
                    {"product": product["name"], "quantity": "2", "unitPrice": irr(50_000_000), "discountPercent": "10"}
                ],
                "expectedCloseDate": {"year": 2026, "month": 12, "day": 20},
            },
            headers={**REZA, "If-Match": opp["etag"]},
        )
    )
    assert opp["amount"]["units"] == "90000000"
    opp = ok(http.post(f"/v1/{opp['name']}:win", json={"reason": "best fit"}, headers=REZA))
    assert opp["state"] == "STATE_WON"

    # Quote, sent and accepted: the order; delivered in full.
    quote = ok(
        http.post(
            "/v1/quotes",
            json={"opportunity": opp["name"], "validUntil": {"year": 2027, "month": 1, "day": 31}},
            headers=REZA,
        ),
        201,
    )
    assert quote["total"]["units"] == "99000000"  # 90,000,000 + 10 % VAT
    pdf = http.get(f"/v1/{quote['name']}:pdf", headers=REZA)
    assert pdf.status_code == 200 and pdf.data.startswith(b"%PDF")
    quote = ok(http.post(f"/v1/{quote['name']}:send", json={}, headers=REZA))
    quote = ok(http.post(f"/v1/{quote['name']}:accept", json={}, headers=REZA))
    order = ok(http.get(f"/v1/{quote['order']}", headers=REZA))
    assert order["customer"] == conv["customer"] and order["total"]["units"] == "99000000"
    order = ok(
        http.post(
            f"/v1/{order['name']}:recordDelivery",
            json={"deliveries": [{"line": ln["name"], "quantity": ln["quantity"]} for ln in order["lines"]]},
            headers=REZA,
        )
    )
    assert order["state"] == "ORDER_STATE_DELIVERED"

    # Invoiced (by the manager), issued, paid in full.
    inv = ok(http.post("/v1/invoices", json={"order": order["name"]}, headers=MANAGER), 201)
    inv = ok(http.post(f"/v1/{inv['name']}:issue", json={}, headers=MANAGER))
    assert inv["number"] and inv["total"]["units"] == "99000000"
    ok(
        http.post(
            f"/v1/{inv['name']}/payments", json={"amount": irr(99_000_000), "method": "transfer"}, headers=MANAGER
        ),
        201,
    )
    assert ok(http.get(f"/v1/{inv['name']}", headers=MANAGER))["state"] == "paid"

    # The manager's forecast for this month counts the win for reza.
    today = dt.date.today()
    fc = ok(http.get(f"/v1/forecast?period={today:%Y-%m}&group_by=owner", headers=MANAGER))
    text = str(fc)
    assert "reza" in text and "90000000" in text

    # Another rep sees nothing of it.
    for name in (lead["name"], opp["name"], quote["name"], order["name"], inv["name"]):
        assert http.get(f"/v1/{name}", headers=OMID).status_code == 404, name
    assert ok(http.get("/v1/opportunities", headers=OMID)).get("opportunities", []) == []

    # Every step's event left through the broker (the relay confirmed it).
    keys = [
        "lead.created.v1",
        "lead.qualified.v1",
        "lead.converted.v1",
        "opportunity.created.v1",
        "opportunity.won.v1",
        "quote.sent.v1",
        "quote.accepted.v1",
        "order.placed.v1",
        "order.delivered.v1",
        "invoice.issued.v1",
        "payment.received.v1",
        "invoice.paid.v1",
    ]

    def published() -> set[str]:
        with sales_svc.ctx.engine.connect() as conn:
            rows = conn.execute(sa.select(outbox.c.routing_key).where(outbox.c.published_at.is_not(None))).scalars()
            return set(rows)

    wait_for(lambda: set(keys) <= published(), timeout=30, what=f"published: {keys}")
