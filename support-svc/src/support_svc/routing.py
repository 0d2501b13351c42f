"""Push routing (proto/crm/support/v1/routing.proto): a ticket of a team with nobody assigned,
in an open state, is offered to ONE eligible member; accepted it is theirs, declined or left
to expire it goes to the next eligible member at once; when nobody is eligible it waits and is
offered the moment someone has room.

Eligible (one SQL statement chooses, `_CHOOSE`): a member of the ticket's team, active,
online, not busy (busy_until in the future: after-call work), who has not declined this
ticket nor let an offer of it expire, whose load (the channel weights of their open assigned
tickets plus their pending offers) plus this ticket's weight fits their capacity, and for a
SKILLS team who has the category's skill and speaks the ticket's language. Among them:
ROUND_ROBIN the next after teams.rr_cursor in agent id order (wrapping), LEAST_LOADED the
lowest load / capacity, SKILLS the least loaded of the skilled.

Room frees -> offers at once (no sweep): a ticket resolved, closed or reassigned (its old
assignee), an agent online (SetPresence), capacity raised (UpdateAgent), added to a team, and
after-call work over (timer "agent.available" at busy_until, see `set_busy_until`). The agent
is offered the waiting tickets of their teams, priority first then oldest, until full.

Consistency: a ticket has at most one live offer (partial unique index); every answer locks
the offer, then the ticket (AcceptOffer, DeclineOffer and the "offer.expire" timer take the
same order, so exactly one of them wins; the others see the offer no longer open). The
chosen agent's row is locked (FOR UPDATE SKIP LOCKED: concurrent offers spread over agents
instead of waiting) and the capacity is checked again by the INSERT, in a snapshot taken
after the lock, so two tickets offered at the same time never overfill one agent. Timers are
durable: a pending offer survives a restart and still expires.
"""

from __future__ import annotations

import datetime as dt
import logging

import sqlalchemy as sa

from crm.support.v1 import routing_pb2 as pb
from crm.support.v1 import routing_pb2_grpc
from crm.support.v1 import support_events_pb2 as ev_pb
from crm_chassis import timers
from crm_chassis.auth import Principal
from crm_chassis.columns import TIMESTAMPTZ, UUID, id_column
from crm_chassis.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from crm_chassis.filtering import keyset_page
from crm_chassis.grpc_server import Registration
from crm_chassis.interceptors import current_principal
from crm_chassis.pagination import PageTokens, page_size
from crm_chassis.resources import ResourceName
from crm_chassis.work_tables import timers as timer_rows

from .runtime import Support
from .tables import agents, metadata, tickets
from .ticketing import AGENT, DONE_STATES, OPEN_STATES, TICKET, Tickets, opened_here, tx_memo

log = logging.getLogger("support.routing")

OFFER = ResourceName("ticketOffers/{offer_id}")
TEAM = ResourceName("teams/{team_id}")

EXPIRE = "offer.expire"  # timer kind; key: the offer id
AVAILABLE = "agent.available"  # timer kind; key: the agent id (at busy_until)
STATES = ("offered", "accepted", "declined", "expired", "withdrawn")
STATE_ENUM = {s: pb.TicketOffer.State.Value(f"STATE_{s.upper()}") for s in STATES}
STRATEGIES = ("round_robin", "least_loaded", "skills")
FREED = "capacity_freed"  # the strategy of an offer made because the agent had room
REASON_LIMIT = 500
MAX_FILL = 100  # offers at most this many waiting tickets to one agent in one go

