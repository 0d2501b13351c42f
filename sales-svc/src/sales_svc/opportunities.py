"""OpportunityService (proto/crm/sales/v1/opportunities.proto): opportunities, their stages and
history, the pipeline board and exports. The rules live in opportunities_core.py (values, stage
rules, `open_opportunity`), the queries in opportunities_queries.py, the board in
opportunities_board.py and the export in opportunities_export.py."""

from __future__ import annotations

from decimal import Decimal

import sqlalchemy as sa

from crm.sales.v1 import opportunities_pb2 as pb
from crm.sales.v1 import opportunities_pb2_grpc
from crm_chassis import audit
from crm_chassis.auth import Principal
from crm_chassis.errors import FailedPrecondition, InvalidArgument
from crm_chassis.filtering import keyset_page
from crm_chassis.grpc_server import Registration
from crm_chassis.interceptors import current_principal
from crm_chassis.pagination import PageTokens, page_size
from crm_chassis.resources import UpdateMask, check_etag

from . import opportunities_board, opportunities_export
from .access import Scope
from .opportunities_core import (
    HISTORY_KINDS,
    OPPORTUNITY,
    STAGE,
    amount_text,
    check_category,
    check_references,
    check_requirements,
    closed_error,
    currency_of,
    event,
    first_of,
    full,
    history,
    lines_by_opportunity,
    load,
    open_opportunity,
    pipeline_stages,
    requirement_values,
    search_text,
    target_stage,
    to_proto,
    ts,
    values_from_proto,
    write_lines,
)
from .opportunities_queries import list_page, search_page
from .runtime import Sales
from .tables import opportunities, opportunity_history, opportunity_lines

__all__ = ["open_opportunity", "registration", "OpportunityUseCases"]

o = opportunities
CREATE_FIELDS = [
    "display_name",
    "customer",
    "contact_name",
    "pipeline",
    "stage",
    "lines",
    "amount",
    "currency_code",
    "expected_close_date",
    "probability",
    "forecast_category",
    "owner",
    "team",
    "product_line",
    "competitors",
    "next_step",
    "source",
    "campaign_id",
    "description",
]
MASK = UpdateMask(
    [f for f in CREATE_FIELDS if f not in ("pipeline", "stage")],
    immutable={
        "name": "",
        "pipeline": "an opportunity stays in its pipeline",
        "stage": "move it with :moveStage (or :win, :lose, :reopen)",
        "state": "use :win, :lose or :reopen",
        "lead": "it is set by the lead's conversion",
    },
    field="update_mask",
)
# path -> column, for the audit trail of an update
COLUMN_OF = {
    "display_name": "name",
    "customer": "customer_id",
    "owner": "owner_id",
    "team": "team_id",
    "product_line": "product_line_id",
}


def _plain(v):
    """A value as the audit trail compares it (a Decimal without trailing zeros, dates ISO)."""
    if isinstance(v, Decimal):
        return format(v.normalize(), "f")
    return v.isoformat() if hasattr(v, "isoformat") else v


