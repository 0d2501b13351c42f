"""List and search queries over opportunities: AIP-160 filters, order_by, keyset pages, all
inside the caller's access scope (access.py)."""

from __future__ import annotations

import re

import sqlalchemy as sa

from crm_chassis import persian
from crm_chassis.errors import InvalidArgument
from crm_chassis.filtering import (
    FieldType,
    FilterField,
    FilterSchema,
    column_condition,
    decode_page_token,
    encode_page_token,
    keyset_condition,
    order_by_clauses,
    parse_order_by,
    query_fingerprint,
    to_json_values,
    with_tiebreaker,
)
from crm_chassis.pagination import PageTokens
from crm_chassis.resources import ResourceName

from .access import Scope
from .opportunities_core import (
    CUSTOMER,
    LEAD,
    OPPORTUNITY_STATES_FILTER,
    PIPELINE,
    PRODUCT_LINE,
    STAGE,
    TEAM,
    select_opportunities,
)
from .tables import FORECAST_CATEGORIES, opportunities

o = opportunities


def _by_name(column, pattern: ResourceName):
    """A filter on a reference by its resource name (pipeline = "pipelines/...")."""

    def compile(op: str, value):
        if value is None:
            return column_condition(column, op, None)
        text = str(value)
        if not pattern.matches(text):
            raise ValueError(f"must be '{pattern.pattern}'")
        return column_condition(column, op, pattern.parse(text).id)

    return compile


def _enum_values(keys, prefix: str) -> dict[str, str]:
    out = {}
    for k in keys:
        out[k.upper()] = k
        out[f"{prefix}{k.upper()}"] = k
    return out


FILTERS = FilterSchema(
    FilterField("state", o.c.state, FieldType.ENUM, enum_values=OPPORTUNITY_STATES_FILTER),
    FilterField(
        "forecast_category",
        o.c.forecast_category,
        FieldType.ENUM,
        enum_values=_enum_values(FORECAST_CATEGORIES, "FORECAST_CATEGORY_"),
    ),
    FilterField("stage", _by_name(o.c.stage_id, STAGE), operators=frozenset({"=", "!="})),
    FilterField("pipeline", _by_name(o.c.pipeline_id, PIPELINE), operators=frozenset({"=", "!="})),
    FilterField("team", _by_name(o.c.team_id, TEAM), operators=frozenset({"=", "!="})),
    FilterField("customer", _by_name(o.c.customer_id, CUSTOMER), operators=frozenset({"=", "!="})),
    FilterField("product_line", _by_name(o.c.product_line_id, PRODUCT_LINE), operators=frozenset({"=", "!="})),
    FilterField("lead", _by_name(o.c.lead_id, LEAD), operators=frozenset({"=", "!="})),
    FilterField("owner", o.c.owner_id),
    FilterField("display_name", o.c.name),
    FilterField("currency_code", o.c.currency_code),
    FilterField("source", o.c.source),
    FilterField("campaign_id", o.c.campaign_id),
    FilterField("amount", o.c.amount, FieldType.FLOAT),
    FilterField("probability", o.c.probability, FieldType.FLOAT),
    FilterField("expected_close_date", o.c.expected_close_date, FieldType.DATE),
    FilterField("competitors", o.c.competitors, FieldType.STRING_ARRAY),
    *(FilterField(n, o.c[n], FieldType.TIMESTAMP) for n in ("create_time", "update_time", "close_time")),
    FilterField("stage_enter_time", o.c.stage_enter_time, FieldType.TIMESTAMP),
)

SORTABLE = {
    "create_time": o.c.create_time,
    "update_time": o.c.update_time,
    "amount": o.c.amount,
    "expected_close_date": o.c.expected_close_date,
    "close_time": o.c.close_time,
    "probability": o.c.probability,
    "display_name": o.c.name,
    "stage_enter_time": o.c.stage_enter_time,
}


def list_page(conn, tokens: PageTokens, scope: Scope, limit: int, token: str, filter_text: str, order_by: str):
    """A keyset page of the opportunities the scope sees that match the filter."""
    where = FILTERS.compile(filter_text)
    order = parse_order_by(order_by, SORTABLE) or [(o.c.create_time, True)]
    order = with_tiebreaker(order, o.c.id, descending=order[0][1])
    fingerprint = query_fingerprint(filter_text, order_by)
    stmt = (
        select_opportunities()
        .where(where, scope.visible(o.c.owner_id, o.c.team_id))
        .order_by(*order_by_clauses(order))
        .limit(limit + 1)
    )
    last = decode_page_token(tokens, token, order, fingerprint)
    if last is not None:
        stmt = stmt.where(keyset_condition(order, last))
    rows = list(conn.execute(stmt).all())
    next_token = ""
    if len(rows) > limit:
        rows = rows[:limit]
        next_token = encode_page_token(tokens, rows[-1], order, fingerprint)
    return rows, next_token


# Search: a page holds the hits of one tier, newest first: the query as a substring of the
# search key (relevance 1), then, once those are done, the records with a word similar to it
# (pg_trgm word similarity, relevance 0.5: a typo still finds it). Both through the trigram index.
TIER_SUBSTRING, TIER_FUZZY = 1.0, 0.5
WORD_SIMILARITY_THRESHOLD = 0.45
SEARCH_ORDER = [(sa.column("relevance", sa.Float), True), (o.c.create_time, True), (o.c.id, True)]


def _like(q: str) -> str:
    return "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def search_page(conn, tokens: PageTokens, scope: Scope, query: str, limit: int, token: str, filter_text: str):
    q = persian.normalize(query)
    if not q:
        raise InvalidArgument.field("query", "must not be empty")
    if len(q) > 200:
        raise InvalidArgument.field("query", "must be at most 200 characters")
    where = sa.and_(FILTERS.compile(filter_text), scope.visible(o.c.owner_id, o.c.team_id))
    substring = o.c.search_text.ilike(_like(q), escape="\\")
    tiers = [(TIER_SUBSTRING, substring)]
    if len(re.sub(r"\s", "", q)) >= 3:
        tiers.append((TIER_FUZZY, sa.and_(sa.literal(q).op("<%")(o.c.search_text), ~substring)))
    fingerprint = query_fingerprint(filter_text, search=q)
    last = decode_page_token(tokens, token, SEARCH_ORDER, fingerprint)
    rows: list = []
    next_token = ""
    for i, (tier, cond) in enumerate(tiers):
        if last is not None and tier > last[0]:
            continue  # read on earlier pages
        if tier == TIER_FUZZY:
            conn.exec_driver_sql(f"SET pg_trgm.word_similarity_threshold = {WORD_SIMILARITY_THRESHOLD}")
        order = SEARCH_ORDER[1:]
        stmt = (
            select_opportunities()
            .add_columns(sa.literal(tier, sa.Float).label("relevance"))
            .where(cond, where)
            .order_by(*order_by_clauses(order))
            .limit(limit + 1)
        )
        if last is not None and tier == last[0]:
            stmt = stmt.where(keyset_condition(order, last[1:]))
        rows = list(conn.execute(stmt).all())
        if len(rows) > limit:
            rows = rows[:limit]
            next_token = encode_page_token(tokens, rows[-1], SEARCH_ORDER, fingerprint)
            break
        if rows and i + 1 < len(tiers):
            between = (tier + tiers[i + 1][0]) / 2  # the next page starts the next tier
            next_token = tokens.encode(to_json_values([between, rows[-1].create_time, rows[-1].id]), fingerprint)
            break
        if rows:
            break
    return rows, next_token
