"""LoyaltyService (proto/crm/campaign/v1/loyalty.proto): programmes (create, get, list, update,
delete), members (enrol, get with tier progress, balance, ledger) and the movements people make
(redeem a reward, redeem points, adjust). The ledger itself is loyalty.py's."""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from crm.campaign.v1 import loyalty_pb2 as pb
from crm.campaign.v1 import loyalty_pb2_grpc
from crm_chassis.errors import AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from crm_chassis.filtering import keyset_page
from crm_chassis.grpc_server import Registration
from crm_chassis.interceptors import current_principal
from crm_chassis.money import NANO, check_currency, to_money
from crm_chassis.pagination import PageTokens, page_size
from crm_chassis.resources import ResourceName, UpdateMask, check_etag, etag, request_id_violation

from .loyalty import MEMBER, MOVEMENT, PROGRAM, WORD, Loyalty, Rules, engine, with_member
from .loyalty_tables import loyalty_members, loyalty_movements, loyalty_programs, loyalty_rewards
from .runtime import Campaign

CUSTOMER = ResourceName("customers/{customer_id}")
KEY = re.compile(r"[a-z0-9_-]{1,40}")
REF = re.compile(r"(products|productLines)/[A-Za-z0-9_-]{1,64}")
NAME_LIMIT, DESCRIPTION_LIMIT, REASON_LIMIT = 200, 2000, 500
MAX_DAYS = 3650
MAX_POINTS = 10**12

ROUNDING = {pb.ROUNDING_FLOOR: "floor", pb.ROUNDING_NEAREST: "nearest", pb.ROUNDING_CEIL: "ceil"}
LIFETIME = {pb.LIFETIME_UNIT_NONE: "none", pb.LIFETIME_UNIT_DAYS: "days", pb.LIFETIME_UNIT_MONTHS: "months"}
BASIS = {pb.TIER_BASIS_POINTS: "points", pb.TIER_BASIS_SPEND: "spend"}
PERIOD = {
    pb.TIER_PERIOD_LIFETIME: "lifetime",
    pb.TIER_PERIOD_GREGORIAN_YEAR: "gregorian_year",
    pb.TIER_PERIOD_JALALI_YEAR: "jalali_year",
    pb.TIER_PERIOD_ROLLING_DAYS: "rolling_days",
}
DOWNGRADE = {pb.DOWNGRADE_NONE: "none", pb.DOWNGRADE_PERIOD_END: "period_end", pb.DOWNGRADE_GRACE: "grace"}
ENUMS = {  # field -> (map, default when unspecified)
    "rounding": (ROUNDING, "floor"),
    "lifetime_unit": (LIFETIME, "none"),
    "tier_basis": (BASIS, "points"),
    "tier_period": (PERIOD, "lifetime"),
    "downgrade": (DOWNGRADE, "none"),
}
FIELDS = [
    "display_name",
    "description",
    "earn_amount",
    "earn_points",
    "rounding",
    "product_rules",
    "bonus_periods",
    "lifetime_unit",
    "lifetime_count",
    "tiers",
    "tier_basis",
    "tier_period",
    "tier_period_days",
    "downgrade",
    "downgrade_grace_days",
    "rewards",
]
MASK = UpdateMask(
    [*FIELDS, "active"],
    immutable={
        "name": "",
        "currency_code": "create a new programme for another currency",
        "create_time": "",
        "update_time": "",
        "etag": "give it as the etag to check",
    },
)
p = loyalty_programs.c
m = loyalty_members.c
mv = loyalty_movements.c
rw = loyalty_rewards.c


def _dec_text(value: str, where: str, bad: list, *, positive: bool = True) -> str:
    try:
        d = Decimal(value)
        if not d.is_finite() or (positive and d <= 0) or d > 1000:
            raise ValueError
    except (ArithmeticError, ValueError):
        bad.append(FieldViolation(where, 'must be a decimal number greater than 0 and at most 1000, e.g. "2" or "1.5"'))
        return "1"
    return str(d)


