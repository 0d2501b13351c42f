"""QuoteService (proto/crm/sales/v1/quotes.proto): quotes in versions, sent, accepted (placing an
order in the same transaction), rejected or expired, and printed as a Persian PDF.

Storage: `quotes` holds what every version shares (number, opportunity, customer, owner, team,
currency, state, the order) and the number of the latest version; `quote_versions` one row per
version (valid_until, notes, totals, its own state and send time) and `quote_lines` the lines of
every version. Revising copies the latest version's lines into version n+1 with one INSERT ...
SELECT; nothing of an earlier version is ever changed again, so any version reads as it was.

State rules (FAILED_PRECONDITION, each naming its rule in the reason):
- only a draft is updated (QUOTE_NOT_DRAFT) or sent (QUOTE_NOT_DRAFT);
- only a sent quote is accepted or rejected (QUOTE_NOT_SENT; QUOTE_ALREADY_ACCEPTED when it was
  accepted already: one quote, one order), and only until its valid_until (QUOTE_EXPIRED);
- an accepted quote is not revised (QUOTE_ACCEPTED);
- a sent quote whose valid_until passed expires (a durable timer at the end of that day, Asia/
  Tehran, set when it is sent).
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from crm.sales.v1 import quotes_pb2 as pb
from crm.sales.v1 import quotes_pb2_grpc, sales_events_pb2
from crm_chassis import audit, dates, money, timers
from crm_chassis.auth import Principal
from crm_chassis.errors import FailedPrecondition, InvalidArgument
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
from crm_chassis.pagination import PageTokens, page_size
from crm_chassis.resources import ResourceName, UpdateMask, check_etag, etag

from . import quote_pdf
from .access import Scope
from .orders import (
    OPPORTUNITY,
    Line,
    Totals,
    date_msg,
    decimal_text,
    enum_values,
    line_facts,
    next_number,
    opportunity_attribution,
    place_order,
    read_lines,
    ref,
    request_id_taken,
    to_date,
    today,
)
from .runtime import Sales
from .tables import (
    MONEY,
    PERCENT,
    QUANTITY,
    UUID,
    metadata,
    opportunities,
    opportunity_lines,
    products,
)

QUOTE = ResourceName("quotes/{id}")
QUOTE_VERSION = ResourceName("quotes/{quote_id}/versions/{version}", version=r"[1-9][0-9]{0,5}")
EXPIRE = "quote.expire"  # timer kind; key: the quote's id
QUOTE_STATES = ("draft", "sent", "accepted", "rejected", "expired")
STATES = {
    "draft": pb.QUOTE_STATE_DRAFT,
    "sent": pb.QUOTE_STATE_SENT,
    "accepted": pb.QUOTE_STATE_ACCEPTED,
    "rejected": pb.QUOTE_STATE_REJECTED,
    "expired": pb.QUOTE_STATE_EXPIRED,
}

quotes = sa.Table(
    "quotes",
    metadata,
    sa.Column("id", UUID, primary_key=True, server_default=sa.text("gen_random_uuid()")),
    sa.Column("number", sa.Text, nullable=False, unique=True),
    sa.Column("opportunity_id", UUID, sa.ForeignKey("opportunities.id"), nullable=False),
    sa.Column("customer_id", sa.Text, nullable=False),
    sa.Column("owner_id", sa.Text, nullable=False, server_default=""),
    sa.Column("team_id", UUID, sa.ForeignKey("teams.id")),
    sa.Column("currency_code", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False, server_default="draft"),
    sa.Column("latest_version", sa.Integer, nullable=False, server_default="1"),
    sa.Column("order_id", UUID, sa.ForeignKey("orders.id")),
    sa.Column("reject_reason", sa.Text, nullable=False, server_default=""),
    sa.Column("close_time", sa.DateTime(timezone=True)),
    sa.Column("request_id", sa.Text, unique=True),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),  # the etag's
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.CheckConstraint(f"state IN {QUOTE_STATES!r}", name="quotes_state"),
)
sa.Index("quotes_page", quotes.c.create_time.desc(), quotes.c.id.desc())
sa.Index("quotes_owner_page", quotes.c.owner_id, quotes.c.create_time.desc(), quotes.c.id.desc())
sa.Index("quotes_team_page", quotes.c.team_id, quotes.c.create_time.desc(), quotes.c.id.desc())
sa.Index("quotes_opportunity", quotes.c.opportunity_id)
sa.Index("quotes_customer", quotes.c.customer_id)
sa.Index("quotes_state", quotes.c.state, quotes.c.create_time.desc())

quote_versions = sa.Table(
    "quote_versions",
    metadata,
    sa.Column("quote_id", UUID, sa.ForeignKey("quotes.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("quote_version", sa.Integer, primary_key=True),
    sa.Column("state", sa.Text, nullable=False, server_default="draft"),
    sa.Column("valid_until", sa.Date, nullable=False),
    sa.Column("notes", sa.Text, nullable=False, server_default=""),
    sa.Column("subtotal", MONEY, nullable=False, server_default="0"),
    sa.Column("discount_total", MONEY, nullable=False, server_default="0"),
    sa.Column("tax_total", MONEY, nullable=False, server_default="0"),
    sa.Column("total", MONEY, nullable=False, server_default="0"),
    sa.Column("send_time", sa.DateTime(timezone=True)),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

quote_lines = sa.Table(
    "quote_lines",
    metadata,
    sa.Column("id", UUID, primary_key=True, server_default=sa.text("gen_random_uuid()")),
    sa.Column("quote_id", UUID, nullable=False),
    sa.Column("quote_version", sa.Integer, nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("product_id", UUID, sa.ForeignKey("products.id")),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("quantity", QUANTITY, nullable=False),
    sa.Column("unit_price", MONEY, nullable=False),
    sa.Column("discount_percent", PERCENT, nullable=False, server_default="0"),
    sa.Column("tax_rate", PERCENT, nullable=False, server_default="0"),
    sa.Column("gross_amount", MONEY, nullable=False),
    sa.Column("discount_amount", MONEY, nullable=False),
    sa.Column("amount", MONEY, nullable=False),  # net of discount, before tax
    sa.Column("tax_amount", MONEY, nullable=False),
    sa.Column("planned_delivery_date", sa.Date),
    sa.ForeignKeyConstraint(
        ["quote_id", "quote_version"],
        ["quote_versions.quote_id", "quote_versions.quote_version"],
        ondelete="CASCADE",
    ),
    sa.UniqueConstraint("quote_id", "quote_version", "position", name="quote_lines_position"),
)

_V = [c.label(f"v_{c.name}") for c in quote_versions.c if c.name != "quote_id"]


def _select(version: sa.ColumnElement | int | None = None) -> sa.Select:
    """Quotes with the columns of one version (the latest unless `version`) as v_<column>."""
    which = quotes.c.latest_version if version is None else version
    # valid_until and total once more under their own names: the keyset of a list sorted by them
    # reads them from the row.
    return sa.select(*quotes.c, *_V, quote_versions.c.valid_until, quote_versions.c.total).select_from(
        quotes.join(
            quote_versions,
            sa.and_(quote_versions.c.quote_id == quotes.c.id, quote_versions.c.quote_version == which),
        )
    )


def _lines(conn: sa.Connection, keys: list[tuple[str, int]]) -> dict[tuple[str, int], list]:
    out: dict[tuple[str, int], list] = {k: [] for k in keys}
    if not keys:
        return out
    rows = conn.execute(
        sa.select(*quote_lines.c, products.c.product_line_id)
        .select_from(quote_lines.outerjoin(products, products.c.id == quote_lines.c.product_id))
        .where(sa.tuple_(quote_lines.c.quote_id, quote_lines.c.quote_version).in_(keys))
        .order_by(quote_lines.c.quote_id, quote_lines.c.quote_version, quote_lines.c.position)
    )
    for r in rows:
        out[(str(r.quote_id), r.quote_version)].append(r)
    return out


def _line_proto(r, c: str) -> pb.QuoteLine:
    m = pb.QuoteLine(
        position=r.position,
        product=f"products/{r.product_id}" if r.product_id else "",
        description=r.description,
        quantity=decimal_text(r.quantity),
        unit_price=money.to_money(r.unit_price, c),
        discount_percent=decimal_text(r.discount_percent),
        tax_rate=decimal_text(r.tax_rate),
        gross_amount=money.to_money(r.gross_amount, c),
        discount_amount=money.to_money(r.discount_amount, c),
        net_amount=money.to_money(r.amount, c),
        tax_amount=money.to_money(r.tax_amount, c),
        total=money.to_money(r.amount + r.tax_amount, c),
    )
    if r.planned_delivery_date:
        m.planned_delivery_date.CopyFrom(date_msg(r.planned_delivery_date))
    return m


def quote_to_proto(row, lines: list) -> pb.Quote:
    c = row.currency_code
    m = pb.Quote(
        name=QUOTE.format(row.id),
        number=row.number,
        quote_version=row.v_quote_version,
        latest_version=row.latest_version,
        opportunity=f"opportunities/{row.opportunity_id}",
        customer=f"customers/{row.customer_id}",
        owner=row.owner_id,
        team=f"teams/{row.team_id}" if row.team_id else "",
        currency_code=c,
        state=STATES[row.v_state],
        valid_until=date_msg(row.v_valid_until),
        lines=[_line_proto(x, c) for x in lines],
        subtotal=money.to_money(row.v_subtotal, c),
        discount_total=money.to_money(row.v_discount_total, c),
        tax_total=money.to_money(row.v_tax_total, c),
        total=money.to_money(row.v_total, c),
        notes=row.v_notes,
        order=f"orders/{row.order_id}" if row.order_id and row.v_quote_version == row.latest_version else "",
        reject_reason=row.reject_reason if row.v_quote_version == row.latest_version else "",
        etag=etag(row.version),
    )
    if row.v_send_time:
        m.send_time.FromDatetime(row.v_send_time)
    if row.close_time and row.v_quote_version == row.latest_version:
        m.close_time.FromDatetime(row.close_time)
    m.create_time.FromDatetime(row.create_time)
    m.version_create_time.FromDatetime(row.v_create_time)
    m.update_time.FromDatetime(row.update_time)
    return m


def _line_rows(quote_id: str, version: int, lines: list[Line]) -> list[dict]:
    return [
        {
            "quote_id": quote_id,
            "quote_version": version,
            "position": x.position,
            "product_id": x.product_id,
            "description": x.description,
            "quantity": x.quantity,
            "unit_price": x.unit_price,
            "discount_percent": x.discount_percent,
            "tax_rate": x.tax_rate,
            "gross_amount": x.gross,
            "discount_amount": x.discount,
            "amount": x.net,
            "tax_amount": x.tax,
            "planned_delivery_date": x.planned_delivery_date,
        }
        for x in lines
    ]


def _totals(t: Totals) -> dict:
    return {"subtotal": t.subtotal, "discount_total": t.discount_total, "tax_total": t.tax_total, "total": t.total}


def _stored_lines(rows) -> list[Line]:
    """A version's stored lines as priced Lines (amounts as stored, not recomputed)."""
    return [
        Line(
            position=r.position,
            product_id=str(r.product_id) if r.product_id else None,
            description=r.description,
            quantity=r.quantity,
            unit_price=r.unit_price,
            discount_percent=r.discount_percent,
            tax_rate=r.tax_rate,
            planned_delivery_date=r.planned_delivery_date,
            gross=r.gross_amount,
            discount=r.discount_amount,
            net=r.amount,
            tax=r.tax_amount,
        )
        for r in rows
    ]


