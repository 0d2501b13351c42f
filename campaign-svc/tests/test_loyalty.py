"""The loyalty club over gRPC and sales events: programmes and their errors, earning with the
rules and a bonus period (a redelivered or re-published event earns once), redemption from the
soonest-expiring lots, the expiry timer and a controlled clock, reversal by credit notes with
a shortfall, manual adjustments and their permission, the ledger sum equal to the balance (and
the commit-time check refusing anything else), tiers up at once, down after a grace and at the
end of a Jalali year, and an invoice through the real broker.

Each test uses its own currency, so the programmes of one test do not earn on another's
invoices (an invoice earns in every active programme of its currency)."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

import grpc
import pika
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2

from campaign_svc import loyalty as lo_mod
from campaign_svc.loyalty_tables import loyalty_members, loyalty_movements
from crm.campaign.v1 import campaign_events_pb2 as ev
from crm.campaign.v1 import loyalty_pb2 as pb
from crm.campaign.v1 import loyalty_pb2_grpc
from crm.sales.v1 import sales_events_pb2 as se
from crm.type.v1 import money_pb2
from crm_chassis import timers
from crm_chassis.errors import read_rpc_error
from tests.support.harness import wait_for

from .conftest import ADMIN, MARKETER, deliver, event_of, events, rt

TEHRAN = lo_mod.TEHRAN
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def money(currency: str, amount) -> money_pb2.Money:
    d = Decimal(str(amount))
    units = int(d)
    return money_pb2.Money(currency_code=currency, units=units, nanos=int((d - units) * 10**9))


def paid(currency, cid, lines=(), at=NOW, total=None, iid=None, tax=0):
    """invoice.paid.v1: lines are (product, product_line, quantity, net amount)."""
    iid = iid or str(uuid.uuid4())
    e = se.InvoiceEvent(invoice=f"invoices/{iid}", customer=f"customers/{cid}", kind="invoice", state="paid")
    net = Decimal(0)
    for product, line, qty, amount in lines:
        e.lines.add(product=product, product_line=line, quantity=str(qty), amount=money(currency, amount))
        net += Decimal(str(amount))
    total = Decimal(str(total)) if total is not None else net + tax
    e.total.CopyFrom(money(currency, total))
    e.tax_total.CopyFrom(money(currency, tax))
    e.paid_total.CopyFrom(money(currency, total))
    e.event_time.FromDatetime(at)
    return event_of("sales", "invoice.paid.v1", e, f"invoices/{iid}")


def credit(currency, cid, invoice_event, amount, at=NOW, number="CN-1405-000001"):
    inv = invoice_event.parse(se.InvoiceEvent)
    nid = str(uuid.uuid4())
    e = se.InvoiceEvent(
        invoice=f"invoices/{nid}",
        number=number,
        customer=f"customers/{cid}",
        kind="credit_note",
        state="issued",
        credited_invoice=inv.invoice,
        total=money(currency, amount),
        tax_total=money(currency, 0),
    )
    e.event_time.FromDatetime(at)
    return event_of("sales", "invoice.credited.v1", e, f"invoices/{nid}")


def republished(e):
    """The same invoice event published again under a new event id (a producer's retry)."""
    return event_of("sales", e.routing_key, e.parse(se.InvoiceEvent), e.subject)


@pytest.fixture(scope="module")
def stub(ch):
    return loyalty_pb2_grpc.LoyaltyServiceStub(ch)


@pytest.fixture
def clock(svc):
    """The loyalty engine's clock, set by the test and put back after it."""
    lo = lo_mod.engine(rt(svc))
    state = {"now": None}
    lo.clock = lambda: state["now"] or dt.datetime.now(dt.UTC)
    yield state
    lo.clock = lambda: dt.datetime.now(dt.UTC)


def program(stub, currency, *, per=1, points=1, **kw) -> pb.Program:
    p = pb.Program(
        display_name=kw.pop("display_name", f"باشگاه {currency}"),
        currency_code=currency,
        earn_amount=money(currency, per),
        earn_points=points,
        **kw,
    )
    return stub.CreateProgram(pb.CreateProgramRequest(program=p, request_id=str(uuid.uuid4())), metadata=ADMIN)


def member(stub, prog, cid) -> pb.Member:
    return stub.GetMember(pb.GetMemberRequest(name=f"{prog.name}/members/{cid}"), metadata=ADMIN)


def movements(stub, prog, cid) -> list[pb.PointMovement]:
    out, token = [], ""
    while True:
        page = stub.ListPointMovements(
            pb.ListPointMovementsRequest(parent=f"{prog.name}/members/{cid}", page_size=2, page_token=token),
            metadata=ADMIN,
        )
        out += page.movements
        token = page.next_page_token
        if not token:
            return out


def rpc_error(call, *args, **kw):
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kw)
    return err.value


def fields(err) -> set[str]:
    return {v.field for v in read_rpc_error(err).field_violations}


def ledger_problems(svc) -> list:
    """Members whose balance is not the sum of their movements or of their lots' remaining."""
    with svc.ctx.engine.connect() as conn:
        return conn.execute(
            sa.text(
                """SELECT mb.id, mb.balance, coalesce(s.total, 0) AS total, coalesce(s.lots, 0) AS lots
                     FROM loyalty_members mb
                     LEFT JOIN (SELECT member_id, sum(points) AS total, sum(remaining) AS lots
                                  FROM loyalty_movements GROUP BY member_id) s ON s.member_id = mb.id
                    WHERE mb.balance <> coalesce(s.total, 0) OR mb.balance <> coalesce(s.lots, 0)"""
            )
        ).all()


def points_events(svc, key, cid):
    return [e for e in events(svc, key, ev.PointsEvent) if e.customer == f"customers/{cid}"]


def tier_events(svc, cid):
    return [e for e in events(svc, "tier.changed.v1", ev.TierEvent) if e.customer == f"customers/{cid}"]


def run_timers(svc, until, what):
    def step():
        rt(svc).timers.run_once()
        return until()

    return wait_for(step, timeout=10, what=what)


