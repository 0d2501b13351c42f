"""InvoiceService (proto/crm/sales/v1/invoices.proto): invoices from orders or free lines, their
gapless numbers, payments, credit notes, the overdue timer and the tax export.

Rules (sales-svc/docs/invoices.md says them for users):
- Amounts are exact Decimals; each line's gross (quantity x unit price), discount and VAT are
  rounded to the currency's minor unit (money.round_minor) line by line, and the totals are
  the sums of the rounded lines (as the tax system adds them).
- An order is never invoiced beyond what was ordered: each order line's quantity minus what
  non-cancelled invoices already took (the order row is locked while an invoice is made).
- Numbers: a counter row per (fiscal year, kind) locked with SELECT ... FOR UPDATE in the
  issuing transaction; a rolled-back issue returns its number, concurrent issues queue.
- Outstanding = total - paid_total - credited_total, never below zero.
"""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal, InvalidOperation

import sqlalchemy as sa

from crm.sales.v1 import invoices_pb2 as pb
from crm.sales.v1 import invoices_pb2_grpc, sales_events_pb2
from crm_chassis import audit, dates, persian, timers
from crm_chassis.auth import Principal
from crm_chassis.errors import FailedPrecondition, FieldViolation, InvalidArgument
from crm_chassis.filtering import (
    FieldType,
    FilterField,
    FilterSchema,
    keyset_page,
    parse_order_by,
    query_fingerprint,
    with_tiebreaker,
)
from crm_chassis.grpc_server import Registration
from crm_chassis.interceptors import current_principal
from crm_chassis.money import check_currency, round_minor, to_decimal, to_money
from crm_chassis.pagination import PageTokens, page_size
from crm_chassis.resources import ResourceName, UpdateMask, check_etag, etag

from . import invoice_export, invoice_pdf
from .access import Scope, owner_of
from .invoice_tables import PAYMENT_METHODS, invoice_counters, invoice_details, invoice_lines, invoice_payments
from .invoice_tax import Seller, tax_id
from .runtime import Sales
from .tables import customer_refs, invoices, opportunities, order_lines, orders, products

EARLIEST_PAYMENT_YEAR = 1900  # as orders' business dates
OVERDUE = "invoice.overdue"
SYSTEM = "system:invoices"

INVOICE = ResourceName("invoices/{id}")
PAYMENT = ResourceName("invoices/{invoice_id}/payments/{payment_id}")
ORDER = ResourceName("orders/{id}")
ORDER_LINE = ResourceName("orders/{order_id}/lines/{line_id}")
CUSTOMER = ResourceName("customers/{id}")
PRODUCT = ResourceName("products/{id}")

TAX_FIELDS = (
    "buyer_type",
    "buyer_economic_code",
    "buyer_national_id",
    "buyer_postal_code",
    "buyer_name",
    "invoice_type",
    "invoice_pattern",
    "settlement_method",
    "exchange_rate",
    "tax_id",
)
FIXED = "cancel the draft and create another"
MASK = UpdateMask(
    ["payment_terms_days", "description", "tax", *(f"tax.{f}" for f in TAX_FIELDS)],
    immutable={f: FIXED for f in ("lines", "order", "customer", "currency_code", "owner", "team")},
)
PAYABLE = ("issued", "partially_paid", "overdue")
CREDITABLE = ("issued", "partially_paid", "paid", "overdue")
HUNDRED = Decimal(100)
MAX_AMOUNT = Decimal(10) ** 17  # a line's or an invoice's amount (NUMERIC(28, 9) holds 10^19)
ZERO = Decimal(0)

DETAIL_COLUMNS = [c for c in invoice_details.c if c.name != "invoice_id"]
SELECT = sa.select(invoices, *DETAIL_COLUMNS).select_from(
    invoices.join(invoice_details, invoice_details.c.invoice_id == invoices.c.id)
)


# -- helpers -------------------------------------------------------------------------------------


today_tehran = dates.today


end_of_day = dates.end_of_day


_date = dates.to_proto


_from_date = dates.from_proto  # an issue date of 0001-01-01 had no fiscal year (a 500)


def _decimal(
    text: str,
    field: str,
    *,
    low: Decimal | None = None,
    high: Decimal | None = None,
    positive: bool = False,
    places: int | None = None,
) -> Decimal:
    """A decimal string as people write it (Persian digits too), checked against its bounds
    and the decimals its column keeps."""
    try:
        value = Decimal(persian.to_ascii_digits(text.strip()))
    except InvalidOperation:
        raise InvalidArgument.field(field, f"{text!r} is not a decimal number") from None
    if not value.is_finite():
        raise InvalidArgument.field(field, "must be a finite number")
    if positive and value <= 0:
        raise InvalidArgument.field(field, "must be more than zero")
    if low is not None and value < low:
        raise InvalidArgument.field(field, f"must be at least {low}")
    if high is not None and value > high:
        raise InvalidArgument.field(field, f"must be at most {high}")
    if places is not None and value and -value.normalize().as_tuple().exponent > places:
        raise InvalidArgument.field(field, f"has more than {places} decimals")
    return value


def _plain(d: Decimal) -> str:
    """A decimal as short plain text: 2.500000 -> "2.5", 10.0000 -> "10"."""
    d = d.normalize()
    return format(d, "f") if d != d.to_integral_value() else str(int(d))


def line_amounts(quantity: Decimal, unit_price: Decimal, discount: Decimal, rate: Decimal, currency: str) -> dict:
    """A line's gross, discount, net amount and VAT, each rounded to the minor unit."""
    gross = round_minor(quantity * unit_price, currency)
    disc = round_minor(gross * discount / HUNDRED, currency)
    amount = gross - disc
    tax = round_minor(amount * rate / HUNDRED, currency)
    return {"gross_amount": gross, "discount_amount": disc, "amount": amount, "tax_amount": tax}


def outstanding(row) -> Decimal:
    return max(ZERO, row.total - row.paid_total - row.credited_total)


def _ref(collection: str, value) -> str:
    return f"{collection}/{value}" if value else ""


def _name(invoice_id: str) -> str:
    return INVOICE.format(invoice_id)


# -- proto ---------------------------------------------------------------------------------------


def line_to_proto(ln, currency: str, credited_positions: dict | None = None) -> pb.InvoiceLine:
    m = lambda v: to_money(v, currency)  # noqa: E731
    out = pb.InvoiceLine(
        position=ln.position,
        product=_ref("products", ln.product_id),
        description=ln.description,
        quantity=_plain(ln.quantity),
        unit=ln.unit,
        unit_price=m(ln.unit_price),
        discount_percent=_plain(ln.discount_percent),
        tax_rate=_plain(ln.tax_rate),
        gross_amount=m(ln.gross_amount),
        discount_amount=m(ln.discount_amount),
        amount=m(ln.amount),
        tax_amount=m(ln.tax_amount),
        total=m(ln.amount + ln.tax_amount),
        tax_product_code=ln.tax_product_code,
    )
    if ln.order_line_id:
        order_id = ln._mapping.get("order_id")
        out.order_line = ORDER_LINE.format(order_id, ln.order_line_id) if order_id else ""
    if ln.credited_line_id and credited_positions:
        out.credited_position = credited_positions.get(ln.credited_line_id, 0)
    return out