def _opportunity_lines(conn: sa.Connection, opp_id: str, currency: str) -> list[Line]:
    rows = conn.execute(
        sa.select(opportunity_lines, products.c.name.label("product_name"))
        .select_from(opportunity_lines.outerjoin(products, products.c.id == opportunity_lines.c.product_id))
        .where(opportunity_lines.c.opportunity_id == opp_id)
        .order_by(opportunity_lines.c.position)
    ).all()
    return [
        Line(
            position=i,
            product_id=str(r.product_id) if r.product_id else None,
            description=r.description or r.product_name or "",
            quantity=r.quantity,
            unit_price=r.unit_price,
            discount_percent=r.discount_percent,
            tax_rate=r.tax_rate,
        ).price(currency)
        for i, r in enumerate(rows)
    ]


def _notes(text: str, field: str) -> str:
    if len(text) > 10_000:
        raise InvalidArgument.field(field, "at most 10000 characters")
    return text.strip()


def _valid_until(d, field: str, required: bool = True) -> dt.date | None:
    day = to_date(d, field)
    if day is None:
        if required:
            raise InvalidArgument.field(field, "required: the last day the offer holds")
        return None
    if day < today():
        raise InvalidArgument.field(field, f"{day.isoformat()} is in the past")
    return day


def _not_state(name: str, state: str, rule: str, what: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"{name} is {state}: {what}", reason=rule, metadata={"name": name, "state": state, "rule": rule}
    )


