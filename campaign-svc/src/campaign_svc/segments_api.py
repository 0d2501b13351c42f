"""SegmentService (proto/crm/campaign/v1/segments.proto): segments (create, get, list, update,
delete), preview, rebuilds, members (list, add, remove, CSV import) and a customer's segments.
Membership maintenance itself is segments.py."""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from google.protobuf import empty_pb2
from sqlalchemy.dialects.postgresql import insert as pg_insert

from crm.campaign.v1 import segments_pb2 as pb
from crm.campaign.v1 import segments_pb2_grpc
from crm_chassis import jobs, persian, tabular
from crm_chassis.auth import Principal
from crm_chassis.errors import AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument
from crm_chassis.filtering import (
    FieldType,
    FilterField,
    FilterSchema,
    keyset_page,
    parse_order_by,
    query_fingerprint,
    with_tiebreaker,
)
from crm_chassis.grpc_server import Registration
from crm_chassis.interceptors import current_principal
from crm_chassis.pagination import PageTokens, page_size
from crm_chassis.resources import ResourceName, UpdateMask, changes, check_etag, etag, request_id_violation
from crm_chassis.work_tables import jobs as job_rows

from . import segments as seg
from .runtime import Campaign
from .segments_tables import LIVE, segment_members, segments
from .tables import audience, campaigns

SEGMENT = ResourceName("segments/{id}")
REBUILD = ResourceName("segments/{segment_id}/rebuilds/{rebuild_id}")
CUSTOMER = ResourceName("customers/{id}")

NAME_LIMIT, DESCRIPTION_LIMIT, PARTS_LIMIT, BATCH_LIMIT = 200, 2000, 50, 1000
IMPORT_BYTES, UNMATCHED_SHOWN = 20 * 1024 * 1024, 1000
KIND_ENUM = {
    seg.DYNAMIC: pb.SEGMENT_KIND_DYNAMIC,
    seg.STATIC: pb.SEGMENT_KIND_STATIC,
    seg.COMBINED: pb.SEGMENT_KIND_COMBINED,
}
KIND_OF = {v: k for k, v in KIND_ENUM.items()}
REBUILD_STATE = {
    jobs.QUEUED: pb.SEGMENT_REBUILD_STATE_QUEUED,
    jobs.RUNNING: pb.SEGMENT_REBUILD_STATE_RUNNING,
    jobs.SUCCEEDED: pb.SEGMENT_REBUILD_STATE_SUCCEEDED,
    jobs.FAILED: pb.SEGMENT_REBUILD_STATE_FAILED,
    jobs.CANCELLED: pb.SEGMENT_REBUILD_STATE_CANCELLED,
}

s = segments.c
FILTERS = FilterSchema(
    FilterField("display_name", s.display_name),
    FilterField("kind", s.kind, FieldType.ENUM, enum_values={k.upper(): k for k in seg.KINDS}),
    FilterField("relative_time", s.relative, FieldType.BOOL),
    FilterField("member_count", s.member_count, FieldType.INT),
    FilterField("create_time", s.create_time, FieldType.TIMESTAMP),
    FilterField("update_time", s.update_time, FieldType.TIMESTAMP),
)
SORTABLE = {
    "display_name": s.display_name,
    "create_time": s.create_time,
    "update_time": s.update_time,
    "member_count": s.member_count,
}
DEFINITION = ["filter", "include_segments", "include_all", "exclude_segments"]
FIELDS = ["display_name", "description", *DEFINITION]
MASK = UpdateMask(
    FIELDS,
    immutable={
        "name": "",
        "kind": "create a new segment instead",
        "member_count": "output only",
        "etag": "give it as the etag to check",
    },
)
COLUMN_OF = {"include_segments": "include_ids", "exclude_segments": "exclude_ids"}
JOB_STATE = job_rows.c.state.label("job_state")


def _ts(msg, field: str, value) -> None:
    if value is not None:
        getattr(msg, field).FromDatetime(value)


