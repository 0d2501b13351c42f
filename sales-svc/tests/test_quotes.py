"""Quotes over real gRPC on a fresh database: totals against hand-computed examples (IRR and
USD), versions, the state rules, one order per accepted quote (also under concurrent accepts),
the PDF read back, record-level access, etags, idempotent create, and one HTTP route."""

from __future__ import annotations

import datetime as dt
import io
import re
import threading
import unicodedata
import uuid
from decimal import Decimal

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2

from crm.sales.v1 import orders_pb2, orders_pb2_grpc, quotes_pb2_grpc, sales_events_pb2
from crm.sales.v1 import quotes_pb2 as pb
from crm.type.v1 import date_pb2, money_pb2
from crm_chassis import money, persian
from crm_chassis.errors import read_rpc_error
from sales_svc.orders import today
from sales_svc.quote_pdf import amount_in_words, words_fa
from sales_svc.tables import customer_refs, opportunities, opportunity_lines, orders, pipelines, stages
from tests.support.harness import assert_problem, token

from .conftest import ADMIN, events, make_team, manager, rep


@pytest.fixture(scope="module")
def quotes(ch):
    return quotes_pb2_grpc.QuoteServiceStub(ch)


@pytest.fixture(scope="module")
def order_stub(ch):
    return orders_pb2_grpc.OrderServiceStub(ch)


def fails(call, *args, **kw):
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kw)
    return read_rpc_error(info.value)


def d(day: dt.date) -> date_pb2.Date:
    return date_pb2.Date(year=day.year, month=day.month, day=day.day)


def amount(m: money_pb2.Money) -> Decimal:
    return money.to_decimal(m)


def price(value: str, currency: str) -> money_pb2.Money:
    return money.to_money(Decimal(value), currency)


def opportunity(svc, owner: str, currency: str = "IRR", lines=(), team_id=None, customer="c-1") -> str:
    """A pipeline, a stage and an opportunity with lines, straight in the core tables (the
    opportunities part is built elsewhere). lines: (quantity, unit_price, discount %, tax %)."""
    with svc.ctx.engine.begin() as conn:
        pid = conn.execute(
            pipelines.insert().values(name=f"p-{uuid.uuid4().hex[:8]}").returning(pipelines.c.id)
        ).scalar()
        sid = conn.execute(
            stages.insert().values(pipeline_id=pid, position=0, name="Proposal", probability=40).returning(stages.c.id)
        ).scalar()
        conn.execute(
            sa.dialects.postgresql.insert(customer_refs)
            .values(customer_id=customer, display_name="شرکت نمونه", national_id="10101010101", city="تهران")
            .on_conflict_do_nothing()
        )
        oid = conn.execute(
            opportunities.insert()
            .values(
                name="Deal",
                customer_id=customer,
                pipeline_id=pid,
                stage_id=sid,
                currency_code=currency,
                probability=40,
                owner_id=owner,
                team_id=team_id,
                source="instagram",
                campaign_id="camp-7",
            )
            .returning(opportunities.c.id)
        ).scalar()
        for i, (q, p, disc, tax) in enumerate(lines):
            conn.execute(
                opportunity_lines.insert().values(
                    opportunity_id=oid,
                    position=i,
                    description=f"Item {i + 1}",
                    quantity=Decimal(q),
                    unit_price=Decimal(p),
                    discount_percent=Decimal(disc),
                    tax_rate=Decimal(tax),
                    amount=Decimal(0),
                )
            )
    return f"opportunities/{oid}"


IRR_LINES = [("3", "1250000", "10", "10"), ("2.5", "333333", "0", "9")]
NEXT_WEEK = today() + dt.timedelta(days=7)


def new_quote(quotes, svc, owner="ada", md=ADMIN, lines=IRR_LINES, **kw) -> pb.Quote:
    opp = opportunity(svc, owner, lines=lines, **kw)
    return quotes.CreateQuote(
        pb.CreateQuoteRequest(quote=pb.Quote(opportunity=opp, valid_until=d(NEXT_WEEK))), metadata=md
    )


