"""VisitService (proto/crm/support/v1/visits.proto): field-service visits of technicians to
customers, for tickets.

Rules, in one place:
- the technician is an active agent with the skill "field"; the ticket exists and is not
  closed; the address defaults to the ticket's customer's address (customer_refs.address);
- a visit holds its technician over slot = [start_time - travel_minutes, start_time +
  work_minutes); the database refuses two overlapping slots of one technician that are not
  cancelled (EXCLUDE USING gist (technician_id WITH =, slot WITH &&)), so of two concurrent
  bookings exactly one wins; the loser is ALREADY_EXISTS naming visit.start_time;
- booked -> completed | cancelled (nothing else); reschedule only while booked;
- booking, rescheduling, cancelling and completing add a system message to the ticket;
- the day list (technician + day) is the Asia/Tehran calendar day, ordered by start.
"""

from __future__ import annotations

import datetime as dt
import json

import sqlalchemy as sa
from google.rpc import error_details_pb2
from sqlalchemy.dialects import postgresql as pg

from crm.support.v1 import visits_pb2 as pb
from crm.support.v1 import visits_pb2_grpc
from crm_chassis import audit, dates
from crm_chassis.auth import Principal
from crm_chassis.columns import TIMESTAMPTZ, UUID, id_column, text_column, times
from crm_chassis.errors import AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument
from crm_chassis.filtering import FieldType, FilterField, FilterSchema, keyset_page, query_fingerprint
from crm_chassis.grpc_server import Registration
from crm_chassis.interceptors import current_principal
from crm_chassis.pagination import PageTokens, page_size
from crm_chassis.resources import ResourceName, check_etag, etag

from .calls import AGENT, NAME_OPS, _enum_names, name_filter
from .runtime import Support
from .tables import agents, customer_refs, metadata, tickets
from .ticketing import CUSTOMER, TICKET, Tickets

VISIT = ResourceName("visits/{visit_id}")
STATES = ("booked", "completed", "cancelled")
STATE_ENUM = {s: pb.Visit.State.Value(f"STATE_{s.upper()}") for s in STATES}
OUTCOMES = ("fixed", "partially_fixed", "not_fixed", "customer_absent")
OUTCOME_ENUM = {o: pb.VisitOutcome.Value(f"VISIT_OUTCOME_{o.upper()}") for o in OUTCOMES}
OUTCOME_OF = {v: k for k, v in OUTCOME_ENUM.items()}
OUTCOME_FA = {
    "fixed": "رفع شد",
    "partially_fixed": "تا حدی رفع شد",
    "not_fixed": "رفع نشد",
    "customer_absent": "مشتری حضور نداشت",
}
FIELD_SKILL = "field"
MAX_TRAVEL, MAX_WORK = 600, 1440
ADDRESS_LIMIT, NOTE_LIMIT, REASON_LIMIT, SIGNER_LIMIT = 1000, 2000, 500, 200
SKU_LIMIT, PART_NAME_LIMIT, MAX_PARTS, MAX_QUANTITY = 100, 300, 100, 10_000
SIGNATURE_LIMIT = 1024 * 1024
OVERLAP = "visits_no_overlap"
ACTOR_SYSTEM = "visits"