class OpportunityUseCases:
    def __init__(self, sales: Sales):
        self.sales = sales
        self.uow = sales.uow
        self.tokens = PageTokens(sales.ctx.settings.jwt_secret, "opportunities")

    # -- helpers --------------------------------------------------------------------------------
    def _visible(self, oid: str, principal: Principal):
        scope = Scope.of(principal)
        return sa.and_(o.c.id == oid, scope.visible(o.c.owner_id, o.c.team_id))

    def _locked(self, tx, name: str, field: str, principal: Principal, etag_given: str = ""):
        oid = OPPORTUNITY.parse(name, field).id
        row = load(tx.conn, self._visible(oid, principal), lock=True)
        if row is None:
            raise OPPORTUNITY.not_found(name)
        check_etag(etag_given, row.version, name)
        return row

    def _finish(self, tx, oid: str, routing_key: str, action: str, principal, changes, previous_stage=""):
        """The stored result of a write: its event and audit entry; the proto returned."""
        result, line_rows, row = full(tx.conn, oid)
        tx.publish(routing_key, event(result, line_rows, row.version, previous_stage), result.name)
        tx.audit(result.name, action, principal, changes)
        return result

    # -- create / read ----------------------------------------------------------------------------
    def create(self, req: pb.CreateOpportunityRequest, principal: Principal) -> pb.Opportunity:
        if len(req.request_id) > 128:
            raise InvalidArgument.field("request_id", "must be at most 128 characters")
        op = req.opportunity
        currency = currency_of(op, "IRR")
        v = values_from_proto(op, CREATE_FIELDS, currency)
        check_category(v["forecast_category"])
        lines = v["lines"]
        if lines and v["amount"] is not None:
            derived = sum((ln.amount(currency) for ln in lines), Decimal(0))
            if v["amount"] != derived:
                raise InvalidArgument.field(
                    "opportunity.amount",
                    f"is the sum of the lines ({amount_text(derived, currency)}) when there are lines; leave it unset",
                )
        pipeline_id, stage_id = v["pipeline_id"], None
        if v["stage"]:
            p, stage_id = v["stage"]
            if pipeline_id and p != pipeline_id:
                raise InvalidArgument.field("opportunity.stage", f"is not a stage of pipelines/{pipeline_id}")
            pipeline_id = p
        owner = v["owner_id"] or principal.subject
        with self.uow.begin() as tx:
            Scope.of(principal).require_assign(tx.conn, owner, v["team_id"], field="opportunity.owner")
            return open_opportunity(
                tx,
                principal,
                name=v["display_name"],
                customer_id=v["customer_id"],
                owner_id=owner,
                team_id=v["team_id"],
                product_line_id=v["product_line_id"],
                pipeline_id=pipeline_id,
                stage_id=stage_id,
                source=v["source"],
                campaign_id=v["campaign_id"],
                currency_code=currency,
                amount=v["amount"],
                expected_close_date=v["expected_close_date"],
                lines=lines,
                contact_name=v["contact_name"],
                probability=v["probability"],
                forecast_category=v["forecast_category"],
                competitors=v["competitors"],
                next_step=v["next_step"],
                description=v["description"],
                request_id=req.request_id,
            )

    def get(self, name: str, principal: Principal) -> pb.Opportunity:
        oid = OPPORTUNITY.parse(name).id
        with self.uow.read() as conn:
            row = load(conn, self._visible(oid, principal))
            if row is None:
                raise OPPORTUNITY.not_found(name)
            return to_proto(row, lines_by_opportunity(conn, [oid]).get(oid, []))

    def _protos(self, conn, rows) -> list[pb.Opportunity]:
        lines = lines_by_opportunity(conn, [str(r.id) for r in rows])
        return [to_proto(r, lines.get(str(r.id), [])) for r in rows]

    def list(self, req: pb.ListOpportunitiesRequest, principal: Principal, rows_only: bool = False):
        limit = page_size(req.page_size)
        with self.uow.read() as conn:
            rows, token = list_page(
                conn, self.tokens, Scope.of(principal), limit, req.page_token, req.filter, req.order_by
            )
            return (rows if rows_only else self._protos(conn, rows)), token

    def search(self, req: pb.SearchOpportunitiesRequest, principal: Principal, rows_only: bool = False):
        limit = page_size(req.page_size, default=20, maximum=100)
        with self.uow.read() as conn:
            rows, token = search_page(
                conn, self.tokens, Scope.of(principal), req.query, limit, req.page_token, req.filter
            )
            if rows_only:
                return rows, token
            protos = self._protos(conn, rows)
            return [(p, float(r.relevance)) for p, r in zip(protos, rows, strict=True)], token

    # -- update -----------------------------------------------------------------------------------
    def update(self, req: pb.UpdateOpportunityRequest, principal: Principal) -> pb.Opportunity:
        op = req.opportunity
        paths = MASK.paths(req.update_mask)
        OPPORTUNITY.parse(op.name, "opportunity.name")
        with self.uow.begin() as tx:
            conn = tx.conn
            row = self._locked(tx, op.name, "opportunity.name", principal, op.etag)
            oid = str(row.id)
            currency = row.currency_code
            if "currency_code" in paths:
                currency = op.currency_code or currency
            v = values_from_proto(op, paths, currency)
            old_lines = lines_by_opportunity(conn, [oid]).get(oid, [])
            if "forecast_category" in paths:
                check_category(v["forecast_category"], row.forecast_category)
            if row.state != "open":  # a closed one keeps its probability and category
                if "forecast_category" in paths and v["forecast_category"] != row.forecast_category:
                    raise closed_error(row)
                if "probability" in paths and v["probability"] is not None and v["probability"] != row.probability:
                    raise closed_error(row)
                if "probability" in paths and v["probability"] is None:
                    paths = [p for p in paths if p != "probability"]
            if currency != row.currency_code:
                if old_lines and "lines" not in paths:
                    raise InvalidArgument.field(
                        "opportunity.currency_code",
                        f"the lines are in {row.currency_code}: give the lines in {currency} too",
                    )
                if not old_lines and row.amount and "amount" not in paths:
                    raise InvalidArgument.field(
                        "opportunity.currency_code",
                        f"the amount is in {row.currency_code}: give the amount in {currency} too",
                    )
            new = {
                "name": row.name,
                "customer_id": row.customer_id,
                "contact_name": row.contact_name,
                "owner_id": row.owner_id,
                "team_id": str(row.team_id) if row.team_id else None,
                "product_line_id": str(row.product_line_id) if row.product_line_id else None,
                "competitors": list(row.competitors or []),
                "next_step": row.next_step,
                "source": row.source,
                "campaign_id": row.campaign_id,
                "description": row.description,
                "currency_code": currency,
                "expected_close_date": row.expected_close_date,
                "forecast_category": row.forecast_category,
            }
            for p, val in v.items():
                if p in ("lines", "amount", "probability", "stage", "pipeline_id"):
                    continue
                new["name" if p == "display_name" else p] = val
            if "owner" in paths and not new["owner_id"]:
                raise InvalidArgument.field("opportunity.owner", "is required")
            # lines and amount
            lines = v["lines"] if "lines" in paths else None
            has_lines = bool(lines) if lines is not None else bool(old_lines)
            amount = row.amount
            if lines:
                amount = sum((ln.amount(currency) for ln in lines), Decimal(0))
            if "amount" in paths and v["amount"] is not None:
                if has_lines and v["amount"] != amount:
                    raise InvalidArgument.field(
                        "opportunity.amount",
                        f"is the sum of the lines ({amount_text(amount, currency)}); change the lines, or clear them",
                    )
                amount = v["amount"]
            new["amount"] = amount
            # probability: set overrides the stage's default; named without a value resets it
            probability, overridden = row.probability, row.probability_overridden
            if "probability" in paths:
                if v["probability"] is None:
                    stage = next(s for s in pipeline_stages(conn, row.pipeline_id) if s.id == row.stage_id)
                    probability, overridden = stage.probability, False
                else:
                    # the value it has keeps its origin (a "*" update sends the stage's default back)
                    probability = v["probability"]
                    overridden = row.probability_overridden or probability != row.probability
            owner_changed = new["owner_id"] != row.owner_id
            team_changed = new["team_id"] != (str(row.team_id) if row.team_id else None)
            if owner_changed or team_changed:
                Scope.of(principal).require_assign(
                    conn, new["owner_id"], new["team_id"] if team_changed else None, field="opportunity.owner"
                )
            check_references(conn, {"team_id": new["team_id"] if team_changed else None, "lines": lines or []})
            if "product_line" in paths and new["product_line_id"] != (
                str(row.product_line_id) if row.product_line_id else None
            ):
                check_references(conn, {"product_line_id": new["product_line_id"]})
            # what changed
            stored = {k: _plain(row._mapping[k]) for k in new}
            changes = [
                audit.change(k, audit.value(stored[k]), audit.value(_plain(new[k])))
                for k in new
                if audit.value(stored[k]) != audit.value(_plain(new[k]))
            ]
            if probability != row.probability or overridden != row.probability_overridden:
                changes.append(
                    audit.change("probability", audit.value(str(row.probability)), audit.value(str(probability)))
                )
            lines_changed = lines is not None and _line_tuples(lines, currency) != _line_tuples(old_lines, currency)
            if lines_changed:
                changes.append(audit.change("lines", audit.value(len(old_lines)), audit.value(len(lines))))
            if not changes:
                return to_proto(row, old_lines)
            values = {k: new[k] for k in new}
            values.update(
                probability=probability,
                probability_overridden=overridden,
                amount_from_lines=has_lines,
                search_text=search_text(new),
                version=o.c.version + 1,
                update_time=sa.func.now(),
            )
            conn.execute(o.update().where(o.c.id == oid).values(values))
            if lines_changed:
                conn.execute(opportunity_lines.delete().where(opportunity_lines.c.opportunity_id == oid))
                write_lines(tx, oid, lines, currency)
            slips = []
            if amount != row.amount or currency != row.currency_code:
                slips.append(
                    {
                        "kind": "amount",
                        "old_value": amount_text(row.amount, row.currency_code),
                        "new_value": amount_text(amount, currency),
                    }
                )
            if new["expected_close_date"] != row.expected_close_date:
                slips.append(
                    {
                        "kind": "close_date",
                        "old_value": row.expected_close_date.isoformat() if row.expected_close_date else "",
                        "new_value": new["expected_close_date"].isoformat() if new["expected_close_date"] else "",
                    }
                )
            if probability != row.probability:
                slips.append(
                    {"kind": "probability", "old_value": _pct(row.probability), "new_value": _pct(probability)}
                )
            if owner_changed:
                slips.append({"kind": "owner", "old_value": row.owner_id, "new_value": new["owner_id"]})
            history(tx, oid, principal, slips)
            return self._finish(tx, oid, "opportunity.updated.v1", "update", principal, changes)

    # -- stages -----------------------------------------------------------------------------------
    def _enter(self, tx, row, stage, principal, *, state: str, extra: dict, reason: str | None = None):
        """Put `row` in `stage` (its required fields checked) with the values of `state`."""
        conn = tx.conn
        oid = str(row.id)
        lines = lines_by_opportunity(conn, [oid]).get(oid, [])
        check_requirements(stage, requirement_values({**row._mapping, "lines": lines}))
        probability = extra.pop("probability", None)
        if probability is None:
            probability = row.probability if row.probability_overridden else stage.probability
        values = {
            "stage_id": stage.id,
            "stage_enter_time": sa.func.now(),
            "state": state,
            "probability": probability,
            "version": o.c.version + 1,
            "update_time": sa.func.now(),
            **extra,
        }
        conn.execute(o.update().where(o.c.id == oid).values(values))
        rows = [
            {
                "kind": "stage",
                "old_value": row.stage_name,
                "new_value": stage.name,
                "from_stage_id": row.stage_id,
                "to_stage_id": stage.id,
            }
        ]
        if state != row.state:
            rows.append({"kind": "state", "old_value": row.state, "new_value": state})
        if Decimal(probability) != row.probability:
            rows.append({"kind": "probability", "old_value": _pct(row.probability), "new_value": _pct(probability)})
        history(tx, oid, principal, rows)
        changes = [audit.change("stage", audit.value(row.stage_name), audit.value(stage.name))]
        if state != row.state:
            changes.append(audit.change("state", audit.value(row.state), audit.value(state)))
        if reason is not None:
            changes.append(audit.change("close_reason", audit.value(row.close_reason), audit.value(reason)))
        return changes

    def move(self, req: pb.MoveOpportunityStageRequest, principal: Principal) -> pb.Opportunity:
        OPPORTUNITY.parse(req.name)
        target = STAGE.parse(req.stage, "stage")
        with self.uow.begin() as tx:
            row = self._locked(tx, req.name, "name", principal, req.etag)
            stage = target_stage(pipeline_stages(tx.conn, row.pipeline_id), row.pipeline_id, target, "stage")
            if row.state != "open":
                raise closed_error(row)
            if stage.kind != "open":
                raise FailedPrecondition(
                    f"{stage.name!r} is a {stage.kind} stage: use :{'win' if stage.kind == 'won' else 'lose'}",
                    reason="STAGE_NOT_OPEN",
                    metadata={"stage": req.stage},
                )
            if stage.id == row.stage_id:
                return full(tx.conn, str(row.id))[0]
            previous = STAGE.format(row.pipeline_id, row.stage_id)
            changes = self._enter(tx, row, stage, principal, state="open", extra={})
            return self._finish(
                tx, str(row.id), "opportunity.stage_changed.v1", "move_stage", principal, changes, previous
            )

    def _close(self, name: str, etag_given: str, reason: str, won: bool, principal: Principal) -> pb.Opportunity:
        kind = "won" if won else "lost"
        if len(reason) > 1000:
            raise InvalidArgument.field("reason", "must be at most 1000 characters")
        with self.uow.begin() as tx:
            row = self._locked(tx, name, "name", principal, etag_given)
            if row.state == kind:  # a retry
                return full(tx.conn, str(row.id))[0]
            if row.state != "open":
                raise closed_error(row)
            stage = first_of(kind, pipeline_stages(tx.conn, row.pipeline_id))
            if stage is None:
                raise FailedPrecondition(
                    f"pipelines/{row.pipeline_id} has no {kind} stage",
                    reason=f"PIPELINE_HAS_NO_{kind.upper()}_STAGE",
                    metadata={"pipeline": f"pipelines/{row.pipeline_id}"},
                )
            previous = STAGE.format(row.pipeline_id, row.stage_id)
            extra = {
                "probability": Decimal(100) if won else Decimal(0),
                "probability_overridden": False,
                "forecast_category": "closed" if won else "omitted",
                "close_time": sa.func.now(),
                "close_reason": reason,
            }
            changes = self._enter(tx, row, stage, principal, state=kind, extra=extra, reason=reason)
            return self._finish(tx, str(row.id), f"opportunity.{kind}.v1", kind, principal, changes, previous)

    def win(self, req: pb.WinOpportunityRequest, principal: Principal) -> pb.Opportunity:
        OPPORTUNITY.parse(req.name)
        return self._close(req.name, req.etag, req.reason.strip(), True, principal)

    def lose(self, req: pb.LoseOpportunityRequest, principal: Principal) -> pb.Opportunity:
        OPPORTUNITY.parse(req.name)
        if not req.reason.strip():
            raise InvalidArgument.field("reason", "is required: say why it was lost")
        return self._close(req.name, req.etag, req.reason.strip(), False, principal)

    def reopen(self, req: pb.ReopenOpportunityRequest, principal: Principal) -> pb.Opportunity:
        OPPORTUNITY.parse(req.name)
        target = STAGE.parse(req.stage, "stage") if req.stage else None
        with self.uow.begin() as tx:
            conn = tx.conn
            row = self._locked(tx, req.name, "name", principal, req.etag)
            if row.state == "open":
                raise FailedPrecondition(
                    f"{req.name} is open; only a won or lost opportunity is reopened",
                    reason="OPPORTUNITY_OPEN",
                    metadata={"name": req.name},
                )
            stage_rows = pipeline_stages(conn, row.pipeline_id)
            if target is not None:
                stage = target_stage(stage_rows, row.pipeline_id, target, "stage")
                if stage.kind != "open":
                    raise InvalidArgument.field("stage", f"{stage.name!r} is a {stage.kind} stage; name an open one")
            else:
                # the last open stage it was in: the stage it left most recently that is open
                open_ids = [s.id for s in stage_rows if s.kind == "open"]
                last = conn.execute(
                    sa.select(opportunity_history.c.from_stage_id)
                    .where(
                        opportunity_history.c.opportunity_id == row.id,
                        opportunity_history.c.kind == "stage",
                        opportunity_history.c.from_stage_id.in_(open_ids or [None]),
                    )
                    .order_by(opportunity_history.c.id.desc())
                    .limit(1)
                ).scalar()
                stage = next((s for s in stage_rows if s.id == last), None) or first_of("open", stage_rows)
                if stage is None:
                    raise FailedPrecondition(
                        f"pipelines/{row.pipeline_id} has no open stage", reason="PIPELINE_HAS_NO_OPEN_STAGE"
                    )
            previous = STAGE.format(row.pipeline_id, row.stage_id)
            extra = {
                "probability": stage.probability,
                "probability_overridden": False,
                "forecast_category": "pipeline",
                "close_time": None,
                "close_reason": "",
            }
            changes = self._enter(tx, row, stage, principal, state="open", extra=extra, reason="")
            return self._finish(tx, str(row.id), "opportunity.reopened.v1", "reopen", principal, changes, previous)

    # -- history ------------------------------------------------------------------------------------
    def list_history(self, req: pb.ListOpportunityHistoryRequest, principal: Principal):
        oid = OPPORTUNITY.parse(req.parent, "parent").id
        limit = page_size(req.page_size)
        h = opportunity_history
        with self.uow.read() as conn:
            seen = conn.execute(
                sa.select(o.c.pipeline_id).where(self._visible(oid, principal), o.c.delete_time.is_(None))
            ).one_or_none()
            if seen is None:
                raise OPPORTUNITY.not_found(req.parent)
            rows, token = keyset_page(
                conn,
                sa.select(h, o.c.pipeline_id).join(o, o.c.id == h.c.opportunity_id).where(h.c.opportunity_id == oid),
                [(h.c.id, False)],
                self.tokens,
                f"history:{oid}",
                limit,
                req.page_token,
            )
        entries = []
        for r in rows:
            e = pb.OpportunityHistoryEntry(
                id=r.id,
                kind=HISTORY_KINDS.get(r.kind, 0),
                old_value=r.old_value,
                new_value=r.new_value,
                from_stage=STAGE.format(r.pipeline_id, r.from_stage_id) if r.from_stage_id else "",
                to_stage=STAGE.format(r.pipeline_id, r.to_stage_id) if r.to_stage_id else "",
                actor=r.actor,
            )
            e.time.CopyFrom(ts(r.time))
            entries.append(e)
        return entries, token