def expiry_time(valid_until: dt.date) -> dt.datetime:
    """The end of the valid_until day in Asia/Tehran: when a sent quote expires."""
    return dates.end_of_day(valid_until)


UPDATE_MASK = UpdateMask(
    ["valid_until", "notes", "lines"],
    immutable={
        "opportunity": "make a new quote instead",
        "currency_code": "make a new quote instead",
        "state": "use :send, :accept or :reject",
    },
)

LIST_FIELDS = FilterSchema(
    FilterField("state", quotes.c.state, FieldType.ENUM, enum_values=enum_values(STATES, "QUOTE_STATE_")),
    FilterField("opportunity", ref(sa.cast(quotes.c.opportunity_id, sa.Text), "opportunities")),
    FilterField("customer", ref(quotes.c.customer_id, "customers")),
    FilterField("owner", quotes.c.owner_id),
    FilterField("team", ref(sa.cast(quotes.c.team_id, sa.Text), "teams")),
    FilterField("number", quotes.c.number),
    FilterField("currency_code", quotes.c.currency_code),
    FilterField("valid_until", quote_versions.c.valid_until, FieldType.DATE),
    FilterField("create_time", quotes.c.create_time, FieldType.TIMESTAMP),
    FilterField("update_time", quotes.c.update_time, FieldType.TIMESTAMP),
)
SORTABLE = {
    "create_time": quotes.c.create_time,
    "update_time": quotes.c.update_time,
    "number": quotes.c.number,
    "valid_until": quote_versions.c.valid_until,
    "total": quote_versions.c.total,
}


