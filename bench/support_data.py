"""Generated support data at scale, loaded with set-based SQL (INSERT ... SELECT over
generate_series; no Python loop per row): a 24x7 business calendar, TEAMS teams of AGENTS/TEAMS
online agents each, categories, channel weights, one SLA policy, N open tickets with their state
intervals, first messages (and the agent reply of those with a first response), their
ticket_sla rows and their armed sla.warn / sla.breach timers; plus an "offers" team whose
BENCH tickets each have a pending offer and its offer.expire timer.

Deterministic: ticket g always gets the same values, times relative to the load's now().

SLA shape (24x7 calendar, so a clock's due time is create_time + target):
- policy "Bench standard": first response 240 min, resolution 1440 min, warning 30 min before,
  breach actions BENCH_SLA_ACTIONS (default notify_manager);
- tickets g <= n_due are 'new' (first response running): the timer section moves their
  create_time so that their first_response breach comes due inside its window (`arm_due`);
- the other tickets were opened 30 to 60 minutes before the load: new (40 %), open with a
  first response (30 %), waiting on the customer (15 %, clocks paused: no timers), waiting on a
  third party (10 %), reopened (5 %); 30 % of the open ones assigned. Their timers are due hours
  later (never inside a run).
"""

from __future__ import annotations

import os
import time

import sqlalchemy as sa

TEAMS = 20
AGENTS = 200  # agent0..agent199, team k = agent r % TEAMS
OFFER_AGENTS = 50  # offer0..offer49 in the team "Bench offers"
FR_MIN, RES_MIN, WARN_MIN = 240, 1440, 30
ACTIONS = [a for a in os.environ.get("BENCH_SLA_ACTIONS", "notify_manager").split(",") if a]
SUBJECTS = ["قطعی اینترنت", "مشکل در پرداخت صورتحساب", "درخواست تغییر طرح", "کندی سرویس", "شکایت از پشتیبانی"]
BODY = "سلام، از دیروز اینترنت من قطع است و چند بار با پشتیبانی تماس گرفتم. لطفاً پیگیری کنید. با تشکر"
WEEK = "{" + ", ".join(f'"{d}": [["00:00", "24:00"]]' for d in ("sat", "sun", "mon", "tue", "wed", "thu", "fri")) + "}"


def _arr(values: list[str]) -> str:
    return "ARRAY[" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + "]::text[]"


# state of ticket g > n_due (by g % 20): 8 new, 6 open, 3 waiting_on_customer, 2 third party, 1 reopened
_STATE = (
    "CASE WHEN g <= {n_due} THEN 'new' WHEN g % 20 < 8 THEN 'new' WHEN g % 20 < 14 THEN 'open' "
    "WHEN g % 20 < 17 THEN 'waiting_on_customer' WHEN g % 20 < 19 THEN 'waiting_on_third_party' ELSE 'reopened' END"
)


