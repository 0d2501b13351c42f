"""The live queue view from a rollup (queue.py): open tickets counted per (team, assignee, state,
channel, breached) in `queue_rollup` plus the not yet compacted `queue_deltas`, both written by
triggers; each ticket's soonest SLA target (`sla_due`, `sla_breached`) kept on the ticket by a
trigger on ticket_sla, with indexes for the about-to-breach counts and the at-risk list.

Revision ID: 0013
"""

from alembic import op

from crm_chassis import timers

revision = "0013"
down_revision = "0012"

_OPEN = "state NOT IN ('resolved', 'closed')"
# The soonest target of a clock: for a breached ticket the earliest breached one, else the
# earliest that still runs (not met, not breached). `r` is a ticket_sla row (or transition row).
_BREACHED = "(r.first_response_breached OR r.next_response_breached OR r.resolution_breached)"
_DUE = f"""CASE WHEN {_BREACHED} THEN least(
      CASE WHEN r.first_response_breached THEN r.first_response_due END,
      CASE WHEN r.next_response_breached THEN r.next_response_due END,
      CASE WHEN r.resolution_breached THEN r.resolution_due END)
  ELSE least(
      CASE WHEN NOT r.first_response_met THEN r.first_response_due END,
      r.next_response_due,
      CASE WHEN NOT r.resolution_met THEN r.resolution_due END) END"""
_KEY = "team_id, assignee_id, state, channel, breached"


def upgrade() -> None:
    op.execute(
        "ALTER TABLE tickets ADD COLUMN sla_due timestamptz, ADD COLUMN sla_breached boolean NOT NULL DEFAULT false"
    )
    op.execute(
        f"""
        UPDATE tickets t SET sla_due = v.due, sla_breached = v.breached
          FROM (SELECT r.ticket_id, {_DUE} AS due, {_BREACHED} AS breached FROM ticket_sla r) v
         WHERE t.id = v.ticket_id
        """
    )
    op.execute(
        f"""
        CREATE TABLE queue_rollup (
            team_id uuid, assignee_id text NOT NULL, state text NOT NULL, channel text NOT NULL,
            breached boolean NOT NULL, n bigint NOT NULL,
            CONSTRAINT queue_rollup_key UNIQUE NULLS NOT DISTINCT ({_KEY})
        )
        """
    )
    op.execute(
        """
        CREATE TABLE queue_deltas (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            team_id uuid, assignee_id text NOT NULL, state text NOT NULL, channel text NOT NULL,
            breached boolean NOT NULL, n integer NOT NULL
        )
        """
    )
    op.execute(
        f"""
        INSERT INTO queue_rollup ({_KEY}, n)
        SELECT team_id, assignee_id, state, channel, sla_breached, count(*) FROM tickets WHERE {_OPEN}
         GROUP BY team_id, assignee_id, state, channel, sla_breached
        """
    )
    # Statement-level triggers with transition tables: a bulk change writes one delta per key,
    # and an update that moves no count (most do not) writes none. No row of a shared counter
    # is locked: concurrent changes of one team never wait on each other.
    k = "team_id, assignee_id, state, channel, sla_breached"
    old, new = f"SELECT {k}, -1 FROM old_rows WHERE {_OPEN}", f"SELECT {k}, 1 FROM new_rows WHERE {_OPEN}"
    for op_name, tables, body in (
        ("INSERT", "NEW TABLE AS new_rows", new),
        ("DELETE", "OLD TABLE AS old_rows", old),
        ("UPDATE", "OLD TABLE AS old_rows NEW TABLE AS new_rows", f"{old} UNION ALL {new}"),
    ):
        op.execute(
            f"""
            CREATE FUNCTION tickets_queue_{op_name.lower()}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              INSERT INTO queue_deltas ({_KEY}, n)
              SELECT team_id, assignee_id, state, channel, sla_breached, sum(n)
                FROM ({body}) AS d (team_id, assignee_id, state, channel, sla_breached, n)
               GROUP BY team_id, assignee_id, state, channel, sla_breached
              HAVING sum(n) <> 0;
              RETURN NULL;
            END $$
            """
        )
        op.execute(
            f"CREATE TRIGGER tickets_queue_{op_name.lower()} AFTER {op_name} ON tickets "
            f"REFERENCING {tables} FOR EACH STATEMENT EXECUTE FUNCTION tickets_queue_{op_name.lower()}()"
        )
    # ticket_sla -> tickets.sla_due / sla_breached (the tickets are locked by the SLA engine's caller)
    for op_name, tables, source in (
        ("INSERT", "NEW TABLE AS new_rows", f"SELECT r.ticket_id, {_DUE}, {_BREACHED} FROM new_rows r"),
        ("UPDATE", "NEW TABLE AS new_rows", f"SELECT r.ticket_id, {_DUE}, {_BREACHED} FROM new_rows r"),
        ("DELETE", "OLD TABLE AS old_rows", "SELECT r.ticket_id, NULL::timestamptz, false FROM old_rows r"),
    ):
        op.execute(
            f"""
            CREATE FUNCTION ticket_sla_due_{op_name.lower()}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              UPDATE tickets t SET sla_due = v.due, sla_breached = v.breached
                FROM ({source}) AS v (ticket_id, due, breached)
               WHERE t.id = v.ticket_id
                 AND (t.sla_due IS DISTINCT FROM v.due OR t.sla_breached IS DISTINCT FROM v.breached);
              RETURN NULL;
            END $$
            """
        )
        op.execute(
            f"CREATE TRIGGER ticket_sla_due_{op_name.lower()} AFTER {op_name} ON ticket_sla "
            f"REFERENCING {tables} FOR EACH STATEMENT EXECUTE FUNCTION ticket_sla_due_{op_name.lower()}()"
        )
    # The at-risk list (soonest first; a breached ticket's due is past, so it comes first) and the
    # about-to-breach counts, over all teams or one; paused tickets (waiting on the customer) are
    # not at risk.
    risk = f"{_OPEN} AND state <> 'waiting_on_customer' AND sla_due IS NOT NULL"
    op.execute(
        f"CREATE INDEX tickets_at_risk ON tickets (sla_due, id) INCLUDE (team_id, assignee_id, sla_breached) WHERE {risk}"
    )
    op.execute(
        f"CREATE INDEX tickets_at_risk_team ON tickets (team_id, sla_due, id) INCLUDE (assignee_id, sla_breached) WHERE {risk}"
    )
    # The live offers per team
    op.execute("CREATE INDEX ticket_offers_team_live ON ticket_offers (team_id) WHERE state = 'offered'")
    # The compaction of the deltas, every 5 seconds (support_svc.queue)
    conn = op.get_bind()
    if timers.get(conn, "queue.compact", "all") is None:
        timers.schedule_recurring(conn, "queue.compact", "all", "* * * * * */5")


def downgrade() -> None:
    timers.cancel(op.get_bind(), "queue.compact", "all")
    op.execute("DROP INDEX ticket_offers_team_live")
    for name in ("insert", "update", "delete"):
        op.execute(f"DROP TRIGGER ticket_sla_due_{name} ON ticket_sla")
        op.execute(f"DROP FUNCTION ticket_sla_due_{name}()")
        op.execute(f"DROP TRIGGER tickets_queue_{name} ON tickets")
        op.execute(f"DROP FUNCTION tickets_queue_{name}()")
    op.execute("DROP TABLE queue_deltas")
    op.execute("DROP TABLE queue_rollup")
    op.execute("ALTER TABLE tickets DROP COLUMN sla_due, DROP COLUMN sla_breached")