def invoice_to_proto(row, lines=(), credited_positions=None) -> pb.Invoice:
    cur = row.currency_code
    m = lambda v: to_money(v, cur)  # noqa: E731
    inv = pb.Invoice(
        name=_name(row.id),
        kind=row.kind,
        order=_ref("orders", row.order_id),
        opportunity=_ref("opportunities", row.opportunity_id),
        customer=_ref("customers", row.customer_id),
        owner=row.owner_id,
        team=_ref("teams", row.team_id),
        currency_code=cur,
        state=row.state,
        fiscal_year=row.fiscal_year or 0,
        number=row.number,
        payment_terms_days=row.payment_terms_days,
        lines=[line_to_proto(ln, cur, credited_positions) for ln in lines],
        subtotal=m(row.subtotal),
        tax_total=m(row.tax_total),
        total=m(row.total),
        paid_total=m(row.paid_total),
        credited_total=m(row.credited_total),
        # a credit note is owed by nobody (it lowers its invoice's outstanding amount instead)
        outstanding=m(
            ZERO
            if row.kind == "credit_note"
            else (outstanding(row) if row.state not in ("draft", "cancelled") else row.total)
        ),
        credited_invoice=_ref("invoices", row.credited_invoice_id),
        description=row.description,
        tax=pb.TaxInfo(
            seller_economic_code=row.seller_economic_code,
            seller_national_id=row.seller_national_id,
            seller_name=row.seller_name,
            buyer_type=row.buyer_type,
            buyer_economic_code=row.buyer_economic_code,
            buyer_national_id=row.buyer_national_id,
            buyer_postal_code=row.buyer_postal_code,
            buyer_name=row.buyer_name,
            tax_id=row.tax_id,
            invoice_type=row.invoice_type,
            invoice_pattern=row.invoice_pattern,
            subject=row.subject,
            reference_tax_id=row.reference_tax_id,
            serial=f"{row.tax_serial:010x}".upper() if row.tax_serial is not None else "",
            exchange_rate=row.exchange_rate,
            settlement_method=row.settlement_method,
        ),
        etag=etag(row.version),
    )
    if row.issue_date:
        inv.issue_date.CopyFrom(_date(row.issue_date))
    if row.due_date:
        inv.due_date.CopyFrom(_date(row.due_date))
    if row.issue_time:
        inv.issue_time.FromDatetime(row.issue_time)
    inv.create_time.FromDatetime(row.create_time)
    inv.update_time.FromDatetime(row.update_time)
    return inv


def payment_to_proto(p) -> pb.Payment:
    out = pb.Payment(
        name=PAYMENT.format(p.invoice_id, p.id),
        amount=to_money(p.amount, p.currency_code),
        method=p.method,
        reference=p.reference,
        recorded_by=p.recorded_by,
    )
    out.pay_time.FromDatetime(p.pay_time)
    out.create_time.FromDatetime(p.create_time)
    return out


# -- use cases -----------------------------------------------------------------------------------


def _filter_customer(op: str, value) -> sa.ColumnElement[bool]:
    text = str(value)
    cid = text.removeprefix("customers/")
    return invoices.c.customer_id == cid if op == "=" else invoices.c.customer_id != cid


FILTERS = FilterSchema(
    FilterField("state", invoices.c.state),
    FilterField("kind", invoices.c.kind),
    FilterField("customer", _filter_customer, operators=frozenset({"=", "!="})),
    FilterField("owner", invoices.c.owner_id),
    FilterField("number", invoices.c.number),
    FilterField("fiscal_year", invoices.c.fiscal_year, FieldType.INT),
    FilterField("issue_date", invoices.c.issue_date, FieldType.DATE),
    FilterField("due_date", invoices.c.due_date, FieldType.DATE),
    FilterField("create_time", invoices.c.create_time, FieldType.TIMESTAMP),
)
SORTABLE = {
    "create_time": invoices.c.create_time,
    "issue_date": invoices.c.issue_date,
    "due_date": invoices.c.due_date,
    "number": invoices.c.number,
}


