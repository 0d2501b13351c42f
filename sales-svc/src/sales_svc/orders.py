"""OrderService (proto/crm/sales/v1/orders.proto): orders and their deliveries.

Also what quotes and orders share: line pricing (exact Decimal arithmetic, each amount rounded
to the currency's minor unit), the yearly numbering (Q-1405-00012, O-1405-000012) and
`place_order`, which AcceptQuote calls in its own transaction.

Line arithmetic, per line: gross = quantity × unit price; discount = gross × discount % ;
net = gross − discount; VAT = net × tax rate %; each rounded half-even to the minor unit
(rials and tomans whole, cents for USD) before it is added up. The document's subtotal,
discount total and tax total are the sums of the lines' rounded amounts, and total =
subtotal − discount total + tax total, so the printed lines always add up to the printed total.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from crm.sales.v1 import orders_pb2 as pb
from crm.sales.v1 import orders_pb2_grpc, sales_events_pb2
from crm_chassis import audit, dates, money, persian
from crm_chassis.auth import Principal
from crm_chassis.errors import AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument
from crm_chassis.filtering import (
    FieldType,
    FilterField,
    FilterSchema,
    column_condition,
    keyset_page,
    parse_order_by,
    query_fingerprint,
    with_tiebreaker,
)
from crm_chassis.grpc_server import Registration
from crm_chassis.interceptors import current_principal
from crm_chassis.pagination import PageTokens, page_size
from crm_chassis.resources import ResourceName, check_etag, etag

from .access import Scope, owner_of
from .runtime import Sales
from .tables import QUANTITY, UUID, metadata, opportunities, order_lines, orders, products, teams

ORDER = ResourceName("orders/{id}")
ORDER_LINE = ResourceName("orders/{order_id}/lines/{line_id}")
CUSTOMER = ResourceName("customers/{id}", id=r"[A-Za-z0-9_-]{1,64}")
OPPORTUNITY = ResourceName("opportunities/{id}")
PRODUCT = ResourceName("products/{id}")
TEAM = ResourceName("teams/{id}")
HUNDRED = Decimal(100)
MAX_LINES = 500
MAX_LINE_AMOUNT = Decimal("1e16")  # 500 such lines still fit NUMERIC(28, 9)

# Yearly counters of the numbers quotes and orders carry (one row per kind and Jalali year;
# the row lock makes the numbers of one year gapless and unique under concurrent creates).
sales_numbers = sa.Table(
    "sales_numbers",
    metadata,
    sa.Column("kind", sa.Text, primary_key=True),  # quote | order
    sa.Column("year", sa.Integer, primary_key=True),  # Jalali year
    sa.Column("last_value", sa.Integer, nullable=False),
)

# Every delivery recorded, line by line (the lines keep the running total).
order_deliveries = sa.Table(
    "order_deliveries",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("order_id", UUID, sa.ForeignKey("orders.id", ondelete="CASCADE"), nullable=False),
    sa.Column("line_id", UUID, sa.ForeignKey("order_lines.id", ondelete="CASCADE"), nullable=False),
    sa.Column("quantity", QUANTITY, nullable=False),
    sa.Column("delivery_date", sa.Date, nullable=False),
    sa.Column("actor", sa.Text, nullable=False, server_default=""),
    sa.Column("record_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)
sa.Index("order_deliveries_order", order_deliveries.c.order_id, order_deliveries.c.id)

# Indexes on the core orders table for this part's lists (created by migration 0008).
sa.Index("orders_quote", orders.c.quote_id, unique=True, postgresql_where=orders.c.quote_id.is_not(None))
sa.Index("orders_owner_page", orders.c.owner_id, orders.c.create_time.desc(), orders.c.id.desc())
sa.Index("orders_team_page", orders.c.team_id, orders.c.create_time.desc(), orders.c.id.desc())
sa.Index("orders_date", orders.c.order_date.desc(), orders.c.id.desc())
sa.Index("orders_opportunity", orders.c.opportunity_id)
sa.Index(
    "order_lines_delivered_late",
    order_lines.c.planned_delivery_date,
    postgresql_where=order_lines.c.actual_delivery_date > order_lines.c.planned_delivery_date,
)

STATES = {
    "open": pb.ORDER_STATE_OPEN,
    "partially_delivered": pb.ORDER_STATE_PARTIALLY_DELIVERED,
    "delivered": pb.ORDER_STATE_DELIVERED,
    "cancelled": pb.ORDER_STATE_CANCELLED,
}


def request_id_taken(request_id: str) -> AlreadyExists:
    """A request_id another caller's record was made with (its record is not shown)."""
    return AlreadyExists(
        "request_id was used for a record you cannot see; use a new one",
        reason="REQUEST_ID_TAKEN",
        metadata={"field": "request_id", "request_id": request_id},
    )


