"""The live queue view (QueueService.GetQueueView): per team and agent, what is open, waiting,
being offered and about to breach, plus the tickets nearest to a breach.

Read from a rollup, not from the open tickets (migration 0013): triggers on `tickets` append the
count changes of each statement to `queue_deltas` (per team, assignee, state, channel and
breached; no shared counter row is locked, so concurrent changes of one team never wait on
each other), and the `queue.compact` timer folds them into `queue_rollup` every few seconds.
The view sums the two. A trigger on ticket_sla keeps each ticket's soonest SLA target on the
ticket (`sla_due`, `sla_breached`), so the about-to-breach counts and the at-risk list are
index range scans of the tickets due within the horizon. All in one REPEATABLE READ snapshot
(the counts agree with each other).
"""

from __future__ import annotations

import sqlalchemy as sa

from crm.support.v1 import queue_pb2 as pb
from crm.support.v1 import queue_pb2_grpc
from crm_chassis.errors import FieldViolation, InvalidArgument
from crm_chassis.grpc_server import Registration

from .runtime import Support
from .tables import tickets
from .ticketing import AGENT, TEAM, TICKET, number_text

# The open tickets' queue columns, for the oldest unassigned ticket of a team (migration 0011).
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
COMPACT = "queue.compact"
COMPACT_CRON = "* * * * * */5"  # every 5 seconds (croniter's sixth field)

_DONE = "('resolved', 'closed')"
_ACTIVE = "('new', 'open', 'reopened')"
_COUNTS = """(SELECT team_id, assignee_id, state, channel, breached, n FROM queue_rollup
              UNION ALL SELECT team_id, assignee_id, state, channel, breached, n FROM queue_deltas)"""
_RISK = f"t.state NOT IN {_DONE} AND t.state <> 'waiting_on_customer' AND t.sla_due IS NOT NULL"


def _variants(sql: str) -> dict[bool, sa.TextClause]:
    """A statement for all teams and one for a team (`{team}` filled in): two plans, each using
    its own index, rather than one generic plan around `:team IS NULL OR ...`."""
    return {
        False: sa.text(sql.format(team="", team_c="")),
        True: sa.text(
            sql.format(team="AND t.team_id = CAST(:team AS uuid)", team_c="AND c.team_id = CAST(:team AS uuid)")
        ),
    }