def to_proto(row) -> pb.Segment:
    building = getattr(row, "job_state", None) in (jobs.QUEUED, jobs.RUNNING)
    out = pb.Segment(
        name=SEGMENT.format(row.id),
        display_name=row.display_name,
        description=row.description,
        kind=KIND_ENUM[row.kind],
        filter=row.filter,
        include_segments=[SEGMENT.format(i) for i in row.include_ids],
        include_all=row.include_all,
        exclude_segments=[SEGMENT.format(i) for i in row.exclude_ids],
        relative_time=row.relative,
        member_count=row.member_count,
        state=pb.SEGMENT_STATE_BUILDING if building else pb.SEGMENT_STATE_READY,
        latest_rebuild=REBUILD.format(row.id, row.rebuild_job) if row.rebuild_job else "",
        etag=etag(row.version),
    )
    _ts(out, "rebuild_time", row.rebuild_time)
    _ts(out, "create_time", row.create_time)
    _ts(out, "update_time", row.update_time)
    return out


def rebuild_proto(job: jobs.Job) -> pb.SegmentRebuild:
    out = pb.SegmentRebuild(
        name=REBUILD.format(job.params["segment_id"], job.id),
        state=REBUILD_STATE[job.state],
        processed=job.processed,
        total=job.total or 0,
        added=job.counters.get("added", 0),
        removed=job.counters.get("removed", 0),
        message=job.error or job.message,
        cause=job.params.get("cause", ""),
    )
    _ts(out, "create_time", job.create_time)
    _ts(out, "end_time", job.end_time)
    return out


def _with_job():
    return sa.select(segments, JOB_STATE).select_from(
        segments.outerjoin(job_rows, job_rows.c.id == segments.c.rebuild_job)
    )