def test_totals_from_the_opportunitys_lines_in_rials(svc, quotes):
    q = new_quote(quotes, svc)
    # By hand: 3 × 1,250,000 = 3,750,000, 10% off = 375,000, net 3,375,000, VAT 10% = 337,500.
    # 2.5 × 333,333 = 833,332.5 -> 833,332 (half to even), no discount, VAT 9% = 74,999.88 -> 75,000.
    a, b = q.lines
    assert [amount(a.gross_amount), amount(a.discount_amount), amount(a.net_amount), amount(a.tax_amount)] == [
        3_750_000,
        375_000,
        3_375_000,
        337_500,
    ]
    assert [amount(b.gross_amount), amount(b.discount_amount), amount(b.net_amount), amount(b.tax_amount)] == [
        833_332,
        0,
        833_332,
        75_000,
    ]
    assert amount(q.subtotal) == 4_583_332
    assert amount(q.discount_total) == 375_000
    assert amount(q.tax_total) == 412_500
    assert amount(q.total) == 4_620_832
    assert q.total.currency_code == "IRR" and q.total.nanos == 0
    assert q.state == pb.QUOTE_STATE_DRAFT and q.quote_version == 1 and q.latest_version == 1
    jy = persian.to_jalali(today()).year
    assert q.number.startswith(f"Q-{jy}-") and len(q.number.split("-")[2]) == 5
    created = [e for e in events(svc, "quote.created.v1", sales_events_pb2.QuoteEvent) if e.quote == q.name]
    assert len(created) == 1 and created[0].source == "instagram" and created[0].campaign_id == "camp-7"
    assert [f.quantity for f in created[0].lines] == ["3", "2.5"]
    assert amount(created[0].tax_total) == 412_500


def test_totals_in_dollars_round_to_cents_and_a_wrong_currency_is_refused(svc, quotes):
    opp = opportunity(svc, "ada", currency="USD")
    lines = [
        pb.QuoteLine(
            description="Licence", quantity="3", unit_price=price("19.99", "USD"), discount_percent="15", tax_rate="9"
        ),
        pb.QuoteLine(description="Sticker", quantity="1", unit_price=price("0.05", "USD"), tax_rate="9"),
    ]
    q = quotes.CreateQuote(
        pb.CreateQuoteRequest(quote=pb.Quote(opportunity=opp, valid_until=d(NEXT_WEEK), lines=lines)), metadata=ADMIN
    )
    # By hand: 3 × 19.99 = 59.97; 15% = 8.9955 -> 9.00; net 50.97; VAT 9% = 4.5873 -> 4.59.
    # 0.05, VAT 9% = 0.0045 -> 0.00. Subtotal 60.02, discount 9.00, VAT 4.59, total 55.61.
    assert amount(q.lines[0].discount_amount) == Decimal("9.00")
    assert amount(q.lines[0].tax_amount) == Decimal("4.59")
    assert amount(q.lines[1].tax_amount) == 0
    assert (amount(q.subtotal), amount(q.discount_total), amount(q.tax_total)) == (
        Decimal("60.02"),
        Decimal("9.00"),
        Decimal("4.59"),
    )
    assert (q.total.units, q.total.nanos, q.total.currency_code) == (55, 610_000_000, "USD")

    wrong = [pb.QuoteLine(description="x", quantity="1", unit_price=price("10", "EUR"))]
    err = fails(
        quotes.CreateQuote,
        pb.CreateQuoteRequest(quote=pb.Quote(opportunity=opp, valid_until=d(NEXT_WEEK), lines=wrong)),
        metadata=ADMIN,
    )
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in err.field_violations] == ["quote.lines[0].unit_price.currency_code"]
    # The opportunity's lines are in USD: a quote in IRR cannot copy them.
    err = fails(
        quotes.CreateQuote,
        pb.CreateQuoteRequest(quote=pb.Quote(opportunity=opp, valid_until=d(NEXT_WEEK), currency_code="IRR")),
        metadata=ADMIN,
    )
    assert [v.field for v in err.field_violations] == ["quote.currency_code"]
    bad = [pb.QuoteLine(quantity="-1", unit_price=price("1", "USD"), discount_percent="120")]
    err = fails(
        quotes.CreateQuote,
        pb.CreateQuoteRequest(quote=pb.Quote(opportunity=opp, valid_until=d(NEXT_WEEK), lines=bad)),
        metadata=ADMIN,
    )
    assert {v.field for v in err.field_violations} == {"quote.lines[0].quantity", "quote.lines[0].discount_percent"}


