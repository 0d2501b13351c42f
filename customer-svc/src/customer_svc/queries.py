"""List and search queries: AIP-160 filters, order_by and keyset pages over the customers."""

from __future__ import annotations

import re

import sqlalchemy as sa

from crm.customer.v1 import customer_pb2, resources_pb2
from crm_chassis import persian
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

from . import adapters
from .adapters import customers, group_members, groups, ranks


def _enum(enum_type, prefix: str) -> dict[str, int]:
    """Both CUSTOMER_TYPE_PERSON and PERSON name the value."""
    out = {}
    for v in enum_type.DESCRIPTOR.values:
        if v.number:
            out[v.name] = v.number
            out[v.name.removeprefix(prefix)] = v.number
    return out


def _ref_id(value, collection: str) -> str | None:
    s = str(value)
    m = re.fullmatch(rf"{collection}/([0-9a-f-]{{36}})", s)
    return m.group(1) if m else None


def _group_condition(op: str, value) -> sa.ColumnElement[bool]:
    """group = "groups/{id}" or group = "VIP" (display name); != is "not a member"."""
    gid = _ref_id(value, "groups")
    member = sa.select(group_members.c.customer_id).where(group_members.c.customer_id == customers.c.id)
    if gid:
        member = member.where(group_members.c.group_id == gid)
    else:
        member = member.join(groups, groups.c.id == group_members.c.group_id).where(
            column_condition(sa.func.lower(groups.c.display_name), "=", str(value).lower())
        )
    exists = sa.exists(member)
    return ~exists if op == "!=" else exists


def _rank_condition(op: str, value) -> sa.ColumnElement[bool]:
    """rank = "ranks/{id}" / "Gold"; <, >, ... compare rank positions (lower comes first)."""
    rid = _ref_id(value, "ranks")
    target = (
        sa.select(ranks.c.position)
        .where(ranks.c.id == rid if rid else sa.func.lower(ranks.c.display_name) == str(value).lower())
        .scalar_subquery()
    )
    mine = sa.select(ranks.c.position).where(ranks.c.id == customers.c.rank_id).scalar_subquery()
    if op in ("=", "!="):
        same = customers.c.rank_id == (
            rid
            if rid
            else sa.select(ranks.c.id)
            .where(sa.func.lower(ranks.c.display_name) == str(value).lower())
            .scalar_subquery()
        )
        return sa.or_(~same, customers.c.rank_id.is_(None)) if op == "!=" else same
    return column_condition(mine, op, target)


_BASE_FIELDS = [
    *(
        FilterField(n, customers.c[n])
        for n in (
            "display_name",
            "given_name",
            "family_name",
            "organization_name",
            "email",
            "phone",
            "mobile",
            "fax",
            "website",
            "country",
            "province",
            "city",
            "address",
            "postal_code",
            "industry",
            "owner",
            "referrer_staff",
            "customer_code",
            "field_of_study",
            "title_prefix",
            "po_box",
        )
    ),
    FilterField("acquisition_source", customers.c.acquisition_source),
    FilterField("source", customers.c.acquisition_source),
    FilterField(
        "type", customers.c.type, FieldType.ENUM, enum_values=_enum(customer_pb2.CustomerType, "CUSTOMER_TYPE_")
    ),
    FilterField(
        "kind", customers.c.kind, FieldType.ENUM, enum_values=_enum(customer_pb2.CustomerKind, "CUSTOMER_KIND_")
    ),
    FilterField(
        "lifecycle_stage",
        customers.c.lifecycle_stage,
        FieldType.ENUM,
        enum_values=_enum(customer_pb2.LifecycleStage, "LIFECYCLE_STAGE_"),
    ),
    FilterField("gender", customers.c.gender, FieldType.ENUM, enum_values=_enum(customer_pb2.Gender, "GENDER_")),
    FilterField(
        "education_degree",
        customers.c.education_degree,
        FieldType.ENUM,
        enum_values=_enum(customer_pb2.EducationDegree, "EDUCATION_DEGREE_"),
    ),
    *(FilterField(n, customers.c[n], FieldType.TIMESTAMP) for n in ("create_time", "update_time", "delete_time")),
    *(FilterField(n, customers.c[n], FieldType.DATE) for n in ("marriage_date", "founding_date", "acquisition_date")),
    FilterField("erased", customers.c.erased, FieldType.BOOL),
    FilterField("tags", customers.c.tags, FieldType.STRING_ARRAY),
    FilterField("tag", customers.c.tags, FieldType.STRING_ARRAY, operators=frozenset({":"})),
    FilterField("group", _group_condition, FieldType.STRING, operators=frozenset({"=", "!="})),
    FilterField("groups", lambda op, v: _group_condition("=", v), FieldType.STRING_ARRAY),
    FilterField("rank", _rank_condition, FieldType.STRING),
]