# -- programmes ------------------------------------------------------------------------------
def test_programmes_create_get_list_update_delete_and_their_errors(stub):
    p = program(
        stub,
        "CHF",
        per=10,
        points=1,
        tiers=[
            pb.Tier(key="gold", display_name="طلایی", threshold_points=500, multiplier="2"),
            pb.Tier(key="silver", threshold_points=100),
        ],
        rewards=[pb.Reward(key="mug", display_name="ماگ", cost_points=50, stock=3)],
        lifetime_unit=pb.LIFETIME_UNIT_MONTHS,
        lifetime_count=12,
    )
    assert p.name.startswith("programs/") and p.active and p.etag == '"1"'
    assert [r.key for r in p.rewards] == ["mug"] and p.rewards[0].stock == 3 and p.rewards[0].active
    assert stub.GetProgram(pb.GetProgramRequest(name=p.name), metadata=MARKETER) == p
    other = program(stub, "CHF", display_name="دوم")
    first = stub.ListPrograms(pb.ListProgramsRequest(page_size=1), metadata=MARKETER)
    assert [x.name for x in first.programs] == [other.name] and first.next_page_token  # newest first
    second = stub.ListPrograms(pb.ListProgramsRequest(page_size=1, page_token=first.next_page_token), metadata=MARKETER)
    assert [x.name for x in second.programs] == [p.name]

    changed = pb.Program(
        name=p.name,
        etag=p.etag,
        display_name="باشگاه طلایی",
        rewards=[pb.Reward(key="cap", display_name="کلاه", cost_points=80)],
    )
    up = stub.UpdateProgram(
        pb.UpdateProgramRequest(
            program=changed, update_mask=field_mask_pb2.FieldMask(paths=["display_name", "rewards"])
        ),
        metadata=ADMIN,
    )
    assert up.display_name == "باشگاه طلایی" and up.etag == '"2"'
    assert {(r.key, r.active, r.HasField("stock")) for r in up.rewards} == {("mug", False, True), ("cap", True, False)}
    err = rpc_error(
        stub.UpdateProgram,
        pb.UpdateProgramRequest(program=changed, update_mask=field_mask_pb2.FieldMask(paths=["display_name"])),
        metadata=ADMIN,
    )
    assert err.code() == grpc.StatusCode.ABORTED  # the etag it was read with is stale
    err = rpc_error(
        stub.UpdateProgram,
        pb.UpdateProgramRequest(
            program=pb.Program(name=p.name, currency_code="USD"),
            update_mask=field_mask_pb2.FieldMask(paths=["currency_code"]),
        ),
        metadata=ADMIN,
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(err) == {"update_mask"}

    bad = pb.Program(
        currency_code="CHF",
        earn_amount=money("USD", 10),
        earn_points=-1,
        tiers=[pb.Tier(key="Gold!"), pb.Tier(key="x", threshold_points=5, multiplier="zero")],
        bonus_periods=[pb.BonusPeriod(multiplier="2")],
        downgrade=pb.DOWNGRADE_PERIOD_END,
    )
    err = rpc_error(stub.CreateProgram, pb.CreateProgramRequest(program=bad), metadata=ADMIN)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(err) == {
        "program.display_name",
        "program.earn_amount.currency_code",
        "program.earn_points",
        "program.tiers[0].key",
        "program.tiers[1].multiplier",
        "program.bonus_periods[0]",
    }
    rolling = pb.Program(
        display_name="x",
        currency_code="CHF",
        earn_amount=money("CHF", 1),
        earn_points=1,
        tier_period=pb.TIER_PERIOD_ROLLING_DAYS,
        tier_period_days=90,
        downgrade=pb.DOWNGRADE_PERIOD_END,
    )
    err = rpc_error(stub.CreateProgram, pb.CreateProgramRequest(program=rolling), metadata=ADMIN)
    assert fields(err) == {"program.downgrade"}  # period_end needs a calendar year
    err = rpc_error(
        stub.CreateProgram,
        pb.CreateProgramRequest(program=pb.Program(display_name="x", currency_code="rial")),
        metadata=ADMIN,
    )
    assert "program.currency_code" in fields(err)
    assert (
        rpc_error(stub.GetProgram, pb.GetProgramRequest(name="programs/nope"), metadata=ADMIN).code()
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    missing = f"programs/{uuid.uuid4()}"
    assert (
        rpc_error(stub.GetProgram, pb.GetProgramRequest(name=missing), metadata=ADMIN).code()
        == grpc.StatusCode.NOT_FOUND
    )

    stub.EnrollMember(pb.EnrollMemberRequest(parent=other.name, customer=f"customers/{uuid.uuid4()}"), metadata=ADMIN)
    err = rpc_error(stub.DeleteProgram, pb.DeleteProgramRequest(name=other.name), metadata=ADMIN)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "1 members" in err.details()
    stub.DeleteProgram(pb.DeleteProgramRequest(name=p.name, etag=up.etag), metadata=ADMIN)
    assert (
        rpc_error(stub.GetProgram, pb.GetProgramRequest(name=p.name), metadata=ADMIN).code()
        == grpc.StatusCode.NOT_FOUND
    )
    stub.UpdateProgram(  # deactivated: CHF invoices of later tests would not earn here
        pb.UpdateProgramRequest(
            program=pb.Program(name=other.name, active=False), update_mask=field_mask_pb2.FieldMask(paths=["active"])
        ),
        metadata=ADMIN,
    )


# -- earning -----------------------------------------------------------------------------------
def test_invoice_paid_earns_by_the_rules_and_bonus_period_once_per_event(svc, stub):
    bonus = pb.BonusPeriod(display_name="یلدا", multiplier="1.5")
    bonus.start_time.FromDatetime(NOW - dt.timedelta(days=1))
    bonus.end_time.FromDatetime(NOW + dt.timedelta(days=1))
    prog = program(
        stub,
        "IRR",
        per=10_000,
        points=1,
        product_rules=[
            pb.ProductRule(product="products/p2", multiplier="2"),
            pb.ProductRule(product_line="productLines/l3", points_per_unit=5),
        ],
        bonus_periods=[bonus],
    )
    cid = str(uuid.uuid4())
    first = paid(
        "IRR",
        cid,
        [
            ("products/p1", "", 1, 100_000),
            ("products/p2", "", 1, 50_000),
            ("products/p3", "productLines/l3", 2, 30_000),
        ],
        tax=18_000,
    )
    # base 10 + 5 x 2 + 3 = 23, times the bonus 1.5 = 34.5, plus 2 x 5 per unit = 44.5 -> 44 (floor)
    deliver(svc, first)
    later = paid("IRR", cid, [("products/p1", "", 1, 105_000)], at=NOW + dt.timedelta(days=10))  # no bonus: 10.5 -> 10
    deliver(svc, later)
    deliver(svc, first, republished(first), later)  # redelivered, and re-published under a new id
    got = member(stub, prog, cid)
    assert (got.balance, got.earned, got.enroll_source) == (54, 54, "auto")
    ms = movements(stub, prog, cid)
    assert [(x.kind, x.points, x.balance) for x in ms] == [("earned", 10, 54), ("earned", 44, 44)]  # newest first
    assert ms[1].reference == first.subject and ms[1].source_event_id == first.id
    assert ms[1].amount == money("IRR", 180_000)  # the lines' net amount, before tax
    assert not ms[1].HasField("expire_time")  # this programme's points never expire
    sent = points_events(svc, "points.earned.v1", cid)
    assert [(e.points, e.balance, e.kind) for e in sent] == [(44, 44, "earned"), (10, 54, "earned")]
    assert sent[0].account == f"{prog.name}/members/{cid}" and sent[0].programme == prog.name
    # an invoice credited in part before it was paid earns on what was paid: 200,000 of 400,000
    half = paid("IRR", cid, [("products/p1", "", 1, 400_000)], at=NOW + dt.timedelta(days=10))
    inv = half.parse(se.InvoiceEvent)
    inv.paid_total.CopyFrom(money("IRR", 200_000))
    deliver(svc, event_of("sales", "invoice.paid.v1", inv, half.subject))
    assert movements(stub, prog, cid)[0].points == 20 and movements(stub, prog, cid)[0].amount == money("IRR", 200_000)
    # an invoice in another currency earns nothing here
    deliver(svc, paid("SEK", cid, [("products/p1", "", 1, 1_000_000)]))
    assert member(stub, prog, cid).balance == 74
    assert ledger_problems(svc) == []


# -- redemption --------------------------------------------------------------------------------
def test_redemption_takes_the_soonest_expiring_lots_first_and_never_goes_negative(svc, stub):
    prog = program(
        stub,
        "USD",
        lifetime_unit=pb.LIFETIME_UNIT_DAYS,
        lifetime_count=30,
        rewards=[pb.Reward(key="mug", display_name="ماگ", cost_points=60, stock=1)],
    )
    cid = str(uuid.uuid4())
    deliver(svc, paid("USD", cid, [("products/a", "", 1, 100)], at=NOW - dt.timedelta(days=20)))  # expires in 10 days
    deliver(svc, paid("USD", cid, [("products/b", "", 1, 50)], at=NOW - dt.timedelta(days=25)))  # expires in 5 days
    lot_a, lot_b = reversed(movements(stub, prog, cid))
    assert lot_b.expire_time.ToDatetime(dt.UTC) < lot_a.expire_time.ToDatetime(dt.UTC)
    name = f"{prog.name}/members/{cid}"

    used = stub.RedeemPoints(
        pb.RedeemPointsRequest(member=name, points=70, reason="تخفیف فروشگاه", request_id="r1"), metadata=MARKETER
    )
    assert (used.kind, used.points, used.balance, used.actor) == ("redeemed", -70, 80, "mina")
    assert [(u.lot, u.points) for u in used.lots] == [(lot_b.name, 50), (lot_a.name, 20)]  # soonest-expiring first
    again = stub.RedeemPoints(
        pb.RedeemPointsRequest(member=name, points=70, reason="تخفیف فروشگاه", request_id="r1"), metadata=MARKETER
    )
    assert again.name == used.name and member(stub, prog, cid).balance == 80  # a retry moves nothing
    mug = stub.RedeemReward(pb.RedeemRewardRequest(member=name, reward="mug", request_id="r2"), metadata=MARKETER)
    assert (mug.points, mug.balance, mug.reference) == (-60, 20, "mug") and [u.points for u in mug.lots] == [60]
    err = rpc_error(
        stub.RedeemReward, pb.RedeemRewardRequest(member=name, reward="mug", request_id="r3"), metadata=MARKETER
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "out of stock" in err.details()
    err = rpc_error(
        stub.RedeemPoints,
        pb.RedeemPointsRequest(member=name, points=50, reason="x", request_id="r4"),
        metadata=MARKETER,
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "is 20 points" in err.details()
    assert read_rpc_error(err).metadata["balance"] == "20"
    err = rpc_error(
        stub.AdjustPoints, pb.AdjustPointsRequest(member=name, points=5, reason="x", request_id="r1"), metadata=ADMIN
    )
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS  # r1 was a redemption
    err = rpc_error(stub.RedeemPoints, pb.RedeemPointsRequest(member=name, points=0, request_id=""), metadata=MARKETER)
    assert fields(err) == {"points", "reason", "request_id"}
    err = rpc_error(
        stub.RedeemReward, pb.RedeemRewardRequest(member=name, reward="nope", request_id="r5"), metadata=MARKETER
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = rpc_error(
        stub.RedeemPoints,
        pb.RedeemPointsRequest(member=f"{prog.name}/members/{uuid.uuid4()}", points=1, reason="x", request_id="r6"),
        metadata=MARKETER,
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert [e.points for e in points_events(svc, "points.redeemed.v1", cid)] == [-70, -60]
    assert ledger_problems(svc) == []


# -- expiry ------------------------------------------------------------------------------------
def test_expiry_timer_expires_due_lots_and_a_taking_movement_expires_first(svc, stub, clock):
    prog = program(stub, "EUR", lifetime_unit=pb.LIFETIME_UNIT_DAYS, lifetime_count=30)
    cid = str(uuid.uuid4())
    old = paid("EUR", cid, [("products/a", "", 1, 30)], at=NOW - dt.timedelta(days=40))  # expired 10 days ago
    deliver(svc, old, paid("EUR", cid, [("products/b", "", 1, 20)], at=NOW - dt.timedelta(days=5)))
    name = f"{prog.name}/members/{cid}"
    lots = list(reversed(movements(stub, prog, cid)))
    mid = _member_id(svc, cid)
    with svc.ctx.engine.connect() as conn:  # one timer for the member, at its soonest lot
        keys = [mid, *(lot.name.rpartition("/")[2] for lot in lots)]
        n = conn.execute(
            sa.text("SELECT count(*) FROM timers WHERE kind = :k AND key = ANY(:keys)"),
            {"k": lo_mod.EXPIRE, "keys": keys},
        ).scalar_one()
        first = timers.get(conn, lo_mod.EXPIRE, mid)
    assert n == 1 and first.due_at == lots[0].expire_time.ToDatetime(dt.UTC)
    run_timers(svc, lambda: member(stub, prog, cid).expired == 30, "the old lot expired by its timer")
    got = member(stub, prog, cid)
    assert (got.balance, got.expired) == (20, 30)
    gone = movements(stub, prog, cid)[0]
    assert (gone.kind, gone.points, gone.balance) == ("expired", -30, 20)
    assert [(u.lot, u.points) for u in gone.lots] == [(lots[0].name, 30)]
    assert [e.points for e in points_events(svc, "points.expired.v1", cid)] == [-30]
    with svc.ctx.engine.connect() as conn:  # the member's timer now waits for the young lot's day
        young = timers.get(conn, lo_mod.EXPIRE, mid)
    assert young is not None and young.due_at == lots[1].expire_time.ToDatetime(dt.UTC)
    bal = stub.GetMemberBalance(pb.GetMemberBalanceRequest(name=f"{name}/balance"), metadata=ADMIN)
    assert (bal.balance, bal.next_expiring_points, bal.next_expire_time) == (20, 20, lots[1].expire_time)
    run_timers(svc, lambda: True, "another round")  # nothing more is due: nothing changes
    assert member(stub, prog, cid).balance == 20

    clock["now"] = NOW + dt.timedelta(days=26)  # past the young lot's expiry, its timer not yet fired
    err = rpc_error(
        stub.RedeemPoints, pb.RedeemPointsRequest(member=name, points=5, reason="x", request_id="e1"), metadata=ADMIN
    )
    assert (
        err.code() == grpc.StatusCode.FAILED_PRECONDITION and "is 0 points" in err.details()
    )  # expired ones are not spent
    assert ledger_problems(svc) == []


# -- reversal ----------------------------------------------------------------------------------
def test_credit_notes_reverse_in_proportion_and_record_what_was_already_spent(svc, stub):
    prog = program(stub, "AED", per=10, points=1)
    cid = str(uuid.uuid4())
    inv = paid("AED", cid, [("products/a", "", 1, 1000)])
    deliver(svc, inv)  # 100 points
    name = f"{prog.name}/members/{cid}"
    deliver(svc, credit("AED", cid, inv, 200))  # a fifth credited: 20 back
    assert member(stub, prog, cid).balance == 80
    stub.RedeemPoints(pb.RedeemPointsRequest(member=name, points=70, reason="هدیه", request_id="c1"), metadata=ADMIN)
    rest = credit("AED", cid, inv, 800, number="CN-1405-000002")
    deliver(svc, rest, rest)  # the rest (80 due), delivered twice; only 10 are left to take
    got = member(stub, prog, cid)
    assert (got.balance, got.earned, got.redeemed) == (0, 70, 70)
    back = [x for x in movements(stub, prog, cid) if x.kind == "reversed"]
    assert [(x.points, x.shortfall, x.credit_note) for x in back] == [
        (-10, 70, rest.subject),
        (-20, 0, back[1].credit_note),
    ]
    assert back[0].amount == money("AED", -800) and back[0].reference == inv.subject
    assert [e.points for e in points_events(svc, "points.reversed.v1", cid)] == [-20, -10]
    deliver(svc, credit("AED", cid, inv, 100, number="CN-1405-000003"))  # beyond the invoice: nothing more
    assert [x.kind for x in movements(stub, prog, cid)].count("reversed") == 3
    assert movements(stub, prog, cid)[0].points == 0
    assert len(points_events(svc, "points.reversed.v1", cid)) == 2  # a movement of nothing publishes nothing
    assert ledger_problems(svc) == []


# -- adjustments -------------------------------------------------------------------------------
def test_manual_adjustments_with_a_reason_and_the_permission(svc, stub):
    prog = program(stub, "GBP", lifetime_unit=pb.LIFETIME_UNIT_MONTHS, lifetime_count=6)
    cid = str(uuid.uuid4())
    m = stub.EnrollMember(pb.EnrollMemberRequest(parent=prog.name, customer=f"customers/{cid}"), metadata=MARKETER)
    assert (m.name, m.balance, m.enroll_source) == (f"{prog.name}/members/{cid}", 0, "explicit")
    err = rpc_error(
        stub.EnrollMember, pb.EnrollMemberRequest(parent=prog.name, customer=f"customers/{cid}"), metadata=MARKETER
    )
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    err = rpc_error(stub.EnrollMember, pb.EnrollMemberRequest(parent=prog.name, customer="bob"), metadata=MARKETER)
    assert fields(err) == {"customer"}
    add = stub.AdjustPoints(
        pb.AdjustPointsRequest(member=m.name, points=50, reason="جبران تأخیر ارسال", request_id="a1"), metadata=ADMIN
    )
    assert (add.kind, add.points, add.remaining, add.actor, add.reason) == (
        "adjusted",
        50,
        50,
        "ada",
        "جبران تأخیر ارسال",
    )
    assert add.HasField("expire_time")  # a positive adjustment is a lot with the programme's lifetime
    take = stub.AdjustPoints(
        pb.AdjustPointsRequest(member=m.name, points=-20, reason="اصلاح", request_id="a2"), metadata=ADMIN
    )
    assert (take.points, take.balance, [u.lot for u in take.lots]) == (-20, 30, [add.name])
    err = rpc_error(
        stub.AdjustPoints,
        pb.AdjustPointsRequest(member=m.name, points=-31, reason="x", request_id="a3"),
        metadata=ADMIN,
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "is 30 points" in err.details()
    err = rpc_error(
        stub.AdjustPoints,
        pb.AdjustPointsRequest(member=m.name, points=5, reason="x", request_id="a4"),
        metadata=MARKETER,
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED  # loyalty.adjust is not a marketer's
    err = rpc_error(
        stub.AdjustPoints, pb.AdjustPointsRequest(member=m.name, points=0, reason=" ", request_id="a5"), metadata=ADMIN
    )
    assert fields(err) == {"points", "reason"}
    err = rpc_error(
        stub.AdjustPoints,
        pb.AdjustPointsRequest(member="programs/x", points=1, reason="x", request_id="a6"),
        metadata=ADMIN,
    )
    assert fields(err) == {"member"}
    assert [(e.points, e.balance) for e in points_events(svc, "points.adjusted.v1", cid)] == [(50, 50), (-20, 30)]
    page = stub.ListPointMovements(pb.ListPointMovementsRequest(parent=m.name, page_size=1), metadata=ADMIN)
    assert [x.name for x in page.movements] == [take.name] and page.next_page_token
    err = rpc_error(
        stub.ListPointMovements, pb.ListPointMovementsRequest(parent=m.name, page_token="forged.x"), metadata=ADMIN
    )
    assert fields(err) == {"page_token"}
    assert ledger_problems(svc) == []


def test_the_balance_is_the_ledger_sum_and_the_commit_refuses_anything_else(svc, stub):
    assert ledger_problems(svc) == []
    with svc.ctx.engine.connect() as conn:
        count = conn.execute(sa.select(sa.func.count()).select_from(loyalty_members)).scalar_one()
        assert count >= 5
    with pytest.raises(sa.exc.IntegrityError) as err, svc.ctx.engine.begin() as conn:
        conn.execute(
            loyalty_members.update().where(loyalty_members.c.balance > 0).values(balance=loyalty_members.c.balance + 1)
        )
    assert "not the sum of its movements" in str(err.value)
    with pytest.raises(sa.exc.IntegrityError), svc.ctx.engine.begin() as conn:  # nor negative
        mid = conn.execute(sa.select(loyalty_members.c.id).limit(1)).scalar_one()
        conn.execute(loyalty_members.update().where(loyalty_members.c.id == mid).values(balance=-5))
    with pytest.raises(sa.exc.IntegrityError) as err, svc.ctx.engine.begin() as conn:  # nor a movement alone
        mem = conn.execute(sa.select(loyalty_members).limit(1)).one()
        conn.execute(
            loyalty_movements.insert().values(
                program_id=mem.program_id,
                member_id=mem.id,
                kind="adjust",
                points=7,
                balance=mem.balance + 7,
                remaining=7,
                qualify_time=NOW,
                occur_time=NOW,
            )
        )
    assert "not the sum of its movements" in str(err.value)
    with pytest.raises(sa.exc.IntegrityError) as err, svc.ctx.engine.begin() as conn:  # nor of another programme
        mem = conn.execute(sa.select(loyalty_members).limit(1)).one()
        other = conn.execute(
            sa.text(
                "INSERT INTO loyalty_programs (display_name, currency, earn_amount, earn_points) "
                "VALUES ('other', 'IRR', 10000, 1) RETURNING id"
            )
        ).scalar_one()
        conn.execute(loyalty_members.update().where(loyalty_members.c.id == mem.id).values(balance=mem.balance + 7))
        conn.execute(
            loyalty_movements.insert().values(
                program_id=other,
                member_id=mem.id,
                kind="adjust",
                points=7,
                balance=mem.balance + 7,
                remaining=7,
                qualify_time=NOW,
                occur_time=NOW,
            )
        )
    assert "loyalty_movements_member_fkey" in str(err.value)  # migration 0014: one key for both
    with svc.ctx.engine.connect() as conn:  # no movement was kept without its member's balance
        assert conn.execute(sa.select(sa.func.count()).where(loyalty_movements.c.balance < 0)).scalar_one() == 0
    assert ledger_problems(svc) == []


def test_the_ledger_check_runs_once_per_member_and_still_follows_every_change(svc, stub):
    """Migration 0013: a check is queued for a member only while none is pending for it in the
    transaction; it still runs after the member's last change, even when an earlier check ran
    in the transaction (SET CONSTRAINTS IMMEDIATE) or a savepoint dropped the pending one."""
    prog = program(stub, "DKK")
    cid = str(uuid.uuid4())
    deliver(svc, paid("DKK", cid, [("products/a", "", 1, 40)]))
    with svc.ctx.engine.connect() as conn:
        mem = conn.execute(sa.select(loyalty_members).where(loyalty_members.c.customer == cid)).one()
    assert (str(mem.program_id), mem.balance) == (prog.name.rpartition("/")[2], 40)

    def move(conn, points, balance):
        conn.execute(
            loyalty_movements.insert().values(
                program_id=mem.program_id, member_id=mem.id, kind="adjust", points=points, balance=balance,
                remaining=max(points, 0), qualify_time=NOW, occur_time=NOW,
            )
        )  # fmt: skip

    def set_balance(conn, balance):
        conn.execute(loyalty_members.update().where(loyalty_members.c.id == mem.id).values(balance=balance))

    # several movements and balance writes of one member in one transaction, right at the end: kept
    with svc.ctx.engine.begin() as conn:
        move(conn, 5, 45)
        set_balance(conn, 45)
        move(conn, 3, 48)
        set_balance(conn, 48)
    assert member(stub, prog, cid).balance == 48
    # the same, wrong by the last movement (only the first write queued a check): refused
    with pytest.raises(sa.exc.IntegrityError) as err, svc.ctx.engine.begin() as conn:
        move(conn, 2, 50)
        set_balance(conn, 50)
        move(conn, 1, 51)
    assert "not the sum of its movements" in str(err.value)
    # a check run in mid-transaction (IMMEDIATE), then a wrong change: checked again at commit
    with pytest.raises(sa.exc.IntegrityError) as err, svc.ctx.engine.begin() as conn:
        move(conn, 2, 50)
        set_balance(conn, 50)
        conn.execute(sa.text("SET CONSTRAINTS ALL IMMEDIATE"))  # runs the pending check: right so far
        conn.execute(sa.text("SET CONSTRAINTS ALL DEFERRED"))
        set_balance(conn, 51)
    assert "not the sum of its movements" in str(err.value)
    # a pending check dropped with its savepoint, then a wrong change: queued again, refused
    with pytest.raises(sa.exc.IntegrityError) as err, svc.ctx.engine.begin() as conn:
        savepoint = conn.begin_nested()
        move(conn, 2, 50)
        set_balance(conn, 50)
        savepoint.rollback()
        set_balance(conn, 49)
    assert "not the sum of its movements" in str(err.value)
    assert member(stub, prog, cid).balance == 48
    assert ledger_problems(svc) == []


def test_the_ledger_check_of_a_transaction_over_many_members_still_sees_each(svc, stub):
    """Past 885 pending members (the list's 32 KiB) every further row queues its own check:
    a wrong balance among the last ones is still refused, and a right bulk write commits."""
    prog = program(stub, "HUF")
    pid = prog.name.rpartition("/")[2]
    bulk = sa.text(
        """INSERT INTO loyalty_members (program_id, customer, enroll_source, enroll_time)
           SELECT CAST(:p AS uuid), :tag || i, 'explicit', now() FROM generate_series(1, 1000) AS i"""
    )
    tag = f"bulk-{uuid.uuid4().hex[:8]}-"
    with pytest.raises(sa.exc.IntegrityError) as err, svc.ctx.engine.begin() as conn:
        conn.execute(bulk, {"p": pid, "tag": tag})
        conn.execute(
            loyalty_members.update().where(loyalty_members.c.customer == f"{tag}999").values(balance=5)
        )  # the 999th member's row: written once more, its balance with no movement
    assert "not the sum of its movements" in str(err.value)
    with svc.ctx.engine.begin() as conn:
        conn.execute(bulk, {"p": pid, "tag": tag})
    with svc.ctx.engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).where(loyalty_members.c.customer.like(f"{tag}%"))).scalar_one()
    assert n == 1000 and ledger_problems(svc) == []


# -- tiers -------------------------------------------------------------------------------------
def test_tier_up_at_once_and_down_after_the_grace(svc, stub, clock):
    prog = program(
        stub,
        "JPY",
        tiers=[pb.Tier(key="silver", threshold_points=100), pb.Tier(key="gold", threshold_points=300, multiplier="2")],
        downgrade=pb.DOWNGRADE_GRACE,
        downgrade_grace_days=30,
    )
    cid = str(uuid.uuid4())
    deliver(svc, paid("JPY", cid, [("products/a", "", 1, 150)]))
    m = member(stub, prog, cid)
    assert (m.tier, m.next_tier, m.period_figure, m.to_next_tier) == ("silver", "gold", "150", "150")
    big = paid("JPY", cid, [("products/a", "", 1, 200)])
    deliver(svc, big)
    assert member(stub, prog, cid).tier == "gold"
    assert [(e.previous_tier, e.tier, e.direction, e.reason) for e in tier_events(svc, cid)] == [
        ("", "silver", "upgrade", "points"),
        ("silver", "gold", "upgrade", "points"),
    ]
    deliver(svc, paid("JPY", cid, [("products/a", "", 1, 10)]))  # gold earns double: 20
    assert member(stub, prog, cid).balance == 370
    deliver(svc, credit("JPY", cid, big, 200))  # figure 170: below gold, the grace starts
    m = member(stub, prog, cid)
    assert (m.tier, m.period_figure) == ("gold", "170")
    with svc.ctx.engine.connect() as conn:
        grace = timers.get(conn, lo_mod.GRACE, _member_id(svc, cid))
    assert grace is not None and grace.due_at > NOW + dt.timedelta(days=29)
    clock["now"] = NOW + dt.timedelta(days=31)
    with svc.ctx.engine.begin() as conn:
        timers.reschedule(conn, lo_mod.GRACE, _member_id(svc, cid), dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    run_timers(svc, lambda: member(stub, prog, cid).tier == "silver", "the downgrade after the grace")
    assert [(e.tier, e.direction, e.reason) for e in tier_events(svc, cid)][-1] == ("silver", "downgrade", "inactivity")


def _member_id(svc, cid) -> str:
    with svc.ctx.engine.connect() as conn:
        return str(conn.execute(sa.select(loyalty_members.c.id).where(loyalty_members.c.customer == cid)).scalar_one())


def test_jalali_year_tiers_count_from_nowruz_and_go_down_at_the_year_end(svc, stub, clock):
    prog = program(
        stub,
        "IRT",
        tiers=[pb.Tier(key="gold", display_name="طلایی", threshold_points=100)],
        tier_period=pb.TIER_PERIOD_JALALI_YEAR,
        downgrade=pb.DOWNGRADE_PERIOD_END,
    )
    cid = str(uuid.uuid4())
    esfand = dt.datetime(2026, 3, 19, 12, 0, tzinfo=TEHRAN)  # 28 Esfand 1404
    farvardin = dt.datetime(2026, 3, 22, 12, 0, tzinfo=TEHRAN)  # 2 Farvardin 1405: same Gregorian year
    clock["now"] = esfand
    deliver(svc, paid("IRT", cid, [("products/a", "", 1, 120)], at=esfand))
    m = member(stub, prog, cid)
    assert (m.tier, m.tier_display_name, m.period_figure) == ("gold", "طلایی", "120")  # up at once
    nowruz = dt.datetime(2026, 3, 21, tzinfo=TEHRAN)
    assert m.period_end_time.ToDatetime(dt.UTC) == nowruz
    clock["now"] = farvardin
    deliver(svc, paid("IRT", cid, [("products/a", "", 1, 50)], at=farvardin))
    m = member(stub, prog, cid)
    assert (m.tier, m.period_figure, m.to_next_tier) == ("gold", "50", "")  # 1405 counts only its own 50
    # The end of 1404 (due already): 1404's 120 keep gold, and the end of 1405 is armed.
    mid = _member_id(svc, cid)
    next_end = dt.datetime(2027, 3, 21, tzinfo=TEHRAN)

    def armed_for_1405():
        with svc.ctx.engine.connect() as conn:
            t = timers.get(conn, lo_mod.PERIOD_END, mid)
        return t is not None and t.due_at == next_end

    run_timers(svc, armed_for_1405, "the period-end timer fired for 1404 and armed for 1405")
    assert member(stub, prog, cid).tier == "gold"
    clock["now"] = dt.datetime(2027, 3, 22, 9, 0, tzinfo=TEHRAN)  # 1406 has begun
    with svc.ctx.engine.begin() as conn:
        timers.reschedule(conn, lo_mod.PERIOD_END, mid, dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    run_timers(svc, lambda: member(stub, prog, cid).tier == "", "the downgrade at the end of 1405")
    assert [(e.previous_tier, e.tier, e.direction, e.reason) for e in tier_events(svc, cid)] == [
        ("", "gold", "upgrade", "points"),
        ("gold", "", "downgrade", "period_end"),
    ]


# -- the real broker ---------------------------------------------------------------------------
def test_an_invoice_through_the_broker_earns_once_beside_the_audience(svc, stub, broker):
    """invoice.paid.v1 on the sales queue reaches both the audience and the loyalty handler
    (the parts' subscriptions merged); published twice, it earns once."""
    prog = program(stub, "CAD")
    cid = str(uuid.uuid4())
    e = paid("CAD", cid, [("products/a", "", 1, 42)])
    conn = pika.BlockingConnection(pika.URLParameters(broker.url))
    chan = conn.channel()
    for _ in range(2):
        chan.basic_publish(e.exchange, e.routing_key, e.data, e.amqp_properties())
    conn.close()
    wait_for(lambda: _balance(svc, cid) == 42, what="points earned from the broker's event")
    from campaign_svc.tables import audience_invoices

    with svc.ctx.engine.connect() as c:
        assert (
            c.execute(
                sa.select(audience_invoices.c.customer_id).where(audience_invoices.c.customer_id == cid)
            ).scalar_one()
            == cid
        )
    assert member(stub, prog, cid).balance == 42


def _balance(svc, cid):
    with svc.ctx.engine.connect() as conn:
        return conn.execute(sa.select(loyalty_members.c.balance).where(loyalty_members.c.customer == cid)).scalar()


# -- merges ------------------------------------------------------------------------------------
def test_a_customer_merge_joins_the_members_and_their_ledgers(svc, stub):
    from tests.support.customers import customer, merged_message

    prog = program(stub, "NOK", lifetime_unit=pb.LIFETIME_UNIT_DAYS, lifetime_count=100)
    a, b, c, d = (str(uuid.uuid4()) for _ in range(4))
    deliver(svc, paid("NOK", a, [("products/x", "", 1, 40)]), paid("NOK", b, [("products/x", "", 1, 25)]))
    stub.RedeemPoints(
        pb.RedeemPointsRequest(member=f"{prog.name}/members/{b}", points=5, reason="x", request_id="m1"), metadata=ADMIN
    )
    deliver(svc, paid("NOK", c, [("products/x", "", 1, 7)]))
    ma, mb, mc = _member_id(svc, a), _member_id(svc, b), _member_id(svc, c)
    deliver(svc, merged_message(customer(a, 3), [b]), merged_message(customer(d, 2), [c]))
    with svc.ctx.engine.connect() as conn:  # the merged member's expiry timer went with it
        assert timers.get(conn, lo_mod.EXPIRE, mb) is None
        soonest = min(x.expire_time.ToDatetime(dt.UTC) for x in movements(stub, prog, a) if x.HasField("expire_time"))
        assert timers.get(conn, lo_mod.EXPIRE, ma).due_at == soonest
        assert timers.get(conn, lo_mod.EXPIRE, mc) is not None  # c's member, now d's, keeps its own
    got = member(stub, prog, a)
    assert (got.balance, got.earned, got.redeemed) == (60, 65, 5)  # b's ledger is a's now
    assert sorted(x.points for x in movements(stub, prog, a)) == [-5, 25, 40]
    assert rpc_error(member, stub, prog, b).code() == grpc.StatusCode.NOT_FOUND
    assert member(stub, prog, d).balance == 7  # d was no member: c's member became d's
    assert rpc_error(member, stub, prog, c).code() == grpc.StatusCode.NOT_FOUND
    assert ledger_problems(svc) == []


def test_spend_tiers_over_the_gregorian_year_count_the_net_spend(svc, stub, clock):
    prog = program(
        stub,
        "INR",
        per=100,
        points=1,
        tiers=[pb.Tier(key="vip", threshold_spend=money("INR", "1000.50"))],
        tier_basis=pb.TIER_BASIS_SPEND,
        tier_period=pb.TIER_PERIOD_GREGORIAN_YEAR,
        downgrade=pb.DOWNGRADE_NONE,
    )
    assert prog.tiers[0].threshold_spend == money("INR", "1000.50")
    cid = str(uuid.uuid4())
    clock["now"] = dt.datetime(2026, 12, 30, tzinfo=TEHRAN)
    last_year = paid("INR", cid, [("products/x", "", 1, 900)], at=dt.datetime(2025, 12, 31, 20, tzinfo=TEHRAN))
    inv = paid("INR", cid, [("products/x", "", 1, 700)], at=dt.datetime(2026, 1, 1, 1, tzinfo=TEHRAN), tax=63)
    deliver(svc, last_year, inv)
    m = member(stub, prog, cid)
    assert (m.tier, m.period_figure, m.next_tier, m.to_next_tier) == ("", "700", "vip", "300.5")  # 2025 does not count
    deliver(svc, paid("INR", cid, [("products/x", "", 1, "300.50")], at=dt.datetime(2026, 6, 1, tzinfo=TEHRAN)))
    m = member(stub, prog, cid)
    assert (m.tier, m.period_figure) == ("vip", "1000.5")
    assert [(e.tier, e.reason) for e in tier_events(svc, cid)] == [("vip", "spend")]
    deliver(svc, credit("INR", cid, inv, 700))  # below again; downgrade none: kept
    assert member(stub, prog, cid).tier == "vip"
    err = rpc_error(
        stub.CreateProgram,
        pb.CreateProgramRequest(
            program=pb.Program(
                display_name="x",
                currency_code="INR",
                earn_amount=money("INR", 1),
                earn_points=1,
                tier_basis=pb.TIER_BASIS_SPEND,
                tiers=[pb.Tier(key="a", threshold_points=5)],
            )
        ),
        metadata=ADMIN,
    )
    assert fields(err) == {"program.tiers[0].threshold_spend"}


# -- the gateway -------------------------------------------------------------------------------
def test_the_gateway_serves_the_loyalty_routes(svc):
    """The annotated RPCs are HTTP routes of the gateway (JSON in and out, errors naming fields)."""
    from tests.support.harness import gateway_client, token

    http, clients = gateway_client(campaign=f"127.0.0.1:{svc.port}")
    try:
        auth = {"Authorization": f"Bearer {token('marketer', 'mina')}"}
        body = {
            "displayName": "باشگاه",
            "currencyCode": "SGD",
            "earnAmount": {"currencyCode": "SGD", "units": "10"},
            "earnPoints": "1",
        }
        made = http.post("/v1/programs", json=body, headers=auth)
        assert made.status_code == 201, made.get_data(as_text=True)
        name = made.get_json()["name"]
        cid = str(uuid.uuid4())
        joined = http.post(f"/v1/{name}/members", json={"customer": f"customers/{cid}"}, headers=auth)
        assert joined.status_code == 201 and joined.get_json()["enrollSource"] == "explicit"
        bal = http.get(f"/v1/{name}/members/{cid}/balance", headers=auth)
        assert bal.status_code == 200 and bal.get_json()["member"] == f"{name}/members/{cid}"
        short = http.post(
            f"/v1/{name}/members/{cid}:redeemPoints",
            json={"points": "5", "reason": "x", "requestId": "h1"},
            headers=auth,
        )
        assert short.status_code == 400 and "is 0 points" in short.get_data(as_text=True)  # FAILED_PRECONDITION
        bad = http.post("/v1/programs", json={"currencyCode": "SGD"}, headers=auth)
        assert bad.status_code == 400 and "program.display_name" in bad.get_data(as_text=True)
        denied = http.post(
            f"/v1/{name}/members/{cid}:adjustPoints",
            json={"points": "5", "reason": "x", "requestId": "h2"},
            headers=auth,
        )
        assert denied.status_code == 403
    finally:
        clients.close()


def test_a_rolling_window_is_reviewed_when_its_oldest_points_leave_it(svc, stub, clock):
    prog = program(
        stub,
        "TRY",
        tiers=[pb.Tier(key="silver", threshold_points=100)],
        tier_period=pb.TIER_PERIOD_ROLLING_DAYS,
        tier_period_days=30,
        downgrade=pb.DOWNGRADE_GRACE,
        downgrade_grace_days=10,
    )
    cid = str(uuid.uuid4())
    earned = NOW - dt.timedelta(days=25)
    clock["now"] = NOW
    deliver(svc, paid("TRY", cid, [("products/x", "", 1, 120)], at=earned))
    assert member(stub, prog, cid).tier == "silver"
    mid = _member_id(svc, cid)
    with svc.ctx.engine.connect() as conn:
        review = timers.get(conn, lo_mod.REVIEW, mid)
    assert review is not None and review.due_at > earned + dt.timedelta(days=30)  # when the 120 leave the window
    clock["now"] = NOW + dt.timedelta(days=6)  # they have left: the figure is 0 with no movement
    with svc.ctx.engine.begin() as conn:
        timers.reschedule(conn, lo_mod.REVIEW, mid, dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))

    def grace_started():
        with svc.ctx.engine.connect() as conn:
            return timers.get(conn, lo_mod.GRACE, mid)

    grace = run_timers(svc, grace_started, "the review starting the grace")
    assert grace.due_at == clock["now"] + dt.timedelta(days=10) and member(stub, prog, cid).tier == "silver"
    clock["now"] = NOW + dt.timedelta(days=17)
    with svc.ctx.engine.begin() as conn:
        timers.reschedule(conn, lo_mod.GRACE, mid, dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    run_timers(svc, lambda: member(stub, prog, cid).tier == "", "the downgrade after the grace")
    assert [(e.tier, e.direction, e.reason) for e in tier_events(svc, cid)] == [
        ("silver", "upgrade", "points"),
        ("", "downgrade", "inactivity"),
    ]


def test_a_batch_of_invoices_earns_as_the_events_one_by_one_would(svc, stub):
    """earn_batch (what a batch consumer would call; one event is a batch of one): members
    carried through their events in order (a tier reached mid-batch multiplies the next
    earning), a repeat within the batch skipped, every programme of the currency earning."""
    tiered = program(stub, "PLN", tiers=[pb.Tier(key="silver", threshold_points=50, multiplier="2")])
    plain = program(stub, "PLN")
    x, y = str(uuid.uuid4()), str(uuid.uuid4())
    e1 = paid("PLN", x, [("products/a", "", 1, 40)])
    e2 = paid("PLN", x, [("products/a", "", 1, 30)])
    e3 = paid("PLN", x, [("products/a", "", 1, 10)])
    ey = paid("PLN", y, [("products/a", "", 1, 5)])
    lo = lo_mod.engine(rt(svc))
    with svc.ctx.engine.begin() as conn:
        assert lo.earn_batch(conn, [e1, e2, republished(e2), ey, e3, e1]) == 8  # 4 invoices x 2 programmes
    got = member(stub, tiered, x)
    assert (got.balance, got.tier) == (40 + 30 + 20, "silver")  # e3 earned double: silver since e2
    assert [x_.points for x_ in movements(stub, tiered, x)] == [20, 30, 40]
    assert member(stub, plain, x).balance == 80 and member(stub, plain, y).balance == 5
    assert [(e.tier, e.direction) for e in tier_events(svc, x)] == [("silver", "upgrade")]
    assert sorted(e.points for e in points_events(svc, "points.earned.v1", x)) == [10, 20, 30, 30, 40, 40]
    with svc.ctx.engine.begin() as conn:  # the whole batch again: nothing
        assert lo.earn_batch(conn, [e1, e2, e3, ey]) == 0
    assert member(stub, tiered, x).balance == 90
    assert ledger_problems(svc) == []


def _earned_events_match_the_ledger(svc, cid) -> list[tuple[int, int]]:
    """Each points.earned.v1 of the customer against the movement its entry names: points,
    balance, amount and expiry as the ledger has them; returns (points, balance) per event."""
    out = []
    for e in points_events(svc, "points.earned.v1", cid):
        mid = int(e.entry.rpartition("/")[2])
        with svc.ctx.engine.connect() as conn:
            m = conn.execute(sa.select(loyalty_movements).where(loyalty_movements.c.id == mid)).one()
        assert (m.kind, m.points, m.balance, m.invoice_id) == ("earn", e.points, e.balance, e.reference.split("/")[1])
        assert Decimal(e.amount.units) + Decimal(e.amount.nanos) / 10**9 == m.amount
        assert e.expire_time.ToDatetime(dt.UTC) == m.expire_time and e.event_time.ToDatetime(dt.UTC) == m.occur_time
        out.append((e.points, e.balance))
    return out


def test_a_batch_with_an_earning_made_before_earns_the_rest_as_if_it_was_not_there(svc, stub):
    """The batch's one write finds the invoice earned already (re-published under a new event
    id) and writes nothing; the batch computed again without it: the balances, the figure and
    the tier reached mid-batch as if the repeat was not there, the expiry timer kept at the
    soonest lot, every event naming its own movement."""
    prog = program(
        stub,
        "CZK",
        tiers=[pb.Tier(key="silver", threshold_points=60, multiplier="2")],
        lifetime_unit=pb.LIFETIME_UNIT_DAYS,
        lifetime_count=30,
    )
    cid = str(uuid.uuid4())
    e1 = paid("CZK", cid, [("products/a", "", 1, "40.004")], at=NOW - dt.timedelta(days=2))
    e2 = paid("CZK", cid, [("products/a", "", 1, 30)], at=NOW - dt.timedelta(days=1))
    e3 = paid("CZK", cid, [("products/a", "", 1, 10)], at=NOW)
    lo = lo_mod.engine(rt(svc))
    with svc.ctx.engine.begin() as conn:
        assert lo.earn_batch(conn, [e1]) == 1
    with svc.ctx.engine.begin() as conn:
        assert lo.earn_batch(conn, [republished(e1), e2, e3]) == 2  # e3 doubled: silver since e2 (40 + 30)
    got = member(stub, prog, cid)
    assert (got.balance, got.earned, got.tier) == (90, 90, "silver")
    assert [(x.points, x.balance) for x in movements(stub, prog, cid)] == [(20, 90), (30, 70), (40, 40)]
    assert _earned_events_match_the_ledger(svc, cid) == [(40, 40), (30, 70), (20, 90)]
    assert [(e.tier, e.direction) for e in tier_events(svc, cid)] == [("silver", "upgrade")]
    with svc.ctx.engine.connect() as conn:
        timer = timers.get(conn, lo_mod.EXPIRE, _member_id(svc, cid))
    assert timer.due_at == NOW - dt.timedelta(days=2) + dt.timedelta(days=30)  # e1's lot, the soonest
    assert ledger_problems(svc) == []


def test_concurrent_batches_of_one_customer_earn_each_invoice_once(svc, stub):
    """Two consumers' batches at once for a customer not yet a member: the second waits for
    the first's new member, asks again for it (its snapshot does not have it), finds the
    invoice the first earned (re-published under a new id) and earns only its own."""
    import threading

    program(stub, "MXN", lifetime_unit=pb.LIFETIME_UNIT_MONTHS, lifetime_count=12)
    cid = str(uuid.uuid4())
    a = paid("MXN", cid, [("products/a", "", 1, 40)])
    b = paid("MXN", cid, [("products/a", "", 1, 7)], at=NOW + dt.timedelta(minutes=1))
    lo = lo_mod.engine(rt(svc))
    got: dict = {}

    def second():
        try:
            with svc.ctx.engine.begin() as conn:
                got["n"] = lo.earn_batch(conn, [republished(a), b])
        except Exception as exc:  # pragma: no cover - reported below
            got["error"] = exc

    with svc.ctx.engine.begin() as conn:
        assert lo.earn_batch(conn, [a]) == 1
        t = threading.Thread(target=second)
        t.start()
        t.join(0.5)
        assert t.is_alive(), "the second batch waits for the first's member"
    t.join(10)
    assert got == {"n": 1}
    with svc.ctx.engine.connect() as conn:
        rows = conn.execute(
            sa.select(loyalty_movements.c.points, loyalty_movements.c.balance)
            .join(loyalty_members, loyalty_members.c.id == loyalty_movements.c.member_id)
            .where(loyalty_members.c.customer == cid)
            .order_by(loyalty_movements.c.id)
        ).all()
    assert [tuple(r) for r in rows] == [(40, 40), (7, 47)]
    assert ledger_problems(svc) == []


def test_concurrent_batches_over_the_same_members_in_any_order_do_not_deadlock(svc, stub):
    """Batches of two consumers with the same members in different orders lock them in one key
    order: none waits for the other in a cycle (a deadlock would fail a batch), and every
    member's balance is the sum of its movements."""
    import random
    import threading

    prog = program(stub, "RON", tiers=[pb.Tier(key="silver", threshold_points=100)])
    customers = [str(uuid.uuid4()) for _ in range(30)]
    lo = lo_mod.engine(rt(svc))
    errors: list = []
    start = threading.Barrier(2)

    def consumer(seed: int):
        rnd = random.Random(seed)
        for _ in range(6):
            batch = [paid("RON", c, [("products/a", "", 1, rnd.randint(1, 20))]) for c in customers]
            rnd.shuffle(batch)
            start.wait(5)
            try:
                with svc.ctx.engine.begin() as conn:
                    lo.earn_batch(conn, batch)
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=consumer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with svc.ctx.engine.connect() as conn:
        n = conn.execute(
            sa.select(sa.func.count()).select_from(loyalty_movements).where(loyalty_movements.c.program_id == _id(prog))
        ).scalar_one()
    assert n == 2 * 6 * len(customers)
    assert ledger_problems(svc) == []


def _id(prog) -> str:
    return prog.name.rpartition("/")[2]


def test_an_earning_moves_the_expiry_timer_only_sooner_and_replaces_a_failed_one(svc, stub):
    """earn_batch's write arms each member's one expiry timer at its soonest new lot as
    timers.schedule_many(keep_earlier=True) would: a later lot leaves a scheduled timer as it
    is, a sooner one moves it, and a failed timer is replaced (scheduled again, attempts and
    error cleared) even by a later lot."""
    program(stub, "KRW", lifetime_unit=pb.LIFETIME_UNIT_DAYS, lifetime_count=10)
    cid = str(uuid.uuid4())
    lo = lo_mod.engine(rt(svc))

    def earn(at):
        with svc.ctx.engine.begin() as conn:
            assert lo.earn_batch(conn, [paid("KRW", cid, [("products/a", "", 1, 5)], at=at)]) == 1

    def timer():
        with svc.ctx.engine.connect() as conn:
            return timers.get(conn, lo_mod.EXPIRE, _member_id(svc, cid))

    earn(NOW)
    assert (timer().due_at, timer().state) == (NOW + dt.timedelta(days=10), "scheduled")
    earn(NOW + dt.timedelta(days=1))  # a later lot: the timer stays
    assert timer().due_at == NOW + dt.timedelta(days=10)
    earn(NOW - dt.timedelta(days=2))  # a sooner one: it moves
    assert timer().due_at == NOW + dt.timedelta(days=8)
    with svc.ctx.engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE timers SET state = 'failed', attempts = 20, last_error = 'boom' WHERE kind = :k AND key = :m"
            ),
            {"k": lo_mod.EXPIRE, "m": _member_id(svc, cid)},
        )
    earn(NOW + dt.timedelta(days=3))  # a later lot, but the timer had failed: replaced
    t = timer()
    assert (t.due_at, t.state, t.attempts, t.last_error) == (NOW + dt.timedelta(days=13), "scheduled", 0, None)
    assert ledger_problems(svc) == []
