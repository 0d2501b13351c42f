"""Product lines, products, price lists and their items, and prices (CatalogService).

`price_for` and `line_amounts` are what the opportunity, quote, order and invoice parts call to
price a line: the same tier, discount, tax and rounding as GetPrice answers."""

from __future__ import annotations

import datetime as dt
import decimal
from decimal import Decimal
from typing import NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from crm.sales.v1 import catalog_pb2 as pb
from crm_chassis import audit, dates, money, persian
from crm_chassis.auth import Principal
from crm_chassis.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from crm_chassis.filtering import FieldType, FilterField, FilterSchema, Prefix, column_condition, keyset_page
from crm_chassis.pagination import PageTokens, page_size
from crm_chassis.resources import Updatable, UpdateMask, check_etag, etag, required_text, text

from .catalog_common import (
    CODE,
    PRICE_LIST,
    PRODUCT,
    PRODUCT_LINE,
    check_request_id,
    claim_request,
    date_to_proto,
    date_value,
    decimal_text,
    decimal_value,
    delete_unreferenced,
    insert_unique,
    list_page,
    name_or_none,
    record_request,
    reference_filter,
    sqlstate,
    ts,
)
from .runtime import Sales
from .tables import QUANTITY, UUID, price_list_items, price_lists, product_lines, products

# Iran's standard VAT rate: 10 % from the start of 1403 (20 March 2024), up from 9 %, as the
# Iranian National Tax Administration announced it (checked December 2026: the sources at hand show
# no later change; confirm it each fiscal year). A product's own tax_rate overrides it; a product
# created without one gets this. Change it here (and products.tax_rate's server default) if the
# law changes: existing products keep the rate they were given.
DEFAULT_TAX_RATE = Decimal("10")
MAX_ITEMS = 10_000
MAX_QUANTITY = Decimal("1e14")  # QUANTITY is NUMERIC(20, 6)
MAX_AMOUNT = Decimal("1e18")  # below Money's int64 units and MONEY's NUMERIC(28, 9)
HUNDRED = Decimal(100)
PERCENT_PLACES = Decimal("0.0001")


def _code(value: str, where: str) -> str:
    v = (value or "").strip().lower()
    if not CODE.fullmatch(v):
        raise InvalidArgument.field(where, "must be 1-40 of a-z, 0-9, '_' or '-'")
    return v


def _percent(where_default: Decimal | None = None):
    def convert(value: str, where: str) -> Decimal:
        v = decimal_value(value, where, default=where_default, high=HUNDRED, what="a percentage such as 9 or 10.5")
        return v.quantize(PERCENT_PLACES)  # as stored (NUMERIC(7, 4)): no change seen where there is none

    return convert


def _line_ref(value: str, where: str) -> str | None:
    return name_or_none(PRODUCT_LINE, value, where)


def _search_name(name: str, sku: str) -> str:
    """The name filter's key: the normalised name, a tab, the normalised SKU."""
    return f"{persian.normalize(name)}\t{persian.normalize(sku)}"


today = dates.today  # the business day prices are asked for


# -- protos ------------------------------------------------------------------------------------


def product_line_to_proto(row) -> pb.ProductLine:
    return pb.ProductLine(
        name=PRODUCT_LINE.format(row.id),
        code=row.code,
        display_name=row.name,
        description=row.description,
        active=row.active,
        create_time=ts(row.create_time),
        update_time=ts(row.update_time),
        etag=etag(row.version),
    )


def product_to_proto(row) -> pb.Product:
    return pb.Product(
        name=PRODUCT.format(row.id),
        sku=row.sku,
        display_name=row.name,
        product_line=PRODUCT_LINE.format(row.product_line_id) if row.product_line_id else "",
        unit=row.unit,
        tax_rate=decimal_text(row.tax_rate),
        description=row.description,
        active=row.active,
        create_time=ts(row.create_time),
        update_time=ts(row.update_time),
        etag=etag(row.version),
    )


def price_list_to_proto(row, item_count: int) -> pb.PriceList:
    return pb.PriceList(
        name=PRICE_LIST.format(row.id),
        display_name=row.name,
        currency_code=row.currency_code,
        valid_from=date_to_proto(row.valid_from),
        valid_to=date_to_proto(row.valid_to),
        is_default=row.is_default,
        active=row.active,
        item_count=item_count,
        create_time=ts(row.create_time),
        update_time=ts(row.update_time),
        etag=etag(row.version),
    )


def item_to_proto(row, currency: str) -> pb.PriceListItem:
    return pb.PriceListItem(
        product=PRODUCT.format(row.product_id),
        min_quantity=decimal_text(row.min_quantity),
        unit_price=money.to_money(row.unit_price, currency),
        discount_percent=decimal_text(row.discount_percent),
    )


# -- declared updates --------------------------------------------------------------------------