MONEY_LIMIT = 10**16  # what the ledger's numeric(18, 2) amounts hold


def _money(msg, where: str, currency: str, bad: list) -> Decimal | None:
    if msg.currency_code != currency:
        bad.append(FieldViolation(f"{where}.currency_code", f"must be the programme's currency {currency}"))
        return None
    if not -999_999_999 <= msg.nanos <= 999_999_999 or (msg.units > 0 > msg.nanos) or (msg.units < 0 < msg.nanos):
        bad.append(FieldViolation(f"{where}.nanos", "must be within -999999999..999999999 with the sign of units"))
        return None
    if abs(msg.units) >= MONEY_LIMIT:  # numeric(18, 2)
        bad.append(FieldViolation(f"{where}.units", f"must be less than {MONEY_LIMIT:,} in absolute value"))
        return None
    return Decimal(msg.units) + Decimal(msg.nanos) * NANO


def _field(msg: pb.Program, name: str, currency: str, bad: list):
    """The stored value of one field of a Program message (problems appended to `bad`)."""
    where = f"program.{name}"
    if name == "display_name":
        v = msg.display_name.strip()
        if not v:
            bad.append(FieldViolation(where, "is required"))
        elif len(v) > NAME_LIMIT:
            bad.append(FieldViolation(where, f"may be at most {NAME_LIMIT} characters"))
        return v
    if name == "description":
        if len(msg.description) > DESCRIPTION_LIMIT:
            bad.append(FieldViolation(where, f"may be at most {DESCRIPTION_LIMIT} characters"))
        return msg.description.strip()
    if name == "active":
        return msg.active
    if name in ENUMS:
        table, default = ENUMS[name]
        v = getattr(msg, name)
        if v == 0:
            return default
        if v not in table:
            bad.append(FieldViolation(where, f"must be one of {', '.join(sorted(table.values()))}"))
            return default
        return table[v]
    if name == "earn_amount":
        if not msg.HasField("earn_amount"):
            bad.append(FieldViolation(where, "is required: points are earned per this amount spent"))
            return Decimal(0)
        v = _money(msg.earn_amount, where, currency, bad)
        if v is not None and v <= 0:
            bad.append(FieldViolation(where, "must be greater than 0"))
        return v or Decimal(0)
    if name == "earn_points":
        if not 0 <= msg.earn_points <= MAX_POINTS:
            bad.append(FieldViolation(where, f"must be 0..{MAX_POINTS}"))
        return msg.earn_points
    if name in ("lifetime_count", "tier_period_days", "downgrade_grace_days"):
        v = getattr(msg, name)
        if not 0 <= v <= MAX_DAYS:
            bad.append(FieldViolation(where, f"must be 0..{MAX_DAYS}"))
        return v
    if name == "product_rules":
        out = []
        if len(msg.product_rules) > 200:
            bad.append(FieldViolation(where, "at most 200"))
        for i, r in enumerate(msg.product_rules):
            w = f"{where}[{i}]"
            if bool(r.product) == bool(r.product_line):
                bad.append(FieldViolation(w, "give exactly one of product and product_line"))
            elif r.product and not REF.fullmatch(r.product) or r.product_line and not REF.fullmatch(r.product_line):
                bad.append(FieldViolation(w, "product is products/{id}, product_line productLines/{id}"))
            if r.points_per_unit < 0 or r.points_per_unit > MAX_POINTS:
                bad.append(FieldViolation(f"{w}.points_per_unit", f"must be 0..{MAX_POINTS}"))
            mult = _dec_text(r.multiplier, f"{w}.multiplier", bad) if r.multiplier else "1"
            out.append(
                {
                    "product": r.product,
                    "product_line": r.product_line,
                    "multiplier": mult,
                    "points_per_unit": r.points_per_unit,
                }
            )
        return out
    if name == "bonus_periods":
        out = []
        if len(msg.bonus_periods) > 50:
            bad.append(FieldViolation(where, "at most 50"))
        for i, b in enumerate(msg.bonus_periods):
            w = f"{where}[{i}]"
            if not b.HasField("start_time") or not b.HasField("end_time"):
                bad.append(FieldViolation(w, "start_time and end_time are required"))
                continue
            start, end = b.start_time.ToDatetime(dt.UTC), b.end_time.ToDatetime(dt.UTC)
            if end <= start:
                bad.append(FieldViolation(f"{w}.end_time", "must be after start_time"))
            if not b.multiplier:
                bad.append(FieldViolation(f"{w}.multiplier", "is required"))
            mult = _dec_text(b.multiplier or "1", f"{w}.multiplier", bad)
            out.append(
                {
                    "display_name": b.display_name.strip()[:NAME_LIMIT],
                    "start_time": start.isoformat(),
                    "end_time": end.isoformat(),
                    "multiplier": mult,
                }
            )
        return out
    if name == "tiers":
        out, seen = [], set()
        if len(msg.tiers) > 20:
            bad.append(FieldViolation(where, "at most 20"))
        for i, t in enumerate(msg.tiers):
            w = f"{where}[{i}]"
            if not KEY.fullmatch(t.key):
                bad.append(FieldViolation(f"{w}.key", "lower-case letters, digits, _ or -, at most 40"))
            elif t.key in seen:
                bad.append(FieldViolation(f"{w}.key", f"{t.key} is given twice"))
            seen.add(t.key)
            if not 0 <= t.threshold_points <= MAX_POINTS:
                bad.append(FieldViolation(f"{w}.threshold_points", f"must be 0..{MAX_POINTS}"))
            spend = None
            if t.HasField("threshold_spend"):
                spend = _money(t.threshold_spend, f"{w}.threshold_spend", currency, bad)
                if spend is not None and spend < 0:
                    bad.append(FieldViolation(f"{w}.threshold_spend", "must not be negative"))
            out.append(
                {
                    "key": t.key,
                    "display_name": t.display_name.strip()[:NAME_LIMIT] or t.key,
                    "threshold_points": t.threshold_points,
                    "threshold_spend": str(spend) if spend is not None else None,
                    "multiplier": _dec_text(t.multiplier, f"{w}.multiplier", bad) if t.multiplier else "1",
                }
            )
        return out
    if name == "rewards":
        out, seen = [], set()
        if len(msg.rewards) > 200:
            bad.append(FieldViolation(where, "at most 200"))
        for i, r in enumerate(msg.rewards):
            w = f"{where}[{i}]"
            if not KEY.fullmatch(r.key):
                bad.append(FieldViolation(f"{w}.key", "lower-case letters, digits, _ or -, at most 40"))
            elif r.key in seen:
                bad.append(FieldViolation(f"{w}.key", f"{r.key} is given twice"))
            seen.add(r.key)
            if not r.display_name.strip():
                bad.append(FieldViolation(f"{w}.display_name", "is required"))
            if not 0 < r.cost_points <= MAX_POINTS:
                bad.append(FieldViolation(f"{w}.cost_points", f"must be 1..{MAX_POINTS}"))
            stock = r.stock if r.HasField("stock") else None
            if stock is not None and stock < 0:
                bad.append(FieldViolation(f"{w}.stock", "must not be negative"))
            out.append(
                {
                    "key": r.key,
                    "display_name": r.display_name.strip()[:NAME_LIMIT],
                    "cost_points": r.cost_points,
                    "stock": stock,
                }
            )
        return out
    raise AssertionError(name)


