"""GetPipelineBoard: the open opportunities of a pipeline by stage, in one SQL statement:

    SELECT stage, totals, cards FROM stages (the pipeline's open ones, in order)
      LEFT JOIN LATERAL (count, sum(amount), rotting count of the stage's open opportunities in
                         the caller's scope and filters, GROUP BY currency, probability) AS totals
      LEFT JOIN LATERAL (the stage's N largest of them) AS card
      LEFT JOIN opportunities (the N cards' names and close dates, by primary key)

Both laterals read the partial index opportunities_board_cards (pipeline, stage, amount desc,
id desc, covering owner, team, product line, currency, probability and stage entry time;
migration 0006) alone — an index-only scan of the stage's range, the scope and filters checked
in the index — the cards in index order, stopping after N. The weighted sum is
sum(amount) × probability per (currency, probability) group, summed here (a handful of groups,
not a multiplication per row), rounded once to the currency's minor unit.
"""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal

import sqlalchemy as sa

from crm.sales.v1 import opportunities_pb2 as pb
from crm_chassis.auth import Principal
from crm_chassis.errors import InvalidArgument
from crm_chassis.uow import UnitOfWork

from .access import Scope
from .money import round_minor, to_money
from .opportunities_core import PIPELINE, PRODUCT, PRODUCT_LINE, STAGE, TEAM, to_date
from .tables import opportunities, opportunity_lines, pipelines, stages

o = opportunities
DEFAULT_CARDS, MAX_CARDS = 10, 100
HUNDRED = Decimal(100)


def _rotting(stage) -> sa.ColumnElement[bool]:
    """Entered the stage before its rotting limit (stage.rot_before: computed once per stage)."""
    return sa.func.coalesce(o.c.stage_enter_time < stage.c.rot_before, sa.false())


def board_query(
    pipeline_id: str, scope: Scope, *, owner="", team_id=None, product_line_id=None, product_id=None, cards=10
):
    cond = [
        o.c.pipeline_id == pipeline_id,
        o.c.state == "open",
        o.c.delete_time.is_(None),
        scope.visible(o.c.owner_id, o.c.team_id),
    ]
    if owner:
        cond.append(o.c.owner_id == owner)
    if team_id:
        cond.append(o.c.team_id == team_id)
    if product_line_id:
        cond.append(o.c.product_line_id == product_line_id)
    if product_id:
        cond.append(
            o.c.id.in_(
                sa.select(opportunity_lines.c.opportunity_id).where(opportunity_lines.c.product_id == product_id)
            )
        )
    # The pipeline's open stages, each with the entry time before which an opportunity rots.
    s = (
        sa.select(
            stages.c.id,
            stages.c.name,
            stages.c.probability,
            stages.c.position,
            (sa.func.now() - sa.literal_column("interval '1 day'") * stages.c.rotting_days).label("rot_before"),
        )
        .where(stages.c.pipeline_id == pipeline_id, stages.c.kind == "open")
        .subquery("s")
    )
    # Per stage: count, sum and rotting count per (currency, probability) — few groups, so the
    # weighted sum (sum × probability) is made from them, not a multiplication per row.
    grouped = (
        sa.select(
            o.c.currency_code.label("currency"),
            o.c.probability.label("probability"),
            sa.func.count().label("n"),
            sa.func.sum(o.c.amount).label("total"),
            sa.func.count().filter(_rotting(s)).label("rotting"),
        )
        .where(*cond, o.c.stage_id == s.c.id)
        .group_by(o.c.currency_code, o.c.probability)
        .correlate(s)
        .subquery("g")
    )
    totals = (
        sa.select(
            sa.func.json_agg(
                sa.func.json_build_object(
                    "currency",
                    grouped.c.currency,
                    "probability",
                    grouped.c.probability.cast(sa.Text),
                    "n",
                    grouped.c.n,
                    "total",
                    grouped.c.total.cast(sa.Text),
                    "rotting",
                    grouped.c.rotting,
                )
            ).label("totals")
        )
        .select_from(grouped)
        .lateral("t")
    )
    # The cards: the stage's N largest, read from the index alone (every column here is in
    # opportunities_board_cards, so the scope and filters are checked without visiting the
    # table), then the N rows' names and dates by primary key.
    top = (
        sa.select(
            o.c.id.label("card_id"),
            o.c.amount.label("card_amount"),
            o.c.currency_code.label("card_currency"),
            o.c.owner_id.label("card_owner"),
            o.c.probability.label("card_probability"),
            _rotting(s).label("card_rotting"),
        )
        .where(*cond, o.c.stage_id == s.c.id)
        .order_by(o.c.amount.desc(), o.c.id.desc())
        .limit(cards)
        .lateral("card")
    )
    named = o.alias("named")
    return (
        sa.select(
            s.c.id,
            s.c.name,
            s.c.probability,
            totals.c.totals,
            top,
            named.c.name.label("card_name"),
            named.c.expected_close_date.label("card_close_date"),
        )
        .select_from(
            s.outerjoin(totals, sa.true()).outerjoin(top, sa.true()).outerjoin(named, named.c.id == top.c.card_id)
        )
        .order_by(s.c.position, top.c.card_amount.desc(), top.c.card_id.desc())
    )


