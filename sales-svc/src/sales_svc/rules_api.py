"""LeadRuleService (proto/crm/sales/v1/lead_rules.proto): scoring rules, assignment rules,
lead behaviour, score explanations and rescoring."""

from __future__ import annotations

import datetime as dt
import math
import re
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from crm.sales.v1 import lead_rules_pb2 as pb
from crm.sales.v1 import lead_rules_pb2_grpc
from crm_chassis import audit, timers
from crm_chassis.auth import Principal
from crm_chassis.errors import FieldViolation, InvalidArgument
from crm_chassis.filtering import (
    FieldType,
    FilterField,
    FilterSchema,
    keyset_page,
    newest_first,
    query_fingerprint,
)
from crm_chassis.grpc_server import Registration
from crm_chassis.interceptors import current_principal
from crm_chassis.pagination import PageTokens, page_size
from crm_chassis.resources import ResourceName, UpdateMask, changes, check_etag, etag

from .access import Scope
from .api import TEAM, subject, ts
from .rules_assignment import lead_event
from .rules_scoring import check_filter, explain, rescore, rescore_lead
from .rules_tables import assignment_rules, lead_behaviors, scoring_rules
from .runtime import Sales
from .tables import leads, product_lines, teams

SCORING = ResourceName("scoringRules/{id}")
ASSIGNMENT = ResourceName("assignmentRules/{id}")
LEAD = ResourceName("leads/{id}")
PRODUCT_LINE = ResourceName("productLines/{id}")
RESCORE = "lead.rescore"  # timer kind: every lead; key "all" after a rule change, "daily" (recurring)
DAILY_RESCORE = "30 3 * * *"  # Asia/Tehran: behaviour leaving a rule's window lowers scores overnight

_KIND = re.compile(r"[a-z0-9_.-]{1,60}")
MAX_POINTS = 10_000
MAX_MATCH_VALUES = 100
FUTURE_SLACK = dt.timedelta(minutes=5)

STRATEGIES = {
    pb.ASSIGNMENT_STRATEGY_ROUND_ROBIN: "round_robin",
    pb.ASSIGNMENT_STRATEGY_LEAST_OPEN: "least_open",
    pb.ASSIGNMENT_STRATEGY_FIXED_OWNER: "fixed_owner",
}
STRATEGY_ENUM = {v: k for k, v in STRATEGIES.items()}

SCORING_MASK = UpdateMask(["display_name", "active", "points", "profile", "behavior"])
ASSIGNMENT_MASK = UpdateMask(
    ["display_name", "position", "active", "match", "strategy", "team", "owner", "untouched_hours"]
)
SCORING_FILTERS = FilterSchema(
    FilterField("active", scoring_rules.c.active, FieldType.BOOL),
    FilterField("display_name", scoring_rules.c.display_name),
    FilterField("behavior_kind", scoring_rules.c.event_kind),
    FilterField("points", scoring_rules.c.points, FieldType.INT),
)
ASSIGNMENT_FILTERS = FilterSchema(
    FilterField("active", assignment_rules.c.active, FieldType.BOOL),
    FilterField("display_name", assignment_rules.c.display_name),
    FilterField("team", sa.cast(assignment_rules.c.team_id, sa.Text)),
)


# -- conversions -------------------------------------------------------------------------------
def scoring_to_proto(row) -> pb.ScoringRule:
    r = pb.ScoringRule(
        name=SCORING.format(row.id),
        display_name=row.display_name,
        active=row.active,
        points=row.points,
        create_time=ts(row.create_time),
        update_time=ts(row.update_time),
        etag=etag(row.version),
    )
    if row.kind == "profile":
        r.profile.filter = row.filter
    else:
        r.behavior.CopyFrom(
            pb.BehaviorCondition(kind=row.event_kind, min_count=row.min_count, window_days=row.window_days, cap=row.cap)
        )
    return r