NOW = {"update_time": sa.func.now()}
PRODUCT_LINES = Updatable(
    product_lines,
    PRODUCT_LINE,
    UpdateMask(["code", "display_name", "description", "active"]),
    message_field="product_line",
    convert={"code": _code, "display_name": required_text(200), "description": text(5000)},
    columns={"display_name": "name"},
    touch=NOW,
    conflict="a product line with that code already exists",
)
PRODUCTS = Updatable(
    products,
    PRODUCT,
    UpdateMask(["sku", "display_name", "product_line", "unit", "tax_rate", "description", "active"]),
    message_field="product",
    convert={
        "sku": required_text(64),
        "display_name": required_text(200),
        "product_line": _line_ref,
        "unit": lambda v, where: text(40)(v, where) or "unit",
        "tax_rate": _percent(DEFAULT_TAX_RATE),
        "description": text(5000),
    },
    columns={"display_name": "name", "product_line": "product_line_id"},
    touch=NOW,
    conflict="a product with that SKU already exists",
)


def _price_list_dates(value, where):
    return date_value(value, where)


PRICE_LISTS = Updatable(
    price_lists,
    PRICE_LIST,
    UpdateMask(["display_name", "currency_code", "valid_from", "valid_to", "is_default", "active"]),
    message_field="price_list",
    convert={
        "display_name": required_text(200),
        "currency_code": lambda v, where: money.check_currency((v or "").strip(), where),
        "valid_from": _price_list_dates,
        "valid_to": _price_list_dates,
    },
    columns={"display_name": "name"},
    touch=NOW,
    conflict="a price list with that name already exists",
)

LINE_FILTERS = FilterSchema(
    FilterField("code", product_lines.c.code),
    FilterField("display_name", product_lines.c.name),
    FilterField("active", product_lines.c.active, FieldType.BOOL),
    FilterField("create_time", product_lines.c.create_time, FieldType.TIMESTAMP),
)
LINE_SORT = {
    "code": product_lines.c.code,
    "display_name": product_lines.c.name,
    "create_time": product_lines.c.create_time,
}


def _name_filter(op: str, value):
    """`name = "لپ*"`: a word of the name, or the SKU, starts with it; `name = "Laptop"`: the
    whole name; `name : "تاپ"`: the name or SKU contains it. Compared as persian.normalize'd
    text, so Persian and Arabic letter variants and case do not matter."""
    if value is None:
        raise ValueError("a product always has a name")
    key = persian.normalize(str(value))
    if not key:
        raise ValueError("give some text")
    escaped = key.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    col = products.c.search_name
    if op == ":":
        cond = col.like(f"%{escaped}%", escape="\\")
    elif isinstance(value, Prefix):
        cond = sa.or_(*(col.like(f"{start}{escaped}%", escape="\\") for start in ("", "% ", "%\t")))
    else:
        cond = col.like(f"{escaped}\t%", escape="\\")
    if op == "!=":
        return sa.not_(sa.func.coalesce(cond, sa.false()))
    return cond


PRODUCT_FILTERS = FilterSchema(
    FilterField("product_line", reference_filter(products.c.product_line_id, PRODUCT_LINE)),
    FilterField("active", products.c.active, FieldType.BOOL),
    FilterField("name", _name_filter, operators=frozenset({"=", "!=", ":"})),
    FilterField("sku", products.c.sku),
    FilterField("unit", products.c.unit),
    FilterField("create_time", products.c.create_time, FieldType.TIMESTAMP),
)
PRODUCT_SORT = {"sku": products.c.sku, "display_name": products.c.name, "create_time": products.c.create_time}

PRICE_LIST_FILTERS = FilterSchema(
    FilterField("display_name", price_lists.c.name),
    FilterField("currency_code", price_lists.c.currency_code),
    FilterField("is_default", price_lists.c.is_default, FieldType.BOOL),
    FilterField("active", price_lists.c.active, FieldType.BOOL),
    FilterField("valid_from", price_lists.c.valid_from, FieldType.DATE),
    FilterField("valid_to", price_lists.c.valid_to, FieldType.DATE),
    FilterField("create_time", price_lists.c.create_time, FieldType.TIMESTAMP),
)
PRICE_LIST_SORT = {
    "display_name": price_lists.c.name,
    "valid_from": price_lists.c.valid_from,
    "create_time": price_lists.c.create_time,
}
ITEM_FILTERS = FilterSchema(
    FilterField(
        "product",
        lambda op, value: column_condition(
            price_list_items.c.product_id, op, PRODUCT.parse(str(value), "filter").id if value else None
        ),
        operators=frozenset({"=", "!="}),
    ),
)


def _item_count(conn, price_list_id: str) -> int:
    return conn.execute(
        sa.select(sa.func.count())
        .select_from(price_list_items)
        .where(price_list_items.c.price_list_id == price_list_id)
    ).scalar_one()


class Pricing(NamedTuple):
    """A product's price for a quantity: what `price_for` returns and a little more."""

    unit_price: Decimal
    discount_percent: Decimal
    currency: str
    tax_rate: Decimal
    price_list_id: str
    min_quantity: Decimal
    on: dt.date