class SegmentUseCases:
    def __init__(self, rt: Campaign, engine: seg.Segments):
        self.rt = rt
        self.seg = engine
        self.uow = rt.uow
        self.tokens = PageTokens(rt.ctx.settings.jwt_secret, "segments")

    # -- reading a definition -----------------------------------------------------------------
    def _parts(self, conn, names, where: str, bad: list[FieldViolation], own_id: str | None) -> list[str]:
        if len(names) > PARTS_LIMIT:
            bad.append(FieldViolation(where, f"may name at most {PARTS_LIMIT} segments"))
            return []
        out: list[str] = []
        for i, n in enumerate(names):
            if not SEGMENT.matches(n):
                bad.append(FieldViolation(f"{where}[{i}]", "must be 'segments/{id}' with a UUID id"))
            elif SEGMENT.parse(n).id == own_id:
                bad.append(FieldViolation(f"{where}[{i}]", "a segment cannot include or exclude itself"))
            elif SEGMENT.parse(n).id not in out:
                out.append(SEGMENT.parse(n).id)
        found = {str(x) for x in conn.execute(sa.select(s.id).where(s.id.in_(out))).scalars()} if out else set()
        for i, n in enumerate(names):
            if SEGMENT.matches(n) and SEGMENT.parse(n).id not in found and SEGMENT.parse(n).id != own_id:
                bad.append(FieldViolation(f"{where}[{i}]", f"{n} does not exist"))
        return out

    def _definition(self, conn, kind: str, values: dict, own_id: str | None, prior=()) -> dict:
        """The stored definition columns (filter, parts, relative, depth) for these values;
        every problem named at once (with those `prior` found)."""
        bad: list[FieldViolation] = list(prior)
        out = {"filter": values.get("filter", "").strip(), "include_all": bool(values.get("include_all"))}
        inc = values.get("include_segments", [])
        exc = values.get("exclude_segments", [])
        relative, depth = False, 0
        if kind == seg.DYNAMIC:
            if not out["filter"]:
                bad.append(FieldViolation("segment.filter", "a dynamic segment needs a filter"))
            else:
                try:
                    relative = seg.AUDIENCE_FILTERS.analyse(out["filter"], self.seg.now(), "segment.filter").relative
                except InvalidArgument as e:
                    bad += e.violations
        elif out["filter"]:
            bad.append(FieldViolation("segment.filter", f"only a dynamic segment has a filter (this one is {kind})"))
        if kind == seg.COMBINED:
            out["include_ids"] = self._parts(conn, inc, "segment.include_segments", bad, own_id)
            out["exclude_ids"] = self._parts(conn, exc, "segment.exclude_segments", bad, own_id)
            if not inc:
                bad.append(
                    FieldViolation("segment.include_segments", "a combined segment includes at least one segment")
                )
            both = set(out["include_ids"]) & set(out["exclude_ids"])
            if both:
                bad.append(FieldViolation("segment.exclude_segments", "a segment cannot be both included and excluded"))
            if own_id and not bad and own_id in self._reachable(conn, out["include_ids"] + out["exclude_ids"]):
                bad.append(FieldViolation("segment.include_segments", "the combination would contain itself (a cycle)"))
            if not bad:
                relative, deepest = seg.depends_relative(conn, out["include_ids"] + out["exclude_ids"])
                depth = deepest + 1
        else:
            for f, v in (("include_segments", inc), ("exclude_segments", exc)):
                if v:
                    bad.append(FieldViolation(f"segment.{f}", "only a combined segment includes or excludes segments"))
            out["include_ids"], out["exclude_ids"] = [], []
        if bad:
            raise InvalidArgument(bad)
        out["relative"], out["depth"] = relative, depth
        return out

    @staticmethod
    def _reachable(conn, ids: list[str]) -> set[str]:
        seen: set[str] = set()
        todo = list(ids)
        while todo:
            rows = conn.execute(sa.select(s.id, s.include_ids, s.exclude_ids).where(s.id.in_(todo))).all()
            todo = []
            for r in rows:
                for x in [*r.include_ids, *r.exclude_ids]:
                    if x not in seen:
                        seen.add(x)
                        todo.append(x)
        return seen

    @staticmethod
    def _propagate(conn) -> None:
        """Depth and relative of every combined segment from its parts (after a change)."""
        rows = {
            str(r.id): r
            for r in conn.execute(sa.select(s.id, s.kind, s.include_ids, s.exclude_ids, s.relative, s.depth))
        }
        depth = {k: (0 if r.kind != seg.COMBINED else None) for k, r in rows.items()}
        rel = {k: r.relative for k, r in rows.items() if r.kind != seg.COMBINED}
        for _ in range(len(rows) + 1):
            for k, r in rows.items():
                if depth[k] is None:
                    parts = [*r.include_ids, *r.exclude_ids]
                    if all(depth.get(p) is not None for p in parts if p in rows):
                        known = [p for p in parts if p in rows]
                        depth[k] = 1 + max((depth[p] for p in known), default=0)
                        rel[k] = any(rel.get(p, False) for p in known)
        for k, r in rows.items():
            if r.kind == seg.COMBINED and depth[k] is not None and (depth[k], rel[k]) != (r.depth, r.relative):
                conn.execute(segments.update().where(s.id == k).values(depth=depth[k], relative=rel[k]))

    @staticmethod
    def _text(msg: pb.Segment, bad: list[FieldViolation]) -> dict:
        name = msg.display_name.strip()
        if not name:
            bad.append(FieldViolation("segment.display_name", "is required"))
        elif len(name) > NAME_LIMIT:
            bad.append(FieldViolation("segment.display_name", f"may be at most {NAME_LIMIT} characters"))
        if len(msg.description) > DESCRIPTION_LIMIT:
            bad.append(FieldViolation("segment.description", f"may be at most {DESCRIPTION_LIMIT} characters"))
        return {"display_name": name, "description": msg.description.strip()}

    # -- CRUD ------------------------------------------------------------------------------------
    def create(self, msg: pb.Segment, request_id: str, principal: Principal) -> pb.Segment:
        bad: list[FieldViolation] = []
        if v := request_id_violation(request_id):
            bad.append(v)
        kind = KIND_OF.get(msg.kind)
        if kind is None:
            bad.append(FieldViolation("segment.kind", "choose SEGMENT_KIND_DYNAMIC, _STATIC or _COMBINED"))
        text = self._text(msg, bad)
        if kind is None:
            raise InvalidArgument(bad)
        try:
            with self.uow.begin() as tx:
                if request_id:
                    seen = tx.conn.execute(_with_job().where(s.request_id == request_id)).one_or_none()
                    if seen is not None:
                        return to_proto(seen)
                values = {
                    "filter": msg.filter,
                    "include_segments": list(msg.include_segments),
                    "include_all": msg.include_all,
                    "exclude_segments": list(msg.exclude_segments),
                }
                d = self._definition(tx.conn, kind, values, None, bad)
                row = tx.conn.execute(
                    segments.insert()
                    .values(**text, **d, kind=kind, creator=principal.subject, request_id=request_id or None)
                    .returning(segments)
                ).one()
                sid = str(row.id)
                if kind != seg.STATIC:
                    self.seg.start_rebuild(tx.conn, sid, "create", principal.subject)
                tx.audit(SEGMENT.format(sid), "segment.create", principal, [
                    {"field": k, "old": "", "new": str(v)} for k, v in {**text, "kind": kind, **d}.items()
                ])  # fmt: skip
                row = tx.conn.execute(_with_job().where(s.id == sid)).one()
        except sa.exc.IntegrityError as exc:
            if request_id and "request_id" in str(exc.orig):
                with self.uow.read() as conn:
                    return to_proto(conn.execute(_with_job().where(s.request_id == request_id)).one())
            raise AlreadyExists(
                f"a segment named {text['display_name']!r} exists", metadata={"field": "segment.display_name"}
            ) from None
        self.seg.worker.wake()
        return to_proto(row)

    def get(self, name: str) -> pb.Segment:
        sid = SEGMENT.parse(name).id
        with self.uow.read() as conn:
            row = conn.execute(_with_job().where(s.id == sid)).one_or_none()
        if row is None:
            raise SEGMENT.not_found(name)
        return to_proto(row)

    def list(self, req: pb.ListSegmentsRequest) -> tuple[list[pb.Segment], str]:
        limit = page_size(req.page_size)
        where = FILTERS.compile(req.filter)
        keys = parse_order_by(req.order_by.strip() or "display_name", SORTABLE)
        order = with_tiebreaker(keys, s.id, descending=keys[-1].descending)
        with self.uow.read() as conn:
            rows, token = keyset_page(
                conn,
                _with_job().where(where),
                order,
                self.tokens,
                query_fingerprint(req.filter, req.order_by),
                limit,
                req.page_token,
            )
        return [to_proto(r) for r in rows], token

    def _locked(self, conn, name: str, field: str):
        sid = SEGMENT.parse(name, field).id
        row = conn.execute(sa.select(segments).where(s.id == sid).with_for_update()).one_or_none()
        if row is None:
            raise SEGMENT.not_found(name)
        return row

    def update(self, msg: pb.Segment, mask, principal: Principal) -> pb.Segment:
        paths = MASK.paths(mask)
        bad: list[FieldViolation] = []
        text = self._text(msg, bad) if {"display_name", "description"} & set(paths) else {}
        if bad:
            bad = [v for v in bad if v.field.removeprefix("segment.") in paths]
            if bad:
                raise InvalidArgument(bad)
        try:
            with self.uow.begin() as tx:
                row = self._locked(tx.conn, msg.name, "segment.name")
                check_etag(msg.etag, row.version, msg.name)
                sid = str(row.id)
                old = {
                    "display_name": row.display_name,
                    "description": row.description,
                    "filter": row.filter,
                    "include_segments": [SEGMENT.format(i) for i in row.include_ids],
                    "include_all": row.include_all,
                    "exclude_segments": [SEGMENT.format(i) for i in row.exclude_ids],
                }
                given = {
                    "filter": msg.filter,
                    "include_segments": list(msg.include_segments),
                    "include_all": msg.include_all,
                    "exclude_segments": list(msg.exclude_segments),
                    **text,
                }
                new = {**old, **{p: given[p] for p in paths}}
                diff = changes(old, new, paths)
                if not diff:
                    return to_proto(tx.conn.execute(_with_job().where(s.id == sid)).one())
                d = self._definition(tx.conn, row.kind, new, sid)
                write = {"display_name": new["display_name"], "description": new["description"], **d}
                tx.conn.execute(
                    segments.update()
                    .where(s.id == sid)
                    .values(**write, version=s.version + 1, update_time=sa.func.now())
                )
                redefined = any(c.field in DEFINITION for c in diff)
                if redefined:
                    self._propagate(tx.conn)
                    if row.kind != seg.STATIC:
                        self.seg.start_rebuild(tx.conn, sid, "update", principal.subject)
                tx.audit(msg.name, "segment.update", principal, [c.as_audit() for c in diff])
                out = tx.conn.execute(_with_job().where(s.id == sid)).one()
        except sa.exc.IntegrityError:
            raise AlreadyExists(
                f"a segment named {new['display_name']!r} exists", metadata={"field": "segment.display_name"}
            ) from None
        self.seg.worker.wake()
        return to_proto(out)

    def delete(self, name: str, etag_value: str, principal: Principal) -> None:
        with self.uow.begin() as tx:
            row = self._locked(tx.conn, name, "name")
            check_etag(etag_value, row.version, name)
            sid = str(row.id)
            users = (
                tx.conn.execute(sa.select(s.id).where(sa.or_(s.include_ids.any(sid), s.exclude_ids.any(sid))))
                .scalars()
                .all()
            )
            if users:
                raise FailedPrecondition(
                    f"{name} is part of {', '.join(SEGMENT.format(u) for u in users)}; change those first",
                    reason="SEGMENT_IN_USE",
                    metadata={"name": name},
                )
            c = campaigns.c
            used = tx.conn.execute(
                sa.select(c.id).where(sa.or_(c.segment_id == sid, c.exclude_segment_ids.any(sid))).limit(1)
            ).scalar()
            if used is not None:
                raise FailedPrecondition(
                    f"{name} is the audience of campaigns/{used}", reason="SEGMENT_IN_USE", metadata={"name": name}
                )
            if row.rebuild_job is not None:
                job = jobs.get(tx.conn, str(row.rebuild_job))
                if job is not None and not job.ended:
                    jobs.cancel(tx.conn, job.id, by=principal.subject)
            tx.conn.execute(segment_members.delete().where(segment_members.c.segment_id == sid))
            tx.conn.execute(segments.delete().where(s.id == sid))
            tx.audit(name, "segment.delete", principal, [{"field": "display_name", "old": row.display_name, "new": ""}])

    # -- preview -----------------------------------------------------------------------------
    def preview(self, msg: pb.Segment, size: int) -> pb.PreviewSegmentResponse:
        if size < 0:
            raise InvalidArgument.field("page_size", "must not be negative")
        size = min(size or 20, 100)
        kind = KIND_OF.get(msg.kind)
        if kind not in (seg.DYNAMIC, seg.COMBINED):
            raise InvalidArgument.field("segment.kind", "preview a dynamic or a combined segment")
        with self.uow.read() as conn:
            values = {
                "filter": msg.filter,
                "include_segments": list(msg.include_segments),
                "include_all": msg.include_all,
                "exclude_segments": list(msg.exclude_segments),
            }
            d = self._definition(conn, kind, values, None)
            definition = seg.Definition(
                "", kind, d["filter"], tuple(d["include_ids"]), d["include_all"], tuple(d["exclude_ids"])
            )
            now = self.seg.now()
            if kind == seg.DYNAMIC:
                where = seg.matches(definition, now)
                count = conn.execute(sa.select(sa.func.count()).select_from(audience).where(where)).scalar_one()
                first = sa.select(audience.c.customer_id, audience.c.display_name).where(where)
                if count and count * 100 < conn.execute(seg._ESTIMATE).scalar_one():
                    # rare matches: filter first (by its indexes, or one scan), then sort them;
                    # walking the key order would visit most of the audience to find a few
                    found = first.cte("found").prefix_with("MATERIALIZED")
                    first = sa.select(found.c.customer_id, found.c.display_name)
                    sample = conn.execute(first.order_by(found.c.customer_id).limit(size)).all()
                else:
                    sample = conn.execute(first.order_by(audience.c.customer_id).limit(size)).all() if count else []
            else:
                q = seg.candidates(definition, now).subquery("c")
                count = conn.execute(sa.select(sa.func.count()).select_from(q)).scalar_one()
                sample = conn.execute(
                    sa.select(q.c.customer_id, audience.c.display_name)
                    .select_from(q.outerjoin(audience, audience.c.customer_id == q.c.customer_id))
                    .order_by(q.c.customer_id)
                    .limit(size)
                ).all()
        return pb.PreviewSegmentResponse(
            member_count=count,
            members=[
                pb.SegmentMember(customer=CUSTOMER.format(r.customer_id), display_name=r.display_name or "")
                for r in sample
            ],
            relative_time=d["relative"],
        )

    # -- rebuilds --------------------------------------------------------------------------
    def rebuild(self, name: str, principal: Principal) -> pb.SegmentRebuild:
        with self.uow.begin() as tx:
            row = self._locked(tx.conn, name, "name")
            job = self.seg.start_rebuild(tx.conn, str(row.id), "request", principal.subject)
        self.seg.worker.wake()
        return rebuild_proto(job)

    def get_rebuild(self, name: str) -> pb.SegmentRebuild:
        ids = REBUILD.parse(name)
        with self.uow.read() as conn:
            job = jobs.get(conn, ids.rebuild_id)
        if job is None or job.kind != seg.REBUILD_KIND or job.params.get("segment_id") != ids.segment_id:
            raise REBUILD.not_found(name)
        return rebuild_proto(job)

    # -- members ----------------------------------------------------------------------------
    def members(self, req: pb.ListSegmentMembersRequest) -> pb.ListSegmentMembersResponse:
        sid = SEGMENT.parse(req.parent, "parent").id
        limit = page_size(req.page_size)
        m = segment_members
        with self.uow.read() as conn:
            count = conn.execute(sa.select(s.member_count).where(s.id == sid)).scalar()
            if count is None:
                raise SEGMENT.not_found(req.parent)
            q = (
                sa.select(m.c.customer_id, m.c.since, m.c.source, audience.c.display_name)
                .select_from(m.outerjoin(audience, audience.c.customer_id == m.c.customer_id))
                .where(m.c.segment_id == sid)
            )
            rows, token = keyset_page(
                conn, q, [(m.c.customer_id, False)], self.tokens, f"members:{sid}", limit, req.page_token
            )
        out = pb.ListSegmentMembersResponse(next_page_token=token, member_count=count)
        for r in rows:
            item = out.members.add(
                customer=CUSTOMER.format(r.customer_id), display_name=r.display_name or "", source=r.source
            )
            item.since.FromDatetime(r.since)
        return out

    def _static(self, conn, name: str, field: str):
        row = self._locked(conn, name, field)
        if row.kind != seg.STATIC:
            raise FailedPrecondition(
                f"{name} is {row.kind}: its members come from its definition; only a static segment takes members",
                reason="SEGMENT_NOT_STATIC",
                metadata={"name": name, "field": field},
            )
        return row

    def _customer_ids(self, names, field: str) -> list[str]:
        bad: list[FieldViolation] = []
        if not names:
            bad.append(FieldViolation(field, "name at least one customer"))
        if len(names) > BATCH_LIMIT:
            bad.append(FieldViolation(field, f"at most {BATCH_LIMIT} at once (import a CSV for more)"))
        ids: list[str] = []
        for i, n in enumerate(names):
            if not CUSTOMER.matches(n):
                bad.append(FieldViolation(f"{field}[{i}]", "must be 'customers/{id}' with a UUID id"))
            elif CUSTOMER.parse(n).id not in ids:
                ids.append(CUSTOMER.parse(n).id)
        if bad:
            raise InvalidArgument(bad)
        return ids

    def add(self, name: str, customers, principal: Principal) -> pb.ChangeSegmentMembersResponse:
        ids = self._customer_ids(list(customers), "customers")
        with self.uow.begin() as tx:
            row = self._static(tx.conn, name, "segment")
            sid = str(row.id)
            seg.lock_exclusive(tx.conn, sid)
            known = set(
                tx.conn.execute(
                    sa.select(audience.c.customer_id).where(audience.c.customer_id.in_(ids), LIVE)
                ).scalars()
            )
            unknown = [
                FieldViolation(f"customers[{i}]", f"{n} is not a known customer")
                for i, n in enumerate(customers)
                if CUSTOMER.parse(n).id not in known
            ]
            if unknown:
                raise InvalidArgument(unknown)
            m = segment_members
            stmt = (
                pg_insert(m)
                .values(
                    [{"segment_id": sid, "customer_id": c, "source": "manual", "since": self.seg.now()} for c in ids]
                )
                .on_conflict_do_nothing()
                .returning(m.c.customer_id)
            )
            added = [(seg.ADDED, sid, c) for c in tx.conn.execute(stmt).scalars()]
            self.seg.publish(tx.conn, added, "manual")
            tx.audit(name, "segment.add_members", principal, [{"field": "members", "old": "", "new": str(len(added))}])
            count = tx.conn.execute(sa.select(s.member_count).where(s.id == sid)).scalar_one()
        return pb.ChangeSegmentMembersResponse(changed=len(added), member_count=count)

    def remove(self, name: str, customers, principal: Principal) -> pb.ChangeSegmentMembersResponse:
        ids = self._customer_ids(list(customers), "customers")
        m = segment_members
        with self.uow.begin() as tx:
            row = self._static(tx.conn, name, "segment")
            sid = str(row.id)
            seg.lock_exclusive(tx.conn, sid)
            gone = (
                tx.conn.execute(
                    m.delete().where(m.c.segment_id == sid, m.c.customer_id.in_(ids)).returning(m.c.customer_id)
                )
                .scalars()
                .all()
            )
            self.seg.publish(tx.conn, [(seg.REMOVED, sid, c) for c in gone], "manual")
            tx.audit(
                name, "segment.remove_members", principal, [{"field": "members", "old": str(len(gone)), "new": ""}]
            )
            count = tx.conn.execute(sa.select(s.member_count).where(s.id == sid)).scalar_one()
        return pb.ChangeSegmentMembersResponse(changed=len(gone), member_count=count)

    # -- CSV import ------------------------------------------------------------------------
    ALIASES = tabular.alias_table(
        {
            "customer_id": ["customer_id", "customer", "id", "شناسه", "شناسه مشتری"],
            "email": ["email", "e-mail", "mail", "ایمیل", "پست الکترونیک"],
            "mobile": ["mobile", "cell", "cellphone", "موبایل", "همراه", "تلفن همراه"],
            "phone": ["phone", "tel", "telephone", "تلفن", "شماره"],
        }
    )

    def _read_csv(self, content: bytes) -> tuple[list[tuple], list[pb.UnmatchedRow]]:
        """(line, id, e-mail, mobile, phone, shown value) per row that names someone (each key
        normalised, None when absent or unusable), and the rows that cannot match at all."""
        try:
            table = tabular.read_csv(content)
            mapping = tabular.map_headers(table.headers, self.ALIASES)
            if not mapping.columns:
                raise InvalidArgument.field(
                    "content", "the header row names no customer_id, email, mobile or phone column"
                )
            rows, bad = [], []
            for line, cells in table:
                # a NUL byte is no part of an id, address or number (and PostgreSQL text refuses it)
                values = {k: tabular.cell_text(v).replace("\x00", "") for k, v in mapping.values(cells).items()}
                values = {k: v for k, v in values.items() if v}
                if not values:
                    bad.append(pb.UnmatchedRow(line=line, value="", reason="the row is empty"))
                    continue
                shown = next(values[k] for k in ("customer_id", "email", "mobile", "phone") if k in values)
                keys, why = [None, None, None, None], ""
                if "customer_id" in values:
                    try:
                        keys[0] = str(uuid.UUID(values["customer_id"].removeprefix("customers/")))
                    except ValueError:
                        why = why or "not a customer id"
                if "email" in values:
                    keys[1] = values["email"].strip().lower()
                for i, k in ((2, "mobile"), (3, "phone")):
                    if k in values:
                        keys[i] = persian.phone_e164(values[k], self.rt.phone_region) or None
                        if keys[i] is None:
                            why = why or "not a phone number"
                if any(keys):
                    rows.append((line, *keys, shown))
                else:
                    bad.append(pb.UnmatchedRow(line=line, value=shown, reason=why))
            return rows, bad
        except tabular.TabularError as e:
            raise InvalidArgument.field("content", str(e)) from None

    def import_(self, name: str, content: bytes, principal: Principal) -> pb.ImportSegmentMembersResponse:
        """Every row matched in one statement: by id, else e-mail, else mobile or phone (each
        compared with the audience's mobile, then landline), through the audience's indexes."""
        if not content:
            raise InvalidArgument.field("content", "the file is empty")
        if len(content) > IMPORT_BYTES:
            raise InvalidArgument.field("content", f"the file is larger than {IMPORT_BYTES // (1024 * 1024)} MiB")
        rows, unmatched = self._read_csv(content)
        r = (
            sa.func.unnest(
                sa.cast(sa.literal([x[0] for x in rows]), sa.ARRAY(sa.Integer)),
                *(sa.cast(sa.literal([x[i] for x in rows]), sa.ARRAY(sa.Text)) for i in range(1, 5)),
            )
            .table_valued("line", "id", "email", "mobile", "phone")
            .render_derived(name="r")
        )

        def one(column, key):
            return (
                sa.select(audience.c.customer_id)
                .where(column == key, column != "", LIVE)
                .order_by(audience.c.customer_id)
                .limit(1)
                .scalar_subquery()
            )

        c = audience.c
        match = sa.func.coalesce(
            one(c.customer_id, r.c.id),
            one(c.email, r.c.email),
            *(one(col, r.c[k]) for k in ("mobile", "phone") for col in (c.mobile, c.phone)),
        )
        raw = {x[0]: x[5] for x in rows}
        with self.uow.begin() as tx:
            row = self._static(tx.conn, name, "segment")
            sid = str(row.id)
            seg.lock_exclusive(tx.conn, sid)
            found = tx.conn.execute(sa.select(r.c.line, match.label("customer_id"))).all() if rows else []
            matched = sorted({f.customer_id for f in found if f.customer_id})
            unmatched += [
                pb.UnmatchedRow(line=f.line, value=raw[f.line], reason="matches no customer")
                for f in found
                if not f.customer_id
            ]
            m = segment_members
            ids = (
                sa.func.unnest(sa.cast(sa.literal(matched), sa.ARRAY(sa.Text)))
                .table_valued("customer_id")
                .render_derived()
            )
            stmt = (
                pg_insert(m)
                .from_select(
                    ["segment_id", "customer_id", "since", "source"],
                    sa.select(
                        sa.literal(sid, m.c.segment_id.type),
                        ids.c.customer_id,
                        sa.literal(self.seg.now(), m.c.since.type),
                        sa.literal("import"),
                    ),
                )
                .on_conflict_do_nothing()
                .returning(m.c.customer_id)
            )
            added = tx.conn.execute(stmt).scalars().all() if matched else []
            self.seg.publish(tx.conn, [(seg.ADDED, sid, c) for c in added], "import")
            tx.audit(
                name, "segment.import_members", principal, [{"field": "members", "old": "", "new": str(len(added))}]
            )
            count = tx.conn.execute(sa.select(s.member_count).where(s.id == sid)).scalar_one()
        unmatched.sort(key=lambda u: u.line)
        return pb.ImportSegmentMembersResponse(
            rows=len(rows) + sum(1 for u in unmatched if u.reason != "matches no customer"),
            matched=sum(1 for f in found if f.customer_id),
            added=len(added),
            unmatched=unmatched[:UNMATCHED_SHOWN],
            unmatched_count=len(unmatched),
            member_count=count,
        )

    # -- one customer -----------------------------------------------------------------------
    def of_customer(self, name: str) -> pb.ListCustomerSegmentsResponse:
        cid = CUSTOMER.parse(name, "customer").id
        m = segment_members
        # one probe of the key (segment, customer) per segment: no index on customer_id to write
        since = (
            sa.select(m.c.since)
            .where(m.c.segment_id == s.id, m.c.customer_id == cid)
            .correlate(segments)
            .scalar_subquery()
        )
        with self.uow.read() as conn:
            rows = conn.execute(
                sa.select(s.id, s.display_name, since.label("since")).where(since.is_not(None)).order_by(s.display_name)
            ).all()
        out = pb.ListCustomerSegmentsResponse()
        for r in rows:
            item = out.segments.add(segment=SEGMENT.format(r.id), display_name=r.display_name)
            item.since.FromDatetime(r.since)
        return out