def test_revising_makes_a_new_version_and_keeps_the_old_one(svc, quotes):
    q = new_quote(quotes, svc)
    sent = quotes.SendQuote(pb.SendQuoteRequest(name=q.name, etag=q.etag), metadata=ADMIN)
    assert sent.state == pb.QUOTE_STATE_SENT and sent.HasField("send_time")
    new_lines = [pb.QuoteLine(description="Only this", quantity="1", unit_price=price("1000000", "IRR"), tax_rate="10")]
    v2 = quotes.ReviseQuote(pb.ReviseQuoteRequest(name=q.name, etag=sent.etag, lines=new_lines), metadata=ADMIN)
    assert (v2.quote_version, v2.latest_version, v2.state, v2.number) == (2, 2, pb.QUOTE_STATE_DRAFT, q.number)
    assert amount(v2.total) == 1_100_000 and len(v2.lines) == 1

    v1 = quotes.GetQuoteVersion(pb.GetQuoteVersionRequest(name=f"{q.name}/versions/1"), metadata=ADMIN)
    assert (v1.quote_version, v1.latest_version, v1.state) == (1, 2, pb.QUOTE_STATE_SENT)
    assert amount(v1.total) == 4_620_832 and len(v1.lines) == 2
    assert quotes.GetQuote(pb.GetQuoteRequest(name=q.name), metadata=ADMIN).quote_version == 2

    v3 = quotes.ReviseQuote(pb.ReviseQuoteRequest(name=q.name, notes="Delivery in Tehran"), metadata=ADMIN)
    assert v3.quote_version == 3 and amount(v3.total) == 1_100_000 and v3.notes == "Delivery in Tehran"
    versions = quotes.ListQuoteVersions(pb.ListQuoteVersionsRequest(parent=q.name), metadata=ADMIN).versions
    assert [(v.quote_version, amount(v.total)) for v in versions] == [(1, 4_620_832), (2, 1_100_000), (3, 1_100_000)]
    assert versions[2].lines[0].description == "Only this"  # copied from version 2
    err = fails(quotes.GetQuoteVersion, pb.GetQuoteVersionRequest(name=f"{q.name}/versions/9"), metadata=ADMIN)
    assert err.code == grpc.StatusCode.NOT_FOUND


def test_state_rules_name_the_rule(svc, quotes):
    q = new_quote(quotes, svc)
    err = fails(quotes.AcceptQuote, pb.AcceptQuoteRequest(name=q.name), metadata=ADMIN)
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "QUOTE_NOT_SENT")
    sent = quotes.SendQuote(pb.SendQuoteRequest(name=q.name), metadata=ADMIN)
    err = fails(
        quotes.UpdateQuote,
        pb.UpdateQuoteRequest(
            quote=pb.Quote(name=q.name, notes="late change", etag=sent.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["notes"]),
        ),
        metadata=ADMIN,
    )
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "QUOTE_NOT_DRAFT")
    err = fails(quotes.SendQuote, pb.SendQuoteRequest(name=q.name), metadata=ADMIN)
    assert err.reason == "QUOTE_NOT_DRAFT"
    accepted = quotes.AcceptQuote(pb.AcceptQuoteRequest(name=q.name), metadata=ADMIN)
    assert accepted.state == pb.QUOTE_STATE_ACCEPTED and accepted.order.startswith("orders/")
    err = fails(quotes.AcceptQuote, pb.AcceptQuoteRequest(name=q.name), metadata=ADMIN)
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "QUOTE_ALREADY_ACCEPTED")
    assert err.metadata["order"] == accepted.order
    err = fails(quotes.RejectQuote, pb.RejectQuoteRequest(name=q.name), metadata=ADMIN)
    assert err.reason == "QUOTE_NOT_SENT"
    err = fails(quotes.ReviseQuote, pb.ReviseQuoteRequest(name=q.name), metadata=ADMIN)
    assert err.reason == "QUOTE_ACCEPTED"

    r = new_quote(quotes, svc)
    quotes.SendQuote(pb.SendQuoteRequest(name=r.name), metadata=ADMIN)
    rejected = quotes.RejectQuote(pb.RejectQuoteRequest(name=r.name, reason="too expensive"), metadata=ADMIN)
    assert rejected.state == pb.QUOTE_STATE_REJECTED and rejected.reject_reason == "too expensive"
    evs = [e for e in events(svc, "quote.rejected.v1", sales_events_pb2.QuoteEvent) if e.quote == r.name]
    assert len(evs) == 1 and evs[0].reject_reason == "too expensive"