class Quotes:
    def __init__(self, sales: Sales):
        self.sales = sales
        self.uow = sales.uow
        self.tokens = PageTokens(sales.ctx.settings.jwt_secret, "quotes")

    # -- helpers ---------------------------------------------------------------------------
    def _read(self, conn, quote_id: str, principal: Principal, *, version=None, lock: bool = False):
        stmt = _select(version).where(
            quotes.c.id == quote_id, Scope.of(principal).visible(quotes.c.owner_id, quotes.c.team_id)
        )
        if lock:
            stmt = stmt.with_for_update(of=quotes)
        row = conn.execute(stmt).one_or_none()
        if row is None:
            raise QUOTE.not_found([quote_id]) if version is None else QUOTE_VERSION.not_found([quote_id, version])
        return row

    def _proto(self, conn, row) -> pb.Quote:
        key = (str(row.id), row.v_quote_version)
        return quote_to_proto(row, _lines(conn, [key])[key])

    def _event(self, conn, row, order_id: str | None = None) -> sales_events_pb2.QuoteEvent:
        c = row.currency_code
        key = (str(row.id), row.v_quote_version)
        lines = _lines(conn, [key])[key]
        source, campaign = opportunity_attribution(conn, row.opportunity_id)
        ev = sales_events_pb2.QuoteEvent(
            quote=QUOTE.format(row.id),
            quote_version=row.v_quote_version,
            opportunity=f"opportunities/{row.opportunity_id}",
            customer=f"customers/{row.customer_id}",
            owner=row.owner_id,
            team=f"teams/{row.team_id}" if row.team_id else "",
            total=money.to_money(row.v_total, c),
            valid_until=date_msg(row.v_valid_until),
            order=f"orders/{order_id or row.order_id}" if (order_id or row.order_id) else "",
            number=row.number,
            state=row.v_state,
            subtotal=money.to_money(row.v_subtotal, c),
            discount_total=money.to_money(row.v_discount_total, c),
            tax_total=money.to_money(row.v_tax_total, c),
            lines=line_facts(lines, c),
            source=source,
            campaign_id=campaign,
            reject_reason=row.reject_reason,
        )
        ev.event_time.FromDatetime(row.update_time)
        return ev

    def _set_state(self, tx, row, state: str, **extra):
        """Move the quote (and its latest version) to `state`, bumping the etag; the row after."""
        tx.execute(
            quotes.update()
            .where(quotes.c.id == row.id)
            .values(state=state, version=quotes.c.version + 1, update_time=sa.func.now(), **extra)
        )
        values = {"state": state}
        if state == "sent":
            values["send_time"] = sa.func.now()
        tx.execute(
            quote_versions.update()
            .where(quote_versions.c.quote_id == row.id, quote_versions.c.quote_version == row.latest_version)
            .values(**values)
        )
        return tx.execute(_select().where(quotes.c.id == row.id)).one()

    def _by_request(self, conn, request_id: str, principal: Principal):
        row = conn.execute(_select().where(quotes.c.request_id == request_id)).one_or_none()
        if row is None:
            return None
        if not conn.execute(
            sa.select(Scope.of(principal).visible(sa.literal(row.owner_id), sa.literal(row.team_id, UUID)))
        ).scalar():
            raise request_id_taken(request_id)
        return self._proto(conn, row)

    # -- create ----------------------------------------------------------------------------
    def create(self, req: pb.CreateQuoteRequest, principal: Principal) -> pb.Quote:
        q = req.quote
        if len(req.request_id) > 128:
            raise InvalidArgument.field("request_id", "must be at most 128 characters")
        if not q.opportunity:
            raise InvalidArgument.field("quote.opportunity", "required: the opportunity the quote is for")
        opp_id = OPPORTUNITY.parse(q.opportunity, "quote.opportunity").id
        valid_until = _valid_until(q.valid_until, "quote.valid_until")
        notes = _notes(q.notes, "quote.notes")
        if q.currency_code:
            money.check_currency(q.currency_code, "quote.currency_code")
        try:
            with self.uow.begin() as tx:
                if req.request_id:
                    existing = self._by_request(tx.conn, req.request_id, principal)
                    if existing is not None:
                        return existing
                scope = Scope.of(principal)
                opp = tx.execute(
                    sa.select(opportunities).where(
                        opportunities.c.id == opp_id,
                        opportunities.c.delete_time.is_(None),
                        scope.visible(opportunities.c.owner_id, opportunities.c.team_id),
                    )
                ).one_or_none()
                if opp is None:
                    raise OPPORTUNITY.not_found(q.opportunity)
                if opp.state == "lost":
                    raise FailedPrecondition(
                        f"{q.opportunity} is lost: reopen it before quoting",
                        reason="OPPORTUNITY_LOST",
                        metadata={"opportunity": q.opportunity},
                    )
                if not opp.customer_id:
                    raise FailedPrecondition(
                        f"{q.opportunity} has no customer to quote",
                        reason="OPPORTUNITY_WITHOUT_CUSTOMER",
                        metadata={"opportunity": q.opportunity},
                    )
                currency = q.currency_code or opp.currency_code
                if q.lines:
                    lines = read_lines(tx.conn, q.lines, currency, "quote.lines")
                else:
                    if currency != opp.currency_code:
                        raise InvalidArgument.field(
                            "quote.currency_code",
                            f"{currency} given but the opportunity's lines are in {opp.currency_code}; "
                            "give the lines in the quote's currency",
                        )
                    lines = _opportunity_lines(tx.conn, opp_id, currency)
                    if not lines:
                        raise InvalidArgument.field("quote.lines", "the opportunity has no lines: give the lines")
                totals = Totals.of(lines)
                number = next_number(tx.conn, "quote", "Q", 5, today())
                qid = tx.execute(
                    quotes.insert()
                    .values(
                        number=number,
                        opportunity_id=opp_id,
                        customer_id=opp.customer_id,
                        owner_id=opp.owner_id or principal.subject,
                        team_id=opp.team_id,
                        currency_code=currency,
                        request_id=req.request_id or None,
                    )
                    .returning(quotes.c.id)
                ).scalar_one()
                tx.execute(
                    quote_versions.insert().values(
                        quote_id=qid, quote_version=1, valid_until=valid_until, notes=notes, **_totals(totals)
                    )
                )
                tx.execute(quote_lines.insert(), _line_rows(qid, 1, lines))
                row = tx.execute(_select().where(quotes.c.id == qid)).one()
                name = QUOTE.format(qid)
                tx.publish("quote.created.v1", self._event(tx.conn, row), name)
                tx.audit(
                    name,
                    "create",
                    principal,
                    [
                        {"field": f, "old_value": "null", "new_value": audit.value(v)}
                        for f, v in (
                            ("number", number),
                            ("opportunity", q.opportunity),
                            ("currency_code", currency),
                            ("valid_until", valid_until.isoformat()),
                            ("total", str(totals.total)),
                            ("lines", len(lines)),
                        )
                    ],
                )
                return self._proto(tx.conn, row)
        except sa.exc.IntegrityError:
            if req.request_id:
                with self.uow.read() as conn:
                    existing = self._by_request(conn, req.request_id, principal)
                    if existing is not None:
                        return existing
            raise

    # -- reads -----------------------------------------------------------------------------
    def get(self, name: str, principal: Principal) -> pb.Quote:
        qid = QUOTE.parse(name).id
        with self.uow.read() as conn:
            return self._proto(conn, self._read(conn, qid, principal))

    def get_version(self, name: str, principal: Principal) -> pb.Quote:
        qid, version = QUOTE_VERSION.parse(name)
        with self.uow.read() as conn:
            return self._proto(conn, self._read(conn, qid, principal, version=int(version)))

    def list_versions(self, parent: str, principal: Principal) -> pb.ListQuoteVersionsResponse:
        qid = QUOTE.parse(parent, "parent").id
        with self.uow.read() as conn:
            self._read(conn, qid, principal)  # NOT_FOUND outside the caller's reach
            rows = conn.execute(
                _select(quote_versions.c.quote_version)  # every version of the quote
                .where(quotes.c.id == qid)
                .order_by(quote_versions.c.quote_version)
            ).all()
            keys = [(str(r.id), r.v_quote_version) for r in rows]
            lines = _lines(conn, keys)
            return pb.ListQuoteVersionsResponse(
                versions=[quote_to_proto(r, lines[k]) for r, k in zip(rows, keys, strict=True)]
            )

    def list(self, req: pb.ListQuotesRequest, principal: Principal) -> pb.ListQuotesResponse:
        limit = page_size(req.page_size)
        where = LIST_FIELDS.compile(req.filter)
        order = parse_order_by(req.order_by, SORTABLE) or [(quotes.c.create_time, True)]
        order = with_tiebreaker(order, quotes.c.id, descending=order[0][1])
        query = _select().where(where, Scope.of(principal).visible(quotes.c.owner_id, quotes.c.team_id))
        with self.uow.read() as conn:
            rows, token = keyset_page(
                conn, query, order, self.tokens, query_fingerprint(req.filter, req.order_by), limit, req.page_token
            )
            keys = [(str(r.id), r.v_quote_version) for r in rows]
            lines = _lines(conn, keys)
            return pb.ListQuotesResponse(
                quotes=[quote_to_proto(r, lines[k]) for r, k in zip(rows, keys, strict=True)], next_page_token=token
            )

    # -- update and revise -----------------------------------------------------------------
    def update(self, req: pb.UpdateQuoteRequest, principal: Principal) -> pb.Quote:
        q = req.quote
        paths = UPDATE_MASK.paths(req.update_mask)
        qid = QUOTE.parse(q.name, "quote.name").id
        new: dict = {}
        if "valid_until" in paths:
            new["valid_until"] = _valid_until(q.valid_until, "quote.valid_until")
        if "notes" in paths:
            new["notes"] = _notes(q.notes, "quote.notes")
        if "lines" in paths and not q.lines:
            raise InvalidArgument.field("quote.lines", "at least one line")
        with self.uow.begin() as tx:
            row = self._read(tx.conn, qid, principal, lock=True)
            if row.state != "draft":
                raise _not_state(
                    q.name, row.state, "QUOTE_NOT_DRAFT", "only a draft is updated; revise it for a new version"
                )
            check_etag(q.etag, row.version, q.name)
            changes = []
            values: dict = {}
            for f in ("valid_until", "notes"):
                if f in new and new[f] != getattr(row, f"v_{f}"):
                    values[f] = new[f]
                    old = getattr(row, f"v_{f}")
                    changes.append(
                        {
                            "field": f,
                            "old_value": audit.value(old.isoformat() if isinstance(old, dt.date) else old),
                            "new_value": audit.value(new[f].isoformat() if isinstance(new[f], dt.date) else new[f]),
                        }
                    )
            if "lines" in paths:
                lines = read_lines(tx.conn, q.lines, row.currency_code, "quote.lines")
                totals = Totals.of(lines)
                tx.execute(
                    quote_lines.delete().where(
                        quote_lines.c.quote_id == qid, quote_lines.c.quote_version == row.latest_version
                    )
                )
                tx.execute(quote_lines.insert(), _line_rows(qid, row.latest_version, lines))
                values.update(_totals(totals))
                changes.append(
                    {
                        "field": "total",
                        "old_value": audit.value(str(row.v_total)),
                        "new_value": audit.value(str(totals.total)),
                    }
                )
            if not values:
                return self._proto(tx.conn, row)
            tx.execute(
                quote_versions.update()
                .where(quote_versions.c.quote_id == qid, quote_versions.c.quote_version == row.latest_version)
                .values(**values)
            )
            tx.execute(
                quotes.update()
                .where(quotes.c.id == qid)
                .values(version=quotes.c.version + 1, update_time=sa.func.now())
            )
            row = tx.execute(_select().where(quotes.c.id == qid)).one()
            tx.audit(q.name, "update", principal, changes)
            return self._proto(tx.conn, row)

    def revise(self, req: pb.ReviseQuoteRequest, principal: Principal) -> pb.Quote:
        qid = QUOTE.parse(req.name).id
        valid_until = _valid_until(req.valid_until, "valid_until", required=False)
        notes = _notes(req.notes, "notes") if req.notes else None
        with self.uow.begin() as tx:
            row = self._read(tx.conn, qid, principal, lock=True)
            if row.state == "accepted":
                raise _not_state(req.name, row.state, "QUOTE_ACCEPTED", "an accepted quote is not revised")
            check_etag(req.etag, row.version, req.name)
            n = row.latest_version + 1
            until = valid_until or row.v_valid_until
            if until < today():
                raise InvalidArgument.field("valid_until", "the current one has passed: give the new version's")
            if req.lines:
                lines = read_lines(tx.conn, req.lines, row.currency_code, "lines")
                totals = _totals(Totals.of(lines))
            else:
                lines = None
                totals = {k: getattr(row, f"v_{k}") for k in ("subtotal", "discount_total", "tax_total", "total")}
            tx.execute(
                quote_versions.insert().values(
                    quote_id=qid,
                    quote_version=n,
                    valid_until=until,
                    notes=row.v_notes if notes is None else notes,
                    **totals,
                )
            )
            if lines is not None:
                tx.execute(quote_lines.insert(), _line_rows(qid, n, lines))
            else:  # the latest version's lines, copied in the database
                cols = [c.name for c in quote_lines.c if c.name not in ("id", "quote_version")]
                tx.execute(
                    quote_lines.insert().from_select(
                        [*cols, "quote_version"],
                        sa.select(*(quote_lines.c[c] for c in cols), sa.literal(n)).where(
                            quote_lines.c.quote_id == qid, quote_lines.c.quote_version == row.latest_version
                        ),
                    )
                )
            tx.execute(
                quotes.update()
                .where(quotes.c.id == qid)
                .values(
                    latest_version=n,
                    state="draft",
                    reject_reason="",
                    close_time=None,
                    version=quotes.c.version + 1,
                    update_time=sa.func.now(),
                )
            )
            timers.cancel(tx.conn, EXPIRE, qid)
            new = tx.execute(_select().where(quotes.c.id == qid)).one()
            tx.audit(
                req.name,
                "revise",
                principal,
                [
                    {
                        "field": "quote_version",
                        "old_value": audit.value(row.latest_version),
                        "new_value": audit.value(n),
                    },
                    {"field": "state", "old_value": audit.value(row.state), "new_value": audit.value("draft")},
                ],
            )
            return self._proto(tx.conn, new)

    # -- state changes ---------------------------------------------------------------------
    def send(self, req: pb.SendQuoteRequest, principal: Principal) -> pb.Quote:
        qid = QUOTE.parse(req.name).id
        with self.uow.begin() as tx:
            row = self._read(tx.conn, qid, principal, lock=True)
            if row.state != "draft":
                raise _not_state(req.name, row.state, "QUOTE_NOT_DRAFT", "only a draft is sent; revise it first")
            check_etag(req.etag, row.version, req.name)
            if row.v_valid_until < today():
                raise FailedPrecondition(
                    f"{req.name}: valid_until {row.v_valid_until} has passed; update it before sending",
                    reason="QUOTE_VALIDITY_PASSED",
                    metadata={"name": req.name},
                )
            new = self._set_state(tx, row, "sent")
            timers.schedule(tx.conn, EXPIRE, qid, expiry_time(new.v_valid_until), {"version": new.latest_version})
            tx.publish("quote.sent.v1", self._event(tx.conn, new), req.name)
            tx.audit(req.name, "send", principal, [_state_change("draft", "sent")])
            return self._proto(tx.conn, new)

    def accept(self, req: pb.AcceptQuoteRequest, principal: Principal) -> pb.Quote:
        qid = QUOTE.parse(req.name).id
        order_date = to_date(req.order_date, "order_date") or today()
        with self.uow.begin() as tx:
            row = self._read(tx.conn, qid, principal, lock=True)
            if row.state == "accepted":
                raise FailedPrecondition(
                    f"{req.name} was accepted already; its order is orders/{row.order_id}",
                    reason="QUOTE_ALREADY_ACCEPTED",
                    metadata={"name": req.name, "order": f"orders/{row.order_id}", "rule": "QUOTE_ALREADY_ACCEPTED"},
                )
            if row.state != "sent":
                raise _not_state(req.name, row.state, "QUOTE_NOT_SENT", "only a sent quote is accepted")
            check_etag(req.etag, row.version, req.name)
            if row.v_valid_until < today():
                raise _not_state(req.name, "expired", "QUOTE_EXPIRED", f"valid_until {row.v_valid_until} has passed")
            key = (str(qid), row.latest_version)
            order, _ = place_order(
                tx,
                customer_id=row.customer_id,
                owner_id=row.owner_id,
                team_id=str(row.team_id) if row.team_id else None,
                currency=row.currency_code,
                order_date=order_date,
                lines=_stored_lines(_lines(tx.conn, [key])[key]),
                principal=principal,
                opportunity_id=str(row.opportunity_id),
                quote_id=str(qid),
            )
            new = self._set_state(tx, row, "accepted", order_id=order.id, close_time=sa.func.now())
            timers.cancel(tx.conn, EXPIRE, qid)
            tx.publish("quote.accepted.v1", self._event(tx.conn, new), req.name)
            tx.audit(
                req.name,
                "accept",
                principal,
                [
                    _state_change("sent", "accepted"),
                    {"field": "order", "old_value": "null", "new_value": audit.value(f"orders/{order.id}")},
                ],
            )
            return self._proto(tx.conn, new)

    def reject(self, req: pb.RejectQuoteRequest, principal: Principal) -> pb.Quote:
        qid = QUOTE.parse(req.name).id
        reason = req.reason.strip()
        if len(reason) > 1000:
            raise InvalidArgument.field("reason", "at most 1000 characters")
        with self.uow.begin() as tx:
            row = self._read(tx.conn, qid, principal, lock=True)
            if row.state != "sent":
                raise _not_state(req.name, row.state, "QUOTE_NOT_SENT", "only a sent quote is rejected")
            check_etag(req.etag, row.version, req.name)
            new = self._set_state(tx, row, "rejected", reject_reason=reason, close_time=sa.func.now())
            timers.cancel(tx.conn, EXPIRE, qid)
            tx.publish("quote.rejected.v1", self._event(tx.conn, new), req.name)
            changes = [_state_change("sent", "rejected")]
            if reason:
                changes.append({"field": "reject_reason", "old_value": "null", "new_value": audit.value(reason)})
            tx.audit(req.name, "reject", principal, changes)
            return self._proto(tx.conn, new)

    def expire(self, conn: sa.Connection, timer) -> None:
        """Timer quote.expire: a quote still sent after its valid_until day is expired."""
        row = conn.execute(_select().where(quotes.c.id == timer.key).with_for_update(of=quotes)).one_or_none()
        if row is None or row.state != "sent" or row.v_valid_until >= dates.today():
            return
        with self.uow.joined(conn) as tx:
            new = self._set_state(tx, row, "expired", close_time=sa.func.now())
            name = QUOTE.format(row.id)
            tx.publish("quote.expired.v1", self._event(conn, new), name)
            tx.audit(name, "expire", "system:quote.expire", [_state_change("sent", "expired")])

    # -- the PDF ---------------------------------------------------------------------------
    def pdf(self, req: pb.RenderQuotePdfRequest, principal: Principal):
        qid = QUOTE.parse(req.name).id
        if req.quote_version < 0:
            raise InvalidArgument.field("quote_version", "must not be negative")
        with self.uow.read() as conn:
            row = self._read(conn, qid, principal, version=req.quote_version or None)
            key = (str(qid), row.v_quote_version)
            lines = _lines(conn, [key])[key]
            doc = quote_pdf.document(conn, row, lines)
        name = f"{row.number}-v{row.v_quote_version}"
        return quote_pdf.stream(pb.RenderQuotePdfResponse, doc, name)


