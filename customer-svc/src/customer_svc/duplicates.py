"""Duplicates: finding customers that are probably the same, merging them with survivorship
rules (and a dry-run preview), and undoing a merge within the retention window."""

from __future__ import annotations

import datetime as dt
import json

import sqlalchemy as sa

from crm.customer.v1 import customer_events_pb2
from crm.customer.v1 import customer_service_pb2 as pb
from crm_chassis.auth import Principal
from crm_chassis.errors import DomainError, FieldViolation, InvalidArgument, NotFound
from crm_chassis.pagination import page_size

from . import adapters, domain
from .adapters import customers, merges, notes
from .integration import MappingRow, customer_to_proto
from .service_layer import AUDITED, WRITE_COLUMNS, CustomerUseCases, _json, not_found, rewrite

MERGE_RETENTION = dt.timedelta(days=30)
MAX_MERGED = 10
# Fields a merge decides value by value; lists are united instead.
SCALAR_FIELDS = [f for f in domain.WRITABLE if f not in ("type", "groups", "tags", "contact_persons", "custom_fields")]
UNITED = ("groups", "tags", "contact_persons", "custom_fields")
_FIELD_TO_KEY = {"groups": "group_ids", "rank": "rank_id"}


class FailedPrecondition(DomainError):
    reason = "FAILED_PRECONDITION"


def _empty(value) -> bool:
    return value in (None, "", [], {}, 0)


def _to_json(values: dict) -> dict:
    return json.loads(json.dumps(values, default=lambda v: v.isoformat() if isinstance(v, dt.date) else str(v)))


def _from_json(values: dict) -> dict:
    out = dict(values)
    for f in domain.DATE_FIELDS:
        if out.get(f):
            out[f] = dt.date.fromisoformat(out[f])
    return out


# The pairs of live customers that share something, as arrays of ids (oldest first).
_CANDIDATES = """
WITH live AS (
    SELECT id, create_time, national_id, lower(email) AS email, phone, mobile,
           translate(lower(display_name), 'يكة', 'یکه') AS name, lower(city) AS city
    FROM customers WHERE delete_time IS NULL AND NOT erased {only}
)
SELECT 'national_id' AS reason, array_agg(id ORDER BY create_time, id) AS ids
  FROM live WHERE national_id <> '' GROUP BY national_id HAVING count(*) > 1
UNION ALL
SELECT 'email', array_agg(id ORDER BY create_time, id) FROM live WHERE email <> '' GROUP BY email HAVING count(*) > 1
UNION ALL
SELECT 'phone', array_agg(DISTINCT id) FROM (
    SELECT id, phone AS p FROM live WHERE phone <> '' UNION ALL SELECT id, mobile FROM live WHERE mobile <> ''
) t GROUP BY p HAVING count(DISTINCT id) > 1
UNION ALL
SELECT 'name_city', array_agg(id ORDER BY create_time, id) FROM live
  WHERE name <> '' AND city <> '' GROUP BY name, city HAVING count(*) > 1
"""

# Duplicates of one customer: exact keys, or a similar name (trigram similarity) in the same city.
_OF_ONE = """
SELECT c.id, c.create_time,
       (c.national_id <> '' AND c.national_id = t.national_id) AS same_nid,
       (c.email <> '' AND lower(c.email) = lower(t.email)) AS same_email,
       (c.phone <> '' AND c.phone IN (t.phone, t.mobile)) OR (c.mobile <> '' AND c.mobile IN (t.phone, t.mobile))
           AS same_phone,
       (c.city <> '' AND lower(c.city) = lower(t.city) AND similarity(c.display_name, t.display_name) >= 0.5)
           AS similar_name
FROM customers c, customers t
WHERE t.id = :id AND c.id <> t.id AND c.delete_time IS NULL AND NOT c.erased
  AND ((c.national_id <> '' AND c.national_id = t.national_id)
       OR (c.email <> '' AND lower(c.email) = lower(t.email))
       OR (c.phone <> '' AND c.phone IN (t.phone, t.mobile)) OR (c.mobile <> '' AND c.mobile IN (t.phone, t.mobile))
       OR (c.city <> '' AND lower(c.city) = lower(t.city) AND c.display_name % t.display_name
           AND similarity(c.display_name, t.display_name) >= 0.5))
ORDER BY c.create_time, c.id
"""