def test_accepting_places_exactly_one_order_even_when_called_twice_at_once(svc, quotes, order_stub):
    q = new_quote(quotes, svc)
    quotes.SendQuote(pb.SendQuoteRequest(name=q.name), metadata=ADMIN)
    results, errors = [], []
    start = threading.Barrier(2)

    def accept():
        start.wait()
        try:
            results.append(quotes.AcceptQuote(pb.AcceptQuoteRequest(name=q.name), metadata=ADMIN))
        except grpc.RpcError as e:
            errors.append(read_rpc_error(e))

    threads = [threading.Thread(target=accept) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 1 and [e.reason for e in errors] == ["QUOTE_ALREADY_ACCEPTED"]
    qid = q.name.split("/")[1]
    with svc.ctx.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).where(orders.c.quote_id == qid)).scalar() == 1
    order = order_stub.GetOrder(orders_pb2.GetOrderRequest(name=results[0].order), metadata=ADMIN)
    assert order.quote == q.name and order.opportunity == q.opportunity and order.customer == q.customer
    assert amount(order.total) == 4_620_832 and amount(order.tax_total) == 412_500
    assert [x.quantity for x in order.lines] == ["3", "2.5"]
    assert order.number.startswith(f"O-{persian.to_jalali(today()).year}-") and len(order.number.split("-")[2]) == 6
    placed = [e for e in events(svc, "order.placed.v1", sales_events_pb2.OrderEvent) if e.quote == q.name]
    assert len(placed) == 1 and placed[0].source == "instagram" and placed[0].campaign_id == "camp-7"
    accepted = [e for e in events(svc, "quote.accepted.v1", sales_events_pb2.QuoteEvent) if e.quote == q.name]
    assert len(accepted) == 1 and accepted[0].order == order.name


def drawn_lines(data: bytes) -> list[str]:
    """The PDF's text lines as drawn (visual order, left to right), each glyph decoded through
    its font's ToUnicode map: what a reader sees, with no extractor's bidi guesses."""
    from pypdf import PdfReader
    from pypdf.generic import ContentStream

    reader = PdfReader(io.BytesIO(data))
    out = []
    for page in reader.pages:
        maps = {}
        for name, font_ref in page["/Resources"]["/Font"].items():
            cmap = font_ref.get_object()["/ToUnicode"].get_object().get_data().decode("latin-1")
            maps[name] = {
                int(a, 16): chr(int(b, 16)) for a, b in re.findall(r"<([0-9A-Fa-f]{2})>\s*<([0-9A-Fa-f]{4})>", cmap)
            }
        line, font = [], {}
        for operands, op in ContentStream(page.get_contents(), reader).operations:
            if op == b"Tf":
                font = maps[operands[0]]
            elif op == b"Tj":
                raw = operands[0]
                raw = raw.get_original_bytes() if hasattr(raw, "get_original_bytes") else bytes(raw)
                line.append("".join(font.get(b, chr(b)) for b in raw))
            elif op in (b"T*", b"ET") and line:
                out.append(unicodedata.normalize("NFKC", "".join(line)))
                line = []
    return out