visits = sa.Table(
    "visits",
    metadata,
    id_column(),
    sa.Column("ticket_id", UUID, sa.ForeignKey("tickets.id", ondelete="CASCADE"), nullable=False),
    text_column("customer_id"),
    sa.Column("technician_id", sa.Text, sa.ForeignKey("agents.id"), nullable=False),
    sa.Column("start_time", TIMESTAMPTZ, nullable=False),
    sa.Column("travel_minutes", sa.Integer, nullable=False, server_default="0"),
    sa.Column("work_minutes", sa.Integer, nullable=False),
    # [start - travel, start + work): what the technician is held for
    sa.Column("slot", pg.TSTZRANGE, nullable=False),
    text_column("address"),
    text_column("note"),
    sa.Column("state", sa.Text, nullable=False, server_default="booked"),
    text_column("cancel_reason"),
    text_column("outcome"),
    sa.Column("actual_work_minutes", sa.Integer, nullable=False, server_default="0"),
    text_column("signer_name"),
    sa.Column("signature", sa.LargeBinary),
    text_column("signature_content_type"),
    sa.Column("sign_time", TIMESTAMPTZ),
    sa.Column("complete_time", TIMESTAMPTZ),
    sa.Column("cancel_time", TIMESTAMPTZ),
    text_column("booked_by"),
    sa.Column("request_id", sa.Text),
    *times(),
    sa.CheckConstraint("state IN ('booked', 'completed', 'cancelled')", name="visits_state"),
    sa.CheckConstraint(f"travel_minutes BETWEEN 0 AND {MAX_TRAVEL}", name="visits_travel"),
    sa.CheckConstraint(f"work_minutes BETWEEN 1 AND {MAX_WORK}", name="visits_work"),
    pg.ExcludeConstraint(
        ("technician_id", "="),
        ("slot", "&&"),
        using="gist",
        where=sa.text("state <> 'cancelled'"),
        name=OVERLAP,
    ),
)

# Personal data blanked when the customer is erased (customer_projection.erase_personal).
visits.info["personal"] = ("address", "note", "signer_name", "signature", "signature_content_type")
v = visits.c
sa.Index("visits_technician_start", v.technician_id, v.start_time, v.id)
sa.Index("visits_start", v.start_time, v.id)
sa.Index("visits_ticket", v.ticket_id)
sa.Index("visits_request_id", v.request_id, unique=True, postgresql_where=v.request_id.is_not(None))

visit_parts = sa.Table(
    "visit_parts",
    metadata,
    sa.Column("visit_id", UUID, sa.ForeignKey("visits.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True),
    text_column("sku"),
    text_column("name"),
    sa.Column("quantity", sa.Integer, nullable=False),
    sa.CheckConstraint("quantity > 0", name="visit_parts_quantity"),
)


class SlotTaken(AlreadyExists):
    """ALREADY_EXISTS that also names the field (BadRequest), so HTTP clients see which."""

    reason = "TECHNICIAN_BUSY"

    def __init__(self, message: str, **kw):
        super().__init__(message, **kw)
        self.violations = [FieldViolation("visit.start_time", message)]

    def details(self) -> list:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=x.field, description=x.description)
                for x in self.violations
            ]
        )
        return [bad, *super().details()]


def _overlap(err: sa.exc.IntegrityError) -> bool:
    diag = getattr(err.orig, "diag", None)
    return getattr(diag, "constraint_name", "") == OVERLAP


def _ts(message, field: str) -> dt.datetime | None:
    return getattr(message, field).ToDatetime(tzinfo=dt.UTC) if message.HasField(field) else None


def slot_of(start: dt.datetime, travel: int, work: int) -> tuple[dt.datetime, dt.datetime]:
    return start - dt.timedelta(minutes=travel), start + dt.timedelta(minutes=work)


def _tehran(t: dt.datetime) -> str:
    return t.astimezone(dates.TEHRAN).strftime("%Y-%m-%d %H:%M")


