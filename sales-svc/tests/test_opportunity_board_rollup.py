"""The pipeline board's rollup (migration 0012): after every kind of write — creates, stage
moves, amount / probability / owner / team / product line / currency changes, win, lose,
reopen, soft and hard deletes, multi-row updates, concurrent creates and crossing moves from
threads — opportunity_board_rollup equals a fresh GROUP BY over opportunities; a move locks the
two rollup rows in key order; the migration's backfill is exact too; and the board read from it
equals the board computed from the rows themselves (the product filter's path) for every scope
and filter."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from decimal import Decimal

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2

from crm.sales.v1 import opportunities_pb2 as pb
from crm.sales.v1 import opportunities_pb2_grpc
from crm.type.v1.money_pb2 import Money
from crm_chassis.db import migrate, normalise_url
from sales_svc.__main__ import SPEC
from sales_svc.tables import opportunities, pipelines, product_lines, products, stages

from .conftest import ADMIN, make_team, manager, rep

Opp = pb.Opportunity
KEY = ("pipeline_id", "stage_id", "owner_id", "team_id", "product_line_id", "currency_code")


# -- helpers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stub(ch):
    return opportunities_pb2_grpc.OpportunityServiceStub(ch)


def make_pipeline(engine, specs) -> tuple[str, list[str]]:
    """specs: (name, kind, probability, rotting_days)."""
    with engine.begin() as conn:
        pid = conn.execute(
            pipelines.insert().values(name=f"roll-{uuid.uuid4().hex[:8]}").returning(pipelines.c.id)
        ).scalar()
        sids = [
            conn.execute(
                stages.insert()
                .values(pipeline_id=pid, position=i, name=n, kind=k, probability=p, rotting_days=rot)
                .returning(stages.c.id)
            ).scalar()
            for i, (n, k, p, rot) in enumerate(specs)
        ]
    return pid, sids


def make_line(engine) -> str:
    with engine.begin() as conn:
        return conn.execute(
            product_lines.insert()
            .values(code=f"rl-{uuid.uuid4().hex[:8]}", name="Roll line")
            .returning(product_lines.c.id)
        ).scalar()


def make_product(engine) -> str:
    with engine.begin() as conn:
        return conn.execute(
            products.insert().values(sku=f"rs-{uuid.uuid4().hex[:8]}", name="Roll product").returning(products.c.id)
        ).scalar()


SPECS = [("A", "open", 10, 7), ("B", "open", 33.33, None), ("C", "open", 75, 30), ("Won", "won", 100, None)]
SPECS.append(("Lost", "lost", 0, None))


def irr(units: int) -> Money:
    return Money(currency_code="IRR", units=units)


def usd(units: int, cents: int = 0) -> Money:
    return Money(currency_code="USD", units=units, nanos=cents * 10_000_000)


def stage(pid, sid) -> str:
    return f"pipelines/{pid}/stages/{sid}"


def mask(*paths):
    return field_mask_pb2.FieldMask(paths=list(paths))


def create(stub, md=ADMIN, **fields) -> Opp:
    fields.setdefault("display_name", "Rolled deal")
    return stub.CreateOpportunity(pb.CreateOpportunityRequest(opportunity=Opp(**fields)), metadata=md)


def update(stub, name, paths, **fields) -> Opp:
    return stub.UpdateOpportunity(
        pb.UpdateOpportunityRequest(opportunity=Opp(name=name, **fields), update_mask=mask(*paths)), metadata=ADMIN
    )


def move(stub, name, target) -> Opp:
    return stub.MoveOpportunityStage(pb.MoveOpportunityStageRequest(name=name, stage=target), metadata=ADMIN)


def oid(o: Opp) -> str:
    return o.name.removeprefix("opportunities/")


def fresh_group_by(conn) -> dict:
    """count, Σ amount, Σ amount × probability / 100 of the open, not deleted ones per key (the
    product summed exactly in SQL, divided by 100 here: exact)."""
    o = opportunities
    rows = conn.execute(
        sa.select(
            *(o.c[k] for k in KEY),
            sa.func.count(),
            sa.func.sum(o.c.amount),
            sa.func.sum(o.c.amount * o.c.probability),
        )
        .where(o.c.state == "open", o.c.delete_time.is_(None))
        .group_by(*(o.c[k] for k in KEY))
    ).all()
    return {tuple(r[:6]): (r[6], Decimal(r[7]).normalize(), (Decimal(r[8]) / 100).normalize()) for r in rows}


def rollup(conn) -> dict:
    rows = conn.execute(
        sa.text(f"SELECT {', '.join(KEY)}, open_count, amount, weighted_amount FROM opportunity_board_rollup")
    ).all()
    out = {}
    for r in rows:
        if r.open_count == 0:  # a key whose last one left: nothing else may remain in it
            assert r.amount == 0 and r.weighted_amount == 0, r
            continue
        out[tuple(str(v) if v is not None else None for v in r[:6])] = (
            r.open_count,
            Decimal(r.amount).normalize(),
            Decimal(r.weighted_amount).normalize(),
        )
    return out


def assert_exact(engine):
    with engine.connect() as conn:
        expected = {tuple(str(v) if v is not None else None for v in k): v for k, v in fresh_group_by(conn).items()}
        assert rollup(conn) == expected


# -- the rollup against a fresh GROUP BY --------------------------------------------------------


def test_every_kind_of_write_keeps_the_rollup_exact(svc, stub):
    eng = svc.ctx.engine
    pid, sids = make_pipeline(eng, SPECS)
    pid2, sids2 = make_pipeline(eng, SPECS)
    tag = uuid.uuid4().hex[:6]
    sara, reza, mona = f"sara-{tag}", f"reza-{tag}", f"mona-{tag}"
    team1 = make_team(svc, f"roll-1-{tag}", f"mgr-{tag}", [sara, reza])
    team2 = make_team(svc, f"roll-2-{tag}", f"mgr2-{tag}", [mona])
    line1, line2 = make_line(eng), make_line(eng)
    product = make_product(eng)
    p, p2 = f"pipelines/{pid}", f"pipelines/{pid2}"

    a = create(stub, rep(sara), pipeline=p, amount=irr(1_000_000), product_line=f"productLines/{line1}")
    b = create(stub, rep(reza), pipeline=p, stage=stage(pid, sids[1]), amount=usd(99, 99))
    c = create(
        stub,
        rep(sara),
        pipeline=p,
        lines=[pb.OpportunityLine(product=f"products/{product}", quantity="1.5", unit_price=irr(3_333_333))],
    )
    d = create(stub, rep(mona), pipeline=p2, amount=irr(7), probability=12.5)
    e = create(stub, pipeline=p, amount=irr(0))  # the admin's, no team
    assert_exact(eng)

    move(stub, a.name, stage(pid, sids[1]))  # stage move (probability follows the stage)
    move(stub, b.name, stage(pid, sids[2]))
    update(stub, c.name, ["probability"], probability=66.67)  # same key: only the weighted sum
    update(stub, a.name, ["amount"], amount=irr(1_234_567))  # same key: amount and weighted
    update(stub, b.name, ["owner"], owner=sara)  # owner changes (team kept)
    update(stub, d.name, ["team"], team=f"teams/{team1}")  # team changes
    update(stub, c.name, ["team"], team=f"teams/{team2}")
    update(stub, a.name, ["product_line"], product_line=f"productLines/{line2}")
    update(stub, e.name, ["amount", "currency_code"], amount=usd(5, 50), currency_code="USD")  # another currency
    update(stub, e.name, ["display_name"], display_name="Renamed")  # nothing the rollup reads
    assert_exact(eng)

    stub.WinOpportunity(pb.WinOpportunityRequest(name=a.name), metadata=ADMIN)  # leaves the board
    stub.LoseOpportunity(pb.LoseOpportunityRequest(name=b.name, reason="price"), metadata=ADMIN)
    assert_exact(eng)
    stub.ReopenOpportunity(pb.ReopenOpportunityRequest(name=a.name), metadata=ADMIN)  # back on it
    stub.ReopenOpportunity(pb.ReopenOpportunityRequest(name=b.name, stage=stage(pid, sids[0])), metadata=ADMIN)
    assert_exact(eng)

    o = opportunities
    with eng.begin() as conn:  # soft delete, then an undelete
        conn.execute(o.update().where(o.c.id == oid(c)).values(delete_time=sa.func.now()))
        conn.execute(o.update().where(o.c.id == oid(d)).values(delete_time=sa.func.now()))
    assert_exact(eng)
    with eng.begin() as conn:
        conn.execute(o.update().where(o.c.id == oid(d)).values(delete_time=None))
        # a soft-deleted one changes while deleted: still off the board
        conn.execute(o.update().where(o.c.id == oid(c)).values(amount=5, stage_id=sids[2]))
    assert_exact(eng)
    with eng.begin() as conn:  # multi-row updates: swap two owners, move a pipeline's stage A to C
        conn.execute(
            o.update()
            .where(o.c.owner_id.in_([sara, reza]))
            .values(owner_id=sa.case((o.c.owner_id == sara, reza), else_=sara))
        )
        conn.execute(
            o.update().where(o.c.stage_id == sids[0]).values(stage_id=sids[2], probability=o.c.probability + 1)
        )
    assert_exact(eng)
    with eng.begin() as conn:  # hard deletes, of an open one and of a soft-deleted one
        conn.execute(o.delete().where(o.c.id.in_([oid(e), oid(c)])))  # (lines and history cascade)
    assert_exact(eng)
    # a failed transaction leaves nothing behind
    with pytest.raises(sa.exc.IntegrityError), eng.begin() as conn:
        conn.execute(o.update().where(o.c.id == oid(a)).values(amount=1))
        conn.execute(o.update().where(o.c.id == oid(a)).values(state="bogus"))
    assert_exact(eng)
    # TRUNCATE empties the rollup as well (rolled back here)
    with eng.connect() as conn:
        tx = conn.begin()
        conn.execute(sa.text("TRUNCATE opportunities CASCADE"))
        assert conn.execute(sa.text("SELECT count(*) FROM opportunity_board_rollup")).scalar() == 0
        tx.rollback()
    assert_exact(eng)


def test_concurrent_creates_and_crossing_moves_from_threads(svc, stub):
    eng = svc.ctx.engine
    pid, sids = make_pipeline(eng, SPECS)
    p = f"pipelines/{pid}"
    tag = uuid.uuid4().hex[:6]
    owners = [f"con-{tag}-{i}" for i in range(3)]
    errors: list[BaseException] = []
    start = threading.Barrier(6, timeout=60)

    def creates(i: int):
        try:
            start.wait()
            for j in range(15):  # three threads share each owner: the same rollup row, contended
                create(stub, rep(owners[i % 3]), pipeline=p, amount=irr(1000 + 17 * j + i), probability=10 + j)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=creates, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert_exact(eng)
    with eng.connect() as conn:
        n = conn.execute(
            sa.text("SELECT sum(open_count) FROM opportunity_board_rollup WHERE pipeline_id = :p"), {"p": pid}
        ).scalar()
    assert n == 90

    # Two opportunities of one owner crossing between two stages at once, many times: each move
    # takes two rollup rows, in key order, so none waits for the other in a cycle (a deadlock
    # would abort one: an error here).
    x = create(stub, rep(owners[0]), pipeline=p, stage=stage(pid, sids[0]), amount=irr(5))
    y = create(stub, rep(owners[0]), pipeline=p, stage=stage(pid, sids[1]), amount=irr(6))
    cross = threading.Barrier(2, timeout=60)

    def shuttle(o: Opp, first: int):
        try:
            for k in range(12):
                cross.wait()
                move(stub, o.name, stage(pid, sids[(first + k + 1) % 2]))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    movers = [threading.Thread(target=shuttle, args=(x, 0)), threading.Thread(target=shuttle, args=(y, 1))]
    for t in movers:
        t.start()
    for t in movers:
        t.join()
    assert not errors, [e.details() if isinstance(e, grpc.RpcError) else e for e in errors]
    assert_exact(eng)


# -- the migration's backfill -------------------------------------------------------------------


def test_the_migration_backfills_the_rollup_from_the_rows(databases):
    url = databases.fresh("rollup_backfill")
    migrate(url, SPEC.migrations, "0011")
    eng = sa.create_engine(normalise_url(url), poolclass=sa.NullPool)
    try:
        pid, sids = make_pipeline(eng, SPECS)
        line = make_line(eng)
        o = opportunities
        with eng.begin() as conn:
            conn.execute(
                o.insert(),
                [
                    {
                        "name": f"old {i}",
                        "pipeline_id": pid,
                        "stage_id": sids[i % 5],
                        "state": ("open", "open", "open", "won", "lost")[i % 5],
                        "amount": Decimal(i * 1000) + Decimal("0.25"),
                        "currency_code": ("IRR", "USD")[i % 2],
                        "probability": Decimal(i % 100) + Decimal("0.5"),
                        "owner_id": f"old-{i % 4}",
                        "product_line_id": line if i % 3 else None,
                        "delete_time": dt.datetime.now(dt.UTC) if i % 11 == 0 else None,
                    }
                    for i in range(200)
                ],
            )
        migrate(url, SPEC.migrations)  # to the head: 0012 backfills
        assert_exact(eng)
        with eng.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM opportunity_board_rollup")).scalar() > 10
        with eng.begin() as conn:  # and the trigger works from there on
            conn.execute(o.update().where(o.c.stage_id == sids[0]).values(state="won", stage_id=sids[3]))
        assert_exact(eng)
    finally:
        eng.dispose()


# -- the board from the rollup against the board from the rows ----------------------------------


def test_the_rolled_up_board_equals_the_board_computed_from_the_rows(svc, stub):
    """Every opportunity of this pipeline has a line of one product, so the board filtered by
    that product (computed from the rows: the product filter's path) must be the same board."""
    eng = svc.ctx.engine
    pid, sids = make_pipeline(eng, SPECS)
    p = f"pipelines/{pid}"
    product = make_product(eng)
    tag = uuid.uuid4().hex[:6]
    reps = [f"brd-{tag}-{i}" for i in range(4)]
    boss = f"boss-{tag}"
    team = make_team(svc, f"brd-{tag}", boss, reps[:2])
    other = make_team(svc, f"brd2-{tag}", f"boss2-{tag}", reps[2:])
    line = make_line(eng)
    made = []
    for i in range(40):
        owner = reps[i % 4]
        price = usd(100 + i, i % 100) if i % 5 == 0 else irr(1_000_000 + 12_345 * i)
        fields = {"probability": 7.77 + i} if i % 3 == 0 else {}
        if i % 4 == 1:
            fields["product_line"] = f"productLines/{line}"
        if i % 7 == 0:
            fields["team"] = f"teams/{other if owner in reps[:2] else team}"  # assigned to the other team
        made.append(
            create(
                stub,
                ADMIN,
                pipeline=p,
                stage=stage(pid, sids[i % 3]),
                owner=owner,
                lines=[pb.OpportunityLine(product=f"products/{product}", quantity=str(1 + i % 3), unit_price=price)],
                **fields,
            )
        )
    for i, m in enumerate(made[::3]):
        if i % 3 == 0:
            stub.WinOpportunity(pb.WinOpportunityRequest(name=m.name), metadata=ADMIN)
        elif i % 3 == 1:
            move(stub, m.name, stage(pid, sids[(i + 1) % 3]))
    o = opportunities
    with eng.begin() as conn:  # some have sat in their stage for 40 days, one was soft-deleted
        conn.execute(
            o.update()
            .where(o.c.id.in_([oid(m) for m in made[::2]]))
            .values(stage_enter_time=sa.func.now() - sa.text("interval '40 days'"))
        )
        conn.execute(
            o.update()
            .where(o.c.id.in_([oid(m) for m in made[1::4]]))
            .values(stage_enter_time=sa.func.now() - sa.text("interval '10 days'"))
        )
        conn.execute(o.update().where(o.c.id == oid(made[5])).values(delete_time=sa.func.now()))

    def both(md, **kw):
        rolled = stub.GetPipelineBoard(pb.GetPipelineBoardRequest(pipeline=p, **kw), metadata=md)
        scanned = stub.GetPipelineBoard(
            pb.GetPipelineBoardRequest(pipeline=p, product=f"products/{product}", **kw), metadata=md
        )
        return rolled, scanned

    cases = [
        (ADMIN, {}),
        (ADMIN, {"card_limit": 3}),
        (ADMIN, {"owner": reps[1]}),
        (ADMIN, {"team": f"teams/{team}"}),
        (ADMIN, {"product_line": f"productLines/{line}"}),
        (ADMIN, {"owner": reps[0], "team": f"teams/{other}"}),
        (manager(boss), {}),
        (manager(boss), {"owner": reps[2]}),
        (manager(f"nobody-{tag}"), {}),
        (rep(reps[0]), {}),
        (rep(reps[3]), {"product_line": f"productLines/{line}"}),
    ]
    for md, kw in cases:
        rolled, scanned = both(md, **kw)
        assert rolled == scanned, kw
    admin_board, _ = both(ADMIN)
    assert admin_board.total_count == 40 - 5 - 1  # five won, one deleted
    assert sum(s.rotting_count for s in admin_board.stages) > 0
    assert any(len(s.amounts) == 2 for s in admin_board.stages)  # IRR and USD side by side


def test_a_move_takes_the_two_rollup_rows_in_key_order(svc, stub):
    """The trigger touches the lower key first whatever the direction of the move (so that two
    crossing moves cannot wait for each other in a cycle): with the higher key's row held by
    another transaction, a move from the higher key to the lower one has already locked the
    lower row when it waits."""
    eng = svc.ctx.engine
    pid, sids = make_pipeline(eng, SPECS)
    low, high = sorted(sids[:2], key=str)
    who = rep(f"order-{uuid.uuid4().hex[:6]}")
    x = create(stub, who, pipeline=f"pipelines/{pid}", stage=stage(pid, high), amount=irr(10))
    create(stub, who, pipeline=f"pipelines/{pid}", stage=stage(pid, low), amount=irr(20))  # the low key's row exists
    row = sa.text(
        "SELECT 1 FROM opportunity_board_rollup WHERE pipeline_id = :p AND stage_id = :s AND owner_id = :o "
        "FOR UPDATE NOWAIT"
    )
    owner = x.owner
    holder = eng.connect()
    holder.begin()
    holder.execute(row, {"p": pid, "s": high, "o": owner})  # the high key's row, held
    mover_pid: list[int] = []
    done: list[BaseException | None] = []

    def mover():
        try:
            with eng.begin() as conn:
                mover_pid.append(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar())
                conn.execute(opportunities.update().where(opportunities.c.id == oid(x)).values(stage_id=low))
            done.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            done.append(exc)

    t = threading.Thread(target=mover)
    t.start()
    try:
        with eng.connect() as probe:  # until the mover waits for a lock
            for _ in range(200):
                waiting = (
                    mover_pid
                    and probe.execute(
                        sa.text("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = :p"),
                        {"p": mover_pid[0]},
                    ).scalar()
                )
                if waiting:
                    break
                threading.Event().wait(0.05)
            assert waiting
        with pytest.raises(sa.exc.OperationalError, match="could not obtain lock"), holder.begin_nested():
            holder.execute(row, {"p": pid, "s": low, "o": owner})  # the low key's row: the mover has it
    finally:
        holder.rollback()
        holder.close()
        t.join(30)
    assert done == [None]
    assert_exact(eng)