def test_the_pdf_read_back_holds_the_number_dates_total_and_words(svc, quotes, monkeypatch):
    from pypdf import PdfReader

    monkeypatch.setenv("SELLER_NAME", "شرکت فروشنده آزمون")
    monkeypatch.setenv("SELLER_ECONOMIC_CODE", "411122223333")
    q = new_quote(quotes, svc)
    chunks = list(quotes.RenderQuotePdf(pb.RenderQuotePdfRequest(name=q.name), metadata=ADMIN))
    assert chunks[0].content_type == "application/pdf" and chunks[0].filename == f"{q.number}-v1.pdf"
    data = b"".join(c.data for c in chunks)
    assert data.startswith(b"%PDF")
    lines = drawn_lines(data)
    drawn = "\n".join(lines)
    logical = "\n".join(x[::-1] for x in lines)  # a Persian line drawn right to left, read back
    assert q.number in drawn
    assert persian.format_jalali(today(), persian_digits=True) in drawn  # issued, in Persian digits
    assert persian.format_jalali(NEXT_WEEK, persian_digits=True) in drawn  # valid until
    assert today().isoformat() in drawn and NEXT_WEEK.isoformat() in drawn  # the Gregorian beside each
    # The total, the unit drawn to its left (a reader going right to left reads amount, then unit).
    assert f"{'ریال'[::-1]} ۴٬۶۲۰٬۸۳۲" in drawn
    assert f"{'تومان'[::-1]} ۴۶۲٬۰۸۳" in drawn  # and in tomans
    words = words_fa(4_620_832)
    assert words == "چهار میلیون و ششصد و بیست هزار و هشتصد و سی و دو"
    assert f"به حروف: {words} ریال" in logical
    assert "شرکت فروشنده آزمون" in logical and "411122223333" in drawn and "شرکت نمونه" in logical
    # A text extractor with its own bidi handling reads the words too.
    extracted = unicodedata.normalize("NFKC", "".join(p.extract_text() for p in PdfReader(io.BytesIO(data)).pages))
    assert words in extracted and q.number in extracted
    assert amount_in_words(Decimal("1234.05"), "USD") == "یک هزار و دویست و سی و چهار دلار و پنج سنت"
    assert words_fa(1_000_000_000) == "یک میلیارد" and words_fa(0) == "صفر" and words_fa(19) == "نوزده"

    # An earlier version prints as it was.
    quotes.ReviseQuote(
        pb.ReviseQuoteRequest(
            name=q.name, lines=[pb.QuoteLine(description="x", quantity="1", unit_price=price("10", "IRR"))]
        ),
        metadata=ADMIN,
    )
    old = list(quotes.RenderQuotePdf(pb.RenderQuotePdfRequest(name=q.name, quote_version=1), metadata=ADMIN))
    assert old[0].filename == f"{q.number}-v1.pdf"
    assert f"{'ریال'[::-1]} ۴٬۶۲۰٬۸۳۲" in "\n".join(drawn_lines(b"".join(c.data for c in old)))