def assignment_to_proto(row) -> pb.AssignmentRule:
    return pb.AssignmentRule(
        name=ASSIGNMENT.format(row.id),
        display_name=row.display_name,
        position=row.position,
        active=row.active,
        match=pb.AssignmentMatch(
            provinces=row.provinces,
            cities=row.cities,
            sources=row.sources,
            product_lines=[PRODUCT_LINE.format(p) for p in row.product_line_ids],
        ),
        strategy=STRATEGY_ENUM[row.strategy],
        team=TEAM.format(row.team_id) if row.team_id else "",
        owner=row.owner_id,
        untouched_hours=float(row.untouched_hours),
        create_time=ts(row.create_time),
        update_time=ts(row.update_time),
        etag=etag(row.version),
    )


# -- validation --------------------------------------------------------------------------------
class _Checks:
    """Collects every violation of a message, so all are reported at once."""

    def __init__(self):
        self.bad: list[FieldViolation] = []

    def run(self, fn, *args):
        try:
            return fn(*args)
        except InvalidArgument as e:
            self.bad += e.violations
            return None

    def fail(self, field: str, description: str) -> None:
        self.bad.append(FieldViolation(field, description))

    def done(self) -> None:
        if self.bad:
            raise InvalidArgument(self.bad)


def _name(value: str, field: str) -> str:
    v = (value or "").strip()
    if not v:
        raise InvalidArgument.field(field, "must not be empty")
    if len(v) > 100:
        raise InvalidArgument.field(field, "must be at most 100 characters")
    return v


def _kind(value: str, field: str) -> str:
    v = (value or "").strip().lower()
    if not _KIND.fullmatch(v):
        raise InvalidArgument.field(field, "must be 1-60 of a-z, 0-9, '_', '.', '-' (e.g. email_click)")
    return v


def _request_id(value: str) -> str | None:
    v = (value or "").strip()
    if len(v) > 200:
        raise InvalidArgument.field("request_id", "must be at most 200 characters")
    return v or None


def scoring_values(r: pb.ScoringRule, p: str = "scoring_rule") -> dict:
    c = _Checks()
    v = {
        "display_name": c.run(_name, r.display_name, f"{p}.display_name"),
        "active": r.active if r.HasField("active") else True,
        "points": r.points,
    }
    if r.points == 0 or abs(r.points) > MAX_POINTS:
        c.fail(f"{p}.points", f"must be between -{MAX_POINTS} and {MAX_POINTS}, not 0")
    which = r.WhichOneof("condition")
    if which is None:
        c.fail(f"{p}.condition", "give a profile or a behavior condition")
    elif which == "profile":
        v.update(kind="profile", filter=c.run(check_filter, r.profile.filter, f"{p}.profile.filter"))
        v.update(event_kind="", min_count=1, window_days=0, cap=1)
    else:
        b = r.behavior
        v.update(kind="behavior", filter="", event_kind=c.run(_kind, b.kind, f"{p}.behavior.kind"))
        for field, value, top in (
            ("min_count", b.min_count, 10_000),
            ("window_days", b.window_days, 3650),
            ("cap", b.cap, 1000),
        ):
            if not 0 <= value <= top:
                c.fail(f"{p}.behavior.{field}", f"must be between 0 and {top}")
        v.update(min_count=max(b.min_count, 1), window_days=b.window_days, cap=max(b.cap, 1))
    c.done()
    return v


def _texts(values, field: str, lower: bool = False) -> list[str]:
    out = []
    if len(values) > MAX_MATCH_VALUES:
        raise InvalidArgument.field(field, f"at most {MAX_MATCH_VALUES} values")
    for i, x in enumerate(values):
        t = x.strip()
        if not t or len(t) > 100:
            raise InvalidArgument.field(f"{field}[{i}]", "must be 1-100 characters")
        out.append(t.lower() if lower else t)
    return list(dict.fromkeys(out))


