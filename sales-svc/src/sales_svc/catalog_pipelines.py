"""Pipelines and their ordered stages (CatalogService), and which pipeline a product uses.

`pipeline_for` and `first_stage` are what the opportunity part calls to open an opportunity:
the product's own pipeline, else its product line's, else the default, and that pipeline's
first open stage with its default probability."""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from crm.sales.v1 import catalog_pb2 as pb
from crm_chassis import audit
from crm_chassis.auth import Principal
from crm_chassis.errors import AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument
from crm_chassis.filtering import FieldType, FilterField, FilterSchema
from crm_chassis.pagination import PageTokens
from crm_chassis.persian import normalize
from crm_chassis.resources import UpdateMask, changes, check_etag, etag, required_text

from .catalog_common import (
    PIPELINE,
    PRODUCT,
    PRODUCT_LINE,
    STAGE,
    check_request_id,
    claim_request,
    delete_unreferenced,
    insert_unique,
    list_page,
    name_or_none,
    record_request,
    reference_filter,
    sqlstate,
    ts,
)
from .runtime import Sales
from .tables import opportunities, pipelines, product_lines, products, stages

# The opportunity fields a stage may require to be set before an opportunity enters it.
OPPORTUNITY_FIELDS = (
    "amount",
    "expected_close_date",
    "contact_name",
    "next_step",
    "customer",
    "product_line",
    "competitors",
    "lines",
    "description",
)
MAX_STAGES = 50
KIND_NAMES = {
    pb.STAGE_KIND_UNSPECIFIED: "open",
    pb.STAGE_KIND_OPEN: "open",
    pb.STAGE_KIND_WON: "won",
    pb.STAGE_KIND_LOST: "lost",
}
KIND_ENUMS = {"open": pb.STAGE_KIND_OPEN, "won": pb.STAGE_KIND_WON, "lost": pb.STAGE_KIND_LOST}
MASK = UpdateMask(["display_name", "product_line", "product", "is_default", "active", "stages"])
STAGE_FIELDS = ("name", "kind", "probability", "required_fields", "rotting_days")

FILTERS = FilterSchema(
    FilterField("display_name", pipelines.c.name),
    FilterField("product_line", reference_filter(pipelines.c.product_line_id, PRODUCT_LINE)),
    FilterField("product", reference_filter(pipelines.c.product_id, PRODUCT)),
    FilterField("is_default", pipelines.c.is_default, FieldType.BOOL),
    FilterField("active", pipelines.c.active, FieldType.BOOL),
    FilterField("create_time", pipelines.c.create_time, FieldType.TIMESTAMP),
)
SORT = {"display_name": pipelines.c.name, "create_time": pipelines.c.create_time}


def stage_to_proto(row) -> pb.Stage:
    return pb.Stage(
        name=STAGE.format(row.pipeline_id, row.id),
        display_name=row.name,
        kind=KIND_ENUMS[row.kind],
        probability=float(row.probability),
        required_fields=list(row.required_fields),
        rotting_days=row.rotting_days or 0,
        position=row.position,
    )


def pipeline_to_proto(row, stage_rows) -> pb.Pipeline:
    return pb.Pipeline(
        name=PIPELINE.format(row.id),
        display_name=row.name,
        product_line=PRODUCT_LINE.format(row.product_line_id) if row.product_line_id else "",
        product=PRODUCT.format(row.product_id) if row.product_id else "",
        is_default=row.is_default,
        active=row.active,
        stages=[stage_to_proto(s) for s in stage_rows],
        create_time=ts(row.create_time),
        update_time=ts(row.update_time),
        etag=etag(row.version),
    )


def _stage_rows(conn, pipeline_ids: list[str], lock: bool = False) -> dict[str, list]:
    q = (
        sa.select(stages)
        .where(stages.c.pipeline_id.in_(pipeline_ids))
        .order_by(stages.c.pipeline_id, stages.c.position)
    )
    out: dict[str, list] = {str(p): [] for p in pipeline_ids}
    for s in conn.execute(q.with_for_update() if lock else q):
        out[str(s.pipeline_id)].append(s)
    return out


def _rule(rule: str, reason: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation("pipeline.stages", rule)], reason=reason)


