"""customer-svc's events, consumed: the `customer_refs` projection (what duplicate checks and
conversions read without calling customer-svc), merges re-pointing every sales record to the
survivor, and erasure blanking the personal data copied into leads.

Each handler runs in the consumer's transaction (the inbox row that makes it idempotent commits
with it); audit entries go through `sales.uow.joined(conn)`.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from crm.customer.v1 import customer_events_pb2 as ce
from crm_chassis import audit
from crm_chassis.messaging.consumer import Requires, Subscription
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


def _id(name: str) -> str:
    return name.removeprefix("customers/")


def _ref_values(c) -> dict:
    return {
        "customer_id": _id(c.name),
        "display_name": c.display_name,
        "email": c.email.strip().lower(),
        "phone": c.phone,
        "mobile": c.mobile,
        "national_id": c.national_id,
        "province": c.province,
        "city": c.city,
        "acquisition_source": c.acquisition_source,
        "merged_into": _id(c.merged_into) if c.merged_into else "",
        "deleted": c.HasField("delete_time") or bool(c.merged_into),
        "version": int(c.etag.strip('"') or 0),
    }


_UPSERT = pg_insert(customer_refs)
_UPSERT = _UPSERT.on_conflict_do_update(
    index_elements=["customer_id"],
    set_={c.name: _UPSERT.excluded[c.name] for c in customer_refs.c if c.name != "customer_id"},
    # Events may come out of order (several relays) or again (a replay): never go back.
    where=customer_refs.c.version < _UPSERT.excluded.version,
)


def apply_customers(conn: sa.Connection, customers) -> None:
    """Upsert these customers' references unless a newer version is stored (one statement)."""
    rows = [_ref_values(c) for c in customers]
    if rows:
        conn.execute(_UPSERT, rows)


def on_customer(conn: sa.Connection, event: Event) -> None:
    """customer.created/updated/deleted/undeleted.v1: the customer as it is now."""
    cls = {
        "customer.created.v1": ce.CustomerCreated,
        "customer.updated.v1": ce.CustomerUpdated,
    }.get(event.routing_key, ce.CustomerDeleted)
    apply_customers(conn, [event.parse(cls).customer])


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
        msg = event.parse(ce.CustomerMerged)
        survivor = _id(msg.survivor.name)
        merged = [_id(n) for n in msg.merged if _id(n) != survivor]
        apply_customers(conn, [msg.survivor])
        if not merged:
            return
        conn.execute(
            customer_refs.update()
            .where(customer_refs.c.customer_id.in_(merged))
            .values(deleted=True, merged_into=survivor)
        )
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
                        [audit.change("customer", audit.value(f"customers/{old}"), audit.value(msg.survivor.name))],
                    )
                    for lead_id, old in moved
                ],
                ACTOR,
            )

    def on_erased(self, conn: sa.Connection, event: Event) -> None:
        """The customer's reference loses its personal data (the event carries it blank), and so
        do the leads linked to it: names, contact details, national id, address; their search
        text is what is left (place, industry, tags) and their audit entries are redacted."""
        c = event.parse(ce.CustomerErased).customer
        apply_customers(conn, [c])
        cid = _id(c.name)
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
        msg = event.parse(ce.CustomerUnmerged)
        apply_customers(conn, [msg.survivor, *msg.restored])


# What each handler reads of its event; the consumer dead-letters an event without it.
CUSTOMER = ("customer.name", "customer.create_time")
REQUIRES = {
    "customer.created.v1": Requires(ce.CustomerCreated, CUSTOMER),
    "customer.updated.v1": Requires(ce.CustomerUpdated, CUSTOMER),
    "customer.deleted.v1": Requires(ce.CustomerDeleted, CUSTOMER),
    "customer.undeleted.v1": Requires(ce.CustomerDeleted, CUSTOMER),
    "customer.erased.v1": Requires(ce.CustomerErased, CUSTOMER),
    "customer.merged.v1": Requires(ce.CustomerMerged, ("survivor.name", "survivor.create_time", "merged")),
    "customer.unmerged.v1": Requires(ce.CustomerUnmerged, ("survivor.name", "survivor.create_time", "restored")),
}


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
    return [Subscription(domain="customer", handlers=handlers(sales), requires=REQUIRES)]