class LineAmounts(NamedTuple):
    gross: Decimal  # quantity × unit price
    discount: Decimal
    net: Decimal  # gross − discount: the line amount before tax
    tax: Decimal
    total: Decimal  # net + tax


def line_amounts(
    quantity: Decimal, unit_price: Decimal, discount_percent: Decimal, tax_rate: Decimal, currency: str
) -> LineAmounts:
    """A line's amounts, each rounded to the currency's minor unit (half to even): gross =
    quantity × unit price; discount = gross × discount %; net = gross − discount; tax = net ×
    tax rate %; total = net + tax. The parts add up exactly. A line beyond what a Money holds
    is INVALID_ARGUMENT on `quantity`."""
    with decimal.localcontext(prec=60):
        raw = Decimal(quantity) * Decimal(unit_price)
    if abs(raw) >= MAX_AMOUNT:
        raise InvalidArgument.field("quantity", f"the line amount ({raw:.0f}) is larger than an amount can be")
    gross = money.round_minor(raw, currency)
    discount = money.round_minor(gross * Decimal(discount_percent) / HUNDRED, currency)
    net = gross - discount
    tax = money.round_minor(net * Decimal(tax_rate) / HUNDRED, currency)
    return LineAmounts(gross, discount, net, tax, net + tax)


def pricing(
    conn: sa.Connection,
    product_id: str,
    quantity: Decimal,
    price_list_id: str | None = None,
    on: dt.date | None = None,
) -> Pricing:
    """The price of `quantity` of a product on a day (today in Asia/Tehran by default): from
    `price_list_id`, or the default price list valid that day; the tier with the largest
    min_quantity not above `quantity`. NOT_FOUND (PRODUCT_NOT_FOUND, PRICE_LIST_NOT_FOUND,
    PRICE_NOT_FOUND) or FAILED_PRECONDITION (PRODUCT_INACTIVE, PRICE_LIST_INACTIVE,
    PRICE_LIST_NOT_VALID, NO_DEFAULT_PRICE_LIST, QUANTITY_BELOW_MINIMUM) when there is none."""
    on = on or today()
    quantity = Decimal(quantity)
    if quantity <= 0:
        raise InvalidArgument.field("quantity", "must be greater than 0")
    product = conn.execute(
        sa.select(products.c.id, products.c.active, products.c.tax_rate).where(products.c.id == product_id)
    ).one_or_none()
    if product is None:
        raise PRODUCT.not_found([product_id])
    pname = PRODUCT.format(product_id)
    if not product.active:
        raise FailedPrecondition(
            f"{pname} is inactive: it is not priced for new deals", reason="PRODUCT_INACTIVE", metadata={"name": pname}
        )
    valid = sa.and_(
        sa.or_(price_lists.c.valid_from.is_(None), price_lists.c.valid_from <= on),
        sa.or_(price_lists.c.valid_to.is_(None), price_lists.c.valid_to >= on),
    )
    if price_list_id:
        pl = conn.execute(
            sa.select(price_lists, valid.label("valid")).where(price_lists.c.id == price_list_id)
        ).one_or_none()
        if pl is None:
            raise PRICE_LIST.not_found([price_list_id])
        lname = PRICE_LIST.format(price_list_id)
        if not pl.active:
            raise FailedPrecondition(f"{lname} is inactive", reason="PRICE_LIST_INACTIVE", metadata={"name": lname})
        if not pl.valid:
            period = f"{pl.valid_from or '…'} to {pl.valid_to or '…'}"
            raise FailedPrecondition(
                f"{lname} is valid from {period}, not on {on.isoformat()}",
                reason="PRICE_LIST_NOT_VALID",
                metadata={"name": lname, "date": on.isoformat()},
            )
    else:
        pl = conn.execute(
            sa.select(price_lists).where(price_lists.c.is_default, price_lists.c.active, valid).limit(1)
        ).one_or_none()
        if pl is None:
            raise FailedPrecondition(
                f"no default price list is valid on {on.isoformat()}; name a price list or make one the default",
                reason="NO_DEFAULT_PRICE_LIST",
                metadata={"date": on.isoformat()},
            )
        lname = PRICE_LIST.format(pl.id)
    item = conn.execute(
        sa.select(price_list_items)
        .where(
            price_list_items.c.price_list_id == pl.id,
            price_list_items.c.product_id == product_id,
            price_list_items.c.min_quantity <= quantity,
        )
        .order_by(price_list_items.c.min_quantity.desc())
        .limit(1)
    ).one_or_none()
    if item is None:
        smallest = conn.execute(
            sa.select(sa.func.min(price_list_items.c.min_quantity)).where(
                price_list_items.c.price_list_id == pl.id, price_list_items.c.product_id == product_id
            )
        ).scalar()
        if smallest is None:
            raise NotFound(
                f"{lname} has no price for {pname}",
                reason="PRICE_NOT_FOUND",
                metadata={"product": pname, "price_list": lname},
            )
        raise FailedPrecondition(
            f"{lname} prices {pname} from a quantity of {decimal_text(smallest)}, not {decimal_text(quantity)}",
            reason="QUANTITY_BELOW_MINIMUM",
            metadata={"product": pname, "price_list": lname, "min_quantity": decimal_text(smallest)},
        )
    return Pricing(
        unit_price=item.unit_price,
        discount_percent=item.discount_percent,
        currency=pl.currency_code,
        tax_rate=product.tax_rate,
        price_list_id=str(pl.id),
        min_quantity=item.min_quantity,
        on=on,
    )


