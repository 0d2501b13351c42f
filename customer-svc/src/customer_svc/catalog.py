"""Groups, ranks, acquisition sources, custom field definitions, notes and the audit trail."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from crm.customer.v1 import customer_events_pb2, resources_pb2
from crm_chassis import audit
from crm_chassis.auth import Principal
from crm_chassis.errors import AlreadyExists, FieldViolation, InvalidArgument, PermissionDenied
from crm_chassis.filtering import keyset_page, newest_first
from crm_chassis.pagination import page_size
from crm_chassis.resources import ResourceName, Updatable, UpdateMask, required_text, text

from . import adapters, domain
from .adapters import acquisition_sources, custom_field_defs_table, group_members, groups, notes, ranks
from .integration import customer_to_proto, ts
from .service_layer import CustomerUseCases, not_found

MAX_BULK = 10_000


def group_to_proto(row, members: int | None = None) -> resources_pb2.Group:
    return resources_pb2.Group(
        name=f"groups/{row.id}",
        display_name=row.display_name,
        description=row.description,
        member_count=members if members is not None else int(row._mapping.get("members", 0)),
        create_time=ts(row.create_time),
        etag=f'"{row.version}"',
    )


def rank_to_proto(row) -> resources_pb2.Rank:
    return resources_pb2.Rank(
        name=f"ranks/{row.id}",
        display_name=row.display_name,
        position=row.position,
        create_time=ts(row.create_time),
        etag=f'"{row.version}"',
    )


def source_to_proto(row) -> resources_pb2.AcquisitionSource:
    return resources_pb2.AcquisitionSource(
        name=f"acquisitionSources/{row.key}", key=row.key, display_name=row.display_name, retired=row.retired
    )


def note_to_proto(row) -> resources_pb2.Note:
    return resources_pb2.Note(
        name=f"customers/{row.customer_id}/notes/{row.id}",
        text=row.text,
        author=row.author,
        create_time=ts(row.create_time),
        update_time=ts(row.update_time),
        etag=f'"{row.version}"',
    )


def _name(value: str, field: str, limit: int = 100) -> str:
    v = (value or "").strip()
    if not v:
        raise InvalidArgument.field(field, "must not be empty")
    if len(v) > limit:
        raise InvalidArgument.field(field, f"must be at most {limit} characters")
    return v


def _customer_ids(names: list[str], field: str) -> list[str]:
    if not names:
        raise InvalidArgument.field(field, "name at least one customer")
    if len(names) > MAX_BULK:
        raise InvalidArgument.field(field, f"at most {MAX_BULK} customers per call")
    bad, ids = [], []
    for i, n in enumerate(names):
        try:
            ids.append(domain.parse_name(n, f"{field}[{i}]"))
        except InvalidArgument as e:
            bad += e.violations
    if bad:
        raise InvalidArgument(bad[:20])
    return sorted(set(ids))


# The Update use cases of the catalog, declared: mask, name, lock, NOT_FOUND, etag, write
# with the version bumped, unique names as ALREADY_EXISTS (crm_chassis.resources).
GROUPS = Updatable(
    groups,
    ResourceName("groups/{id}"),
    UpdateMask(["display_name", "description"]),
    message_field="group",
    convert={"display_name": required_text(100), "description": text()},
)
RANKS = Updatable(
    ranks,
    ResourceName("ranks/{id}"),
    UpdateMask(["display_name", "position"]),
    message_field="rank",
    convert={"display_name": required_text(100)},
)
SOURCES = Updatable(
    acquisition_sources,
    ResourceName("acquisitionSources/{key}", singular="source", key=r"[a-z0-9_-]{1,40}"),
    UpdateMask(["display_name", "retired"]),
    message_field="acquisition_source",
    convert={"display_name": required_text(100)},
    key_columns=["key"],
    version_column=None,  # sources carry no etag
)
NOTES = Updatable(
    notes,
    ResourceName("customers/{customer_id}/notes/{note_id}"),
    UpdateMask(["text"]),
    message_field="note",
    convert={"text": required_text()},
    key_columns=["customer_id", "id"],
    touch={"update_time": sa.func.now()},
    conflict=None,
)


class Catalog:
    def __init__(self, customers: CustomerUseCases):
        self.c = customers
        self.reader = customers.reader

    def _unique(self, conn, fn):
        try:
            with conn.begin_nested():
                return fn()
        except sa.exc.IntegrityError:
            raise AlreadyExists("a record with that name already exists", reason="ALREADY_EXISTS") from None

    def _publish_members_changed(self, tx, ids: list[str], field: str) -> None:
        """customer.updated.v1 for every customer whose groups or rank changed (set-based read)."""
        for row in adapters.get_customers(tx.conn, ids):
            full = customer_to_proto(row)
            tx.publish(
                "customer.updated.v1",
                customer_events_pb2.CustomerUpdated(customer=full, changed_fields=[field]),
                full.name,
            )

    # -- groups ------------------------------------------------------------------------------
    def create_group(self, g: resources_pb2.Group, principal: Principal) -> resources_pb2.Group:
        name = _name(g.display_name, "group.display_name")
        with self.c.uow.begin() as tx:
            conn = tx.conn
            row = self._unique(
                conn,
                lambda: conn.execute(
                    groups.insert().values(display_name=name, description=g.description.strip()).returning(*groups.c)
                ).one(),
            )
            tx.audit(
                f"groups/{row.id}",
                "group.create",
                principal,
                [audit.change("display_name", "null", audit.value(name))],
            )
        return group_to_proto(row, 0)

    def _group(self, conn, name: str, field: str = "group", lock: bool = False):
        gid = domain.parse_id(name, "groups", field)
        q = sa.select(groups).where(groups.c.id == gid)
        row = conn.execute(q.with_for_update() if lock else q).one_or_none()
        if row is None:
            raise GROUPS.name.not_found(name)
        return row

    def _members(self, conn, gid: str) -> int:
        return conn.execute(
            sa.select(sa.func.count())
            .select_from(group_members)
            .join(adapters.customers, adapters.customers.c.id == group_members.c.customer_id)
            .where(group_members.c.group_id == gid, adapters.customers.c.delete_time.is_(None))
        ).scalar_one()

    def update_group(self, g: resources_pb2.Group, paths: list[str], principal: Principal) -> resources_pb2.Group:
        with self.c.uow.begin() as tx:
            done = GROUPS.update(tx.conn, g, paths)
            if done.changes:
                tx.audit(g.name, "group.update", principal, done.audit_changes())
            return group_to_proto(done.row, self._members(tx.conn, done.row.id))

    def delete_group(self, name: str, principal: Principal) -> int:
        with self.c.uow.begin() as tx:
            conn = tx.conn
            row = self._group(conn, name, "name", lock=True)
            ids = [
                str(r[0])
                for r in conn.execute(sa.select(group_members.c.customer_id).where(group_members.c.group_id == row.id))
            ]
            conn.execute(groups.delete().where(groups.c.id == row.id))
            self._publish_members_changed(tx, ids, "groups")
            tx.audit(name, "group.delete", principal, [])
        return len(ids)

    def list_groups(self, size: int, token: str) -> tuple[list[resources_pb2.Group], str]:
        limit = page_size(size)
        members = (
            sa.select(sa.func.count())
            .select_from(group_members)
            .join(adapters.customers, adapters.customers.c.id == group_members.c.customer_id)
            .where(group_members.c.group_id == groups.c.id, adapters.customers.c.delete_time.is_(None))
            .scalar_subquery()
            .label("members")
        )
        by_name = sa.func.lower(groups.c.display_name).label("sort_name")
        with self.reader.connect() as conn:
            rows, nxt = keyset_page(
                conn,
                sa.select(*groups.c, members, by_name),
                [(by_name, False), (groups.c.id, False)],
                self.c.tokens,
                "groups",
                limit,
                token,
            )
        return [group_to_proto(r) for r in rows], nxt

    def add_members(self, group: str, names: list[str], principal: Principal) -> int:
        ids = _customer_ids(names, "customers")
        with self.c.uow.begin() as tx:
            conn = tx.conn
            row = self._group(conn, group)
            missing = set(ids) - adapters.existing_ids(conn, adapters.customers, ids)
            if missing:
                raise InvalidArgument(
                    [FieldViolation("customers", f"no such customer: customers/{m}") for m in sorted(missing)[:20]]
                )
            added = [
                str(r[0])
                for r in conn.execute(
                    pg.insert(group_members)
                    .from_select(
                        ["group_id", "customer_id"],
                        sa.select(
                            sa.literal(row.id, adapters.UUID), sa.func.unnest(sa.literal(ids, pg.ARRAY(adapters.UUID)))
                        ),
                    )
                    .on_conflict_do_nothing()
                    .returning(group_members.c.customer_id)
                )
            ]
            if added:
                self._bump(conn, added)
                self._publish_members_changed(tx, added, "groups")
                self._audit_bulk(tx, added, "group.add", principal, "groups", group)
        return len(added)

    def remove_members(self, group: str, names: list[str], principal: Principal) -> int:
        ids = _customer_ids(names, "customers")
        with self.c.uow.begin() as tx:
            conn = tx.conn
            row = self._group(conn, group)
            removed = [
                str(r[0])
                for r in conn.execute(
                    group_members.delete()
                    .where(group_members.c.group_id == row.id, group_members.c.customer_id.in_(ids))
                    .returning(group_members.c.customer_id)
                )
            ]
            if removed:
                self._bump(conn, removed)
                self._publish_members_changed(tx, removed, "groups")
                self._audit_bulk(tx, removed, "group.remove", principal, "groups", group)
        return len(removed)

    def _bump(self, conn, ids: list[str]) -> None:
        c = adapters.customers
        conn.execute(c.update().where(c.c.id.in_(ids)).values(**adapters.NEW_VERSION))

    def _audit_bulk(self, tx, ids, action, principal, field, value) -> None:
        added = action.endswith("add")
        change = [
            {
                "field": field,
                "old_value": "null" if added else audit.value(value),
                "new_value": audit.value(value) if added else "null",
            }
        ]
        tx.audit_many([(f"customers/{i}", action, change) for i in ids], principal)

    def list_members(self, group: str, size: int, token: str, principal: Principal):
        with self.reader.connect() as conn:
            row = self._group(conn, group)
        return self.c.list(size, token, f'group = "groups/{row.id}"', "", False, principal)

    # -- ranks -------------------------------------------------------------------------------
    def create_rank(self, r: resources_pb2.Rank, principal: Principal) -> resources_pb2.Rank:
        name = _name(r.display_name, "rank.display_name")
        with self.c.uow.begin() as tx:
            conn = tx.conn
            row = self._unique(
                conn,
                lambda: conn.execute(
                    ranks.insert().values(display_name=name, position=r.position).returning(*ranks.c)
                ).one(),
            )
            tx.audit(f"ranks/{row.id}", "rank.create", principal, [])
        return rank_to_proto(row)

    def _rank(self, conn, name: str, field: str, lock: bool = False):
        rid = domain.parse_id(name, "ranks", field)
        q = sa.select(ranks).where(ranks.c.id == rid)
        row = conn.execute(q.with_for_update() if lock else q).one_or_none()
        if row is None:
            raise RANKS.name.not_found(name)
        return row

    def update_rank(self, r: resources_pb2.Rank, paths: list[str], principal: Principal) -> resources_pb2.Rank:
        with self.c.uow.begin() as tx:
            done = RANKS.update(tx.conn, r, paths)
            if done.changes:
                tx.audit(r.name, "rank.update", principal, done.audit_changes())
        return rank_to_proto(done.row)

    def delete_rank(self, name: str, principal: Principal) -> int:
        with self.c.uow.begin() as tx:
            conn = tx.conn
            row = self._rank(conn, name, "name", lock=True)
            c = adapters.customers
            ids = [
                str(x[0])
                for x in conn.execute(
                    c.update()
                    .where(c.c.rank_id == row.id)
                    .values(rank_id=None, **adapters.NEW_VERSION)
                    .returning(c.c.id)
                )
            ]
            conn.execute(ranks.delete().where(ranks.c.id == row.id))
            self._publish_members_changed(tx, ids, "rank")
            tx.audit(name, "rank.delete", principal, [])
        return len(ids)

    def list_ranks(self) -> list[resources_pb2.Rank]:
        with self.reader.connect() as conn:
            return [rank_to_proto(r) for r in conn.execute(sa.select(ranks).order_by(ranks.c.position, ranks.c.id))]

    def assign_rank(self, rank: str, names: list[str], principal: Principal) -> int:
        ids = _customer_ids(names, "customers")
        with self.c.uow.begin() as tx:
            conn = tx.conn
            rid = self._rank(conn, rank, "rank").id if rank else None
            c = adapters.customers
            changed = [
                str(x[0])
                for x in conn.execute(
                    c.update()
                    .where(c.c.id.in_(ids), c.c.rank_id.is_distinct_from(rid))
                    .values(rank_id=rid, **adapters.NEW_VERSION)
                    .returning(c.c.id)
                )
            ]
            if changed:
                self._publish_members_changed(tx, changed, "rank")
                self._audit_bulk(tx, changed, "rank.assign", principal, "rank", rank or None)
        return len(changed)

    # -- acquisition sources and custom fields -----------------------------------------------
    def create_source(self, s: resources_pb2.AcquisitionSource, principal: Principal):
        key = s.key.strip().lower()
        if not domain.source_key_ok(key):
            raise InvalidArgument.field("acquisition_source.key", "must be 1-40 of a-z, 0-9, '_' or '-'")
        with self.c.uow.begin() as tx:
            conn = tx.conn
            row = self._unique(
                conn,
                lambda: conn.execute(
                    acquisition_sources.insert()
                    .values(key=key, display_name=s.display_name.strip() or key)
                    .returning(*acquisition_sources.c)
                ).one(),
            )
            tx.audit(f"acquisitionSources/{key}", "source.create", principal, [])
        return source_to_proto(row)

    def list_sources(self, show_retired: bool):
        q = sa.select(acquisition_sources).order_by(acquisition_sources.c.key)
        if not show_retired:
            q = q.where(acquisition_sources.c.retired.is_(False))
        with self.reader.connect() as conn:
            return [source_to_proto(r) for r in conn.execute(q)]

    def update_source(self, s: resources_pb2.AcquisitionSource, paths: list[str], principal: Principal):
        with self.c.uow.begin() as tx:
            done = SOURCES.update(tx.conn, s, paths)
            if done.changes:
                tx.audit(s.name, "source.update", principal, done.audit_changes())
        return source_to_proto(done.row)

    def create_custom_field(self, d: resources_pb2.CustomFieldDefinition, principal: Principal):
        key = d.key.strip()
        bad = []
        if not (key and key.isidentifier() and key.isascii() and len(key) <= 40):
            bad.append(
                FieldViolation(
                    "custom_field_definition.key", "must be 1-40 letters, digits or '_', not starting with a digit"
                )
            )
        if d.type == resources_pb2.CUSTOM_FIELD_TYPE_UNSPECIFIED:
            bad.append(FieldViolation("custom_field_definition.type", "is required"))
        choices = [c.strip() for c in d.choices if c.strip()]
        if d.type == resources_pb2.CUSTOM_FIELD_TYPE_CHOICE and not choices:
            bad.append(FieldViolation("custom_field_definition.choices", "a CHOICE field needs choices"))
        if bad:
            raise InvalidArgument(bad)
        with self.c.uow.begin() as tx:
            conn = tx.conn
            row = self._unique(
                conn,
                lambda: conn.execute(
                    custom_field_defs_table.insert()
                    .values(
                        key=key,
                        display_name=d.display_name.strip() or key,
                        type=d.type,
                        choices=choices,
                        required=d.required,
                    )
                    .returning(*custom_field_defs_table.c)
                ).one(),
            )
            tx.audit(f"customFieldDefinitions/{key}", "custom_field.create", principal, [])
        return self._def_proto(row)

    @staticmethod
    def _def_proto(row):
        return resources_pb2.CustomFieldDefinition(
            name=f"customFieldDefinitions/{row.key}",
            key=row.key,
            display_name=row.display_name,
            type=row.type,
            choices=list(row.choices),
            required=row.required,
        )

    def list_custom_fields(self):
        with self.reader.connect() as conn:
            return [
                self._def_proto(r)
                for r in conn.execute(sa.select(custom_field_defs_table).order_by(custom_field_defs_table.c.key))
            ]

    # -- notes -------------------------------------------------------------------------------
    def create_note(self, parent: str, n: resources_pb2.Note, principal: Principal) -> resources_pb2.Note:
        cid = domain.parse_name(parent, "parent")
        body = n.text.strip()
        if not body:
            raise InvalidArgument.field("note.text", "must not be empty")
        if len(body) > 10_000:
            raise InvalidArgument.field("note.text", "must be at most 10000 characters")
        with self.c.uow.begin() as tx:
            conn = tx.conn
            owner = adapters.get_customer(conn, cid)
            if owner is None or owner.erased:
                raise not_found(cid)
            row = conn.execute(
                notes.insert().values(customer_id=cid, text=body, author=principal.subject).returning(*notes.c)
            ).one()
            note = note_to_proto(row)
            tx.publish("note.added.v1", customer_events_pb2.NoteAdded(customer=parent, note=note), parent)
            tx.audit(
                note.name,
                "note.create",
                principal,
                [audit.change("text", "null", audit.value(body))],
            )
        return note

    def list_notes(self, parent: str, size: int, token: str) -> tuple[list[resources_pb2.Note], str]:
        cid = domain.parse_name(parent, "parent")
        with self.reader.connect() as conn:
            if adapters.get_customer(conn, cid) is None:
                raise not_found(cid)
            rows, nxt = keyset_page(
                conn,
                sa.select(notes).where(notes.c.customer_id == cid),
                newest_first(notes),
                self.c.tokens,
                f"notes:{cid}",
                page_size(size),
                token,
            )
        return [note_to_proto(r) for r in rows], nxt

    def update_note(self, n: resources_pb2.Note, paths: list[str], principal: Principal) -> resources_pb2.Note:
        def author_only(row) -> None:
            if row.author != principal.subject:
                raise PermissionDenied("only the author may edit a note", reason="NOT_NOTE_AUTHOR")

        with self.c.uow.begin() as tx:
            done = NOTES.update(tx.conn, n, paths, check=author_only)
            if done.changes:
                tx.audit(n.name, "note.update", principal, done.audit_changes())
        return note_to_proto(done.row)

    # -- audit -------------------------------------------------------------------------------
    def list_audit(self, resource: str, size: int, token: str) -> tuple[list[resources_pb2.AuditEntry], str]:
        with self.reader.connect() as conn:
            rows, nxt = audit.page(conn, self.c.tokens, resource, page_size(size), token)
        return [
            resources_pb2.AuditEntry(
                name=f"auditEntries/{r.id}",
                resource=r.resource,
                action=r.action,
                actor=r.actor,
                create_time=ts(r.create_time),
                request_id=r.request_id,
                changes=[resources_pb2.FieldChange(**c) for c in r.changes],
            )
            for r in rows
        ], nxt