_TEAMS = _variants(
    f"""
SELECT c.team_id::text AS team_id,
       coalesce(sum(c.n) FILTER (WHERE c.state IN {_ACTIVE}), 0)::bigint AS open,
       coalesce(sum(c.n) FILTER (WHERE c.state = 'waiting_on_customer'), 0)::bigint AS waiting_on_customer,
       coalesce(sum(c.n) FILTER (WHERE c.state = 'waiting_on_third_party'), 0)::bigint AS waiting_on_third_party,
       coalesce(sum(c.n) FILTER (WHERE c.state IN {_ACTIVE} AND c.assignee_id = ''), 0)::bigint AS unassigned_all,
       coalesce(sum(c.n) FILTER (WHERE c.breached), 0)::bigint AS breached,
       sum(c.n)::bigint AS total
  FROM {_COUNTS} c
 WHERE true {{team_c}}
 GROUP BY c.team_id
"""
)
# The oldest open unassigned ticket of each team: one index read per state (tickets_queue).
_OLDEST = sa.text(
    """
SELECT tm.id::text AS team_id,
       least((SELECT min(t.create_time) FROM tickets t WHERE t.team_id = tm.id AND t.state = 'new' AND t.assignee_id = ''),
             (SELECT min(t.create_time) FROM tickets t WHERE t.team_id = tm.id AND t.state = 'open' AND t.assignee_id = ''),
             (SELECT min(t.create_time) FROM tickets t WHERE t.team_id = tm.id AND t.state = 'reopened'
                 AND t.assignee_id = '')) AS oldest
  FROM teams tm WHERE tm.id = ANY(CAST(:ids AS uuid[]))
"""
)
_OFFERS = _variants(
    """
SELECT t.team_id::text AS team_id, count(*) AS n FROM ticket_offers t
 WHERE t.state = 'offered' {team}
 GROUP BY t.team_id
"""
)
# Open tickets (not paused) whose running target is due within the horizon, not yet breached.
_SOON = _variants(
    f"""
SELECT t.team_id::text AS team_id, t.assignee_id, count(*) AS soon
  FROM tickets t
 WHERE {_RISK} AND NOT t.sla_breached AND t.sla_due < now() + make_interval(mins => :horizon) {{team}}
 GROUP BY t.team_id, t.assignee_id
"""
)
# Breached first (their due time is past), then the soonest due.
_AT_RISK = _variants(
    f"""
SELECT t.id, t.number, t.subject, t.team_id::text AS team_id, t.assignee_id, t.sla_breached AS breached,
       s.first_response_due, s.next_response_due, s.resolution_due,
       s.first_response_breached, s.next_response_breached, s.resolution_breached,
       s.first_response_met, s.resolution_met, t.sla_due AS due
  FROM tickets t JOIN ticket_sla s ON s.ticket_id = t.id
 WHERE {_RISK} AND t.sla_due < now() + make_interval(mins => :horizon) {{team}}
 ORDER BY t.sla_due, t.id
 LIMIT :lim
"""
)
# Each agent's open assigned tickets (all teams) and their weight, from the rollup.
_ASSIGNED = sa.text(
    f"""
SELECT c.assignee_id, sum(c.n)::bigint AS assigned_open, sum(c.n * coalesce(w.weight, 1))::bigint AS load
  FROM {_COUNTS} c LEFT JOIN channel_weights w ON w.channel = c.channel
 WHERE c.assignee_id <> ''
 GROUP BY c.assignee_id
"""
)
_AGENTS = sa.text(
    """
SELECT a.id, a.display_name, a.presence, a.capacity, a.busy_until,
       (SELECT count(*) FROM ticket_offers y WHERE y.agent_id = a.id AND y.state = 'offered') AS pending_offers,
       (SELECT coalesce(sum(coalesce(ow.weight, 1)), 0) FROM ticket_offers lo
          JOIN tickets ot ON ot.id = lo.ticket_id
          LEFT JOIN channel_weights ow ON ow.channel = ot.channel
         WHERE lo.agent_id = a.id AND lo.state = 'offered') AS offer_load
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
# Fold the deltas committed so far into the rollup (a delta of a transaction still open is not
# seen, so it stays for the next round; a second compaction at once waits, then skips the rows
# the first removed) and drop the keys that count nothing any more.
_COMPACT = sa.text(
    """
WITH d AS (DELETE FROM queue_deltas RETURNING team_id, assignee_id, state, channel, breached, n),
     s AS (SELECT team_id, assignee_id, state, channel, breached, sum(n) AS n FROM d
            GROUP BY team_id, assignee_id, state, channel, breached)
INSERT INTO queue_rollup AS r (team_id, assignee_id, state, channel, breached, n)
SELECT * FROM s
ON CONFLICT ON CONSTRAINT queue_rollup_key DO UPDATE SET n = r.n + excluded.n
"""
)


def compact(conn: sa.Connection) -> None:
    """queue.compact: the deltas into the rollup (in the caller's transaction)."""
    conn.execute(_COMPACT)
    conn.execute(sa.text("DELETE FROM queue_rollup WHERE n = 0"))


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
        one = team_id is not None
        with self.support.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn, conn.begin():
            read_time = conn.execute(sa.text("SELECT now()")).scalar()
            teams = {r.team_id: r for r in conn.execute(_TEAMS[one], args) if r.total}
            offers = {r.team_id: r.n for r in conn.execute(_OFFERS[one], args)}
            sla_rows = conn.execute(_SOON[one], args).all()
            online = {r.team_id: r.n for r in conn.execute(_ONLINE, args)}
            at_risk = conn.execute(_AT_RISK[one], args).all()
            agents = conn.execute(_AGENTS, args).all()
            assigned = {r.assignee_id: r for r in conn.execute(_ASSIGNED)} if agents else {}
            ids = [t for t in {*teams, *offers, *online} if t]
            if team_id and team_id not in ids:
                ids.append(team_id)
            names = dict(
                conn.execute(
                    sa.text("SELECT id::text, name FROM teams WHERE id = ANY(CAST(:ids AS uuid[]))"), {"ids": ids}
                ).all()
            )
            oldest = {r.team_id: r.oldest for r in conn.execute(_OLDEST, {"ids": [t for t in teams if t]})}
        if team_id and team_id not in names:
            raise TEAM.not_found(team_id)
        soon_team: dict = {}
        breached_team: dict = {}
        soon_agent: dict = {}
        for tid, r in teams.items():
            breached_team[tid] = r.breached
        for r in sla_rows:
            soon_team[r.team_id] = soon_team.get(r.team_id, 0) + r.soon
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
            if oldest.get(tid) is not None:
                q.oldest_unassigned_time.FromDatetime(oldest[tid])
            view.teams.append(q)
        for a in agents:
            aq = pb.AgentQueue(
                agent=AGENT.format(a.id),
                display_name=a.display_name,
                presence=a.presence,
                load=int((assigned[a.id].load if a.id in assigned else 0) + a.offer_load),
                capacity=a.capacity,
                assigned_open=int(assigned[a.id].assigned_open) if a.id in assigned else 0,
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


def timer_handlers(support: Support) -> None:
    support.timers.register(COMPACT, lambda conn, timer: compact(conn))
