"""Segments: who a campaign speaks to, picked from the audience projection and kept current.

- DYNAMIC: an AIP-160 filter over every audience column (`AUDIENCE_FILTERS`), with relative
  times (`last_purchase_time >= now - 90d`, `last_complaint_time >= this_month`; see
  crm_chassis.filtering). STATIC: customers added by hand or imported from a CSV (matched by
  customer id, e-mail or phone through the audience). COMBINED: the customers of the included
  segments (any, or with include_all every one) minus those of the excluded segments.
- Membership is materialised in `segment_members` and kept current three ways, all set-based:
  1. `audience_changed(conn, ids, cause)` (runtime hook, in the transaction that changed the
     audience rows): those customers are re-evaluated against every dynamic segment in ONE
     SELECT (a UNION ALL of each segment's compiled filter over the changed rows; then one
     DELETE and one INSERT of the difference), then against the combined segments level by level
     (`depth`); a merged customer's static memberships move to the survivor; a deleted or
     erased customer leaves static segments.
  2. A rebuild (a crm_chassis job, kind "segment.rebuild"): the audience is walked in chunks
     of heap pages (about SEGMENT_REBUILD_CHUNK customers, default 250000; TID range scans),
     each chunk one transaction that
     deletes the members who no longer match and inserts those who newly match, with their
     events built by the database (Transaction.publish_select) and the job's progress saved in
     the same transaction; combined segments that include the segment are rebuilt after it.
     A new dynamic segment's first build is ONE statement instead (`_first_build`), while the
     audience has at most SEGMENT_FIRST_BUILD_ROWS rows (default 2000000).
  3. Relative-time segments drift with the clock: the recurring timer "segments.refresh"
     (SEGMENT_REFRESH_CRON, default hourly) re-evaluates the customers whose compared times
     crossed a relative bound since the last evaluation (an index range per bound), see `refresh`.
  Rebuilds and the hook exclude each other per segment (an advisory lock: the hook's shared,
  a rebuild chunk's exclusive), so a chunk never writes from a snapshot older than a change.
- Every customer entering or leaving publishes segment.member_added.v1 /
  segment.member_removed.v1 (SegmentMemberEvent; cause "event", "rebuild", "manual", "import"),
  but for a new segment's first build: its members come into being with the segment, announced
  by one segment.built.v1 (SegmentBuilt: the member count) at its end.
- `now` comes from `Segments.clock` (tests set it): relative filters compile against it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from crm.campaign.v1 import campaign_events_pb2 as ev
from crm_chassis import jobs, persian, timers
from crm_chassis.columns import UUID
from crm_chassis.errors import FailedPrecondition, InvalidArgument
from crm_chassis.filtering import FieldType, FilterField, FilterSchema, Prefix, column_condition, negate

from .runtime import Campaign
from .segments_tables import LIVE, segment_members, segments
from .tables import audience

log = logging.getLogger("campaign.segments")

DYNAMIC, STATIC, COMBINED = "dynamic", "static", "combined"
KINDS = (DYNAMIC, STATIC, COMBINED)
REBUILD_KIND = "segment.rebuild"
REFRESH_TIMER = "segments.refresh"
ADDED, REMOVED = "segment.member_added.v1", "segment.member_removed.v1"
BUILT = "segment.built.v1"  # a new segment's first build: one event, not one per member

a = audience.c
_TEXT = (
    "display_name",
    "email",
    "phone",
    "mobile",
    "national_id",
    "province",
    "city",
    "type",
    "kind",
    "gender",
    "lifecycle_stage",
    "education_degree",
    "rank",
    "industry",
    "country",
    "owner",
    "email_consent",
    "sms_consent",
)
_INT = (
    "order_count",
    "open_opportunities",
    "won_opportunities",
    "ticket_count",
    "complaint_count",
    "web_page_views",
    "web_events",
)
_TIME = (
    "create_time",
    "first_purchase_time",
    "last_purchase_time",
    "last_ticket_time",
    "last_complaint_time",
    "last_activity_time",
    "last_web_visit_time",
)
_ARABIC_FORMS = str.maketrans({"ی": "ي", "ک": "ك"})


def _letters(column) -> Callable:
    """A text field's condition that takes the Persian and the Arabic Yeh / Kaf (an Arabic
    keyboard's ي ك, as customer-svc keeps what was typed) for the same letters: = and != (and a
    prefix) compare the value written with Persian letters and with Arabic ones, an IN the
    column's index serves; other operators compare the Persian form."""

    def target(op: str, value):
        if not isinstance(value, str):
            return column_condition(column, op, value)
        fa = persian.persian_letters(value)
        forms = list(dict.fromkeys([fa, fa.translate(_ARABIC_FORMS)]))
        if op not in ("=", "!=") or len(forms) == 1:
            return column_condition(column, op, Prefix(fa) if isinstance(value, Prefix) else fa)
        if isinstance(value, Prefix):
            same = sa.or_(*(column_condition(column, "=", Prefix(f)) for f in forms))
        else:
            same = column.in_(forms)
        return same if op == "=" else negate(same)

    return target


