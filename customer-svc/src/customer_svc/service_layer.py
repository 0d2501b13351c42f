"""Customer use cases. Each runs in one transaction of the chassis unit of work: the state
change, its audit entry and its event (outbox row) commit together, or none of them does."""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid

import sqlalchemy as sa

from crm.customer.v1 import customer_events_pb2, customer_pb2
from crm_chassis import audit, persian
from crm_chassis.auth import Principal
from crm_chassis.errors import FieldViolation, InvalidArgument, NotFound
from crm_chassis.messaging.outbox import OutboxRelay
from crm_chassis.pagination import PageTokens, page_size
from crm_chassis.resources import ResourceName, check_etag
from crm_chassis.uow import Transaction, UnitOfWork

from . import adapters, domain, queries
from .adapters import customers
from .integration import MappingRow, customer_to_proto, mask_pii, values_from_proto

log = logging.getLogger("customer_svc")

# Columns a write may set (groups and rank are kept as group_ids / rank_id).
WRITE_COLUMNS = [f for f in domain.WRITABLE if f not in ("groups", "rank")] + ["rank_id", "display_name", "search_text"]
AUDITED = [c for c in WRITE_COLUMNS if c not in ("search_text", "display_name")] + ["group_ids"]
ERASED_FIELDS = (
    "given_name",
    "family_name",
    "organization_name",
    "title_prefix",
    "email",
    "phone",
    "fax",
    "mobile",
    "website",
    "address",
    "postal_code",
    "po_box",
    "birth_certificate_number",
    "national_id",
    "birth_date",
    "marriage_date",
    "field_of_study",
    "contact_persons",
    "referrer_staff",
    "referrer_customer",
    "tags",
    "custom_fields",
)


# Fuzzy search: a word is "similar" from this trigram word-similarity on (pg_trgm's default
# 0.6 misses one-letter typos in short names such as Rezaie/Rezaei).
WORD_SIMILARITY_THRESHOLD = 0.45


def _session_settings(dbapi_connection, _record) -> None:
    with dbapi_connection.cursor() as cur:
        cur.execute(f"SET pg_trgm.word_similarity_threshold = {WORD_SIMILARITY_THRESHOLD}")
    dbapi_connection.commit()


_json = audit.value  # a value as the audit trail keeps it (JSON text)
_QUOTE = json.encoder.encode_basestring


# The columns a new customer's row fills, in order (an import COPYs them in this order).
INSERT_COLUMNS = [c for c in WRITE_COLUMNS if c != "search_text"]
STORED_COLUMNS = [*INSERT_COLUMNS, "id", "customer_code", "search_text", "version", "create_time", "update_time"]


class NewCustomer:
    """A new customer as it is stored, published and audited: the one definition CreateCustomer
    and ImportCustomers share. Everything but the customer code and the transaction's time
    needs no database, so an import makes these in its worker processes (it pickles)."""

    __slots__ = ("id", "values", "search_rest", "changes", "proto")

    def __init__(self, v: dict, custom_defs: dict | None, cid: str):
        self.id = cid
        self.values = v
        self.search_rest = domain.search_key(v, "")  # its search key but for the customer code
        # Its audit entry (JSON text): every field set, that is every truthy one.
        self.changes = (
            "["
            + ", ".join(
                f'{{"field": "{k}", "new_value": {_QUOTE(_json(v.get(k)))}, "old_value": "null"}}'
                for k in AUDITED
                if v.get(k)
            )
            + "]"
        )
        m = {k: v[k] for k in INSERT_COLUMNS}
        m.update(id=cid, version=1, group_ids=v["group_ids"])
        # Its Customer message but for customer_code, create_time and update_time.
        self.proto = customer_to_proto(MappingRow(m), custom_defs if v["custom_fields"] else None).SerializeToString()

    def __getstate__(self):
        return tuple(getattr(self, k) for k in self.__slots__)

    def __setstate__(self, state):
        for k, v in zip(self.__slots__, state, strict=True):
            setattr(self, k, v)

    def search_text(self, code: str) -> str:
        """domain.search_key(values, code): the code put in front of the rest."""
        key = persian.normalize(code)
        return f"{key} {self.search_rest}" if self.search_rest else key

    def event(self, code: str, now: dt.datetime) -> customer_events_pb2.CustomerCreated:
        """Its customer.created.v1 event: the customer exactly as stored."""
        event = customer_events_pb2.CustomerCreated()
        c = event.customer
        c.MergeFromString(self.proto)
        c.customer_code = code
        c.create_time.FromDatetime(now)
        c.update_time.CopyFrom(c.create_time)
        return event

    def row(self, code: str, now: dt.datetime) -> dict:
        """Its row as an INSERT takes it (an import COPYs the same columns: STORED_COLUMNS)."""
        v = self.values
        row = {c: v[c] for c in INSERT_COLUMNS}
        row.update(id=self.id, customer_code=code, search_text=self.search_text(code), version=1)
        row.update(create_time=now, update_time=now)
        return row

    def write(self, tx: Transaction, code: str, now: dt.datetime, request_id: str = "") -> customer_pb2.Customer:
        """Insert it (one customer: CreateCustomer), its groups, its event; the audit entry is
        the caller's (the action differs). Returns the stored Customer."""
        event = self.event(code, now)
        tx.execute(adapters.INSERT, {**self.row(code, now), "request_id": request_id or None})
        if self.values["group_ids"]:
            adapters.set_groups(tx.conn, self.id, self.values["group_ids"])
        tx.publish("customer.created.v1", event, event.customer.name)
        return event.customer