def _check_whole(v: dict, bad: list) -> None:
    """Rules between fields, on the programme as it would be stored."""
    if v["lifetime_unit"] in ("days", "months") and v["lifetime_count"] < 1:
        bad.append(FieldViolation("program.lifetime_count", "must be 1..3650 when points expire"))
    if v["tier_period"] == "rolling_days" and v["tier_period_days"] < 1:
        bad.append(FieldViolation("program.tier_period_days", "must be 1..3650 with a rolling period"))
    if v["downgrade"] == "grace" and v["downgrade_grace_days"] < 1:
        bad.append(FieldViolation("program.downgrade_grace_days", "must be 1..3650 with a grace downgrade"))
    if v["downgrade"] == "period_end" and v["tier_period"] not in ("gregorian_year", "jalali_year"):
        bad.append(FieldViolation("program.downgrade", "period_end needs a Gregorian or Jalali year as tier_period"))
    if v["tier_basis"] == "spend":
        for i, t in enumerate(v["tiers"]):
            if t["threshold_spend"] is None:
                bad.append(FieldViolation(f"program.tiers[{i}].threshold_spend", "is required with a spend basis"))
    thresholds = [t["threshold_spend"] if v["tier_basis"] == "spend" else t["threshold_points"] for t in v["tiers"]]
    if len({str(Decimal(str(x))) for x in thresholds if x is not None}) < len([x for x in thresholds if x is not None]):
        bad.append(FieldViolation("program.tiers", "two tiers have the same threshold"))