class Invoices:
    def __init__(self, sales: Sales):
        self.sales = sales
        self.uow = sales.uow
        secret = sales.ctx.settings.jwt_secret
        self.tokens = PageTokens(secret, "invoices")
        self.payment_tokens = PageTokens(secret, "invoice-payments")
        seller = sales.extra.setdefault("invoices.seller", Seller.from_env())
        if seller.memory_id:  # a bad TAX_MEMORY_ID stops the start, not every issue
            tax_id(seller.memory_id, dt.datetime.now(dt.UTC), 1)

    @property
    def seller(self) -> Seller:
        return self.sales.extra["invoices.seller"]

    # -- reading ---------------------------------------------------------------------------
    def _locked(self, conn, invoice_id: str, principal: Principal | None, name: str):
        q = SELECT.where(invoices.c.id == invoice_id).with_for_update(of=invoices)
        if principal is not None:
            q = q.where(Scope.of(principal).visible(invoices.c.owner_id, invoices.c.team_id))
        row = conn.execute(q).one_or_none()
        if row is None:
            raise INVOICE.not_found(name)
        return row

    def _row(self, conn, invoice_id: str):
        return conn.execute(SELECT.where(invoices.c.id == invoice_id)).one()

    @staticmethod
    def _lines(conn, invoice_ids: list[str]):
        q = (
            sa.select(invoice_lines, order_lines.c.order_id)
            .select_from(invoice_lines.outerjoin(order_lines, order_lines.c.id == invoice_lines.c.order_line_id))
            .where(invoice_lines.c.invoice_id.in_(invoice_ids))
            .order_by(invoice_lines.c.invoice_id, invoice_lines.c.position)
        )
        return list(conn.execute(q))

    def _full(self, conn, row) -> pb.Invoice:
        lines = self._lines(conn, [row.id])
        positions = None
        if row.credited_invoice_id:
            positions = dict(
                conn.execute(
                    sa.select(invoice_lines.c.id, invoice_lines.c.position).where(
                        invoice_lines.c.invoice_id == row.credited_invoice_id
                    )
                ).all()
            )
        return invoice_to_proto(row, lines, positions)

    def get(self, name: str, principal: Principal) -> pb.Invoice:
        iid = INVOICE.parse(name).id
        with self.uow.read() as conn:
            row = conn.execute(
                SELECT.where(invoices.c.id == iid, Scope.of(principal).visible(invoices.c.owner_id, invoices.c.team_id))
            ).one_or_none()
            if row is None:
                raise INVOICE.not_found(name)
            return self._full(conn, row)

    def list(self, req: pb.ListInvoicesRequest, principal: Principal):
        limit = page_size(req.page_size)
        where = FILTERS.compile(req.filter)
        order = parse_order_by(req.order_by, SORTABLE) or [(invoices.c.create_time, True)]
        order = with_tiebreaker(order, invoices.c.id, descending=order[0][1])
        query = SELECT.where(where, Scope.of(principal).visible(invoices.c.owner_id, invoices.c.team_id))
        with self.uow.read() as conn:
            rows, token = keyset_page(
                conn, query, order, self.tokens, query_fingerprint(req.filter, req.order_by), limit, req.page_token
            )
        return pb.ListInvoicesResponse(invoices=[invoice_to_proto(r) for r in rows], next_page_token=token)

    def list_payments(self, req: pb.ListPaymentsRequest, principal: Principal):
        iid = INVOICE.parse(req.parent, "parent").id
        limit = page_size(req.page_size)
        with self.uow.read() as conn:
            seen = conn.execute(
                sa.select(invoices.c.id).where(
                    invoices.c.id == iid, Scope.of(principal).visible(invoices.c.owner_id, invoices.c.team_id)
                )
            ).one_or_none()
            if seen is None:
                raise INVOICE.not_found(req.parent)
            order = [(invoice_payments.c.create_time, False), (invoice_payments.c.id, False)]
            rows, token = keyset_page(
                conn,
                sa.select(invoice_payments).where(invoice_payments.c.invoice_id == iid),
                order,
                self.payment_tokens,
                iid,
                limit,
                req.page_token,
            )
        return pb.ListPaymentsResponse(payments=[payment_to_proto(p) for p in rows], next_page_token=token)

    # -- create ----------------------------------------------------------------------------
    def _tax_values(self, t: pb.TaxInfo) -> dict:
        bad: list[FieldViolation] = []
        if t.buyer_type not in pb.BuyerType.values():
            bad.append(FieldViolation("invoice.tax.buyer_type", "unknown buyer type"))
        for f, n in (("buyer_economic_code", 14), ("buyer_national_id", 11)):
            v = persian.to_ascii_digits(getattr(t, f).strip())
            if v and (not v.isdigit() or len(v) > n):
                bad.append(FieldViolation(f"invoice.tax.{f}", f"must be at most {n} digits"))
        nid = persian.to_ascii_digits(t.buyer_national_id.strip())
        if nid and t.buyer_type == pb.BUYER_TYPE_PERSON and not persian.iran_national_id_ok(nid):
            bad.append(FieldViolation("invoice.tax.buyer_national_id", "is not a valid national code (kod-e melli)"))
        postal = persian.to_ascii_digits(t.buyer_postal_code.strip())
        if postal and not persian.iran_postal_code_ok(postal):
            bad.append(FieldViolation("invoice.tax.buyer_postal_code", "must be ten digits"))
        if t.invoice_type not in (0, 1, 2):
            bad.append(FieldViolation("invoice.tax.invoice_type", "1 (with buyer information) or 2 (without)"))
        if not 0 <= t.invoice_pattern <= 13:
            bad.append(FieldViolation("invoice.tax.invoice_pattern", "must be 1..13 (1 sale, 2 currency sale, ...)"))
        if t.subject not in (0, pb.INVOICE_SUBJECT_ORIGINAL):
            bad.append(FieldViolation("invoice.tax.subject", "an invoice is original; use CreateCreditNote otherwise"))
        if not 0 <= t.settlement_method <= 3:
            bad.append(FieldViolation("invoice.tax.settlement_method", "1 cash, 2 credit or 3 both"))
        given_tax_id = t.tax_id.strip().upper()
        if given_tax_id and (len(given_tax_id) != 22 or not given_tax_id.isalnum()):
            bad.append(FieldViolation("invoice.tax.tax_id", "must be 22 letters and digits"))
        if t.exchange_rate:
            try:
                _decimal(t.exchange_rate, "invoice.tax.exchange_rate", positive=True)
            except InvalidArgument as e:
                bad.extend(e.violations)
        if len(t.buyer_name) > 300:
            bad.append(FieldViolation("invoice.tax.buyer_name", "must be at most 300 characters"))
        if bad:
            raise InvalidArgument(bad)
        with_buyer = t.buyer_type != 0
        return {
            "buyer_type": t.buyer_type,
            "buyer_economic_code": persian.to_ascii_digits(t.buyer_economic_code.strip()),
            "buyer_national_id": nid,
            "buyer_postal_code": postal,
            "buyer_name": t.buyer_name.strip(),
            "invoice_type": t.invoice_type or (1 if with_buyer else 2),
            "invoice_pattern": t.invoice_pattern or 1,
            "subject": pb.INVOICE_SUBJECT_ORIGINAL,
            "settlement_method": t.settlement_method or 2,
            "exchange_rate": t.exchange_rate.strip(),
            "tax_id": given_tax_id,
            "tax_id_given": bool(given_tax_id),
        }

    def create(self, req: pb.CreateInvoiceRequest, principal: Principal) -> pb.Invoice:
        inv = req.invoice
        if len(req.request_id) > 128:
            raise InvalidArgument.field("request_id", "must be at most 128 characters")
        terms = inv.payment_terms_days or 30
        if not 0 <= inv.payment_terms_days <= 3650:
            raise InvalidArgument.field("invoice.payment_terms_days", "must be 0..3650 days (0 means 30)")
        if len(inv.description) > 2000:
            raise InvalidArgument.field("invoice.description", "must be at most 2000 characters")
        tax = self._tax_values(inv.tax)
        if inv.order:
            principal.require("orders.read")
            order_id = ORDER.parse(inv.order, "invoice.order").id
        else:
            order_id = None
            CUSTOMER.parse(inv.customer, "invoice.customer")
            check_currency(inv.currency_code, "invoice.currency_code")
            if not inv.lines:
                raise InvalidArgument.field("invoice.lines", "an invoice without an order needs at least one line")
        try:
            with self.uow.begin() as tx:
                conn = tx.conn
                if req.request_id:
                    found = conn.execute(
                        sa.select(invoices.c.id).where(invoices.c.request_id == req.request_id)
                    ).scalar_one_or_none()
                    if found:
                        first = self._row(conn, found)
                        if first.kind != "invoice":
                            raise InvalidArgument.field("request_id", "was used for another request")
                        return self._full(conn, first)
                if order_id:
                    head, lines = self._order_lines(conn, inv, order_id, principal)
                else:
                    head, lines = self._free_lines(conn, inv, principal)
                if tax["invoice_type"] == 1 and not tax["buyer_type"]:
                    raise InvalidArgument.field("invoice.tax.buyer_type", "an invoice of type 1 names its buyer type")
                foreign = head["currency_code"] not in ("IRR", "IRT")
                if foreign and tax["invoice_pattern"] == 2 and not tax["exchange_rate"]:
                    raise InvalidArgument.field("invoice.tax.exchange_rate", "a currency sale needs the rate")
                if tax["buyer_type"] and not (tax["buyer_national_id"] and tax["buyer_name"]):
                    # the buyer's id and name from the customer projection: the PDF printed
                    # "customers/<uuid>" as the buyer of an invoice made without a buyer_name
                    ref = conn.execute(
                        sa.select(customer_refs.c.national_id, customer_refs.c.display_name).where(
                            customer_refs.c.customer_id == head["customer_id"]
                        )
                    ).one_or_none()
                    tax["buyer_national_id"] = tax["buyer_national_id"] or (ref.national_id if ref else "") or ""
                    tax["buyer_name"] = tax["buyer_name"] or (ref.display_name if ref else "") or ""
                iid = str(uuid.uuid4())
                cur = head["currency_code"]
                subtotal = sum((ln["amount"] for ln in lines), ZERO)
                tax_total = sum((ln["tax_amount"] for ln in lines), ZERO)
                if subtotal + tax_total >= MAX_AMOUNT * 10:
                    raise InvalidArgument.field("invoice.lines", "the invoice's total is too large")
                conn.execute(
                    invoices.insert().values(
                        id=iid,
                        kind="invoice",
                        state="draft",
                        subtotal=subtotal,
                        tax_total=tax_total,
                        total=subtotal + tax_total,
                        request_id=req.request_id or None,
                        **head,
                    )
                )
                s = self.seller
                conn.execute(
                    invoice_details.insert().values(
                        invoice_id=iid,
                        payment_terms_days=terms,
                        description=inv.description.strip(),
                        seller_economic_code=s.economic_code,
                        seller_national_id=s.national_id,
                        seller_name=s.name,
                        **tax,
                    )
                )
                conn.execute(
                    invoice_lines.insert(), [{**ln, "invoice_id": iid, "position": i} for i, ln in enumerate(lines, 1)]
                )
                row = self._row(conn, iid)
                tx.audit(
                    _name(iid),
                    "invoice.create",
                    principal,
                    [
                        audit.change("order", "null", audit.value(head.get("order_id"))),
                        audit.change("customer", "null", audit.value(head["customer_id"])),
                        audit.change("total", "null", audit.value(str(row.total))),
                        audit.change("currency_code", "null", audit.value(cur)),
                    ],
                )
                return self._full(conn, row)
        except sa.exc.IntegrityError:
            if req.request_id:
                with self.uow.read() as conn:
                    found = conn.execute(
                        sa.select(invoices.c.id).where(invoices.c.request_id == req.request_id)
                    ).scalar_one_or_none()
                    if found:
                        return self._full(conn, self._row(conn, found))
            raise

    def _order_lines(self, conn, inv: pb.Invoice, order_id: str, principal: Principal):
        order = conn.execute(
            sa.select(orders)
            .where(orders.c.id == order_id, Scope.of(principal).visible(orders.c.owner_id, orders.c.team_id))
            .with_for_update()
        ).one_or_none()
        if order is None:
            raise ORDER.not_found(inv.order)
        if order.state == "cancelled":
            raise FailedPrecondition(f"order {inv.order} is cancelled", reason="ORDER_CANCELLED")
        if inv.currency_code and inv.currency_code != order.currency_code:
            raise InvalidArgument.field(
                "invoice.currency_code", f"{inv.currency_code} given where the order is in {order.currency_code}"
            )
        if inv.customer and inv.customer != f"customers/{order.customer_id}":
            raise InvalidArgument.field("invoice.customer", "an invoice of an order is for the order's customer")
        taken = (
            sa.select(invoice_lines.c.order_line_id, sa.func.sum(invoice_lines.c.quantity).label("q"))
            .join(invoices, invoices.c.id == invoice_lines.c.invoice_id)
            .where(invoices.c.kind == "invoice", invoices.c.state != "cancelled")
            .group_by(invoice_lines.c.order_line_id)
            .subquery()
        )
        rows = conn.execute(
            sa.select(order_lines, sa.func.coalesce(taken.c.q, 0).label("invoiced"))
            .outerjoin(taken, taken.c.order_line_id == order_lines.c.id)
            .where(order_lines.c.order_id == order_id)
            .order_by(order_lines.c.position)
        ).all()
        by_id = {str(r.id): r for r in rows}
        picks: list[tuple] = []  # (order line, quantity)
        if not inv.lines:
            picks = [(r, r.quantity - r.invoiced) for r in rows if r.quantity > r.invoiced]
            if not picks:
                raise FailedPrecondition(f"order {inv.order} is invoiced in full", reason="ORDER_FULLY_INVOICED")
        else:
            seen = set()
            for i, ln in enumerate(inv.lines):
                f = f"invoice.lines[{i}]"
                ids = ORDER_LINE.parse(ln.order_line, f"{f}.order_line")
                r = by_id.get(ids.line_id)
                if ids.order_id != order_id or r is None:
                    raise InvalidArgument.field(f"{f}.order_line", f"{ln.order_line} is not a line of {inv.order}")
                if ids.line_id in seen:
                    raise InvalidArgument.field(f"{f}.order_line", "names a line twice")
                seen.add(ids.line_id)
                left = r.quantity - r.invoiced
                q = _decimal(ln.quantity, f"{f}.quantity", positive=True, places=6) if ln.quantity else left
                if q > left or q <= 0:
                    raise FailedPrecondition(
                        f"{f}.quantity: {_plain(q)} asked where {_plain(left)} of {_plain(r.quantity)} "
                        "ordered is left to invoice",
                        reason="QUANTITY_EXCEEDS_ORDERED",
                        metadata={"field": f"{f}.quantity", "left": _plain(left)},
                    )
                picks.append((r, q))
        units = self._product_units(conn, [r.product_id for r, _ in picks])
        cur = order.currency_code
        lines = [
            {
                "order_line_id": r.id,
                "product_id": r.product_id,
                "description": r.description,
                "quantity": q,
                "unit": units.get(str(r.product_id), "unit") if r.product_id else "unit",
                "unit_price": r.unit_price,
                "discount_percent": r.discount_percent,
                "tax_rate": r.tax_rate,
                **line_amounts(q, r.unit_price, r.discount_percent, r.tax_rate, cur),
            }
            for r, q in picks
        ]
        head = {
            "order_id": order.id,
            "opportunity_id": order.opportunity_id,
            "customer_id": order.customer_id,
            "owner_id": order.owner_id,
            "team_id": order.team_id,
            "currency_code": cur,
        }
        return head, lines

    @staticmethod
    def _product_units(conn, ids) -> dict[str, str]:
        ids = [str(i) for i in ids if i]
        if not ids:
            return {}
        return {
            str(k): v for k, v in conn.execute(sa.select(products.c.id, products.c.unit).where(products.c.id.in_(ids)))
        }

    def _free_lines(self, conn, inv: pb.Invoice, principal: Principal):
        cur = inv.currency_code
        cid = CUSTOMER.parse(inv.customer, "invoice.customer").id
        owner = owner_of(inv.owner, "invoice.owner") or principal.subject
        team_id = None
        if inv.team:
            team_id = ResourceName("teams/{id}").parse(inv.team, "invoice.team").id
        Scope.of(principal).require_assign(conn, owner, team_id, "invoice.owner")
        product_ids = []
        if any(ln.product for ln in inv.lines):
            principal.require("catalog.read")
        for i, ln in enumerate(inv.lines):
            if ln.product:
                product_ids.append(PRODUCT.parse(ln.product, f"invoice.lines[{i}].product").id)
        known = {}
        if product_ids:
            known = {
                str(r.id): r
                for r in conn.execute(
                    sa.select(products.c.id, products.c.name, products.c.unit, products.c.tax_rate).where(
                        products.c.id.in_(product_ids)
                    )
                )
            }
        lines, bad = [], []
        for i, ln in enumerate(inv.lines):
            f = f"invoice.lines[{i}]"
            try:
                if ln.order_line:
                    raise InvalidArgument.field(f"{f}.order_line", "only an invoice of an order has order lines")
                prod = None
                if ln.product:
                    prod = known.get(PRODUCT.parse(ln.product, f"{f}.product").id)
                    if prod is None:
                        raise InvalidArgument.field(f"{f}.product", f"no such product: {ln.product}")
                desc = ln.description.strip() or (prod.name if prod else "")
                if not desc:
                    raise InvalidArgument.field(f"{f}.description", "is required for a line without a product")
                if len(desc) > 1000:
                    raise InvalidArgument.field(f"{f}.description", "must be at most 1000 characters")
                if not ln.quantity:
                    raise InvalidArgument.field(f"{f}.quantity", "is required")
                q = _decimal(ln.quantity, f"{f}.quantity", positive=True, high=Decimal("1e12"), places=6)
                if not ln.HasField("unit_price"):
                    raise InvalidArgument.field(f"{f}.unit_price", "is required")
                price = to_decimal(ln.unit_price, f"{f}.unit_price", currency=cur)
                if price < 0:
                    raise InvalidArgument.field(f"{f}.unit_price", "must not be negative")
                disc = (
                    _decimal(ln.discount_percent, f"{f}.discount_percent", low=ZERO, high=HUNDRED, places=4)
                    if ln.discount_percent
                    else ZERO
                )
                if ln.tax_rate:
                    rate = _decimal(ln.tax_rate, f"{f}.tax_rate", low=ZERO, high=HUNDRED, places=4)
                else:
                    rate = prod.tax_rate if prod else ZERO
                code = ln.tax_product_code.strip()
                if code and (not code.isdigit() or len(code) != 13):
                    raise InvalidArgument.field(f"{f}.tax_product_code", "the tax system's product id is 13 digits")
                if q * price >= MAX_AMOUNT:
                    raise InvalidArgument.field(f"{f}.quantity", "quantity x unit price is too large for one line")
                amounts = line_amounts(q, price, disc, rate, cur)
                lines.append(
                    {
                        "product_id": prod.id if prod else None,
                        "description": desc,
                        "quantity": q,
                        "unit": ln.unit.strip() or (prod.unit if prod else "unit"),
                        "unit_price": price,
                        "discount_percent": disc,
                        "tax_rate": rate,
                        "tax_product_code": code,
                        **amounts,
                    }
                )
            except InvalidArgument as e:
                bad.extend(e.violations)
        if bad:
            raise InvalidArgument(bad)
        head = {"customer_id": cid, "owner_id": owner, "team_id": team_id, "currency_code": cur}
        return head, lines

    # -- update ----------------------------------------------------------------------------
    def update(self, req: pb.UpdateInvoiceRequest, principal: Principal) -> pb.Invoice:
        inv = req.invoice
        iid = INVOICE.parse(inv.name, "invoice.name").id
        paths = MASK.paths(req.update_mask)
        if paths == MASK.updatable:  # "*"
            paths = ["payment_terms_days", "description", "tax"]
        if "payment_terms_days" in paths and not 0 <= inv.payment_terms_days <= 3650:
            raise InvalidArgument.field("invoice.payment_terms_days", "must be 0..3650 days (0 means 30)")
        if "description" in paths and len(inv.description) > 2000:
            raise InvalidArgument.field("invoice.description", "must be at most 2000 characters")
        with self.uow.begin() as tx:
            conn = tx.conn
            row = self._locked(conn, iid, principal, inv.name)
            check_etag(inv.etag, row.version, inv.name)
            if row.state != "draft":
                raise FailedPrecondition(
                    f"{inv.name} is {row.state}: only a draft is updated (an issued invoice is corrected by a "
                    "credit note)",
                    reason="INVOICE_NOT_DRAFT",
                )
            merged = invoice_to_proto(row).tax
            merged.subject = 0
            if "tax" in paths:
                merged.CopyFrom(inv.tax)
            for f in TAX_FIELDS:
                if f"tax.{f}" in paths:
                    setattr(merged, f, getattr(inv.tax, f))
            new = {}
            if any(p == "tax" or p.startswith("tax.") for p in paths):
                tax = self._tax_values(merged)
                if tax["invoice_type"] == 1 and not tax["buyer_type"]:
                    raise InvalidArgument.field("invoice.tax.buyer_type", "an invoice of type 1 names its buyer type")
                new.update({k: v for k, v in tax.items() if k != "subject"})
            if "payment_terms_days" in paths:
                new["payment_terms_days"] = inv.payment_terms_days or 30
            if "description" in paths:
                new["description"] = inv.description.strip()
            changed = {k: v for k, v in new.items() if getattr(row, k) != v}
            if changed:
                conn.execute(invoice_details.update().where(invoice_details.c.invoice_id == iid).values(**changed))
                conn.execute(
                    invoices.update()
                    .where(invoices.c.id == iid)
                    .values(version=invoices.c.version + 1, update_time=sa.func.now())
                )
                tx.audit(
                    _name(iid),
                    "invoice.update",
                    principal,
                    [audit.change(k, audit.value(getattr(row, k)), audit.value(v)) for k, v in changed.items()],
                )
            return self._full(conn, self._row(conn, iid))

    # -- numbering -------------------------------------------------------------------------
    @staticmethod
    def take_number(conn, fiscal_year: int, kind: str, issue_date: dt.date | None = None) -> int:
        """The next number of (fiscal_year, kind), its counter row locked until this
        transaction ends (a rollback gives the number back: no gap)."""
        conn.execute(
            sa.dialects.postgresql.insert(invoice_counters)
            .values(fiscal_year=fiscal_year, kind=kind, last_sequence=0)
            .on_conflict_do_nothing()
        )
        counter = conn.execute(
            sa.select(invoice_counters)
            .where(invoice_counters.c.fiscal_year == fiscal_year, invoice_counters.c.kind == kind)
            .with_for_update()
        ).one()
        if issue_date is not None and counter.last_issue_date and issue_date < counter.last_issue_date:
            raise FailedPrecondition(
                f"issue_date {issue_date} is before {counter.last_issue_date}, the last issue date numbered in "
                f"{fiscal_year} (numbers follow issue dates)",
                reason="ISSUE_DATE_BEFORE_LAST",
                metadata={"field": "issue_date", "last_issue_date": counter.last_issue_date.isoformat()},
            )
        seq = counter.last_sequence + 1
        values = {"last_sequence": seq}
        if issue_date is not None:
            values["last_issue_date"] = issue_date
        conn.execute(
            invoice_counters.update()
            .where(invoice_counters.c.fiscal_year == fiscal_year, invoice_counters.c.kind == kind)
            .values(**values)
        )
        return seq

    def _numbering(self, conn, kind: str, issue_date: dt.date, given_tax_id: str) -> dict:
        fy = persian.to_jalali(issue_date).year
        seq = self.take_number(conn, fy, kind, issue_date)
        serial = self.take_number(conn, 0, "tax_serial")
        now = conn.execute(sa.select(sa.func.now())).scalar_one()
        number = f"{fy}-{seq:06d}" if kind == "invoice" else f"CN-{fy}-{seq:06d}"
        tid = given_tax_id
        if not tid and self.seller.memory_id:
            # the tax id's day is the issue date's (its midnight in Tehran), not the clock's
            issued = dt.datetime.combine(issue_date, dt.time(12), tzinfo=dates.TEHRAN)
            tid = tax_id(self.seller.memory_id, issued, serial)
        return {"fiscal_year": fy, "sequence": seq, "number": number, "serial": serial, "tax_id": tid, "now": now}

    # -- issue -----------------------------------------------------------------------------
    def issue(self, req: pb.IssueInvoiceRequest, principal: Principal) -> pb.Invoice:
        iid = INVOICE.parse(req.name).id
        day = _from_date(req.issue_date, "issue_date")
        today = today_tehran()
        if day is not None and day > today:
            raise InvalidArgument.field("issue_date", f"{day} is in the future (today is {today} in Tehran)")
        day = day or today
        with self.uow.begin() as tx:
            conn = tx.conn
            row = self._locked(conn, iid, principal, req.name)
            check_etag(req.etag, row.version, req.name)
            if row.kind != "invoice" or row.state != "draft":
                raise FailedPrecondition(
                    f"{req.name} is {row.state}: only a draft invoice is issued", reason="INVOICE_NOT_DRAFT"
                )
            n = self._numbering(conn, "invoice", day, row.tax_id)
            due = day + dt.timedelta(days=row.payment_terms_days)
            conn.execute(
                invoices.update()
                .where(invoices.c.id == iid)
                .values(
                    state="issued",
                    fiscal_year=n["fiscal_year"],
                    sequence=n["sequence"],
                    number=n["number"],
                    issue_date=day,
                    due_date=due,
                    version=invoices.c.version + 1,
                    update_time=sa.func.now(),
                )
            )
            conn.execute(
                invoice_details.update()
                .where(invoice_details.c.invoice_id == iid)
                .values(issue_time=n["now"], tax_serial=n["serial"], tax_id=n["tax_id"])
            )
            timers.schedule(conn, OVERDUE, iid, end_of_day(due))
            row = self._row(conn, iid)
            lines = self._lines(conn, [iid])
            tx.publish("invoice.issued.v1", self.event(conn, row, lines), _name(iid))
            tx.audit(
                _name(iid),
                "invoice.issue",
                principal,
                [
                    audit.change("state", audit.value("draft"), audit.value("issued")),
                    audit.change("number", "null", audit.value(row.number)),
                    audit.change("due_date", "null", audit.value(due)),
                ],
            )
            return invoice_to_proto(row, lines)

    def cancel(self, req: pb.CancelInvoiceRequest, principal: Principal) -> pb.Invoice:
        iid = INVOICE.parse(req.name).id
        with self.uow.begin() as tx:
            row = self._locked(tx.conn, iid, principal, req.name)
            check_etag(req.etag, row.version, req.name)
            if row.state != "draft":
                raise FailedPrecondition(
                    f"{req.name} is {row.state}: only a draft is cancelled; reverse an issued invoice with a "
                    "credit note (CreateCreditNote)",
                    reason="INVOICE_NOT_DRAFT",
                )
            tx.execute(
                invoices.update()
                .where(invoices.c.id == iid)
                .values(state="cancelled", version=invoices.c.version + 1, update_time=sa.func.now())
            )
            tx.audit(_name(iid), "invoice.cancel", principal, [audit.change("state", '"draft"', '"cancelled"')])
            return self._full(tx.conn, self._row(tx.conn, iid))

    # -- events ----------------------------------------------------------------------------
    def event(self, conn, row, lines) -> sales_events_pb2.InvoiceEvent:
        cur = row.currency_code
        source = campaign = ""
        if row.opportunity_id:
            opp = conn.execute(
                sa.select(opportunities.c.source, opportunities.c.campaign_id).where(
                    opportunities.c.id == row.opportunity_id
                )
            ).one_or_none()
            if opp is not None:
                source, campaign = opp.source, opp.campaign_id
        plines = {}
        pids = [str(ln.product_id) for ln in lines if ln.product_id]
        if pids:
            plines = {
                str(k): v
                for k, v in conn.execute(
                    sa.select(products.c.id, products.c.product_line_id).where(products.c.id.in_(pids))
                )
            }
        e = sales_events_pb2.InvoiceEvent(
            invoice=_name(row.id),
            number=row.number,
            kind=row.kind,
            order=_ref("orders", row.order_id),
            opportunity=_ref("opportunities", row.opportunity_id),
            customer=_ref("customers", row.customer_id),
            owner=row.owner_id,
            team=_ref("teams", row.team_id),
            total=to_money(row.total, cur),
            tax_total=to_money(row.tax_total, cur),
            paid_total=to_money(row.paid_total, cur),
            state=row.state,
            credited_invoice=_ref("invoices", row.credited_invoice_id),
            lines=[
                sales_events_pb2.LineFact(
                    product=_ref("products", ln.product_id),
                    product_line=_ref("productLines", plines.get(str(ln.product_id))),
                    quantity=_plain(ln.quantity),
                    amount=to_money(ln.amount, cur),
                )
                for ln in lines
            ],
            source=source,
            campaign_id=campaign,
        )
        if row.issue_date:
            e.issue_date.CopyFrom(_date(row.issue_date))
        if row.due_date:
            e.due_date.CopyFrom(_date(row.due_date))
        e.event_time.FromDatetime(row.update_time)
        return e

    # -- overdue ---------------------------------------------------------------------------
    def on_overdue(self, conn, timer) -> None:
        """The overdue timer fired (end of the due date in Tehran): an invoice still owing
        turns overdue, once."""
        row = conn.execute(SELECT.where(invoices.c.id == timer.key).with_for_update(of=invoices)).one_or_none()
        if row is None or row.state not in ("issued", "partially_paid") or outstanding(row) <= 0:
            return
        conn.execute(
            invoices.update()
            .where(invoices.c.id == row.id)
            .values(state="overdue", version=invoices.c.version + 1, update_time=sa.func.now())
        )
        row = self._row(conn, row.id)
        with self.uow.joined(conn) as tx:
            tx.publish("invoice.overdue.v1", self.event(conn, row, self._lines(conn, [row.id])), _name(row.id))
            tx.audit(_name(row.id), "invoice.overdue", SYSTEM, [audit.change("state", "null", '"overdue"')], "")

    # -- payments --------------------------------------------------------------------------
    def record_payment(self, req: pb.RecordPaymentRequest, principal: Principal) -> pb.Payment:
        iid = INVOICE.parse(req.parent, "parent").id
        p = req.payment
        if len(req.request_id) > 128:
            raise InvalidArgument.field("request_id", "must be at most 128 characters")
        if not req.HasField("payment") or not p.HasField("amount"):
            raise InvalidArgument.field("payment.amount", "is required")
        if p.method not in PAYMENT_METHODS:
            raise InvalidArgument.field("payment.method", f"must be one of {', '.join(PAYMENT_METHODS)}")
        if len(p.reference) > 200:
            raise InvalidArgument.field("payment.reference", "must be at most 200 characters")
        pay_time = None
        if p.HasField("pay_time"):
            pay_time = p.pay_time.ToDatetime(dt.UTC)
            if pay_time > dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5):
                raise InvalidArgument.field("payment.pay_time", "is in the future")
            if pay_time.year < EARLIEST_PAYMENT_YEAR:  # 0001-01-01 was taken (a zero time sent as a date)
                raise InvalidArgument.field("payment.pay_time", f"must be in {EARLIEST_PAYMENT_YEAR} or later")
        with self.uow.begin() as tx:
            conn = tx.conn
            if req.request_id:
                found = conn.execute(
                    sa.select(invoice_payments).where(invoice_payments.c.request_id == req.request_id)
                ).one_or_none()
                if found is not None:
                    if found.invoice_id != iid:
                        raise InvalidArgument.field("request_id", "was used for a payment of another invoice")
                    return payment_to_proto(found)
            row = self._locked(conn, iid, principal, req.parent)
            amount = to_decimal(p.amount, "payment.amount", currency=row.currency_code)
            if amount <= 0:
                raise InvalidArgument.field("payment.amount", "must be more than zero")
            if round_minor(amount, row.currency_code) != amount:
                raise InvalidArgument.field("payment.amount", f"has more decimals than {row.currency_code} has")
            if row.kind != "invoice" or row.state not in PAYABLE:
                raise FailedPrecondition(
                    f"{req.parent} is a {row.kind.replace('_', ' ')} in state {row.state}: payments are recorded "
                    "against issued, partially paid or overdue invoices",
                    reason="INVOICE_NOT_PAYABLE",
                )
            owed = outstanding(row)
            if amount > owed:
                raise FailedPrecondition(
                    f"payment.amount {amount} is more than the {owed} {row.currency_code} outstanding",
                    reason="PAYMENT_EXCEEDS_OUTSTANDING",
                    metadata={"field": "payment.amount", "outstanding": str(owed)},
                )
            old_paid, old_state = row.paid_total, row.state
            paid = row.paid_total + amount
            settled = amount == owed
            state = "paid" if settled else ("overdue" if row.state == "overdue" else "partially_paid")
            pay = conn.execute(
                invoice_payments.insert()
                .values(
                    invoice_id=iid,
                    amount=amount,
                    currency_code=row.currency_code,
                    method=p.method,
                    pay_time=pay_time or sa.func.now(),
                    reference=p.reference.strip(),
                    recorded_by=principal.subject,
                    request_id=req.request_id or None,
                )
                .returning(invoice_payments)
            ).one()
            conn.execute(
                invoices.update()
                .where(invoices.c.id == iid)
                .values(paid_total=paid, state=state, version=invoices.c.version + 1, update_time=sa.func.now())
            )
            pname = PAYMENT.format(iid, pay.id)
            ev = sales_events_pb2.PaymentEvent(
                payment=pname,
                invoice=_name(iid),
                customer=_ref("customers", row.customer_id),
                amount=to_money(amount, row.currency_code),
                method=p.method,
            )
            ev.pay_time.FromDatetime(pay.pay_time)
            ev.event_time.FromDatetime(pay.create_time)
            tx.publish("payment.received.v1", ev, pname)
            if settled:
                timers.cancel(conn, OVERDUE, iid)
                row = self._row(conn, iid)
                tx.publish("invoice.paid.v1", self.event(conn, row, self._lines(conn, [iid])), _name(iid))
            tx.audit(
                _name(iid),
                "invoice.payment",
                principal,
                [
                    audit.change("paid_total", audit.value(str(old_paid)), audit.value(str(paid))),
                    audit.change("state", audit.value(old_state), audit.value(state)),
                    audit.change("payment", "null", audit.value(pname)),
                ],
            )
            return payment_to_proto(pay)

    # -- credit notes ----------------------------------------------------------------------
    def credit(self, req: pb.CreateCreditNoteRequest, principal: Principal) -> pb.Invoice:
        iid = INVOICE.parse(req.name).id
        subject = req.subject or pb.INVOICE_SUBJECT_RETURN
        if subject not in (pb.INVOICE_SUBJECT_RETURN, pb.INVOICE_SUBJECT_CORRECTION):
            raise InvalidArgument.field("subject", "a credit note is a return or a correction")
        if len(req.reason) > 2000:
            raise InvalidArgument.field("reason", "must be at most 2000 characters")
        if len(req.request_id) > 128:
            raise InvalidArgument.field("request_id", "must be at most 128 characters")
        with self.uow.begin() as tx:
            conn = tx.conn
            if req.request_id:
                found = conn.execute(
                    sa.select(invoices.c.id).where(invoices.c.request_id == req.request_id)
                ).scalar_one_or_none()
                if found:
                    note = self._row(conn, found)
                    if note.credited_invoice_id != iid:
                        raise InvalidArgument.field("request_id", "was used for another request")
                    return self._full(conn, note)
            row = self._locked(conn, iid, principal, req.name)
            if row.kind != "invoice" or row.state not in CREDITABLE:
                raise FailedPrecondition(
                    f"{req.name} is a {row.kind.replace('_', ' ')} in state {row.state}: only an issued invoice is "
                    "credited",
                    reason="INVOICE_NOT_ISSUED",
                )
            cur = row.currency_code
            lines = {ln.position: ln for ln in self._lines(conn, [iid])}
            picks = self._credit_picks(req, lines, cur)
            day = max(today_tehran(), row.issue_date)
            n = self._numbering(conn, "credit_note", day, "")
            cid = str(uuid.uuid4())
            new_lines = []
            for ln, q, net, tax_amt in picks:
                if q:  # by quantity: the line's price and discount, the net as computed
                    gross = round_minor(q * ln.unit_price, cur)
                    new = {
                        "quantity": q,
                        "unit_price": ln.unit_price,
                        "discount_percent": ln.discount_percent,
                        "gross_amount": gross,
                        "discount_amount": gross - net,
                    }
                else:  # by amount: one unit of the reduction
                    new = {
                        "quantity": Decimal(1),
                        "unit_price": net,
                        "discount_percent": ZERO,
                        "gross_amount": net,
                        "discount_amount": ZERO,
                    }
                new_lines.append(
                    {
                        **new,
                        "product_id": ln.product_id,
                        "description": ln.description,
                        "unit": ln.unit,
                        "tax_rate": ln.tax_rate,
                        "amount": net,
                        "tax_amount": tax_amt,
                        "tax_product_code": ln.tax_product_code,
                        "credited_line_id": ln.id,
                        "order_line_id": ln.order_line_id,
                    }
                )
                conn.execute(
                    invoice_lines.update()
                    .where(invoice_lines.c.id == ln.id)
                    .values(
                        credited_quantity=invoice_lines.c.credited_quantity + q,
                        credited_amount=invoice_lines.c.credited_amount + net,
                        credited_tax=invoice_lines.c.credited_tax + tax_amt,
                    )
                )
            subtotal = sum((x["amount"] for x in new_lines), ZERO)
            tax_total = sum((x["tax_amount"] for x in new_lines), ZERO)
            total = subtotal + tax_total
            conn.execute(
                invoices.insert().values(
                    id=cid,
                    kind="credit_note",
                    state="issued",
                    order_id=row.order_id,
                    opportunity_id=row.opportunity_id,
                    credited_invoice_id=iid,
                    customer_id=row.customer_id,
                    owner_id=row.owner_id,
                    team_id=row.team_id,
                    currency_code=cur,
                    fiscal_year=n["fiscal_year"],
                    sequence=n["sequence"],
                    number=n["number"],
                    issue_date=day,
                    subtotal=subtotal,
                    tax_total=tax_total,
                    total=total,
                    request_id=req.request_id or None,
                )
            )
            conn.execute(
                invoice_details.insert().values(
                    invoice_id=cid,
                    payment_terms_days=0,
                    description=req.reason.strip(),
                    issue_time=n["now"],
                    seller_economic_code=row.seller_economic_code,
                    seller_national_id=row.seller_national_id,
                    seller_name=row.seller_name,
                    buyer_type=row.buyer_type,
                    buyer_economic_code=row.buyer_economic_code,
                    buyer_national_id=row.buyer_national_id,
                    buyer_postal_code=row.buyer_postal_code,
                    buyer_name=row.buyer_name,
                    tax_id=n["tax_id"],
                    tax_serial=n["serial"],
                    invoice_type=row.invoice_type,
                    invoice_pattern=row.invoice_pattern,
                    subject=subject,
                    reference_tax_id=row.tax_id,
                    exchange_rate=row.exchange_rate,
                    settlement_method=row.settlement_method,
                )
            )
            # the credit note's lines (the order line is not kept: credited quantities are not
            # taken off what the order has invoiced)
            conn.execute(
                invoice_lines.insert(),
                [
                    {**{k: v for k, v in x.items() if k != "order_line_id"}, "invoice_id": cid, "position": i}
                    for i, x in enumerate(new_lines, 1)
                ],
            )
            credited = row.credited_total + total
            conn.execute(
                invoice_details.update().where(invoice_details.c.invoice_id == iid).values(credited_total=credited)
            )
            settles = row.state in PAYABLE and row.total - row.paid_total - credited <= 0
            values = {"version": invoices.c.version + 1, "update_time": sa.func.now()}
            if settles:
                values["state"] = "paid"
                timers.cancel(conn, OVERDUE, iid)
            conn.execute(invoices.update().where(invoices.c.id == iid).values(**values))
            note = self._row(conn, cid)
            note_lines = self._lines(conn, [cid])
            tx.publish("invoice.credited.v1", self.event(conn, note, note_lines), _name(cid))
            tx.audit(
                _name(cid),
                "invoice.credit_note",
                principal,
                [
                    audit.change("credited_invoice", "null", audit.value(_name(iid))),
                    audit.change("total", "null", audit.value(str(total))),
                ],
            )
            tx.audit(
                _name(iid),
                "invoice.credited",
                principal,
                [
                    audit.change("credited_total", audit.value(str(row.credited_total)), audit.value(str(credited))),
                    *([audit.change("state", audit.value(row.state), '"paid"')] if settles else []),
                ],
            )
            return self._full(conn, note)

    @staticmethod
    def _credit_picks(req: pb.CreateCreditNoteRequest, lines: dict, cur: str) -> list[tuple]:
        """(invoice line, quantity credited, net credited, tax credited) for each line credited,
        within what is left of each line."""

        def left(ln):
            return ln.quantity - ln.credited_quantity, ln.amount - ln.credited_amount, ln.tax_amount - ln.credited_tax

        picks = []
        if not req.lines:
            for ln in lines.values():
                q, net, tax = left(ln)
                if net > 0 or tax > 0:
                    picks.append((ln, q, net, tax))
            if not picks:
                raise FailedPrecondition(f"{req.name} is credited in full already", reason="INVOICE_FULLY_CREDITED")
            return picks
        seen = set()
        for i, cl in enumerate(req.lines):
            f = f"lines[{i}]"
            ln = lines.get(cl.position)
            if ln is None:
                raise InvalidArgument.field(f"{f}.position", f"the invoice has no line {cl.position}")
            if cl.position in seen:
                raise InvalidArgument.field(f"{f}.position", "names a line twice")
            seen.add(cl.position)
            q_left, net_left, tax_left = left(ln)
            if cl.quantity and cl.HasField("amount"):
                raise InvalidArgument.field(f"{f}.amount", "give a quantity or an amount, not both")
            if cl.HasField("amount"):
                net = to_decimal(cl.amount, f"{f}.amount", currency=cur)
                if net <= 0 or round_minor(net, cur) != net:
                    raise InvalidArgument.field(f"{f}.amount", f"must be more than zero, in whole {cur} minor units")
                q = ZERO
            elif cl.quantity:
                q = _decimal(cl.quantity, f"{f}.quantity", positive=True, places=6)
                if q > q_left:
                    raise FailedPrecondition(
                        f"{f}.quantity: {_plain(q)} asked where {_plain(q_left)} of {_plain(ln.quantity)} invoiced "
                        "is left to credit",
                        reason="CREDIT_EXCEEDS_INVOICED",
                        metadata={"field": f"{f}.quantity", "left": _plain(q_left)},
                    )
                net = (
                    net_left
                    if q == q_left
                    else line_amounts(q, ln.unit_price, ln.discount_percent, ZERO, cur)["amount"]
                )
            else:
                q, net = q_left, net_left
            if net > net_left or (net == 0 and tax_left <= 0):
                raise FailedPrecondition(
                    f"{f}: {net} {cur} asked where {net_left} {cur} of line {ln.position} is left to credit",
                    reason="CREDIT_EXCEEDS_INVOICED",
                    metadata={"field": f, "left": str(net_left)},
                )
            # the last credit of a line takes exactly the VAT left, so a full credit is exact
            tax = tax_left if net == net_left else min(tax_left, round_minor(net * ln.tax_rate / HUNDRED, cur))
            picks.append((ln, q, net, tax))
        return picks

    # -- export ----------------------------------------------------------------------------
    def export_tax(self, req: pb.ExportTaxInvoicesRequest, principal: Principal):
        return invoice_export.export(self, req, principal)