def price_for(
    conn: sa.Connection,
    product_id: str,
    quantity: Decimal,
    price_list_id: str | None = None,
    on: dt.date | None = None,
) -> tuple[Decimal, Decimal, str, Decimal]:
    """(unit_price, discount_percent, currency, tax_rate) of `quantity` of a product: for the
    opportunity and quote parts. See `pricing` for the rules and errors; `line_amounts` turns
    them into a line's gross, discount, net, tax and total."""
    p = pricing(conn, product_id, quantity, price_list_id, on)
    return p.unit_price, p.discount_percent, p.currency, p.tax_rate


class ProductCatalog:
    def __init__(self, sales: Sales, tokens: PageTokens):
        self.sales = sales
        self.uow = sales.uow
        self.tokens = tokens

    # -- product lines ---------------------------------------------------------------------
    def create_product_line(self, m: pb.ProductLine, request_id: str, principal: Principal) -> pb.ProductLine:
        check_request_id(request_id)
        bad = []
        values = {}
        for key, path, conv in (
            ("code", "code", _code),
            ("name", "display_name", required_text(200)),
            ("description", "description", text(5000)),
        ):
            try:
                values[key] = conv(getattr(m, path), f"product_line.{path}")
            except InvalidArgument as e:
                bad += e.violations
        if bad:
            raise InvalidArgument(bad)
        with self.uow.begin() as tx:
            owned, existing = claim_request(tx.conn, "product_line", request_id)
            if not owned:
                return self._get_line(tx.conn, existing)
            row = insert_unique(
                tx.conn,
                product_lines.insert().values(**values).returning(*product_lines.c),
                "a product line with that code already exists",
                {"code": values["code"]},
            )
            record_request(tx.conn, "product_line", request_id, row.id)
            out = product_line_to_proto(row)
            tx.publish("product_line.created.v1", pb.ProductLineEvent(product_line=out), out.name)
            tx.audit(out.name, "product_line.create", principal, _created(values))
        return out

    def _get_line(self, conn, line_id: str) -> pb.ProductLine:
        row = conn.execute(sa.select(product_lines).where(product_lines.c.id == line_id)).one_or_none()
        if row is None:
            raise PRODUCT_LINE.not_found([line_id])
        return product_line_to_proto(row)

    def get_product_line(self, name: str) -> pb.ProductLine:
        lid = PRODUCT_LINE.parse(name).id
        with self.uow.read() as conn:
            return self._get_line(conn, lid)

    def list_product_lines(self, r: pb.ListProductLinesRequest) -> pb.ListProductLinesResponse:
        with self.uow.read() as conn:
            rows, nxt = list_page(
                conn,
                self.tokens,
                "productLines",
                sa.select(product_lines),
                LINE_FILTERS,
                LINE_SORT,
                "code",
                product_lines.c.id,
                r.page_size,
                r.page_token,
                r.filter,
                r.order_by,
            )
        return pb.ListProductLinesResponse(product_lines=[product_line_to_proto(x) for x in rows], next_page_token=nxt)

    def update_product_line(self, m: pb.ProductLine, mask, principal: Principal) -> pb.ProductLine:
        with self.uow.begin() as tx:
            done = PRODUCT_LINES.update(tx.conn, m, mask)
            out = product_line_to_proto(done.row)
            if done.changes:
                tx.publish(
                    "product_line.updated.v1",
                    pb.ProductLineEvent(product_line=out, changed_fields=[c.field for c in done.changes]),
                    out.name,
                )
                tx.audit(out.name, "product_line.update", principal, done.audit_changes())
        return out

    def delete_product_line(self, name: str, given_etag: str, principal: Principal) -> None:
        lid = PRODUCT_LINE.parse(name).id
        with self.uow.begin() as tx:
            row = tx.conn.execute(
                sa.select(product_lines).where(product_lines.c.id == lid).with_for_update()
            ).one_or_none()
            if row is None:
                raise PRODUCT_LINE.not_found(name)
            check_etag(given_etag, row.version, name)
            delete_unreferenced(tx.conn, product_lines, lid, name, "product_line")
            tx.publish("product_line.deleted.v1", pb.ProductLineEvent(product_line=product_line_to_proto(row)), name)
            tx.audit(name, "product_line.delete", principal, [])

    # -- products --------------------------------------------------------------------------
    def _check_line(self, conn, line_id: str | None, where: str) -> None:
        if line_id and conn.execute(sa.select(product_lines.c.id).where(product_lines.c.id == line_id)).first() is None:
            raise InvalidArgument.field(where, f"no such product line: {PRODUCT_LINE.format(line_id)}")

    def create_product(self, m: pb.Product, request_id: str, principal: Principal) -> pb.Product:
        check_request_id(request_id)
        paths = [p for p in PRODUCTS.mask.updatable if p != "active"]
        values = PRODUCTS.mask.apply(m, paths, prefix="product", convert=PRODUCTS.convert)
        row_values = {PRODUCTS.columns.get(k, k): v for k, v in values.items()}
        row_values["search_name"] = _search_name(row_values["name"], row_values["sku"])
        with self.uow.begin() as tx:
            owned, existing = claim_request(tx.conn, "product", request_id)
            if not owned:
                return self._get_product(tx.conn, existing)
            self._check_line(tx.conn, row_values["product_line_id"], "product.product_line")
            row = insert_unique(
                tx.conn,
                products.insert().values(**row_values).returning(*products.c),
                "a product with that SKU already exists",
                {"sku": row_values["sku"]},
            )
            record_request(tx.conn, "product", request_id, row.id)
            out = product_to_proto(row)
            tx.publish("product.created.v1", pb.ProductEvent(product=out), out.name)
            tx.audit(out.name, "product.create", principal, _created(values))
        return out

    def _get_product(self, conn, pid: str) -> pb.Product:
        row = conn.execute(sa.select(products).where(products.c.id == pid)).one_or_none()
        if row is None:
            raise PRODUCT.not_found([pid])
        return product_to_proto(row)

    def get_product(self, name: str) -> pb.Product:
        pid = PRODUCT.parse(name).id
        with self.uow.read() as conn:
            return self._get_product(conn, pid)

    def list_products(self, r: pb.ListProductsRequest) -> pb.ListProductsResponse:
        with self.uow.read() as conn:
            rows, nxt = list_page(
                conn,
                self.tokens,
                "products",
                sa.select(products),
                PRODUCT_FILTERS,
                PRODUCT_SORT,
                "sku",
                products.c.id,
                r.page_size,
                r.page_token,
                r.filter,
                r.order_by,
            )
        return pb.ListProductsResponse(products=[product_to_proto(x) for x in rows], next_page_token=nxt)

    def update_product(self, m: pb.Product, mask, principal: Principal) -> pb.Product:
        paths = PRODUCTS.mask.paths(mask)
        with self.uow.begin() as tx:
            if "product_line" in paths:
                self._check_line(tx.conn, _line_ref(m.product_line, "product.product_line"), "product.product_line")
            done = PRODUCTS.update(tx.conn, m, paths)
            row = done.row
            fields = [c.field for c in done.changes]
            if {"sku", "display_name"} & set(fields):
                row = tx.conn.execute(
                    products.update()
                    .where(products.c.id == row.id)
                    .values(search_name=_search_name(row.name, row.sku))
                    .returning(*products.c)
                ).one()
            out = product_to_proto(row)
            if fields:
                tx.publish("product.updated.v1", pb.ProductEvent(product=out, changed_fields=fields), out.name)
                tx.audit(out.name, "product.update", principal, done.audit_changes())
        return out

    def delete_product(self, name: str, given_etag: str, principal: Principal) -> None:
        pid = PRODUCT.parse(name).id
        with self.uow.begin() as tx:
            row = tx.conn.execute(sa.select(products).where(products.c.id == pid).with_for_update()).one_or_none()
            if row is None:
                raise PRODUCT.not_found(name)
            check_etag(given_etag, row.version, name)
            delete_unreferenced(tx.conn, products, pid, name, "product")
            tx.publish("product.deleted.v1", pb.ProductEvent(product=product_to_proto(row)), name)
            tx.audit(name, "product.delete", principal, [])

    # -- prices ----------------------------------------------------------------------------
    def get_price(self, r: pb.GetPriceRequest) -> pb.ProductPrice:
        pid = PRODUCT.parse(r.product, "product").id
        list_id = name_or_none(PRICE_LIST, r.price_list, "price_list")
        quantity = decimal_value(
            r.quantity, "quantity", default=Decimal(1), positive=True, high=MAX_QUANTITY, places=6, what="a quantity"
        )
        on = None
        if r.date.strip():
            try:
                on = persian.parse_date(r.date.strip())
            except ValueError as e:
                raise InvalidArgument.field("date", f"{e}; use YYYY-MM-DD or a Jalali YYYY/MM/DD") from None
        with self.uow.read() as conn:
            p = pricing(conn, pid, quantity, list_id, on)
        a = line_amounts(quantity, p.unit_price, p.discount_percent, p.tax_rate, p.currency)
        cur = p.currency
        return pb.ProductPrice(
            product=PRODUCT.format(pid),
            price_list=PRICE_LIST.format(p.price_list_id),
            quantity=decimal_text(quantity),
            min_quantity=decimal_text(p.min_quantity),
            unit_price=money.to_money(p.unit_price, cur),
            discount_percent=decimal_text(p.discount_percent),
            gross_amount=money.to_money(a.gross, cur),
            discount_amount=money.to_money(a.discount, cur),
            net_amount=money.to_money(a.net, cur),
            tax_rate=decimal_text(p.tax_rate),
            tax_amount=money.to_money(a.tax, cur),
            total_amount=money.to_money(a.total, cur),
            date=date_to_proto(p.on),
            total_text=money.format_amount(a.total, cur),
            total_text_fa=money.format_amount(a.total, cur, persian_digits=True),
        )

    # -- price lists -----------------------------------------------------------------------
    def _overlapping_default(self, conn, list_id: str | None, start, end) -> str | None:
        """Another active default price list whose period meets [start, end], if any."""
        q = sa.select(price_lists.c.id, price_lists.c.name).where(price_lists.c.is_default, price_lists.c.active)
        if end is not None:  # [a, b] and [start, end] meet when a <= end and b >= start (None: open)
            q = q.where(sa.or_(price_lists.c.valid_from.is_(None), price_lists.c.valid_from <= end))
        if start is not None:
            q = q.where(sa.or_(price_lists.c.valid_to.is_(None), price_lists.c.valid_to >= start))
        if list_id:
            q = q.where(price_lists.c.id != list_id)
        row = conn.execute(q.limit(1)).first()
        return None if row is None else f"{PRICE_LIST.format(row.id)} ({row.name})"

    def _check_price_list(self, conn, list_id: str | None, v: dict, given=("valid_to",)) -> None:
        if v["valid_from"] and v["valid_to"] and v["valid_from"] > v["valid_to"]:
            if "valid_to" not in given and "valid_from" in given:
                raise InvalidArgument.field("price_list.valid_from", f"must not be after valid_to ({v['valid_to']})")
            raise InvalidArgument.field("price_list.valid_to", "must not be before valid_from")
        if v["is_default"] and v["active"]:
            other = self._overlapping_default(conn, list_id, v["valid_from"], v["valid_to"])
            if other:
                raise FailedPrecondition(
                    f"the default price list {other} is valid in the same period: default lists must not "
                    "overlap in time (end its period, or make this one not the default)",
                    reason="DEFAULT_PRICE_LISTS_OVERLAP",
                    metadata={"conflicts_with": other.split(" ", 1)[0]},
                )

    def create_price_list(self, m: pb.PriceList, request_id: str, principal: Principal) -> pb.PriceList:
        check_request_id(request_id)
        paths = ["display_name", "currency_code", "valid_from", "valid_to", "is_default"]
        values = PRICE_LISTS.mask.apply(m, paths, prefix="price_list", convert=PRICE_LISTS.convert)
        values["active"] = True
        row_values = {PRICE_LISTS.columns.get(k, k): v for k, v in values.items()}
        with self.uow.begin() as tx:
            owned, existing = claim_request(tx.conn, "price_list", request_id)
            if not owned:
                return self._get_price_list(tx.conn, existing)
            self._check_price_list(tx.conn, None, values)
            row = self._write_list(
                tx.conn,
                price_lists.insert().values(**row_values).returning(*price_lists.c),
            )
            record_request(tx.conn, "price_list", request_id, row.id)
            out = price_list_to_proto(row, 0)
            tx.publish("price_list.created.v1", pb.PriceListEvent(price_list=out), out.name)
            tx.audit(out.name, "price_list.create", principal, _created(values))
        return out

    def _write_list(self, conn, stmt):
        try:
            return insert_unique(conn, stmt, "a price list with that name already exists")
        except sa.exc.IntegrityError as exc:
            if sqlstate(exc) == "23P01":  # a concurrent default list took the period first
                raise FailedPrecondition(
                    "another default price list is valid in the same period", reason="DEFAULT_PRICE_LISTS_OVERLAP"
                ) from None
            raise

    def _get_price_list(self, conn, list_id: str) -> pb.PriceList:
        row = conn.execute(sa.select(price_lists).where(price_lists.c.id == list_id)).one_or_none()
        if row is None:
            raise PRICE_LIST.not_found([list_id])
        return price_list_to_proto(row, _item_count(conn, list_id))

    def get_price_list(self, name: str) -> pb.PriceList:
        lid = PRICE_LIST.parse(name).id
        with self.uow.read() as conn:
            return self._get_price_list(conn, lid)

    def list_price_lists(self, r: pb.ListPriceListsRequest) -> pb.ListPriceListsResponse:
        count = (
            sa.select(sa.func.count())
            .select_from(price_list_items)
            .where(price_list_items.c.price_list_id == price_lists.c.id)
            .scalar_subquery()
            .label("item_count")
        )
        with self.uow.read() as conn:
            rows, nxt = list_page(
                conn,
                self.tokens,
                "priceLists",
                sa.select(*price_lists.c, count),
                PRICE_LIST_FILTERS,
                PRICE_LIST_SORT,
                "display_name",
                price_lists.c.id,
                r.page_size,
                r.page_token,
                r.filter,
                r.order_by,
            )
        return pb.ListPriceListsResponse(
            price_lists=[price_list_to_proto(x, x.item_count) for x in rows], next_page_token=nxt
        )

    def update_price_list(self, m: pb.PriceList, mask, principal: Principal) -> pb.PriceList:
        paths = PRICE_LISTS.mask.paths(mask)
        new = PRICE_LISTS.mask.apply(m, paths, prefix="price_list", convert=PRICE_LISTS.convert)
        with self.uow.begin() as tx:
            conn = tx.conn

            def check(row) -> None:
                merged = {
                    "valid_from": row.valid_from,
                    "valid_to": row.valid_to,
                    "is_default": row.is_default,
                    "active": row.active,
                    **new,
                }
                self._check_price_list(conn, row.id, merged, given=new)
                if new.get("currency_code", row.currency_code) != row.currency_code and _item_count(conn, row.id):
                    raise FailedPrecondition(
                        f"{m.name} has items priced in {row.currency_code}: its currency cannot change "
                        "(create a price list in the new currency instead)",
                        reason="PRICE_LIST_HAS_ITEMS",
                        metadata={"name": m.name},
                    )

            try:
                done = PRICE_LISTS.update(conn, m, paths, check=check)
            except sa.exc.IntegrityError as exc:
                if sqlstate(exc) != "23P01":
                    raise
                raise FailedPrecondition(
                    "another default price list is valid in the same period", reason="DEFAULT_PRICE_LISTS_OVERLAP"
                ) from None
            out = price_list_to_proto(done.row, _item_count(conn, done.row.id))
            if done.changes:
                tx.publish(
                    "price_list.updated.v1",
                    pb.PriceListEvent(price_list=out, changed_fields=[c.field for c in done.changes]),
                    out.name,
                )
                tx.audit(out.name, "price_list.update", principal, done.audit_changes())
        return out

    def delete_price_list(self, name: str, given_etag: str, principal: Principal) -> None:
        lid = PRICE_LIST.parse(name).id
        with self.uow.begin() as tx:
            row = tx.conn.execute(sa.select(price_lists).where(price_lists.c.id == lid).with_for_update()).one_or_none()
            if row is None:
                raise PRICE_LIST.not_found(name)
            check_etag(given_etag, row.version, name)
            out = price_list_to_proto(row, _item_count(tx.conn, lid))
            delete_unreferenced(tx.conn, price_lists, lid, name, "price_list")
            tx.publish("price_list.deleted.v1", pb.PriceListEvent(price_list=out), name)
            tx.audit(name, "price_list.delete", principal, [])

    # -- price list items ------------------------------------------------------------------
    def _items(self, items, currency: str) -> tuple[list[str], list[Decimal], list[Decimal], list[Decimal]]:
        """The items as four parallel arrays (product ids, minimum quantities, unit prices,
        discounts), every problem named by its index."""
        if len(items) > MAX_ITEMS:
            raise InvalidArgument.field("items", f"at most {MAX_ITEMS} items per call")
        bad: list[FieldViolation] = []
        pids, mins, prices, discounts = [], [], [], []
        seen: dict[tuple[str, Decimal], int] = {}
        for i, it in enumerate(items):
            where = f"items[{i}]"
            try:
                pid = PRODUCT.parse(it.product, f"{where}.product").id
                mq = decimal_value(
                    it.min_quantity,
                    f"{where}.min_quantity",
                    default=Decimal(1),
                    positive=True,
                    high=MAX_QUANTITY,
                    places=6,
                    what="a quantity",
                )
                if not it.HasField("unit_price"):
                    raise InvalidArgument.field(f"{where}.unit_price", "is required")
                price = money.to_decimal(it.unit_price, f"{where}.unit_price", currency=currency)
                if price < 0:
                    raise InvalidArgument.field(f"{where}.unit_price", "must not be negative")
                disc = decimal_value(
                    it.discount_percent,
                    f"{where}.discount_percent",
                    default=Decimal(0),
                    high=HUNDRED,
                    what="a percentage such as 5 or 12.5",
                )
            except InvalidArgument as e:
                bad += e.violations
                continue
            first = seen.setdefault((pid, mq), i)
            if first != i:
                bad.append(
                    FieldViolation(where, f"the same product and min_quantity as items[{first}]: give each tier once")
                )
                continue
            pids.append(pid)
            mins.append(mq)
            prices.append(price)
            discounts.append(disc)
        if bad:
            raise InvalidArgument(bad[:50])
        return pids, mins, prices, discounts

    def set_items(self, r: pb.SetPriceListItemsRequest, principal: Principal) -> pb.SetPriceListItemsResponse:
        lid = PRICE_LIST.parse(r.price_list, "price_list").id
        with self.uow.begin() as tx:
            conn = tx.conn
            row = conn.execute(sa.select(price_lists).where(price_lists.c.id == lid).with_for_update()).one_or_none()
            if row is None:
                raise PRICE_LIST.not_found(r.price_list)
            check_etag(r.etag, row.version, r.price_list)
            pids, mins, prices, discounts = self._items(r.items, row.currency_code)
            if pids:
                known = {
                    str(x)
                    for x in conn.execute(
                        sa.select(products.c.id).where(
                            products.c.id == sa.any_(sa.literal(sorted(set(pids)), pg.ARRAY(UUID)))
                        )
                    ).scalars()
                }
                missing = [
                    FieldViolation(f"items[{i}].product", f"no such product: {PRODUCT.format(p)}")
                    for i, p in enumerate(pids)
                    if p not in known
                ]
                if missing:
                    raise InvalidArgument(missing[:50])
            given = sa.select(
                sa.func.unnest(sa.literal(pids, pg.ARRAY(UUID))).label("product_id"),
                sa.func.unnest(sa.literal(mins, pg.ARRAY(QUANTITY))).label("min_quantity"),
                sa.func.unnest(sa.literal(prices, pg.ARRAY(price_list_items.c.unit_price.type))).label("unit_price"),
                sa.func.unnest(sa.literal(discounts, pg.ARRAY(price_list_items.c.discount_percent.type))).label(
                    "discount_percent"
                ),
            ).subquery("given")
            removed = 0
            if r.replace:
                removed = len(
                    conn.execute(
                        price_list_items.delete()
                        .where(
                            price_list_items.c.price_list_id == lid,
                            ~sa.exists().where(
                                given.c.product_id == price_list_items.c.product_id,
                                given.c.min_quantity == price_list_items.c.min_quantity,
                            ),
                        )
                        .returning(price_list_items.c.product_id)
                    ).all()
                )
            written = 0
            if pids:
                ins = pg.insert(price_list_items).from_select(
                    ["price_list_id", "product_id", "min_quantity", "unit_price", "discount_percent"],
                    sa.select(
                        sa.literal(lid, UUID),
                        given.c.product_id,
                        given.c.min_quantity,
                        given.c.unit_price,
                        given.c.discount_percent,
                    ),
                )
                ins = ins.on_conflict_do_update(
                    index_elements=["price_list_id", "product_id", "min_quantity"],
                    set_={"unit_price": ins.excluded.unit_price, "discount_percent": ins.excluded.discount_percent},
                    where=sa.or_(
                        price_list_items.c.unit_price != ins.excluded.unit_price,
                        price_list_items.c.discount_percent != ins.excluded.discount_percent,
                    ),
                )
                written = len(conn.execute(ins.returning(price_list_items.c.product_id)).all())
            if written or removed:
                row = conn.execute(
                    price_lists.update()
                    .where(price_lists.c.id == lid)
                    .values(version=price_lists.c.version + 1, update_time=sa.func.now())
                    .returning(*price_lists.c)
                ).one()
            out = price_list_to_proto(row, _item_count(conn, lid))
            if written or removed:
                tx.publish(
                    "price_list.updated.v1", pb.PriceListEvent(price_list=out, changed_fields=["items"]), out.name
                )
                tx.audit(
                    out.name,
                    "price_list.set_items",
                    principal,
                    [
                        audit.change("items_written", "null", audit.value(written)),
                        audit.change("items_removed", "null", audit.value(removed)),
                    ],
                )
        return pb.SetPriceListItemsResponse(price_list=out, written=written, removed=removed)

    def list_items(self, r: pb.ListPriceListItemsRequest) -> pb.ListPriceListItemsResponse:
        lid = PRICE_LIST.parse(r.parent, "parent").id
        t = price_list_items
        with self.uow.read() as conn:
            currency = conn.execute(sa.select(price_lists.c.currency_code).where(price_lists.c.id == lid)).scalar()
            if currency is None:
                raise PRICE_LIST.not_found(r.parent)
            rows, nxt = keyset_page(
                conn,
                sa.select(t).where(t.c.price_list_id == lid, ITEM_FILTERS.compile(r.filter)),
                [(t.c.product_id, False), (t.c.min_quantity, False)],
                self.tokens,
                f"items:{lid}:{r.filter.strip()}",
                page_size(r.page_size),
                r.page_token,
            )
        return pb.ListPriceListItemsResponse(items=[item_to_proto(x, currency) for x in rows], next_page_token=nxt)


def _created(values: dict) -> list[dict]:
    """The audit changes of a create: every field given, from null."""
    return [audit.change(k, "null", audit.value(v)) for k, v in values.items() if v not in (None, "")]