class Duplicates:
    def __init__(self, uc: CustomerUseCases):
        self.uc = uc

    # -- find --------------------------------------------------------------------------------
    def find(self, customer: str, size: int, token: str) -> tuple[list[pb.DuplicateSet], str]:
        limit = page_size(size)
        with self.uc.reader.connect() as conn:
            if customer:
                cid = domain.parse_name(customer, "customer")
                if adapters.get_customer(conn, cid) is None:
                    raise NotFound(f"customer {customer} does not exist", reason="CUSTOMER_NOT_FOUND")
                rows = list(conn.execute(sa.text(_OF_ONE), {"id": cid}))
                if not rows:
                    return [], ""
                reasons = sorted(
                    {
                        r
                        for row in rows
                        for r, hit in (
                            ("national_id", row.same_nid),
                            ("email", row.same_email),
                            ("phone", row.same_phone),
                            ("name_city", row.similar_name),
                        )
                        if hit
                    }
                )
                names = [customer] + [f"customers/{r.id}" for r in rows]
                return [pb.DuplicateSet(customers=names, reasons=reasons)], ""
            groups = [(r.reason, [str(i) for i in r.ids]) for r in conn.execute(sa.text(_CANDIDATES.format(only="")))]
            created = {}
            ids = {i for _, g in groups for i in g}
            if ids:
                created = {
                    str(r.id): r.create_time
                    for r in conn.execute(
                        sa.select(customers.c.id, customers.c.create_time).where(customers.c.id.in_(list(ids)))
                    )
                }
        sets = _union(groups)
        ordered = sorted(sets, key=lambda s: (created[s[0][0]].isoformat(), s[0][0]))
        ordered = [(sorted(m, key=lambda i: (created[i], i)), r) for m, r in ordered]
        start = 0
        if token:
            key = self.uc.tokens.decode(token, "duplicates")
            start = next(
                (n for n, (m, _) in enumerate(ordered) if (created[m[0]].isoformat(), m[0]) > tuple(key)), len(ordered)
            )
        page = ordered[start : start + limit]
        nxt = ""
        if start + limit < len(ordered):
            first = page[-1][0][0]
            nxt = self.uc.tokens.encode([created[first].isoformat(), first], "duplicates")
        return [pb.DuplicateSet(customers=[f"customers/{i}" for i in m], reasons=sorted(r)) for m, r in page], nxt

    # -- merge -------------------------------------------------------------------------------
    def _plan(self, conn, req: pb.MergeCustomersRequest):
        survivor = domain.parse_name(req.survivor, "survivor")
        if not req.merged:
            raise InvalidArgument.field("merged", "name at least one customer to merge into the survivor")
        if len(req.merged) > MAX_MERGED:
            raise InvalidArgument.field("merged", f"at most {MAX_MERGED} customers per merge")
        merged = [domain.parse_name(n, f"merged[{i}]") for i, n in enumerate(req.merged)]
        if survivor in merged or len(set(merged)) != len(merged):
            raise InvalidArgument.field("merged", "must not repeat a customer or include the survivor")
        everyone = sorted([survivor, *merged])
        rows = {
            str(r.id): r
            for r in conn.execute(
                adapters.select_customers()
                .where(customers.c.id.in_(everyone))
                .order_by(customers.c.id)
                .with_for_update(of=customers)
            )
        }
        bad = []
        for cid in [survivor, *merged]:
            r = rows.get(cid)
            field = "survivor" if cid == survivor else f"merged[{merged.index(cid)}]"
            if r is None or r.erased:
                raise not_found(cid)
            if r.delete_time is not None:
                bad.append(FieldViolation(field, "is deleted or already merged"))
            elif r.type != rows[survivor].type:
                bad.append(FieldViolation(field, "a person and an organisation cannot be merged"))
        if bad:
            raise InvalidArgument(bad)
        defs = adapters.custom_field_defs(conn)
        values = {cid: self.uc.stored_values(r, defs) for cid, r in rows.items()}
        overrides = {}
        for i, fs in enumerate(req.field_sources):
            if fs.field not in SCALAR_FIELDS:
                raise InvalidArgument.field(f"field_sources[{i}].field", f"{fs.field!r} is not a field a merge chooses")
            src = domain.parse_name(fs.customer, f"field_sources[{i}].customer")
            if src not in rows:
                raise InvalidArgument.field(f"field_sources[{i}].customer", "must be the survivor or a merged customer")
            overrides[fs.field] = src
        # The default donors: the most recently updated merged customer first.
        donors = sorted(merged, key=lambda c: rows[c].update_time, reverse=True)
        result = dict(values[survivor])
        sources = []
        for f in SCALAR_FIELDS:
            key = _FIELD_TO_KEY.get(f, f)
            src = overrides.get(f)
            if src is None and _empty(result.get(key)):
                src = next((d for d in donors if not _empty(values[d].get(key))), None)
            if src is not None and src != survivor and values[src].get(key) != result.get(key):
                result[key] = values[src][key]
                sources.append(pb.FieldSource(field=f, customer=f"customers/{src}"))
        for d in [survivor, *donors]:
            v = values[d]
            if d != survivor:
                result["group_ids"] = sorted(set(result["group_ids"]) | set(v["group_ids"]))
                result["tags"] = result["tags"] + [t for t in v["tags"] if t not in result["tags"]]
                seen = {
                    (c.get("given_name"), c.get("family_name"), c.get("email"), c.get("mobile"))
                    for c in result["contact_persons"]
                }
                result["contact_persons"] = result["contact_persons"] + [
                    c
                    for c in v["contact_persons"]
                    if (c.get("given_name"), c.get("family_name"), c.get("email"), c.get("mobile")) not in seen
                ]
                result["custom_fields"] = {**v["custom_fields"], **result["custom_fields"]}
        for f in UNITED:
            key = _FIELD_TO_KEY.get(f, f)
            if _json(result.get(key)) != _json(values[survivor].get(key)):
                sources.append(pb.FieldSource(field=f, customer=""))
        result = domain.validate(result, self.uc.context(conn, old_source=values[survivor]["acquisition_source"]))
        return survivor, merged, rows, values, result, sources

    def merge(self, req: pb.MergeCustomersRequest, principal: Principal) -> pb.MergeCustomersResponse:
        with self.uc.uow.begin() as tx:
            conn = tx.conn
            survivor, merged, rows, values, result, sources = self._plan(conn, req)
            pii = principal.has("customers.pii")
            s_row = rows[survivor]
            changed = [k for k in AUDITED if _json(values[survivor].get(k)) != _json(result.get(k))]
            if req.validate_only:
                preview = dict(s_row._mapping)
                preview.update({k: result[k] for k in WRITE_COLUMNS if k in result})
                preview["group_ids"] = result["group_ids"]
                note_count = conn.execute(
                    sa.select(sa.func.count()).select_from(notes).where(notes.c.customer_id.in_(merged))
                ).scalar_one()
                conn.rollback()
                return pb.MergeCustomersResponse(
                    survivor=customer_to_proto(MappingRow(preview), None, pii),
                    field_sources=sources,
                    moved_notes=note_count,
                )
            moved = {
                m: [str(r[0]) for r in conn.execute(sa.select(notes.c.id).where(notes.c.customer_id == m))]
                for m in merged
            }
            referrals = {
                m: [
                    str(r[0]) for r in conn.execute(sa.select(customers.c.id).where(customers.c.referrer_customer == m))
                ]
                for m in merged
            }
            snapshot = {
                "before": {cid: _to_json(values[cid]) for cid in rows},
                "after": _to_json({k: result.get(k) for k in changed}),
                "changed": changed,
                "notes": moved,
                "referrals": referrals,
            }
            rewrite(conn, survivor, result, s_row.customer_code)
            conn.execute(notes.update().where(notes.c.customer_id.in_(merged)).values(customer_id=survivor))
            conn.execute(
                customers.update().where(customers.c.referrer_customer.in_(merged)).values(referrer_customer=survivor)
            )
            conn.execute(
                customers.update()
                .where(customers.c.id.in_(merged))
                .values(delete_time=sa.func.now(), merged_into=survivor, **adapters.NEW_VERSION)
            )
            merge_id = conn.execute(
                merges.insert()
                .values(survivor_id=survivor, merged_ids=merged, snapshot=snapshot, actor=principal.subject)
                .returning(merges.c.id)
            ).scalar_one()
            merge_name = f"merges/{merge_id}"
            after = adapters.get_customer(conn, survivor)
            full = customer_to_proto(after, adapters.custom_field_defs(conn) if after.custom_fields else None)
            tx.publish(
                "customer.merged.v1",
                customer_events_pb2.CustomerMerged(
                    survivor=full, merged=[f"customers/{m}" for m in merged], merge=merge_name
                ),
                full.name,
            )
            tx.audit(
                full.name,
                "merge",
                principal,
                [{"field": "merged", "old_value": "null", "new_value": _json([f"customers/{m}" for m in merged])}]
                + [
                    {"field": k, "old_value": _json(values[survivor].get(k)), "new_value": _json(result.get(k))}
                    for k in changed
                ],
            )
            for m in merged:
                tx.audit(
                    f"customers/{m}",
                    "merged_into",
                    principal,
                    [{"field": "merged_into", "old_value": "null", "new_value": _json(full.name)}],
                )
            resp = pb.MergeCustomersResponse(
                survivor=customer_to_proto(after, None, pii),
                merge=merge_name,
                field_sources=sources,
                moved_notes=sum(len(v) for v in moved.values()),
            )
        return resp

    # -- unmerge -----------------------------------------------------------------------------
    def unmerge(self, merge_name: str, principal: Principal) -> pb.UnmergeCustomersResponse:
        mid = domain.parse_id(merge_name, "merges", "merge")
        with self.uc.uow.begin() as tx:
            conn = tx.conn
            m = conn.execute(sa.select(merges).where(merges.c.id == mid).with_for_update()).one_or_none()
            if m is None:
                raise NotFound(f"merge {merge_name} does not exist", reason="MERGE_NOT_FOUND")
            if m.undo_time is not None:
                raise FailedPrecondition(f"{merge_name} was already undone", reason="MERGE_ALREADY_UNDONE")
            if m.create_time < dt.datetime.now(dt.UTC) - MERGE_RETENTION:
                raise FailedPrecondition(
                    f"{merge_name} is older than {MERGE_RETENTION.days} days and can no longer be undone",
                    reason="MERGE_RETENTION_EXPIRED",
                )
            snap = m.snapshot
            survivor = str(m.survivor_id)
            current = adapters.get_customer(conn, survivor, for_update=True)
            defs = adapters.custom_field_defs(conn)
            now_values = self.uc.stored_values(current, defs)
            before = _from_json(snap["before"][survivor])
            after = _from_json(snap["after"])
            restored_values = dict(now_values)
            for k in snap["changed"]:
                # A field edited since the merge keeps its newer value; others go back.
                if _json(now_values.get(k)) == _json(after.get(k)):
                    restored_values[k] = before.get(k)
            restored_values = domain.validate(
                restored_values, self.uc.context(conn, old_source=now_values["acquisition_source"])
            )
            rewrite(conn, survivor, restored_values, current.customer_code)
            restored = []
            for mid_ in (str(x) for x in m.merged_ids):
                v = _from_json(snap["before"][mid_])
                rewrite(conn, mid_, v, v.get("customer_code", ""), delete_time=None, merged_into=None)
                if snap["notes"].get(mid_):
                    conn.execute(notes.update().where(notes.c.id.in_(snap["notes"][mid_])).values(customer_id=mid_))
                if snap["referrals"].get(mid_):
                    conn.execute(
                        customers.update()
                        .where(customers.c.id.in_(snap["referrals"][mid_]))
                        .values(referrer_customer=mid_)
                    )
                restored.append(mid_)
            conn.execute(merges.update().where(merges.c.id == mid).values(undo_time=sa.func.now()))
            s_row = adapters.get_customer(conn, survivor)
            r_rows = adapters.get_customers(conn, restored)
            full = customer_to_proto(s_row, defs)
            tx.publish(
                "customer.unmerged.v1",
                customer_events_pb2.CustomerUnmerged(
                    survivor=full, restored=[customer_to_proto(r, defs) for r in r_rows], merge=merge_name
                ),
                full.name,
            )
            tx.audit(
                full.name,
                "unmerge",
                principal,
                [{"field": "merge", "old_value": _json(merge_name), "new_value": "null"}],
            )
            pii = principal.has("customers.pii")
            resp = pb.UnmergeCustomersResponse(
                survivor=customer_to_proto(s_row, defs, pii), restored=[customer_to_proto(r, defs, pii) for r in r_rows]
            )
        return resp


def _union(groups: list[tuple[str, list[str]]]) -> list[tuple[list[str], set[str]]]:
    """Union-find over the candidate groups: customers linked by any reason form one set."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for _, ids in groups:
        for other in ids[1:]:
            parent[find(other)] = find(ids[0])
    members: dict[str, list[str]] = {}
    reasons: dict[str, set[str]] = {}
    for reason, ids in groups:
        root = find(ids[0])
        reasons.setdefault(root, set()).add(reason)
    for x in list(parent):
        members.setdefault(find(x), []).append(x)
    return [(sorted(m), reasons.get(root, set())) for root, m in members.items() if len(m) > 1]
