"""Tables and queries (SQLAlchemy Core: the hot paths are create, get, list and search)."""

from __future__ import annotations

from types import SimpleNamespace

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from crm_chassis import audit

metadata = sa.MetaData()

# The next customer code, C-000123: six digits at least, more past the millionth customer
# (migration 0006; lpad alone cut C-1000000 down to C-100000). A volatile function: one new
# code per row even inside array_agg(... FROM generate_series(...)).
NEXT_CODE_SQL = "next_customer_code()"
UUID = pg.UUID(as_uuid=False)


def _text(name: str) -> sa.Column:
    return sa.Column(name, sa.Text, nullable=False, server_default="")


customers = sa.Table(
    "customers",
    metadata,
    sa.Column("id", UUID, primary_key=True, server_default=sa.text("gen_random_uuid()")),
    sa.Column("customer_code", sa.Text, nullable=False),
    sa.Column("type", sa.SmallInteger, nullable=False),
    *(_text(n) for n in ("given_name", "family_name", "organization_name", "display_name", "email", "phone")),
    _text("acquisition_source"),
    sa.Column("request_id", sa.Text, unique=True),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    sa.Column("gender", sa.SmallInteger, nullable=False, server_default="0"),
    *(_text(n) for n in ("title_prefix", "fax", "mobile", "website")),
    sa.Column("country", sa.Text, nullable=False, server_default="IR"),
    *(
        _text(n)
        for n in ("province", "city", "address", "postal_code", "po_box", "birth_certificate_number", "national_id")
    ),
    sa.Column("birth_date", sa.Date),
    sa.Column("marriage_date", sa.Date),
    _text("field_of_study"),
    sa.Column("education_degree", sa.SmallInteger, nullable=False, server_default="0"),
    _text("industry"),
    sa.Column("founding_date", sa.Date),
    sa.Column("contact_persons", pg.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
    sa.Column("kind", sa.SmallInteger, nullable=False, server_default="0"),
    sa.Column("lifecycle_stage", sa.SmallInteger, nullable=False, server_default="1"),
    sa.Column("acquisition_date", sa.Date),
    _text("referrer_staff"),
    sa.Column("referrer_customer", UUID),
    _text("owner"),
    sa.Column("rank_id", UUID),
    sa.Column("tags", pg.ARRAY(sa.Text), nullable=False, server_default=sa.text("'{}'::text[]")),
    sa.Column("custom_fields", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("delete_time", sa.DateTime(timezone=True)),
    sa.Column("merged_into", UUID),
    sa.Column("erased", sa.Boolean, nullable=False, server_default=sa.false()),
    _text("search_text"),
    sa.Column("search_tsv", pg.TSVECTOR, sa.Computed("to_tsvector('simple', search_text)")),
)

groups = sa.Table(
    "groups",
    metadata,
    sa.Column("id", UUID, primary_key=True, server_default=sa.text("gen_random_uuid()")),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
)

group_members = sa.Table(
    "group_members",
    metadata,
    sa.Column("group_id", UUID, primary_key=True),
    sa.Column("customer_id", UUID, primary_key=True),
    sa.Column("add_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

ranks = sa.Table(
    "ranks",
    metadata,
    sa.Column("id", UUID, primary_key=True, server_default=sa.text("gen_random_uuid()")),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
)

acquisition_sources = sa.Table(
    "acquisition_sources",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("retired", sa.Boolean, nullable=False, server_default=sa.false()),
)

custom_field_defs_table = custom_field_definitions = sa.Table(
    "custom_field_definitions",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("type", sa.SmallInteger, nullable=False),
    sa.Column("choices", pg.ARRAY(sa.Text), nullable=False, server_default=sa.text("'{}'::text[]")),
    sa.Column("required", sa.Boolean, nullable=False, server_default=sa.false()),
)

notes = sa.Table(
    "notes",
    metadata,
    sa.Column("id", UUID, primary_key=True, server_default=sa.text("gen_random_uuid()")),
    sa.Column("customer_id", UUID, nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("author", sa.Text, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
)

# The audit trail is the chassis' (crm_chassis.audit); the table is created by migration 0002.
audit_entries = audit.audit_entries

# What a merge changed, so UnmergeCustomers can undo it (migration 0003).
merges = sa.Table(
    "merges",
    metadata,
    sa.Column("id", UUID, primary_key=True, server_default=sa.text("gen_random_uuid()")),
    sa.Column("survivor_id", UUID, nullable=False),
    sa.Column("merged_ids", pg.ARRAY(UUID), nullable=False),
    sa.Column("snapshot", pg.JSONB, nullable=False),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("undo_time", sa.DateTime(timezone=True)),
)

# What a customer read returns: every column but the internal ones, plus its group ids.
_HIDDEN = {"request_id", "search_text", "search_tsv"}
GROUP_IDS = (
    sa.select(sa.func.coalesce(sa.func.array_agg(group_members.c.group_id), sa.text("'{}'::uuid[]")))
    .where(group_members.c.customer_id == customers.c.id)
    .scalar_subquery()
    .label("group_ids")
)
CUSTOMER_COLUMNS = [c for c in customers.c if c.name not in _HIDDEN] + [GROUP_IDS]


def select_customers() -> sa.Select:
    return sa.select(*CUSTOMER_COLUMNS)


# One cached insert statement for every new customer (its values come as parameters).
INSERT = customers.insert()


# Built once: a statement built per call costs more than its primary-key read (SQLAlchemy
# walks its 47 columns for the cache key every time).
_GET = select_customers().where(customers.c.id == sa.bindparam("id"))
_GET_FOR_UPDATE = _GET.with_for_update(of=customers)


def get_customer(conn: sa.Connection, customer_id: str, for_update: bool = False) -> sa.Row | None:
    return conn.execute(_GET_FOR_UPDATE if for_update else _GET, {"id": customer_id}).one_or_none()


def get_customers(conn: sa.Connection, ids: list[str]) -> list[sa.Row]:
    return list(conn.execute(select_customers().where(customers.c.id.in_(ids))).all())


_BY_REQUEST_ID = select_customers().where(customers.c.request_id == sa.bindparam("request_id"))


def get_by_request_id(conn: sa.Connection, request_id: str) -> sa.Row | None:
    return conn.execute(_BY_REQUEST_ID, {"request_id": request_id}).one_or_none()


def existing_ids(conn: sa.Connection, table: sa.Table, ids: list[str]) -> set[str]:
    if not ids:
        return set()
    return {str(r[0]) for r in conn.execute(sa.select(table.c.id).where(table.c.id.in_(ids)))}


# What every change of a customer row also sets: the next version (its etag) and the time.
NEW_VERSION = {"version": customers.c.version + 1, "update_time": sa.func.now()}


def set_groups(conn: sa.Connection, customer_id: str, group_ids: list[str]) -> None:
    conn.execute(
        group_members.delete().where(
            group_members.c.customer_id == customer_id, group_members.c.group_id.not_in(group_ids or [None])
        )
    )
    if group_ids:
        conn.execute(
            pg.insert(group_members)
            .values([{"group_id": g, "customer_id": customer_id} for g in group_ids])
            .on_conflict_do_nothing()
        )


def custom_field_defs(conn: sa.Connection) -> dict[str, sa.Row]:
    return {r.key: r for r in conn.execute(sa.select(custom_field_definitions))}


_LOOKUPS = (
    "SELECT (SELECT coalesce(json_object_agg(key, retired), '{}') FROM acquisition_sources"
    " WHERE CAST(:keys AS text[]) IS NULL OR key = ANY(CAST(:keys AS text[]))),"
    " (SELECT coalesce(json_agg(d), '[]') FROM custom_field_definitions d)"
)
LOOKUPS = sa.text(_LOOKUPS)
LOOKUPS_AND_CODE = sa.text(f"{_LOOKUPS}, {NEXT_CODE_SQL}, now()")


def validation_lookups(conn: sa.Connection, only_sources: list[str] | None = None, code: bool = False) -> tuple:
    """In one round trip: the acquisition sources (key -> retired; every one, or only the keys
    named), the custom-field definitions by key, and with `code` the next customer code and the
    transaction's time (what create_time defaults to)."""
    row = conn.execute(LOOKUPS_AND_CODE if code else LOOKUPS, {"keys": only_sources}).one()
    defs = {d["key"]: SimpleNamespace(**d) for d in row[1]}
    return (row[0], defs, row[2], row[3]) if code else (row[0], defs)