def write_values(v: dict, code: str) -> dict:
    """The columns a write stores for validated values `v`, the search key included."""
    out = {k: v.get(k) for k in WRITE_COLUMNS if k != "search_text"}
    out["search_text"] = domain.search_key(v, code)
    return out


def rewrite(conn: sa.Connection, cid: str, v: dict, code: str, groups: bool = True, **extra) -> None:
    """Store validated values `v` over customer `cid` as its next version (search key included,
    with `extra` columns such as delete_time), and with `groups` its group memberships too."""
    conn.execute(
        customers.update().where(customers.c.id == cid).values(**write_values(v, code), **extra, **adapters.NEW_VERSION)
    )
    if groups:
        adapters.set_groups(conn, cid, v.get("group_ids") or [])


CUSTOMER = ResourceName("customers/{id}")


def not_found(customer_id: str) -> NotFound:
    return CUSTOMER.not_found([customer_id])


class CustomerUseCases:
    def __init__(
        self,
        engine: sa.Engine,
        relay: OutboxRelay | None,
        token_secret: str,
        service_name: str,
        default_region: str = "IR",
    ):
        self.engine = engine
        self.uow = UnitOfWork(engine, relay, source_service=service_name, event_domain="customer")
        self.reader = self.uow.reader
        sa.event.listen(engine, "connect", _session_settings)
        self.tokens = PageTokens(token_secret, "customers")
        self.service_name = service_name
        self.default_region = default_region

    # -- helpers -----------------------------------------------------------------------------
    def context(self, conn: sa.Connection, old_source: str | None = None, source: str | None = None) -> domain.Context:
        """What validation needs; with `source`, only that acquisition source is looked up."""
        only = None if source is None else [source.strip().lower()]
        sources, defs = adapters.validation_lookups(conn, only)
        return domain.Context(sources, defs, self.default_region, old_source)

    def to_proto(self, conn, row, principal: Principal, defs=None) -> customer_pb2.Customer:
        if defs is None and row._mapping.get("custom_fields"):
            defs = adapters.custom_field_defs(conn)
        return customer_to_proto(row, defs, pii=principal.has("customers.pii"))

    def _check_references(self, conn, v: dict) -> None:
        bad = []
        missing = set(v.get("group_ids") or []) - adapters.existing_ids(conn, adapters.groups, v.get("group_ids") or [])
        if missing:
            bad.append(
                FieldViolation("customer.groups", f"no such group: {', '.join('groups/' + m for m in sorted(missing))}")
            )
        if v.get("rank_id") and not adapters.existing_ids(conn, adapters.ranks, [v["rank_id"]]):
            bad.append(FieldViolation("customer.rank", f"no such rank: ranks/{v['rank_id']}"))
        if v.get("referrer_customer") and not adapters.existing_ids(conn, customers, [v["referrer_customer"]]):
            bad.append(FieldViolation("customer.referrer_customer", "no such customer"))
        if bad:
            raise InvalidArgument(bad)

    @staticmethod
    def stored_values(row, defs) -> dict:
        """A stored row as the plain values validation works on."""
        from crm.customer.v1 import resources_pb2

        m = dict(row._mapping)
        m["group_ids"] = sorted(str(g) for g in (m.get("group_ids") or []))
        m["rank_id"] = str(m["rank_id"]) if m.get("rank_id") else None
        m["referrer_customer"] = str(m["referrer_customer"]) if m.get("referrer_customer") else None
        cf = {}
        for k, v in (m.get("custom_fields") or {}).items():
            d = defs.get(k)
            cf[k] = dt.date.fromisoformat(v) if d is not None and d.type == resources_pb2.CUSTOM_FIELD_TYPE_DATE else v
        m["custom_fields"] = cf
        return m

    # -- create ------------------------------------------------------------------------------
    def create(self, c: customer_pb2.Customer, request_id: str, principal: Principal) -> customer_pb2.Customer:
        if len(request_id) > 128:
            raise InvalidArgument.field("request_id", "must be at most 128 characters")
        v = values_from_proto(c, domain.WRITABLE)
        v["owner"] = v.get("owner") or principal.subject
        v["lifecycle_stage"] = v.get("lifecycle_stage") or customer_pb2.LIFECYCLE_STAGE_PROSPECT
        try:
            with self.uow.begin() as tx:
                if request_id:
                    existing = adapters.get_by_request_id(tx.conn, request_id)
                    if existing is not None:
                        return self.to_proto(tx.conn, existing, principal)
                # Sources, custom fields, the customer code and the time in one round trip (a
                # code a rejected request took is a gap in the numbering, as with any sequence).
                sources, defs, code, now = adapters.validation_lookups(
                    tx.conn, [(v.get("acquisition_source") or "").strip().lower()], code=True
                )
                ctx = domain.Context(sources, defs, self.default_region, None)
                v = domain.validate(v, ctx)
                self._check_references(tx.conn, v)
                new = NewCustomer(v, ctx.custom_defs, str(uuid.uuid4()))
                full = new.write(tx, code, now, request_id)
                tx.audit(full.name, "create", principal, json.loads(new.changes))
        except sa.exc.IntegrityError:
            if request_id:  # a concurrent retry with the same request_id won the race
                with self.reader.connect() as conn:
                    existing = adapters.get_by_request_id(conn, request_id)
                    if existing is not None:
                        return self.to_proto(conn, existing, principal)
            raise
        return full if principal.has("customers.pii") else mask_pii(full)

    # -- read --------------------------------------------------------------------------------
    def get(self, customer_id: str, principal: Principal) -> customer_pb2.Customer:
        with self.reader.connect() as conn:
            row = adapters.get_customer(conn, customer_id)
            if row is None:
                raise not_found(customer_id)
            return self.to_proto(conn, row, principal)

    def list(
        self, size: int, token: str, filter_text: str, order_by: str, show_deleted: bool, principal: Principal
    ) -> tuple[list[customer_pb2.Customer], str]:
        limit = page_size(size)
        with self.reader.connect() as conn:
            rows, next_token = queries.list_page(
                conn, self.tokens, limit, token, filter_text, order_by, show_deleted, principal.has("customers.pii")
            )
            defs = adapters.custom_field_defs(conn) if any(r.custom_fields for r in rows) else None
            return [self.to_proto(conn, r, principal, defs) for r in rows], next_token

    def search(
        self, query: str, size: int, token: str, filter_text: str, principal: Principal
    ) -> tuple[list[tuple[customer_pb2.Customer, float]], str]:
        limit = page_size(size, default=20, maximum=100)
        with self.reader.connect() as conn:
            hits, next_token = queries.search_page(
                conn, self.tokens, query, limit, token, filter_text, principal.has("customers.pii")
            )
            defs = adapters.custom_field_defs(conn) if any(r.custom_fields for r, _ in hits) else None
            return [(self.to_proto(conn, r, principal, defs), score) for r, score in hits], next_token

    # -- update ------------------------------------------------------------------------------
    def update(self, c: customer_pb2.Customer, paths: list[str], principal: Principal) -> customer_pb2.Customer:
        cid = domain.parse_name(c.name, "customer.name")
        if not paths:
            raise InvalidArgument.field("update_mask", 'name at least one field, or "*" for all writable fields')
        if paths == ["*"]:
            paths = [f for f in domain.WRITABLE if f != "type"]
        unknown = [p for p in paths if p not in domain.WRITABLE]
        if unknown:
            raise InvalidArgument.field("update_mask", f"not updatable: {', '.join(unknown)}")
        if "type" in paths:
            raise InvalidArgument.field("update_mask", "type cannot be changed; create a new customer instead")
        new = values_from_proto(c, paths)
        with self.uow.begin() as tx:
            conn = tx.conn
            row = adapters.get_customer(conn, cid, for_update=True)
            if row is None or row.erased:
                raise not_found(cid)
            check_etag(c.etag, row.version, c.name)
            defs = adapters.custom_field_defs(conn)
            old = self.stored_values(row, defs)
            merged = domain.validate({**old, **new}, self.context(conn, old_source=old["acquisition_source"]))
            self._check_references(conn, {k: merged.get(k) for k in new})
            changed = [k for k in AUDITED if _json(old.get(k)) != _json(merged.get(k))]
            if not changed:
                return self.to_proto(conn, row, principal, defs)
            rewrite(conn, cid, merged, row.customer_code, groups="group_ids" in changed)
            row = adapters.get_customer(conn, cid)
            full = customer_to_proto(row, defs)
            fields = [{"group_ids": "groups", "rank_id": "rank"}.get(k, k) for k in changed]
            tx.publish(
                "customer.updated.v1",
                customer_events_pb2.CustomerUpdated(customer=full, changed_fields=fields),
                full.name,
            )
            tx.audit(
                full.name,
                "update",
                principal,
                [
                    {"field": f, "old_value": _json(old.get(k)), "new_value": _json(merged.get(k))}
                    for f, k in zip(fields, changed, strict=True)
                ],
            )
            return self.to_proto(conn, row, principal, defs)

    # -- delete / undelete / erase -----------------------------------------------------------
    def _set_deleted(self, cid: str, etag: str, deleted: bool, principal: Principal) -> customer_pb2.Customer:
        with self.uow.begin() as tx:
            conn = tx.conn
            row = adapters.get_customer(conn, cid, for_update=True)
            if row is None or row.erased:
                raise not_found(cid)
            check_etag(etag, row.version, f"customers/{cid}")
            if (row.delete_time is not None) == deleted:
                return self.to_proto(conn, row, principal)
            conn.execute(
                customers.update()
                .where(customers.c.id == cid)
                .values(delete_time=sa.func.now() if deleted else None, **adapters.NEW_VERSION)
            )
            row = adapters.get_customer(conn, cid)
            full = customer_to_proto(row, adapters.custom_field_defs(conn) if row.custom_fields else None)
            action = "delete" if deleted else "undelete"
            tx.publish(f"customer.{action}d.v1", customer_events_pb2.CustomerDeleted(customer=full), full.name)
            tx.audit(full.name, action, principal, [])
            return self.to_proto(conn, row, principal)

    def delete(self, cid: str, etag: str, principal: Principal) -> customer_pb2.Customer:
        return self._set_deleted(cid, etag, True, principal)

    def undelete(self, cid: str, principal: Principal) -> customer_pb2.Customer:
        return self._set_deleted(cid, "", False, principal)

    def erase(self, cid: str, reason: str, principal: Principal) -> customer_pb2.Customer:
        """Right to be forgotten: blank the personal fields, drop notes and their PII from the
        audit trail; keep type, kind, source, city/province and the dates for the aggregates."""
        with self.uow.begin() as tx:
            conn = tx.conn
            row = adapters.get_customer(conn, cid, for_update=True)
            if row is None:
                raise not_found(cid)
            if row.erased:
                return self.to_proto(conn, row, principal)
            blank = {}
            for f in ERASED_FIELDS:
                col = customers.c[f]
                if isinstance(col.type, sa.Text):
                    blank[f] = ""
                elif f in ("tags",) or f in ("contact_persons",):
                    blank[f] = []
                elif f in ("custom_fields",):
                    blank[f] = {}
                else:
                    blank[f] = None
            label = "[erased]"
            blank.update(
                display_name=label,
                search_text="",
                erased=True,
                owner=row.owner,
                **adapters.NEW_VERSION,
            )
            if row.type == domain.ORGANIZATION:
                blank["organization_name"] = label
            conn.execute(customers.update().where(customers.c.id == cid).values(**blank))
            conn.execute(adapters.notes.delete().where(adapters.notes.c.customer_id == cid))
            name = f"customers/{cid}"
            # Old audit entries must not keep what was erased, notes' entries included: drop
            # their values, keep who/when/which.
            tx.redact_audit(name)
            row = adapters.get_customer(conn, cid)
            full = customer_to_proto(row)
            tx.publish("customer.erased.v1", customer_events_pb2.CustomerErased(customer=full), name)
            tx.audit(name, "erase", principal, [{"field": "reason", "old_value": "null", "new_value": _json(reason)}])
            return self.to_proto(conn, row, principal)