def load(engine: sa.Engine, n_tickets: int, n_due: int, n_offers: int, say=print) -> dict:
    """Load everything into a migrated support database; returns the ids the benchmark needs."""
    t0 = time.monotonic()
    n_due = min(n_due, n_tickets)
    with engine.begin() as conn:

        def x(sql: str, **params):
            return conn.execute(sa.text(sql), params)

        cal = x(
            "INSERT INTO calendars (name, timezone, weekly_hours, holiday_country) "
            "VALUES ('Bench 24x7', 'Asia/Tehran', CAST(:w AS jsonb), '') RETURNING id",
            w=WEEK,
        ).scalar()
        x(
            "INSERT INTO teams (name, manager_id, calendar_id, strategy, offer_timeout_seconds, email_address) "
            "SELECT 'Bench team ' || k, 'mgr' || k, :cal, CASE WHEN k % 2 = 0 THEN 'round_robin' ELSE 'least_loaded' END, "
            f"120, 'team' || k || '@bench.local' FROM generate_series(0, {TEAMS - 1}) k",
            cal=cal,
        )
        # offers team: a long timeout, so the re-offers made in the run do not expire in it
        x(
            "INSERT INTO teams (name, manager_id, calendar_id, strategy, offer_timeout_seconds, email_address) "
            "VALUES ('Bench offers', 'mgr-offers', :cal, 'round_robin', 3600, 'offers@bench.local')",
            cal=cal,
        )
        x(
            "INSERT INTO agents (id, display_name, email, capacity, presence, languages) "
            "SELECT 'agent' || r, 'کارشناس ' || r, 'agent' || r || '@bench.local', 1000, 'online', '{fa,en}' "
            f"FROM generate_series(0, {AGENTS - 1}) r"
        )
        x(
            "INSERT INTO agents (id, display_name, capacity, presence) "
            f"SELECT 'offer' || r, 'Offer agent ' || r, 100000, 'online' FROM generate_series(0, {OFFER_AGENTS - 1}) r"
        )
        x(
            "CREATE TEMP TABLE bench_teams ON COMMIT DROP AS SELECT substr(name, 12)::int AS k, id FROM teams "
            "WHERE name LIKE 'Bench team %'"
        )
        offers_team = x("SELECT id FROM teams WHERE name = 'Bench offers'").scalar()
        x(
            "INSERT INTO team_members (team_id, agent_id) SELECT bt.id, 'agent' || r "
            f"FROM generate_series(0, {AGENTS - 1}) r JOIN bench_teams bt ON bt.k = r % {TEAMS}"
        )
        x(
            "INSERT INTO team_members (team_id, agent_id) "
            f"SELECT :t, 'offer' || r FROM generate_series(0, {OFFER_AGENTS - 1}) r",
            t=offers_team,
        )
        x(
            "INSERT INTO channel_weights (channel, weight) VALUES ('email', 1), ('phone', 3), ('web', 1), "
            "('telegram', 1), ('bale', 1), ('fax', 1), ('agent', 1) ON CONFLICT (channel) DO NOTHING"
        )
        x(
            "INSERT INTO categories (key, display_name, complaint, team_id) "
            "SELECT 'bench' || g.k, 'دسته ' || g.k, g.k = 0, bt.id FROM generate_series(0, 9) g(k) "
            "JOIN bench_teams bt ON bt.k = g.k"
        )
        x(
            "CREATE TEMP TABLE bench_cats ON COMMIT DROP AS SELECT substr(key, 6)::int AS k, id FROM categories "
            "WHERE key LIKE 'bench%'"
        )
        policy = x(
            "INSERT INTO sla_policies (display_name, position, first_response_minutes, resolution_minutes, "
            "warning_before_minutes, breach_actions) VALUES ('Bench standard', 0, :fr, :res, :warn, CAST(:act AS text[])) "
            "RETURNING id",
            fr=FR_MIN,
            res=RES_MIN,
            warn=WARN_MIN,
            act="{" + ",".join(ACTIONS) + "}",
        ).scalar()
        say(
            f"  calendar, {TEAMS + 1} teams, {AGENTS + OFFER_AGENTS} agents, categories, policy: {time.monotonic() - t0:.1f} s"
        )

        t = time.monotonic()
        state = _STATE.format(n_due=n_due)
        # The due tickets' create_time is set by arm_due; until then 60 min ago like the others.
        x(
            f"""
            CREATE TEMP TABLE bench_gen ON COMMIT DROP AS
            SELECT g, md5('ticket' || g)::uuid AS id, {state} AS state,
                   now() - interval '30 minutes' - (g % 1800) * interval '1 second' AS ct,
                   1 + (g % {TEAMS}) AS tk
              FROM generate_series(1, {n_tickets}) g
            """
        )
        x(
            f"""
            INSERT INTO tickets (id, number, subject, customer_id, channel, contact_address, contact_name, category_id,
                complaint, priority, team_id, assignee_id, state, language, exchange_count, message_count,
                awaiting_reply, first_response_time, last_customer_message_time, last_agent_message_time,
                search_text, create_time, update_time)
            OVERRIDING SYSTEM VALUE
            SELECT b.id, b.g, ({_arr(SUBJECTS)})[1 + b.g % {len(SUBJECTS)}] || ' ' || b.g, '', 'email',
                'customer' || b.g || '@example.com', 'مشتری ' || b.g, bc.id, bc.k = 0,
                (ARRAY['low', 'normal', 'normal', 'high'])[1 + b.g % 4], bt.id,
                CASE WHEN b.state = 'open' AND b.g % 10 < 3 THEN 'agent' || (b.g % {AGENTS}) ELSE '' END,
                b.state, 'fa', CASE WHEN b.state = 'new' THEN 0 ELSE 1 END,
                CASE WHEN b.state = 'new' THEN 1 ELSE 2 END,
                b.state IN ('new', 'reopened'),
                CASE WHEN b.state <> 'new' THEN b.ct + interval '10 minutes' END,
                b.ct,
                CASE WHEN b.state <> 'new' THEN b.ct + interval '10 minutes' END,
                lower(({_arr(SUBJECTS)})[1 + b.g % {len(SUBJECTS)}] || ' ' || b.g || ' customer' || b.g
                      || '@example.com مشتری ' || b.g || ' t-' || lpad(b.g::text, 6, '0')),
                b.ct, b.ct + CASE WHEN b.state = 'new' THEN interval '0' ELSE interval '20 minutes' END
            FROM bench_gen b
            JOIN bench_teams bt ON bt.k = b.g % {TEAMS}
            JOIN bench_cats bc ON bc.k = b.g % 10
            """
        )
        x("SELECT setval(pg_get_serial_sequence('tickets', 'number'), (SELECT max(number) FROM tickets))")
        say(f"  {n_tickets:,} open tickets: {time.monotonic() - t:.1f} s")

        t = time.monotonic()
        # intervals: new [ct, ct+10m) then the state from ct+10m (waiting from ct+20m after open)
        x(
            """
            INSERT INTO ticket_intervals (ticket_id, state, start_time, end_time)
            SELECT id, 'new', ct, CASE WHEN state <> 'new' THEN ct + interval '10 minutes' END FROM bench_gen
            UNION ALL
            SELECT id, 'open', ct + interval '10 minutes',
                   CASE WHEN state IN ('waiting_on_customer', 'waiting_on_third_party', 'reopened')
                        THEN ct + interval '20 minutes' END
              FROM bench_gen WHERE state <> 'new'
            UNION ALL
            SELECT id, state, ct + interval '20 minutes', NULL FROM bench_gen
             WHERE state IN ('waiting_on_customer', 'waiting_on_third_party', 'reopened')
            """
        )
        x(
            f"""
            INSERT INTO ticket_messages (ticket_id, kind, author, body, channel, external_id, create_time)
            SELECT id, 'customer', 'customer' || g || '@example.com', '{BODY}', 'email',
                   '<bench-' || g || '@example.com>', ct FROM bench_gen
            UNION ALL
            SELECT id, 'agent', 'agent' || (g % {AGENTS}), 'سلام، در حال بررسی هستیم.', 'email', '',
                   ct + interval '10 minutes' FROM bench_gen WHERE state <> 'new'
            """
        )
        say(f"  intervals and messages: {time.monotonic() - t:.1f} s")

        t = time.monotonic()
        # ticket_sla as sla.Engine would store it (24x7: due = create + target; paused: none)
        x(
            f"""
            INSERT INTO ticket_sla (ticket_id, policy_id, first_response_due, resolution_due,
                first_response_met, first_response_seconds, resolution_seconds, computed_at)
            SELECT id, :p,
                   CASE WHEN state = 'new' THEN ct + interval '{FR_MIN} minutes' END,
                   CASE WHEN state <> 'waiting_on_customer' THEN ct + interval '{RES_MIN} minutes' END,
                   state <> 'new', CASE WHEN state <> 'new' THEN 600 ELSE 0 END,
                   extract(epoch FROM (CASE WHEN state = 'waiting_on_customer' THEN ct + interval '20 minutes'
                                            ELSE now() END) - ct)::bigint,
                   now()
              FROM bench_gen
            """,
            p=policy,
        )
        x(
            f"""
            INSERT INTO timers (kind, key, due_at, next_attempt_at, payload)
            SELECT k.kind, b.id::text || ':' || k.metric, b.ct + k.after, b.ct + k.after,
                   jsonb_build_object('ticket_id', b.id::text, 'metric', k.metric)
              FROM bench_gen b
              JOIN (VALUES ('sla.warn', 'first_response', interval '{FR_MIN - WARN_MIN} minutes', true),
                           ('sla.breach', 'first_response', interval '{FR_MIN} minutes', true),
                           ('sla.warn', 'resolution', interval '{RES_MIN - WARN_MIN} minutes', false),
                           ('sla.breach', 'resolution', interval '{RES_MIN} minutes', false))
                   AS k(kind, metric, after, fr) ON (k.fr AND b.state = 'new')
                   OR (NOT k.fr AND b.state <> 'waiting_on_customer')
            """
        )
        n_timers = x("SELECT count(*) FROM timers").scalar()
        say(f"  ticket_sla and {n_timers:,} armed timers: {time.monotonic() - t:.1f} s")

        t = time.monotonic()
        # the offers team: n_offers new tickets, each offered to one of its agents (expire far away
        # until arm_offers brings them near)
        x(
            f"""
            INSERT INTO tickets (id, subject, channel, contact_address, team_id, state, search_text,
                                 last_customer_message_time, create_time, update_time)
            SELECT md5('offer-ticket' || g)::uuid, 'درخواست ' || g, 'email', 'offer' || g || '@example.com', :t,
                   'new', 'درخواست ' || g, now(), now(), now()
              FROM generate_series(1, {n_offers}) g
            """,
            t=offers_team,
        )
        x(
            "INSERT INTO ticket_intervals (ticket_id, state, start_time) "
            "SELECT id, 'new', create_time FROM tickets WHERE team_id = :t",
            t=offers_team,
        )
        x(
            f"""
            INSERT INTO ticket_offers (ticket_id, agent_id, team_id, strategy, attempt, state, offer_time, expire_time)
            SELECT md5('offer-ticket' || g)::uuid, 'offer' || (g % {OFFER_AGENTS}), :t, 'round_robin', 1, 'offered',
                   now(), now() + interval '1 day'
              FROM generate_series(1, {n_offers}) g
            """,
            t=offers_team,
        )
        x(
            "INSERT INTO timers (kind, key, due_at, next_attempt_at, payload) "
            "SELECT 'offer.expire', id::text, expire_time, expire_time, jsonb_build_object('ticket_id', ticket_id::text) "
            "FROM ticket_offers WHERE team_id = :t",
            t=offers_team,
        )
        say(f"  offers team: {n_offers:,} tickets with a pending offer: {time.monotonic() - t:.1f} s")
        team0 = x("SELECT id FROM bench_teams WHERE k = 0").scalar()
        cat0 = x("SELECT id FROM bench_cats WHERE k = 1").scalar()
    t = time.monotonic()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE")
    say(f"  VACUUM ANALYZE: {time.monotonic() - t:.1f} s (load {time.monotonic() - t0:.0f} s in all)")
    return {
        "team0": str(team0),
        "category": str(cat0),
        "offers_team": str(offers_team),
        "policy": str(policy),
        "timers": n_timers,
    }