def test_a_rep_cannot_see_another_reps_quote_and_a_manager_sees_the_team(svc, quotes):
    team = make_team(svc, f"t-{uuid.uuid4().hex[:6]}", "mona", ["reza"])
    mine = new_quote(quotes, svc, owner="reza", md=rep("reza"))
    assert mine.owner == "reza"
    err = fails(quotes.GetQuote, pb.GetQuoteRequest(name=mine.name), metadata=rep("sara"))
    assert err.code == grpc.StatusCode.NOT_FOUND
    listed = quotes.ListQuotes(pb.ListQuotesRequest(page_size=1000), metadata=rep("sara")).quotes
    assert mine.name not in {x.name for x in listed}
    err = fails(lambda: list(quotes.RenderQuotePdf(pb.RenderQuotePdfRequest(name=mine.name), metadata=rep("sara"))))
    assert err.code == grpc.StatusCode.NOT_FOUND
    err = fails(quotes.SendQuote, pb.SendQuoteRequest(name=mine.name), metadata=rep("sara"))
    assert err.code == grpc.StatusCode.NOT_FOUND
    # sara cannot quote reza's opportunity either
    opp = mine.opportunity
    err = fails(
        quotes.CreateQuote,
        pb.CreateQuoteRequest(quote=pb.Quote(opportunity=opp, valid_until=d(NEXT_WEEK))),
        metadata=rep("sara"),
    )
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert quotes.GetQuote(pb.GetQuoteRequest(name=mine.name), metadata=manager("mona")).name == mine.name
    listed = quotes.ListQuotes(pb.ListQuotesRequest(filter='owner = "reza"'), metadata=rep("reza")).quotes
    assert {x.owner for x in listed} == {"reza"} and mine.name in {x.name for x in listed}
    assert team


def test_list_filters_and_keyset_pages(svc, quotes):
    made = [new_quote(quotes, svc, owner="page-owner").name for _ in range(3)]
    quotes.SendQuote(pb.SendQuoteRequest(name=made[0]), metadata=ADMIN)
    seen, token = [], ""
    while True:
        page = quotes.ListQuotes(
            pb.ListQuotesRequest(filter='owner = "page-owner"', page_size=2, page_token=token), metadata=ADMIN
        )
        seen += [x.name for x in page.quotes]
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(made))  # newest first, each once
    sent = quotes.ListQuotes(pb.ListQuotesRequest(filter='owner = "page-owner" AND state = SENT'), metadata=ADMIN)
    assert [x.name for x in sent.quotes] == [made[0]]
    by_total, token = [], ""
    while True:  # sorted by a column of the latest version
        page = quotes.ListQuotes(
            pb.ListQuotesRequest(
                filter='owner = "page-owner"', order_by="valid_until, total desc", page_size=1, page_token=token
            ),
            metadata=ADMIN,
        )
        by_total += [x.name for x in page.quotes]
        token = page.next_page_token
        if not token:
            break
    assert sorted(by_total) == sorted(made)
    err = fails(quotes.ListQuotes, pb.ListQuotesRequest(filter="colour = 1"), metadata=ADMIN)
    assert [v.field for v in err.field_violations] == ["filter"]


def test_update_a_draft_with_mask_and_etag(svc, quotes):
    q = new_quote(quotes, svc)
    later = NEXT_WEEK + dt.timedelta(days=7)
    lines = [pb.QuoteLine(description="Service", quantity="2", unit_price=price("500000", "IRR"), tax_rate="10")]
    up = quotes.UpdateQuote(
        pb.UpdateQuoteRequest(
            quote=pb.Quote(name=q.name, valid_until=d(later), lines=lines, etag=q.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["valid_until", "lines"]),
        ),
        metadata=ADMIN,
    )
    assert up.valid_until == d(later) and amount(up.total) == 1_100_000 and up.etag != q.etag
    err = fails(
        quotes.UpdateQuote,
        pb.UpdateQuoteRequest(
            quote=pb.Quote(name=q.name, notes="x", etag=q.etag), update_mask=field_mask_pb2.FieldMask(paths=["notes"])
        ),
        metadata=ADMIN,
    )
    assert err.code == grpc.StatusCode.ABORTED
    err = fails(
        quotes.UpdateQuote,
        pb.UpdateQuoteRequest(
            quote=pb.Quote(name=q.name, currency_code="USD"),
            update_mask=field_mask_pb2.FieldMask(paths=["currency_code"]),
        ),
        metadata=ADMIN,
    )
    assert [v.field for v in err.field_violations] == ["update_mask"]
    err = fails(quotes.SendQuote, pb.SendQuoteRequest(name=q.name, etag=q.etag), metadata=ADMIN)
    assert err.code == grpc.StatusCode.ABORTED