def _ref(value: str, pattern, field: str):
    return pattern.parse(value, field).id if value else None


def board(uow: UnitOfWork, req: pb.GetPipelineBoardRequest, principal: Principal) -> pb.PipelineBoard:
    pipeline_id = PIPELINE.parse(req.pipeline, "pipeline").id
    team_id = _ref(req.team, TEAM, "team")
    product_line_id = _ref(req.product_line, PRODUCT_LINE, "product_line")
    product_id = _ref(req.product, PRODUCT, "product")
    if req.card_limit < 0:
        raise InvalidArgument.field("card_limit", "must not be negative")
    cards = min(req.card_limit or DEFAULT_CARDS, MAX_CARDS)
    stmt = board_query(
        pipeline_id,
        Scope.of(principal),
        owner=req.owner.strip(),
        team_id=team_id,
        product_line_id=product_line_id,
        product_id=product_id,
        cards=cards,
    )
    with uow.read() as conn:
        rows = conn.execute(stmt).all()
        if not rows and conn.execute(sa.select(pipelines.c.id).where(pipelines.c.id == pipeline_id)).first() is None:
            raise PIPELINE.not_found(req.pipeline)
    out = pb.PipelineBoard(pipeline=req.pipeline)
    grand = {"n": 0, "total": defaultdict(Decimal), "weighted": defaultdict(Decimal)}
    columns: dict[str, pb.PipelineBoardStage] = {}
    for r in rows:
        sid = str(r.id)
        col = columns.get(sid)
        if col is None:
            col = out.stages.add(
                stage=STAGE.format(pipeline_id, sid), display_name=r.name, probability=float(r.probability)
            )
            columns[sid] = col
            amounts: dict[str, Decimal] = defaultdict(Decimal)
            weighted: dict[str, Decimal] = defaultdict(Decimal)
            for t in r.totals or []:
                cur, total = t["currency"], Decimal(t["total"])
                col.count += t["n"]
                col.rotting_count += t["rotting"]
                amounts[cur] += total
                weighted[cur] += total * Decimal(t["probability"]) / HUNDRED
            for cur in sorted(amounts):
                col.amounts.append(to_money(round_minor(amounts[cur], cur), cur))
                col.weighted_amounts.append(to_money(round_minor(weighted[cur], cur), cur))
                grand["total"][cur] += amounts[cur]
                grand["weighted"][cur] += weighted[cur]
            grand["n"] += col.count
        if r.card_id is not None:
            c = col.cards.add(
                opportunity=f"opportunities/{r.card_id}",
                display_name=r.card_name,
                amount=to_money(r.card_amount, r.card_currency),
                owner=r.card_owner,
                rotting=bool(r.card_rotting),
                probability=float(r.card_probability),
            )
            if r.card_close_date is not None:
                c.expected_close_date.CopyFrom(to_date(r.card_close_date))
    out.total_count = grand["n"]
    for cur in sorted(grand["total"]):
        out.total_amounts.append(to_money(round_minor(grand["total"][cur], cur), cur))
        out.total_weighted_amounts.append(to_money(round_minor(grand["weighted"][cur], cur), cur))
    return out