today = dates.today


def enum_values(states: dict, prefix: str) -> dict[str, str]:
    """Filter values of a state: OPEN, ORDER_STATE_OPEN and open all name "open"."""
    out = {}
    for stored in states:
        out[stored.upper()] = stored
        out[f"{prefix}{stored.upper()}"] = stored
        out[stored] = stored
    return out


def ref(column, collection: str):
    """A filter on an id column written as the resource name (`customer = "customers/42"`) or the
    bare id."""

    def condition(op: str, value):
        text = "" if value is None else str(value)
        return column_condition(column, op, text.removeprefix(f"{collection}/") if value is not None else None)

    return condition


# -- dates, decimals, money ----------------------------------------------------------------------


to_date = dates.from_proto  # (d, field): INVALID_ARGUMENT naming the field


date_msg = dates.to_proto


def decimal_text(value: Decimal | None) -> str:
    """A stored decimal as the shortest exact text ("2.5", "3")."""
    if value is None:
        return ""
    text = format(value.normalize(), "f")
    return text


def parse_decimal(text: str, field: str, *, places: int, low: Decimal, high: Decimal | None, default=None):
    text = (text or "").strip()
    if not text:
        if default is not None:
            return default
        raise InvalidArgument.field(field, "required: a decimal number such as 2 or 2.5")
    try:
        value = Decimal(persian.to_ascii_digits(text))
    except InvalidOperation:
        raise InvalidArgument.field(field, f"{text!r} is not a decimal number") from None
    if not value.is_finite():
        raise InvalidArgument.field(field, f"{text!r} is not a decimal number")
    if value.as_tuple().exponent < -places:
        raise InvalidArgument.field(field, f"at most {places} decimal places")
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f"at least {low}"
        raise InvalidArgument.field(field, f"must be {bound}" if low else f"must be {bound}")
    return value


# -- lines -----------------------------------------------------------------------------------------


@dataclass
class Line:
    """One priced line of a quote or an order."""

    position: int
    product_id: str | None
    description: str
    quantity: Decimal
    unit_price: Decimal
    discount_percent: Decimal
    tax_rate: Decimal | None  # None: the product's
    planned_delivery_date: dt.date | None = None
    gross: Decimal = Decimal(0)
    discount: Decimal = Decimal(0)
    net: Decimal = Decimal(0)
    tax: Decimal = Decimal(0)

    def price(self, currency: str) -> Line:
        r = money.round_minor
        self.gross = r(self.quantity * self.unit_price, currency)
        self.discount = r(self.gross * self.discount_percent / HUNDRED, currency)
        self.net = self.gross - self.discount
        self.tax = r(self.net * (self.tax_rate or Decimal(0)) / HUNDRED, currency)
        return self

    @property
    def total(self) -> Decimal:
        return self.net + self.tax


@dataclass
class Totals:
    subtotal: Decimal
    discount_total: Decimal
    tax_total: Decimal
    total: Decimal

    @classmethod
    def of(cls, lines: list[Line]) -> Totals:
        sub = sum((x.gross for x in lines), Decimal(0))
        disc = sum((x.discount for x in lines), Decimal(0))
        tax = sum((x.tax for x in lines), Decimal(0))
        return cls(sub, disc, tax, sub - disc + tax)


def read_lines(conn: sa.Connection, messages, currency: str, prefix: str) -> list[Line]:
    """Validated, priced lines from QuoteLine or OrderLine messages: every bad value reported at
    once, each naming its field (quote.lines[1].quantity); prices must be in `currency`; a line
    without a tax rate or description takes its product's."""
    if len(messages) > MAX_LINES:
        raise InvalidArgument.field(prefix, f"at most {MAX_LINES} lines")
    bad: list[FieldViolation] = []
    out: list[Line] = []
    for i, m in enumerate(messages):
        try:
            out.append(_read_line(m, i, f"{prefix}[{i}]", currency))
        except InvalidArgument as e:
            bad += e.violations
    if bad:
        raise InvalidArgument(bad)
    wanted = {x.product_id for x in out if x.product_id}
    if wanted:
        found = {
            str(r.id): r
            for r in conn.execute(
                sa.select(products.c.id, products.c.name, products.c.tax_rate, products.c.active).where(
                    products.c.id.in_(wanted)
                )
            )
        }
        for x in out:
            if not x.product_id:
                continue
            p = found.get(x.product_id)
            if p is None:
                bad.append(
                    FieldViolation(f"{prefix}[{x.position}].product", f"no such product: products/{x.product_id}")
                )
                continue
            if x.tax_rate is None:
                x.tax_rate = Decimal(p.tax_rate)
            if not x.description:
                x.description = p.name
        if bad:
            raise InvalidArgument(bad)
    for x in out:
        if abs(x.quantity * x.unit_price) >= MAX_LINE_AMOUNT:
            bad.append(FieldViolation(f"{prefix}[{x.position}].unit_price", "quantity × unit price is too large"))
        if not x.product_id and not x.description:
            bad.append(FieldViolation(f"{prefix}[{x.position}].description", "a line without a product needs one"))
        if x.tax_rate is None:
            x.tax_rate = Decimal(0)
    if bad:
        raise InvalidArgument(bad)
    return [x.price(currency) for x in out]


