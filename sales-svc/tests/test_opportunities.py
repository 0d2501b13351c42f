"""Opportunities: creation defaults and derived amounts, currencies, stage rules and history,
win / lose / reopen, etags, record-level access in every read, the pipeline board against a
hand-computed example, exports, and one route through the gateway."""

from __future__ import annotations

import csv
import io
import uuid
from decimal import Decimal

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2

from crm.sales.v1 import opportunities_pb2 as pb
from crm.sales.v1 import opportunities_pb2_grpc
from crm.sales.v1.sales_events_pb2 import OpportunityEvent
from crm.type.v1.date_pb2 import Date
from crm.type.v1.money_pb2 import Money
from crm_chassis.errors import read_rpc_error
from sales_svc.tables import (
    opportunities,
    opportunity_lines,
    pipelines,
    product_lines,
    products,
    stages,
)

from .conftest import ADMIN, events, make_team, manager, rep

Opp = pb.Opportunity


# -- helpers ------------------------------------------------------------------------------------


def make_pipeline(svc, stage_specs, *, default=False, product_line_id=None):
    """A pipeline and its stages straight in the core tables: each spec is (name, kind,
    probability, required_fields, rotting_days). Returns (pipeline_id, [stage ids])."""
    with svc.ctx.engine.begin() as conn:
        if default:  # the migration seeds "Standard" as the default: this one takes its place
            conn.execute(pipelines.update().where(pipelines.c.is_default).values(is_default=False))
        pid = conn.execute(
            pipelines.insert()
            .values(name=f"p-{uuid.uuid4().hex[:8]}", is_default=default, product_line_id=product_line_id)
            .returning(pipelines.c.id)
        ).scalar()
        ids = [
            conn.execute(
                stages.insert()
                .values(
                    pipeline_id=pid,
                    position=i,
                    name=name,
                    kind=kind,
                    probability=prob,
                    required_fields=list(req),
                    rotting_days=rot,
                )
                .returning(stages.c.id)
            ).scalar()
            for i, (name, kind, prob, req, rot) in enumerate(stage_specs)
        ]
    return pid, ids


def make_product(svc, name="Licence", tax_rate="9", product_line_id=None):
    with svc.ctx.engine.begin() as conn:
        return conn.execute(
            products.insert()
            .values(
                sku=f"sku-{uuid.uuid4().hex[:8]}",
                name=name,
                tax_rate=Decimal(tax_rate),
                product_line_id=product_line_id,
            )
            .returning(products.c.id)
        ).scalar()


def make_product_line(svc, name="CRM"):
    with svc.ctx.engine.begin() as conn:
        return conn.execute(
            product_lines.insert().values(code=f"pl-{uuid.uuid4().hex[:8]}", name=name).returning(product_lines.c.id)
        ).scalar()


STANDARD = [
    ("Qualify", "open", 10, [], None),
    ("Propose", "open", 40, ["amount", "expected_close_date"], 14),
    ("Negotiate", "open", 70, ["contact_name", "next_step", "lines"], None),
    ("Won", "won", 100, [], None),
    ("Lost", "lost", 0, [], None),
]


def irr(units: int) -> Money:
    return Money(currency_code="IRR", units=units)


def stage_name(pid, sid) -> str:
    return f"pipelines/{pid}/stages/{sid}"


def error(call, *args, **kw):
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kw)
    return info.value.code(), read_rpc_error(info.value)


@pytest.fixture(scope="module")
def stub(ch):
    return opportunities_pb2_grpc.OpportunityServiceStub(ch)


@pytest.fixture(scope="module")
def std(svc):
    """The default pipeline (the standard stages)."""
    return make_pipeline(svc, STANDARD, default=True)


def create(stub, md=ADMIN, request_id="", **fields):
    fields.setdefault("display_name", "Deal")
    return stub.CreateOpportunity(
        pb.CreateOpportunityRequest(opportunity=Opp(**fields), request_id=request_id), metadata=md
    )


def mask(*paths):
    return field_mask_pb2.FieldMask(paths=list(paths))


# -- create -------------------------------------------------------------------------------------