class LoyaltyApi:
    def __init__(self, rt: Campaign):
        self.rt = rt
        self.lo: Loyalty = engine(rt)
        self.pages = PageTokens(rt.settings.jwt_secret, "loyalty_programs")
        self.movement_pages = PageTokens(rt.settings.jwt_secret, "loyalty_movements")

    # -- programmes -----------------------------------------------------------------------
    def to_proto(self, conn, row) -> pb.Program:
        rewards = conn.execute(
            sa.select(loyalty_rewards).where(rw.program_id == row.id).order_by(rw.position, rw.key)
        ).all()
        cur = row.currency
        inv = {k: {v: e for e, v in table.items()} for k, (table, _d) in ENUMS.items()}
        out = pb.Program(
            name=PROGRAM.format(str(row.id)),
            display_name=row.display_name,
            description=row.description,
            currency_code=cur,
            active=row.active,
            earn_amount=to_money(row.earn_amount, cur),
            earn_points=row.earn_points,
            lifetime_count=row.lifetime_count,
            tier_period_days=row.tier_period_days,
            downgrade_grace_days=row.downgrade_grace_days,
            etag=etag(row.version),
            **{k: inv[k][getattr(row, k)] for k in ENUMS},
        )
        for r in row.product_rules:
            out.product_rules.add(
                product=r["product"],
                product_line=r["product_line"],
                multiplier=r["multiplier"],
                points_per_unit=r["points_per_unit"],
            )
        for b in row.bonus_periods:
            x = out.bonus_periods.add(display_name=b["display_name"], multiplier=b["multiplier"])
            x.start_time.FromDatetime(dt.datetime.fromisoformat(b["start_time"]))
            x.end_time.FromDatetime(dt.datetime.fromisoformat(b["end_time"]))
        for t in row.tiers:
            x = out.tiers.add(
                key=t["key"],
                display_name=t["display_name"],
                threshold_points=t["threshold_points"],
                multiplier=t["multiplier"],
            )
            if t.get("threshold_spend") is not None:
                x.threshold_spend.CopyFrom(to_money(Decimal(t["threshold_spend"]), cur))
        for r in rewards:
            x = out.rewards.add(key=r.key, display_name=r.display_name, cost_points=r.cost_points, active=r.active)
            if r.stock is not None:
                x.stock = r.stock
        out.create_time.FromDatetime(row.create_time)
        out.update_time.FromDatetime(row.update_time)
        return out

    def _save_rewards(self, conn, program_id, rewards: list[dict]) -> None:
        keys = [r["key"] for r in rewards]
        if rewards:
            stmt = pg_insert(loyalty_rewards).values(
                [{**r, "program_id": program_id, "active": True, "position": i} for i, r in enumerate(rewards)]
            )
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["program_id", "key"],
                    set_={c: stmt.excluded[c] for c in ("display_name", "cost_points", "stock", "active", "position")},
                )
            )
        conn.execute(
            loyalty_rewards.update().where(rw.program_id == program_id, rw.key.notin_(keys)).values(active=False)
        )

    def create(self, msg: pb.Program, request_id: str):
        principal = current_principal()
        bad: list[FieldViolation] = []
        try:
            currency = check_currency(msg.currency_code, "program.currency_code")
        except InvalidArgument as e:
            bad += e.violations
            currency = msg.currency_code
        if v := request_id_violation(request_id):
            bad.append(v)
        values = {f: _field(msg, f, currency, bad) for f in FIELDS}
        if not bad:
            _check_whole(values, bad)
        if bad:
            raise InvalidArgument(bad)
        rewards = values.pop("rewards")
        with self.rt.uow.begin() as tx:
            conn = tx.conn
            if request_id:
                seen = conn.execute(sa.select(loyalty_programs).where(p.request_id == request_id)).one_or_none()
                if seen is not None:
                    return self.to_proto(conn, seen)
            row = conn.execute(
                loyalty_programs.insert()
                .values(**values, currency=currency, request_id=request_id or None)
                .returning(loyalty_programs)
            ).one()
            self._save_rewards(conn, row.id, rewards)
            tx.audit(PROGRAM.format(str(row.id)), "program.create", principal, [])
            return self.to_proto(conn, row)

    def get(self, name: str) -> pb.Program:
        pid = PROGRAM.parse(name).program_id
        with self.rt.uow.read() as conn:
            return self.to_proto(conn, PROGRAM.one(conn, sa.select(loyalty_programs).where(p.id == pid), name))

    def list(self, req) -> tuple[list, str]:
        limit = page_size(req.page_size)
        with self.rt.uow.read() as conn:
            rows, token = keyset_page(
                conn,
                sa.select(loyalty_programs),
                [(p.create_time, True), (p.id, True)],
                self.pages,
                "",
                limit,
                req.page_token,
            )
            return [self.to_proto(conn, r) for r in rows], token

    def update(self, msg: pb.Program, mask):
        principal = current_principal()
        paths = MASK.paths(mask)
        pid = PROGRAM.parse(msg.name, "program.name").program_id
        with self.rt.uow.begin() as tx:
            conn = tx.conn
            row = PROGRAM.one(conn, sa.select(loyalty_programs).where(p.id == pid).with_for_update(), msg.name)
            check_etag(msg.etag, row.version, msg.name)
            bad: list[FieldViolation] = []
            values = {f: _field(msg, f, row.currency, bad) for f in paths}
            whole = {c: getattr(row, c) for c in FIELDS if c != "rewards"} | {"rewards": []} | values
            if not bad:
                _check_whole(whole, bad)
            if bad:
                raise InvalidArgument(bad)
            rewards = values.pop("rewards", None)
            if rewards is not None:
                self._save_rewards(conn, row.id, rewards)
            row = conn.execute(
                loyalty_programs.update()
                .where(p.id == pid)
                .values(**values, version=p.version + 1, update_time=sa.func.now())
                .returning(loyalty_programs)
            ).one()
            tx.audit(msg.name, "program.update", principal, [])
            return self.to_proto(conn, row)

    def delete(self, name: str, given_etag: str) -> None:
        pid = PROGRAM.parse(name).program_id
        with self.rt.uow.begin() as tx:
            conn = tx.conn
            row = PROGRAM.one(conn, sa.select(loyalty_programs).where(p.id == pid).with_for_update(), name)
            check_etag(given_etag, row.version, name)
            members = conn.execute(sa.select(sa.func.count()).where(m.program_id == pid)).scalar_one()
            if members:
                raise FailedPrecondition(
                    f"{name} has {members} members; deactivate it (update active to false) to keep their ledger",
                    reason="PROGRAM_HAS_MEMBERS",
                    metadata={"name": name, "members": str(members)},
                )
            conn.execute(loyalty_programs.delete().where(p.id == pid))
            tx.audit(name, "program.delete", current_principal(), [])

    # -- members ----------------------------------------------------------------------------
    def _program(self, conn, program_id: str, name: str, *, lock: bool = False):
        q = sa.select(loyalty_programs).where(p.id == program_id)
        return PROGRAM.one(conn, q.with_for_update(read=True) if lock else q, name)

    def member_proto(self, conn, prog: Rules, row) -> pb.Member:
        out = pb.Member(
            name=MEMBER.format(prog.id, row.customer),
            customer=CUSTOMER.format(row.customer),
            balance=row.balance,
            earned=row.earned,
            redeemed=row.redeemed,
            expired=row.expired,
            tier=row.tier,
            enroll_source=row.enroll_source,
        )
        out.enroll_time.FromDatetime(row.enroll_time)
        tier = prog.tier(row.tier)
        if tier:
            out.tier_display_name = tier.display_name
        if row.tier_time:
            out.tier_time.FromDatetime(row.tier_time)
        if prog.tiers:
            start, end = prog.period(self.lo.now())
            figure = self.lo.figure(conn, prog, row.id, start, end)
            out.period_figure = _plain(figure)
            if end is not None and prog.row.tier_period != "rolling_days":
                out.period_end_time.FromDatetime(end)
            nxt = next((t for t in prog.tiers if prog.rank[t.key] > prog.rank.get(row.tier, 0)), None)
            if nxt is not None:
                out.next_tier = nxt.key
                out.next_tier_threshold = _plain(nxt.threshold)
                out.to_next_tier = _plain(max(Decimal(0), nxt.threshold - figure))
        return out

    def _member_ids(self, name: str, field: str):
        ids = MEMBER.parse(name, field)
        return ids.program_id, ids.customer_id

    def enroll(self, parent: str, customer: str) -> pb.Member:
        pid = PROGRAM.parse(parent, "parent").program_id
        cid = CUSTOMER.parse(customer, "customer").customer_id
        with self.rt.uow.begin() as tx:
            conn = tx.conn
            prog = Rules(self._program(conn, pid, parent))
            row = conn.execute(
                pg_insert(loyalty_members)
                .values(program_id=pid, customer=cid, enroll_source="explicit", enroll_time=self.lo.now())
                .on_conflict_do_nothing()
                .returning(loyalty_members)
            ).one_or_none()
            name = MEMBER.format(pid, cid)
            if row is None:
                raise AlreadyExists(f"{customer} is already a member of {parent}", metadata={"name": name})
            tx.audit(name, "member.enroll", current_principal(), [])
            return self.member_proto(conn, prog, row)

    def _member(self, conn, pid, cid, name, *, lock=False):
        q = sa.select(loyalty_members).where(m.program_id == pid, m.customer == cid)
        row = conn.execute(q.with_for_update() if lock else q).one_or_none()
        if row is None:
            raise MEMBER.not_found(name)
        return row

    def get_member(self, name: str) -> pb.Member:
        pid, cid = self._member_ids(name, "name")
        with self.rt.uow.read() as conn:
            prog = Rules(self._program(conn, pid, PROGRAM.format(pid)))
            return self.member_proto(conn, prog, self._member(conn, pid, cid, name))

    def balance(self, name: str) -> pb.MemberBalance:
        member_name = name.removesuffix("/balance")
        if member_name == name or not MEMBER.matches(member_name):
            raise InvalidArgument.field(
                "name", "must be 'programs/{program_id}/members/{customer_id}/balance' with UUID ids"
            )
        pid, cid = self._member_ids(member_name, "name")
        with self.rt.uow.read() as conn:
            row = self._member(conn, pid, cid, member_name)
            out = pb.MemberBalance(member=member_name, balance=row.balance)
            nxt = conn.execute(
                sa.select(mv.expire_time, sa.func.sum(mv.remaining))
                .where(mv.member_id == row.id, mv.remaining > 0, mv.expire_time > self.lo.now())
                .group_by(mv.expire_time)
                .order_by(mv.expire_time)
                .limit(1)
            ).first()
            if nxt is not None:
                out.next_expiring_points = int(nxt[1])
                out.next_expire_time.FromDatetime(nxt[0])
            return out

    def movements(self, req) -> tuple[list, str]:
        pid, cid = self._member_ids(req.parent, "parent")
        limit = page_size(req.page_size)
        with self.rt.uow.read() as conn:
            prog = Rules(self._program(conn, pid, PROGRAM.format(pid)))
            member = self._member(conn, pid, cid, req.parent)
            rows, token = keyset_page(
                conn,
                sa.select(loyalty_movements).where(mv.member_id == member.id),
                [(mv.id, True)],
                self.movement_pages,
                str(member.id),
                limit,
                req.page_token,
            )
            return [movement_proto(with_member(r, member, prog)) for r in rows], token

    # -- movements people make ----------------------------------------------------------------
    def _repeat(self, conn, pid, request_id, member, kind):
        """The movement a retry with this request_id already made (ALREADY_EXISTS if it was
        another member's or another kind of movement)."""
        row = conn.execute(
            sa.select(loyalty_movements).where(mv.program_id == pid, mv.request_id == request_id)
        ).one_or_none()
        if row is not None and (str(row.member_id) != str(member.id) or row.kind != kind):
            raise AlreadyExists(
                "request_id was already used for another movement; use a new one",
                reason="REQUEST_ID_REUSED",
                metadata={"field": "request_id"},
            )
        return row

    def move(self, member_name: str, points: int, reason: str, request_id: str, *, kind: str, reward: str = ""):
        principal = current_principal()
        bad: list[FieldViolation] = []
        try:
            pid, cid = self._member_ids(member_name, "member")
        except InvalidArgument as e:
            bad += e.violations
        if not request_id:
            bad.append(FieldViolation("request_id", "is required: a retry with it returns the first movement"))
        elif v := request_id_violation(request_id):
            bad.append(v)
        if kind == "redeem" and reward:
            pass
        elif kind == "redeem" and not reward and points <= 0:
            bad.append(FieldViolation("points", "must be greater than 0"))
        elif kind == "adjust" and points == 0:
            bad.append(FieldViolation("points", "must not be 0: positive adds points, negative takes them"))
        if abs(points) > MAX_POINTS:
            bad.append(FieldViolation("points", f"must be at most {MAX_POINTS} either way"))
        if not reward and not reason.strip():
            bad.append(FieldViolation("reason", "is required"))
        if len(reason) > REASON_LIMIT:
            bad.append(FieldViolation("reason", f"may be at most {REASON_LIMIT} characters"))
        if bad:
            raise InvalidArgument(bad)
        now = self.lo.now()
        with self.rt.uow.begin() as tx:
            conn = tx.conn
            prog = Rules(self._program(conn, pid, PROGRAM.format(pid), lock=True))
            member = self._member(conn, pid, cid, member_name, lock=True)
            seen = self._repeat(conn, pid, request_id, member, kind)
            if seen is not None:
                return movement_proto(with_member(seen, member, prog))
            if not prog.row.active:
                raise FailedPrecondition(
                    f"{prog.name} is not active", reason="PROGRAM_INACTIVE", metadata={"name": prog.name}
                )
            cols = {
                "actor": principal.subject,
                "request_id": request_id,
                "reason": reason.strip(),
                "occur_time": now,
                "qualify_time": now,
            }
            if reward:
                r = conn.execute(
                    sa.select(loyalty_rewards).where(rw.program_id == pid, rw.key == reward).with_for_update()
                ).one_or_none()
                if r is None or not r.active:
                    raise NotFound(
                        f"reward {reward} is not offered by {prog.name}",
                        reason="REWARD_NOT_FOUND",
                        metadata={"reward": reward},
                    )
                if r.stock is not None and r.stock <= 0:
                    raise FailedPrecondition(
                        f"reward {reward} is out of stock", reason="OUT_OF_STOCK", metadata={"reward": reward}
                    )
                points = r.cost_points
                cols["reward_key"] = reward
                cols["reason"] = cols["reason"] or r.display_name
                if r.stock is not None:
                    conn.execute(
                        loyalty_rewards.update()
                        .where(rw.program_id == pid, rw.key == reward)
                        .values(stock=rw.stock - 1)
                    )
            if kind == "adjust" and points > 0:
                expire = prog.lifetime_end(now)
                row, member = self.lo.record(
                    conn, member, "adjust", points, remaining=points, expire_time=expire, **cols
                )
                if expire is not None:
                    self.lo.arm_expiry(conn, {member.id: expire})
            else:
                take = abs(points)
                self.lo.expire_due(conn, tx, member_id=member.id, now=now)
                member = self.lo.locked_member(conn, member.id)
                if take > member.balance:
                    raise FailedPrecondition(
                        f"the balance of {member_name} is {member.balance} points; {take} cannot be taken",
                        reason="INSUFFICIENT_POINTS",
                        metadata={"name": member_name, "balance": str(member.balance), "points": str(take)},
                    )
                lots = self.lo.take_lots(conn, member.id, take, now)
                row, member = self.lo.record(conn, member, kind, -take, lots=lots, **cols)
            joined = with_member(row, member, prog)
            self.lo._publish_movements(tx, [joined])
            self.lo.evaluate_tier(conn, tx, prog, member, now, "admin")
            tx.audit(movement_name(joined), f"points.{WORD[kind]}", principal, [])
            return movement_proto(joined)