def assignment_values(conn, r: pb.AssignmentRule, p: str = "assignment_rule") -> dict:
    c = _Checks()
    m = r.match
    v = {
        "display_name": c.run(_name, r.display_name, f"{p}.display_name"),
        "position": r.position,
        "active": r.active if r.HasField("active") else True,
        "provinces": c.run(_texts, list(m.provinces), f"{p}.match.provinces") or [],
        "cities": c.run(_texts, list(m.cities), f"{p}.match.cities") or [],
        "sources": c.run(_texts, list(m.sources), f"{p}.match.sources", True) or [],
        "product_line_ids": [],
        "strategy": STRATEGIES.get(r.strategy),
        "team_id": None,
        "owner_id": "",
        "untouched_hours": r.untouched_hours,
    }
    for i, name in enumerate(m.product_lines):
        got = c.run(PRODUCT_LINE.parse, name, f"{p}.match.product_lines[{i}]")
        if got is not None:
            v["product_line_ids"].append(got.id)
    if v["product_line_ids"]:
        known = set(
            conn.execute(
                sa.select(sa.cast(product_lines.c.id, sa.Text)).where(product_lines.c.id.in_(v["product_line_ids"]))
            ).scalars()
        )
        for i, pid in enumerate(v["product_line_ids"]):
            if pid not in known:
                c.fail(f"{p}.match.product_lines[{i}]", f"no such product line: productLines/{pid}")
    strategy = v["strategy"]
    if strategy is None:
        c.fail(
            f"{p}.strategy",
            "is required: ASSIGNMENT_STRATEGY_ROUND_ROBIN, ASSIGNMENT_STRATEGY_LEAST_OPEN or ASSIGNMENT_STRATEGY_FIXED_OWNER",
        )
    if r.team:
        got = c.run(TEAM.parse, r.team, f"{p}.team")
        if got is not None:
            if conn.execute(sa.select(teams.c.id).where(teams.c.id == got.id)).first() is None:
                c.fail(f"{p}.team", f"no such team: {r.team}")
            else:
                v["team_id"] = got.id
    elif strategy in ("round_robin", "least_open"):
        c.fail(f"{p}.team", "is required: round robin and least open pick from a team's members")
    if strategy == "fixed_owner":
        v["owner_id"] = c.run(subject, r.owner, f"{p}.owner") or ""
    elif r.owner:
        c.fail(f"{p}.owner", "is for FIXED_OWNER rules only (the others pick from the team)")
    h = r.untouched_hours
    if not math.isfinite(h) or not 0 <= h <= 1000:
        c.fail(f"{p}.untouched_hours", "must be between 0 and 1000 business hours")
    elif h and strategy == "fixed_owner":
        c.fail(f"{p}.untouched_hours", "needs ROUND_ROBIN or LEAST_OPEN: a fixed owner has nobody to pass leads to")
    c.done()
    return v


def _audit_values(values: dict) -> list[dict]:
    return [audit.change(k, "null", audit.value(x)) for k, x in values.items() if x not in (None, "", [], False)]


# -- use cases ---------------------------------------------------------------------------------
def rescore_all(uow, conn) -> int:
    """Every lead's score brought up to date (one UPDATE), lead.updated.v1 for each that changed
    (in `conn`'s transaction: the RescoreLeads call's or the lead.rescore timer's)."""
    rows = rescore(conn)
    if rows:
        with uow.joined(conn) as tx:
            tx.publish_many("lead.updated.v1", [(f"leads/{r.id}", lead_event(r)) for r in rows])
    return len(rows)


