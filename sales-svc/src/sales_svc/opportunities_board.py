"""GetPipelineBoard: the open opportunities of a pipeline by stage, in one SQL statement (one
snapshot), one row per card:

    SELECT stage, totals, rotting, cards FROM stages (the pipeline's open ones, in order)
      LEFT JOIN LATERAL (count, Σ amount, Σ weighted per currency of the stage's open
                         opportunities in the caller's scope and filters) AS totals
      LEFT JOIN LATERAL (the visible owners of the stage, and its count for everyone) AS keys
      LEFT JOIN LATERAL (how many of them are not rotting yet) AS fresh
      LEFT JOIN LATERAL (the stage's N largest of them) AS card
      LEFT JOIN opportunities (the N cards' names and close dates, by primary key)

Without a product filter the totals and keys come from opportunity_board_rollup (migration
0012: counts and exact sums per pipeline, stage, owner, team, product line and currency, kept
by a trigger), a stage's few rows of it filtered by the same scope (Scope.visible on its owner
and team columns) and filters. Rotting = count − those entered at or after the stage's rotting
limit, counted owner by owner (the visible owners) in the partial index
opportunities_board_owner (pipeline, stage, owner, stage entry time, covering the rest) alone.
The cards: if the caller sees much of the stage, opportunities_board_cards (pipeline, stage,
amount desc, id desc, covering the scope's and filters' columns; migration 0011) in index
order, stopping after N; else the visible owners' entries of opportunities_board_owner, top N.
A stage the caller sees nothing of reads no opportunity; otherwise only the caller's
not-yet-rotting ones are read one by one (and, for a narrow scope, the caller's ones).

A product filter ("has a line of this product") is not in the rollup: then the totals are the
aggregate of the stage's range of opportunities_board_cards (GROUP BY currency, probability,
the weighted sum made from those few groups), rotting counted in the same pass, the cards in
that index's order.

The statement is built once per shape (scope reach, which filters) with bound parameters.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from decimal import Decimal, localcontext

import sqlalchemy as sa

from crm.sales.v1 import opportunities_pb2 as pb
from crm_chassis.auth import Principal
from crm_chassis.errors import InvalidArgument
from crm_chassis.money import round_minor, to_money
from crm_chassis.uow import UnitOfWork

from .access import Reach, Scope
from .opportunities_core import PIPELINE, PRODUCT, PRODUCT_LINE, STAGE, TEAM, to_date
from .tables import UUID, opportunities, opportunity_board_rollup, opportunity_lines, pipelines, stages

o = opportunities
ru = opportunity_board_rollup
DEFAULT_CARDS, MAX_CARDS = 10, 100
ONE_PERCENT = sa.literal_column("0.01")  # × 0.01 is exact in numeric (÷ 100 may round)


def _rotting(stage) -> sa.ColumnElement[bool]:
    """Entered the stage before its rotting limit (stage.rot_before: computed once per stage)."""
    return sa.func.coalesce(o.c.stage_enter_time < stage.c.rot_before, sa.false())


def _given(value) -> bool:
    """A filter value given (a bound parameter counts: the statement is built once per shape)."""
    return isinstance(value, sa.BindParameter) or bool(value)


def _filters(scope: Scope, owner_id, team_id, product_line_id, table) -> list[sa.ColumnElement[bool]]:
    """The scope and the owner / team / product line filters, on opportunities or the rollup."""
    cond = [scope.visible(table.c.owner_id, table.c.team_id)]
    if _given(owner_id):
        cond.append(table.c.owner_id == owner_id)
    if _given(team_id):
        cond.append(table.c.team_id == team_id)
    if _given(product_line_id):
        cond.append(table.c.product_line_id == product_line_id)
    return cond


def _totals_json(per_currency) -> sa.ColumnElement:
    return sa.func.json_agg(
        sa.func.json_build_object(
            "currency",
            per_currency.c.currency,
            "n",
            per_currency.c.n,
            "total",
            per_currency.c.total.cast(sa.Text),
            "weighted",
            per_currency.c.weighted.cast(sa.Text),
        )
    )


def board_query(
    pipeline_id: str, scope: Scope, *, owner="", team_id=None, product_line_id=None, product_id=None, cards=10
):
    """The board's statement: one row per (stage, card), a stage without cards once; columns id,
    name, probability, totals (JSON [{currency, n, total, weighted}]), rotting, the card's."""
    cond = [
        o.c.pipeline_id == pipeline_id,
        o.c.state == "open",
        o.c.delete_time.is_(None),
        *_filters(scope, owner, team_id, product_line_id, o),
    ]
    if _given(product_id):
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
    if _given(product_id):
        totals, rotting, extra = _scanned_totals(s, cond)
        top = _largest(s, cond, cards).lateral("card")
    else:
        totals, rotting, extra, top = _rolled_up(s, cond, pipeline_id, scope, owner, team_id, product_line_id, cards)
    named = o.alias("named")
    source = s.outerjoin(totals, sa.true())
    for lateral in extra:
        source = source.outerjoin(lateral, sa.true())
    return (
        sa.select(
            s.c.id,
            s.c.name,
            s.c.probability,
            totals.c.totals,
            rotting.label("rotting"),
            top,
            named.c.name.label("card_name"),
            named.c.expected_close_date.label("card_close_date"),
        )
        .select_from(source.outerjoin(top, sa.true()).outerjoin(named, named.c.id == top.c.card_id))
        .order_by(s.c.position, top.c.card_amount.desc(), top.c.card_id.desc())
    )


