"""Lead assignment: the first active matching rule (by position) picks an owner for a new
unowned lead; a rule with untouched_hours hands a lead its owner has not touched within that
many business hours to the next member (timer `lead.untouched`, keyed by the lead's id).
"""

from __future__ import annotations

import datetime as dt
import logging
import os

import sqlalchemy as sa
from google.protobuf import timestamp_pb2
from sqlalchemy.dialects import postgresql as pg

from crm.sales.v1 import sales_events_pb2
from crm_chassis import audit, persian, timers
from crm_chassis.business_time import BusinessCalendar, from_settings
from crm_chassis.uow import Transaction

from .rules_scoring import OPEN_STATUSES
from .rules_tables import assignment_cursors, assignment_rules
from .tables import leads, team_members

log = logging.getLogger("sales_svc.rules")

UNTOUCHED = "lead.untouched"  # timer kind; key: the lead's id; payload: rule and owner
SYSTEM_ACTOR = "sales-svc:assignment-rules"


def calendar_from_env(env=os.environ) -> BusinessCalendar:
    """SALES_BUSINESS_HOURS ("sat-wed 08:00-16:00; thu 08:00-12:00", the default), SALES_TIMEZONE
    (Asia/Tehran) and SALES_HOLIDAYS (a `holidays` country code, IR by default; "none")."""
    country = env.get("SALES_HOLIDAYS", "IR").strip()
    return from_settings(
        env.get("SALES_BUSINESS_HOURS", ""),
        timezone=env.get("SALES_TIMEZONE", "Asia/Tehran"),
        holiday_country=None if country.lower() in ("", "none") else country,
    )


# The working calendar untouched_hours count in. Module-level because on_lead_saved has no
# handle on the service's settings; tests may replace it.
CALENDAR: BusinessCalendar | None = None


def calendar() -> BusinessCalendar:
    global CALENDAR
    if CALENDAR is None:
        CALENDAR = calendar_from_env()
    return CALENDAR


def _key(text: str) -> str:
    return persian.normalize(text or "")


def matches(rule, lead) -> bool:
    """Every non-empty list of the rule holds the lead's value (texts normalised)."""
    if rule.provinces and _key(lead.province) not in {_key(p) for p in rule.provinces}:
        return False
    if rule.cities and _key(lead.city) not in {_key(c) for c in rule.cities}:
        return False
    if rule.sources and (lead.source or "").strip().lower() not in {s.lower() for s in rule.sources}:
        return False
    lines = rule.product_line_ids
    return not lines or (lead.product_line_id is not None and str(lead.product_line_id) in lines)


def _lock_cursor(conn: sa.Connection, rule_id: str):
    """The rule's cursor, locked until the transaction ends (so concurrent assignments through
    one rule take turns, and each sees the previous one's lead)."""
    conn.execute(pg.insert(assignment_cursors).values(rule_id=rule_id).on_conflict_do_nothing())
    return conn.execute(
        sa.select(assignment_cursors).where(assignment_cursors.c.rule_id == rule_id).with_for_update()
    ).one()


def _members(conn: sa.Connection, team_id) -> list[str]:
    if team_id is None:
        return []
    return list(
        conn.execute(
            sa.select(team_members.c.member_id)
            .where(team_members.c.team_id == team_id)
            .order_by(team_members.c.member_id)
        ).scalars()
    )


def pick(conn: sa.Connection, rule, exclude: str | None = None) -> str | None:
    """The owner this rule gives its next lead (not `exclude`), or None if it has nobody."""
    if rule.strategy == "fixed_owner":
        return rule.owner_id if rule.owner_id and rule.owner_id != exclude else None
    cursor = _lock_cursor(conn, rule.id)
    members = [m for m in _members(conn, rule.team_id) if m != exclude]
    if not members:
        return None
    if rule.strategy == "round_robin":
        chosen = next((m for m in members if m > cursor.last_member), members[0])
    else:  # least_open: fewest open leads, ties by subject
        open_leads = (
            sa.select(leads.c.owner_id, sa.func.count().label("n"))
            .where(
                leads.c.owner_id.in_(members),
                leads.c.status.in_(OPEN_STATUSES),
                leads.c.delete_time.is_(None),
            )
            .group_by(leads.c.owner_id)
        )
        counts = dict(conn.execute(open_leads).tuples().all())
        chosen = min(members, key=lambda m: (counts.get(m, 0), m))
    conn.execute(
        assignment_cursors.update()
        .where(assignment_cursors.c.rule_id == rule.id)
        .values(last_member=chosen, turns=assignment_cursors.c.turns + 1)
    )
    return chosen


def active_rules(conn: sa.Connection) -> list:
    return conn.execute(
        sa.select(assignment_rules)
        .where(assignment_rules.c.active)
        .order_by(assignment_rules.c.position, assignment_rules.c.create_time, assignment_rules.c.id)
    ).all()


