"""What the catalog's use cases share: resource names, value readers that name the field they
refuse, request ids of creates, list pages, and deletes that refuse rows still referred to."""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal, InvalidOperation

import sqlalchemy as sa
from google.protobuf import timestamp_pb2
from sqlalchemy.dialects import postgresql as pg

from crm_chassis import dates
from crm_chassis.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from crm_chassis.filtering import (
    FilterSchema,
    keyset_page,
    parse_order_by,
    query_fingerprint,
    with_tiebreaker,
)
from crm_chassis.pagination import PageTokens, page_size
from crm_chassis.resources import ResourceName

from .tables import UUID, metadata

PRODUCT_LINE = ResourceName("productLines/{id}")
PRODUCT = ResourceName("products/{id}")
PRICE_LIST = ResourceName("priceLists/{id}")
PIPELINE = ResourceName("pipelines/{id}")
STAGE = ResourceName("pipelines/{pipeline_id}/stages/{stage_id}")

# Request ids of catalog creates (AIP-155): the same (kind, request_id) returns what the first
# call created. Kept beside the catalog rather than as a column of each core table.
catalog_requests = sa.Table(
    "catalog_requests",
    metadata,
    sa.Column("kind", sa.Text, primary_key=True),  # product_line | product | price_list | pipeline
    sa.Column("request_id", sa.Text, primary_key=True),
    sa.Column("resource_id", UUID),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

MAX_REQUEST_ID = 128


def ts(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


date_to_proto = dates.to_proto


def date_value(value, where: str) -> dt.date | None:
    """A crm.type.v1.Date (message or the dict an update mask reads) as a date; unset or all
    zero is None; an impossible day is INVALID_ARGUMENT on `where`."""
    if value is None:
        return None
    if not isinstance(value, dict):
        value = {"year": value.year, "month": value.month, "day": value.day}
    y, m, d = (int(value.get(k, 0)) for k in ("year", "month", "day"))
    if (y, m, d) == (0, 0, 0):
        return None
    try:
        return dt.date(y, m, d)
    except ValueError:
        raise InvalidArgument.field(where, f"{y:04d}-{m:02d}-{d:02d} is not a calendar date") from None


def decimal_value(
    text: str,
    where: str,
    *,
    default: Decimal | None = None,
    low: Decimal = Decimal(0),
    high: Decimal | None = None,
    places: int = 4,
    positive: bool = False,
    what: str = "a decimal number",
) -> Decimal:
    """A decimal string ("9", "10.5000", Persian digits too) within [low, high] with at most
    `places` decimals; empty gives `default` (or is required)."""
    from crm_chassis import persian

    raw = persian.to_ascii_digits((text or "").strip()).replace("٫", ".")
    if not raw:
        if default is None:
            raise InvalidArgument.field(where, f"is required: {what}")
        return default
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise InvalidArgument.field(where, f"{text!r} is not {what}") from None
    if not value.is_finite():
        raise InvalidArgument.field(where, f"{text!r} is not {what}")
    if positive and value <= 0:
        raise InvalidArgument.field(where, "must be greater than 0")
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f"at least {low}"
        raise InvalidArgument.field(where, f"must be {bound}, not {raw}")
    if value != value.quantize(Decimal(1).scaleb(-places), rounding="ROUND_DOWN"):
        raise InvalidArgument.field(where, f"at most {places} decimal places")
    return value


def decimal_text(value: Decimal) -> str:
    """A stored decimal without trailing zeros: Decimal('10.0000') -> '10', '2.500000' -> '2.5'."""
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def name_or_none(name: ResourceName, value: str, where: str) -> str | None:
    """The id in a reference field (`productLines/{id}`), or None when it is empty."""
    value = (value or "").strip()
    return name.parse(value, where).id if value else None


CODE = re.compile(r"[a-z0-9_-]{1,40}")


# -- request ids -------------------------------------------------------------------------------


def check_request_id(request_id: str) -> str:
    if len(request_id) > MAX_REQUEST_ID:
        raise InvalidArgument.field("request_id", f"must be at most {MAX_REQUEST_ID} characters")
    return request_id


def claim_request(conn: sa.Connection, kind: str, request_id: str) -> tuple[bool, str | None]:
    """(True, None) when this call owns the request id (or there is none); (False, id) when an
    earlier call with it committed, `id` being what it created. A concurrent call with the same
    id waits here until the first one commits or rolls back."""
    if not request_id:
        return True, None
    claimed = conn.execute(
        pg.insert(catalog_requests)
        .values(kind=kind, request_id=request_id)
        .on_conflict_do_nothing()
        .returning(catalog_requests.c.request_id)
    ).first()
    if claimed is not None:
        return True, None
    rid = conn.execute(
        sa.select(catalog_requests.c.resource_id).where(
            catalog_requests.c.kind == kind, catalog_requests.c.request_id == request_id
        )
    ).scalar()
    return False, rid


def record_request(conn: sa.Connection, kind: str, request_id: str, resource_id: str) -> None:
    if request_id:
        conn.execute(
            catalog_requests.update()
            .where(catalog_requests.c.kind == kind, catalog_requests.c.request_id == request_id)
            .values(resource_id=resource_id)
        )


# -- writes ------------------------------------------------------------------------------------


def sqlstate(exc: sa.exc.DBAPIError) -> str | None:
    return getattr(exc.orig, "sqlstate", None)


# Unique indexes of the catalog a concurrent write can hit after the checks passed, and what
# the caller is told then (any other unique violation is the conflict the caller names).
RACES = {
    "pipelines_one_default": "another pipeline was made the default at the same time; try again",
    "pipelines_product": "another pipeline was assigned to this product at the same time",
    "pipelines_product_line": "another pipeline was assigned to this product line at the same time",
}


def insert_unique(conn: sa.Connection, stmt, conflict: str, metadata: dict | None = None, *, one: bool = True):
    """Run an INSERT/UPDATE (... RETURNING, `one` row) in a savepoint; a unique violation is
    ALREADY_EXISTS with `conflict` (or the race RACES names for its index)."""
    try:
        with conn.begin_nested():
            result = conn.execute(stmt)
            return result.one() if one else result
    except sa.exc.IntegrityError as exc:
        if sqlstate(exc) == "23505":
            index = getattr(getattr(exc.orig, "diag", None), "constraint_name", None)
            raise AlreadyExists(RACES.get(index, conflict), metadata=metadata or {}) from None
        raise


def delete_unreferenced(conn: sa.Connection, table: sa.Table, row_id: str, name: str, what: str) -> None:
    """Delete a row, or FAILED_PRECONDITION (reason <WHAT>_IN_USE) when anything still refers
    to it: a price list item, a pipeline, a deal, a quote line of another part, ..."""
    try:
        with conn.begin_nested():
            conn.execute(table.delete().where(table.c.id == row_id))
    except sa.exc.IntegrityError as exc:
        if sqlstate(exc) != "23503":
            raise
        referrer = getattr(getattr(exc.orig, "diag", None), "table_name", None) or "another record"
        raise FailedPrecondition(
            f"{name} is still referred to (by {referrer}); set active = false to retire it instead",
            reason=f"{what.upper()}_IN_USE",
            metadata={"name": name, "referred_by": str(referrer)},
        ) from None


# -- lists -------------------------------------------------------------------------------------


def list_page(
    conn: sa.Connection,
    tokens: PageTokens,
    purpose: str,
    query: sa.Select,
    schema: FilterSchema,
    sortable: dict,
    default_order: str,
    tiebreaker,
    size: int,
    token: str,
    filter_text: str,
    order_by: str,
):
    """One keyset page of `query` filtered (AIP-160) and ordered (`order_by` over `sortable`,
    ending with the unique `tiebreaker`); a token only continues the same filter and order."""
    limit = page_size(size)
    where = schema.compile(filter_text)
    order_by = order_by.strip() or default_order  # blank (or only spaces): the default, AIP-132
    order = with_tiebreaker(parse_order_by(order_by, sortable), tiebreaker)
    fingerprint = f"{purpose}:{query_fingerprint(filter_text, order_by)}"
    return keyset_page(conn, query.where(where), order, tokens, fingerprint, limit, token)


def reference_filter(column, name: ResourceName):
    """A filter field compiled by callable: `product_line = "productLines/{id}"` (or `= ""` /
    `= null` for none) to a condition on the id column."""

    def compile_(op: str, value):
        if op not in ("=", "!="):
            raise ValueError("takes = or !=")
        if value in (None, ""):
            cond = column.is_(None)
        elif not name.matches(str(value)):
            raise ValueError(f"must be '{name.pattern}'")
        else:
            cond = column == name.parse(str(value)).id
        return cond if op == "=" else sa.not_(sa.func.coalesce(cond, sa.false()))

    return compile_
