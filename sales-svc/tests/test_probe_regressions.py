"""Regressions found by driving the running suite from outside (HTTP through the gateway and
gRPC): each test names what was sent, what came back and what it should be."""

from __future__ import annotations

import csv
import io
import secrets
import uuid

import grpc
import pytest

from crm.sales.v1 import leads_pb2, leads_pb2_grpc, opportunities_pb2_grpc
from crm.sales.v1 import opportunities_pb2 as pb
from crm.type.v1.date_pb2 import Date
from crm_chassis.errors import read_rpc_error

from .conftest import ADMIN
from .test_opportunities import STANDARD, irr, make_pipeline, make_product, mask, stage_name


@pytest.fixture(scope="module")
def opps(ch):
    return opportunities_pb2_grpc.OpportunityServiceStub(ch)


@pytest.fixture(scope="module")
def leads_stub(ch):
    return leads_pb2_grpc.LeadServiceStub(ch)


@pytest.fixture(scope="module")
def std(svc):
    return make_pipeline(svc, STANDARD)  # the migration's "Standard" stays the default


def _error(call, *args, **kw):
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kw)
    return info.value.code(), read_rpc_error(info.value)


def test_a_stage_that_requires_lines_is_entered_once_the_opportunity_has_lines(svc, opps, std):
    """Sent: an opportunity with two lines, moved to a stage requiring `lines`. Came back:
    FAILED_PRECONDITION STAGE_REQUIREMENTS "requires lines to be set first" (the stage entry
    counted no lines). Should be: the move succeeds; without lines it is still refused."""
    pid, sids = std
    product = make_product(svc)
    made = opps.CreateOpportunity(
        pb.CreateOpportunityRequest(
            opportunity=pb.Opportunity(
                display_name="With lines",
                pipeline=f"pipelines/{pid}",
                contact_name="Sara",
                next_step="call",
                lines=[
                    pb.OpportunityLine(product=f"products/{product}", quantity="2", unit_price=irr(1_000)),
                    pb.OpportunityLine(description="Setup", quantity="1", unit_price=irr(500)),
                ],
                expected_close_date=Date(year=2026, month=12, day=20),
            )
        ),
        metadata=ADMIN,
    )
    moved = opps.MoveOpportunityStage(
        pb.MoveOpportunityStageRequest(name=made.name, stage=stage_name(pid, sids[2])), metadata=ADMIN
    )
    assert moved.stage == stage_name(pid, sids[2]) and len(moved.lines) == 2
    # reopening into it after a loss checks the lines too (the same stage entry)
    lost = opps.LoseOpportunity(pb.LoseOpportunityRequest(name=made.name, reason="price"), metadata=ADMIN)
    back = opps.ReopenOpportunity(
        pb.ReopenOpportunityRequest(name=lost.name, stage=stage_name(pid, sids[2])), metadata=ADMIN
    )
    assert back.state == pb.Opportunity.STATE_OPEN and back.stage == stage_name(pid, sids[2])

    bare = opps.CreateOpportunity(
        pb.CreateOpportunityRequest(
            opportunity=pb.Opportunity(
                display_name="No lines", pipeline=f"pipelines/{pid}", contact_name="Sara", next_step="call"
            )
        ),
        metadata=ADMIN,
    )
    code, err = _error(
        opps.MoveOpportunityStage,
        pb.MoveOpportunityStageRequest(name=bare.name, stage=stage_name(pid, sids[2])),
        metadata=ADMIN,
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and err.metadata["missing_fields"] == "lines"


def test_the_export_writes_a_whole_probability_as_a_plain_number(opps):
    """Sent: a CSV export of a won opportunity. Came back: probability `1E+2`. Should be `100`
    (and `12.5` stays `12.5`)."""
    tag = uuid.uuid4().hex[:8]
    won = opps.CreateOpportunity(
        pb.CreateOpportunityRequest(opportunity=pb.Opportunity(display_name=f"exp-{tag}-won", amount=irr(1_000))),
        metadata=ADMIN,
    )
    opps.WinOpportunity(pb.WinOpportunityRequest(name=won.name), metadata=ADMIN)
    part = opps.CreateOpportunity(
        pb.CreateOpportunityRequest(opportunity=pb.Opportunity(display_name=f"exp-{tag}-part", amount=irr(1_000))),
        metadata=ADMIN,
    )
    opps.UpdateOpportunity(
        pb.UpdateOpportunityRequest(
            opportunity=pb.Opportunity(name=part.name, probability=12.5), update_mask=mask("probability")
        ),
        metadata=ADMIN,
    )
    chunks = opps.ExportOpportunities(
        pb.ExportOpportunitiesRequest(
            format=pb.OPPORTUNITY_EXPORT_FORMAT_CSV,
            filter=f'display_name = "exp-{tag}*"',
            fields=["display_name", "probability"],
        ),
        metadata=ADMIN,
    )
    text = b"".join(c.data for c in chunks).decode("utf-8-sig")
    rows = {r[0]: r[1] for r in list(csv.reader(io.StringIO(text)))[1:]}
    assert rows == {f"exp-{tag}-won": "100", f"exp-{tag}-part": "12.5"}


@pytest.mark.parametrize("number", ["۰۹۱۲", "09123", "912345", "021123"])
def test_a_lead_phone_that_cannot_be_dialled_is_refused(leads_stub, number):
    """Sent: a lead with mobile "۰۹۱۲". Came back: created with mobile "+980912" (any possible
    length passed). Should be: INVALID_ARGUMENT naming lead.mobile (and lead.phone)."""
    for field in ("mobile", "phone"):
        code, err = _error(
            leads_stub.CreateLead,
            leads_pb2.CreateLeadRequest(lead=leads_pb2.Lead(family_name="Short", **{field: number})),
            metadata=ADMIN,
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in err.field_violations] == [f"lead.{field}"]
    made = leads_stub.CreateLead(
        leads_pb2.CreateLeadRequest(
            lead=leads_pb2.Lead(family_name="Whole", mobile="۰۹۱۲ ۳۴۵ ۶۷۸۹", phone="021-88887777")
        ),
        metadata=ADMIN,
    )
    assert made.mobile == "+989123456789" and made.phone == "+982188887777"


def test_totals_beyond_money_are_out_of_range_not_internal(svc, ch, opps, std):
    """Sent: opportunities of 9,223,372,036,854,775,807 IRR each, then the board, a forecast and
    a forecast submission. Came back: INTERNAL (decimal.InvalidOperation in to_money, a NUMERIC
    overflow on the snapshot insert). Should be: an amount above 10^18 is INVALID_ARGUMENT
    naming opportunity.amount, and totals Money cannot hold are OUT_OF_RANGE
    AMOUNT_OUT_OF_RANGE."""
    from crm.sales.v1 import forecasts_pb2, forecasts_pb2_grpc

    pid, _ = std
    code, err = _error(
        opps.CreateOpportunity,
        pb.CreateOpportunityRequest(
            opportunity=pb.Opportunity(display_name="huge", amount=irr(9_223_372_036_854_775_807))
        ),
        metadata=ADMIN,
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and [v.field for v in err.field_violations] == [
        "opportunity.amount"
    ]
    for i in range(10):  # each at the limit; together 10^19, beyond int64 units
        opps.CreateOpportunity(
            pb.CreateOpportunityRequest(
                opportunity=pb.Opportunity(
                    display_name=f"big-{i}",
                    pipeline=f"pipelines/{pid}",
                    amount=irr(10**18),
                    probability=100,
                    expected_close_date=Date(year=2031, month=1, day=15),
                )
            ),
            metadata=ADMIN,
        )
    code, err = _error(opps.GetPipelineBoard, pb.GetPipelineBoardRequest(pipeline=f"pipelines/{pid}"), metadata=ADMIN)
    assert code == grpc.StatusCode.OUT_OF_RANGE and err.reason == "AMOUNT_OUT_OF_RANGE"
    forecasts = forecasts_pb2_grpc.ForecastServiceStub(ch)
    code, err = _error(forecasts.GetForecast, forecasts_pb2.GetForecastRequest(period="2031-01"), metadata=ADMIN)
    assert code == grpc.StatusCode.OUT_OF_RANGE and err.reason == "AMOUNT_OUT_OF_RANGE"
    code, err = _error(forecasts.SubmitForecast, forecasts_pb2.SubmitForecastRequest(period="2031-01"), metadata=ADMIN)
    assert code == grpc.StatusCode.OUT_OF_RANGE and err.reason == "AMOUNT_OUT_OF_RANGE"
    # a narrower question still answers
    board = opps.GetPipelineBoard(
        pb.GetPipelineBoardRequest(pipeline=f"pipelines/{pid}", owner="nobody-else"), metadata=ADMIN
    )
    assert board.total_count == 0


def test_an_order_dated_year_one_is_refused_naming_the_field(ch):
    """Sent: POST /v1/orders with orderDate 0001-01-01. Came back: 500 (the order number's Jalali
    year could not be computed). Should be: INVALID_ARGUMENT naming order.order_date."""
    from crm.sales.v1 import orders_pb2, orders_pb2_grpc
    from crm.type.v1.money_pb2 import Money

    stub = orders_pb2_grpc.OrderServiceStub(ch)
    for year in (1, 1899, 3000):
        order = orders_pb2.Order(
            customer=f"customers/{uuid.uuid4()}",
            currency_code="IRR",
            order_date=Date(year=year, month=1, day=1),
            lines=[
                orders_pb2.OrderLine(description="Widget", quantity="1", unit_price=Money(currency_code="IRR", units=5))
            ],
        )
        code, err = _error(stub.CreateOrder, orders_pb2.CreateOrderRequest(order=order), metadata=ADMIN)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in err.field_violations] == ["order.order_date"]


def test_a_payment_dated_year_one_is_refused(ch):
    """Sent: a payment of an issued invoice with payTime 0001-01-01T00:00:00Z. Came back: 201,
    recorded. Should be: INVALID_ARGUMENT naming payment.pay_time (1900 or later, as business
    dates); a payment dated before the issue (test_invoices records one) is still taken."""
    import datetime as dt

    from google.protobuf import timestamp_pb2

    from crm.sales.v1 import invoices_pb2, invoices_pb2_grpc
    from crm.type.v1.money_pb2 import Money

    stub = invoices_pb2_grpc.InvoiceServiceStub(ch)
    inv = stub.CreateInvoice(
        invoices_pb2.CreateInvoiceRequest(
            invoice=invoices_pb2.Invoice(
                customer=f"customers/{uuid.uuid4()}",
                currency_code="IRR",
                lines=[
                    invoices_pb2.InvoiceLine(
                        description="x", quantity="1", unit_price=Money(currency_code="IRR", units=1000)
                    )
                ],
            )
        ),
        metadata=ADMIN,
    )
    inv = stub.IssueInvoice(invoices_pb2.IssueInvoiceRequest(name=inv.name), metadata=ADMIN)

    def pay(when: dt.datetime):
        t = timestamp_pb2.Timestamp()
        t.FromDatetime(when)
        return stub.RecordPayment(
            invoices_pb2.RecordPaymentRequest(
                parent=inv.name,
                payment=invoices_pb2.Payment(amount=Money(currency_code="IRR", units=100), method="cash", pay_time=t),
            ),
            metadata=ADMIN,
        )

    for when in (dt.datetime(1, 1, 1, tzinfo=dt.UTC), dt.datetime(1899, 12, 31, tzinfo=dt.UTC)):
        code, err = _error(pay, when)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in err.field_violations] == ["payment.pay_time"]
    assert pay(dt.datetime.now(dt.UTC) - dt.timedelta(days=3)).amount.units == 100