def test_create_takes_the_defaults_and_derives_the_amount_from_discounted_lines(svc, stub, std):
    pid, sids = std
    product = make_product(svc, "CRM seat", tax_rate="9")
    made = create(
        stub,
        md=rep("rita"),
        display_name="Seats for Pars",
        customer=f"customers/{uuid.uuid4()}",
        lines=[
            pb.OpportunityLine(
                product=f"products/{product}", quantity="3", unit_price=irr(1_000_001), discount_percent="12.5"
            ),
            pb.OpportunityLine(description="Training day", quantity="0.5", unit_price=irr(7_000_000)),
        ],
    )
    assert made.pipeline == f"pipelines/{pid}" and made.stage == stage_name(pid, sids[0])
    assert made.stage_display_name == "Qualify" and made.state == Opp.STATE_OPEN
    assert made.owner == "rita" and made.probability == 10 and not made.probability_overridden
    assert made.forecast_category == Opp.FORECAST_CATEGORY_PIPELINE and made.currency_code == "IRR"
    # 3 × 1,000,001 × 0.875 = 2,625,002.625 → 2,625,003 rials (whole); 0.5 × 7,000,000 = 3,500,000
    assert [ln.amount.units for ln in made.lines] == [2_625_003, 3_500_000]
    assert made.amount == irr(6_125_003) and made.amount_from_lines
    assert made.weighted_amount == irr(612_500)  # 6,125,003 × 10 % = 612,500.3 → 612,500
    assert made.lines[0].description == "CRM seat" and made.lines[0].tax_rate == "9"  # the product's
    assert made.lines[1].tax_rate == "0"
    oid = made.name.removeprefix("opportunities/")
    with svc.ctx.engine.connect() as conn:  # the core table as quotes read it
        rows = conn.execute(
            sa.select(opportunity_lines).where(opportunity_lines.c.opportunity_id == oid).order_by("position")
        ).all()
    assert [(r.quantity, r.unit_price, r.discount_percent, r.amount) for r in rows] == [
        (Decimal(3), Decimal(1_000_001), Decimal("12.5"), Decimal(2_625_003)),
        (Decimal("0.5"), Decimal(7_000_000), Decimal(0), Decimal(3_500_000)),
    ]
    created = [e for e in events(svc, "opportunity.created.v1", OpportunityEvent) if e.opportunity == made.name]
    assert len(created) == 1 and created[0].amount == irr(6_125_003) and created[0].owner == "rita"
    assert created[0].lines[0].quantity == "3" and created[0].stage_name == "Qualify"