AUDIENCE_FILTERS = FilterSchema(
    FilterField("customer_id", a.customer_id),
    *(FilterField(n, _letters(a[n])) for n in _TEXT),
    FilterField("source", _letters(a.acquisition_source)),  # how they found us
    FilterField("acquisition_source", _letters(a.acquisition_source)),
    *(FilterField(n, a[n], FieldType.INT) for n in _INT),
    FilterField("revenue", a.revenue, FieldType.FLOAT),
    *(FilterField(n, a[n], FieldType.TIMESTAMP) for n in _TIME),
    FilterField("birth_date", a.birth_date, FieldType.DATE),
    FilterField("acquisition_date", a.acquisition_date, FieldType.DATE),
    # the month of the birthday (1..12): "birthday this month" campaigns
    FilterField("birth_month", sa.cast(sa.extract("month", a.birth_date), sa.Integer), FieldType.INT),
    FilterField("tags", a.tags, FieldType.STRING_ARRAY),
    FilterField("groups", a.groups, FieldType.STRING_ARRAY),
)


_ESTIMATE = sa.text("SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = 'audience'::regclass")
_PAGES = sa.text("SELECT (pg_relation_size('audience') / current_setting('block_size')::int)::int")


def _chunk() -> int:
    return max(1000, int(os.environ.get("SEGMENT_REBUILD_CHUNK", "250000")))


def _first_build_rows() -> int:
    """The audience size (the planner's estimate) up to which a new segment's first build is one
    statement; above it, the build walks the audience in chunks like a rebuild, so that the hook
    (every audience change, which takes the segments' shared lock) waits for a chunk at a time,
    not for the whole build."""
    return max(0, int(os.environ.get("SEGMENT_FIRST_BUILD_ROWS", "2000000")))


def refresh_cron() -> str:
    return os.environ.get("SEGMENT_REFRESH_CRON", "0 * * * *").strip() or "0 * * * *"


def _texts(values) -> sa.ColumnElement:
    """A text[] parameter (one bind, any length: no IN list of thousands)."""
    return sa.cast(sa.literal(list(values)), sa.ARRAY(sa.Text))


def _pairs(pairs):
    """(segment id, customer id) pairs as a table of two array parameters."""
    return (
        sa.func.unnest(sa.cast(sa.literal([p[0] for p in pairs]), sa.ARRAY(UUID)), _texts(p[1] for p in pairs))
        .table_valued("segment_id", "customer_id")
        .render_derived(name="pairs")
    )


def _rowcount(conn: sa.Connection, statement) -> int:
    """Execute an INSERT .. SELECT and return the rows it inserted. Sent as its compiled SQL:
    executed as a Core statement it reports no row count through SQLAlchemy here (-1), and
    RETURNING the rows to count them cost 0.15 s for 640,000."""
    sql = statement.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    return conn.exec_driver_sql(sql.string, sql.params).rowcount


def _lock_key(segment_id) -> sa.ColumnElement:
    return sa.func.hashtextextended(sa.literal("segment:") + sa.cast(segment_id, sa.Text), 0)


def lock_shared(conn: sa.Connection, ids: Sequence[str]) -> None:
    if ids:
        keys = sa.func.unnest(sa.cast(sa.literal(sorted(ids)), sa.ARRAY(sa.Text))).table_valued("sid").render_derived()
        conn.execute(sa.select(sa.func.count(sa.func.pg_advisory_xact_lock_shared(_lock_key(keys.c.sid)))))


def lock_exclusive(conn: sa.Connection, segment_id: str) -> None:
    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_lock_key(sa.literal(segment_id)))))


@dataclass(frozen=True)
class Definition:
    """What decides a segment's members (a stored row or a preview)."""

    id: str
    kind: str
    filter: str = ""
    include: tuple[str, ...] = ()
    include_all: bool = False
    exclude: tuple[str, ...] = ()

    @classmethod
    def of(cls, row) -> Definition:
        return cls(str(row.id), row.kind, row.filter, tuple(row.include_ids), row.include_all, tuple(row.exclude_ids))


