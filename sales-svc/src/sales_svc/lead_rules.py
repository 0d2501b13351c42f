"""Lead scoring and assignment, applied whenever a lead is written.

The leads part calls `on_lead_saved` inside the transaction of every create and update (and
after a status change); the rules part fills it in.
"""

from __future__ import annotations

from crm_chassis.auth import Principal
from crm_chassis.uow import Transaction


def on_lead_saved(tx: Transaction, lead_id: str, created: bool, principal: Principal | None) -> None:
    """Assign an unowned new lead by the assignment rules and recompute its score (both in the
    caller's transaction). Does nothing until the rules part is in."""