def test_an_entered_amount_without_lines_and_an_amount_that_contradicts_the_lines(stub, std):
    made = create(stub, amount=irr(5_000_000))
    assert made.amount == irr(5_000_000) and not made.amount_from_lines
    code, err = error(
        create,
        stub,
        amount=irr(1),
        lines=[pb.OpportunityLine(description="x", quantity="1", unit_price=irr(2))],
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and err.field_violations[0].field == "opportunity.amount"


def test_money_in_another_currency_is_refused_naming_the_field(stub, std):
    usd = Money(currency_code="USD", units=10)
    code, err = error(
        create,
        stub,
        currency_code="IRR",
        lines=[
            pb.OpportunityLine(description="ok", quantity="1", unit_price=irr(5)),
            pb.OpportunityLine(description="bad", quantity="1", unit_price=usd),
        ],
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in err.field_violations] == ["opportunity.lines[1].unit_price.currency_code"]
    code, err = error(create, stub, currency_code="IRT", amount=irr(10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.field_violations[0].field == "opportunity.amount.currency_code"
    # every bad field at once
    code, err = error(
        create,
        stub,
        display_name="",
        lines=[pb.OpportunityLine(description="x", quantity="-1", unit_price=irr(5), discount_percent="120")],
    )
    assert {v.field for v in err.field_violations} == {
        "opportunity.display_name",
        "opportunity.lines[0].quantity",
        "opportunity.lines[0].discount_percent",
    }


def test_create_is_idempotent_on_request_id(svc, stub, std):
    key = str(uuid.uuid4())
    a = create(stub, request_id=key, display_name="Once")
    b = create(stub, request_id=key, display_name="Twice")
    assert a.name == b.name and b.display_name == "Once"
    with svc.ctx.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).where(opportunities.c.request_id == key)).scalar() == 1


def test_the_pipeline_comes_from_the_product_line(svc, stub, std):
    line = make_product_line(svc, "Hardware")
    pid, sids = make_pipeline(
        svc, [("Survey", "open", 20, [], None), ("Won", "won", 100, [], None)], product_line_id=line
    )
    made = create(stub, product_line=f"productLines/{line}")
    assert made.pipeline == f"pipelines/{pid}" and made.stage == stage_name(pid, sids[0]) and made.probability == 20
    product = make_product(svc, "Router", product_line_id=line)
    by_product = create(
        stub, lines=[pb.OpportunityLine(product=f"products/{product}", quantity="1", unit_price=irr(9))]
    )
    assert by_product.pipeline == f"pipelines/{pid}" and by_product.product_line == f"productLines/{line}"


def test_a_rep_cannot_give_an_opportunity_to_someone_else(stub, std):
    code, err = error(create, stub, md=rep("rita"), owner="omid")
    assert code == grpc.StatusCode.PERMISSION_DENIED and err.reason == "ASSIGNMENT_NOT_ALLOWED"


# -- stage rules and history -----------------------------------------------------------------------


def history(stub, name, md=ADMIN):
    return stub.ListOpportunityHistory(pb.ListOpportunityHistoryRequest(parent=name), metadata=md).entries


def test_stage_requirements_moves_and_the_history_of_slips(svc, stub, std):
    pid, sids = std
    other_pid, other_sids = make_pipeline(svc, [("Elsewhere", "open", 50, [], None)])
    made = create(stub, display_name="Slipping deal")
    move = stub.MoveOpportunityStage
    code, err = error(
        move, pb.MoveOpportunityStageRequest(name=made.name, stage=stage_name(pid, sids[1])), metadata=ADMIN
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and err.reason == "STAGE_REQUIREMENTS"
    assert err.metadata["missing_fields"] == "amount,expected_close_date"
    assert "amount" in err.message and "expected_close_date" in err.message
    # a stage of another pipeline is not a target; a won stage is reached through :win
    code, err = error(
        move, pb.MoveOpportunityStageRequest(name=made.name, stage=stage_name(other_pid, other_sids[0])), metadata=ADMIN
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and err.field_violations[0].field == "stage"
    code, err = error(
        move, pb.MoveOpportunityStageRequest(name=made.name, stage=stage_name(pid, sids[3])), metadata=ADMIN
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and err.reason == "STAGE_NOT_OPEN"

    upd = stub.UpdateOpportunity(
        pb.UpdateOpportunityRequest(
            opportunity=Opp(
                name=made.name,
                etag=made.etag,
                amount=irr(8_000_000),
                expected_close_date=Date(year=2026, month=3, day=20),
            ),
            update_mask=mask("amount", "expected_close_date"),
        ),
        metadata=ADMIN,
    )
    assert upd.amount == irr(8_000_000) and upd.etag != made.etag
    moved = move(
        pb.MoveOpportunityStageRequest(name=made.name, stage=stage_name(pid, sids[1]), etag=upd.etag), metadata=ADMIN
    )
    assert moved.stage == stage_name(pid, sids[1]) and moved.probability == 40  # the new stage's default
    assert moved.stage_enter_time.ToDatetime() >= made.stage_enter_time.ToDatetime()
    # the deal slips: a later close date, a smaller amount
    stub.UpdateOpportunity(
        pb.UpdateOpportunityRequest(
            opportunity=Opp(name=made.name, amount=irr(6_000_000), expected_close_date=Date(year=2026, month=5, day=1)),
            update_mask=mask("amount", "expected_close_date"),
        ),
        metadata=ADMIN,
    )
    code, err = error(
        move, pb.MoveOpportunityStageRequest(name=made.name, stage=stage_name(pid, sids[2])), metadata=ADMIN
    )
    assert err.metadata["missing_fields"] == "contact_name,next_step,lines"
    entries = history(stub, made.name)
    kinds = pb.OpportunityHistoryEntry
    got = [(e.kind, e.old_value, e.new_value) for e in entries]
    assert got == [
        (kinds.KIND_STAGE, "", "Qualify"),
        (kinds.KIND_AMOUNT, "0 IRR", "8000000 IRR"),
        (kinds.KIND_CLOSE_DATE, "", "2026-03-20"),
        (kinds.KIND_STAGE, "Qualify", "Propose"),
        (kinds.KIND_PROBABILITY, "10", "40"),
        (kinds.KIND_AMOUNT, "8000000 IRR", "6000000 IRR"),
        (kinds.KIND_CLOSE_DATE, "2026-03-20", "2026-05-01"),
    ]
    assert entries[3].from_stage == stage_name(pid, sids[0]) and entries[3].to_stage == stage_name(pid, sids[1])
    times = [e.time.ToDatetime() for e in entries]
    assert all(t.year >= 2026 for t in times) and times == sorted(times)
    assert all(e.actor == "ada" for e in entries)
    # keyset pages of the history
    page = stub.ListOpportunityHistory(pb.ListOpportunityHistoryRequest(parent=made.name, page_size=4), metadata=ADMIN)
    rest = stub.ListOpportunityHistory(
        pb.ListOpportunityHistoryRequest(parent=made.name, page_size=4, page_token=page.next_page_token), metadata=ADMIN
    )
    assert [e.id for e in page.entries] + [e.id for e in rest.entries] == [e.id for e in entries]
    changed = [e for e in events(svc, "opportunity.stage_changed.v1", OpportunityEvent) if e.opportunity == made.name]
    assert [(e.previous_stage, e.stage) for e in changed] == [(stage_name(pid, sids[0]), stage_name(pid, sids[1]))]


def test_an_overridden_probability_survives_a_move_and_resets_when_cleared(stub, std):
    pid, sids = std
    made = create(stub, probability=25, amount=irr(1000), expected_close_date=Date(year=2026, month=1, day=2))
    assert made.probability == 25 and made.probability_overridden
    moved = stub.MoveOpportunityStage(
        pb.MoveOpportunityStageRequest(name=made.name, stage=stage_name(pid, sids[1])), metadata=ADMIN
    )
    assert moved.probability == 25
    reset = stub.UpdateOpportunity(
        pb.UpdateOpportunityRequest(opportunity=Opp(name=made.name), update_mask=mask("probability")), metadata=ADMIN
    )
    assert reset.probability == 40 and not reset.probability_overridden
    code, err = error(create, stub, probability=101)
    assert err.field_violations[0].field == "opportunity.probability"


def test_win_lose_reopen(svc, stub, std):
    pid, sids = std
    made = create(stub, amount=irr(3_000_000), expected_close_date=Date(year=2026, month=2, day=1))
    stub.MoveOpportunityStage(
        pb.MoveOpportunityStageRequest(name=made.name, stage=stage_name(pid, sids[1])), metadata=ADMIN
    )
    won = stub.WinOpportunity(pb.WinOpportunityRequest(name=made.name, reason="best price"), metadata=ADMIN)
    assert won.state == Opp.STATE_WON and won.stage == stage_name(pid, sids[3]) and won.probability == 100
    assert won.forecast_category == Opp.FORECAST_CATEGORY_CLOSED and won.HasField("close_time")
    assert won.close_reason == "best price"
    assert stub.WinOpportunity(pb.WinOpportunityRequest(name=made.name), metadata=ADMIN).etag == won.etag  # a retry
    code, err = error(
        stub.MoveOpportunityStage,
        pb.MoveOpportunityStageRequest(name=made.name, stage=stage_name(pid, sids[0])),
        metadata=ADMIN,
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and err.reason == "OPPORTUNITY_CLOSED"
    code, err = error(stub.LoseOpportunity, pb.LoseOpportunityRequest(name=made.name, reason="x"), metadata=ADMIN)
    assert err.reason == "OPPORTUNITY_CLOSED"
    # reopen: back to the last open stage it was in (Propose), its default probability
    back = stub.ReopenOpportunity(pb.ReopenOpportunityRequest(name=made.name), metadata=ADMIN)
    assert back.state == Opp.STATE_OPEN and back.stage == stage_name(pid, sids[1]) and back.probability == 40
    assert not back.HasField("close_time") and back.forecast_category == Opp.FORECAST_CATEGORY_PIPELINE
    code, err = error(stub.ReopenOpportunity, pb.ReopenOpportunityRequest(name=made.name), metadata=ADMIN)
    assert err.reason == "OPPORTUNITY_OPEN"
    code, err = error(stub.LoseOpportunity, pb.LoseOpportunityRequest(name=made.name, reason="  "), metadata=ADMIN)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and err.field_violations[0].field == "reason"
    lost = stub.LoseOpportunity(pb.LoseOpportunityRequest(name=made.name, reason="budget cut"), metadata=ADMIN)
    assert lost.state == Opp.STATE_LOST and lost.stage == stage_name(pid, sids[4]) and lost.probability == 0
    assert lost.forecast_category == Opp.FORECAST_CATEGORY_OMITTED and lost.close_reason == "budget cut"
    again = stub.ReopenOpportunity(
        pb.ReopenOpportunityRequest(name=made.name, stage=stage_name(pid, sids[0])), metadata=ADMIN
    )
    assert again.stage == stage_name(pid, sids[0]) and again.probability == 10
    kinds = pb.OpportunityHistoryEntry
    states = [(e.old_value, e.new_value) for e in history(stub, made.name) if e.kind == kinds.KIND_STATE]
    assert states == [("open", "won"), ("won", "open"), ("open", "lost"), ("lost", "open")]
    for key, state in (
        ("opportunity.won.v1", "won"),
        ("opportunity.lost.v1", "lost"),
        ("opportunity.reopened.v1", "open"),
    ):
        mine = [e for e in events(svc, key, OpportunityEvent) if e.opportunity == made.name]
        assert mine and mine[0].state == state
    won_event = next(e for e in events(svc, "opportunity.won.v1", OpportunityEvent) if e.opportunity == made.name)
    assert won_event.close_reason == "best price" and won_event.previous_stage == stage_name(pid, sids[1])


def test_a_stale_etag_is_aborted_and_lines_are_replaced_whole(svc, stub, std):
    made = create(stub, lines=[pb.OpportunityLine(description="a", quantity="1", unit_price=irr(100))])
    fresh = stub.UpdateOpportunity(
        pb.UpdateOpportunityRequest(
            opportunity=Opp(
                name=made.name,
                etag=made.etag,
                lines=[
                    pb.OpportunityLine(description="b", quantity="2", unit_price=irr(100), discount_percent="50"),
                    pb.OpportunityLine(description="c", quantity="1", unit_price=irr(300)),
                ],
            ),
            update_mask=mask("lines"),
        ),
        metadata=ADMIN,
    )
    assert [ln.description for ln in fresh.lines] == ["b", "c"] and fresh.amount == irr(400)
    code, err = error(
        stub.UpdateOpportunity,
        pb.UpdateOpportunityRequest(
            opportunity=Opp(name=made.name, etag=made.etag, next_step="call"), update_mask=mask("next_step")
        ),
        metadata=ADMIN,
    )
    assert code == grpc.StatusCode.ABORTED and err.metadata["current_etag"] == fresh.etag
    code, _ = error(
        stub.MoveOpportunityStage,
        pb.MoveOpportunityStageRequest(name=made.name, stage=made.stage, etag=made.etag),
        metadata=ADMIN,
    )
    assert code == grpc.StatusCode.ABORTED
    code, err = error(
        stub.UpdateOpportunity,
        pb.UpdateOpportunityRequest(opportunity=Opp(name=made.name, stage=made.stage), update_mask=mask("stage")),
        metadata=ADMIN,
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and err.field_violations[0].field == "update_mask"
    oid = made.name.removeprefix("opportunities/")
    with svc.ctx.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).where(opportunity_lines.c.opportunity_id == oid)).scalar() == 2
        entries = conn.execute(
            sa.text("SELECT action FROM audit_entries WHERE resource = :r ORDER BY id"), {"r": made.name}
        ).all()
    assert [e.action for e in entries] == ["create", "update"]


def test_list_filters_orders_and_pages(stub, std):
    tag = uuid.uuid4().hex[:6]
    for units in (5, 50, 500, 5000):
        create(stub, display_name=f"list-{tag}-{units}", amount=irr(units))
    f = f'display_name = "list-{tag}*" AND amount >= 50 AND state = OPEN'
    first = stub.ListOpportunities(
        pb.ListOpportunitiesRequest(filter=f, order_by="amount desc", page_size=2), metadata=ADMIN
    )
    second = stub.ListOpportunities(
        pb.ListOpportunitiesRequest(filter=f, order_by="amount desc", page_size=2, page_token=first.next_page_token),
        metadata=ADMIN,
    )
    got = [o.amount.units for o in first.opportunities] + [o.amount.units for o in second.opportunities]
    assert got == [5000, 500, 50] and not second.next_page_token
    code, err = error(stub.ListOpportunities, pb.ListOpportunitiesRequest(filter='pipeline = "nope"'), metadata=ADMIN)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and err.field_violations[0].field == "filter"
    found = stub.SearchOpportunities(pb.SearchOpportunitiesRequest(query=f"LIST-{tag}"), metadata=ADMIN)
    assert len(found.results) == 4


def test_persian_search_matches_letter_variants_and_typos(stub, std):
    made = create(stub, display_name="فروش نرم‌افزار به شركت پارس", next_step="تماس با مدیر")
    # Arabic kaf typed as Persian kaf, and a typo
    for q in ("شرکت پارس", "نرم افزار", "پارص"):
        hits = stub.SearchOpportunities(pb.SearchOpportunitiesRequest(query=q), metadata=ADMIN).results
        assert made.name in [h.opportunity.name for h in hits], q


# -- access -------------------------------------------------------------------------------------


def _export_names(stub, md, **kw) -> list[str]:
    chunks = list(
        stub.ExportOpportunities(
            pb.ExportOpportunitiesRequest(
                format=pb.OPPORTUNITY_EXPORT_FORMAT_CSV, fields=["name", "display_name"], **kw
            ),
            metadata=md,
        )
    )
    assert chunks[0].content_type.startswith("text/csv") and chunks[0].filename.endswith(".csv")
    text = b"".join(c.data for c in chunks).decode("utf-8-sig")
    return [row[0] for row in list(csv.reader(io.StringIO(text)))[1:]]


def test_each_access_rule_in_every_read(svc, stub):
    tag = uuid.uuid4().hex[:6]
    pid, sids = make_pipeline(svc, [("Open", "open", 50, [], None), ("Won", "won", 100, [], None)])
    make_team(svc, f"north-{tag}", f"mona-{tag}", [f"ali-{tag}"])
    ali, bob, mona, mina = rep(f"ali-{tag}"), rep(f"bob-{tag}"), manager(f"mona-{tag}"), manager(f"mina-{tag}")
    a = create(stub, md=ali, display_name=f"acc-{tag} alpha", pipeline=f"pipelines/{pid}", amount=irr(100))
    b = create(stub, md=bob, display_name=f"acc-{tag} beta", pipeline=f"pipelines/{pid}", amount=irr(200))
    assert a.team  # ali's one team, by default: the manager sees it by team as well as by member

    def sees(md) -> dict[str, set[str]]:
        listed = stub.ListOpportunities(pb.ListOpportunitiesRequest(filter=f'display_name = "acc-{tag}*"'), metadata=md)
        searched = stub.SearchOpportunities(pb.SearchOpportunitiesRequest(query=f"acc-{tag}"), metadata=md)
        board = stub.GetPipelineBoard(pb.GetPipelineBoardRequest(pipeline=f"pipelines/{pid}"), metadata=md)
        got = set()
        for name in (a.name, b.name):
            try:
                stub.GetOpportunity(pb.GetOpportunityRequest(name=name), metadata=md)
                got.add(name)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND
        hist = set()
        for name in (a.name, b.name):
            try:
                history(stub, name, md)
                hist.add(name)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND
        return {
            "list": {o.name for o in listed.opportunities},
            "search": {h.opportunity.name for h in searched.results},
            "get": got,
            "history": hist,
            "board": {c.opportunity for s in board.stages for c in s.cards},
            "board_count": {board.total_count},
            "export": set(_export_names(stub, md, filter=f'display_name = "acc-{tag}*"')),
            "export_search": set(_export_names(stub, md, query=f"acc-{tag}")),
        }

    def expect(names: set[str]) -> dict[str, set]:
        return {k: names for k in ("list", "search", "get", "history", "board", "export", "export_search")} | {
            "board_count": {len(names)}
        }

    assert sees(ali) == expect({a.name})
    assert sees(bob) == expect({b.name})
    assert sees(mona) == expect({a.name})  # her team's member
    assert sees(mina) == expect(set())  # manages no team
    assert sees(ADMIN) == expect({a.name, b.name})
    # another rep cannot change it either (NOT_FOUND, as if it did not exist)
    code, _ = error(stub.WinOpportunity, pb.WinOpportunityRequest(name=a.name), metadata=bob)
    assert code == grpc.StatusCode.NOT_FOUND


# -- the board ----------------------------------------------------------------------------------


def test_the_board_against_a_hand_computed_example(svc, stub):
    pid, sids = make_pipeline(
        svc,
        [
            ("Lead in", "open", 10, [], 7),
            ("Demo", "open", 50, [], None),
            ("Contract", "open", 90, [], None),
            ("Won", "won", 100, [], None),
        ],
    )
    product = make_product(svc, "Board widget")
    p = f"pipelines/{pid}"
    tag = uuid.uuid4().hex[:6]
    sara, reza = f"sara-{tag}", f"reza-{tag}"
    mk = lambda md, amount, stage, **kw: create(  # noqa: E731
        stub, md=md, pipeline=p, stage=stage_name(pid, sids[stage]), amount=amount, **kw
    )
    a1 = mk(rep(sara), irr(1_000_000), 0)
    a2 = mk(rep(reza), irr(3_000_000), 0)
    mk(rep(sara), irr(2_000_000), 1, probability=25)  # overridden: 500,000 weighted
    b2 = create(
        stub,
        md=rep(reza),
        pipeline=p,
        stage=stage_name(pid, sids[1]),
        lines=[pb.OpportunityLine(product=f"products/{product}", quantity="2", unit_price=irr(2_000_000))],
    )
    mk(rep(sara), Money(currency_code="USD", units=100), 1)
    done = mk(rep(sara), irr(9_000_000), 2)
    stub.WinOpportunity(pb.WinOpportunityRequest(name=done.name), metadata=ADMIN)  # not on the board
    with svc.ctx.engine.begin() as conn:  # a1 has sat in "Lead in" for 10 days (limit 7)
        conn.execute(
            opportunities.update()
            .where(opportunities.c.id == a1.name.removeprefix("opportunities/"))
            .values(stage_enter_time=sa.func.now() - sa.text("interval '10 days'"))
        )
    board = stub.GetPipelineBoard(pb.GetPipelineBoardRequest(pipeline=p), metadata=ADMIN)
    assert [s.display_name for s in board.stages] == ["Lead in", "Demo", "Contract"]
    lead_in, demo, contract = board.stages
    assert lead_in.count == 2 and lead_in.amounts == [irr(4_000_000)]
    assert lead_in.weighted_amounts == [irr(400_000)] and lead_in.rotting_count == 1
    assert [c.opportunity for c in lead_in.cards] == [a2.name, a1.name]  # largest first
    assert [c.rotting for c in lead_in.cards] == [False, True] and lead_in.cards[0].owner == reza
    # Demo: 2,000,000 × 25 % + 4,000,000 × 50 % = 2,500,000 rials, and 100 USD × 50 % = 50 USD
    assert demo.count == 3
    assert list(demo.amounts) == [irr(6_000_000), Money(currency_code="USD", units=100)]
    assert list(demo.weighted_amounts) == [irr(2_500_000), Money(currency_code="USD", units=50)]
    assert contract.count == 0 and not contract.amounts and not contract.cards
    assert board.total_count == 5
    assert list(board.total_amounts) == [irr(10_000_000), Money(currency_code="USD", units=100)]
    assert list(board.total_weighted_amounts) == [irr(2_900_000), Money(currency_code="USD", units=50)]
    # filters: an owner, a product; and fewer cards
    only_reza = stub.GetPipelineBoard(pb.GetPipelineBoardRequest(pipeline=p, owner=reza), metadata=ADMIN)
    assert [s.count for s in only_reza.stages] == [1, 1, 0] and only_reza.total_amounts == [irr(7_000_000)]
    by_product = stub.GetPipelineBoard(
        pb.GetPipelineBoardRequest(pipeline=p, product=f"products/{product}"), metadata=ADMIN
    )
    assert [c.opportunity for s in by_product.stages for c in s.cards] == [b2.name]
    one_card = stub.GetPipelineBoard(pb.GetPipelineBoardRequest(pipeline=p, card_limit=1), metadata=ADMIN)
    assert [len(s.cards) for s in one_card.stages] == [1, 1, 0] and one_card.stages[1].count == 3
    # a rep's board holds only their own
    sara_board = stub.GetPipelineBoard(pb.GetPipelineBoardRequest(pipeline=p), metadata=rep(sara))
    assert [s.count for s in sara_board.stages] == [1, 2, 0]
    code, _ = error(
        stub.GetPipelineBoard, pb.GetPipelineBoardRequest(pipeline=f"pipelines/{uuid.uuid4()}"), metadata=ADMIN
    )
    assert code == grpc.StatusCode.NOT_FOUND
    code, err = error(stub.GetPipelineBoard, pb.GetPipelineBoardRequest(pipeline="pipelines/x"), metadata=ADMIN)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and err.field_violations[0].field == "pipeline"


# -- export and HTTP ----------------------------------------------------------------------------


def test_export_xlsx_in_persian(stub, std):
    import openpyxl

    create(
        stub,
        display_name="قرارداد پشتیبانی",
        amount=irr(12_500_000),
        expected_close_date=Date(year=2026, month=3, day=21),
    )
    chunks = list(
        stub.ExportOpportunities(
            pb.ExportOpportunitiesRequest(
                format=pb.OPPORTUNITY_EXPORT_FORMAT_XLSX,
                query="پشتیبانی",
                language_code="fa",
                fields=["display_name", "amount", "expected_close_date_jalali"],
            ),
            metadata=ADMIN,
        )
    )
    assert chunks[0].row_count == 1 and chunks[0].filename.endswith(".xlsx")
    sheet = openpyxl.load_workbook(io.BytesIO(b"".join(c.data for c in chunks))).active
    rows = list(sheet.iter_rows(values_only=True))
    assert rows[0] == ("نام", "مبلغ", "تاریخ بستن (شمسی)")
    assert rows[1] == ("قرارداد پشتیبانی", 12_500_000, "1405/01/01")
    code, err = error(lambda: list(stub.ExportOpportunities(pb.ExportOpportunitiesRequest(), metadata=ADMIN)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and err.field_violations[0].field == "format"


def test_create_over_http_and_a_400_naming_the_field(svc, std):
    from crm_gateway import create_app
    from crm_gateway.clients import Clients
    from tests.support.harness import assert_problem, token

    app = create_app(Clients({"customer": "127.0.0.1:9", "sales": f"127.0.0.1:{svc.port}", "reporting": "127.0.0.1:9"}))
    http = app.test_client()
    h = {"Authorization": f"Bearer {token('sales_rep', 'hana')}", "Idempotency-Key": str(uuid.uuid4())}
    body = {"displayName": "Over HTTP", "amount": {"currencyCode": "IRR", "units": "2500000"}}
    resp = http.post("/v1/opportunities", json=body, headers=h)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    made = resp.get_json()
    assert made["owner"] == "hana" and made["amount"]["units"] == "2500000" and made["state"] == "STATE_OPEN"
    again = http.post("/v1/opportunities", json=body, headers=h)
    assert again.get_json()["name"] == made["name"]
    bad = {"displayName": "x", "currencyCode": "IRR", "amount": {"currencyCode": "USD", "units": "1"}}
    assert_problem(
        http.post("/v1/opportunities", json=bad, headers={"Authorization": h["Authorization"]}),
        400,
        "amount.currency_code",  # the body is the opportunity: the gateway names the field in it
    )
    oid = made["name"].removeprefix("opportunities/")
    got = http.get(f"/v1/opportunities/{oid}", headers={"Authorization": h["Authorization"]})
    assert got.status_code == 200 and got.get_json()["name"] == made["name"]
    other = http.get(f"/v1/opportunities/{oid}", headers={"Authorization": f"Bearer {token('sales_rep', 'someone')}"})
    assert_problem(other, 404)
    board = http.get(f"/v1/{made['pipeline']}:board", headers={"Authorization": h["Authorization"]})
    assert board.status_code == 200 and board.get_json()["totalCount"] == "1"
    csv_resp = http.get(
        "/v1/opportunities:export?format=OPPORTUNITY_EXPORT_FORMAT_CSV", headers={"Authorization": h["Authorization"]}
    )
    assert csv_resp.status_code == 200 and csv_resp.headers["Content-Type"].startswith("text/csv")
    assert "Over HTTP" in csv_resp.get_data().decode("utf-8-sig")


def test_an_update_of_everything_with_what_was_read_changes_nothing(stub, std):
    made = create(
        stub,
        lines=[pb.OpportunityLine(description="seat", quantity="2.5", unit_price=irr(1000), discount_percent="10")],
        competitors=["Acme"],
        expected_close_date=Date(year=2026, month=6, day=1),
    )
    same = stub.UpdateOpportunity(pb.UpdateOpportunityRequest(opportunity=made, update_mask=mask("*")), metadata=ADMIN)
    assert same.etag == made.etag and not same.probability_overridden
    won = stub.WinOpportunity(pb.WinOpportunityRequest(name=made.name), metadata=ADMIN)
    kept = stub.UpdateOpportunity(pb.UpdateOpportunityRequest(opportunity=won, update_mask=mask("*")), metadata=ADMIN)
    assert kept.etag == won.etag
    # but a won one's category is not changed by hand, and closed is not set by hand
    won.forecast_category = Opp.FORECAST_CATEGORY_COMMIT
    code, err = error(
        stub.UpdateOpportunity,
        pb.UpdateOpportunityRequest(opportunity=won, update_mask=mask("forecast_category")),
        metadata=ADMIN,
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and err.reason == "OPPORTUNITY_CLOSED"
    code, err = error(create, stub, forecast_category=Opp.FORECAST_CATEGORY_CLOSED)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and err.field_violations[0].field == "opportunity.forecast_category"


def test_bad_input_names_the_field_and_never_fails_inside(stub, std):
    pid, sids = std
    made = create(stub)
    cases = [
        (stub.GetOpportunity, pb.GetOpportunityRequest(name="opportunities/42"), "name"),
        (
            stub.CreateOpportunity,
            pb.CreateOpportunityRequest(
                opportunity=Opp(
                    display_name="x", lines=[pb.OpportunityLine(description="x", quantity="1e15", unit_price=irr(1))]
                )
            ),
            "opportunity.lines[0].quantity",
        ),
        (
            stub.CreateOpportunity,
            pb.CreateOpportunityRequest(
                opportunity=Opp(
                    display_name="x",
                    lines=[
                        pb.OpportunityLine(
                            description="x", quantity="999999999", unit_price=irr(9_000_000_000_000_000_000)
                        )
                    ],
                )
            ),
            "opportunity.lines[0].unit_price",
        ),
        (
            stub.CreateOpportunity,
            pb.CreateOpportunityRequest(opportunity=Opp(display_name="x", team=f"teams/{uuid.uuid4()}")),
            "opportunity.team",
        ),
        (
            stub.CreateOpportunity,
            pb.CreateOpportunityRequest(opportunity=Opp(display_name="x", stage=stage_name(pid, uuid.uuid4()))),
            "opportunity.stage",
        ),
        (
            stub.CreateOpportunity,
            pb.CreateOpportunityRequest(
                opportunity=Opp(display_name="x", expected_close_date=Date(year=2026, month=2, day=30))
            ),
            "opportunity.expected_close_date",
        ),
        (stub.UpdateOpportunity, pb.UpdateOpportunityRequest(opportunity=Opp(name=made.name)), "update_mask"),
        (
            stub.UpdateOpportunity,
            pb.UpdateOpportunityRequest(opportunity=Opp(name=made.name), update_mask=mask("rotting")),
            "update_mask",
        ),
        (stub.SearchOpportunities, pb.SearchOpportunitiesRequest(query="  "), "query"),
        (stub.ListOpportunities, pb.ListOpportunitiesRequest(page_token="forged.token"), "page_token"),
        (stub.ListOpportunities, pb.ListOpportunitiesRequest(order_by="colour"), "order_by"),
        (stub.GetPipelineBoard, pb.GetPipelineBoardRequest(pipeline=f"pipelines/{pid}", team="team-1"), "team"),
        (stub.MoveOpportunityStage, pb.MoveOpportunityStageRequest(name=made.name, stage="Propose"), "stage"),
    ]
    for call, request, field in cases:
        code, err = error(call, request, metadata=ADMIN)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (field, code, err.message)
        assert field in [v.field for v in err.field_violations], (field, err.field_violations)