def _state_change(old: str, new: str) -> dict:
    return {"field": "state", "old_value": audit.value(old), "new_value": audit.value(new)}


class QuoteServicer(quotes_pb2_grpc.QuoteServiceServicer):
    def __init__(self, quotes_: Quotes):
        self.q = quotes_

    def CreateQuote(self, request, context):
        return self.q.create(request, current_principal())

    def GetQuote(self, request, context):
        return self.q.get(request.name, current_principal())

    def ListQuotes(self, request, context):
        return self.q.list(request, current_principal())

    def UpdateQuote(self, request, context):
        return self.q.update(request, current_principal())

    def ReviseQuote(self, request, context):
        return self.q.revise(request, current_principal())

    def GetQuoteVersion(self, request, context):
        return self.q.get_version(request.name, current_principal())

    def ListQuoteVersions(self, request, context):
        return self.q.list_versions(request.parent, current_principal())

    def SendQuote(self, request, context):
        return self.q.send(request, current_principal())

    def AcceptQuote(self, request, context):
        return self.q.accept(request, current_principal())

    def RejectQuote(self, request, context):
        return self.q.reject(request, current_principal())

    def RenderQuotePdf(self, request, context):
        yield from self.q.pdf(request, current_principal())


def _quotes(sales: Sales) -> Quotes:
    return sales.once("quotes", lambda: Quotes(sales))


def registration(sales: Sales) -> Registration:
    return Registration.of(QuoteServicer(_quotes(sales)))


def timer_handlers(sales: Sales) -> None:
    sales.timers.register(EXPIRE, _quotes(sales).expire)
