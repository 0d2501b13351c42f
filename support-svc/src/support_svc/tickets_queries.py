"""Finding tickets: the AIP-160 filter of ListTickets / SearchTickets / ExportTickets, their
orders and keyset pages, and the Persian-aware text search over tickets.search_text.

Enum values are stored as lower-case names; the filter takes STATE_OPEN, OPEN or open alike.
Resource-name fields (team, assignee, customer, category) take the full name
(`team = "teams/<uuid>"`) or null for none. Priority also takes < <= > >= (low < normal <
high < urgent) and sorts by that rank, not alphabetically.
"""

from __future__ import annotations

import operator
import re

import sqlalchemy as sa

from crm_chassis.errors import InvalidArgument
from crm_chassis.filtering import (
    FieldType,
    FilterField,
    FilterSchema,
    Prefix,
    array_contains,
    keyset_page,
    parse_order_by,
    query_fingerprint,
    with_tiebreaker,
)
from crm_chassis.pagination import PageTokens, page_size
from crm_chassis.persian import normalize, to_ascii_digits
from crm_chassis.resources import ResourceName

from .tables import categories, ticket_messages, tickets
from .ticketing import AGENT, CHANNELS, KINDS, PRIORITIES, STATES

t = tickets.c

# The agents' queue ("what changed last") pages by update time.
sa.Index("tickets_update", t.update_time.desc(), t.id.desc())

QUERY_LIMIT = 200
NUMBER = re.compile(r"\s*\[?\s*(?:[tT]\s*-\s*)?(\d{1,12})\s*\]?\s*")

PRIORITY_RANK = sa.case({p: i for i, p in enumerate(PRIORITIES)}, value=t.priority, else_=len(PRIORITIES))
PRIORITY_SORT = PRIORITY_RANK.label("priority_rank")
CATEGORY_KEY = (
    sa.select(categories.c.key).where(categories.c.id == t.category_id).scalar_subquery().label("category_key")
)
# What every ticket query selects: the row, its category's key, its priority rank (for sorting).
BASE = sa.select(tickets, CATEGORY_KEY, PRIORITY_SORT)


def enum_names(values, prefix: str) -> dict[str, str]:
    """OPEN, STATE_OPEN and open all name "open"."""
    out = {}
    for v in values:
        out[v] = out[v.upper()] = out[f"{prefix}_{v.upper()}"] = v
    return out


def _name_filter(column, pattern: ResourceName, field: str, empty):
    """A filter on a resource name over a column keeping the bare id; null: none (`empty`)."""

    def compile_(op: str, value):
        if op not in ("=", "!="):
            raise ValueError(f"{field} takes only = and !=")
        if value is None:
            cond = column.is_(None) if empty is None else sa.or_(column.is_(None), column == empty)
        else:
            if not isinstance(value, str) or not pattern.matches(value):
                raise ValueError(f"{field} takes a name like {pattern.pattern!r} or null")
            cond = column == value.split("/", 1)[1]
        return cond if op == "=" else sa.not_(cond)

    return compile_