def validate_stages(items, pipeline_id: str | None) -> list[dict]:
    """The stages as rows to store, in order (`id` set for a stage kept by name, when updating
    `pipeline_id`), each problem named by its field; then the pipeline's rules: at least one
    open stage, exactly one won and one lost stage."""
    if not items:
        raise _rule("a pipeline needs stages: at least one open, one won and one lost", "PIPELINE_NEEDS_STAGES")
    if len(items) > MAX_STAGES:
        raise InvalidArgument.field("pipeline.stages", f"at most {MAX_STAGES} stages")
    bad: list[FieldViolation] = []
    out: list[dict] = []
    names: dict[str, int] = {}
    ids: dict[str, int] = {}
    for i, s in enumerate(items):
        where = f"pipeline.stages[{i}]"
        sid = None
        if pipeline_id is not None and s.name.strip():
            try:
                p, sid = STAGE.parse(s.name.strip(), f"{where}.name")
            except InvalidArgument as e:
                bad += e.violations
            else:
                if p != pipeline_id:
                    bad.append(FieldViolation(f"{where}.name", f"{s.name} is a stage of another pipeline"))
                elif sid in ids:
                    bad.append(FieldViolation(f"{where}.name", f"the same stage as stages[{ids[sid]}]"))
                ids.setdefault(sid, i)
        title = s.display_name.strip()
        if not title:
            bad.append(FieldViolation(f"{where}.display_name", "must not be empty"))
        elif len(title) > 100:
            bad.append(FieldViolation(f"{where}.display_name", "must be at most 100 characters"))
        else:
            key = normalize(title)
            if key in names:
                bad.append(FieldViolation(f"{where}.display_name", f"the same name as stages[{names[key]}]"))
            names.setdefault(key, i)
        if s.kind not in KIND_NAMES:
            bad.append(FieldViolation(f"{where}.kind", "must be STAGE_KIND_OPEN, STAGE_KIND_WON or STAGE_KIND_LOST"))
        p = s.probability
        if not math.isfinite(p) or p < 0 or p > 100:
            bad.append(FieldViolation(f"{where}.probability", f"must be 0..100 (percent), not {p:g}"))
        unknown = [f for f in s.required_fields if f not in OPPORTUNITY_FIELDS]
        if unknown:
            bad.append(
                FieldViolation(
                    f"{where}.required_fields",
                    f"unknown opportunity field {', '.join(map(repr, unknown))}; known: {', '.join(OPPORTUNITY_FIELDS)}",
                )
            )
        if s.rotting_days < 0:
            bad.append(FieldViolation(f"{where}.rotting_days", "must not be negative (0: never rots)"))
        if bad:
            continue
        out.append(
            {
                "id": sid,
                "position": i,
                "name": title,
                "kind": KIND_NAMES[s.kind],
                "probability": Decimal(repr(p)).quantize(Decimal("0.01")),
                "required_fields": list(dict.fromkeys(s.required_fields)),
                "rotting_days": s.rotting_days or None,
            }
        )
    if bad:
        raise InvalidArgument(bad[:50])
    kinds = [s["kind"] for s in out]
    if "open" not in kinds:
        raise _rule("a pipeline needs at least one open stage", "PIPELINE_NEEDS_OPEN_STAGE")
    for kind in ("won", "lost"):
        n = kinds.count(kind)
        if n != 1:
            raise _rule(
                f"a pipeline needs exactly one {kind} stage, not {n}", f"PIPELINE_NEEDS_ONE_{kind.upper()}_STAGE"
            )
    return out


def _stage_text(s) -> dict[str, Any]:
    """A stage as compared and audited (dicts and rows alike)."""
    g = s.get if isinstance(s, dict) else lambda k: getattr(s, k)
    return {
        "name": g("name"),
        "kind": g("kind"),
        "probability": str(Decimal(g("probability")).quantize(Decimal("0.01"))),
        "required_fields": list(g("required_fields")),
        "rotting_days": g("rotting_days"),
    }