class SegmentServicer(segments_pb2_grpc.SegmentServiceServicer):
    def __init__(self, uc: SegmentUseCases):
        self.uc = uc

    def CreateSegment(self, request, context):
        return self.uc.create(request.segment, request.request_id, current_principal())

    def GetSegment(self, request, context):
        return self.uc.get(request.name)

    def ListSegments(self, request, context):
        items, token = self.uc.list(request)
        return pb.ListSegmentsResponse(segments=items, next_page_token=token)

    def UpdateSegment(self, request, context):
        return self.uc.update(request.segment, request.update_mask, current_principal())

    def DeleteSegment(self, request, context):
        self.uc.delete(request.name, request.etag, current_principal())
        return empty_pb2.Empty()

    def PreviewSegment(self, request, context):
        return self.uc.preview(request.segment, request.page_size)

    def RebuildSegment(self, request, context):
        return self.uc.rebuild(request.name, current_principal())

    def GetSegmentRebuild(self, request, context):
        return self.uc.get_rebuild(request.name)

    def ListSegmentMembers(self, request, context):
        return self.uc.members(request)

    def AddSegmentMembers(self, request, context):
        return self.uc.add(request.segment, request.customers, current_principal())

    def RemoveSegmentMembers(self, request, context):
        return self.uc.remove(request.segment, request.customers, current_principal())

    def ImportSegmentMembers(self, request, context):
        return self.uc.import_(request.segment, request.content, current_principal())

    def ListCustomerSegments(self, request, context):
        return self.uc.of_customer(request.customer)


def registration(rt: Campaign, engine: seg.Segments) -> Registration:
    return Registration.of(SegmentServicer(rt.once("segment_use_cases", lambda: SegmentUseCases(rt, engine))))