def _card_columns(s, amount=o.c.amount):
    return (
        o.c.id.label("card_id"),
        amount.label("card_amount"),
        o.c.currency_code.label("card_currency"),
        o.c.owner_id.label("card_owner"),
        o.c.probability.label("card_probability"),
        _rotting(s).label("card_rotting"),
    )


def _largest(s, cond, cards, *gate) -> sa.Select:
    """The stage's N largest in the order of opportunities_board_cards, stopping after N: every
    column here is in that index, so the scope and filters are checked without visiting the
    table (then the N rows' names and dates by primary key)."""
    return (
        sa.select(*_card_columns(s))
        .where(*cond, o.c.stage_id == s.c.id, *gate)
        .order_by(o.c.amount.desc(), o.c.id.desc())
        .limit(cards)
    )


def _rolled_up(s, cond, pipeline_id, scope, owner, team_id, product_line_id, cards):
    """Counts and sums from the stage's rows of the rollup; rotting = count − not rotting yet,
    counted owner by owner (the visible owners of the stage, from the rollup) in
    opportunities_board_owner; the cards from opportunities_board_cards in order when the
    caller sees much of the stage, else from the visible owners' entries of
    opportunities_board_owner; nothing read at all for a stage where the caller sees nothing."""
    mine = _filters(scope, owner, team_id, product_line_id, ru)
    here = [ru.c.pipeline_id == pipeline_id, ru.c.stage_id == s.c.id]
    per_currency = (
        sa.select(
            ru.c.currency_code.label("currency"),
            sa.func.sum(ru.c.open_count).cast(sa.BigInteger).label("n"),
            sa.func.sum(ru.c.amount).label("total"),
            sa.func.sum(ru.c.weighted_amount).label("weighted"),
        )
        .where(*here, *mine)
        .group_by(ru.c.currency_code)
        .having(sa.func.sum(ru.c.open_count) > 0)  # keys whose count went back to 0 stay in the table
        .correlate(s)
        .subquery("c")
    )
    totals = (
        sa.select(
            _totals_json(per_currency).label("totals"), sa.func.sum(per_currency.c.n).cast(sa.BigInteger).label("n")
        )
        .select_from(per_currency)
        .lateral("t")
    )
    keys = sa.select(
        sa.select(sa.func.array_agg(sa.distinct(ru.c.owner_id)))
        .where(*here, *mine, ru.c.open_count > 0)
        .correlate(s)
        .scalar_subquery()
        .label("owners"),
        sa.select(sa.func.sum(ru.c.open_count)).where(*here).correlate(s).scalar_subquery().label("all_n"),
    ).lateral("k")
    visible_owner = o.c.owner_id == sa.func.any(keys.c.owners)
    # Not rotting yet: entered the stage at or after its limit (a stage without rotting days,
    # or where the caller sees nothing, is not read at all).
    fresh = (
        sa.select(sa.func.count().label("n"))
        .where(
            s.c.rot_before.is_not(None),
            keys.c.owners.is_not(None),
            *cond,
            o.c.stage_id == s.c.id,
            visible_owner,
            o.c.stage_enter_time >= s.c.rot_before,
        )
        .lateral("f")
    )
    rotting = sa.case(
        (s.c.rot_before.is_(None), 0),
        else_=sa.func.coalesce(totals.c.n, 0) - sa.func.coalesce(fresh.c.n, 0),
    )
    # Reading the cards index in order finds N visible ones after about N × all / visible
    # entries; the visible owners' entries are `visible`: whichever is fewer.
    dense = totals.c.n * totals.c.n >= cards * keys.c.all_n
    in_order = _largest(s, cond, cards, dense).correlate(s, totals, keys).subquery("in_order")
    by_owner = (  # (amount + 0: sorted, not read in the cards index's order)
        sa.select(*_card_columns(s, amount=o.c.amount + sa.literal_column("0")))
        .where(*cond, o.c.stage_id == s.c.id, sa.not_(dense), visible_owner)
        .order_by((o.c.amount + sa.literal_column("0")).desc(), o.c.id.desc())
        .limit(cards)
        .correlate(s, totals, keys)
        .subquery("by_owner")
    )
    top = sa.union_all(sa.select(in_order), sa.select(by_owner)).lateral("card")
    return totals, rotting, [keys, fresh], top