_OPS = {"=": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def _priority(op: str, value):
    return _OPS[op](PRIORITY_RANK, PRIORITIES.index(value))


def parse_number(text: str) -> int | None:
    """123 from "T-000123", "t-123", "[T-000123]", "۱۲۳" or "123"; None for anything else."""
    m = NUMBER.fullmatch(to_ascii_digits(text or ""))
    return int(m.group(1)) if m else None


def _number(op: str, value):
    n = parse_number(str(value)) if value is not None else None
    if n is None:
        raise ValueError('number takes a ticket number like "T-000123"')
    return _OPS[op](t.number, n)


def _tags(op: str, value):
    if value is None or isinstance(value, Prefix):
        raise ValueError("tags takes a tag: tags:vip")
    return array_contains(t.tags, normalize(value))


NAME_OPS = frozenset({"=", "!="})
ORDERED = frozenset({"=", "!=", "<", "<=", ">", ">="})
TEAM = ResourceName("teams/{team_id}")
CUSTOMER = ResourceName("customers/{customer_id}", customer_id=r"[^/\s]{1,200}")
CATEGORY = ResourceName("categories/{category_id}")

FILTERS = FilterSchema(
    FilterField("state", t.state, FieldType.ENUM, enum_values=enum_names(STATES, "STATE")),
    FilterField("channel", t.channel, FieldType.ENUM, enum_values=enum_names(CHANNELS, "CHANNEL")),
    FilterField(
        "priority", _priority, FieldType.ENUM, enum_values=enum_names(PRIORITIES, "PRIORITY"), operators=ORDERED
    ),
    FilterField("team", _name_filter(t.team_id, TEAM, "team", None), operators=NAME_OPS),
    FilterField("assignee", _name_filter(t.assignee_id, AGENT, "assignee", ""), operators=NAME_OPS),
    FilterField("customer", _name_filter(t.customer_id, CUSTOMER, "customer", ""), operators=NAME_OPS),
    FilterField("category", _name_filter(t.category_id, CATEGORY, "category", None), operators=NAME_OPS),
    FilterField("complaint", t.complaint, FieldType.BOOL),
    FilterField("tags", _tags, FieldType.STRING_ARRAY),
    FilterField("number", _number, operators=ORDERED),
    FilterField("language", t.language),
    FilterField("create_time", t.create_time, FieldType.TIMESTAMP),
    FilterField("update_time", t.update_time, FieldType.TIMESTAMP),
    FilterField("resolve_time", t.resolve_time, FieldType.TIMESTAMP),
    FilterField("first_response_time", t.first_response_time, FieldType.TIMESTAMP),
    FilterField("close_time", t.close_time, FieldType.TIMESTAMP),
)
SORTABLE = {"create_time": t.create_time, "update_time": t.update_time, "priority": PRIORITY_SORT}
NEWEST_FIRST = [(t.create_time, True), (t.id, True)]

KIND_FILTERS = FilterSchema(
    FilterField("kind", ticket_messages.c.kind, FieldType.ENUM, enum_values=enum_names(KINDS, "KIND")),
    FilterField("create_time", ticket_messages.c.create_time, FieldType.TIMESTAMP),
)


def search_condition(query: str):
    """The hits of a search text: a ticket number, or the normalised text inside search_text
    (LIKE '%...%', served by the trigram index from three characters on)."""
    q = (query or "").strip()
    if not q:
        raise InvalidArgument.field("query", "is required: some text, or a ticket number like T-000123")
    if len(q) > QUERY_LIMIT:
        raise InvalidArgument.field("query", f"may be at most {QUERY_LIMIT} characters")
    key = normalize(q)
    if not key:
        raise InvalidArgument.field("query", "has no letters or digits to search for")
    like = t.search_text.like("%" + key.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%", "\\")
    n = parse_number(q)
    if n is not None and re.search(r"[tT]", q):  # "T-123": the number only
        return t.number == n
    if n is not None:  # bare digits: that number, or the digits in the text (a phone)
        return sa.or_(t.number == n, like)
    return like


class TicketQueries:
    """List and search pages (rows of BASE: the ticket, category_key, priority_rank)."""

    def __init__(self, secret: str):
        self.tokens = PageTokens(secret, "tickets")

    def list_page(self, conn, filter_: str, order_by: str, size: int, token: str):
        limit = page_size(size)
        where = FILTERS.compile(filter_)
        keys = parse_order_by((order_by or "").strip() or "create_time desc", SORTABLE)
        order = with_tiebreaker(keys, t.id, descending=keys[-1].descending)
        purpose = query_fingerprint(filter_, order_by, kind="list")
        return keyset_page(conn, BASE.where(where), order, self.tokens, purpose, limit, token)

    def search_page(self, conn, query: str, filter_: str, size: int, token: str):
        limit = page_size(size)
        cond = search_condition(query)
        where = FILTERS.compile(filter_)
        purpose = query_fingerprint(filter_, "", kind="search", query=query.strip())
        return keyset_page(conn, BASE.where(cond, where), NEWEST_FIRST, self.tokens, purpose, limit, token)