def member_condition(d: Definition, cid: sa.ColumnElement, now: dt.datetime, field: str = "segment.filter"):
    """SQL: is the customer `cid` (a column) a member of the combined segment `d`."""
    m = segment_members.alias("inc")
    if d.include_all:
        inc = sa.select(sa.func.count()).where(
            m.c.segment_id.in_(d.include), m.c.customer_id == cid
        ).scalar_subquery() == len(d.include)
    else:
        inc = sa.exists().where(m.c.segment_id.in_(d.include), m.c.customer_id == cid)
    if not d.exclude:
        return inc
    x = segment_members.alias("exc")
    return sa.and_(inc, ~sa.exists().where(x.c.segment_id.in_(d.exclude), x.c.customer_id == cid))


def matches(d: Definition, now: dt.datetime, field: str = "segment.filter") -> sa.ColumnElement:
    """SQL over `audience`: the live customer matches the dynamic segment `d`."""
    return sa.and_(LIVE, AUDIENCE_FILTERS.analyse(d.filter, now, field).where)


def candidates(d: Definition, now: dt.datetime, field: str = "segment.filter") -> sa.Select:
    """SELECT customer_id of every member of `d` now (dynamic or combined), for previews and rebuilds."""
    if d.kind == DYNAMIC:
        return sa.select(a.customer_id.label("customer_id")).where(matches(d, now, field))
    if d.kind == COMBINED:
        m = segment_members.alias("src")
        ids = sa.select(m.c.customer_id).where(m.c.segment_id.in_(d.include)).distinct().subquery("ids")
        return sa.select(ids.c.customer_id.label("customer_id")).where(member_condition(d, ids.c.customer_id, now))
    s = segment_members
    return sa.select(s.c.customer_id.label("customer_id")).where(s.c.segment_id == d.id)


def _event(segment_id: str, customer_id: str, cause: str, when: dt.datetime) -> ev.SegmentMemberEvent:
    e = ev.SegmentMemberEvent(segment=f"segments/{segment_id}", customer=f"customers/{customer_id}", cause=cause)
    e.event_time.FromDatetime(when)
    return e


