"""The live queue view (QueueService.GetQueueView): per team and agent, what is open, waiting,
being offered and about to breach, plus the tickets nearest to a breach.

Four set-based statements in one REPEATABLE READ snapshot (so the counts agree with each other):
the open tickets grouped by team (an index-only scan of `tickets_queue`), the live offers by
team, the SLA clocks of open tickets by team and by assignee, and the agents with their load.
"""

from __future__ import annotations

import sqlalchemy as sa

from crm.support.v1 import queue_pb2 as pb
from crm.support.v1 import queue_pb2_grpc
from crm_chassis.errors import FieldViolation, InvalidArgument
from crm_chassis.grpc_server import Registration

from .routing import LOAD_SQL
from .runtime import Support
from .tables import tickets
from .ticketing import AGENT, TEAM, TICKET, number_text

# The open tickets' queue columns, for an index-only count per team (migration 0011).
sa.Index(
    "tickets_queue",
    tickets.c.team_id,
    tickets.c.state,
    tickets.c.assignee_id,
    tickets.c.create_time,
    postgresql_where=tickets.c.state.notin_(["resolved", "closed"]),
)

DEFAULT_HORIZON = 30
DEFAULT_AT_RISK = 20

_DONE = "('resolved', 'closed')"
_ACTIVE = "('new', 'open', 'reopened')"
# The soonest target of a clock that still runs (not met, not breached) and the soonest breached.
_DUE = """
  CASE WHEN NOT s.first_response_breached AND NOT s.first_response_met THEN s.first_response_due END,
  CASE WHEN NOT s.next_response_breached THEN s.next_response_due END,
  CASE WHEN NOT s.resolution_breached AND NOT s.resolution_met THEN s.resolution_due END
"""
_BREACHED = "(s.first_response_breached OR s.next_response_breached OR s.resolution_breached)"

_TEAMS = sa.text(
    f"""
SELECT t.team_id::text AS team_id,
       count(*) FILTER (WHERE t.state IN {_ACTIVE}) AS open,
       count(*) FILTER (WHERE t.state = 'waiting_on_customer') AS waiting_on_customer,
       count(*) FILTER (WHERE t.state = 'waiting_on_third_party') AS waiting_on_third_party,
       count(*) FILTER (WHERE t.state IN {_ACTIVE} AND t.assignee_id = '') AS unassigned_all,
       min(t.create_time) FILTER (WHERE t.state IN {_ACTIVE} AND t.assignee_id = '') AS oldest_unassigned
  FROM tickets t
 WHERE t.state NOT IN {_DONE} AND (CAST(:team AS uuid) IS NULL OR t.team_id = CAST(:team AS uuid))
 GROUP BY t.team_id
"""
)
_OFFERS = sa.text(
    """
SELECT o.team_id::text AS team_id, count(*) AS n FROM ticket_offers o
 WHERE o.state = 'offered' AND (CAST(:team AS uuid) IS NULL OR o.team_id = CAST(:team AS uuid))
 GROUP BY o.team_id
"""
)
_SLA = sa.text(
    f"""
SELECT t.team_id::text AS team_id, t.assignee_id,
       count(*) FILTER (WHERE NOT {_BREACHED} AND least({_DUE}) < now() + make_interval(mins => :horizon)) AS soon,
       count(*) FILTER (WHERE {_BREACHED}) AS breached
  FROM ticket_sla s JOIN tickets t ON t.id = s.ticket_id
 WHERE t.state NOT IN {_DONE} AND (CAST(:team AS uuid) IS NULL OR t.team_id = CAST(:team AS uuid))
 GROUP BY t.team_id, t.assignee_id
"""
)
_AT_RISK = sa.text(
    f"""
SELECT t.id, t.number, t.subject, t.team_id::text AS team_id, t.assignee_id, {_BREACHED} AS breached,
       s.first_response_due, s.next_response_due, s.resolution_due,
       s.first_response_breached, s.next_response_breached, s.resolution_breached,
       s.first_response_met, s.resolution_met,
       CASE WHEN {_BREACHED} THEN least(
              CASE WHEN s.first_response_breached THEN s.first_response_due END,
              CASE WHEN s.next_response_breached THEN s.next_response_due END,
              CASE WHEN s.resolution_breached THEN s.resolution_due END)
            ELSE least({_DUE}) END AS due
  FROM ticket_sla s JOIN tickets t ON t.id = s.ticket_id
 WHERE t.state NOT IN {_DONE} AND t.state <> 'waiting_on_customer'
   AND (CAST(:team AS uuid) IS NULL OR t.team_id = CAST(:team AS uuid))
   AND ({_BREACHED} OR least({_DUE}) < now() + make_interval(mins => :horizon))
 ORDER BY due NULLS LAST, t.id
 LIMIT :lim
"""
)
_AGENTS = sa.text(
    f"""
SELECT a.id, a.display_name, a.presence, a.capacity, a.busy_until,
       (SELECT count(*) FROM tickets x WHERE x.assignee_id = a.id AND x.state NOT IN {_DONE}) AS assigned_open,
       (SELECT count(*) FROM ticket_offers y WHERE y.agent_id = a.id AND y.state = 'offered') AS pending_offers,
       {LOAD_SQL.format(agent="a.id")} AS load
  FROM agents a
 WHERE a.active AND (CAST(:team AS uuid) IS NULL
       OR a.id IN (SELECT m.agent_id FROM team_members m WHERE m.team_id = CAST(:team AS uuid)))
 ORDER BY a.id
"""
)
_ONLINE = sa.text(
    """
SELECT m.team_id::text AS team_id, count(*) AS n FROM team_members m JOIN agents a ON a.id = m.agent_id
 WHERE a.active AND a.presence = 'online' AND (CAST(:team AS uuid) IS NULL OR m.team_id = CAST(:team AS uuid))
 GROUP BY m.team_id
"""
)