def _scanned_totals(s, cond):
    """Counts, sums and rotting from the stage's open opportunities themselves (product filter):
    GROUP BY currency, probability (few groups), the weighted sum made from those groups."""
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
    per_currency = (
        sa.select(
            grouped.c.currency,
            sa.func.sum(grouped.c.n).cast(sa.BigInteger).label("n"),
            sa.func.sum(grouped.c.total).label("total"),
            sa.func.sum(grouped.c.total * grouped.c.probability * ONE_PERCENT).label("weighted"),
            sa.func.sum(grouped.c.rotting).cast(sa.BigInteger).label("rotting"),
        )
        .group_by(grouped.c.currency)
        .subquery("c")
    )
    totals = (
        sa.select(
            _totals_json(per_currency).label("totals"),
            sa.func.sum(per_currency.c.rotting).cast(sa.BigInteger).label("rotting"),
        )
        .select_from(per_currency)
        .lateral("t")
    )
    return totals, sa.func.coalesce(totals.c.rotting, 0), []


@functools.lru_cache(maxsize=64)
def _statement(reach: Reach, owner: bool, team: bool, product_line: bool, product: bool) -> sa.Select:
    """board_query with bound parameters (pipeline_id, subject, owner, team_id, product_line_id,
    product_id, cards), built once per shape: building it costs more than running it."""
    return board_query(
        sa.bindparam("pipeline_id", type_=UUID),
        Scope(sa.bindparam("subject", type_=sa.Text), reach),
        owner=sa.bindparam("owner", type_=sa.Text) if owner else "",
        team_id=sa.bindparam("team_id", type_=UUID) if team else None,
        product_line_id=sa.bindparam("product_line_id", type_=UUID) if product_line else None,
        product_id=sa.bindparam("product_id", type_=UUID) if product else None,
        cards=sa.bindparam("cards", type_=sa.Integer),
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
    scope = Scope.of(principal)
    owner = req.owner.strip()
    stmt = _statement(
        scope.reach, bool(owner), team_id is not None, product_line_id is not None, product_id is not None
    )
    params = {
        "pipeline_id": pipeline_id,
        "subject": scope.subject,
        "owner": owner,
        "team_id": team_id,
        "product_line_id": product_line_id,
        "product_id": product_id,
        "cards": cards,
    }
    with uow.read() as conn:
        rows = conn.execute(stmt, params).all()
        if not rows and conn.execute(sa.select(pipelines.c.id).where(pipelines.c.id == pipeline_id)).first() is None:
            raise PIPELINE.not_found(req.pipeline)
    with localcontext() as ctx:
        ctx.prec = 80  # exact sums of exact sums (the weighted ones carry 13 decimals)
        return _assemble(req.pipeline, pipeline_id, rows)


def _assemble(name: str, pipeline_id: str, rows) -> pb.PipelineBoard:
    out = pb.PipelineBoard(pipeline=name)
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
                cur = t["currency"]
                col.count += t["n"]
                amounts[cur] += Decimal(t["total"])
                weighted[cur] += Decimal(t["weighted"])
            col.rotting_count = int(r.rotting)
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