def _pct(p) -> str:
    t = format(Decimal(p), "f")
    return t.rstrip("0").rstrip(".") if "." in t else t


def _line_tuples(lines, currency: str) -> list[tuple]:
    """Lines (validated or stored) in a comparable form."""
    out = []
    for ln in lines:
        tax = getattr(ln, "tax_rate", None)
        out.append(
            (
                str(ln.product_id) if ln.product_id else None,
                ln.description,
                Decimal(ln.quantity),
                Decimal(ln.unit_price),
                Decimal(ln.discount_percent),
                None if tax is None else Decimal(tax),
            )
        )
    return out


class OpportunityServicer(opportunities_pb2_grpc.OpportunityServiceServicer):
    def __init__(self, sales: Sales):
        self.uc = OpportunityUseCases(sales)

    def CreateOpportunity(self, request, context):
        return self.uc.create(request, current_principal())

    def GetOpportunity(self, request, context):
        return self.uc.get(request.name, current_principal())

    def ListOpportunities(self, request, context):
        items, token = self.uc.list(request, current_principal())
        return pb.ListOpportunitiesResponse(opportunities=items, next_page_token=token)

    def SearchOpportunities(self, request, context):
        hits, token = self.uc.search(request, current_principal())
        return pb.SearchOpportunitiesResponse(
            results=[pb.SearchOpportunitiesResult(opportunity=p, relevance=r) for p, r in hits],
            next_page_token=token,
        )

    def UpdateOpportunity(self, request, context):
        return self.uc.update(request, current_principal())

    def MoveOpportunityStage(self, request, context):
        return self.uc.move(request, current_principal())

    def WinOpportunity(self, request, context):
        return self.uc.win(request, current_principal())

    def LoseOpportunity(self, request, context):
        return self.uc.lose(request, current_principal())

    def ReopenOpportunity(self, request, context):
        return self.uc.reopen(request, current_principal())

    def ListOpportunityHistory(self, request, context):
        entries, token = self.uc.list_history(request, current_principal())
        return pb.ListOpportunityHistoryResponse(entries=entries, next_page_token=token)

    def GetPipelineBoard(self, request, context):
        return opportunities_board.board(self.uc.uow, request, current_principal())

    def ExportOpportunities(self, request, context):
        yield from opportunities_export.export(self.uc, request, current_principal())


def registration(sales: Sales) -> Registration:
    return Registration.of(OpportunityServicer(sales))