def _metric(row) -> str:
    """The target of an at-risk row that is due soonest (or breached first)."""
    options = []
    for m in ("first_response", "next_response", "resolution"):
        due = getattr(row, f"{m}_due")
        if due is None:
            continue
        breached = getattr(row, f"{m}_breached")
        met = getattr(row, f"{m}_met", False)
        if row.breached and breached or not row.breached and not breached and not met:
            options.append((due, m))
    return min(options)[1] if options else ""


class QueueServicer(queue_pb2_grpc.QueueServiceServicer):
    def __init__(self, support: Support):
        self.support = support

    def GetQueueView(self, request, context):
        team_id = None
        if request.team:
            team_id = TEAM.parse(request.team, "team").id
        horizon = request.horizon_minutes or DEFAULT_HORIZON
        limit = request.at_risk_limit or DEFAULT_AT_RISK
        problems = []
        if not 0 < horizon <= 1440:
            problems.append(FieldViolation("horizon_minutes", "must be 1..1440 (0: 30)"))
        if not 0 < limit <= 200:
            problems.append(FieldViolation("at_risk_limit", "must be 1..200 (0: 20)"))
        if problems:
            raise InvalidArgument(problems)
        args = {"team": team_id, "horizon": horizon, "lim": limit}
        with self.support.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn, conn.begin():
            read_time = conn.execute(sa.text("SELECT now()")).scalar()
            teams = {r.team_id: r for r in conn.execute(_TEAMS, args)}
            offers = {r.team_id: r.n for r in conn.execute(_OFFERS, args)}
            sla_rows = conn.execute(_SLA, args).all()
            online = {r.team_id: r.n for r in conn.execute(_ONLINE, args)}
            at_risk = conn.execute(_AT_RISK, args).all()
            agents = conn.execute(_AGENTS, args).all()
            ids = [t for t in {*teams, *offers, *online} if t]
            if team_id and team_id not in ids:
                ids.append(team_id)
            names = dict(
                conn.execute(
                    sa.text("SELECT id::text, name FROM teams WHERE id = ANY(CAST(:ids AS uuid[]))"), {"ids": ids}
                ).all()
            )
        if team_id and team_id not in names:
            raise TEAM.not_found(team_id)
        soon_team: dict = {}
        breached_team: dict = {}
        soon_agent: dict = {}
        for r in sla_rows:
            soon_team[r.team_id] = soon_team.get(r.team_id, 0) + r.soon
            breached_team[r.team_id] = breached_team.get(r.team_id, 0) + r.breached
            if r.assignee_id:
                soon_agent[r.assignee_id] = soon_agent.get(r.assignee_id, 0) + r.soon
        view = pb.QueueView(horizon_minutes=horizon)
        view.read_time.FromDatetime(read_time)
        for tid in sorted(
            {*teams, *offers, *online, *([team_id] if team_id else [])}, key=lambda t: (t is None, names.get(t, ""))
        ):
            r = teams.get(tid)
            being = offers.get(tid, 0)
            q = pb.TeamQueue(
                team=TEAM.format(tid) if tid else "",
                display_name=names.get(tid, "") if tid else "",
                open=r.open if r else 0,
                waiting_on_customer=r.waiting_on_customer if r else 0,
                waiting_on_third_party=r.waiting_on_third_party if r else 0,
                unassigned=max(0, (r.unassigned_all if r else 0) - being),
                being_offered=being,
                about_to_breach=soon_team.get(tid, 0),
                breached=breached_team.get(tid, 0),
                agents_online=online.get(tid, 0),
            )
            if r is not None and r.oldest_unassigned is not None:
                q.oldest_unassigned_time.FromDatetime(r.oldest_unassigned)
            view.teams.append(q)
        for a in agents:
            aq = pb.AgentQueue(
                agent=AGENT.format(a.id),
                display_name=a.display_name,
                presence=a.presence,
                load=int(a.load),
                capacity=a.capacity,
                assigned_open=a.assigned_open,
                pending_offers=a.pending_offers,
                about_to_breach=soon_agent.get(a.id, 0),
            )
            if a.busy_until is not None and a.busy_until > read_time:
                aq.busy_until.FromDatetime(a.busy_until)
            view.agents.append(aq)
        for r in at_risk:
            item = pb.AtRiskTicket(
                ticket=TICKET.format(r.id),
                number=number_text(r.number),
                subject=r.subject,
                team=TEAM.format(r.team_id) if r.team_id else "",
                assignee=AGENT.format(r.assignee_id) if r.assignee_id else "",
                metric=_metric(r),
                breached=r.breached,
            )
            if r.due is not None:
                item.due_time.FromDatetime(r.due)
            view.at_risk.append(item)
        return view


def registration(support: Support) -> Registration:
    return Registration.of(QueueServicer(support))