class LeadRules:
    def __init__(self, sales: Sales):
        self.sales = sales
        self.uow = sales.uow
        self.tokens = PageTokens(sales.ctx.settings.jwt_secret, "lead-rules")

    def _rescore_later(self, conn, values: dict | None = None) -> None:
        """Every lead rescored by the timer worker, now (one firing however many changes come
        in before it runs). A rule with a window also needs it daily, as behaviour ages out."""
        timers.schedule(conn, RESCORE, "all", dt.datetime.now(dt.UTC))
        if values and values.get("kind") == "behavior" and values.get("window_days"):
            timers.schedule_recurring(conn, RESCORE, "daily", DAILY_RESCORE)

    def _row(self, conn, table, rn: ResourceName, name: str, field: str, lock: bool = False):
        rid = rn.parse(name, field).id
        q = sa.select(table).where(table.c.id == rid)
        row = conn.execute(q.with_for_update() if lock else q).one_or_none()
        if row is None:
            raise rn.not_found(name)
        return row

    def _create(self, table, values: dict, request_id: str | None, principal: Principal, rn, action: str):
        with self.uow.begin() as tx:
            conn = tx.conn
            if request_id:
                done = conn.execute(sa.select(table).where(table.c.request_id == request_id)).one_or_none()
                if done is not None:
                    return done, False
            row = conn.execute(
                pg.insert(table)
                .values(**values, request_id=request_id)
                .on_conflict_do_nothing(index_elements=["request_id"])
                .returning(*table.c)
            ).one_or_none()
            if row is None:  # a concurrent call with the same request_id committed first
                return conn.execute(sa.select(table).where(table.c.request_id == request_id)).one(), False
            tx.audit(rn.format(row.id), action, principal, _audit_values(values))
            if table is scoring_rules:
                self._rescore_later(conn, values)
        return row, True

    def _update(self, table, rn, msg, mask: UpdateMask, update_mask, field: str, merge, validate, principal, action):
        paths = mask.paths(update_mask)
        rn.parse(msg.name, f"{field}.name")
        with self.uow.begin() as tx:
            conn = tx.conn
            row = self._row(conn, table, rn, msg.name, f"{field}.name", lock=True)
            check_etag(msg.etag, row.version, msg.name)
            merged = merge(row, msg, paths)
            values = validate(conn, merged)
            old = {k: float(x) if isinstance(x, Decimal) else x for k, x in row._mapping.items()}
            diff = changes(old, values)
            if diff:
                row = conn.execute(
                    table.update()
                    .where(table.c.id == row.id)
                    .values(
                        **{d.field: values[d.field] for d in diff},
                        version=table.c.version + 1,
                        update_time=sa.func.now(),
                    )
                    .returning(*table.c)
                ).one()
                tx.audit(msg.name, action, principal, [d.as_audit() for d in diff])
                if table is scoring_rules:
                    self._rescore_later(conn, values)
        if diff and table is scoring_rules:
            self.sales.timers.wake()
        return row

    def _delete(self, table, rn, name: str, given_etag: str, principal, action: str) -> None:
        with self.uow.begin() as tx:
            row = self._row(tx.conn, table, rn, name, "name", lock=True)
            check_etag(given_etag, row.version, name)
            tx.execute(table.delete().where(table.c.id == row.id))
            tx.audit(name, action, principal, [audit.change("display_name", audit.value(row.display_name), "null")])
            if table is scoring_rules:
                self._rescore_later(tx.conn)
        if table is scoring_rules:
            self.sales.timers.wake()

    def _list(self, table, filters: FilterSchema, order, size, token, filter_text, purpose):
        where = filters.compile(filter_text)
        with self.uow.read() as conn:
            return keyset_page(
                conn,
                sa.select(table).where(where),
                order,
                self.tokens,
                f"{purpose}:{query_fingerprint(filter_text)}",
                page_size(size),
                token,
            )

    # -- scoring rules -------------------------------------------------------------------
    def create_scoring(self, r: pb.ScoringRule, request_id: str, principal: Principal) -> pb.ScoringRule:
        c = _Checks()
        values = c.run(scoring_values, r)
        rid = c.run(_request_id, request_id)
        c.done()
        row, new = self._create(scoring_rules, values, rid, principal, SCORING, "scoring_rule.create")
        if new:
            self.sales.timers.wake()
        return scoring_to_proto(row)

    def get_scoring(self, name: str) -> pb.ScoringRule:
        with self.uow.read() as conn:
            return scoring_to_proto(self._row(conn, scoring_rules, SCORING, name, "name"))

    def list_scoring(self, size, token, filter_text):
        rows, nxt = self._list(
            scoring_rules, SCORING_FILTERS, newest_first(scoring_rules), size, token, filter_text, "scoring"
        )
        return [scoring_to_proto(r) for r in rows], nxt

    def update_scoring(self, r: pb.ScoringRule, update_mask, principal: Principal) -> pb.ScoringRule:
        def merge(row, msg, paths):
            merged = scoring_to_proto(row)
            for p in paths:
                if p in ("profile", "behavior"):
                    if not msg.HasField(p):
                        raise InvalidArgument.field(f"scoring_rule.{p}", "is required when update_mask names it")
                    getattr(merged, p).CopyFrom(getattr(msg, p))
                else:
                    setattr(merged, p, getattr(msg, p))
            return merged

        row = self._update(
            scoring_rules,
            SCORING,
            r,
            SCORING_MASK,
            update_mask,
            "scoring_rule",
            merge,
            lambda conn, m: scoring_values(m),
            principal,
            "scoring_rule.update",
        )
        return scoring_to_proto(row)

    def delete_scoring(self, name: str, given_etag: str, principal: Principal) -> None:
        self._delete(scoring_rules, SCORING, name, given_etag, principal, "scoring_rule.delete")

    # -- assignment rules ----------------------------------------------------------------
    def create_assignment(self, r: pb.AssignmentRule, request_id: str, principal: Principal) -> pb.AssignmentRule:
        with self.uow.read() as conn:
            c = _Checks()
            values = c.run(assignment_values, conn, r)
            rid = c.run(_request_id, request_id)
            c.done()
        row, _ = self._create(assignment_rules, values, rid, principal, ASSIGNMENT, "assignment_rule.create")
        return assignment_to_proto(row)

    def get_assignment(self, name: str) -> pb.AssignmentRule:
        with self.uow.read() as conn:
            return assignment_to_proto(self._row(conn, assignment_rules, ASSIGNMENT, name, "name"))

    def list_assignment(self, size, token, filter_text):
        t = assignment_rules
        order = [(t.c.position, False), (t.c.create_time, False), (t.c.id, False)]
        rows, nxt = self._list(t, ASSIGNMENT_FILTERS, order, size, token, filter_text, "assignment")
        return [assignment_to_proto(r) for r in rows], nxt

    def update_assignment(self, r: pb.AssignmentRule, update_mask, principal: Principal) -> pb.AssignmentRule:
        def merge(row, msg, paths):
            merged = assignment_to_proto(row)
            for p in paths:
                if p == "match":
                    merged.match.CopyFrom(msg.match)
                else:
                    setattr(merged, p, getattr(msg, p))
            return merged

        row = self._update(
            assignment_rules,
            ASSIGNMENT,
            r,
            ASSIGNMENT_MASK,
            update_mask,
            "assignment_rule",
            merge,
            assignment_values,
            principal,
            "assignment_rule.update",
        )
        return assignment_to_proto(row)

    def delete_assignment(self, name: str, given_etag: str, principal: Principal) -> None:
        self._delete(assignment_rules, ASSIGNMENT, name, given_etag, principal, "assignment_rule.delete")

    # -- leads ---------------------------------------------------------------------------
    def _lead(self, conn, name: str, principal: Principal, lock: bool = False):
        lid = LEAD.parse(name, "lead").id
        q = sa.select(leads).where(
            leads.c.id == lid,
            leads.c.delete_time.is_(None),
            Scope.of(principal).visible(leads.c.owner_id, leads.c.team_id),
        )
        row = conn.execute(q.with_for_update(of=leads) if lock else q).one_or_none()
        if row is None:
            raise LEAD.not_found(name)
        return row

    def record_behavior(self, req: pb.RecordLeadBehaviorRequest, principal: Principal):
        c = _Checks()
        c.run(LEAD.parse, req.lead, "lead")
        kind = c.run(_kind, req.kind, "kind")
        key = (req.idempotency_key or "").strip()
        if len(key) > 200:
            c.fail("idempotency_key", "must be at most 200 characters")
        when = None
        if req.HasField("time"):
            when = req.time.ToDatetime(tzinfo=dt.UTC)
            if when > dt.datetime.now(dt.UTC) + FUTURE_SLACK:
                c.fail("time", "must not be in the future")
        c.done()
        with self.uow.begin() as tx:
            conn = tx.conn
            lead = self._lead(conn, req.lead, principal, lock=True)
            ins = pg.insert(lead_behaviors).values(
                lead_id=lead.id, kind=kind, time=when or sa.func.now(), idempotency_key=key or None
            )
            if key:
                ins = ins.on_conflict_do_nothing(constraint="lead_behaviors_key")
            if conn.execute(ins.returning(lead_behaviors.c.id)).scalar() is None:
                return pb.RecordLeadBehaviorResponse(score=lead.score, duplicate=True)
            row = rescore_lead(conn, lead.id, bump=True)
            if row is None:
                return pb.RecordLeadBehaviorResponse(score=lead.score)
            tx.publish("lead.updated.v1", lead_event(row), req.lead)
            tx.audit(
                req.lead,
                "lead.rescore",
                principal,
                [audit.change("score", audit.value(lead.score), audit.value(row.score))],
            )
            return pb.RecordLeadBehaviorResponse(score=row.score)

    def explain(self, name: str, principal: Principal) -> pb.LeadScore:
        with self.uow.read() as conn:
            lead = self._lead(conn, name, principal)
            parts = explain(conn, lead.id)
        contributions = [
            pb.ScoreContribution(
                rule=SCORING.format(rule.id), display_name=rule.display_name, points=rule.points * n, times=n
            )
            for rule, n in parts
        ]
        return pb.LeadScore(lead=name, score=sum(c.points for c in contributions), contributions=contributions)

    def rescore_leads(self, principal: Principal) -> int:
        with self.uow.begin() as tx:
            n = rescore_all(self.uow, tx.conn)
            tx.audit("leads", "leads.rescore", principal, [audit.change("changed", "null", audit.value(n))])
        return n