def to_proto(row, parts=(), with_signature: bool = False) -> pb.Visit:
    out = pb.Visit(
        name=VISIT.format(row.id),
        ticket=TICKET.format(row.ticket_id),
        customer=CUSTOMER.format(row.customer_id) if row.customer_id else "",
        technician=AGENT.format(row.technician_id),
        travel_minutes=row.travel_minutes,
        work_minutes=row.work_minutes,
        address=row.address,
        note=row.note,
        state=STATE_ENUM[row.state],
        cancel_reason=row.cancel_reason,
        outcome=OUTCOME_ENUM.get(row.outcome, 0),
        parts=[pb.VisitPart(sku=p.sku, name=p.name, quantity=p.quantity) for p in parts],
        actual_work_minutes=row.actual_work_minutes,
        booked_by=row.booked_by,
        etag=etag(row.version),
    )
    out.start_time.FromDatetime(row.start_time)
    out.slot_start_time.FromDatetime(row.slot.lower)
    out.slot_end_time.FromDatetime(row.slot.upper)
    image = getattr(row, "signature", None)
    size = row._mapping["signature_size"] if "signature_size" in row._mapping else len(image or b"")
    if row.state == "completed" and (row.signer_name or size):
        s = out.sign_off
        s.signer_name = row.signer_name
        s.signature_content_type = row.signature_content_type
        s.signature_size_bytes = size
        if with_signature and image:
            s.signature = image
        if row.sign_time:
            s.sign_time.FromDatetime(row.sign_time)
    for f in ("complete_time", "cancel_time", "create_time", "update_time"):
        if getattr(row, f) is not None:
            getattr(out, f).FromDatetime(getattr(row, f))
    return out


def image_type(data: bytes) -> str:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    return ""


FILTERS = FilterSchema(
    FilterField("state", v.state, FieldType.ENUM, enum_values=_enum_names(STATES, "STATE")),
    FilterField("technician", name_filter(v.technician_id, AGENT, "technician"), operators=NAME_OPS),
    FilterField("ticket", name_filter(sa.cast(v.ticket_id, sa.Text), TICKET, "ticket"), operators=NAME_OPS),
    FilterField("customer", name_filter(v.customer_id, CUSTOMER, "customer"), operators=NAME_OPS),
    FilterField("start_time", v.start_time, FieldType.TIMESTAMP),
)