# -- the gRPC servicer ---------------------------------------------------------------------------


class InvoiceServicer(invoices_pb2_grpc.InvoiceServiceServicer):
    def __init__(self, uc: Invoices):
        self.uc = uc

    def CreateInvoice(self, request, context):
        return self.uc.create(request, current_principal())

    def GetInvoice(self, request, context):
        return self.uc.get(request.name, current_principal())

    def ListInvoices(self, request, context):
        return self.uc.list(request, current_principal())

    def UpdateInvoice(self, request, context):
        return self.uc.update(request, current_principal())

    def IssueInvoice(self, request, context):
        return self.uc.issue(request, current_principal())

    def CancelInvoice(self, request, context):
        return self.uc.cancel(request, current_principal())

    def RecordPayment(self, request, context):
        return self.uc.record_payment(request, current_principal())

    def ListPayments(self, request, context):
        return self.uc.list_payments(request, current_principal())

    def CreateCreditNote(self, request, context):
        return self.uc.credit(request, current_principal())

    def RenderInvoicePdf(self, request, context):
        inv = self.uc.get(request.name, current_principal())
        credited_number = ""
        if inv.credited_invoice:  # the credit note names the invoice it reverses by its number
            with self.uc.uow.read() as conn:
                credited_number = (
                    conn.execute(
                        sa.select(invoices.c.number).where(
                            invoices.c.id == inv.credited_invoice.removeprefix("invoices/")
                        )
                    ).scalar_one_or_none()
                    or ""
                )
        yield from invoice_pdf.render(inv, credited_number=credited_number)

    def ExportTaxInvoices(self, request, context):
        yield from self.uc.export_tax(request, current_principal())


def use_cases(sales: Sales) -> Invoices:
    return sales.once("invoices", lambda: Invoices(sales))


def registration(sales: Sales) -> Registration:
    return Registration.of(InvoiceServicer(use_cases(sales)))


def timer_handlers(sales: Sales) -> None:
    uc = use_cases(sales)
    sales.timers.register(OVERDUE, uc.on_overdue)