def _read_line(m, i: int, where: str, currency: str) -> Line:
    """One line message's values, every bad one reported (InvalidArgument naming each field)."""
    bad: list[FieldViolation] = []

    def take(fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except InvalidArgument as e:
            bad.extend(e.violations)
            return None

    product = take(PRODUCT.parse, m.product, f"{where}.product") if m.product else None
    quantity = take(
        parse_decimal, m.quantity, f"{where}.quantity", places=6, low=Decimal("0.000001"), high=Decimal("1e12")
    )
    unit_price = take(_price, m, where, currency)
    discount = take(
        parse_decimal,
        m.discount_percent,
        f"{where}.discount_percent",
        places=4,
        low=Decimal(0),
        high=HUNDRED,
        default=Decimal(0),
    )
    tax = take(parse_decimal, m.tax_rate, f"{where}.tax_rate", places=4, low=Decimal(0), high=HUNDRED, default=-1)
    planned = take(to_date, m.planned_delivery_date, f"{where}.planned_delivery_date")
    description = take(_description, m.description, f"{where}.description")
    if bad:
        raise InvalidArgument(bad)
    return Line(
        position=i,
        product_id=product.id if product is not None else None,
        description=description,
        quantity=quantity,
        unit_price=unit_price,
        discount_percent=discount,
        tax_rate=None if tax == -1 else tax,
        planned_delivery_date=planned,
    )


def _price(m, where: str, currency: str) -> Decimal:
    if not m.HasField("unit_price"):
        raise InvalidArgument.field(f"{where}.unit_price", "required")
    value = money.to_decimal(m.unit_price, f"{where}.unit_price", currency=currency)
    if value < 0:
        raise InvalidArgument.field(f"{where}.unit_price", "must not be negative")
    return value


def _description(text: str, field: str) -> str:
    text = (text or "").strip()
    if len(text) > 1000:
        raise InvalidArgument.field(field, "at most 1000 characters")
    return text


def line_facts(rows, currency: str) -> list[sales_events_pb2.LineFact]:
    """LineFacts of line rows joined with their product's line (product_line_id)."""
    return [
        sales_events_pb2.LineFact(
            product=f"products/{r.product_id}" if r.product_id else "",
            product_line=f"productLines/{r.product_line_id}" if r.product_line_id else "",
            quantity=decimal_text(r.quantity),
            amount=money.to_money(r.amount, currency),
        )
        for r in rows
    ]


def next_number(conn: sa.Connection, kind: str, prefix: str, width: int, day: dt.date) -> str:
    """The next number of `kind` in the Jalali year of `day`: Q-1405-00012."""
    year = persian.to_jalali(day).year
    stmt = pg.insert(sales_numbers).values(kind=kind, year=year, last_value=1)
    stmt = stmt.on_conflict_do_update(
        index_elements=[sales_numbers.c.kind, sales_numbers.c.year],
        set_={"last_value": sales_numbers.c.last_value + 1},
    ).returning(sales_numbers.c.last_value)
    n = conn.execute(stmt).scalar_one()
    return f"{prefix}-{year}-{n:0{width}d}"


def opportunity_attribution(conn: sa.Connection, opportunity_id: str | None) -> tuple[str, str]:
    """(source, campaign_id) of an opportunity, for the events."""
    if not opportunity_id:
        return "", ""
    row = conn.execute(
        sa.select(opportunities.c.source, opportunities.c.campaign_id).where(opportunities.c.id == opportunity_id)
    ).one_or_none()
    return (row.source, row.campaign_id) if row else ("", "")


# -- orders ---------------------------------------------------------------------------------------

_LINE_COLUMNS = [c for c in order_lines.c]


def _lines_of(conn: sa.Connection, order_ids: list[str]) -> dict[str, list]:
    out: dict[str, list] = {i: [] for i in order_ids}
    if not order_ids:
        return out
    rows = conn.execute(
        sa.select(*_LINE_COLUMNS, products.c.product_line_id)
        .select_from(order_lines.outerjoin(products, products.c.id == order_lines.c.product_id))
        .where(order_lines.c.order_id.in_(order_ids))
        .order_by(order_lines.c.order_id, order_lines.c.position)
    )
    for r in rows:
        out[str(r.order_id)].append(r)
    return out


def line_to_proto(r, currency: str) -> pb.OrderLine:
    m = pb.OrderLine(
        name=ORDER_LINE.format(r.order_id, r.id),
        position=r.position,
        product=f"products/{r.product_id}" if r.product_id else "",
        description=r.description,
        quantity=decimal_text(r.quantity),
        unit_price=money.to_money(r.unit_price, currency),
        discount_percent=decimal_text(r.discount_percent),
        tax_rate=decimal_text(r.tax_rate),
        net_amount=money.to_money(r.amount, currency),
        tax_amount=money.to_money(r.tax_amount, currency),
        delivered_quantity=decimal_text(r.delivered_quantity),
    )
    if r.planned_delivery_date:
        m.planned_delivery_date.CopyFrom(date_msg(r.planned_delivery_date))
    if r.actual_delivery_date:
        m.actual_delivery_date.CopyFrom(date_msg(r.actual_delivery_date))
    return m


def order_to_proto(row, lines: list) -> pb.Order:
    c = row.currency_code
    m = pb.Order(
        name=ORDER.format(row.id),
        number=row.number,
        quote=f"quotes/{row.quote_id}" if row.quote_id else "",
        opportunity=f"opportunities/{row.opportunity_id}" if row.opportunity_id else "",
        customer=f"customers/{row.customer_id}",
        owner=row.owner_id,
        team=f"teams/{row.team_id}" if row.team_id else "",
        currency_code=c,
        state=STATES[row.state],
        order_date=date_msg(row.order_date),
        lines=[line_to_proto(x, c) for x in lines],
        subtotal=money.to_money(row.subtotal, c),
        discount_total=money.to_money(row.discount_total, c),
        tax_total=money.to_money(row.tax_total, c),
        total=money.to_money(row.total, c),
        cancel_reason=row.cancel_reason,
        etag=etag(row.version),
    )
    m.create_time.FromDatetime(row.create_time)
    m.update_time.FromDatetime(row.update_time)
    return m


def order_event(conn: sa.Connection, row, lines: list) -> sales_events_pb2.OrderEvent:
    c = row.currency_code
    source, campaign = opportunity_attribution(conn, row.opportunity_id)
    ev = sales_events_pb2.OrderEvent(
        order=ORDER.format(row.id),
        number=row.number,
        quote=f"quotes/{row.quote_id}" if row.quote_id else "",
        opportunity=f"opportunities/{row.opportunity_id}" if row.opportunity_id else "",
        customer=f"customers/{row.customer_id}",
        owner=row.owner_id,
        team=f"teams/{row.team_id}" if row.team_id else "",
        total=money.to_money(row.total, c),
        lines=line_facts(lines, c),
        source=source,
        campaign_id=campaign,
        order_date=date_msg(row.order_date),
        state=row.state,
        subtotal=money.to_money(row.subtotal, c),
        discount_total=money.to_money(row.discount_total, c),
        tax_total=money.to_money(row.tax_total, c),
        cancel_reason=row.cancel_reason,
    )
    ev.event_time.FromDatetime(row.update_time)
    return ev


def place_order(
    tx,
    *,
    customer_id: str,
    owner_id: str,
    team_id: str | None,
    currency: str,
    order_date: dt.date,
    lines: list[Line],
    principal: Principal,
    opportunity_id: str | None = None,
    quote_id: str | None = None,
    request_id: str | None = None,
):
    """Insert an order and its lines in the caller's transaction, with its order.placed.v1 event
    and audit entry; returns (order row, line rows)."""
    totals = Totals.of(lines)
    number = next_number(tx.conn, "order", "O", 6, order_date)
    row = tx.execute(
        orders.insert()
        .values(
            number=number,
            opportunity_id=opportunity_id,
            quote_id=quote_id,
            customer_id=customer_id,
            owner_id=owner_id,
            team_id=team_id,
            currency_code=currency,
            state="open",
            order_date=order_date,
            subtotal=totals.subtotal,
            discount_total=totals.discount_total,
            tax_total=totals.tax_total,
            total=totals.total,
            request_id=request_id or None,
        )
        .returning(*orders.c)
    ).one()
    tx.execute(
        order_lines.insert(),
        [
            {
                "order_id": row.id,
                "position": x.position,
                "product_id": x.product_id,
                "description": x.description,
                "quantity": x.quantity,
                "unit_price": x.unit_price,
                "discount_percent": x.discount_percent,
                "tax_rate": x.tax_rate,
                "amount": x.net,
                "tax_amount": x.tax,
                "planned_delivery_date": x.planned_delivery_date,
            }
            for x in lines
        ],
    )
    rows = _lines_of(tx.conn, [str(row.id)])[str(row.id)]
    name = ORDER.format(row.id)
    tx.publish("order.placed.v1", order_event(tx.conn, row, rows), name)
    tx.audit(
        name,
        "create",
        principal,
        [
            {"field": f, "old_value": "null", "new_value": audit.value(v)}
            for f, v in (
                ("number", number),
                ("customer", f"customers/{customer_id}"),
                ("quote", f"quotes/{quote_id}" if quote_id else ""),
                ("currency_code", currency),
                ("total", str(totals.total)),
                ("lines", len(lines)),
            )
            if v
        ],
    )
    return row, rows


LIST_FIELDS = FilterSchema(
    FilterField("state", orders.c.state, FieldType.ENUM, enum_values=enum_values(STATES, "ORDER_STATE_")),
    FilterField("customer", ref(orders.c.customer_id, "customers")),
    FilterField("owner", orders.c.owner_id),
    FilterField("team", ref(sa.cast(orders.c.team_id, sa.Text), "teams")),
    FilterField("quote", ref(sa.cast(orders.c.quote_id, sa.Text), "quotes")),
    FilterField("opportunity", ref(sa.cast(orders.c.opportunity_id, sa.Text), "opportunities")),
    FilterField("number", orders.c.number),
    FilterField("currency_code", orders.c.currency_code),
    FilterField("order_date", orders.c.order_date, FieldType.DATE),
    FilterField("create_time", orders.c.create_time, FieldType.TIMESTAMP),
    FilterField("update_time", orders.c.update_time, FieldType.TIMESTAMP),
)
SORTABLE = {
    "create_time": orders.c.create_time,
    "update_time": orders.c.update_time,
    "order_date": orders.c.order_date,
    "number": orders.c.number,
    "total": orders.c.total,
}

LATE_FIELDS = FilterSchema(
    FilterField("owner", orders.c.owner_id),
    FilterField("team", ref(sa.cast(orders.c.team_id, sa.Text), "teams")),
    FilterField("customer", ref(orders.c.customer_id, "customers")),
    FilterField("order", ref(sa.cast(orders.c.id, sa.Text), "orders")),
    FilterField("product", ref(sa.cast(order_lines.c.product_id, sa.Text), "products")),
)


class Orders:
    def __init__(self, sales: Sales):
        self.sales = sales
        self.uow = sales.uow
        secret = sales.ctx.settings.jwt_secret
        self.tokens = PageTokens(secret, "orders")
        self.late_tokens = PageTokens(secret, "late-deliveries")

    # -- reads -------------------------------------------------------------------------------
    def _locked(self, conn, order_id: str, principal: Principal):
        row = conn.execute(
            sa.select(orders)
            .where(orders.c.id == order_id, Scope.of(principal).visible(orders.c.owner_id, orders.c.team_id))
            .with_for_update()
        ).one_or_none()
        if row is None:
            raise ORDER.not_found([order_id])
        return row

    def get(self, name: str, principal: Principal) -> pb.Order:
        oid = ORDER.parse(name).id
        with self.uow.read() as conn:
            row = conn.execute(
                sa.select(orders).where(
                    orders.c.id == oid, Scope.of(principal).visible(orders.c.owner_id, orders.c.team_id)
                )
            ).one_or_none()
            if row is None:
                raise ORDER.not_found(name)
            return order_to_proto(row, _lines_of(conn, [oid])[oid])

    def list(self, req: pb.ListOrdersRequest, principal: Principal) -> pb.ListOrdersResponse:
        limit = page_size(req.page_size)
        where = LIST_FIELDS.compile(req.filter)
        order = parse_order_by(req.order_by, SORTABLE) or [(orders.c.create_time, True)]
        order = with_tiebreaker(order, orders.c.id, descending=order[0][1])
        query = sa.select(orders).where(where, Scope.of(principal).visible(orders.c.owner_id, orders.c.team_id))
        with self.uow.read() as conn:
            rows, token = keyset_page(
                conn, query, order, self.tokens, query_fingerprint(req.filter, req.order_by), limit, req.page_token
            )
            lines = _lines_of(conn, [str(r.id) for r in rows])
            return pb.ListOrdersResponse(
                orders=[order_to_proto(r, lines[str(r.id)]) for r in rows], next_page_token=token
            )

    # -- create ------------------------------------------------------------------------------
    def create(self, req: pb.CreateOrderRequest, principal: Principal) -> pb.Order:
        o = req.order
        if len(req.request_id) > 128:
            raise InvalidArgument.field("request_id", "must be at most 128 characters")
        currency = money.check_currency(o.currency_code, "order.currency_code")
        bad = []
        if not o.lines:
            bad.append(FieldViolation("order.lines", "at least one line"))
        opp_id = cust_id = team_id = None
        try:
            opp_id = OPPORTUNITY.parse(o.opportunity, "order.opportunity").id if o.opportunity else None
        except InvalidArgument as e:
            bad += e.violations
        try:
            cust_id = CUSTOMER.parse(o.customer, "order.customer").id if o.customer else None
        except InvalidArgument as e:
            bad += e.violations
        try:
            team_id = TEAM.parse(o.team, "order.team").id if o.team else None
        except InvalidArgument as e:
            bad += e.violations
        given_owner = ""
        try:
            given_owner = owner_of(o.owner, "order.owner")
        except InvalidArgument as e:
            bad += e.violations
        if not o.customer and not o.opportunity:
            bad.append(FieldViolation("order.customer", "required (or an opportunity whose customer it is)"))
        order_date = to_date(o.order_date, "order.order_date") or today()
        if bad:
            raise InvalidArgument(bad)
        try:
            with self.uow.begin() as tx:
                if req.request_id:
                    existing = self._by_request(tx.conn, req.request_id, principal)
                    if existing is not None:
                        return existing
                scope = Scope.of(principal)
                opp = None
                if opp_id:
                    opp = tx.execute(
                        sa.select(opportunities).where(
                            opportunities.c.id == opp_id,
                            opportunities.c.delete_time.is_(None),
                            scope.visible(opportunities.c.owner_id, opportunities.c.team_id),
                        )
                    ).one_or_none()
                    if opp is None:
                        raise OPPORTUNITY.not_found(o.opportunity)
                    if cust_id and cust_id != opp.customer_id:
                        raise InvalidArgument.field("order.customer", "is not the opportunity's customer")
                    cust_id = cust_id or opp.customer_id
                    team_id = team_id or (str(opp.team_id) if opp.team_id else None)
                    if not cust_id:
                        raise InvalidArgument.field("order.customer", "required: the opportunity has no customer")
                # The opportunity's owner by default (whoever may see the opportunity may order
                # for it); an owner or team given is checked as any assignment is.
                owner = given_owner or (opp.owner_id if opp is not None and opp.owner_id else principal.subject)
                if team_id and not tx.execute(sa.select(sa.exists().where(teams.c.id == team_id))).scalar():
                    raise InvalidArgument.field("order.team", f"no such team: {o.team}")
                if given_owner or o.team:
                    scope.require_assign(tx.conn, owner, team_id if o.team else None, field="order.owner")
                lines = read_lines(tx.conn, o.lines, currency, "order.lines")
                row, rows = place_order(
                    tx,
                    customer_id=cust_id,
                    owner_id=owner,
                    team_id=team_id,
                    currency=currency,
                    order_date=order_date,
                    lines=lines,
                    principal=principal,
                    opportunity_id=opp_id,
                    request_id=req.request_id,
                )
                return order_to_proto(row, rows)
        except sa.exc.IntegrityError:
            if req.request_id:
                with self.uow.read() as conn:
                    existing = self._by_request(conn, req.request_id, principal)
                    if existing is not None:
                        return existing
            raise

    def _by_request(self, conn, request_id: str, principal: Principal) -> pb.Order | None:
        row = conn.execute(sa.select(orders).where(orders.c.request_id == request_id)).one_or_none()
        if row is None:
            return None
        if not conn.execute(
            sa.select(Scope.of(principal).visible(sa.literal(row.owner_id), sa.literal(row.team_id, UUID)))
        ).scalar():
            raise request_id_taken(request_id)
        return order_to_proto(row, _lines_of(conn, [str(row.id)])[str(row.id)])

    # -- deliveries ----------------------------------------------------------------------------
    def record_delivery(self, req: pb.RecordDeliveryRequest, principal: Principal) -> pb.Order:
        oid = ORDER.parse(req.name).id
        day = to_date(req.delivery_date, "delivery_date") or today()
        if day > today():
            raise InvalidArgument.field("delivery_date", "must not be in the future")
        if not req.deliveries:
            raise InvalidArgument.field("deliveries", "at least one line delivered")
        bad: list[FieldViolation] = []
        wanted: dict[str, tuple[int, Decimal]] = {}
        for i, d in enumerate(req.deliveries):
            try:
                line_order, line_id = ORDER_LINE.parse(d.line, f"deliveries[{i}].line")
                q = parse_decimal(d.quantity, f"deliveries[{i}].quantity", places=6, low=Decimal("0.000001"), high=None)
            except InvalidArgument as e:
                bad += e.violations
                continue
            if line_order != oid:
                bad.append(FieldViolation(f"deliveries[{i}].line", f"is not a line of {req.name}"))
            elif line_id in wanted:
                bad.append(FieldViolation(f"deliveries[{i}].line", "named twice; give each line once"))
            else:
                wanted[line_id] = (i, q)
        if bad:
            raise InvalidArgument(bad)
        with self.uow.begin() as tx:
            row = self._locked(tx.conn, oid, principal)
            check_etag(req.etag, row.version, req.name)
            if row.state in ("cancelled", "delivered"):
                raise FailedPrecondition(
                    f"{req.name} is {row.state}: no more deliveries can be recorded",
                    reason="ORDER_CLOSED",
                    metadata={"name": req.name, "state": row.state},
                )
            if day < row.order_date:
                raise InvalidArgument.field("delivery_date", f"is before the order date {row.order_date}")
            lines = {
                str(r.id): r
                for r in tx.execute(sa.select(order_lines).where(order_lines.c.order_id == oid).with_for_update())
            }
            for line_id, (i, q) in wanted.items():
                line = lines.get(line_id)
                name = ORDER_LINE.format(oid, line_id)
                if line is None:
                    raise ORDER_LINE.not_found(name)
                left = line.quantity - line.delivered_quantity
                if q > left:
                    raise FailedPrecondition(
                        f"deliveries[{i}]: {name} awaits {decimal_text(left)} more, {decimal_text(q)} given "
                        "(a line cannot be delivered beyond its quantity)",
                        reason="OVER_DELIVERY",
                        metadata={"line": name, "field": f"deliveries[{i}].quantity", "remaining": decimal_text(left)},
                    )
            bp = sa.bindparam
            tx.execute(
                order_lines.update()
                .where(order_lines.c.id == bp("lid"))
                .values(
                    delivered_quantity=order_lines.c.delivered_quantity + bp("q", type_=QUANTITY),
                    actual_delivery_date=sa.case(
                        (order_lines.c.delivered_quantity + bp("q", type_=QUANTITY) >= order_lines.c.quantity, day),
                        else_=order_lines.c.actual_delivery_date,
                    ),
                ),
                [{"lid": lid, "q": q} for lid, (_, q) in wanted.items()],
            )
            tx.execute(
                order_deliveries.insert(),
                [
                    {"order_id": oid, "line_id": lid, "quantity": q, "delivery_date": day, "actor": principal.subject}
                    for lid, (_, q) in wanted.items()
                ],
            )
            done = all(
                line.delivered_quantity + (wanted[lid][1] if lid in wanted else 0) >= line.quantity
                for lid, line in lines.items()
            )
            state = "delivered" if done else "partially_delivered"
            old_state = row.state
            row = tx.execute(
                orders.update()
                .where(orders.c.id == oid)
                .values(state=state, version=orders.c.version + 1, update_time=sa.func.now())
                .returning(*orders.c)
            ).one()
            rows = _lines_of(tx.conn, [oid])[oid]
            if done:
                tx.publish("order.delivered.v1", order_event(tx.conn, row, rows), req.name)
            tx.audit(
                req.name,
                "record_delivery",
                principal,
                [
                    {
                        "field": f"lines/{lid}.delivered_quantity",
                        "old_value": audit.value(decimal_text(lines[lid].delivered_quantity)),
                        "new_value": audit.value(decimal_text(lines[lid].delivered_quantity + q)),
                    }
                    for lid, (_, q) in wanted.items()
                ]
                + [{"field": "state", "old_value": audit.value(old_state), "new_value": audit.value(state)}]
                + [{"field": "delivery_date", "old_value": "null", "new_value": audit.value(day.isoformat())}],
            )
            return order_to_proto(row, rows)

    def cancel(self, req: pb.CancelOrderRequest, principal: Principal) -> pb.Order:
        oid = ORDER.parse(req.name).id
        reason = req.reason.strip()
        if not reason:
            raise InvalidArgument.field("reason", "required: why the order is cancelled")
        if len(reason) > 1000:
            raise InvalidArgument.field("reason", "at most 1000 characters")
        with self.uow.begin() as tx:
            row = self._locked(tx.conn, oid, principal)
            check_etag(req.etag, row.version, req.name)
            if row.state == "cancelled":
                raise FailedPrecondition(
                    f"{req.name} is already cancelled", reason="ORDER_CANCELLED", metadata={"name": req.name}
                )
            delivered = tx.execute(
                sa.select(sa.exists().where(order_lines.c.order_id == oid, order_lines.c.delivered_quantity > 0))
            ).scalar()
            if delivered:
                raise FailedPrecondition(
                    f"{req.name} has deliveries recorded: an order is cancelled only before anything is delivered",
                    reason="ORDER_HAS_DELIVERIES",
                    metadata={"name": req.name, "state": row.state},
                )
            row = tx.execute(
                orders.update()
                .where(orders.c.id == oid)
                .values(
                    state="cancelled", cancel_reason=reason, version=orders.c.version + 1, update_time=sa.func.now()
                )
                .returning(*orders.c)
            ).one()
            rows = _lines_of(tx.conn, [oid])[oid]
            tx.publish("order.cancelled.v1", order_event(tx.conn, row, rows), req.name)
            tx.audit(
                req.name,
                "cancel",
                principal,
                [
                    {"field": "state", "old_value": audit.value("open"), "new_value": audit.value("cancelled")},
                    {"field": "cancel_reason", "old_value": audit.value(""), "new_value": audit.value(reason)},
                ],
            )
            return order_to_proto(row, rows)

    # -- late deliveries -------------------------------------------------------------------------
    def late(self, req: pb.ListLateDeliveriesRequest, principal: Principal) -> pb.ListLateDeliveriesResponse:
        limit = page_size(req.page_size)
        as_of = to_date(req.as_of, "as_of") or today()
        where = LATE_FIELDS.compile(req.filter)
        ol = order_lines
        planned = ol.c.planned_delivery_date
        outstanding = sa.and_(planned < as_of, ol.c.actual_delivery_date.is_(None), orders.c.state != "cancelled")
        delivered_late = ol.c.actual_delivery_date > planned
        days = (sa.func.coalesce(ol.c.actual_delivery_date, as_of) - planned).label("days_late")
        query = (
            sa.select(
                *_LINE_COLUMNS,
                orders.c.number,
                orders.c.customer_id,
                orders.c.owner_id,
                orders.c.currency_code,
                days,
                ol.c.actual_delivery_date.is_(None).label("outstanding"),
            )
            .select_from(ol.join(orders, orders.c.id == ol.c.order_id))
            .where(
                sa.or_(outstanding, delivered_late),
                where,
                Scope.of(principal).visible(orders.c.owner_id, orders.c.team_id),
            )
        )
        order = [(planned, False), (ol.c.id, False)]
        fp = query_fingerprint(req.filter, as_of=as_of.isoformat())
        with self.uow.read() as conn:
            rows, token = keyset_page(conn, query, order, self.late_tokens, fp, limit, req.page_token)
        return pb.ListLateDeliveriesResponse(
            late_deliveries=[
                pb.LateDelivery(
                    order=ORDER.format(r.order_id),
                    order_number=r.number,
                    customer=f"customers/{r.customer_id}",
                    owner=r.owner_id,
                    line=line_to_proto(r, r.currency_code),
                    days_late=int(r.days_late),
                    outstanding=bool(r.outstanding),
                )
                for r in rows
            ],
            next_page_token=token,
        )


class OrderServicer(orders_pb2_grpc.OrderServiceServicer):
    def __init__(self, sales: Sales):
        self.orders = Orders(sales)

    def CreateOrder(self, request, context):
        return self.orders.create(request, current_principal())

    def GetOrder(self, request, context):
        return self.orders.get(request.name, current_principal())

    def ListOrders(self, request, context):
        return self.orders.list(request, current_principal())

    def RecordDelivery(self, request, context):
        return self.orders.record_delivery(request, current_principal())

    def CancelOrder(self, request, context):
        return self.orders.cancel(request, current_principal())

    def ListLateDeliveries(self, request, context):
        return self.orders.late(request, current_principal())


def registration(sales: Sales) -> Registration:
    return Registration.of(OrderServicer(sales))