class Visits:
    def __init__(self, support: Support):
        self.support = support
        self.uow = support.uow
        self.tokens = PageTokens(support.settings.jwt_secret, "visits")

    @property
    def tickets(self) -> Tickets:
        return self.support.tickets

    # checks -------------------------------------------------------------------------------------
    @staticmethod
    def _technician(conn, name: str, field: str) -> str:
        tid = AGENT.parse(name, field).agent_id
        row = conn.execute(sa.select(agents.c.active, agents.c.skills).where(agents.c.id == tid)).one_or_none()
        if row is None or not row.active:
            raise InvalidArgument.field(field, f"{name} is not an active agent")
        if FIELD_SKILL not in row.skills:
            raise InvalidArgument.field(field, f'{name} does not have the skill "{FIELD_SKILL}" (field technicians)')
        return tid

    @staticmethod
    def _times(start, travel: int, work: int, bad: list[FieldViolation], prefix: str) -> None:
        if start is None:
            bad.append(FieldViolation(f"{prefix}start_time", "is required"))
        if not 0 <= travel <= MAX_TRAVEL:
            bad.append(FieldViolation(f"{prefix}travel_minutes", f"must be 0..{MAX_TRAVEL}"))
        if not 1 <= work <= MAX_WORK:
            bad.append(FieldViolation(f"{prefix}work_minutes", f"must be 1..{MAX_WORK}"))

    def _locked(self, conn, name: str):
        vid = VISIT.parse(name).visit_id
        row = conn.execute(sa.select(visits).where(v.id == vid).with_for_update()).one_or_none()
        if row is None:
            raise VISIT.not_found(name)
        return row

    @staticmethod
    def _booked(row, name: str, doing: str) -> None:
        if row.state != "booked":
            raise FailedPrecondition(
                f"{name} is {row.state}: only a booked visit can be {doing}",
                reason="VISIT_NOT_BOOKED",
                metadata={"state": row.state},
            )

    def _taken(self, conn, technician_id: str, lo, hi, exclude=None) -> SlotTaken:
        q = sa.select(visits.c.id, visits.c.start_time).where(
            v.technician_id == technician_id,
            v.state != "cancelled",
            v.slot.op("&&")(sa.func.tstzrange(lo, hi, "[)")),
        )
        if exclude:
            q = q.where(v.id != exclude)
        other = conn.execute(q.limit(1)).one_or_none()
        msg = f"agents/{technician_id} is busy then (travel and work overlap another visit)"
        meta = {"field": "visit.start_time"}
        if other is not None:
            msg = (
                f"agents/{technician_id} is busy then: {VISIT.format(other.id)} at {_tehran(other.start_time)} overlaps"
            )
            meta["conflict"] = VISIT.format(other.id)
        return SlotTaken(msg, metadata=meta)

    # book ---------------------------------------------------------------------------------------
    def book(self, req: pb.BookVisitRequest, principal: Principal) -> pb.Visit:
        visit = req.visit
        bad: list[FieldViolation] = []
        ticket_id = None
        if not visit.ticket:
            bad.append(FieldViolation("visit.ticket", "is required"))
        else:
            try:
                ticket_id = TICKET.parse(visit.ticket, "visit.ticket").ticket_id
            except InvalidArgument as e:
                bad += e.violations
        if not visit.technician:
            bad.append(FieldViolation("visit.technician", "is required"))
        start = _ts(visit, "start_time")
        self._times(start, visit.travel_minutes, visit.work_minutes, bad, "visit.")
        address, note = visit.address.strip(), visit.note.strip()
        if len(address) > ADDRESS_LIMIT:
            bad.append(FieldViolation("visit.address", f"may be at most {ADDRESS_LIMIT} characters"))
        if len(note) > NOTE_LIMIT:
            bad.append(FieldViolation("visit.note", f"may be at most {NOTE_LIMIT} characters"))
        if len(req.request_id) > 200:
            bad.append(FieldViolation("request_id", "may be at most 200 characters"))
        if bad:
            raise InvalidArgument(bad)
        lo, hi = slot_of(start, visit.travel_minutes, visit.work_minutes)
        request_id = req.request_id.strip() or None
        try:
            with self.uow.begin() as tx:
                conn = tx.conn
                if request_id:
                    seen = conn.execute(sa.select(visits).where(v.request_id == request_id)).one_or_none()
                    if seen is not None:
                        return to_proto(seen)
                technician = self._technician(conn, visit.technician, "visit.technician")
                ticket = conn.execute(sa.select(tickets).where(tickets.c.id == ticket_id)).one_or_none()
                if ticket is None:
                    raise InvalidArgument.field("visit.ticket", f"{visit.ticket} does not exist")
                if ticket.state == "closed":
                    raise FailedPrecondition(f"{visit.ticket} is closed", reason="TICKET_CLOSED")
                if not address and ticket.customer_id:
                    address = (
                        conn.execute(
                            sa.select(customer_refs.c.address).where(customer_refs.c.customer_id == ticket.customer_id)
                        ).scalar()
                        or ""
                    ).strip()
                if not address:
                    raise InvalidArgument.field(
                        "visit.address", "is required: the ticket's customer has no address on record"
                    )
                try:
                    with tx.savepoint():
                        row = conn.execute(
                            visits.insert()
                            .values(
                                ticket_id=ticket_id,
                                customer_id=ticket.customer_id,
                                technician_id=technician,
                                start_time=start,
                                travel_minutes=visit.travel_minutes,
                                work_minutes=visit.work_minutes,
                                slot=sa.func.tstzrange(lo, hi, "[)"),
                                address=address,
                                note=note,
                                booked_by=principal.subject,
                                request_id=request_id,
                            )
                            .returning(visits)
                        ).one()
                except sa.exc.IntegrityError as err:
                    if _overlap(err):
                        raise self._taken(conn, technician, lo, hi) from None
                    raise
                name = VISIT.format(row.id)
                self.tickets.add_message(
                    tx,
                    ticket_id,
                    "system",
                    f"بازدید فنی رزرو شد: {_tehran(start)} (تهران)، تکنسین {technician}، "
                    f"رفت‌وآمد {visit.travel_minutes} دقیقه، کار {visit.work_minutes} دقیقه، نشانی: {address} [{name}]",
                    author=principal.subject,
                    actor=principal.subject,
                )
                tx.audit(
                    name,
                    "visit.book",
                    principal,
                    [
                        audit.change("technician_id", "null", json.dumps(technician)),
                        audit.change("start_time", "null", json.dumps(start.isoformat())),
                    ],
                )
        except sa.exc.IntegrityError:
            if request_id:  # a concurrent retry with the same request_id committed first
                with self.uow.read() as conn:
                    seen = conn.execute(sa.select(visits).where(v.request_id == request_id)).one_or_none()
                if seen is not None:
                    return to_proto(seen)
            raise
        return to_proto(row)

    # read ---------------------------------------------------------------------------------------
    def get(self, name: str) -> pb.Visit:
        vid = VISIT.parse(name).visit_id
        with self.uow.read() as conn:
            row = conn.execute(sa.select(visits).where(v.id == vid)).one_or_none()
            if row is None:
                raise VISIT.not_found(name)
            parts = self._parts(conn, [row.id]).get(row.id, [])
        return to_proto(row, parts, with_signature=True)

    @staticmethod
    def _parts(conn, ids) -> dict:
        out: dict = {}
        if not ids:
            return out
        rows = conn.execute(
            sa.select(visit_parts).where(visit_parts.c.visit_id.in_(ids)).order_by(visit_parts.c.position)
        )
        for p in rows:
            out.setdefault(p.visit_id, []).append(p)
        return out

    def list(self, req: pb.ListVisitsRequest) -> tuple[list[pb.Visit], str]:
        limit = page_size(req.page_size)
        where = [FILTERS.compile(req.filter)]
        if req.technician:
            where.append(v.technician_id == AGENT.parse(req.technician, "technician").agent_id)
        day = dates.from_proto(req.day, "day")
        if day is not None:
            where += [v.start_time >= dates.start_of_day(day), v.start_time < dates.end_of_day(day)]
        order_by = " ".join(req.order_by.split()).lower()
        if order_by in ("", "start_time", "start_time asc"):
            order = [(v.start_time, False), (v.id, False)]
        elif order_by == "start_time desc":
            order = [(v.start_time, True), (v.id, True)]
        else:
            raise InvalidArgument.field("order_by", 'must be "start_time" or "start_time desc"')
        day_key = day.isoformat() if day else ""
        purpose = query_fingerprint(req.filter, order_by, technician=req.technician, day=day_key)
        cols = [col for col in visits.c if col.name != "signature"]
        cols.append(sa.func.coalesce(sa.func.length(v.signature), 0).label("signature_size"))
        with self.uow.read() as conn:
            rows, token = keyset_page(
                conn, sa.select(*cols).where(*where), order, self.tokens, purpose, limit, req.page_token
            )
            parts = self._parts(conn, [r.id for r in rows])
        return [to_proto(r, parts.get(r.id, [])) for r in rows], token

    # changes ------------------------------------------------------------------------------------
    def reschedule(self, req: pb.RescheduleVisitRequest, principal: Principal) -> pb.Visit:
        bad: list[FieldViolation] = []
        start = _ts(req, "start_time")
        with self.uow.begin() as tx:
            conn = tx.conn
            row = self._locked(conn, req.name)
            check_etag(req.etag, row.version, req.name)
            self._booked(row, req.name, "rescheduled")
            travel = req.travel_minutes if req.HasField("travel_minutes") else row.travel_minutes
            work = req.work_minutes if req.HasField("work_minutes") else row.work_minutes
            self._times(start, travel, work, bad, "")
            if bad:
                raise InvalidArgument(bad)
            technician = self._technician(conn, req.technician, "technician") if req.technician else row.technician_id
            lo, hi = slot_of(start, travel, work)
            try:
                with tx.savepoint():
                    after = conn.execute(
                        visits.update()
                        .where(v.id == row.id)
                        .values(
                            start_time=start,
                            travel_minutes=travel,
                            work_minutes=work,
                            technician_id=technician,
                            slot=sa.func.tstzrange(lo, hi, "[)"),
                            update_time=sa.func.now(),
                            version=v.version + 1,
                        )
                        .returning(visits)
                    ).one()
            except sa.exc.IntegrityError as err:
                if _overlap(err):
                    raise self._taken(conn, technician, lo, hi, exclude=row.id) from None
                raise
            self.tickets.add_message(
                tx,
                row.ticket_id,
                "system",
                f"بازدید فنی جابه‌جا شد: از {_tehran(row.start_time)} به {_tehran(start)} (تهران)، "
                f"تکنسین {technician} [{req.name}]",
                author=principal.subject,
                actor=principal.subject,
            )
            tx.audit(
                req.name,
                "visit.reschedule",
                principal,
                [
                    audit.change("start_time", json.dumps(row.start_time.isoformat()), json.dumps(start.isoformat())),
                    audit.change("technician_id", json.dumps(row.technician_id), json.dumps(technician)),
                ],
            )
            parts = self._parts(conn, [row.id]).get(row.id, [])
        return to_proto(after, parts)

    def cancel(self, req: pb.CancelVisitRequest, principal: Principal) -> pb.Visit:
        reason = req.reason.strip()
        if not reason:
            raise InvalidArgument.field("reason", "is required")
        if len(reason) > REASON_LIMIT:
            raise InvalidArgument.field("reason", f"may be at most {REASON_LIMIT} characters")
        with self.uow.begin() as tx:
            row = self._locked(tx.conn, req.name)
            check_etag(req.etag, row.version, req.name)
            self._booked(row, req.name, "cancelled")
            after = tx.conn.execute(
                visits.update()
                .where(v.id == row.id)
                .values(
                    state="cancelled",
                    cancel_reason=reason,
                    cancel_time=sa.func.now(),
                    update_time=sa.func.now(),
                    version=v.version + 1,
                )
                .returning(visits)
            ).one()
            self.tickets.add_message(
                tx,
                row.ticket_id,
                "system",
                f"بازدید فنی {_tehran(row.start_time)} لغو شد: {reason} [{req.name}]",
                author=principal.subject,
                actor=principal.subject,
            )
            tx.audit(req.name, "visit.cancel", principal, [audit.change("state", '"booked"', '"cancelled"')])
        return to_proto(after)

    def complete(self, req: pb.CompleteVisitRequest, principal: Principal) -> pb.Visit:
        bad: list[FieldViolation] = []
        outcome = OUTCOME_OF.get(req.outcome, "")
        if not outcome:
            bad.append(FieldViolation("outcome", f"is required: one of {', '.join(o.upper() for o in OUTCOMES)}"))
        if len(req.parts) > MAX_PARTS:
            bad.append(FieldViolation("parts", f"at most {MAX_PARTS} parts"))
        parts = []
        for i, p in enumerate(req.parts[:MAX_PARTS]):
            sku, pname = p.sku.strip(), p.name.strip()
            if not sku and not pname:
                bad.append(FieldViolation(f"parts[{i}].sku", "a sku or a name is required"))
            if len(sku) > SKU_LIMIT:
                bad.append(FieldViolation(f"parts[{i}].sku", f"may be at most {SKU_LIMIT} characters"))
            if len(pname) > PART_NAME_LIMIT:
                bad.append(FieldViolation(f"parts[{i}].name", f"may be at most {PART_NAME_LIMIT} characters"))
            if not 1 <= p.quantity <= MAX_QUANTITY:
                bad.append(FieldViolation(f"parts[{i}].quantity", f"must be 1..{MAX_QUANTITY}"))
            parts.append({"position": i, "sku": sku, "name": pname, "quantity": p.quantity})
        if not 0 <= req.actual_work_minutes <= MAX_WORK:
            bad.append(FieldViolation("actual_work_minutes", f"must be 0..{MAX_WORK}"))
        s = req.sign_off
        signer = s.signer_name.strip()
        content_type = ""
        if len(signer) > SIGNER_LIMIT:
            bad.append(FieldViolation("sign_off.signer_name", f"may be at most {SIGNER_LIMIT} characters"))
        if len(s.signature) > SIGNATURE_LIMIT:
            bad.append(FieldViolation("sign_off.signature", "may be at most 1 MB"))
        elif s.signature:
            content_type = image_type(s.signature)
            if not content_type:
                bad.append(FieldViolation("sign_off.signature", "must be a PNG or JPEG image"))
        if outcome and outcome != "customer_absent":
            if not signer:
                bad.append(FieldViolation("sign_off.signer_name", "is required (unless the customer was absent)"))
            if not s.signature:
                bad.append(FieldViolation("sign_off.signature", "is required (unless the customer was absent)"))
        sign_time = _ts(s, "sign_time")
        now = dt.datetime.now(dt.UTC)
        if sign_time is not None and sign_time > now + dt.timedelta(minutes=5):
            bad.append(FieldViolation("sign_off.sign_time", "must not be in the future"))
        if bad:
            raise InvalidArgument(bad)
        with self.uow.begin() as tx:
            conn = tx.conn
            row = self._locked(conn, req.name)
            check_etag(req.etag, row.version, req.name)
            self._booked(row, req.name, "completed")
            signed = bool(signer or s.signature)
            after = conn.execute(
                visits.update()
                .where(v.id == row.id)
                .values(
                    state="completed",
                    outcome=outcome,
                    actual_work_minutes=req.actual_work_minutes or row.work_minutes,
                    signer_name=signer,
                    signature=bytes(s.signature) if s.signature else None,
                    signature_content_type=content_type,
                    sign_time=(sign_time or sa.func.now()) if signed else None,
                    complete_time=sa.func.now(),
                    update_time=sa.func.now(),
                    version=v.version + 1,
                )
                .returning(visits)
            ).one()
            if parts:
                conn.execute(visit_parts.insert(), [{"visit_id": row.id, **p} for p in parts])
            used = "، ".join(f"{p['name'] or p['sku']} × {p['quantity']}" for p in parts) or "—"
            text = f"بازدید فنی انجام شد: {OUTCOME_FA[outcome]}؛ کار {after.actual_work_minutes} دقیقه؛ قطعات: {used}"
            if signer:
                text += f"؛ امضا: {signer}"
            self.tickets.add_message(
                tx, row.ticket_id, "system", f"{text} [{req.name}]", author=principal.subject, actor=principal.subject
            )
            tx.audit(req.name, "visit.complete", principal, [audit.change("outcome", "null", json.dumps(outcome))])
            stored = self._parts(conn, [row.id]).get(row.id, [])
        return to_proto(after, stored)


class VisitServicer(visits_pb2_grpc.VisitServiceServicer):
    def __init__(self, uc: Visits):
        self.uc = uc

    def BookVisit(self, request, context):
        return self.uc.book(request, current_principal())

    def GetVisit(self, request, context):
        return self.uc.get(request.name)

    def ListVisits(self, request, context):
        items, token = self.uc.list(request)
        return pb.ListVisitsResponse(visits=items, next_page_token=token)

    def RescheduleVisit(self, request, context):
        return self.uc.reschedule(request, current_principal())

    def CancelVisit(self, request, context):
        return self.uc.cancel(request, current_principal())

    def CompleteVisit(self, request, context):
        return self.uc.complete(request, current_principal())


def use_cases(support: Support) -> Visits:
    return support.once("visits", lambda: Visits(support))


def registration(support: Support) -> Registration:
    return Registration.of(VisitServicer(use_cases(support)))