def resolve(conn: sa.Connection, product_id: str | None = None, product_line_id: str | None = None) -> tuple[str, str]:
    """(pipeline id, why): the product's own active pipeline ("product"), else the active
    pipeline of `product_line_id` or of the product's line ("product_line"), else the default
    pipeline ("default"). NOT_FOUND for an unknown product or product line; FAILED_PRECONDITION
    NO_DEFAULT_PIPELINE when nothing applies."""
    active = pipelines.c.active.is_(True)
    if product_id:
        line = conn.execute(sa.select(products.c.product_line_id).where(products.c.id == product_id)).one_or_none()
        if line is None:
            raise PRODUCT.not_found([product_id])
        own = conn.execute(sa.select(pipelines.c.id).where(pipelines.c.product_id == product_id, active)).scalar()
        if own:
            return str(own), "product"
        product_line_id = product_line_id or (str(line[0]) if line[0] else None)
    if product_line_id:
        if conn.execute(sa.select(product_lines.c.id).where(product_lines.c.id == product_line_id)).first() is None:
            raise PRODUCT_LINE.not_found([product_line_id])
        own = conn.execute(
            sa.select(pipelines.c.id).where(
                pipelines.c.product_line_id == product_line_id, pipelines.c.product_id.is_(None), active
            )
        ).scalar()
        if own:
            return str(own), "product_line"
    default = conn.execute(sa.select(pipelines.c.id).where(pipelines.c.is_default, active)).scalar()
    if default is None:
        raise FailedPrecondition("there is no active default pipeline", reason="NO_DEFAULT_PIPELINE")
    return str(default), "default"


def pipeline_for(conn: sa.Connection, product_id: str | None = None, product_line_id: str | None = None) -> str:
    """The id of the pipeline an opportunity for this product (or product line) goes through;
    see `resolve` for the precedence and errors."""
    return resolve(conn, product_id, product_line_id)[0]


def first_stage(conn: sa.Connection, pipeline_id: str) -> tuple[str, Decimal]:
    """(stage id, default probability) of the pipeline's first open stage, where a new
    opportunity starts. NOT_FOUND for an unknown pipeline."""
    row = conn.execute(
        sa.select(stages.c.id, stages.c.probability)
        .where(stages.c.pipeline_id == pipeline_id, stages.c.kind == "open")
        .order_by(stages.c.position)
        .limit(1)
    ).one_or_none()
    if row is None:
        if conn.execute(sa.select(pipelines.c.id).where(pipelines.c.id == pipeline_id)).first() is None:
            raise PIPELINE.not_found([pipeline_id])
        raise FailedPrecondition(
            f"{PIPELINE.format(pipeline_id)} has no open stage", reason="PIPELINE_NEEDS_OPEN_STAGE"
        )
    return str(row.id), row.probability


