"""sales-svc started in-process on a fresh database per test module (relay off: tests read the
events from the outbox table), plus callers of each role."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from crm_chassis.messaging.outbox import row_to_event
from crm_chassis.messaging.tables import outbox
from sales_svc.__main__ import SPEC
from tests.support.harness import channel, md, start_service

ADMIN = md("admin", "ada")


def rep(sub: str):
    """Call metadata of a sales rep (sees own records only)."""
    return md("sales_rep", sub)


def manager(sub: str):
    """Call metadata of a sales manager (sees the teams they manage)."""
    return md("sales_manager", sub)


@pytest.fixture(scope="module")
def svc(request, databases, broker):
    service = start_service(
        SPEC, databases.fresh(request.module.__name__.rsplit(".", 1)[-1][:20]), broker.url, relay=False
    )
    yield service
    service.stop(0)


@pytest.fixture(scope="module")
def ch(svc):
    with channel(svc) as c:
        yield c


def events(svc, routing_key: str, message_cls=None) -> list:
    """The events of this routing key in the outbox, oldest first (parsed if a class is given)."""
    with svc.ctx.engine.connect() as conn:
        rows = conn.execute(sa.select(outbox).where(outbox.c.routing_key == routing_key).order_by(outbox.c.id)).all()
    evs = [row_to_event(r) for r in rows]
    return [e.parse(message_cls) for e in evs] if message_cls else evs


def make_team(svc, name: str, manager_id: str, members: list[str]) -> str:
    """A team straight in the database (for tests of other parts than teams)."""
    from sales_svc.tables import team_members, teams

    with svc.ctx.engine.begin() as conn:
        tid = conn.execute(teams.insert().values(name=name, manager_id=manager_id).returning(teams.c.id)).scalar()
        if members:
            conn.execute(team_members.insert(), [{"team_id": tid, "member_id": m} for m in members])
    return tid
