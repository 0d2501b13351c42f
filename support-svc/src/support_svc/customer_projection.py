"""customer-svc's events, consumed into `customer_refs` (crm_chassis.customer_refs): senders are
matched to customers from it, never by a call per message. A merge re-points the merged
customers' tickets (and calls, surveys: every table with a customer_id column in CUSTOMER_TABLES)
to the survivor; erasure blanks the personal data tickets copied (contact address and name,
message bodies and attachments of the customer's messages) and the columns other parts declare
personal (`table.info["personal"]`: a call's numbers, a visit's address and signature)."""

from __future__ import annotations

import sqlalchemy as sa

from crm_chassis import customer_refs as refs
from crm_chassis.messaging.consumer import Subscription
from crm_chassis.messaging.envelope import Event

from .runtime import Support
from .tables import attachments, customer_refs, metadata, ticket_messages, tickets

ACTOR = "customer-svc"


def customer_tables() -> list[sa.Table]:
    """Every table of the service that names a customer (parts add theirs to `metadata`)."""
    return [t for t in metadata.tables.values() if "customer_id" in t.c and t is not customer_refs]


def erase_personal(conn: sa.Connection, customer_id: str) -> None:
    """Blank the personal columns (declared in a table's info["personal"]) of every row of the
    customer in the parts' tables: a call's numbers and note, a visit's address and sign-off."""
    for table in customer_tables():
        personal = table.info.get("personal", ())
        if personal:
            blank = {c: (None if table.c[c].nullable else "") for c in personal}
            conn.execute(table.update().where(table.c.customer_id == customer_id).values(**blank))


class Handlers:
    def __init__(self, support: Support):
        self.support = support

    def on_merged(self, conn: sa.Connection, event: Event) -> None:
        survivor, merged = refs.mark_merged(conn, customer_refs, event)
        if not merged:
            return
        for table in customer_tables():
            values = {"customer_id": survivor}
            if "version" in table.c:
                values["version"] = table.c.version + 1
            conn.execute(table.update().where(table.c.customer_id.in_(merged)).values(**values))
        with self.support.uow.joined(conn) as tx:
            tx.audit(f"customers/{survivor}", "tickets_repointed", ACTOR, [{"merged": ",".join(merged)}])

    def on_erased(self, conn: sa.Connection, event: Event) -> None:
        cid = refs.erased(conn, customer_refs, event)
        ids = [
            r.id
            for r in conn.execute(
                tickets.update()
                .where(tickets.c.customer_id == cid)
                .values(contact_address="", contact_name="", search_text="", version=tickets.c.version + 1)
                .returning(tickets.c.id)
            )
        ]
        erase_personal(conn, cid)
        if not ids:
            return
        mine = sa.and_(ticket_messages.c.ticket_id.in_(ids), ticket_messages.c.kind == "customer")
        conn.execute(
            attachments.delete().where(attachments.c.message_id.in_(sa.select(ticket_messages.c.id).where(mine)))
        )
        conn.execute(ticket_messages.update().where(mine).values(body="", author="", headers={}))
        with self.support.uow.joined(conn) as tx:
            for tid in ids:
                tx.redact_audit(f"tickets/{tid}")


def subscriptions(support: Support) -> list[Subscription]:
    h = Handlers(support)
    on_customer = refs.on_customer(customer_refs)
    handlers = dict.fromkeys(refs.CUSTOMER_EVENTS, on_customer)
    handlers.update(
        {
            "customer.merged.v1": h.on_merged,
            "customer.erased.v1": h.on_erased,
            "customer.unmerged.v1": lambda conn, e: refs.unmerged(conn, customer_refs, e),
        }
    )
    return [Subscription(domain="customer", handlers=handlers, requires=refs.requires())]


# -- lookups ------------------------------------------------------------------------------------
def email_match(email) -> sa.ScalarSelect:
    """A scalar subquery: the customer of an e-mail address (a bound parameter or column,
    already stripped and lower case; '' or NULL: none), as crm_chassis.customer_refs.match
    finds it: among the newest 20 rows with that address, the first merged one's survivor or
    the first live one. For folding the match into a statement that reads other things."""
    r = customer_refs.alias("matched_ref")
    newest = (
        sa.select(r.c.customer_id, r.c.merged_into, r.c.deleted, r.c.version)
        .where(r.c.email == email, email != "")
        .order_by(r.c.version.desc())
        .limit(20)
        .subquery("newest")
    )
    return (
        sa.select(sa.case((newest.c.merged_into != "", newest.c.merged_into), else_=newest.c.customer_id))
        .where(sa.or_(newest.c.merged_into != "", sa.not_(newest.c.deleted)))
        .order_by(newest.c.version.desc())
        .limit(1)
        .scalar_subquery()
    )