class Segments:
    """Membership maintenance (the hook, rebuilds, the refresh timer), shared by the API."""

    def __init__(self, rt: Campaign):
        self.rt = rt
        self.uow = rt.uow
        self.engine = rt.engine
        self.clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
        self.worker = jobs.JobWorker(rt.engine, {REBUILD_KIND: self._run_rebuild}, concurrency=2, poll_seconds=1.0)
        self._bytes_order: bool | None = None  # the database's collation orders text as bytes

    def now(self) -> dt.datetime:
        return self.clock()

    # -- 1. the hook: re-evaluate these customers --------------------------------------------
    def audience_changed(self, conn: sa.Connection, ids: Sequence[str], cause: str) -> None:
        rows = conn.execute(sa.select(segments).order_by(segments.c.depth, segments.c.id)).all()
        if not rows:
            return
        now = self.now()
        lock_shared(conn, [str(r.id) for r in rows])
        diff: list[tuple[str, str, str]] = []  # (routing key, segment id, customer id)
        diff += self._static_follow(conn, ids, rows)
        dynamic = [Definition.of(r) for r in rows if r.kind == DYNAMIC]
        if dynamic:
            diff += self._apply(conn, dynamic, ids, now)
        for depth in sorted({r.depth for r in rows if r.kind == COMBINED}):
            level = [Definition.of(r) for r in rows if r.kind == COMBINED and r.depth == depth]
            diff += self._apply(conn, level, ids, now)
        self._publish(conn, diff, "event", now)

    def _static_follow(self, conn, ids, rows) -> list[tuple[str, str, str]]:
        """Static memberships of merged customers move to the survivor; deleted leave."""
        static = [str(r.id) for r in rows if r.kind == STATIC]
        if not static:
            return []
        s = segment_members
        gone = sa.select(a.customer_id, a.merged_into).where(
            a.customer_id.in_(ids), sa.or_(a.deleted, a.merged_into != "")
        )
        found = conn.execute(gone).all()
        if not found:
            return []
        out = []
        survivors = {r.customer_id: r.merged_into for r in found if r.merged_into}
        removed = conn.execute(
            s.delete()
            .where(s.c.segment_id.in_(static), s.c.customer_id.in_([r.customer_id for r in found]))
            .returning(s.c.segment_id, s.c.customer_id, s.c.since, s.c.source)
        ).all()
        moved = [
            {"segment_id": r.segment_id, "customer_id": survivors[r.customer_id], "since": r.since, "source": r.source}
            for r in removed
            if r.customer_id in survivors
        ]
        out += [(REMOVED, str(r.segment_id), r.customer_id) for r in removed]
        if moved:
            stmt = pg_insert(s).values(moved).on_conflict_do_nothing().returning(s.c.segment_id, s.c.customer_id)
            out += [(ADDED, str(r.segment_id), r.customer_id) for r in conn.execute(stmt)]
        return out

    def _apply(self, conn, defs: list[Definition], ids: Sequence[str], now) -> list[tuple[str, str, str]]:
        """The members among `ids` of each segment of `defs` (one level) made right: the rows
        to add inserted and those to drop deleted; returns the difference."""
        s = segment_members
        branches = []
        for d in defs:
            sid = sa.literal(d.id, s.c.segment_id.type)
            if d.kind == DYNAMIC:
                try:
                    cond = matches(d, now)
                except Exception:  # a stored filter that no longer compiles (a field removed): skip it
                    log.exception("segment filter does not compile", extra={"segment": d.id})
                    continue
                branches.append(
                    sa.select(sid.label("segment_id"), a.customer_id.label("customer_id")).where(
                        a.customer_id == sa.any_(_texts(ids)), cond
                    )
                )
            else:
                cid = sa.func.unnest(_texts(ids)).table_valued("customer_id").render_derived()
                branches.append(
                    sa.select(sid.label("segment_id"), cid.c.customer_id.label("customer_id")).where(
                        member_condition(d, cid.c.customer_id, now)
                    )
                )
        if not branches:
            return []
        # Which of these customers each segment has now (one SELECT over all the segments, a
        # statement SQLAlchemy compiles once: its shape only changes with the segments), which
        # it had, and the difference written by one INSERT and one DELETE. RETURNING decides
        # the events, so a concurrent change of the same customer never publishes twice.
        seg_ids = [d.id for d in defs]
        matched = {(str(r.segment_id), r.customer_id) for r in conn.execute(sa.union_all(*branches))}
        current = {
            (str(r.segment_id), r.customer_id)
            for r in conn.execute(
                sa.select(s.c.segment_id, s.c.customer_id).where(
                    s.c.segment_id.in_(seg_ids), s.c.customer_id == sa.any_(_texts(ids))
                )
            )
        }
        out: list[tuple[str, str, str]] = []
        drop = sorted(current - matched)
        if drop:  # one array parameter each, whatever the number of pairs
            pairs = _pairs(drop)
            gone = conn.execute(
                s.delete()
                .where(
                    sa.tuple_(s.c.segment_id, s.c.customer_id).in_(sa.select(pairs.c.segment_id, pairs.c.customer_id))
                )
                .returning(s.c.segment_id, s.c.customer_id)
            )
            out += [(REMOVED, str(r.segment_id), r.customer_id) for r in gone]
        add = sorted(matched - current)
        if add:
            source = "filter" if defs[0].kind == DYNAMIC else "combined"
            pairs = _pairs(add)
            new = conn.execute(
                pg_insert(s)
                .from_select(
                    ["segment_id", "customer_id", "since", "source"],
                    sa.select(
                        pairs.c.segment_id, pairs.c.customer_id, sa.literal(now, s.c.since.type), sa.literal(source)
                    ),
                )
                .on_conflict_do_nothing()
                .returning(s.c.segment_id, s.c.customer_id)
            )
            out += [(ADDED, str(r.segment_id), r.customer_id) for r in new]
        return out

    def _publish(self, conn, diff, cause: str, now: dt.datetime) -> None:
        if not diff:
            return
        delta: dict[str, int] = {}
        by_key: dict[str, list] = {ADDED: [], REMOVED: []}
        for key, sid, cid in diff:
            delta[sid] = delta.get(sid, 0) + (1 if key == ADDED else -1)
            by_key[key].append((f"segments/{sid}", _event(sid, cid, cause, now)))
        with self.uow.joined(conn) as tx:
            for key, items in by_key.items():
                if len(items) > 50:  # an import, a merge of many: by COPY
                    tx.publish_many(key, items)
                else:
                    for subject, message in items:
                        tx.publish(key, message, subject)
        for sid, n in delta.items():
            if n:
                conn.execute(
                    segments.update().where(segments.c.id == sid).values(member_count=segments.c.member_count + n)
                )

    def publish(self, conn, diff, cause: str) -> None:
        """Events and member counts for a difference made by hand or by import; the combined
        segments built on the changed segments follow (those customers re-evaluated)."""
        now = self.now()
        self._publish(conn, diff, cause, now)
        ids = sorted({cid for _, _, cid in diff})
        if not ids:
            return
        rows = conn.execute(
            sa.select(segments).where(segments.c.kind == COMBINED).order_by(segments.c.depth, segments.c.id)
        ).all()
        if rows:
            lock_shared(conn, [str(r.id) for r in rows])
            follow: list[tuple[str, str, str]] = []
            for depth in sorted({r.depth for r in rows}):
                follow += self._apply(conn, [Definition.of(r) for r in rows if r.depth == depth], ids, now)
            self._publish(conn, follow, "event", now)

    # -- 2. rebuilds ---------------------------------------------------------------------------
    def start_rebuild(self, conn: sa.Connection, segment_id: str, cause: str, creator: str = "") -> jobs.Job:
        """A rebuild job for the segment (a queued one is reused; a running one is cancelled:
        the definition it started from may be stale)."""
        row = conn.execute(sa.select(segments).where(segments.c.id == segment_id).with_for_update()).one()
        if row.rebuild_job is not None:
            prev = jobs.get(conn, str(row.rebuild_job))
            if prev is not None and prev.state == jobs.QUEUED:
                return prev
            if prev is not None and prev.state == jobs.RUNNING:
                try:
                    jobs.cancel(conn, prev.id, by="segments")
                except FailedPrecondition:  # it ended meanwhile
                    pass
        job = jobs.start(conn, REBUILD_KIND, {"segment_id": segment_id, "cause": cause}, creator=creator)
        conn.execute(segments.update().where(segments.c.id == segment_id).values(rebuild_job=job.id))
        return job

    def _in_one_step(self, ctx, sid: str, total: int, work) -> None:
        """A rebuild done in one job step: the segment locked and read, `work(tx, definition,
        now)` -> (added, removed), the job saved "done" in the same transaction."""
        with ctx.step(self.uow) as tx:
            lock_exclusive(tx.conn, sid)
            row = tx.conn.execute(sa.select(segments).where(segments.c.id == sid)).one_or_none()
            if row is None:
                return
            added, removed = work(tx, Definition.of(row), self.now())
            ctx.save(tx.conn, "done", processed=total, total=total, increment={"added": added, "removed": removed})

    def _run_rebuild(self, ctx: jobs.JobContext):
        sid = ctx.params["segment_id"]
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(segments).where(segments.c.id == sid)).one_or_none()
            # the planner's row count (progress, not a figure); counted if never analysed
            total = (
                conn.execute(_ESTIMATE).scalar_one()
                or conn.execute(sa.select(sa.func.count()).select_from(audience)).scalar_one()
            )
        if row is None:
            return {"deleted": True}
        # A new segment's first build: its members come into being with it, announced by one
        # segment.built.v1 (member events follow every later change), not one event per member.
        first = ctx.params.get("cause") == "create" and row.evaluated_time is None
        if row.kind == DYNAMIC:
            self._rebuild_dynamic(ctx, sid, total, first)
        else:
            with ctx.step(self.uow) as tx:
                lock_exclusive(tx.conn, sid)
                row = tx.conn.execute(sa.select(segments).where(segments.c.id == sid)).one_or_none()
                if row is None:
                    return {"deleted": True}
                now = self.now()
                added, removed = (
                    self.diff(tx, Definition.of(row), now, events=not first) if row.kind == COMBINED else (0, 0)
                )
                self._finish(tx.conn, sid, now, tx if first else None)
                ctx.save(tx.conn, "done", processed=total, total=total, increment={"added": added, "removed": removed})
        with self.uow.begin() as tx:  # combined segments built on this one follow it
            for dep in tx.conn.execute(
                sa.select(segments.c.id).where(
                    segments.c.kind == COMBINED,
                    sa.or_(segments.c.include_ids.any(sid), segments.c.exclude_ids.any(sid)),
                )
            ).scalars():
                self.start_rebuild(tx.conn, str(dep), "dependency")
        self.worker.wake()
        return {"segment": f"segments/{sid}"}

    def _rebuild_dynamic(self, ctx: jobs.JobContext, sid: str, total: int, first: bool = False) -> None:
        """Chunks of heap pages of the audience (a TID range scan each: sequential, whatever the
        order of customer ids), each one transaction; a resumed job starts after its last chunk."""
        cp = ctx.checkpoint
        if cp == "done":
            return
        if cp is None and first and total <= _first_build_rows():
            # A new segment's first build: ONE statement, whatever the number of members (see
            # `_first_build`); interrupted, it starts again (nothing of it was committed).
            def first_build(tx, d: Definition, now) -> tuple[int, int]:
                added = self._first_build(tx.conn, d, now)
                self._finish(tx.conn, sid, now, tx, added=added)
                return added, 0

            self._in_one_step(ctx, sid, total, first_build)
            return
        if cp is None and self._small(sid):
            # Few customers match and few are members: one set-based step, the filter served
            # by its indexes (a walk of the whole heap would cost more than the change).
            def small(tx, d: Definition, now) -> tuple[int, int]:
                added, removed = self.diff(tx, d, now, events=not first)
                self._finish(tx.conn, sid, now, tx if first else None)
                return added, removed

            self._in_one_step(ctx, sid, total, small)
            return
        start = (cp or {}).get("page", 0)
        # the clock of the first chunk: every customer was evaluated at it or later
        t0 = (cp or {}).get("t0") or self.now().isoformat()
        # A first build (no member yet): nothing can leave and no row of a later chunk is a
        # member (the hook's concurrent inserts meet ON CONFLICT), so no delete, no anti-join.
        fresh = (cp or {}).get("fresh")
        if fresh is None:
            with self.engine.connect() as conn:
                fresh = (
                    conn.execute(
                        sa.select(segment_members.c.customer_id).where(segment_members.c.segment_id == sid).limit(1)
                    ).first()
                    is None
                )
        while True:
            with ctx.step(self.uow) as tx:
                conn = tx.conn
                lock_exclusive(conn, sid)
                row = conn.execute(sa.select(segments).where(segments.c.id == sid)).one_or_none()
                if row is None:
                    return
                pages = conn.execute(_PAGES).scalar_one()  # now: rows appended meanwhile are in the last chunk
                step = max(1, -(-pages * _chunk() // max(total, 1)))
                end = start + step
                last = end >= pages
                added, removed = self.diff_pages(
                    tx, Definition.of(row), start, None if last else end, self.now(), fresh, events=not first
                )
                processed = total if last else min(total, total * end // max(pages, 1))
                if last:
                    self._finish(conn, sid, dt.datetime.fromisoformat(t0), tx if first else None)
                ctx.save(
                    conn,
                    "done" if last else {"page": end, "fresh": fresh, "t0": t0},
                    processed=processed,
                    total=total,
                    increment={"added": added, "removed": removed},
                )
            if last:
                return
            start = end

    def _small(self, sid: str) -> bool:
        """Whether the segment's matches and members both fit in one chunk."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(segments).where(segments.c.id == sid)).one_or_none()
            if row is None or row.member_count > _chunk():
                return False
            d = Definition.of(row)
            # counted up to one more than a chunk: a broad filter's scan stops there
            q = candidates(d, self.now()).limit(_chunk() + 1).subquery()
            return conn.execute(sa.select(sa.func.count()).select_from(q)).scalar_one() <= _chunk()

    def _first_build(self, conn: sa.Connection, d: Definition, now: dt.datetime) -> int:
        """The members of a new dynamic segment inserted by one INSERT .. SELECT (the filter's
        indexes serve a narrow filter, a broad one is one sequential scan), in key order (the
        index of (segment, customer) filled leaf after leaf, not a random leaf per member).

        No ON CONFLICT: a speculative insertion per row (a second probe of the key and one more
        WAL record each) cost a third of a broad build. It is not needed: the caller holds the
        segment's exclusive lock, and every other writer of a dynamic segment's members (the
        hook, the clock) holds the shared one, so the only members the statement can meet are
        those committed before it, which its anti-join leaves out. The sort is by the bytes
        (COLLATE "C", several times cheaper than a locale's comparison) when the database's
        collation orders like them, else by the column's collation: either way the index's order.
        Returns the number inserted."""
        s = segment_members
        order = a.customer_id.collate("C") if self._bytewise(conn) else a.customer_id
        new = s.insert().from_select(
            ["segment_id", "customer_id", "since", "source"],
            sa.select(
                sa.literal(d.id, s.c.segment_id.type),
                a.customer_id,
                sa.literal(now, s.c.since.type),
                sa.literal("filter"),
            )
            .where(
                matches(d, now),
                ~sa.exists().where(s.c.segment_id == d.id, s.c.customer_id == a.customer_id),
            )
            .order_by(order),
        )
        return _rowcount(conn, new)

    def _bytewise(self, conn: sa.Connection) -> bool:
        """Whether the database's collation orders text as its bytes (C, POSIX, C.UTF-8)."""
        if self._bytes_order is None:
            collation = conn.execute(
                sa.text("SELECT datcollate FROM pg_database WHERE datname = current_database()")
            ).scalar_one()
            self._bytes_order = collation.replace("-", "").lower() in ("c", "posix", "c.utf8")
        return self._bytes_order

    def diff_pages(
        self,
        tx,
        d: Definition,
        first: int,
        end: int | None,
        now: dt.datetime,
        fresh: bool = False,
        events: bool = True,
    ) -> tuple[int, int]:
        """The difference of a dynamic segment over the audience rows in heap pages
        [first, end): members among them who no longer match leave, those who match and are
        not members enter (`fresh`: a first build, only entering). Returns (added, removed)."""
        ctid = sa.literal_column("audience.ctid")
        where = [ctid >= sa.text(f"'({int(first)},0)'::tid")]
        if end is not None:
            where.append(ctid < sa.text(f"'({int(end)},0)'::tid"))
        cur = (
            sa.select(a.customer_id, sa.func.coalesce(matches(d, now), sa.false()).label("hit"))
            .where(*where)
            .cte("cur")
        )
        leaving = None if fresh else segment_members.c.customer_id.in_(sa.select(cur.c.customer_id).where(~cur.c.hit))
        entering = sa.select(cur.c.customer_id).where(cur.c.hit)
        return self._write(tx, d, leaving, entering, now, anti_join=not fresh, events=events)

    def diff(self, tx, d: Definition, now: dt.datetime, events: bool = True) -> tuple[int, int]:
        """The whole difference of a combined segment, or of a dynamic one whose matches are
        few (its filter's indexes serve it). Returns (added, removed)."""
        want = candidates(d, now).subquery("want")
        leaving = ~sa.exists().where(want.c.customer_id == segment_members.c.customer_id)
        return self._write(tx, d, leaving, sa.select(want.c.customer_id), now, events=events)

    def _write(
        self,
        tx,
        d: Definition,
        leaving,
        entering: sa.Select,
        now: dt.datetime,
        anti_join: bool = True,
        events: bool = True,
    ) -> tuple[int, int]:
        """Set-based: delete the members for which `leaving` holds, insert the customers
        `entering` selects who are not members yet (an anti-join: hashed, not a conflict probe
        per member), each with its event built by the database. Returns (added, removed)."""
        s = segment_members
        template = ev.SegmentMemberEvent(segment=f"segments/{d.id}", cause="rebuild")
        template.event_time.FromDatetime(now)
        subject = sa.literal(f"segments/{d.id}").label("subject")
        removed = 0
        if leaving is not None:
            gone = s.delete().where(s.c.segment_id == d.id, leaving).returning(s.c.customer_id).cte("gone")
            removed = tx.publish_select(
                REMOVED,
                template,
                sa.select(subject, (sa.literal("customers/") + gone.c.customer_id).label("customer")),
                {"customer": 2},
            )
        want = entering.subquery("entering")
        source = "filter" if d.kind == DYNAMIC else "combined"
        new = (
            pg_insert(s)
            .from_select(
                ["segment_id", "customer_id", "since", "source"],
                sa.select(
                    sa.literal(d.id, s.c.segment_id.type),
                    want.c.customer_id,
                    sa.literal(now, s.c.since.type),
                    sa.literal(source),
                )
                .where(
                    ~sa.exists().where(s.c.segment_id == d.id, s.c.customer_id == want.c.customer_id)
                    if anti_join
                    else sa.true()
                )
                # in key order: the index of (segment, customer) filled page after page, not a
                # random leaf per member (fewer pages dirtied and written to the WAL)
                .order_by(want.c.customer_id),
            )
            .on_conflict_do_nothing()
        )
        if not events:  # a first build: the rows only (segment.built.v1 at its end)
            return _rowcount(tx.conn, new), removed
        new = new.returning(s.c.customer_id).cte("new")
        added = tx.publish_select(
            ADDED,
            template,
            sa.select(subject, (sa.literal("customers/") + new.c.customer_id).label("customer")),
            {"customer": 2},
        )
        return added, removed

    def _finish(self, conn, sid: str, evaluated: dt.datetime, built=None, added: int | None = None) -> None:
        """The count and clock of a finished build; `built` (a first build's transaction)
        publishes segment.built.v1 with the count. `added`: the rows the build's one statement
        inserted, added to the count the hook kept meanwhile (the members it met; a count of
        the key's entries would visit every new row's heap page: 0.1 s for 640,000)."""
        if added is None:
            count = sa.select(sa.func.count()).where(segment_members.c.segment_id == sid).scalar_subquery()
        else:
            count = segments.c.member_count + added
        n = conn.execute(
            segments.update()
            .where(segments.c.id == sid)
            .values(member_count=count, rebuild_time=sa.func.now(), evaluated_time=evaluated)
            .returning(segments.c.member_count)
        ).scalar_one_or_none()
        if built is not None and n is not None:
            e = ev.SegmentBuilt(segment=f"segments/{sid}", member_count=n, cause="create")
            e.event_time.FromDatetime(evaluated)
            built.publish(BUILT, e, f"segments/{sid}")

    # -- 3. the clock ------------------------------------------------------------------------------
    def refresh(self, conn: sa.Connection, timer=None) -> int:
        """Re-evaluate the segments whose filter names a relative time, as the clock moved since
        they were last evaluated (`evaluated_time`). Only customers whose compared fields lie
        between a relative value then and now can have changed (`last_purchase_time >= now - 30d`
        an hour later: those who bought between 30 days and 30 days minus an hour ago), found
        through the fields' indexes and re-evaluated like an audience change; a band wider than a
        rebuild chunk (a month boundary for `this_month`) starts a rebuild instead. Combined
        segments follow their parts. Returns the number of segments looked at."""
        now = self.now()
        rows = conn.execute(
            sa.select(segments)
            .where(segments.c.relative, segments.c.kind == DYNAMIC, segments.c.evaluated_time.is_not(None))
            .order_by(segments.c.id)
        ).all()
        for row in rows:
            d = Definition.of(row)
            try:
                then = AUDIENCE_FILTERS.analyse(d.filter, row.evaluated_time)
                later = AUDIENCE_FILTERS.analyse(d.filter, now)
            except InvalidArgument:
                log.warning("segment filter no longer compiles", extra={"segment": d.id})
                continue
            bands = []
            for (name, v1), (_, v2) in zip(then.relative_values, later.relative_values, strict=True):
                bands.append(AUDIENCE_FILTERS.fields[name].target.between(min(v1, v2), max(v1, v2)))
            limit = _chunk()
            ids = (
                conn.execute(sa.select(a.customer_id).where(LIVE, sa.or_(*bands)).limit(limit + 1)).scalars().all()
                if bands
                else []
            )
            if len(ids) > limit:
                self.start_rebuild(conn, d.id, "clock")
                continue
            lock_shared(conn, [d.id])
            # members in the band, whatever their row says now (a deleted customer left already)
            diff = self._apply(conn, [d], ids, now) if ids else []
            conn.execute(segments.update().where(segments.c.id == d.id).values(evaluated_time=now))
            self.publish(conn, diff, "rebuild")
        return len(rows)


def depends_relative(conn: sa.Connection, ids: Iterable[str]) -> tuple[bool, int]:
    """(any of these segments drifts with the clock, their deepest depth)."""
    ids = list(ids)
    if not ids:
        return False, -1
    r = conn.execute(
        sa.select(sa.func.bool_or(segments.c.relative), sa.func.max(segments.c.depth)).where(segments.c.id.in_(ids))
    ).one()
    return bool(r[0]), r[1] if r[1] is not None else -1


def engine(rt: Campaign) -> Segments:
    return rt.once("segments", lambda: Segments(rt))


# -- the part --------------------------------------------------------------------------------
def install(rt: Campaign) -> None:
    rt.hooks.audience_changed.append(lambda conn, ids, cause: engine(rt).audience_changed(conn, ids, cause))


def timer_handlers(rt: Campaign) -> None:
    seg = engine(rt)
    rt.timers.register(REFRESH_TIMER, lambda conn, timer: seg.refresh(conn, timer))
    cron = refresh_cron()
    try:
        timers.next_occurrence(cron)
    except (ValueError, KeyError):
        log.error("SEGMENT_REFRESH_CRON %r is not a cron expression; refreshing hourly", cron)
        cron = "0 * * * *"
    with rt.engine.begin() as conn:
        current = timers.get(conn, REFRESH_TIMER, "all")
        if current is None or current.cron != cron:
            timers.schedule_recurring(conn, REFRESH_TIMER, "all", cron)


def workers(rt: Campaign) -> list:
    return [engine(rt).worker]


def registration(rt: Campaign):
    from .segments_api import registration as reg

    return reg(rt, engine(rt))