def _plain(d: Decimal) -> str:
    d = Decimal(d)
    return str(d.quantize(Decimal(1))) if d == d.to_integral_value() else f"{d.normalize():f}"


def movement_name(r) -> str:
    return MOVEMENT.format(str(r.program_id), r.customer, str(r.id))


def movement_proto(r) -> pb.PointMovement:
    member = MEMBER.format(str(r.program_id), r.customer)
    out = pb.PointMovement(
        name=movement_name(r),
        kind=WORD[r.kind],
        points=r.points,
        balance=r.balance,
        reference=f"invoices/{r.invoice_id}" if r.invoice_id else r.reward_key,
        credit_note=f"invoices/{r.credit_note_id}" if r.credit_note_id else "",
        reason=r.reason,
        actor=r.actor,
        remaining=r.remaining,
        shortfall=r.shortfall,
        source_event_id=r.source_event_id or "",
    )
    if r.amount:
        out.amount.CopyFrom(to_money(r.amount, r.currency))
    if r.expire_time is not None:
        out.expire_time.FromDatetime(r.expire_time)
    out.occur_time.FromDatetime(r.occur_time)
    for u in r.lots or []:
        out.lots.add(lot=f"{member}/movements/{u['lot']}", points=u["points"])
    return out


class LoyaltyServicer(loyalty_pb2_grpc.LoyaltyServiceServicer):
    def __init__(self, api: LoyaltyApi):
        self.api = api

    def CreateProgram(self, request, context):
        return self.api.create(request.program, request.request_id)

    def GetProgram(self, request, context):
        return self.api.get(request.name)

    def ListPrograms(self, request, context):
        items, token = self.api.list(request)
        return pb.ListProgramsResponse(programs=items, next_page_token=token)

    def UpdateProgram(self, request, context):
        return self.api.update(request.program, request.update_mask)

    def DeleteProgram(self, request, context):
        self.api.delete(request.name, request.etag)
        return pb.DeleteProgramResponse()

    def EnrollMember(self, request, context):
        return self.api.enroll(request.parent, request.customer)

    def GetMember(self, request, context):
        return self.api.get_member(request.name)

    def GetMemberBalance(self, request, context):
        return self.api.balance(request.name)

    def ListPointMovements(self, request, context):
        items, token = self.api.movements(request)
        return pb.ListPointMovementsResponse(movements=items, next_page_token=token)

    def RedeemReward(self, request, context):
        if not request.reward:
            raise InvalidArgument.field("reward", "is required: the reward's key")
        return self.api.move(request.member, 0, "", request.request_id, kind="redeem", reward=request.reward)

    def RedeemPoints(self, request, context):
        return self.api.move(request.member, request.points, request.reason, request.request_id, kind="redeem")

    def AdjustPoints(self, request, context):
        return self.api.move(request.member, request.points, request.reason, request.request_id, kind="adjust")


def registration(rt: Campaign) -> Registration:
    return Registration.of(LoyaltyServicer(rt.once("loyalty_api", lambda: LoyaltyApi(rt))))
