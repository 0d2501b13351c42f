"""GetPipelineBoard: the open opportunities of a pipeline by stage, in one SQL statement.

    WITH agg AS (count, sum(amount), sum(amount × probability), rotting count of the open
                 opportunities in the caller's scope, GROUP BY stage, currency),
         totals AS (agg as one JSON array per stage)
    SELECT stage, totals, card FROM stages
      LEFT JOIN totals
      LEFT JOIN LATERAL (the stage's N largest open opportunities in scope) AS card

Both the aggregate and the cards read the partial index opportunities_board_cards (pipeline,
stage, amount desc, id desc, covering owner, team, product line, currency, probability and
stage entry time; migration 0006): the aggregate without touching the table when the
visibility map allows, the cards in index order, stopping after N.
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


def _rotting(stage_table) -> sa.ColumnElement[bool]:
    return sa.func.coalesce(
        o.c.stage_enter_time < sa.func.now() - sa.literal_column("interval '1 day'") * stage_table.c.rotting_days,
        sa.false(),
    )


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
    st = stages.alias("st")
    agg = (
        sa.select(
            o.c.stage_id,
            o.c.currency_code,
            sa.func.count().label("n"),
            sa.func.sum(o.c.amount).label("total"),
            sa.func.sum(o.c.amount * o.c.probability).label("weighted"),
            sa.func.count().filter(_rotting(st)).label("rotting"),
        )
        .select_from(o.join(st, st.c.id == o.c.stage_id))
        .where(*cond)
        .group_by(o.c.stage_id, o.c.currency_code)
        .cte("agg")
    )
    totals = (
        sa.select(
            agg.c.stage_id,
            sa.func.json_agg(
                sa.func.json_build_object(
                    "currency",
                    agg.c.currency_code,
                    "n",
                    agg.c.n,
                    "total",
                    agg.c.total.cast(sa.Text),
                    "weighted",
                    agg.c.weighted.cast(sa.Text),
                    "rotting",
                    agg.c.rotting,
                )
            ).label("totals"),
        )
        .group_by(agg.c.stage_id)
        .cte("totals")
    )
    s = stages
    card = (
        sa.select(
            o.c.id.label("card_id"),
            o.c.name.label("card_name"),
            o.c.amount.label("card_amount"),
            o.c.currency_code.label("card_currency"),
            o.c.owner_id.label("card_owner"),
            o.c.probability.label("card_probability"),
            o.c.expected_close_date.label("card_close_date"),
            _rotting(s).label("card_rotting"),
        )
        .where(*cond, o.c.stage_id == s.c.id)
        .order_by(o.c.amount.desc(), o.c.id.desc())
        .limit(cards)
        .lateral("card")
    )
    return (
        sa.select(s.c.id, s.c.name, s.c.probability, totals.c.totals, card)
        .select_from(s.outerjoin(totals, totals.c.stage_id == s.c.id).outerjoin(card, sa.true()))
        .where(s.c.pipeline_id == pipeline_id, s.c.kind == "open")
        .order_by(s.c.position, card.c.card_amount.desc(), card.c.card_id.desc())
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
            for t in sorted(r.totals or [], key=lambda t: t["currency"]):
                cur, total, weighted = t["currency"], Decimal(t["total"]), Decimal(t["weighted"]) / HUNDRED
                col.count += t["n"]
                col.rotting_count += t["rotting"]
                col.amounts.append(to_money(round_minor(total, cur), cur))
                col.weighted_amounts.append(to_money(round_minor(weighted, cur), cur))
                grand["n"] += t["n"]
                grand["total"][cur] += total
                grand["weighted"][cur] += weighted
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