def test_if_match_star_updates_whatever_the_current_etag(svc):
    """Sent: PATCH /v1/leads/{id} with `If-Match: *`. Came back: 409 ABORTED "etag * is stale".
    Should be (RFC 9110 13.1.1): `*` matches any current representation, so no etag check; a
    stale etag is still 409 ABORTED."""
    from crm_gateway import create_app
    from crm_gateway.clients import Clients
    from tests.support.harness import assert_problem, token

    app = create_app(Clients({"customer": "127.0.0.1:9", "sales": f"127.0.0.1:{svc.port}", "reporting": "127.0.0.1:9"}))
    http = app.test_client()
    h = {"Authorization": f"Bearer {token('sales_rep', 'star')}"}
    made = http.post("/v1/leads", json={"familyName": "Star"}, headers=h).get_json()
    path = f"/v1/{made['name']}"
    first = http.patch(path, json={"description": "one"}, headers={**h, "If-Match": made["etag"]})
    assert first.status_code == 200, first.get_data(as_text=True)
    assert_problem(http.patch(path, json={"description": "two"}, headers={**h, "If-Match": made["etag"]}), 409)
    star = http.patch(path, json={"description": "three"}, headers={**h, "If-Match": "*"})
    assert star.status_code == 200, star.get_data(as_text=True)
    assert star.get_json()["description"] == "three"