def arm_due(engine: sa.Engine, n: int, per_second: float, lead_seconds: float, offset: int = 0) -> float:
    """Bring the first-response breach of n due tickets (offset < g <= offset + n) into a window: ticket k's
    timer comes due at start + lead + k / per_second, and its ticket, intervals and ticket_sla
    agree (create_time = due - first response target). Returns the window's start as epoch
    seconds (the database clock)."""
    with engine.begin() as conn:
        start = conn.execute(sa.text("SELECT extract(epoch FROM clock_timestamp())")).scalar()
        params = {"start": float(start), "lead": lead_seconds, "rate": per_second, "n": n, "o": offset}
        conn.execute(
            sa.text(
                """
            CREATE TEMP TABLE bench_due ON COMMIT DROP AS
            SELECT md5('ticket' || g)::uuid AS id,
                   to_timestamp(:start + :lead + (g - :o - 1) / :rate) AS due
              FROM generate_series(:o + 1, :o + :n) g
            """
            ),
            params,
        )
        conn.execute(sa.text("ALTER TABLE bench_due ADD PRIMARY KEY (id)"))
        fr = f"interval '{FR_MIN} minutes'"
        conn.execute(
            sa.text(
                f"UPDATE tickets t SET create_time = d.due - {fr}, update_time = d.due - {fr}, "
                f"last_customer_message_time = d.due - {fr} FROM bench_due d WHERE t.id = d.id"
            )
        )
        conn.execute(
            sa.text(
                f"UPDATE ticket_intervals i SET start_time = d.due - {fr} FROM bench_due d WHERE i.ticket_id = d.id"
            )
        )
        conn.execute(
            sa.text(
                f"UPDATE ticket_messages m SET create_time = d.due - {fr} FROM bench_due d WHERE m.ticket_id = d.id"
            )
        )
        # the warning is past (30 min before the breach): warned, and its timer gone
        conn.execute(
            sa.text(
                f"UPDATE ticket_sla s SET first_response_due = d.due, first_response_warned = true, "
                f"resolution_due = d.due - {fr} + interval '{RES_MIN} minutes' FROM bench_due d WHERE s.ticket_id = d.id"
            )
        )
        conn.execute(
            sa.text(
                "DELETE FROM timers USING bench_due d WHERE timers.kind = 'sla.warn' "
                "AND timers.key = d.id::text || '\\:first_response'"
            )
        )
        conn.execute(
            sa.text(
                f"""
            UPDATE timers SET due_at = x.at, next_attempt_at = x.at, lease_token = NULL, lease_until = NULL
              FROM (SELECT d.id::text || '\\:first_response' AS key, 'sla.breach' AS kind, d.due AS at FROM bench_due d
                    UNION ALL
                    SELECT d.id::text || '\\:resolution', 'sla.warn', d.due - {fr} + interval '{RES_MIN - WARN_MIN} minutes'
                      FROM bench_due d
                    UNION ALL
                    SELECT d.id::text || '\\:resolution', 'sla.breach', d.due - {fr} + interval '{RES_MIN} minutes'
                      FROM bench_due d) x
             WHERE timers.kind = x.kind AND timers.key = x.key
            """
            )
        )
    return float(start)