def test_create_is_idempotent_on_request_id(svc, quotes):
    opp = opportunity(svc, "ada", lines=IRR_LINES)
    req = pb.CreateQuoteRequest(quote=pb.Quote(opportunity=opp, valid_until=d(NEXT_WEEK)), request_id="q-once")
    a = quotes.CreateQuote(req, metadata=ADMIN)
    b = quotes.CreateQuote(req, metadata=ADMIN)
    assert a.name == b.name and a.number == b.number
    listed = quotes.ListQuotes(pb.ListQuotesRequest(filter=f'opportunity = "{opp}"'), metadata=ADMIN).quotes
    assert len(listed) == 1


def test_a_sent_quote_expires_after_its_valid_until(svc, quotes):
    from crm_chassis import timers
    from tests.support.harness import wait_for

    q = new_quote(quotes, svc)
    quotes.SendQuote(pb.SendQuoteRequest(name=q.name), metadata=ADMIN)
    qid = q.name.split("/")[1]
    with svc.ctx.engine.begin() as conn:  # as if its last day had passed
        conn.execute(
            sa.text("UPDATE quote_versions SET valid_until = :d WHERE quote_id = :q"),
            {"d": today() - dt.timedelta(days=1), "q": qid},
        )
        assert timers.reschedule(conn, "quote.expire", qid, dt.datetime.now(dt.UTC))
    err = fails(quotes.AcceptQuote, pb.AcceptQuoteRequest(name=q.name), metadata=ADMIN)
    assert err.reason in ("QUOTE_EXPIRED", "QUOTE_NOT_SENT")
    svc.ctx.shared["runtime"].timers.wake()
    wait_for(lambda: quotes.GetQuote(pb.GetQuoteRequest(name=q.name), metadata=ADMIN).state == pb.QUOTE_STATE_EXPIRED)


def test_http_create_and_a_400_naming_the_field(svc):
    from crm_gateway import create_app
    from crm_gateway.clients import Clients

    opp = opportunity(svc, "tester", lines=IRR_LINES)
    clients = Clients({"customer": "127.0.0.1:9", "sales": f"127.0.0.1:{svc.port}", "reporting": "127.0.0.1:9"})
    try:
        http = create_app(clients).test_client()
        headers = {"Authorization": f"Bearer {token('admin')}"}
        until = NEXT_WEEK
        body = {"opportunity": opp, "validUntil": {"year": until.year, "month": until.month, "day": until.day}}
        resp = http.post("/v1/quotes", json=body, headers=headers)
        assert resp.status_code == 201, resp.get_data(as_text=True)
        made = resp.get_json()
        assert made["number"].startswith("Q-") and made["total"]["units"] == "4620832"
        got = http.get(f"/v1/{made['name']}", headers=headers)
        assert got.status_code == 200 and got.get_json()["name"] == made["name"]
        pdf = http.get(f"/v1/{made['name']}:pdf", headers=headers)
        assert pdf.status_code == 200 and pdf.mimetype == "application/pdf" and pdf.data.startswith(b"%PDF")
        assert_problem(http.post("/v1/quotes", json={"opportunity": opp}, headers=headers), 400, "valid_until")
        assert http.post(f"/v1/{made['name']}:send", json={}, headers=headers).status_code == 200
        accepted = http.post(f"/v1/{made['name']}:accept", json={}, headers=headers)
        assert accepted.status_code == 200 and accepted.get_json()["order"].startswith("orders/")
        again = assert_problem(http.post(f"/v1/{made['name']}:accept", json={}, headers=headers), 400)
        assert again["reason"] == "QUOTE_ALREADY_ACCEPTED"
        order = http.get(f"/v1/{accepted.get_json()['order']}", headers=headers).get_json()
        bad = {"deliveries": [{"line": order["lines"][0]["name"], "quantity": "a lot"}]}
        assert_problem(
            http.post(f"/v1/{order['name']}:recordDelivery", json=bad, headers=headers), 400, "deliveries[0].quantity"
        )
        assert http.get("/v1/orders:lateDeliveries", headers=headers).status_code == 200
    finally:
        clients.close()
