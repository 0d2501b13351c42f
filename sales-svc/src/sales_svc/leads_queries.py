"""Lead reads: AIP-160 filters, order_by and keyset pages, the ranked search, and the duplicate
check. Every query takes the caller's access scope and puts it in its WHERE clause."""

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
    with_tiebreaker,
)
from crm_chassis.pagination import PageTokens
from crm_chassis.resources import UUID_PATTERN

from .access import Scope
from .leads_model import LEAD_COLUMNS
from .tables import leads

_EQ = frozenset({"=", "!="})


def _reference(collection: str, column, uuid: bool = True):
    """A filter on a reference written as its resource name: team = "teams/{id}"."""
    pattern = re.compile(rf"{collection}/({UUID_PATTERN if uuid else '[^/]+'})")

    def compile(op: str, value):
        if value is None:
            return column_condition(column, op, None)
        m = pattern.fullmatch(str(value))
        if m is None:
            raise ValueError(f"must be '{collection}/{{id}}'" + (" with a UUID id" if uuid else ""))
        return column_condition(column, op, m.group(1))

    return compile


def _status_names() -> dict[str, str]:
    out = {}
    for s in ("new", "contacted", "qualified", "converted", "disqualified"):
        out[s] = out[s.upper()] = out[f"LEAD_STATUS_{s.upper()}"] = s
    return out


FILTERS = FilterSchema(
    FilterField("status", leads.c.status, FieldType.ENUM, enum_values=_status_names()),
    FilterField("owner", leads.c.owner_id),
    FilterField("team", _reference("teams", leads.c.team_id), operators=_EQ),
    FilterField("product_line", _reference("productLines", leads.c.product_line_id), operators=_EQ),
    FilterField("customer", _reference("customers", leads.c.customer_id, uuid=False), operators=_EQ),
    *(
        FilterField(n, leads.c[n])
        for n in (
            "source",
            "campaign_id",
            "utm_source",
            "utm_medium",
            "utm_campaign",
            "province",
            "city",
            "given_name",
            "family_name",
            "organization_name",
            "email",
            "industry",
            "disqualify_reason",
        )
    ),
    FilterField("score", leads.c.score, FieldType.INT),
    *(
        FilterField(n, leads.c[n], FieldType.TIMESTAMP)
        for n in ("create_time", "update_time", "delete_time", "convert_time", "assign_time")
    ),
    FilterField("tags", leads.c.tags, FieldType.STRING_ARRAY),
)
SORTABLE = {
    n: leads.c[n] for n in ("create_time", "update_time", "score", "family_name", "organization_name", "status")
}


def list_page(
    conn: sa.Connection,
    tokens: PageTokens,
    scope: Scope,
    limit: int,
    token: str,
    filter_text: str,
    order_by: str,
    show_deleted: bool = False,
):
    where = FILTERS.compile(filter_text)
    order = parse_order_by(order_by, SORTABLE) or [(leads.c.create_time, True)]
    order = with_tiebreaker(order, leads.c.id, descending=order[0][1])
    fingerprint = query_fingerprint(filter_text, order_by, show_deleted=show_deleted)
    stmt = (
        sa.select(*LEAD_COLUMNS)
        .where(where, scope.visible(leads.c.owner_id, leads.c.team_id))
        .order_by(*order_by_clauses(order))
        .limit(limit + 1)
    )
    if not show_deleted:
        stmt = stmt.where(leads.c.delete_time.is_(None))
    last = decode_page_token(tokens, token, order, fingerprint)
    if last is not None:
        stmt = stmt.where(keyset_condition(order, last))
    rows = list(conn.execute(stmt).all())
    next_token = ""
    if len(rows) > limit:
        rows = rows[:limit]
        next_token = encode_page_token(tokens, rows[-1], order, fingerprint)
    return rows, next_token


# -- search ------------------------------------------------------------------------------------
# Tiers, best first, each read newest first: every word of the query is a whole word of the
# lead; every word starts a word; every word is inside the search text; the query is similar
# to some words of it (pg_trgm word similarity: typos). A page reads the tiers in turn until it
# is full, each only as far as the page needs, so no page ranks every match; its token is the
# last hit's (tier, create_time, id). The trigram index on search_text serves each tier (LIKE
# '%word%' and the word-similarity operator).
TIER_WORDS, TIER_PREFIXES, TIER_SUBSTRING, TIER_SIMILAR = 3.0, 2.0, 1.0, 0.5
RELEVANCE = sa.column("relevance", sa.Float)
SEARCH_ORDER = [(RELEVANCE, True), (leads.c.create_time, True), (leads.c.id, True)]
# How similar a word must be to count (pg_trgm's default 0.6 misses one-letter typos in short
# names, Rezaie / Rezaei).
WORD_SIMILARITY = 0.45
_SET_SIMILARITY = sa.text("SELECT set_config('pg_trgm.word_similarity_threshold', :v, false)")


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _tiers(q: str) -> list[tuple[float, sa.ColumnElement[bool]]]:
    words = list(dict.fromkeys(q.split()))
    st = leads.c.search_text
    padded = sa.literal(" ") + st + sa.literal(" ")
    inside = [st.like(f"%{_like(w)}%", escape="\\") for w in words]  # the indexable part
    whole = sa.and_(*inside, *(padded.like(f"% {_like(w)} %", escape="\\") for w in words))
    starts = sa.and_(*inside, *(padded.like(f"% {_like(w)}%", escape="\\") for w in words))
    tiers = [
        (TIER_WORDS, whole),
        (TIER_PREFIXES, sa.and_(starts, ~whole)),
        (TIER_SUBSTRING, sa.and_(*inside, ~starts)),
    ]
    if len(q) >= 3:  # a trigram to compare
        similar = sa.literal(q).op("<%")(st)
        tiers.append((TIER_SIMILAR, sa.and_(similar, ~sa.and_(*inside))))
    return tiers


