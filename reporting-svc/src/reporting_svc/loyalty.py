"""Report 5, loyalty (campaign-svc's points ledger and tier changes): points earned, redeemed,
expired, adjusted and reversed per period and programme; the outstanding points (the
programme's liability: every movement up to the end of the range, signed); members per tier.

- A ledger movement (points.*.v1) is one fact keyed by its entry, counted on its Tehran day
  under its kind with its signed points (positive in, negative out). A movement is final: a
  redelivery or replay changes nothing.
- A member's tier is the newest tier.changed.v1 of its account (by event time); it counts
  once in tier_counts under its programme and tier, and moves when the tier changes.

The GetLoyaltyReport query reads the rollups only.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from crm.campaign.v1 import campaign_events_pb2 as cev
from crm.reporting.v1 import reporting_service_pb2 as pb
from crm_chassis.messaging.consumer import Requires
from crm_chassis.messaging.envelope import Event

from . import periods
from .projection import Facts, Projection, Rollup, per_event, tehran_day
from .tables import LOYALTY_MEASURES, loyalty_daily, points_facts, tier_counts, tier_facts

POINTS_KEYS = [f"points.{k}.v1" for k in LOYALTY_MEASURES]
ROLLUP = Rollup(loyalty_daily, ("day", "programme"), LOYALTY_MEASURES)
TIERS_ROLLUP = Rollup(tier_counts, ("programme", "tier"), ("accounts",))


def _m(f):
    return f._mapping if hasattr(f, "_mapping") else f


def _points_contrib(f) -> list:
    m = _m(f)
    if m["kind"] not in LOYALTY_MEASURES:
        return []
    return [({"day": tehran_day(m["version"]), "programme": m["programme"]}, {m["kind"]: m["points"]})]


def _when(msg, event: Event) -> dt.datetime:
    return msg.event_time.ToDatetime(tzinfo=dt.UTC) if msg.HasField("event_time") else event.time


def fact_points(event: Event):
    p = event.parse(cev.PointsEvent)
    kind = p.kind or event.routing_key.split(".")[1]
    values = {"version": _when(p, event), "programme": p.programme, "kind": kind, "points": p.points}
    return POINTS, {"entry_id": p.entry}, values


def _tier_contrib(f) -> list:
    m = _m(f)
    return [({"programme": m["programme"], "tier": m["tier"]}, {"accounts": 1})]


def fact_tier(event: Event):
    t = event.parse(cev.TierEvent)
    values = {"version": _when(t, event), "programme": t.programme, "tier": t.tier}
    return TIERS, {"account_id": t.account}, values


POINTS = Facts(points_facts, ROLLUP, _points_contrib)
TIERS = Facts(tier_facts, TIERS_ROLLUP, _tier_contrib)

PROJECTION = Projection(
    name="loyalty",
    domain="campaign",
    handlers={**dict.fromkeys(POINTS_KEYS, per_event(fact_points)), "tier.changed.v1": per_event(fact_tier)},
    requires={
        **dict.fromkeys(POINTS_KEYS, Requires(cev.PointsEvent, ("entry", "programme"))),
        "tier.changed.v1": Requires(cev.TierEvent, ("account", "programme", "tier")),
    },
    tables=[points_facts, loyalty_daily, tier_facts, tier_counts],
)


def subscriptions(rt=None):
    return [PROJECTION.subscription()]


# -- the report --------------------------------------------------------------------------------
def parse(req: pb.GetLoyaltyReportRequest) -> dict:
    q = periods.parse_request(req)
    return {**q, "programmes": sorted({p.strip() for p in req.programmes if p.strip()})}


def report(conn: sa.Connection, q: dict) -> pb.GetLoyaltyReportResponse:
    t = loyalty_daily
    where = [t.c.programme.in_(q["programmes"])] if q["programmes"] else []
    in_range = [*where, *periods.in_range(t.c.day, q)]
    key = periods.key_expr(t.c.day, q["period"], q["calendar"]).label("period_key")
    sums = [sa.cast(sa.func.sum(t.c[m]), sa.BigInteger).label(m) for m in LOYALTY_MEASURES]
    nonzero = sa.or_(*(sa.func.sum(t.c[m]) != 0 for m in LOYALTY_MEASURES))
    rows_q = (
        sa.select(key, t.c.programme, *sums)
        .where(*in_range)
        .group_by(key, t.c.programme)
        .having(nonzero)
        .order_by(key, t.c.programme)
    )
    out = pb.GetLoyaltyReportResponse()
    for r in conn.execute(rows_q):
        m = r._mapping
        out.rows.add(
            period_key=r.period_key,
            period_label=periods.label(r.period_key, q["period"], q["calendar"], q["lang"]),
            programme=r.programme,
            **{k: m[k] for k in LOYALTY_MEASURES},
            net=sum(m[k] for k in LOYALTY_MEASURES),
        )
    # the liability: every movement up to the end of the range, whatever its start
    upto = [*where, t.c.day <= q["end"]] if q["end"] else where
    total = sum(t.c[m] for m in LOYALTY_MEASURES)
    bal_q = sa.select(t.c.programme, sa.cast(sa.func.sum(total), sa.BigInteger).label("points"))
    for r in conn.execute(bal_q.where(*upto).group_by(t.c.programme).order_by(t.c.programme)):
        out.outstanding.add(programme=r.programme, outstanding_points=r.points)
    c = tier_counts
    tiers_q = sa.select(c.c.programme, c.c.tier, c.c.accounts).where(c.c.accounts != 0)
    if q["programmes"]:
        tiers_q = tiers_q.where(c.c.programme.in_(q["programmes"]))
    for r in conn.execute(tiers_q.order_by(c.c.programme, c.c.accounts.desc(), c.c.tier)):
        out.tiers.add(programme=r.programme, tier=r.tier, accounts=r.accounts)
    return out