class LeadRuleServicer(lead_rules_pb2_grpc.LeadRuleServiceServicer):
    def __init__(self, sales: Sales):
        self.rules = LeadRules(sales)

    def CreateScoringRule(self, request, context):
        return self.rules.create_scoring(request.scoring_rule, request.request_id, current_principal())

    def GetScoringRule(self, request, context):
        return self.rules.get_scoring(request.name)

    def ListScoringRules(self, request, context):
        items, token = self.rules.list_scoring(request.page_size, request.page_token, request.filter)
        return pb.ListScoringRulesResponse(scoring_rules=items, next_page_token=token)

    def UpdateScoringRule(self, request, context):
        return self.rules.update_scoring(request.scoring_rule, request.update_mask, current_principal())

    def DeleteScoringRule(self, request, context):
        self.rules.delete_scoring(request.name, request.etag, current_principal())
        return pb.DeleteScoringRuleResponse(name=request.name)

    def CreateAssignmentRule(self, request, context):
        return self.rules.create_assignment(request.assignment_rule, request.request_id, current_principal())

    def GetAssignmentRule(self, request, context):
        return self.rules.get_assignment(request.name)

    def ListAssignmentRules(self, request, context):
        items, token = self.rules.list_assignment(request.page_size, request.page_token, request.filter)
        return pb.ListAssignmentRulesResponse(assignment_rules=items, next_page_token=token)

    def UpdateAssignmentRule(self, request, context):
        return self.rules.update_assignment(request.assignment_rule, request.update_mask, current_principal())

    def DeleteAssignmentRule(self, request, context):
        self.rules.delete_assignment(request.name, request.etag, current_principal())
        return pb.DeleteAssignmentRuleResponse(name=request.name)

    def RecordLeadBehavior(self, request, context):
        return self.rules.record_behavior(request, current_principal())

    def ExplainLeadScore(self, request, context):
        return self.rules.explain(request.lead, current_principal())

    def RescoreLeads(self, request, context):
        return pb.RescoreLeadsResponse(changed=self.rules.rescore_leads(current_principal()))


def registration(sales: Sales) -> Registration:
    return Registration.of(LeadRuleServicer(sales))