SORTABLE = {
    n: customers.c[n]
    for n in (
        "create_time",
        "update_time",
        "display_name",
        "given_name",
        "family_name",
        "organization_name",
        "customer_code",
        "city",
        "province",
        "acquisition_source",
        "acquisition_date",
        "lifecycle_stage",
        "kind",
        "type",
    )
}

_CUSTOM_TYPES = {
    resources_pb2.CUSTOM_FIELD_TYPE_TEXT: (FieldType.STRING, sa.Text),
    resources_pb2.CUSTOM_FIELD_TYPE_CHOICE: (FieldType.STRING, sa.Text),
    resources_pb2.CUSTOM_FIELD_TYPE_NUMBER: (FieldType.FLOAT, sa.Numeric),
    resources_pb2.CUSTOM_FIELD_TYPE_DATE: (FieldType.DATE, sa.Date),
}


# Fields only callers with PII rights may filter or sort on: a comparison is a way to read a
# masked value (`birth_date < "1980-01-01"`, halving until found).
_PII_FIELDS = [
    FilterField("national_id", customers.c.national_id),
    FilterField("birth_certificate_number", customers.c.birth_certificate_number),
    FilterField("birth_date", customers.c.birth_date, FieldType.DATE),
]
PII_SORTABLE = {"birth_date": customers.c.birth_date}


def filter_schema(conn: sa.Connection, pii: bool = False, filter_text: str = "custom.") -> FilterSchema:
    """The fixed fields (with the PII ones for callers allowed to see them) plus custom.<key>
    for every custom field defined now."""
    fields = list(_BASE_FIELDS) + (_PII_FIELDS if pii else [])
    if "custom." not in filter_text:  # the definitions are read only when a filter names one
        return FilterSchema(*fields)
    for key, d in adapters.custom_field_defs(conn).items():
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            ftype, sqltype = _CUSTOM_TYPES[d.type]
            fields.append(FilterField(f"custom.{key}", sa.cast(customers.c.custom_fields[key].astext, sqltype), ftype))
    return FilterSchema(*fields)


def _visible(show_deleted: bool) -> sa.ColumnElement[bool]:
    return sa.true() if show_deleted else customers.c.delete_time.is_(None)