class Pipelines:
    def __init__(self, sales: Sales, tokens: PageTokens):
        self.uow = sales.uow
        self.tokens = tokens

    def _load(self, conn, pid: str) -> pb.Pipeline:
        row = conn.execute(sa.select(pipelines).where(pipelines.c.id == pid)).one_or_none()
        if row is None:
            raise PIPELINE.not_found([pid])
        return pipeline_to_proto(row, _stage_rows(conn, [pid])[pid])

    def _check_refs(self, conn, line_id: str | None, product_id: str | None) -> None:
        bad = []
        if line_id and conn.execute(sa.select(product_lines.c.id).where(product_lines.c.id == line_id)).first() is None:
            bad.append(FieldViolation("pipeline.product_line", f"no such product line: {PRODUCT_LINE.format(line_id)}"))
        if product_id and conn.execute(sa.select(products.c.id).where(products.c.id == product_id)).first() is None:
            bad.append(FieldViolation("pipeline.product", f"no such product: {PRODUCT.format(product_id)}"))
        if bad:
            raise InvalidArgument(bad)

    def _check_unique_owner(self, conn, pid: str | None, line_id: str | None, product_id: str | None) -> None:
        """One active pipeline per product and per product line."""
        for col, value, what, name in (
            (pipelines.c.product_id, product_id, "product", PRODUCT),
            (pipelines.c.product_line_id, line_id, "product line", PRODUCT_LINE),
        ):
            if not value:
                continue
            q = sa.select(pipelines.c.id, pipelines.c.name).where(col == value, pipelines.c.active)
            if pid:
                q = q.where(pipelines.c.id != pid)
            other = conn.execute(q).first()
            if other:
                raise AlreadyExists(
                    f"{what} {name.format(value)} already has the active pipeline {PIPELINE.format(other.id)} "
                    f"({other.name}); change or deactivate that one",
                    reason="PIPELINE_ALREADY_ASSIGNED",
                    metadata={"pipeline": PIPELINE.format(other.id)},
                )

    def _take_default(self, tx, pid: str | None, principal: Principal) -> None:
        """Make no other pipeline the default (this one is about to be)."""
        q = pipelines.update().where(pipelines.c.is_default)
        if pid:
            q = q.where(pipelines.c.id != pid)
        for row in tx.conn.execute(
            q.values(is_default=False, version=pipelines.c.version + 1, update_time=sa.func.now()).returning(
                *pipelines.c
            )
        ).all():
            out = pipeline_to_proto(row, _stage_rows(tx.conn, [str(row.id)])[str(row.id)])
            tx.publish("pipeline.updated.v1", pb.PipelineEvent(pipeline=out, changed_fields=["is_default"]), out.name)
            tx.audit(out.name, "pipeline.update", principal, [audit.change("is_default", "true", "false")])

    def _top(self, m: pb.Pipeline, paths: list[str]) -> dict:
        """The pipeline's own fields among `paths`, validated, as columns."""
        out, bad = {}, []
        readers = {
            "display_name": ("name", lambda: required_text(200)(m.display_name, "pipeline.display_name")),
            "product_line": (
                "product_line_id",
                lambda: name_or_none(PRODUCT_LINE, m.product_line, "pipeline.product_line"),
            ),
            "product": ("product_id", lambda: name_or_none(PRODUCT, m.product, "pipeline.product")),
            "is_default": ("is_default", lambda: m.is_default),
            "active": ("active", lambda: m.active),
        }
        for p in paths:
            if p in readers:
                col, read = readers[p]
                try:
                    out[col] = read()
                except InvalidArgument as e:
                    bad += e.violations
        if bad:
            raise InvalidArgument(bad)
        return out

    @staticmethod
    def _not_both(v: dict) -> None:
        if v.get("product_id") and v.get("product_line_id"):
            raise InvalidArgument.field(
                "pipeline.product", "a pipeline is for a product or for a product line, not both"
            )

    # -- create / read ---------------------------------------------------------------------
    def create(self, m: pb.Pipeline, request_id: str, principal: Principal) -> pb.Pipeline:
        check_request_id(request_id)
        values = self._top(m, ["display_name", "product_line", "product", "is_default"])
        values["active"] = True
        self._not_both(values)
        new_stages = validate_stages(m.stages, None)
        with self.uow.begin() as tx:
            conn = tx.conn
            owned, existing = claim_request(conn, "pipeline", request_id)
            if not owned:
                return self._load(conn, existing)
            self._check_refs(conn, values["product_line_id"], values["product_id"])
            self._check_unique_owner(conn, None, values["product_line_id"], values["product_id"])
            if values["is_default"]:
                self._take_default(tx, None, principal)
            row = insert_unique(
                conn,
                pipelines.insert().values(**values).returning(*pipelines.c),
                "a pipeline with that name already exists",
                {"display_name": values["name"]},
            )
            conn.execute(
                stages.insert(),
                [{**{k: v for k, v in s.items() if k != "id"}, "pipeline_id": row.id} for s in new_stages],
            )
            record_request(conn, "pipeline", request_id, row.id)
            out = self._load(conn, str(row.id))
            tx.publish("pipeline.created.v1", pb.PipelineEvent(pipeline=out), out.name)
            tx.audit(
                out.name,
                "pipeline.create",
                principal,
                [audit.change(k, "null", audit.value(v)) for k, v in values.items() if v not in (None, "")]
                + [audit.change("stages", "null", audit.value([_stage_text(s) for s in new_stages]))],
            )
        return out

    def get(self, name: str) -> pb.Pipeline:
        pid = PIPELINE.parse(name).id
        with self.uow.read() as conn:
            return self._load(conn, pid)

    def list(self, r: pb.ListPipelinesRequest) -> pb.ListPipelinesResponse:
        with self.uow.read() as conn:
            rows, nxt = list_page(
                conn,
                self.tokens,
                "pipelines",
                sa.select(pipelines),
                FILTERS,
                SORT,
                "display_name",
                pipelines.c.id,
                r.page_size,
                r.page_token,
                r.filter,
                r.order_by,
            )
            by_pipeline = _stage_rows(conn, [str(x.id) for x in rows]) if rows else {}
        return pb.ListPipelinesResponse(
            pipelines=[pipeline_to_proto(x, by_pipeline[str(x.id)]) for x in rows], next_page_token=nxt
        )

    def resolve(self, r: pb.ResolvePipelineRequest) -> pb.ResolvePipelineResponse:
        product_id = name_or_none(PRODUCT, r.product, "product")
        line_id = name_or_none(PRODUCT_LINE, r.product_line, "product_line")
        with self.uow.read() as conn:
            pid, why = resolve(conn, product_id, line_id)
            return pb.ResolvePipelineResponse(pipeline=self._load(conn, pid), matched=why)

    # -- update ----------------------------------------------------------------------------
    def update(self, m: pb.Pipeline, mask, principal: Principal) -> pb.Pipeline:
        paths = MASK.paths(mask)
        pid = PIPELINE.parse(m.name, "pipeline.name").id
        new = self._top(m, paths)
        new_stages = validate_stages(m.stages, pid) if "stages" in paths else None
        with self.uow.begin() as tx:
            conn = tx.conn
            row = conn.execute(sa.select(pipelines).where(pipelines.c.id == pid).with_for_update()).one_or_none()
            if row is None:
                raise PIPELINE.not_found(m.name)
            check_etag(m.etag, row.version, m.name)
            old = {k: row._mapping[k] for k in new}
            merged = {**row._mapping, **new}
            self._not_both(merged)
            self._check_refs(
                conn,
                new.get("product_line_id") if "product_line_id" in new else None,
                new.get("product_id") if "product_id" in new else None,
            )
            if row.is_default and not merged["is_default"]:
                raise FailedPrecondition(
                    f"{m.name} is the default pipeline: make another pipeline the default instead",
                    reason="DEFAULT_PIPELINE_REQUIRED",
                    metadata={"name": m.name},
                )
            if merged["is_default"] and not merged["active"]:
                raise FailedPrecondition(
                    "the default pipeline must be active", reason="DEFAULT_PIPELINE_INACTIVE", metadata={"name": m.name}
                )
            if merged["active"]:
                self._check_unique_owner(conn, pid, merged["product_line_id"], merged["product_id"])
            diff = changes(old, new)
            current = _stage_rows(conn, [pid], lock=True)[pid]
            stage_change = new_stages is not None and self._replace_stages(conn, m.name, current, new_stages)
            if not diff and not stage_change:
                return pipeline_to_proto(row, current)
            if merged["is_default"] and not row.is_default:
                self._take_default(tx, pid, principal)
            insert_unique(
                conn,
                pipelines.update()
                .where(pipelines.c.id == pid)
                .values(
                    **{c.field: new[c.field] for c in diff}, version=pipelines.c.version + 1, update_time=sa.func.now()
                ),
                "a pipeline with that name already exists",
                {"name": m.name},
                one=False,
            )
            out = self._load(conn, pid)
            fields = [
                {"name": "display_name", "product_line_id": "product_line", "product_id": "product"}.get(
                    c.field, c.field
                )
                for c in diff
            ]
            audited = [c.as_audit() for c in diff]
            if stage_change:
                fields.append("stages")
                audited.append(
                    audit.change(
                        "stages",
                        audit.value([_stage_text(s) for s in current]),
                        audit.value([_stage_text(s) for s in new_stages]),
                    )
                )
            tx.publish("pipeline.updated.v1", pb.PipelineEvent(pipeline=out, changed_fields=fields), out.name)
            tx.audit(out.name, "pipeline.update", principal, audited)
        return out

    def _replace_stages(self, conn, name: str, current: list, new_stages: list[dict]) -> bool:
        """Make the pipeline's stages `new_stages` (kept by id, added without one, the others
        dropped); FAILED_PRECONDITION naming a stage to drop or whose kind would change while
        opportunities are in it. False when nothing differs."""
        by_id = {str(s.id): s for s in current}
        bad = [
            FieldViolation(
                f"pipeline.stages[{s['position']}].name",
                f"{STAGE.format(name.split('/')[1], s['id'])} is not a stage of {name}",
            )
            for s in new_stages
            if s["id"] and s["id"] not in by_id
        ]
        if bad:
            raise InvalidArgument(bad)
        kept = {s["id"] for s in new_stages if s["id"]}
        dropped = [s for s in current if str(s.id) not in kept]
        rekinded = [s for s in new_stages if s["id"] and by_id[s["id"]].kind != s["kind"]]
        watched = [str(s.id) for s in dropped] + [s["id"] for s in rekinded]
        occupied = {}
        if watched:
            o = opportunities.c
            occupied = {
                str(r.stage_id): r
                for r in conn.execute(
                    sa.select(
                        o.stage_id,
                        sa.func.count().filter(sa.and_(o.state == "open", o.delete_time.is_(None))).label("open"),
                        sa.func.count().label("total"),
                    )
                    .where(o.stage_id.in_(watched))
                    .group_by(o.stage_id)
                )
            }
        for s in dropped:
            use = occupied.get(str(s.id))
            sname = STAGE.format(s.pipeline_id, s.id)
            if use is not None and use.open:
                raise FailedPrecondition(
                    f"stage {s.name!r} ({sname}) has {use.open} open opportunities: move them to another "
                    "stage before removing it",
                    reason="STAGE_HAS_OPEN_OPPORTUNITIES",
                    metadata={"stage": sname, "open_opportunities": str(use.open)},
                )
            if use is not None:
                raise FailedPrecondition(
                    f"stage {s.name!r} ({sname}) is where {use.total} closed opportunities ended: keep it "
                    "(it may be renamed)",
                    reason="STAGE_HAS_OPPORTUNITIES",
                    metadata={"stage": sname, "opportunities": str(use.total)},
                )
        for s in rekinded:
            use = occupied.get(s["id"])
            if use is not None and use.open:
                sname = STAGE.format(name.split("/")[1], s["id"])
                raise FailedPrecondition(
                    f"stage {by_id[s['id']].name!r} ({sname}) has {use.open} open opportunities: its kind "
                    f"cannot change from {by_id[s['id']].kind} to {s['kind']}",
                    reason="STAGE_KIND_IN_USE",
                    metadata={"stage": sname},
                )
        before = [(str(s.id), _stage_text(s)) for s in current]
        after = [(s["id"], _stage_text(s)) for s in new_stages]
        if before == after:
            return False
        pid = name.split("/")[1]
        if dropped:
            try:
                with conn.begin_nested():
                    conn.execute(stages.delete().where(stages.c.id.in_([s.id for s in dropped])))
            except sa.exc.IntegrityError as exc:  # a row of another part still names the stage
                if sqlstate(exc) != "23503":
                    raise
                referrer = getattr(getattr(exc.orig, "diag", None), "table_name", None) or "another record"
                raise FailedPrecondition(
                    f"a stage to remove is still referred to (by {referrer}): keep it", reason="STAGE_IN_USE"
                ) from None
        columns = ("position", *STAGE_FIELDS)
        updates = [{"v_id": s["id"], **{f"v_{k}": s[k] for k in columns}} for s in new_stages if s["id"]]
        if updates:  # one statement, executed for the (at most 50) kept stages
            conn.execute(
                stages.update()
                .where(stages.c.id == sa.bindparam("v_id"))
                .values({k: sa.bindparam(f"v_{k}") for k in columns}),
                updates,
            )
        added = [{**{k: v for k, v in s.items() if k != "id"}, "pipeline_id": pid} for s in new_stages if not s["id"]]
        if added:
            conn.execute(stages.insert(), added)
        return True

    # -- delete ----------------------------------------------------------------------------
    def delete(self, name: str, given_etag: str, principal: Principal) -> None:
        pid = PIPELINE.parse(name).id
        with self.uow.begin() as tx:
            conn = tx.conn
            row = conn.execute(sa.select(pipelines).where(pipelines.c.id == pid).with_for_update()).one_or_none()
            if row is None:
                raise PIPELINE.not_found(name)
            check_etag(given_etag, row.version, name)
            if row.is_default:
                raise FailedPrecondition(
                    f"{name} is the default pipeline: make another pipeline the default first",
                    reason="DEFAULT_PIPELINE_REQUIRED",
                    metadata={"name": name},
                )
            out = pipeline_to_proto(row, _stage_rows(conn, [pid])[pid])
            delete_unreferenced(conn, pipelines, pid, name, "pipeline")
            tx.publish("pipeline.deleted.v1", pb.PipelineEvent(pipeline=out), name)
            tx.audit(name, "pipeline.delete", principal, [])
