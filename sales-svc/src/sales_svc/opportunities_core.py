"""Opportunities: the values a write takes, the rules of stages, and the one way an
opportunity is opened (`open_opportunity`, which CreateOpportunity and ConvertLead share).

Everything here works inside a caller's transaction (`tx`, a chassis Transaction) or on a
read connection; the servicer (opportunities.py) holds no rule of its own.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from types import SimpleNamespace

import sqlalchemy as sa
from google.protobuf import timestamp_pb2
from sqlalchemy.dialects import postgresql as pg

from crm.sales.v1 import opportunities_pb2 as pb
from crm.sales.v1 import sales_events_pb2
from crm_chassis import audit, dates, persian
from crm_chassis.auth import Principal
from crm_chassis.errors import FailedPrecondition, FieldViolation, InvalidArgument
from crm_chassis.money import check_currency, round_minor, to_decimal, to_money
from crm_chassis.resources import ResourceName, etag
from crm_chassis.uow import Transaction

from .tables import (
    opportunities,
    opportunity_history,
    opportunity_lines,
    pipelines,
    product_lines,
    products,
    stages,
    team_members,
    teams,
)

OPPORTUNITY = ResourceName("opportunities/{id}")
PIPELINE = ResourceName("pipelines/{id}")
STAGE = ResourceName("pipelines/{pipeline_id}/stages/{stage_id}")
CUSTOMER = ResourceName("customers/{id}")
TEAM = ResourceName("teams/{id}")
PRODUCT_LINE = ResourceName("productLines/{id}")
PRODUCT = ResourceName("products/{id}")
LEAD = ResourceName("leads/{id}")

Opp = pb.Opportunity
STATES = {"open": Opp.STATE_OPEN, "won": Opp.STATE_WON, "lost": Opp.STATE_LOST}
CATEGORIES = {
    "pipeline": Opp.FORECAST_CATEGORY_PIPELINE,
    "best_case": Opp.FORECAST_CATEGORY_BEST_CASE,
    "commit": Opp.FORECAST_CATEGORY_COMMIT,
    "closed": Opp.FORECAST_CATEGORY_CLOSED,
    "omitted": Opp.FORECAST_CATEGORY_OMITTED,
}
CATEGORY_KEYS = {v: k for k, v in CATEGORIES.items()}
STATE_KEYS = {v: k for k, v in STATES.items()}
OPPORTUNITY_STATES_FILTER = {f"{p}{k.upper()}": k for k in STATES for p in ("", "STATE_")}
OPEN_CATEGORIES = ("pipeline", "best_case", "commit", "omitted")
HISTORY_KINDS = {
    "stage": pb.OpportunityHistoryEntry.KIND_STAGE,
    "amount": pb.OpportunityHistoryEntry.KIND_AMOUNT,
    "close_date": pb.OpportunityHistoryEntry.KIND_CLOSE_DATE,
    "probability": pb.OpportunityHistoryEntry.KIND_PROBABILITY,
    "state": pb.OpportunityHistoryEntry.KIND_STATE,
    "owner": pb.OpportunityHistoryEntry.KIND_OWNER,
}

MAX_LINES = 200
MAX_QUANTITY = Decimal(10) ** 12
MAX_AMOUNT = Decimal(10) ** 18  # what the NUMERIC(28, 9) columns and int64 units hold, with room
MAX_COMPETITORS = 20
TEXT_LIMITS = {
    "display_name": 200,
    "contact_name": 200,
    "next_step": 1000,
    "description": 10_000,
    "source": 40,
    "campaign_id": 100,
    "owner": 200,
}
PLAIN_TEXT = ("contact_name", "next_step", "description", "source", "campaign_id")
HUNDRED = Decimal(100)
CENT = Decimal("0.01")


# -- values -------------------------------------------------------------------------------------


@dataclass
class Line:
    """One line as validated (product_id None for a free-text line; tax_rate None: the product's)."""

    product_id: str | None
    description: str
    quantity: Decimal
    unit_price: Decimal
    discount_percent: Decimal = Decimal(0)
    tax_rate: Decimal | None = None

    def amount(self, currency: str) -> Decimal:
        """quantity × unit price × (1 − discount/100), rounded to the currency's minor unit."""
        return round_minor(self.quantity * self.unit_price * (1 - self.discount_percent / HUNDRED), currency)


def _decimal(text: str, where: str, bad: list, *, lo: Decimal, hi: Decimal | None, places: int, strict_lo=False):
    t = persian.to_ascii_digits((text or "").strip()).replace("٫", ".").replace(",", "")
    try:
        d = Decimal(t)
    except InvalidOperation:
        bad.append(FieldViolation(where, f"{text!r} is not a decimal number (e.g. 2 or 2.5)"))
        return None
    if not d.is_finite():
        bad.append(FieldViolation(where, "must be a finite number"))
        return None
    if (d <= lo if strict_lo else d < lo) or (hi is not None and d > hi):
        rng = f"more than {lo}" if strict_lo else f"at least {lo}"
        bad.append(FieldViolation(where, f"must be {rng}" + (f" and at most {hi}" if hi is not None else "")))
        return None
    if d != d.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN):
        bad.append(FieldViolation(where, f"at most {places} decimal places"))
        return None
    return d