def search_page(
    conn: sa.Connection, tokens: PageTokens, scope: Scope, query: str, limit: int, token: str, filter_text: str
):
    q = persian.normalize(query)
    if not q:
        raise InvalidArgument.field("query", "must not be empty")
    if len(q) > 200:
        raise InvalidArgument.field("query", "must be at most 200 characters")
    where = sa.and_(
        FILTERS.compile(filter_text),
        scope.visible(leads.c.owner_id, leads.c.team_id),
        leads.c.delete_time.is_(None),
    )
    tiers = _tiers(q)
    fingerprint = query_fingerprint(filter_text, search=q)
    last = decode_page_token(tokens, token, SEARCH_ORDER, fingerprint)
    rows: list = []
    next_token = ""
    for tier, cond in tiers:
        if last is not None and tier > last[0]:
            continue  # read on an earlier page
        if tier == TIER_SIMILAR:
            conn.execute(_SET_SIMILARITY, {"v": str(WORD_SIMILARITY)})
        stmt = (
            sa.select(*LEAD_COLUMNS, sa.literal(tier, sa.Float).label("relevance"))
            .where(cond, where)
            .order_by(*order_by_clauses(SEARCH_ORDER[1:]))
            .limit(limit + 1 - len(rows))
        )
        if last is not None and tier == last[0]:
            stmt = stmt.where(keyset_condition(SEARCH_ORDER[1:], last[1:]))
        rows += conn.execute(stmt).all()
        if len(rows) > limit:
            rows = rows[:limit]
            next_token = encode_page_token(tokens, rows[-1], SEARCH_ORDER, fingerprint)
            break
    return [(r, float(r.relevance)) for r in rows], next_token


# -- duplicates ----------------------------------------------------------------------------------
def _dup_parts() -> str:
    lead = "delete_time IS NULL AND (CAST(:exclude AS uuid) IS NULL OR id <> CAST(:exclude AS uuid))"
    parts = ["SELECT 'request', CAST(id AS text), '' FROM leads WHERE request_id = :request_id"]
    # (field of the new lead, column of the other record, parameter)
    pairs = [("email", "email", "email"), ("national_id", "national_id", "national_id")]
    pairs += [(f, col, f) for f in ("phone", "mobile") for col in ("phone", "mobile")]
    for f, col, param in pairs:
        parts.append(
            f"SELECT 'lead', CAST(id AS text), '{f}' FROM leads WHERE {col} = :{param} AND {col} <> '' AND {lead}"
        )
    for f, col, param in pairs:
        parts.append(
            f"SELECT 'customer', customer_id, '{f}' FROM customer_refs"
            f" WHERE {col} = :{param} AND {col} <> '' AND NOT deleted"
        )
    return "\nUNION ALL ".join(parts) + "\nLIMIT 50"


# One fixed statement (prepared once by the driver): a field not given is NULL and matches
# nothing; the request_id row comes first, so the limit never cuts it off.
_DUPLICATES = sa.text(_dup_parts())
CONTACT_FIELDS = ("email", "national_id", "phone", "mobile")


def find_duplicates(conn: sa.Connection, v: dict, request_id: str | None = None, exclude_id: str | None = None):
    """(kind, record id, field) rows for every lead (not deleted) and customer (neither deleted
    nor merged) sharing the e-mail, a phone number (either number of the other record) or the
    national id of `v`; with `request_id`, also ('request', lead id, '') for a lead created
    with it. None (no statement) when `v` has none of those fields."""
    if not any(v.get(f) for f in CONTACT_FIELDS):
        return None
    params = {f: v.get(f) or None for f in CONTACT_FIELDS}
    return conn.execute(_DUPLICATES, {**params, "request_id": request_id, "exclude": exclude_id}).all()


def matches(rows) -> list[tuple[str, str]]:
    """(record name, field) pairs, each once, leads first, in the order fields were checked."""
    out: dict[tuple[str, str], None] = {}
    for kind, rid, f in rows:
        if kind in ("lead", "customer"):
            out[(f"{kind}s/{rid}", f)] = None
    return sorted(out, key=lambda m: not m[0].startswith("leads/"))
