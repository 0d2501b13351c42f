"""support-svc started in-process on a fresh database per test module (relay off: tests read the
events from the outbox table), plus callers of each role and helpers to make what tests need."""

from __future__ import annotations

import os

import pytest
import sqlalchemy as sa

from crm_chassis.messaging.outbox import row_to_event
from crm_chassis.messaging.tables import outbox
from support_svc.__main__ import SPEC
from support_svc.runtime import Support
from tests.support.harness import channel, md, start_service

ADMIN = md("admin", "ada")
# The in-process service runs mail-in (serve does): on any free port, never a running suite's 2525.
os.environ.setdefault("MAIL_IN_PORT", "0")


def agent_md(sub: str):
    """Call metadata of a support agent."""
    return md("support_agent", sub)


def manager_md(sub: str):
    """Call metadata of a support manager."""
    return md("support_manager", sub)


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


def rt(svc) -> Support:
    """The service's runtime (unit of work, timers, hooks, tickets)."""
    return svc.ctx.shared["runtime"]


def events(svc, routing_key: str, message_cls=None, subject: str | None = None) -> list:
    """The events of this routing key in the outbox, oldest first (parsed if a class is given)."""
    q = sa.select(outbox).where(outbox.c.routing_key == routing_key).order_by(outbox.c.id)
    if subject is not None:
        q = q.where(outbox.c.subject == subject)
    with svc.ctx.engine.connect() as conn:
        rows = conn.execute(q).all()
    evs = [row_to_event(r) for r in rows]
    return [e.parse(message_cls) for e in evs] if message_cls else evs


def make_agent(svc, agent_id: str, *, teams=(), skills=(), capacity=10, presence="online", languages=("fa",)) -> str:
    """An agent straight in the database (for tests of other parts than agents)."""
    from support_svc.tables import agents, team_members

    with svc.ctx.engine.begin() as conn:
        conn.execute(
            agents.insert().values(
                id=agent_id,
                display_name=agent_id,
                skills=list(skills),
                capacity=capacity,
                presence=presence,
                languages=list(languages),
            )
        )
        for t in teams:
            conn.execute(team_members.insert().values(team_id=t, agent_id=agent_id))
    return agent_id


def make_team(svc, name: str, **values) -> str:
    """A team straight in the database; values: strategy, offer_timeout_seconds, manager_id, ..."""
    from support_svc.tables import teams

    with svc.ctx.engine.begin() as conn:
        return str(conn.execute(teams.insert().values(name=name, **values).returning(teams.c.id)).scalar())


def category_id(svc, key: str) -> str:
    from support_svc.tables import categories

    with svc.ctx.engine.connect() as conn:
        return str(conn.execute(sa.select(categories.c.id).where(categories.c.key == key)).scalar_one())


def open_ticket(svc, subject="کالا خراب رسید", channel="email", body="سلام، سفارشم خراب رسید.", **values):
    """A ticket opened through the core (ticketing.Tickets.open); returns its row."""
    from support_svc.ticketing import NewTicket

    r = rt(svc)
    with r.uow.begin() as tx:
        return r.tickets.open(tx, NewTicket(subject=subject, channel=channel, body=body, **values), "tester")


def add_message(svc, ticket_id, kind, body="", **kw):
    r = rt(svc)
    with r.uow.begin() as tx:
        return r.tickets.add_message(tx, ticket_id, kind, body, author=kw.pop("author", "agent-1"), **kw)


def ticket(svc, ticket_id):
    from support_svc.ticketing import Tickets

    with svc.ctx.engine.connect() as conn:
        return Tickets.get(conn, ticket_id)
