"""Lead scores: the sum of the points of the active scoring rules a lead matches, in SQL.

Each active rule becomes an integer SQL expression over one row of `leads` ("how many times
does this rule count for this lead": 0, 1, or up to the rule's cap for behaviour rules). The
score is the sum of points × times. The same expressions compute one lead's score (inside its
write), every lead's (one UPDATE ... FROM, after a rule change) and a score's explanation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import sqlalchemy as sa

from crm_chassis.errors import FieldViolation, InvalidArgument
from crm_chassis.filtering import FieldType, FilterField, FilterSchema

from .rules_tables import lead_behaviors, scoring_rules
from .tables import leads

log = logging.getLogger("sales_svc.rules")

# The rows a score is computed on (an alias: the UPDATE's target is `leads` itself).
L = leads.alias("l")
OPEN_STATUSES = ("new", "contacted", "qualified")
_TEXT_FIELDS = (
    "industry",
    "province",
    "city",
    "source",
    "status",
    "job_title",
    "organization_name",
    "website",
    "campaign_id",
    "utm_source",
    "utm_medium",
    "utm_campaign",
    "email",
)


def lead_filters(t) -> FilterSchema:
    """The fields a profile condition may name, over `t` (the leads table or an alias)."""
    return FilterSchema(
        *(FilterField(f, t.c[f]) for f in _TEXT_FIELDS),
        FilterField("product_line", sa.cast(t.c.product_line_id, sa.Text)),
        FilterField("team", sa.cast(t.c.team_id, sa.Text)),
        FilterField("owner", t.c.owner_id),
        FilterField("tags", t.c.tags, FieldType.STRING_ARRAY),
        FilterField("create_time", t.c.create_time, FieldType.TIMESTAMP),
    )


FILTERS = lead_filters(L)


def check_filter(text: str, field: str) -> str:
    """The filter, stripped, if it compiles; INVALID_ARGUMENT naming `field` otherwise."""
    text = (text or "").strip()
    if not text:
        raise InvalidArgument.field(field, 'is required: a filter over the lead\'s fields, e.g. industry = "bank"')
    try:
        FILTERS.compile(text)
    except InvalidArgument as e:
        raise InvalidArgument([FieldViolation(field, v.description) for v in e.violations]) from None
    return text


@dataclass(frozen=True)
class Term:
    rule: object  # the scoring_rules row
    times: sa.ColumnElement  # integer: how many times it counts for the lead row


def _times(rule) -> sa.ColumnElement | None:
    if rule.kind == "profile":
        try:
            cond = FILTERS.compile(rule.filter)
        except InvalidArgument:  # stored before a field was withdrawn: counted as not matching
            log.warning("scoring rule %s: its filter no longer compiles; it scores nothing", rule.id)
            return None
        return sa.case((cond, 1), else_=0)
    b = lead_behaviors
    count = sa.select(sa.func.count()).where(b.c.lead_id == L.c.id, b.c.kind == rule.event_kind)
    if rule.window_days:
        count = count.where(b.c.time >= sa.func.now() - sa.func.make_interval(0, 0, 0, rule.window_days))
    n = count.scalar_subquery()
    return sa.case((n >= max(rule.min_count, 1), sa.func.least(n, max(rule.cap, 1))), else_=0)


def terms(conn: sa.Connection) -> list[Term]:
    rules = conn.execute(
        sa.select(scoring_rules).where(scoring_rules.c.active).order_by(scoring_rules.c.create_time, scoring_rules.c.id)
    ).all()
    out = []
    for r in rules:
        t = _times(r)
        if t is not None:
            out.append(Term(r, t))
    return out


def score_expression(ts: list[Term]) -> sa.ColumnElement:
    if not ts:
        return sa.literal(0, sa.Integer)
    total = sum((t.times * t.rule.points for t in ts[1:]), ts[0].times * ts[0].rule.points)
    # Clamped to the column's range (a score of billions means a misconfigured rule anyway).
    return sa.cast(sa.func.greatest(-(2**31) + 1, sa.func.least(2**31 - 1, total)), sa.Integer)


def rescore(
    conn: sa.Connection, where: sa.ColumnElement | None = None, *, bump: bool = True, ts: list | None = None
) -> list:
    """Write the current score on the leads `where` selects (a condition on `L`; all by default,
    deleted ones aside) whose score differs; with `bump`, their version and update time move.
    Returns the changed rows (all of leads' columns). One statement."""
    computed = (
        sa.select(L.c.id, score_expression(ts if ts is not None else terms(conn)).label("score"))
        .where(L.c.delete_time.is_(None), where if where is not None else sa.true())
        .subquery("computed")
    )
    values = {"score": computed.c.score}
    if bump:
        values.update(version=leads.c.version + 1, update_time=sa.func.now())
    stmt = (
        leads.update()
        .where(leads.c.id == computed.c.id, leads.c.score != computed.c.score)
        .values(**values)
        .returning(*leads.c)
    )
    return conn.execute(stmt).all()


def rescore_lead(conn: sa.Connection, lead_id: str, *, bump: bool = True, ts: list | None = None):
    """The lead's row if its score changed, else None (`ts`: the active rules' terms, if read)."""
    rows = rescore(conn, L.c.id == lead_id, bump=bump, ts=ts)
    return rows[0] if rows else None


def explain(conn: sa.Connection, lead_id: str) -> list[tuple[object, int]]:
    """(rule row, times) for each active rule that counts for the lead, largest points first."""
    ts = terms(conn)
    if not ts:
        return []
    row = conn.execute(
        sa.select(*(t.times.label(f"r{i}") for i, t in enumerate(ts))).where(L.c.id == lead_id)
    ).one_or_none()
    if row is None:
        return []
    out = [(t.rule, int(row[i])) for i, t in enumerate(ts) if row[i]]
    return sorted(out, key=lambda p: (-abs(p[0].points * p[1]), p[0].display_name))