def _ts(value) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(value)
    return t


def lead_event(row, event_time: dt.datetime | None = None) -> sales_events_pb2.LeadEvent:
    """The LeadEvent of a leads row (no personal data)."""
    return sales_events_pb2.LeadEvent(
        lead=f"leads/{row.id}",
        status=row.status,
        owner=row.owner_id,
        team=f"teams/{row.team_id}" if row.team_id else "",
        source=row.source,
        campaign_id=row.campaign_id,
        utm_source=row.utm_source,
        utm_medium=row.utm_medium,
        utm_campaign=row.utm_campaign,
        product_line=f"productLines/{row.product_line_id}" if row.product_line_id else "",
        province=row.province,
        city=row.city,
        score=row.score,
        disqualify_reason=row.disqualify_reason,
        customer=f"customers/{row.customer_id}" if row.customer_id else "",
        opportunity=f"opportunities/{row.opportunity_id}" if row.opportunity_id else "",
        create_time=_ts(row.create_time),
        event_time=_ts(event_time or row.update_time),
        version=row.version,
    )


def _give(tx: Transaction, lead, rule, owner: str, action: str, actor, *, bump: bool):
    """Write the new owner (and the rule's team), arm the untouched timer, audit and publish."""
    values = {
        "owner_id": owner,
        "team_id": rule.team_id if rule.team_id is not None else lead.team_id,
        "assign_time": sa.func.now(),
        "touch_time": None,
    }
    if bump:
        values.update(version=leads.c.version + 1, update_time=sa.func.now())
    row = tx.execute(leads.update().where(leads.c.id == lead.id).values(**values).returning(*leads.c)).one()
    hours = float(rule.untouched_hours or 0)
    if hours > 0:
        due = calendar().add(row.assign_time, hours)
        timers.schedule(tx.conn, UNTOUCHED, str(lead.id), due, {"rule": str(rule.id), "owner": owner})
    else:
        timers.cancel(tx.conn, UNTOUCHED, str(lead.id))
    name = f"leads/{lead.id}"
    changes = [audit.change("owner", audit.value(lead.owner_id or None), audit.value(owner))]
    if str(row.team_id or "") != str(lead.team_id or ""):
        changes.append(
            audit.change(
                "team",
                audit.value(f"teams/{lead.team_id}" if lead.team_id else None),
                audit.value(f"teams/{row.team_id}" if row.team_id else None),
            )
        )
    changes.append(audit.change("assignment_rule", "null", audit.value(f"assignmentRules/{rule.id}")))
    tx.audit(name, action, actor, changes)
    tx.publish("lead.assigned.v1", lead_event(row, row.assign_time), name)
    return row


def assign_new(tx: Transaction, lead) -> object | None:
    """Apply the first active rule that matches the lead and has someone to give it to; the
    lead's new row, or None if no rule did."""
    for rule in active_rules(tx.conn):
        if not matches(rule, lead):
            continue
        owner = pick(tx.conn, rule)
        if owner is None:
            log.warning("assignment rule %s matched lead %s but has nobody to give it to", rule.id, lead.id)
            continue
        return _give(tx, lead, rule, owner, "lead.assign", SYSTEM_ACTOR, bump=False)
    return None


def touch(conn: sa.Connection, lead_id: str) -> None:
    """The owner acted on the lead: its touch time moves and its untouched timer is cancelled."""
    conn.execute(leads.update().where(leads.c.id == lead_id).values(touch_time=sa.func.now()))
    timers.cancel(conn, UNTOUCHED, str(lead_id))


def still_untouched(lead, owner: str) -> bool:
    return (
        lead is not None
        and lead.delete_time is None
        and lead.status in OPEN_STATUSES
        and lead.owner_id == owner
        and (lead.touch_time is None or lead.assign_time is None or lead.touch_time < lead.assign_time)
    )


def on_untouched(uow, conn: sa.Connection, timer: timers.Timer) -> None:
    """Timer handler: the lead is still open and untouched by the owner the rule gave it to, so
    the next member (by the same rule's strategy, never the same owner) gets it."""
    lead = conn.execute(sa.select(leads).where(leads.c.id == timer.key).with_for_update()).one_or_none()
    if not still_untouched(lead, timer.payload.get("owner", "")):
        return
    rule = conn.execute(
        sa.select(assignment_rules).where(assignment_rules.c.id == timer.payload.get("rule"))
    ).one_or_none()
    if rule is None or not rule.active:
        return
    owner = pick(conn, rule, exclude=lead.owner_id)
    if owner is None:
        log.info("lead %s is untouched but rule %s has no other member to give it to", lead.id, rule.id)
        return
    with uow.joined(conn) as tx:
        _give(tx, lead, rule, owner, "lead.reassign_untouched", SYSTEM_ACTOR, bump=True)
