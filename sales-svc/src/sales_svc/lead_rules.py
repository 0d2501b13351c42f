"""Lead scoring and assignment, applied whenever a lead is written.

The leads part calls `on_lead_saved` inside the transaction of every create and update (and
after a status change); the activities part calls `touch` when the owner logs an activity.
This module is also the part (in `__main__.PARTS`) serving LeadRuleService
(proto/crm/sales/v1/lead_rules.proto; use cases in rules_api.py) and firing the timers
`lead.untouched` (reassign a lead its owner did not touch in time) and `lead.rescore` (every
lead after a scoring rule changed).
"""

from __future__ import annotations

import sqlalchemy as sa

from crm_chassis.auth import Principal
from crm_chassis.uow import Transaction

from . import rules_assignment, rules_scoring
from .runtime import Sales
from .tables import leads


def on_lead_saved(
    tx: Transaction, lead_id: str, created: bool, principal: Principal | None, row: sa.Row | None = None
) -> None:
    """Assign an unowned new lead by the assignment rules and recompute its score (both in the
    caller's transaction).

    - created and no owner: the first active matching assignment rule sets owner_id, team_id
      and assign_time (audited as lead.assign, lead.assigned.v1 published) and, if the rule has
      untouched_hours, arms the lead's untouched timer;
    - updated by its owner (principal.subject == owner_id): a touch (see `touch`);
    - always: the score is recomputed and written.

    The version is not bumped here: the caller's write in this transaction already moved it.
    Call it after writing the lead and before building the lead's event or response (re-read the
    row: owner, team, assign_time and score may have changed). `row`: the lead's row as just
    written, when the caller has it (saves reading it again)."""
    conn = tx.conn
    lead = row if row is not None else conn.execute(sa.select(leads).where(leads.c.id == lead_id)).one_or_none()
    if lead is None or lead.delete_time is not None:
        return
    if created and not lead.owner_id:
        rules_assignment.assign_new(tx, lead)
    elif not created and principal is not None and lead.owner_id and principal.subject == lead.owner_id:
        rules_assignment.touch(conn, lead_id)
    terms = rules_scoring.terms(conn)
    if terms or not created:  # a new lead's score is 0, which no rules leave as it is
        rules_scoring.rescore_lead(conn, lead_id, bump=False, ts=terms)


def touch(tx: Transaction | sa.Connection, lead_id: str) -> None:
    """The owner acted on the lead (an activity, a call): its touch_time moves to now and its
    untouched timer is cancelled, so it is not reassigned. In the caller's transaction."""
    rules_assignment.touch(getattr(tx, "conn", tx), lead_id)


def registration(sales: Sales):
    from .rules_api import registration as reg

    rules_assignment.calendar()  # a bad SALES_BUSINESS_HOURS stops the start, not a lead write
    return reg(sales)


def timer_handlers(sales: Sales) -> None:
    from .rules_api import rescore_all

    sales.timers.register(
        rules_assignment.UNTOUCHED, lambda conn, timer: rules_assignment.on_untouched(sales.uow, conn, timer)
    )
    sales.timers.register("lead.rescore", lambda conn, timer: rescore_all(sales.uow, conn))