def list_page(
    conn,
    tokens: PageTokens,
    limit: int,
    token: str,
    filter_text: str,
    order_by: str,
    show_deleted: bool,
    pii: bool = False,
):
    where = filter_schema(conn, pii, filter_text).compile(filter_text)
    order = parse_order_by(order_by, {**SORTABLE, **PII_SORTABLE} if pii else SORTABLE) or [
        (customers.c.create_time, True)
    ]
    order = with_tiebreaker(order, customers.c.id, descending=order[0][1])
    fingerprint = query_fingerprint(filter_text, order_by, show_deleted=show_deleted)
    stmt = (
        adapters.select_customers()
        .where(where, _visible(show_deleted))
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


def tsquery_text(query: str, prefix: bool = True) -> str:
    """Every word as a prefix term ('ali' finds 'alireza'), or as a whole word with
    prefix=False. Only letters and digits survive."""
    words = [re.sub(r"[^\w]", "", w) for w in query.split()]
    return " & ".join(f"{w}:*" if prefix else w for w in words if w)


# Search tiers, best first, each read newest first: every word typed is a whole word of the
# record (full text), every word is the start of a word, the query is a substring of the
# search text, every word is a word of the record give or take a typo. The relevance of a hit
# is its tier. A page holds the hits of one tier: it reads the next tier only while it is
# still empty, and otherwise ends where the tier ends (the next page starts the next tier;
# AIP-158 lets a page be short). So a common word ("Tehran", "ali") costs a short walk of the
# newest-first index and a rare full name a few index lookups, never a rank of every match.
# Typos are corrected word by word against the lexicon of search words (migration 0005), most
# specific first: the word with two neighbouring letters swapped back (the commonest slip, which
# plain edit distance counts as two); else the word split in two lexicon words (a compound name
# such as "Hassan-zadeh" typed as one word, perhaps with a swap too); only when neither exists,
# the closest words by edit distance (1 for words of 3-4 letters, 2 from 5), which are many.
# A word the lexicon knows is taken as typed: only the unknown words of a query are corrected.
TIER_WORDS, TIER_PREFIXES, TIER_SUBSTRING, TIER_CORRECTED = 3.0, 2.0, 1.0, 0.5
SEARCH_ORDER = [(sa.column("relevance", sa.Float), True), (customers.c.create_time, True), (customers.c.id, True)]
_CORRECTIONS = sa.text("""
    SELECT 'swap', q.w, q.a, '' FROM unnest(CAST(:swap_of AS text[]), CAST(:swaps AS text[])) AS q(w, a)
    WHERE EXISTS (SELECT 1 FROM search_words WHERE word = q.a)
      AND NOT EXISTS (SELECT 1 FROM search_words WHERE word = q.w)
    UNION ALL
    SELECT 'split', q.w, q.a, q.b
    FROM unnest(CAST(:split_of AS text[]), CAST(:heads AS text[]), CAST(:tails AS text[])) AS q(w, a, b)
    WHERE EXISTS (SELECT 1 FROM search_words WHERE word = q.a)
      AND EXISTS (SELECT 1 FROM search_words WHERE word = q.b)
      AND NOT EXISTS (SELECT 1 FROM search_words WHERE word = q.w)
    UNION ALL
    SELECT 'near', q.w, c.word, ''
    FROM unnest(CAST(:words AS text[])) AS q(w)
    CROSS JOIN LATERAL (
        SELECT word FROM search_words
        WHERE length(word) BETWEEN length(q.w) - 2 AND length(q.w) + 2
          AND word <> q.w
          AND levenshtein_less_equal(word, q.w, CASE WHEN length(q.w) < 5 THEN 1 ELSE 2 END)
              <= CASE WHEN length(q.w) < 5 THEN 1 ELSE 2 END
        ORDER BY levenshtein(word, q.w), word
        LIMIT 5
    ) AS c
    WHERE NOT EXISTS (SELECT 1 FROM search_words WHERE word = q.w)
""")
_MIN_WORD = 3  # the lexicon keeps words of 3-40 letters


def _swaps(word: str) -> list[str]:
    """The word with each pair of neighbouring letters swapped (Rezaie -> Rezaei, ...)."""
    return list(
        dict.fromkeys(
            word[:i] + word[i + 1] + word[i] + word[i + 2 :] for i in range(len(word) - 1) if word[i] != word[i + 1]
        )
    )


def _quoted(word: str) -> str:
    return "'" + word.replace("'", "''") + "'"


def _corrected_tsquery(conn, q: str) -> str:
    """Every word or its corrections (the last word also as a prefix, as typed so far); ''
    when no word has a correction."""
    words = [w for w in (re.sub(r"[^\w]", "", w) for w in q.split()) if w]
    fixable = [w for w in words if len(w) >= _MIN_WORD and not any(ch.isdigit() for ch in w)]
    if not fixable:
        return ""
    swaps = [(w, v) for w in fixable for v in _swaps(w)]
    splits = [
        (w, v[:i], v[i:])
        for w in fixable
        for v in dict.fromkeys([w, *_swaps(w)])
        for i in range(_MIN_WORD, len(v) - _MIN_WORD + 1)
    ]
    found: dict[str, dict[str, list[str]]] = {}
    for kind, w, a, b in conn.execute(
        _CORRECTIONS,
        {
            "swap_of": [w for w, _ in swaps],
            "swaps": [v for _, v in swaps],
            "split_of": [w for w, _, _ in splits],
            "heads": [a for _, a, _ in splits],
            "tails": [b for _, _, b in splits],
            "words": fixable,
        },
    ):
        term = f"({_quoted(a)} <-> {_quoted(b)})" if kind == "split" else _quoted(a)
        found.setdefault(w, {}).setdefault(kind, []).append(term)
    if not found:
        return ""
    terms = []
    for i, w in enumerate(words):
        kinds = found.get(w, {})
        best = kinds.get("swap", []) + kinds.get("split", []) or kinds.get("near", [])
        options = [f"{w}:*" if i == len(words) - 1 else w, *dict.fromkeys(best)]
        terms.append("(" + " | ".join(options) + ")")
    return " & ".join(terms)


def _tier_rows(conn, tier: float, cond, where, after: list | None, need: int) -> list:
    """A tier's hits newest first (the order of the newest-first index), after a keyset."""
    order = SEARCH_ORDER[1:]
    stmt = (
        sa.select(*adapters.CUSTOMER_COLUMNS, sa.literal(tier, sa.Float).label("relevance"))
        .where(cond, where, customers.c.delete_time.is_(None))
        .order_by(*order_by_clauses(order))
        .limit(need)
    )
    if after is not None:
        stmt = stmt.where(keyset_condition(order, after[1:]))
    return list(conn.execute(stmt).all())


def search_page(conn, tokens: PageTokens, query: str, limit: int, token: str, filter_text: str, pii: bool = False):
    from crm_chassis.errors import InvalidArgument

    q = persian.normalize(query)
    if not q:
        raise InvalidArgument.field("query", "must not be empty")
    if len(q) > 200:
        raise InvalidArgument.field("query", "must be at most 200 characters")
    where = filter_schema(conn, pii, filter_text).compile(filter_text)
    tsv = customers.c.search_tsv
    prefixes, words = tsquery_text(q), tsquery_text(q, prefix=False)
    in_prefixes = tsv.bool_op("@@")(sa.func.to_tsquery("simple", prefixes)) if prefixes else sa.false()
    like = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    in_substring = customers.c.search_text.ilike(like)
    tiers: list = []
    if words:
        in_words = tsv.bool_op("@@")(sa.func.to_tsquery("simple", words))
        tiers += [(TIER_WORDS, in_words), (TIER_PREFIXES, sa.and_(in_prefixes, ~in_words))]
    # Substrings and corrections need 3 characters (a trigram to look up); shorter: prefixes.
    if len(q) >= 3:
        tiers.append((TIER_SUBSTRING, sa.and_(in_substring, ~in_prefixes)))
        tiers.append((TIER_CORRECTED, None))
    fingerprint = query_fingerprint(filter_text, search=q, tiers=1)
    last = decode_page_token(tokens, token, SEARCH_ORDER, fingerprint)
    rows: list = []
    next_token = ""
    for i, (tier, cond) in enumerate(tiers):
        if last is not None and tier > last[0]:
            continue  # read on earlier pages
        if cond is None:  # corrections: looked up only when no better hit was found
            corrected = _corrected_tsquery(conn, q)
            if not corrected:
                break
            cond = sa.and_(tsv.bool_op("@@")(sa.func.to_tsquery("simple", corrected)), ~in_prefixes, ~in_substring)
        after = last if last is not None and tier == last[0] else None
        rows = _tier_rows(conn, tier, cond, where, after, limit + 1)
        if len(rows) > limit:
            rows = rows[:limit]
            next_token = encode_page_token(tokens, rows[-1], SEARCH_ORDER, fingerprint)
            break
        if rows and i + 1 < len(tiers):
            # This tier is done; the next page starts the next one (a relevance between the two).
            between = (tier + tiers[i + 1][0]) / 2
            values = to_json_values([between, rows[-1].create_time, rows[-1].id])
            next_token = tokens.encode(values, fingerprint)
            break
    return [(r, float(r.relevance)) for r in rows], next_token