def arm_offers(engine: sa.Engine, team_id: str, per_second: float, lead_seconds: float) -> float:
    """The offers team's pending offers expire one after another from start + lead, per_second
    of them (their offer.expire timers moved with them). Returns the start (epoch seconds)."""
    with engine.begin() as conn:
        start = conn.execute(sa.text("SELECT extract(epoch FROM clock_timestamp())")).scalar()
        conn.execute(
            sa.text(
                """
            WITH o AS (SELECT id, to_timestamp(:start + :lead + (row_number() OVER (ORDER BY id) - 1) / :rate) AS at
                         FROM ticket_offers WHERE team_id = CAST(:t AS uuid) AND state = 'offered')
            UPDATE ticket_offers x SET expire_time = o.at FROM o WHERE x.id = o.id
            """
            ),
            {"start": float(start), "lead": lead_seconds, "rate": per_second, "t": team_id},
        )
        conn.execute(
            sa.text(
                """
            UPDATE timers SET due_at = x.expire_time, next_attempt_at = x.expire_time
              FROM ticket_offers x
             WHERE x.team_id = CAST(:t AS uuid) AND x.state = 'offered'
               AND timers.kind = 'offer.expire' AND timers.key = x.id::text
            """
            ),
            {"t": team_id},
        )
    return float(start)


def noop_timers(engine: sa.Engine, kind: str, n: int, per_second: float, lead_seconds: float) -> float:
    """n timers of a kind only the benchmark handles, due per_second from now + lead."""
    with engine.begin() as conn:
        start = conn.execute(sa.text("SELECT extract(epoch FROM clock_timestamp())")).scalar()
        conn.execute(
            sa.text(
                """
            INSERT INTO timers (kind, key, due_at, next_attempt_at, payload)
            SELECT :kind, 'k' || g, to_timestamp(:start + :lead + (g - 1) / :rate),
                   to_timestamp(:start + :lead + (g - 1) / :rate), '{}'::jsonb
              FROM generate_series(1, :n) g
            ON CONFLICT (kind, key) DO UPDATE SET due_at = excluded.due_at, next_attempt_at = excluded.next_attempt_at,
                state = 'scheduled', attempts = 0, lease_token = NULL, lease_until = NULL
            """
            ),
            {"kind": kind, "start": float(start), "lead": lead_seconds, "rate": per_second, "n": n},
        )
    return float(start)
