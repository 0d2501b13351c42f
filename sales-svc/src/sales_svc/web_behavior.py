"""campaign-svc's click-stream and clicks as lead behaviour, for the scoring rules.

- web_activity.recorded.v1 (the company site's page views and events of a visitor tied to a
  customer or identified by e-mail or phone): each hit becomes a behaviour of every open lead
  (new, contacted, qualified; not deleted) of that customer, or with that e-mail or mobile:
  kind `website_visit` for a page view, `web_event.<name>` for an event (its name lower-cased,
  other characters than a-z, 0-9, '_', '.', '-' as '_'; `web_event` when nothing is left).
- message.clicked.v1 (a campaign message's tracked link clicked): `email_click` (or
  `sms_click`, `telegram_click`, `bale_click` by the message's channel) on the customer's open
  leads.

Once per hit and lead: the behaviour's idempotency key is the hit's id in campaign-svc (or the
click event's id), so a redelivered or replayed event records nothing twice. The leads whose
score changed are rescored in one statement and publish lead.updated.v1; a rule such as
`website_visit, min_count 3, window 30 days, +10` then scores them (BehaviorCondition).
"""

from __future__ import annotations

import datetime as dt
import re

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from crm.campaign.v1 import campaign_events_pb2 as ce
from crm_chassis.messaging.consumer import Subscription
from crm_chassis.messaging.envelope import Event

from .leads import CONVERTIBLE
from .rules_assignment import lead_event
from .rules_scoring import L, rescore
from .rules_tables import lead_behaviors
from .runtime import Sales
from .tables import leads

KIND_LIMIT = 60  # BehaviorCondition.kind's length
_NOT_KIND = re.compile(r"[^a-z0-9_.-]+")


def event_kind(name: str) -> str:
    """A site event's behaviour kind: `web_event.<name>` in the kind alphabet."""
    key = _NOT_KIND.sub("_", (name or "").strip().lower()).strip("_.-")
    return f"web_event.{key}"[:KIND_LIMIT].rstrip("_.-") if key else "web_event"


def _id(name: str) -> str:
    return name.rsplit("/", 1)[-1] if name else ""


def open_leads(customer_id: str = "", email: str = "", phone: str = "") -> sa.ColumnElement:
    """The open leads of a customer or contact (each lookup one of leads' indexes)."""
    who = []
    if customer_id:
        who.append(leads.c.customer_id == customer_id)
    if email:
        who.append(leads.c.email == email.lower())
    if phone:
        who.append(leads.c.mobile == phone)
    if not who:
        return sa.false()
    return sa.and_(sa.or_(*who), leads.c.delete_time.is_(None), leads.c.status.in_(CONVERTIBLE))


class Handlers:
    def __init__(self, sales: Sales):
        self.sales = sales

    def _record(self, conn: sa.Connection, who: sa.ColumnElement, behaviours: list[tuple[str, object, str]]) -> None:
        """(kind, time, key) for each open lead `who` picks, each (lead, key) once; the leads that
        got anything new are rescored and publish lead.updated.v1 if their score moved."""
        if not behaviours:
            return
        ids = conn.execute(sa.select(leads.c.id).where(who)).scalars().all()
        if not ids:
            return
        rows = [{"lead_id": i, "kind": k, "time": t, "idempotency_key": key} for i in ids for k, t, key in behaviours]
        ins = pg_insert(lead_behaviors).on_conflict_do_nothing(constraint="lead_behaviors_key")
        touched = set(conn.execute(ins.returning(lead_behaviors.c.lead_id), rows).scalars().all())
        if not touched:
            return
        changed = rescore(conn, L.c.id.in_(sorted(touched)))
        if changed:
            with self.sales.uow.joined(conn) as tx:
                tx.publish_many("lead.updated.v1", [(f"leads/{r.id}", lead_event(r)) for r in changed])

    def on_web_activity(self, conn: sa.Connection, event: Event) -> None:
        e = event.parse(ce.WebActivityEvent)
        behaviours = [
            (
                "website_visit" if h.kind == "page_view" else event_kind(h.name),
                h.event_time.ToDatetime(dt.UTC) if h.HasField("event_time") else event.time,
                f"web:{h.id}",
            )
            for h in e.hits
            if h.id
        ]
        self._record(conn, open_leads(_id(e.customer), e.email, e.phone), behaviours)

    def on_click(self, conn: sa.Connection, event: Event) -> None:
        e = event.parse(ce.MessageEvent)
        if not e.customer:
            return
        when = e.event_time.ToDatetime(dt.UTC) if e.HasField("event_time") else event.time
        kind = f"{e.channel or 'email'}_click"
        self._record(conn, open_leads(_id(e.customer)), [(kind, when, f"click:{event.id}")])


def subscriptions(sales: Sales) -> list[Subscription]:
    h = Handlers(sales)
    return [
        Subscription(
            domain="campaign",
            handlers={"web_activity.recorded.v1": h.on_web_activity, "message.clicked.v1": h.on_click},
        )
    ]