def test_a_body_of_the_wrong_shape_is_a_400_naming_the_field(svc):
    """Sent over HTTP: {"givenName": 123}, {"lines": [{"unitPrice": {"units": "abc"}}]},
    {"kind": "KIND_NOPE"}, an unknown key. Came back: 400 with errors[].field "body" and
    protobuf's message listing every field. Should be: the field itself, snake_case and relative
    to the body as the services name theirs (given_name, lines.unit_price.units, kind, nope)."""
    from crm_gateway import create_app
    from crm_gateway.clients import Clients
    from tests.support.harness import assert_problem, token

    app = create_app(Clients({"customer": "127.0.0.1:9", "sales": f"127.0.0.1:{svc.port}", "reporting": "127.0.0.1:9"}))
    http = app.test_client()
    h = {"Authorization": f"Bearer {token('admin', 'ada')}"}
    cases = [
        ("/v1/leads", {"givenName": 123}, "given_name"),
        ("/v1/leads", {"familyName": "x", "tags": "vip"}, "tags"),
        (
            "/v1/opportunities",
            {"displayName": "x", "lines": [{"unitPrice": {"units": "abc"}}]},
            "lines.unit_price.units",
        ),
        ("/v1/opportunities", {"displayName": "x", "expectedCloseDate": {"year": "soon"}}, "expected_close_date.year"),
        ("/v1/opportunities", {"displayName": "x", "lines": [{"nope": 1}]}, "lines[0].nope"),
        ("/v1/activities", {"kind": "KIND_NOPE", "subject": "x"}, "kind"),
        ("/v1/leads", {"familyName": "x", "favouriteColour": "red"}, "favourite_colour"),
    ]
    for path, body, field in cases:
        problem = assert_problem(http.post(path, json=body, headers=h), 400, field)
        assert "Available Fields" not in problem["detail"], problem


