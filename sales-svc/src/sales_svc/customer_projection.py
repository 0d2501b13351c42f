"""customer-svc's events, consumed: the `customer_refs` projection (what duplicate checks and
conversions read without calling customer-svc), merges re-pointing every sales record to the
survivor, and erasure blanking the personal data copied into leads.

Each handler runs in the consumer's transaction (the inbox row that makes it idempotent commits
with it); audit entries go through `sales.uow.joined(conn)`.
"""

from __future__ import annotations

import sqlalchemy as sa

from crm_chassis import audit
from crm_chassis import customer_refs as refs
from crm_chassis.messaging.consumer import Subscription
from crm_chassis.messaging.envelope import Event

from . import tables
from .leads_model import search_key
from .runtime import Sales
from .tables import customer_refs, leads

ACTOR = "customer-svc"  # who the audit trail says did what a customer event caused
# What erasure blanks in the leads of an erased customer (the personal data a lead copies).
ERASED_FIELDS = (
    "given_name",
    "family_name",
    "organization_name",
    "job_title",
    "email",
    "phone",
    "mobile",
    "national_id",
    "website",
    "address",
    "description",
)


def apply_customers(conn: sa.Connection, customers) -> None:
    """Upsert these customers' references unless a newer version is stored (one statement)."""
    refs.apply_customers(conn, customer_refs, customers)


on_customer = refs.on_customer(customer_refs)


# Leads re-pointed from merged customers to the survivor, with the customer each named before.
_REPOINT_LEADS = sa.text(
    "UPDATE leads SET customer_id = :survivor, version = leads.version + 1, update_time = now()"
    " FROM (SELECT id, customer_id FROM leads WHERE customer_id = ANY(CAST(:merged AS text[])) FOR UPDATE) AS o"
    " WHERE leads.id = o.id RETURNING leads.id, o.customer_id"
)


class Handlers:
    """The handlers that write more than the projection (they need the unit of work)."""

    def __init__(self, sales: Sales):
        self.sales = sales

    def on_merged(self, conn: sa.Connection, event: Event) -> None:
        """The merged customers point to the survivor, and so does every sales record that named
        one of them (set-based, one UPDATE per table); re-pointed leads are audited."""
        survivor, merged = refs.mark_merged(conn, customer_refs, event)
        if not merged:
            return
        with self.sales.uow.joined(conn) as tx:
            for table in tables.CUSTOMER_REFERENCES:
                if table is leads:
                    continue
                conn.execute(
                    table.update()
                    .where(table.c.customer_id.in_(merged))
                    .values(customer_id=survivor, version=table.c.version + 1, update_time=sa.func.now())
                )
            moved = conn.execute(_REPOINT_LEADS, {"merged": merged, "survivor": survivor}).all()
            tx.audit_many(
                [
                    (
                        f"leads/{lead_id}",
                        "customer_merged",
                        [
                            audit.change(
                                "customer", audit.value(f"customers/{old}"), audit.value(f"customers/{survivor}")
                            )
                        ],
                    )
                    for lead_id, old in moved
                ],
                ACTOR,
            )

    def on_erased(self, conn: sa.Connection, event: Event) -> None:
        """The customer's reference loses its personal data (the event carries it blank), and so
        do the leads linked to it: names, contact details, national id, address; their search
        text is what is left (place, industry, tags) and their audit entries are redacted."""
        cid = refs.erased(conn, customer_refs, event)
        rows = conn.execute(
            leads.update()
            .where(leads.c.customer_id == cid)
            .values(**dict.fromkeys(ERASED_FIELDS, ""), version=leads.c.version + 1, update_time=sa.func.now())
            .returning(leads.c.id, leads.c.industry, leads.c.province, leads.c.city, leads.c.tags)
        ).all()
        if not rows:
            return
        ids = [r.id for r in rows]
        conn.execute(
            sa.text(
                "UPDATE leads SET search_text = v.t FROM unnest(CAST(:ids AS uuid[]), CAST(:texts AS text[])) AS v(id, t)"
                " WHERE leads.id = v.id"
            ),
            {"ids": ids, "texts": [search_key(r._mapping) for r in rows]},
        )
        with self.sales.uow.joined(conn) as tx:
            for lead_id in ids:
                tx.redact_audit(f"leads/{lead_id}")
            tx.audit_many(
                [
                    (f"leads/{lead_id}", "customer_erased", [audit.change(f, "null", "null") for f in ERASED_FIELDS])
                    for lead_id in ids
                ],
                ACTOR,
            )

    def on_unmerged(self, conn: sa.Connection, event: Event) -> None:
        """The survivor and the restored customers as they are now. Records re-pointed by the
        merge stay with the survivor (which of them named which customer before is not known)."""
        refs.unmerged(conn, customer_refs, event)


def handlers(sales: Sales) -> dict:
    h = Handlers(sales)
    return {
        "customer.created.v1": on_customer,
        "customer.updated.v1": on_customer,
        "customer.deleted.v1": on_customer,
        "customer.undeleted.v1": on_customer,
        "customer.erased.v1": h.on_erased,
        "customer.merged.v1": h.on_merged,
        "customer.unmerged.v1": h.on_unmerged,
    }


def subscriptions(sales: Sales) -> list[Subscription]:
    return [Subscription(domain="customer", handlers=handlers(sales), requires=refs.requires())]