from_date = dates.from_proto  # (d, where, bad); year 1 had no Jalali date for the export (a 500)


to_date = dates.to_proto


def ts(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(value)
    return t


def _text(value: str, where: str, key: str, bad: list) -> str:
    v = (value or "").strip()
    if len(v) > TEXT_LIMITS[key]:
        bad.append(FieldViolation(where, f"must be at most {TEXT_LIMITS[key]} characters"))
    return v


def _ref(value: str, pattern: ResourceName, where: str, bad: list) -> str | None:
    if not value:
        return None
    try:
        return pattern.parse(value, where).id
    except InvalidArgument as e:
        bad += e.violations
        return None


def probability_of(value: float, where: str, bad: list) -> Decimal | None:
    try:
        p = Decimal(repr(float(value)))
    except (InvalidOperation, ValueError):
        p = Decimal("NaN")
    if not p.is_finite() or p < 0 or p > HUNDRED:
        bad.append(FieldViolation(where, "must be a percentage within 0..100"))
        return None
    return p.quantize(CENT, rounding=ROUND_HALF_EVEN)


def category_of(value: int, where: str, bad: list) -> str:
    """The category's key (unspecified: pipeline). "closed" passes here: only an update that keeps
    a won opportunity's category may send it (see `check_category`)."""
    return CATEGORY_KEYS.get(value, "pipeline") if value else "pipeline"


def check_category(key: str, current: str | None = None, field: str = "opportunity.forecast_category") -> None:
    if key == "closed" and current != "closed":
        raise InvalidArgument.field(field, "closed is set by winning the opportunity (:win), not by hand")


def currency_of(o: pb.Opportunity, fallback: str) -> str:
    """The currency an opportunity's money is in: as given, else the amount's or first line's."""
    if o.currency_code:
        return o.currency_code
    if o.HasField("amount") and o.amount.currency_code:
        return o.amount.currency_code
    for line in o.lines:
        if line.unit_price.currency_code:
            return line.unit_price.currency_code
    return fallback


def lines_of(o: pb.Opportunity, currency: str, bad: list, prefix: str = "opportunity") -> list[Line]:
    if len(o.lines) > MAX_LINES:
        bad.append(FieldViolation(f"{prefix}.lines", f"at most {MAX_LINES} lines"))
        return []
    out = []
    for i, line in enumerate(o.lines):
        at = f"{prefix}.lines[{i}]"
        before = len(bad)
        product_id = _ref(line.product, PRODUCT, f"{at}.product", bad)
        description = line.description.strip()
        if len(description) > 1000:
            bad.append(FieldViolation(f"{at}.description", "must be at most 1000 characters"))
        if not product_id and not description:
            bad.append(FieldViolation(f"{at}.description", "a line without a product needs a description"))
        if not line.quantity.strip():
            bad.append(FieldViolation(f"{at}.quantity", "is required (a decimal string such as 2 or 2.5)"))
            quantity = None
        else:
            quantity = _decimal(
                line.quantity, f"{at}.quantity", bad, lo=Decimal(0), hi=MAX_QUANTITY, places=6, strict_lo=True
            )
        price = None
        if not line.HasField("unit_price"):
            bad.append(FieldViolation(f"{at}.unit_price", "is required"))
        else:
            try:
                price = to_decimal(line.unit_price, f"{at}.unit_price", currency=currency)
                if price < 0:
                    bad.append(FieldViolation(f"{at}.unit_price", "must not be negative"))
            except InvalidArgument as e:
                bad += e.violations
        discount = Decimal(0)
        if line.discount_percent.strip():
            discount = _decimal(
                line.discount_percent, f"{at}.discount_percent", bad, lo=Decimal(0), hi=HUNDRED, places=4
            )
        tax = None
        if line.tax_rate.strip():
            tax = _decimal(line.tax_rate, f"{at}.tax_rate", bad, lo=Decimal(0), hi=HUNDRED, places=4)
        if len(bad) == before:
            made = Line(product_id, description, quantity, price, discount, tax)
            if made.amount(currency) > MAX_AMOUNT:
                bad.append(FieldViolation(f"{at}.unit_price", f"the line's amount would exceed {MAX_AMOUNT}"))
            out.append(made)
    if out and sum(ln.amount(currency) for ln in out) > MAX_AMOUNT:
        bad.append(FieldViolation(f"{prefix}.lines", f"the lines' total would exceed {MAX_AMOUNT}"))
    return out


def values_from_proto(o: pb.Opportunity, paths: list[str], currency: str, prefix: str = "opportunity") -> dict:
    """The validated plain values of `paths` of `o` (money in `currency`); every bad field is
    reported at once, each named (opportunity.lines[2].quantity)."""
    bad: list[FieldViolation] = []
    v: dict = {}
    for p in paths:
        at = f"{prefix}.{p}"
        if p == "display_name":
            v[p] = _text(o.display_name, at, p, bad)
            if not v[p]:
                bad.append(FieldViolation(at, "is required"))
        elif p in PLAIN_TEXT:
            v[p] = _text(getattr(o, p), at, p, bad)
            if p == "source":
                v[p] = v[p].lower()
        elif p == "customer":
            v["customer_id"] = _ref(o.customer, CUSTOMER, at, bad) or ""
        elif p == "team":
            v["team_id"] = _ref(o.team, TEAM, at, bad)
        elif p == "product_line":
            v["product_line_id"] = _ref(o.product_line, PRODUCT_LINE, at, bad)
        elif p == "pipeline":
            v["pipeline_id"] = _ref(o.pipeline, PIPELINE, at, bad)
        elif p == "stage":
            if o.stage:
                try:
                    ids = STAGE.parse(o.stage, at)
                    v["stage"] = (ids.pipeline_id, ids.stage_id)
                except InvalidArgument as e:
                    bad += e.violations
            else:
                v["stage"] = None
        elif p == "owner":
            v["owner_id"] = _text(o.owner, at, "owner", bad)
        elif p == "competitors":
            comps = list(dict.fromkeys(c.strip() for c in o.competitors if c.strip()))
            if len(comps) > MAX_COMPETITORS:
                bad.append(FieldViolation(at, f"at most {MAX_COMPETITORS} competitors"))
            if any(len(c) > 100 for c in comps):
                bad.append(FieldViolation(at, "each at most 100 characters"))
            v["competitors"] = comps
        elif p == "expected_close_date":
            v[p] = from_date(o.expected_close_date, at, bad) if o.HasField(p) else None
        elif p == "probability":
            v[p] = probability_of(o.probability, at, bad) if o.HasField("probability") else None
        elif p == "forecast_category":
            v[p] = category_of(o.forecast_category, at, bad)
        elif p == "currency_code":
            try:
                v[p] = check_currency(currency, at)
            except InvalidArgument as e:
                bad += e.violations
        elif p == "amount":
            if o.HasField("amount"):
                try:
                    v[p] = to_decimal(o.amount, at, currency=currency)
                    if v[p] < 0:
                        bad.append(FieldViolation(at, "must not be negative"))
                    elif v[p] > MAX_AMOUNT:  # as the lines' total: the board and forecasts sum them
                        bad.append(FieldViolation(at, f"must be at most {MAX_AMOUNT:f}"))
                except InvalidArgument as e:
                    bad += e.violations
            else:
                v[p] = None
        elif p == "lines":
            v[p] = lines_of(o, currency, bad, prefix)
        else:  # pragma: no cover - the masks name only the fields above
            raise AssertionError(p)
    if bad:
        raise InvalidArgument(bad)
    return v


# -- stage rules --------------------------------------------------------------------------------

# What "set" means for each field a stage may require (stages.required_fields).
REQUIREMENTS = {
    "amount": lambda v: v.get("amount") is not None and v["amount"] > 0,
    "expected_close_date": lambda v: v.get("expected_close_date") is not None,
    "contact_name": lambda v: bool(v.get("contact_name")),
    "next_step": lambda v: bool(v.get("next_step")),
    "customer": lambda v: bool(v.get("customer_id")),
    "product_line": lambda v: v.get("product_line_id") is not None,
    "competitors": lambda v: bool(v.get("competitors")),
    "lines": lambda v: v.get("line_count", 0) > 0,
    "description": lambda v: bool(v.get("description")),
}


def check_requirements(stage, values: dict) -> None:
    """FAILED_PRECONDITION STAGE_REQUIREMENTS naming every required field of `stage` not set."""
    missing = [f for f in stage.required_fields or [] if f in REQUIREMENTS and not REQUIREMENTS[f](values)]
    if missing:
        raise FailedPrecondition(
            f"stage {stage.name!r} requires {', '.join(missing)} to be set first",
            reason="STAGE_REQUIREMENTS",
            metadata={"stage": STAGE.format(stage.pipeline_id, stage.id), "missing_fields": ",".join(missing)},
        )


def pipeline_stages(conn: sa.Connection, pipeline_id: str) -> list:
    return list(
        conn.execute(sa.select(stages).where(stages.c.pipeline_id == pipeline_id).order_by(stages.c.position)).all()
    )


def first_of(kind: str, stage_rows: list):
    return next((s for s in stage_rows if s.kind == kind), None)


def target_stage(stage_rows: list, pipeline_id: str, given: tuple[str, str], field: str):
    """The stage `given` names, which must be one of the pipeline's (else INVALID_ARGUMENT)."""
    p, s = given
    row = next((r for r in stage_rows if str(r.id) == s), None)
    if p != str(pipeline_id) or row is None:
        raise InvalidArgument.field(field, f"is not a stage of pipelines/{pipeline_id}")
    return row


def closed_error(row) -> FailedPrecondition:
    return FailedPrecondition(
        f"opportunities/{row.id} is {row.state}; reopen it first (:reopen)",
        reason="OPPORTUNITY_CLOSED",
        metadata={"name": f"opportunities/{row.id}", "state": row.state},
    )


# -- reads --------------------------------------------------------------------------------------

ROTTING = sa.and_(
    opportunities.c.state == "open",
    stages.c.rotting_days.is_not(None),
    opportunities.c.stage_enter_time < sa.func.now() - sa.literal_column("interval '1 day'") * stages.c.rotting_days,
)
COLUMNS = [c for c in opportunities.c if c.key != "search_text"]


def select_opportunities() -> sa.Select:
    """Opportunities with their stage's name and whether they are rotting (not deleted)."""
    return (
        sa.select(*COLUMNS, stages.c.name.label("stage_name"), ROTTING.label("rotting"))
        .select_from(opportunities.join(stages, stages.c.id == opportunities.c.stage_id))
        .where(opportunities.c.delete_time.is_(None))
    )


def lines_by_opportunity(conn: sa.Connection, ids: list[str]) -> dict[str, list]:
    if not ids:
        return {}
    rows = conn.execute(
        sa.select(*opportunity_lines.c, products.c.product_line_id)
        .select_from(opportunity_lines.outerjoin(products, products.c.id == opportunity_lines.c.product_id))
        .where(opportunity_lines.c.opportunity_id.in_(ids))
        .order_by(opportunity_lines.c.opportunity_id, opportunity_lines.c.position)
    ).all()
    out: dict[str, list] = {}
    for r in rows:
        out.setdefault(str(r.opportunity_id), []).append(r)
    return out


def _num(d: Decimal) -> str:
    """A decimal as plain text without trailing zeros (2.500000 -> 2.5)."""
    t = format(d, "f")
    return t.rstrip("0").rstrip(".") if "." in t else t


def to_proto(row, lines: list) -> pb.Opportunity:
    m = row._mapping
    cur = m["currency_code"]
    o = pb.Opportunity(
        name=f"opportunities/{m['id']}",
        display_name=m["name"],
        customer=f"customers/{m['customer_id']}" if m["customer_id"] else "",
        contact_name=m["contact_name"],
        lead=f"leads/{m['lead_id']}" if m["lead_id"] else "",
        pipeline=f"pipelines/{m['pipeline_id']}",
        stage=STAGE.format(m["pipeline_id"], m["stage_id"]),
        stage_display_name=m.get("stage_name") or "",
        amount=to_money(m["amount"], cur),
        amount_from_lines=bool(lines),
        currency_code=cur,
        probability=float(m["probability"]),
        probability_overridden=m["probability_overridden"],
        forecast_category=CATEGORIES[m["forecast_category"]],
        state=STATES[m["state"]],
        close_reason=m["close_reason"],
        owner=m["owner_id"],
        team=f"teams/{m['team_id']}" if m["team_id"] else "",
        product_line=f"productLines/{m['product_line_id']}" if m["product_line_id"] else "",
        competitors=list(m["competitors"] or []),
        next_step=m["next_step"],
        source=m["source"],
        campaign_id=m["campaign_id"],
        description=m["description"],
        rotting=bool(m.get("rotting")),
        weighted_amount=to_money(round_minor(m["amount"] * m["probability"] / HUNDRED, cur), cur),
        etag=etag(m["version"]),
    )
    for f in ("close_time", "stage_enter_time", "create_time", "update_time"):
        if m[f] is not None:
            getattr(o, f).CopyFrom(ts(m[f]))
    if m["expected_close_date"] is not None:
        o.expected_close_date.CopyFrom(to_date(m["expected_close_date"]))
    for ln in lines:
        o.lines.add(
            product=f"products/{ln.product_id}" if ln.product_id else "",
            description=ln.description,
            quantity=_num(ln.quantity),
            unit_price=to_money(ln.unit_price, cur),
            discount_percent=_num(ln.discount_percent),
            tax_rate=_num(ln.tax_rate),
            amount=to_money(ln.amount, cur),
        )
    return o


def load(conn: sa.Connection, where, *, lock: bool = False):
    """One opportunity row (None if none matches `where`)."""
    if lock:  # lock the opportunity's row only (FOR UPDATE OF), then read it with its stage
        locked = conn.execute(
            sa.select(opportunities.c.id).where(where, opportunities.c.delete_time.is_(None)).with_for_update()
        ).scalar()
        if locked is None:
            return None
        where = opportunities.c.id == locked
    return conn.execute(select_opportunities().where(where)).one_or_none()


def full(conn: sa.Connection, oid: str) -> tuple[pb.Opportunity, list, sa.Row]:
    """An opportunity as its proto, its line rows and its row."""
    row = conn.execute(select_opportunities().where(opportunities.c.id == oid)).one()
    lines = lines_by_opportunity(conn, [oid]).get(oid, [])
    return to_proto(row, lines), lines, row


# -- events and history -------------------------------------------------------------------------


def event(o: pb.Opportunity, lines: list, version: int, previous_stage: str = "") -> sales_events_pb2.OpportunityEvent:
    e = sales_events_pb2.OpportunityEvent(
        opportunity=o.name,
        name=o.display_name,
        customer=o.customer,
        lead=o.lead,
        pipeline=o.pipeline,
        stage=o.stage,
        stage_name=o.stage_display_name,
        previous_stage=previous_stage,
        amount=o.amount,
        probability=o.probability,
        forecast_category=CATEGORY_KEYS[o.forecast_category],
        state=STATE_KEYS[o.state],
        close_reason=o.close_reason,
        owner=o.owner,
        team=o.team,
        product_line=o.product_line,
        source=o.source,
        campaign_id=o.campaign_id,
        create_time=o.create_time,
        version=version,
    )
    if o.HasField("expected_close_date"):
        e.expected_close_date.CopyFrom(o.expected_close_date)
    if o.HasField("close_time"):
        e.close_time.CopyFrom(o.close_time)
    e.event_time.CopyFrom(o.update_time)
    for ln, pl in zip(o.lines, lines, strict=True):
        e.lines.add(
            product=ln.product,
            product_line=f"productLines/{pl.product_line_id}" if pl.product_line_id else "",
            quantity=ln.quantity,
            amount=ln.amount,
        )
    return e


def amount_text(amount: Decimal, currency: str) -> str:
    return f"{_num(amount)} {currency}"


def history(tx: Transaction, oid: str, actor: Principal | str, rows: list[dict]) -> None:
    """History rows of one change (all with the transaction's time)."""
    if rows:
        who = actor.subject if isinstance(actor, Principal) else actor
        tx.execute(
            opportunity_history.insert(),
            [
                {
                    "opportunity_id": oid,
                    "actor": who,
                    "old_value": "",
                    "new_value": "",
                    "from_stage_id": None,
                    "to_stage_id": None,
                    **r,
                }
                for r in rows
            ],
        )


def write_lines(tx: Transaction, oid: str, lines: list[Line], currency: str, known: dict | None = None) -> None:
    """The lines exactly as quotes read them: amount = quantity × unit price × (1 − discount/100)
    rounded to the minor unit; a product's tax rate (and name) when the line gives none. `known`:
    the lines' products as check_references returned them (else they are read here)."""
    if not lines:
        return
    ids = sorted({ln.product_id for ln in lines if ln.product_id})
    if known is None and ids:
        known = {
            str(r.id): r
            for r in tx.execute(
                sa.select(products.c.id, products.c.name, products.c.tax_rate).where(products.c.id.in_(ids))
            )
        }
    tx.execute(
        opportunity_lines.insert(),
        [
            {
                "opportunity_id": oid,
                "position": i,
                "product_id": ln.product_id,
                "description": ln.description or (known[ln.product_id].name if ln.product_id else ""),
                "quantity": ln.quantity,
                "unit_price": ln.unit_price,
                "discount_percent": ln.discount_percent,
                "tax_rate": ln.tax_rate
                if ln.tax_rate is not None
                else (known[ln.product_id].tax_rate if ln.product_id else Decimal(0)),
                "amount": ln.amount(currency),
            }
            for i, ln in enumerate(lines)
        ],
    )


def check_references(conn: sa.Connection, v: dict, prefix: str = "opportunity") -> dict:
    """Teams, product lines and products named must exist (INVALID_ARGUMENT naming each), in one
    round trip. Returns the lines' products by id (name, tax_rate, product_line_id)."""
    bad = []
    lines = v.get("lines") or []
    pids = sorted({ln.product_id for ln in lines if ln.product_id})
    checks = []
    none = sa.null().cast(sa.Text)

    def arm(kind: str, id_, name=none, tax=none, line=none):
        return sa.select(sa.literal(kind), id_.cast(sa.Text), name, tax, line)

    if v.get("team_id"):
        checks.append(arm("team", teams.c.id).where(teams.c.id == v["team_id"]))
    if v.get("product_line_id"):
        checks.append(arm("product_line", product_lines.c.id).where(product_lines.c.id == v["product_line_id"]))
    if pids:
        checks.append(
            arm(
                "product",
                products.c.id,
                products.c.name,
                products.c.tax_rate.cast(sa.Text),
                products.c.product_line_id.cast(sa.Text),
            ).where(products.c.id.in_(pids))
        )
    if not checks:
        return {}
    rows = conn.execute(sa.union_all(*checks)).all()
    found = {(r[0], r[1]) for r in rows}
    known = {
        r[1]: SimpleNamespace(name=r[2], tax_rate=Decimal(r[3]), product_line_id=r[4])
        for r in rows
        if r[0] == "product"
    }
    if v.get("team_id") and ("team", v["team_id"]) not in found:
        bad.append(FieldViolation(f"{prefix}.team", f"no such team: teams/{v['team_id']}"))
    if v.get("product_line_id") and ("product_line", v["product_line_id"]) not in found:
        bad.append(
            FieldViolation(f"{prefix}.product_line", f"no such product line: productLines/{v['product_line_id']}")
        )
    for i, ln in enumerate(lines):
        if ln.product_id and ("product", ln.product_id) not in found:
            bad.append(FieldViolation(f"{prefix}.lines[{i}].product", f"no such product: products/{ln.product_id}"))
    if bad:
        raise InvalidArgument(bad)
    return known


def search_text(v: dict) -> str:
    parts = [v.get("name") or v.get("display_name") or "", v.get("contact_name") or "", v.get("next_step") or ""]
    parts += list(v.get("competitors") or [])
    parts.append((v.get("description") or "")[:2000])
    return persian.normalize(" ".join(p for p in parts if p))


def requirement_values(v: dict) -> dict:
    return {**v, "line_count": len(v.get("lines") or [])}


# -- open ---------------------------------------------------------------------------------------


def owners_team(owner_id: str):
    """The owner's team when they are a member of exactly one (else none), as a subquery."""
    return (
        sa.select(
            sa.case((sa.func.count() == 1, sa.func.min(team_members.c.team_id.cast(sa.Text))), else_=None).cast(
                pg.UUID(as_uuid=False)
            )
        )
        .where(team_members.c.member_id == owner_id)
        .scalar_subquery()
    )


def _pipeline_for(conn: sa.Connection, product_ids: list[str], product_line_id: str | None):
    """The pipeline of the first line's product, else of the product line, else the default."""
    first_product = product_ids[0] if product_ids else None
    q = (
        sa.select(pipelines.c.id)
        .where(
            pipelines.c.active,
            sa.or_(
                pipelines.c.product_id == first_product if first_product else sa.false(),
                pipelines.c.product_line_id == product_line_id if product_line_id else sa.false(),
                pipelines.c.is_default,
            ),
        )
        .order_by(
            *([(pipelines.c.product_id == first_product).desc().nulls_last()] if first_product else []),
            *([(pipelines.c.product_line_id == product_line_id).desc().nulls_last()] if product_line_id else []),
            pipelines.c.is_default.desc(),
            pipelines.c.create_time,
        )
        .limit(1)
    )
    return conn.execute(q).scalar()


def open_opportunity(
    tx: Transaction,
    principal: Principal,
    *,
    name: str,
    customer_id: str,
    owner_id: str,
    team_id: str | None = None,
    lead_id: str | None = None,
    product_line_id: str | None = None,
    pipeline_id: str | None = None,
    source: str = "",
    campaign_id: str = "",
    currency_code: str = "IRR",
    amount: Decimal | None = None,
    expected_close_date: dt.date | None = None,
    stage_id: str | None = None,
    lines: list[Line] | None = None,
    contact_name: str = "",
    probability: Decimal | None = None,
    forecast_category: str = "pipeline",
    competitors: list[str] | None = None,
    next_step: str = "",
    description: str = "",
    request_id: str = "",
    field_prefix: str = "opportunity",
) -> pb.Opportunity:
    """Open an opportunity in `tx`: pipeline (given, else the first line's product's, the
    product line's or the default), stage (given, else the first open stage; its required fields
    must be set), its lines, a stage history row, opportunity.created.v1 and an audit entry.

    The one definition of "open an opportunity": CreateOpportunity calls it after checking the
    request and the caller's right to assign; ConvertLead calls it for a converted lead (the
    caller decides who may own it: no assignment check here). Ids are bare UUIDs (customer_id
    customer-svc's). With `request_id`, a second call returns the first result."""
    conn = tx.conn
    lines = list(lines or [])
    currency_code = check_currency(currency_code, f"{field_prefix}.currency_code")
    values = {
        "name": name,
        "customer_id": customer_id or "",
        "contact_name": contact_name,
        "lead_id": lead_id,
        "owner_id": owner_id,
        "product_line_id": product_line_id,
        "competitors": list(competitors or []),
        "next_step": next_step,
        "source": source,
        "campaign_id": campaign_id,
        "description": description,
        "currency_code": currency_code,
        "expected_close_date": expected_close_date,
        "lines": lines,
        "team_id": team_id,
    }
    product_ids = [ln.product_id for ln in lines if ln.product_id]
    known = check_references(conn, values, field_prefix)
    if product_line_id is None and product_ids:
        values["product_line_id"] = product_line_id = known[product_ids[0]].product_line_id
    if pipeline_id is None:
        pipeline_id = _pipeline_for(conn, product_ids, product_line_id)
        if pipeline_id is None:
            raise InvalidArgument.field(
                f"{field_prefix}.pipeline", "is required: there is no pipeline for this product and no default pipeline"
            )
    stage_rows = pipeline_stages(conn, pipeline_id)
    if not stage_rows:
        raise InvalidArgument.field(
            f"{field_prefix}.pipeline", f"no such pipeline (or it has no stages): pipelines/{pipeline_id}"
        )
    if stage_id is None:
        stage = first_of("open", stage_rows)
        if stage is None:
            raise FailedPrecondition(f"pipelines/{pipeline_id} has no open stage", reason="PIPELINE_HAS_NO_OPEN_STAGE")
    else:
        stage = target_stage(stage_rows, pipeline_id, (str(pipeline_id), stage_id), f"{field_prefix}.stage")
        if stage.kind != "open":
            raise InvalidArgument.field(
                f"{field_prefix}.stage", f"{stage.name!r} is a {stage.kind} stage: open it in an open stage"
            )
    if lines:
        amount = sum((ln.amount(currency_code) for ln in lines), Decimal(0))
    values["amount"] = amount if amount is not None else Decimal(0)
    check_requirements(stage, requirement_values(values))
    row = {
        k: values[k]
        for k in (
            "name",
            "customer_id",
            "contact_name",
            "lead_id",
            "owner_id",
            "product_line_id",
            "competitors",
            "next_step",
            "source",
            "campaign_id",
            "description",
            "currency_code",
            "expected_close_date",
            "amount",
        )
    }
    overridden = probability is not None
    row.update(
        pipeline_id=pipeline_id,
        stage_id=stage.id,
        amount_from_lines=bool(lines),
        probability=probability if overridden else stage.probability,
        probability_overridden=overridden,
        forecast_category=forecast_category,
        team_id=team_id if team_id is not None else owners_team(owner_id),
        search_text=search_text(values),
        request_id=request_id or None,
    )
    stmt = pg.insert(opportunities).values(row)
    if request_id:
        stmt = stmt.on_conflict_do_nothing(index_elements=["request_id"])
    oid = conn.execute(stmt.returning(opportunities.c.id)).scalar()
    if oid is None:  # this request_id was used before: its opportunity
        first = conn.execute(sa.select(opportunities.c.id).where(opportunities.c.request_id == request_id)).scalar()
        return full(conn, first)[0]
    write_lines(tx, oid, lines, currency_code, known)
    first_rows = [{"kind": "stage", "new_value": stage.name, "to_stage_id": stage.id}]
    if values["amount"]:
        first_rows.append({"kind": "amount", "new_value": amount_text(values["amount"], currency_code)})
    if expected_close_date is not None:
        first_rows.append({"kind": "close_date", "new_value": expected_close_date.isoformat()})
    history(tx, oid, principal, first_rows)
    o, line_rows, stored = full(conn, oid)
    tx.publish("opportunity.created.v1", event(o, line_rows, stored.version), o.name)
    tx.audit(
        o.name,
        "create",
        principal,
        [
            audit.change(k, "null", audit.value(str(row[k]) if isinstance(row[k], Decimal | dt.date) else row[k]))
            for k in (
                "name",
                "customer_id",
                "pipeline_id",
                "stage_id",
                "amount",
                "currency_code",
                "expected_close_date",
                "owner_id",
                "lead_id",
            )
            if row[k] not in (None, "")
        ],
    )
    return o


# -- indexes of this part (migration 0006) ------------------------------------------------------
sa.Index(
    "opportunities_board_cards",
    opportunities.c.pipeline_id,
    opportunities.c.stage_id,
    opportunities.c.amount.desc(),
    opportunities.c.id.desc(),
    postgresql_include=["owner_id", "team_id", "product_line_id", "currency_code", "probability", "stage_enter_time"],
    postgresql_where=sa.and_(opportunities.c.state == "open", opportunities.c.delete_time.is_(None)),
)
sa.Index(
    "opportunity_lines_product",
    opportunity_lines.c.product_id,
    opportunity_lines.c.opportunity_id,
    postgresql_where=opportunity_lines.c.product_id.is_not(None),
)
sa.Index("opportunities_amount_page", opportunities.c.amount, opportunities.c.id)
sa.Index("opportunities_close_page", opportunities.c.expected_close_date, opportunities.c.id)
sa.Index("opportunities_update_page", opportunities.c.update_time, opportunities.c.id)