def test_convert_lead_checks_its_own_fields_before_anything_happens(ch, leads_stub):
    """Sent: POST /v1/leads/{id}:convert with opportunityName of 1,000 characters (or a negative
    amount, an amount above 10^18, a close date in year 1). Came back: 200, an opportunity named
    with all 1,000 characters (the others were taken as given). Should be: INVALID_ARGUMENT
    naming the field, before customer-svc is called; the lead stays unconverted."""
    from crm.sales.v1 import conversion_pb2, conversion_pb2_grpc

    stub = conversion_pb2_grpc.LeadConversionServiceStub(ch)
    lead = leads_stub.CreateLead(
        leads_pb2.CreateLeadRequest(lead=leads_pb2.Lead(family_name="Convert")), metadata=ADMIN
    )
    bad = [
        (dict(opportunity_name="x" * 201), "opportunity_name"),
        (dict(opportunity_name="a\x00b"), "opportunity_name"),
        (dict(amount=irr(-1)), "amount"),
        (dict(amount=irr(10**18 + 1)), "amount"),
        (dict(expected_close_date=Date(year=1, month=1, day=1)), "expected_close_date"),
    ]
    for fields, field in bad:
        code, err = _error(
            stub.ConvertLead, conversion_pb2.ConvertLeadRequest(name=lead.name, **fields), metadata=ADMIN
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (fields, code)
        assert [v.field for v in err.field_violations] == [field]
    again = leads_stub.GetLead(leads_pb2.GetLeadRequest(name=lead.name), metadata=ADMIN)
    assert again.status == leads_pb2.LEAD_STATUS_NEW and not again.customer and not again.opportunity


def test_dates_no_calendar_can_carry_are_refused_naming_the_field(ch, opps):
    """Sent: an opportunity closing 0001-01-01 (then its export with the Jalali close date), a
    forecast from 9999-01-01 and of the period "9999". Came back: 201 then a 500 on the export;
    500 on the forecast. Should be: INVALID_ARGUMENT naming expected_close_date, start, period."""
    from crm.sales.v1 import forecasts_pb2, forecasts_pb2_grpc

    for year in (1, 9999):
        code, err = _error(
            opps.CreateOpportunity,
            pb.CreateOpportunityRequest(
                opportunity=pb.Opportunity(display_name="ancient", expected_close_date=Date(year=year, month=1, day=1))
            ),
            metadata=ADMIN,
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in err.field_violations] == ["opportunity.expected_close_date"]
    forecasts = forecasts_pb2_grpc.ForecastServiceStub(ch)
    for req, field in [
        (dict(start="9999-01-01", end="9999-12-31", calendar="gregorian", unit="year"), "start"),
        (dict(period="9999"), "period"),
        (dict(period="9999-Q4"), "period"),
    ]:
        code, err = _error(forecasts.GetForecast, forecasts_pb2.GetForecastRequest(**req), metadata=ADMIN)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (req, code)
        assert [v.field for v in err.field_violations] == [field]


def test_an_invoice_to_a_known_customer_names_the_buyer(svc, ch):
    """Sent: an invoice with tax.buyerType PERSON and no buyerName, for a customer the projection
    knows as «علی رضایی». Came back: the PDF's buyer line read "customers/<uuid>" (the buyer's
    national id came from the projection, the name did not). Should be: buyer_name defaults to the
    customer's name, as buyer_national_id defaults to their national id; a given name is kept."""
    from crm.sales.v1 import invoices_pb2, invoices_pb2_grpc
    from crm.type.v1.money_pb2 import Money
    from sales_svc.tables import customer_refs

    cid = str(uuid.uuid4())
    with svc.ctx.engine.begin() as conn:
        conn.execute(customer_refs.insert().values(customer_id=cid, display_name="علی رضایی", national_id="0084575948"))
    stub = invoices_pb2_grpc.InvoiceServiceStub(ch)

    def make(**tax):
        return stub.CreateInvoice(
            invoices_pb2.CreateInvoiceRequest(
                invoice=invoices_pb2.Invoice(
                    customer=f"customers/{cid}",
                    currency_code="IRR",
                    tax=invoices_pb2.TaxInfo(buyer_type=invoices_pb2.BUYER_TYPE_PERSON, **tax),
                    lines=[
                        invoices_pb2.InvoiceLine(
                            description="x", quantity="1", unit_price=Money(currency_code="IRR", units=1000)
                        )
                    ],
                )
            ),
            metadata=ADMIN,
        )

    inv = make()
    assert inv.tax.buyer_name == "علی رضایی" and inv.tax.buyer_national_id == "0084575948"
    assert make(buyer_name="Ali R.").tax.buyer_name == "Ali R."


def test_an_invoice_issued_on_a_date_no_fiscal_year_holds_is_refused(ch):
    """Sent: POST /v1/invoices/{id}:issue with issueDate 0001-01-01 (and 1899-01-01). Came back:
    500 (no Jalali fiscal year), and 200 numbering an invoice in fiscal year 1277. Should be:
    INVALID_ARGUMENT naming issue_date; the draft stays a draft."""
    from crm.sales.v1 import invoices_pb2, invoices_pb2_grpc
    from crm.type.v1.money_pb2 import Money

    stub = invoices_pb2_grpc.InvoiceServiceStub(ch)
    inv = stub.CreateInvoice(
        invoices_pb2.CreateInvoiceRequest(
            invoice=invoices_pb2.Invoice(
                customer=f"customers/{uuid.uuid4()}",
                currency_code="IRR",
                lines=[
                    invoices_pb2.InvoiceLine(
                        description="x", quantity="1", unit_price=Money(currency_code="IRR", units=5)
                    )
                ],
            )
        ),
        metadata=ADMIN,
    )
    for year in (1, 1899):
        code, err = _error(
            stub.IssueInvoice,
            invoices_pb2.IssueInvoiceRequest(name=inv.name, issue_date=Date(year=year, month=1, day=1)),
            metadata=ADMIN,
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in err.field_violations] == ["issue_date"]
    assert stub.GetInvoice(invoices_pb2.GetInvoiceRequest(name=inv.name), metadata=ADMIN).state == "draft"


def test_an_activity_lasting_longer_than_a_week_is_refused(ch):
    """Sent: POST /v1/activities/{id}:complete with durationSeconds 9223372036854775807 (and a
    create with it). Came back: 200, a call of 292 billion years. Should be: INVALID_ARGUMENT
    naming duration_seconds (0..604800, a week); a week itself is taken."""
    from crm.sales.v1 import activities_pb2 as apb
    from crm.sales.v1 import activities_pb2_grpc

    stub = activities_pb2_grpc.ActivityServiceStub(ch)
    cust = f"customers/{uuid.uuid4()}"
    code, err = _error(
        stub.CreateActivity,
        apb.CreateActivityRequest(
            activity=apb.Activity(
                kind=apb.Activity.KIND_MEETING, subject="long", customer=cust, duration_seconds=2**63 - 1
            )
        ),
        metadata=ADMIN,
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in err.field_violations] == ["activity.duration_seconds"]
    act = stub.CreateActivity(
        apb.CreateActivityRequest(activity=apb.Activity(kind=apb.Activity.KIND_CALL, subject="call", customer=cust)),
        metadata=ADMIN,
    )
    code, err = _error(
        stub.CompleteActivity,
        apb.CompleteActivityRequest(name=act.name, outcome="answered", duration_seconds=2**63 - 1),
        metadata=ADMIN,
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in err.field_violations] == ["duration_seconds"]
    done = stub.CompleteActivity(
        apb.CompleteActivityRequest(name=act.name, outcome="answered", duration_seconds=7 * 24 * 3600), metadata=ADMIN
    )
    assert done.done and done.duration_seconds == 604800


def test_a_credit_note_owes_nothing_and_its_pdf_names_the_invoice_it_reverses(ch):
    """Sent: a credit note of one line of an issued invoice (no TAX_MEMORY_ID, so no tax ids),
    then GET /v1/invoices/{credit note}:render. Came back: the credit note with `outstanding`
    equal to its total, and a PDF naming no invoice it reverses. Should be: outstanding 0 (the
    credit lowers the invoice's outstanding amount), and the PDF names the credited invoice's
    number."""
    import io

    import pypdf

    from crm.sales.v1 import invoices_pb2, invoices_pb2_grpc
    from crm.type.v1.money_pb2 import Money

    stub = invoices_pb2_grpc.InvoiceServiceStub(ch)
    inv = stub.CreateInvoice(
        invoices_pb2.CreateInvoiceRequest(
            invoice=invoices_pb2.Invoice(
                customer=f"customers/{uuid.uuid4()}",
                currency_code="IRR",
                lines=[
                    invoices_pb2.InvoiceLine(
                        description="x", quantity="2", unit_price=Money(currency_code="IRR", units=1000)
                    )
                ],
            )
        ),
        metadata=ADMIN,
    )
    inv = stub.IssueInvoice(invoices_pb2.IssueInvoiceRequest(name=inv.name), metadata=ADMIN)
    note = stub.CreateCreditNote(
        invoices_pb2.CreateCreditNoteRequest(
            name=inv.name, lines=[invoices_pb2.CreditLine(position=1, quantity="1")], reason="return"
        ),
        metadata=ADMIN,
    )
    assert note.kind == "credit_note" and note.total.units == 1000
    assert note.outstanding.units == 0 and note.outstanding.nanos == 0
    got = stub.GetInvoice(invoices_pb2.GetInvoiceRequest(name=inv.name), metadata=ADMIN)
    assert got.outstanding.units == 1000  # the invoice's own outstanding amount is lowered
    pdf = b"".join(
        c.data for c in stub.RenderInvoicePdf(invoices_pb2.RenderInvoicePdfRequest(name=note.name), metadata=ADMIN)
    )
    text = "\n".join(p.extract_text() for p in pypdf.PdfReader(io.BytesIO(pdf)).pages)
    assert inv.number in [line.strip() for line in text.splitlines()], text


def test_an_assignment_rule_without_a_strategy_names_the_values_that_parse(svc):
    """Sent over HTTP: POST /v1/assignmentRules without a strategy, then with "FIXED_OWNER" as the
    400 said. Came back: "is required: ROUND_ROBIN, LEAST_OPEN or FIXED_OWNER", then a 400 that
    FIXED_OWNER is not a value. Should be: the message names the enum values as written
    (ASSIGNMENT_STRATEGY_FIXED_OWNER), which the next request can send."""
    from crm_gateway import create_app
    from crm_gateway.clients import Clients
    from tests.support.harness import assert_problem, token

    app = create_app(Clients({"customer": "127.0.0.1:9", "sales": f"127.0.0.1:{svc.port}", "reporting": "127.0.0.1:9"}))
    http = app.test_client()
    h = {"Authorization": f"Bearer {token('admin', 'ada')}"}
    problem = assert_problem(http.post("/v1/assignmentRules", json={"displayName": "r"}, headers=h), 400, "strategy")
    named = [v for v in problem["detail"].replace(",", " ").split() if v.startswith("ASSIGNMENT_STRATEGY_")]
    assert "ASSIGNMENT_STRATEGY_FIXED_OWNER" in named
    body = {"displayName": "r", "strategy": "ASSIGNMENT_STRATEGY_FIXED_OWNER", "owner": "ada"}
    made = http.post("/v1/assignmentRules", json=body, headers=h)
    assert made.status_code in (200, 201), made.get_data(as_text=True)


def test_an_owner_longer_than_any_subject_is_refused_naming_the_field(ch):
    """Sent: SubmitForecast with a 3,000-character owner (as admin, who may submit anyone's).
    Came back: INTERNAL (PostgreSQL's ProgramLimitExceeded: the row of the index
    forecast_snapshots_owner_page is over 2,704 bytes). CreateInvoice and CreateOrder took their
    owner unchecked too. Should be: INVALID_ARGUMENT naming the owner field, as for the owner of a
    lead, opportunity or activity (at most 200 characters); 200 characters are still taken."""
    from crm.sales.v1 import (
        forecasts_pb2,
        forecasts_pb2_grpc,
        invoices_pb2,
        invoices_pb2_grpc,
        orders_pb2,
        orders_pb2_grpc,
    )
    from crm.type.v1.money_pb2 import Money

    long_owner = secrets.token_hex(1500)  # 3,000 random characters (a repeated text would compress)
    forecasts = forecasts_pb2_grpc.ForecastServiceStub(ch)
    code, err = _error(
        forecasts.SubmitForecast,
        forecasts_pb2.SubmitForecastRequest(period="1405-Q3", owner=long_owner),
        metadata=ADMIN,
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and [v.field for v in err.field_violations] == ["owner"]
    at_limit = "u" + uuid.uuid4().hex * 6 + "x" * 7  # 200 characters
    snap = forecasts.SubmitForecast(
        forecasts_pb2.SubmitForecastRequest(period="1405-Q3", owner=at_limit), metadata=ADMIN
    )
    assert snap.owner == at_limit

    invoices = invoices_pb2_grpc.InvoiceServiceStub(ch)
    line = invoices_pb2.InvoiceLine(description="x", quantity="1", unit_price=Money(currency_code="IRR", units=1000))
    invoice = invoices_pb2.Invoice(customer=f"customers/{uuid.uuid4()}", currency_code="IRR", lines=[line])
    invoice.owner = long_owner
    code, err = _error(invoices.CreateInvoice, invoices_pb2.CreateInvoiceRequest(invoice=invoice), metadata=ADMIN)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and [v.field for v in err.field_violations] == ["invoice.owner"]
    invoice.owner = at_limit
    assert invoices.CreateInvoice(invoices_pb2.CreateInvoiceRequest(invoice=invoice), metadata=ADMIN).owner == at_limit

    orders = orders_pb2_grpc.OrderServiceStub(ch)
    order = orders_pb2.Order(
        customer=f"customers/{uuid.uuid4()}",
        currency_code="IRR",
        owner=long_owner,
        lines=[
            orders_pb2.OrderLine(description="Widget", quantity="1", unit_price=Money(currency_code="IRR", units=5))
        ],
    )
    code, err = _error(orders.CreateOrder, orders_pb2.CreateOrderRequest(order=order), metadata=ADMIN)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and [v.field for v in err.field_violations] == ["order.owner"]
    order.owner = f"  {at_limit}  "  # stripped, as every owner is
    assert orders.CreateOrder(orders_pb2.CreateOrderRequest(order=order), metadata=ADMIN).owner == at_limit


def test_a_blank_order_by_is_the_default_order_and_a_blank_segment_is_refused(svc, ch):
    """Sent: ListActivities with order_by "   ". Came back: INTERNAL (an IndexError: only "" was
    taken for the default, and "   " parses to no sort keys). ListTeams and ListProductLines took
    "   " as no order at all (by id only). Should be (AIP-132): blank or only spaces is the
    default order; a blank segment ("create_time,  ,") is INVALID_ARGUMENT naming order_by."""
    from crm.sales.v1 import (
        activities_pb2,
        activities_pb2_grpc,
        catalog_pb2,
        catalog_pb2_grpc,
        sales_service_pb2,
        sales_service_pb2_grpc,
    )
    from sales_svc.tables import product_lines, teams

    # rows whose id order is the reverse of the default order, so "by id only" shows
    ids = sorted(str(uuid.uuid4()) for _ in range(4))
    tag = uuid.uuid4().hex[:8]
    with svc.ctx.engine.begin() as conn:
        for i, rid in enumerate(ids):
            conn.execute(teams.insert().values(id=rid, name=f"{tag}-team-{9 - i}", manager_id="ada"))
            conn.execute(product_lines.insert().values(id=rid, code=f"{tag}-line-{9 - i}", name=f"Line {i}"))

    acts = activities_pb2_grpc.ActivityServiceStub(ch)
    for subject in ("first", "second", "third"):
        acts.CreateActivity(
            activities_pb2.CreateActivityRequest(
                activity=activities_pb2.Activity(
                    kind=activities_pb2.Activity.KIND_TASK, subject=subject, customer=f"customers/{uuid.uuid4()}"
                )
            ),
            metadata=ADMIN,
        )
    team_stub = sales_service_pb2_grpc.SalesServiceStub(ch)
    catalog = catalog_pb2_grpc.CatalogServiceStub(ch)
    lists = {
        "activities": lambda o: [
            x.name
            for x in acts.ListActivities(activities_pb2.ListActivitiesRequest(order_by=o), metadata=ADMIN).activities
        ],
        "teams": lambda o: [
            x.name
            for x in team_stub.ListTeams(
                sales_service_pb2.ListTeamsRequest(order_by=o, page_size=100), metadata=ADMIN
            ).teams
        ],
        "product lines": lambda o: [
            x.name
            for x in catalog.ListProductLines(
                catalog_pb2.ListProductLinesRequest(order_by=o, page_size=100), metadata=ADMIN
            ).product_lines
        ],
    }
    for what, listed in lists.items():
        default = listed("")
        assert len(default) >= 3, what
        for blank in ("   ", " \t ", "\n"):
            assert listed(blank) == default, (what, repr(blank))
    assert lists["activities"]("create_time desc") == lists["activities"]("")
    assert lists["teams"]("display_name") == lists["teams"]("")
    assert lists["product lines"]("code") == lists["product lines"]("")
    mine = [f"teams/{rid}" for rid in ids]
    assert [n for n in lists["teams"]("") if n in mine] == mine[::-1]  # by display_name, not by id

    for bad in ("create_time,  ,", " , ", "create_time desc,,due_time", ","):
        code, err = _error(acts.ListActivities, activities_pb2.ListActivitiesRequest(order_by=bad), metadata=ADMIN)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert [v.field for v in err.field_violations] == ["order_by"], bad
    code, err = _error(
        team_stub.ListTeams, sales_service_pb2.ListTeamsRequest(order_by="display_name, ,"), metadata=ADMIN
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and [v.field for v in err.field_violations] == ["order_by"]