ticket_offers = sa.Table(
    "ticket_offers",
    metadata,
    id_column(),
    sa.Column("ticket_id", UUID, sa.ForeignKey("tickets.id", ondelete="CASCADE"), nullable=False),
    sa.Column("agent_id", sa.Text, sa.ForeignKey("agents.id", ondelete="CASCADE"), nullable=False),
    sa.Column("team_id", UUID, sa.ForeignKey("teams.id", ondelete="SET NULL")),
    sa.Column("strategy", sa.Text, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("state", sa.Text, nullable=False, server_default="offered"),
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
    sa.Column("offer_time", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
    sa.Column("expire_time", TIMESTAMPTZ, nullable=False),
    sa.Column("answer_time", TIMESTAMPTZ),
    sa.CheckConstraint(f"state IN {STATES!r}", name="ticket_offers_state"),
)
o = ticket_offers.c
# A ticket has at most one live offer.
sa.Index("ticket_offers_live", o.ticket_id, unique=True, postgresql_where=o.state == "offered")
# A ticket's history (and who declined or let it expire).
sa.Index("ticket_offers_ticket", o.ticket_id, o.offer_time.desc(), o.id.desc())
# An agent's offers (their pending ones: the load, "my offers").
sa.Index("ticket_offers_agent", o.agent_id, o.offer_time.desc(), o.id.desc())
sa.Index("ticket_offers_agent_live", o.agent_id, postgresql_where=o.state == "offered")
# An agent's last offer in a team (round robin, migration 0012).
sa.Index("ticket_offers_agent_team", o.agent_id, o.team_id, o.offer_time)

# -- the SQL ------------------------------------------------------------------------------------
# An agent's load: the weights of their open assigned tickets and of their pending offers.
_DONE = "('resolved', 'closed')"
LOAD_SQL = f"""(
  (SELECT coalesce(sum(coalesce(lw.weight, 1)), 0) FROM tickets lt
     LEFT JOIN channel_weights lw ON lw.channel = lt.channel
    WHERE lt.assignee_id = {{agent}} AND lt.state NOT IN {_DONE})
+ (SELECT coalesce(sum(coalesce(ow.weight, 1)), 0) FROM ticket_offers lo
     JOIN tickets ot ON ot.id = lo.ticket_id
     LEFT JOIN channel_weights ow ON ow.channel = ot.channel
    WHERE lo.agent_id = {{agent}} AND lo.state = 'offered')
)"""
_WEIGHT = "coalesce((SELECT weight FROM channel_weights WHERE channel = {channel}), 1)"
# Who declined this ticket or let an offer of it expire (read once, by the ticket's index).
_REFUSED = """ARRAY(SELECT x.agent_id FROM ticket_offers x WHERE x.ticket_id = CAST(:ticket AS uuid)
                      AND x.state IN ('declined', 'expired'))"""
_ELIGIBLE = """a.active AND a.presence = 'online' AND (a.busy_until IS NULL OR a.busy_until <= now())"""

# The one agent to offer a ticket to (strategy-specific ORDER BY), locked.
_CHOOSE = """
SELECT a.id, l.load, a.capacity
  FROM team_members m
  JOIN agents a ON a.id = m.agent_id
  CROSS JOIN LATERAL (SELECT {load} AS load) l
 WHERE m.team_id = CAST(:team AS uuid)
   AND {eligible}
   AND NOT (a.id = ANY({refused}))
   AND NOT (a.id = ANY(CAST(:tried AS text[])))
   AND l.load + {weight} <= a.capacity
   {skills}
 ORDER BY {order}
 LIMIT 1
 FOR UPDATE OF a SKIP LOCKED
"""
_SKILLS = """AND (:skill = '' OR :skill = ANY(a.skills)) AND :language = ANY(a.languages)"""
_ORDERS = {
    "least_loaded": "l.load::float8 / greatest(a.capacity, 1), a.id",
    "skills": "l.load::float8 / greatest(a.capacity, 1), a.id",
}
# Round robin: the member offered a ticket of this team longest ago (never: first), then by id.
# The order needs no load, so the members are taken in turn (locked as they are taken, skipping
# those a concurrent offer holds) and the load is computed only until one has room. No cursor
# row is written: concurrent offers into one team never wait on each other, and each sees the
# others' offers once committed (the one being made locks its agent: the others skip them).
_CHOOSE_ROUND_ROBIN = """
SELECT c.id, l.load, c.capacity
  FROM (SELECT a.id, a.capacity
          FROM team_members m
          JOIN agents a ON a.id = m.agent_id
         WHERE m.team_id = CAST(:team AS uuid)
           AND {eligible}
           AND NOT (a.id = ANY({refused}))
           AND NOT (a.id = ANY(CAST(:tried AS text[])))
         ORDER BY (SELECT max(r.offer_time) FROM ticket_offers r
                    WHERE r.agent_id = a.id AND r.team_id = CAST(:team AS uuid)) NULLS FIRST, a.id
         FOR UPDATE OF a SKIP LOCKED) c
 CROSS JOIN LATERAL (SELECT {load} AS load) l
 WHERE l.load + {weight} <= c.capacity
 LIMIT 1
"""


def _choose_sql(strategy: str) -> sa.TextClause:
    if strategy == "round_robin":
        return sa.text(
            _CHOOSE_ROUND_ROBIN.format(
                load=LOAD_SQL.format(agent="c.id"),
                eligible=_ELIGIBLE,
                refused=_REFUSED,
                weight=_WEIGHT.format(channel=":channel"),
            )
        )
    return sa.text(
        _CHOOSE.format(
            load=LOAD_SQL.format(agent="a.id"),
            eligible=_ELIGIBLE,
            refused=_REFUSED,
            weight=_WEIGHT.format(channel=":channel"),
            skills=_SKILLS if strategy == "skills" else "",
            order=_ORDERS[strategy],
        )
    )


CHOOSE = {s: _choose_sql(s) for s in STRATEGIES}

# The offer, inserted only if the agent (locked) still has room in a snapshot taken now.
INSERT = sa.text(
    f"""
INSERT INTO ticket_offers (ticket_id, agent_id, team_id, strategy, attempt, state, offer_time, expire_time)
SELECT CAST(:ticket AS uuid), a.id, CAST(:team AS uuid), :strategy,
       (SELECT count(*) + 1 FROM ticket_offers p WHERE p.ticket_id = CAST(:ticket AS uuid)),
       'offered', now(), now() + make_interval(secs => :timeout)
  FROM agents a
 WHERE a.id = :agent AND {LOAD_SQL.format(agent="a.id")} + {_WEIGHT.format(channel=":channel")} <= a.capacity
ON CONFLICT (ticket_id) WHERE state = 'offered' DO NOTHING
RETURNING *
"""
)

# The next waiting ticket of the agent's teams that fits them (priority first, then oldest).
WAITING = sa.text(
    f"""
SELECT t.id, t.team_id, t.channel, tm.offer_timeout_seconds
  FROM agents a
  JOIN team_members m ON m.agent_id = a.id
  JOIN teams tm ON tm.id = m.team_id AND tm.active
  JOIN tickets t ON t.team_id = m.team_id
  LEFT JOIN categories c ON c.id = t.category_id
 WHERE a.id = :agent
   AND t.state IN :open_states AND t.assignee_id = ''
   AND NOT EXISTS (SELECT 1 FROM ticket_offers x WHERE x.ticket_id = t.id
                    AND (x.state = 'offered' OR (x.agent_id = a.id AND x.state IN ('declined', 'expired'))))
   AND (tm.strategy <> 'skills'
        OR ((coalesce(c.skill, '') = '' OR c.skill = ANY(a.skills)) AND t.language = ANY(a.languages)))
   AND {LOAD_SQL.format(agent="a.id")} + {_WEIGHT.format(channel="t.channel")} <= a.capacity
 ORDER BY CASE t.priority WHEN 'urgent' THEN 4 WHEN 'high' THEN 3 WHEN 'normal' THEN 2 ELSE 1 END DESC,
          t.create_time, t.id
 LIMIT 1
 FOR UPDATE OF t SKIP LOCKED
"""
).bindparams(sa.bindparam("open_states", expanding=True))


def load_of(conn: sa.Connection, agent_id: str) -> int:
    """An agent's weighted load now."""
    return int(conn.execute(sa.text(f"SELECT {LOAD_SQL.format(agent=':agent')}"), {"agent": agent_id}).scalar())


def load_column(agent_col) -> sa.ColumnElement:
    """The load as a column of a query over agents (ListAgents, GetAgent)."""
    return sa.literal_column(LOAD_SQL.format(agent=f"{agent_col.table.name}.{agent_col.name}"), sa.Integer)


# -- conversions ------------------------------------------------------------------------------
def to_proto(row) -> pb.TicketOffer:
    out = pb.TicketOffer(
        name=OFFER.format(row.id),
        ticket=TICKET.format(row.ticket_id),
        agent=AGENT.format(row.agent_id),
        team=TEAM.format(row.team_id) if row.team_id else "",
        strategy=row.strategy,
        attempt=row.attempt,
        state=STATE_ENUM[row.state],
        reason=row.reason,
    )
    out.offer_time.FromDatetime(row.offer_time)
    out.expire_time.FromDatetime(row.expire_time)
    if row.answer_time is not None:
        out.answer_time.FromDatetime(row.answer_time)
    return out


def _event(row, now: dt.datetime) -> ev_pb.OfferEvent:
    e = ev_pb.OfferEvent(
        ticket=TICKET.format(row.ticket_id),
        offer=OFFER.format(row.id),
        agent=AGENT.format(row.agent_id),
        team=TEAM.format(row.team_id) if row.team_id else "",
        strategy=row.strategy,
        attempt=row.attempt,
        reason=row.reason,
    )
    e.offer_time.FromDatetime(row.offer_time)
    e.expire_time.FromDatetime(row.expire_time)
    e.event_time.FromDatetime(now)
    return e


def _now(conn: sa.Connection) -> dt.datetime:
    return conn.execute(sa.select(sa.func.now())).scalar()


def _cancel_timer(conn: sa.Connection, kind: str, key: str) -> None:
    """Cancel a timer unless it is firing right now (its row locked by the worker): that firing
    then finds its offer answered and does nothing. A plain delete would wait for the firing,
    which waits for the offer this transaction holds: a deadlock."""
    t = timer_rows.c
    locked = (
        sa.select(t.id).where(t.kind == kind, t.key == str(key)).with_for_update(skip_locked=True).scalar_subquery()
    )
    conn.execute(timer_rows.delete().where(t.id.in_(locked)))


# -- the engine -------------------------------------------------------------------------------
class Router:
    def __init__(self, support: Support):
        self.support = support
        self.uow = support.uow
        self.tokens = PageTokens(support.ctx.settings.jwt_secret, "ticket-offers")

    # offering ---------------------------------------------------------------------------------
    def offer(self, tx, ticket) -> object | None:
        """Offer a ticket (a row of tickets, locked by the caller) to the next eligible member
        of its team; the offer row, or None (not routable now, or nobody eligible: it waits)."""
        if not ticket.team_id or ticket.assignee_id or ticket.state not in OPEN_STATES:
            return None
        conn = tx.conn
        team = Tickets.team(conn, ticket.team_id)
        if team is None or not team.active:
            return None
        offered = tx_memo(conn, "routing.offered")
        # one live offer at a time (a ticket opened in this transaction and not offered yet has none)
        if (str(ticket.id) in offered or not opened_here(conn, ticket.id)) and conn.execute(
            sa.select(o.id).where(o.ticket_id == ticket.id, o.state == "offered")
        ).first():
            return None
        strategy = team.strategy if team.strategy in STRATEGIES else "round_robin"
        params = {
            "team": str(team.id),
            "ticket": str(ticket.id),
            "channel": ticket.channel,
            "skill": "",
            "language": ticket.language or "fa",
        }
        if strategy == "skills" and ticket.category_id:
            cat = Tickets.category(conn, ticket.category_id)
            params["skill"] = (cat.skill if cat is not None else "") or ""
        tried: list[str] = []
        for _ in range(3):  # an agent filled by a concurrent offer since the choice: the next one
            chosen = conn.execute(CHOOSE[strategy], {**params, "tried": tried}).first()
            if chosen is None:
                return None
            row = self._insert(tx, ticket, chosen.id, team.id, strategy, team.offer_timeout_seconds)
            if row is not None:
                return row
            tried.append(chosen.id)
        return None

    def _insert(self, tx, ticket, agent_id: str, team_id, strategy: str, timeout: int):
        conn = tx.conn
        row = conn.execute(
            INSERT,
            {
                "ticket": str(ticket.id),
                "agent": agent_id,
                "team": str(team_id),
                "strategy": strategy,
                "timeout": float(timeout),
                "channel": ticket.channel,
            },
        ).one_or_none()
        if row is None:
            return None
        tx_memo(conn, "routing.offered")[str(ticket.id)] = True
        timers.schedule(conn, EXPIRE, str(row.id), row.expire_time, {"ticket_id": str(ticket.id)})
        tx.publish("ticket.offered.v1", _event(row, row.offer_time), TICKET.format(ticket.id))
        return row

    def fill(self, tx, agent_id: str) -> list:
        """Offer the waiting tickets of the agent's teams to them (priority first, then the
        oldest) until they are full; the offers made."""
        conn = tx.conn
        agent = conn.execute(
            sa.select(agents).where(agents.c.id == agent_id).with_for_update()  # serializes with offers to them
        ).one_or_none()
        if agent is None or not agent.active or agent.presence != "online":
            return []
        if agent.busy_until is not None and agent.busy_until > _now(conn):
            return []
        made = []
        for _ in range(MAX_FILL):
            w = conn.execute(WAITING, {"agent": agent_id, "open_states": list(OPEN_STATES)}).first()
            if w is None:
                break
            ticket = conn.execute(sa.select(tickets).where(tickets.c.id == w.id)).one()
            row = self._insert(tx, ticket, agent_id, w.team_id, FREED, w.offer_timeout_seconds)
            if row is None:
                break
            made.append(row)
        return made

    def withdraw(self, tx, where, reason: str, reoffer: bool = True) -> list:
        """Take back the live offers matching `where` (e.g. the agent went offline) and offer
        their tickets to someone else; the withdrawn offers."""
        conn = tx.conn
        rows = conn.execute(
            ticket_offers.update()
            .where(o.state == "offered", where)
            .values(state="withdrawn", reason=reason, answer_time=sa.func.now())
            .returning(ticket_offers)
        ).all()
        for row in rows:
            _cancel_timer(conn, EXPIRE, str(row.id))
        if rows:  # the agent's pending offer went away: their client drops it
            tx.publish_many(
                "ticket.offer_withdrawn.v1", [(TICKET.format(r.ticket_id), _event(r, r.answer_time)) for r in rows]
            )
        if reoffer:
            for row in rows:
                self.offer(tx, Tickets.lock(conn, row.ticket_id))
        return rows

    # hooks ------------------------------------------------------------------------------------
    def on_opened(self, tx, ticket) -> None:
        self.offer(tx, ticket)

    def on_changed(self, tx, before, after) -> None:
        """A ticket changed (any part): withdraw an offer that no longer fits, free the old
        assignee's room, offer a ticket that became routable."""
        team_changed = before.team_id != after.team_id
        assigned = bool(after.assignee_id) and after.assignee_id != before.assignee_id
        done = after.state in DONE_STATES and before.state not in DONE_STATES
        if team_changed or assigned or done:
            self.withdraw(
                tx,
                o.ticket_id == after.id,
                "ticket assigned" if assigned else "ticket closed" if done else "ticket moved to another team",
                reoffer=False,
            )
        freed = ""
        if before.assignee_id and before.state not in DONE_STATES and (after.assignee_id != before.assignee_id or done):
            freed = before.assignee_id
        routable = bool(after.team_id) and not after.assignee_id and after.state in OPEN_STATES
        if routable and (team_changed or before.assignee_id or before.state in DONE_STATES):
            self.offer(tx, after)
        if freed:
            self.fill(tx, freed)

    # answers ----------------------------------------------------------------------------------
    def _locked_offer(self, conn, name: str, principal: Principal):
        oid = OFFER.parse(name).id
        row = conn.execute(sa.select(ticket_offers).where(o.id == oid).with_for_update()).one_or_none()
        if row is None:
            raise OFFER.not_found(name)
        if row.agent_id != principal.subject:
            raise PermissionDenied(
                f"{name} was offered to {AGENT.format(row.agent_id)}, not to you", reason="NOT_YOUR_OFFER"
            )
        if row.state != "offered":
            raise FailedPrecondition(
                "offer is no longer open", reason="OFFER_NOT_OPEN", metadata={"name": name, "state": row.state}
            )
        return row

    def accept(self, name: str, principal: Principal) -> pb.TicketOffer:
        with self.uow.begin() as tx:
            conn = tx.conn
            row = self._locked_offer(conn, name, principal)
            Tickets.lock(conn, row.ticket_id)
            row = conn.execute(
                ticket_offers.update()
                .where(o.id == row.id)
                .values(state="accepted", answer_time=sa.func.now())
                .returning(ticket_offers)
            ).one()
            _cancel_timer(conn, EXPIRE, str(row.id))
            self.support.tickets.update(
                tx, row.ticket_id, {"assignee_id": row.agent_id}, principal.subject, reason="offer accepted"
            )
            tx.publish("ticket.offer_accepted.v1", _event(row, row.answer_time), TICKET.format(row.ticket_id))
        return to_proto(row)

    def decline(self, name: str, reason: str, principal: Principal) -> pb.TicketOffer:
        reason = reason.strip()
        if not reason:
            raise InvalidArgument.field("reason", "is required: say why you decline")
        if len(reason) > REASON_LIMIT:
            raise InvalidArgument.field("reason", f"must be at most {REASON_LIMIT} characters")
        with self.uow.begin() as tx:
            conn = tx.conn
            row = self._locked_offer(conn, name, principal)
            ticket = Tickets.lock(conn, row.ticket_id)
            row = conn.execute(
                ticket_offers.update()
                .where(o.id == row.id)
                .values(state="declined", reason=reason, answer_time=sa.func.now())
                .returning(ticket_offers)
            ).one()
            _cancel_timer(conn, EXPIRE, str(row.id))
            tx.publish("ticket.offer_declined.v1", _event(row, row.answer_time), TICKET.format(row.ticket_id))
            self.offer(tx, ticket)
        return to_proto(row)

    # timers -----------------------------------------------------------------------------------
    def expire(self, conn: sa.Connection, due: list[timers.Timer]) -> dict[str, str]:
        """offer.expire, a batch: the offers not answered in time expire and each ticket is
        offered to the next agent. Returns {timer key: reason} of those to retry.

        Offers, then their tickets, are locked in id order SKIP LOCKED: an offer being answered
        (AcceptOffer, DeclineOffer hold it) or a ticket held by a change is left out and its timer
        retried soon (it then finds the offer answered, or expires it); waiting instead, while
        this transaction holds the batch's timer rows, could deadlock with a change that
        withdraws the offer. The offers expire in one UPDATE and their events go out by one
        `publish_many`; then each ticket is re-offered (`offer`)."""
        if not due:
            return {}
        ids = sorted({t.key for t in due})
        rows = conn.execute(
            sa.select(ticket_offers).where(o.id.in_(ids)).order_by(o.id).with_for_update(skip_locked=True)
        ).all()
        retry: dict[str, str] = {}
        got = {str(r.id) for r in rows}
        missing = [i for i in ids if i not in got]
        if missing:  # being answered right now (or gone: nothing to do)
            for oid in conn.execute(sa.select(o.id).where(o.id.in_(missing))).scalars():
                retry[str(oid)] = f"offer {oid} is locked by another transaction; retried"
        live = [r for r in rows if r.state == "offered"]  # the others were answered meanwhile
        if not live:
            return retry
        ticket_ids = sorted({str(r.ticket_id) for r in live})
        held = {
            str(t.id): t
            for t in conn.execute(
                sa.select(tickets)
                .where(tickets.c.id.in_(ticket_ids))
                .order_by(tickets.c.id)
                .with_for_update(skip_locked=True)
            )
        }
        go = []
        for r in live:
            if str(r.ticket_id) in held:
                go.append(r.id)
            else:
                retry[str(r.id)] = f"ticket {r.ticket_id} is locked by another transaction; retried"
        if not go:
            return retry
        expired = conn.execute(
            ticket_offers.update()
            .where(o.id.in_(go), o.state == "offered")
            .values(state="expired", answer_time=sa.func.now())
            .returning(ticket_offers)
        ).all()
        expired.sort(key=lambda r: str(r.ticket_id))
        with self.uow.joined(conn) as tx:
            tx.publish_many(
                "ticket.offer_expired.v1",
                [(TICKET.format(r.ticket_id), _event(r, r.answer_time)) for r in expired],
            )
            for r in expired:
                self.offer(tx, held[str(r.ticket_id)])
        return retry

    def available(self, conn: sa.Connection, timer: timers.Timer) -> None:
        """agent.available: after-call work is over; offer the agent what waits."""
        with self.uow.joined(conn) as tx:
            self.fill(tx, timer.key)

    # reading ----------------------------------------------------------------------------------
    def list(self, req: pb.ListOffersRequest, principal: Principal) -> tuple[list[pb.TicketOffer], str]:
        limit = page_size(req.page_size)
        parent = req.parent.strip()
        if parent.startswith("tickets/"):
            tid = TICKET.parse(parent, "parent").id
            where = [o.ticket_id == tid]
        elif parent.startswith("agents/"):
            agent_id = principal.subject if parent == "agents/me" else AGENT.parse(parent, "parent").id
            if agent_id != principal.subject and not principal.has("agents.write"):
                raise PermissionDenied("only a manager sees another agent's offers", reason="NOT_YOUR_OFFERS")
            where = [o.agent_id == agent_id]
            if not req.include_answered:
                where.append(o.state == "offered")
        else:
            raise InvalidArgument.field("parent", "is required: tickets/{ticket_id}, agents/{agent_id} or agents/me")
        order = [(o.offer_time, True), (o.id, True)]
        purpose = f"{parent}|{req.include_answered}"
        with self.uow.read() as conn:
            rows, token = keyset_page(
                conn, sa.select(ticket_offers).where(*where), order, self.tokens, purpose, limit, req.page_token
            )
        return [to_proto(r) for r in rows], token


def set_busy_until(tx, agent_id: str, until: dt.datetime) -> None:
    """Mark an agent busy (after-call work) until `until`: offered nothing before it, and the
    waiting tickets of their teams offered to them then (timer agent.available). For the calls
    part, in the transaction that logs the call."""
    tx.conn.execute(agents.update().where(agents.c.id == agent_id).values(busy_until=until))
    timers.schedule(tx.conn, AVAILABLE, agent_id, until)


# -- the part -------------------------------------------------------------------------------
class RoutingServicer(routing_pb2_grpc.RoutingServiceServicer):
    def __init__(self, router: Router):
        self.router = router

    def AcceptOffer(self, request, context):
        return self.router.accept(request.name, current_principal())

    def DeclineOffer(self, request, context):
        return self.router.decline(request.name, request.reason, current_principal())

    def ListOffers(self, request, context):
        items, token = self.router.list(request, current_principal())
        return pb.ListOffersResponse(offers=items, next_page_token=token)


def router(support: Support) -> Router:
    return support.once("routing", lambda: Router(support))


def install(support: Support) -> None:
    support.hooks.opened.append(lambda tx, ticket: router(support).on_opened(tx, ticket))
    support.hooks.changed.append(lambda tx, before, after: router(support).on_changed(tx, before, after))


def registration(support: Support) -> Registration:
    return Registration.of(RoutingServicer(router(support)))


def timer_handlers(support: Support) -> None:
    # A retry is an offer or ticket busy right now: many, so that one never stays 'offered'.
    support.timers.register_batch(EXPIRE, router(support).expire, max_attempts=50)
    support.timers.register(AVAILABLE, router(support).available)
