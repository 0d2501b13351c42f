"""Generated sales data at scale, loaded with set-based SQL (INSERT ... SELECT over
generate_series): teams and reps, two pipelines, product lines and products, BENCH_LEADS leads
and BENCH_OPPORTUNITIES opportunities of which BENCH_OPEN are open, each with one line.

Deterministic: row g always gets the same values (no random()), so two runs load the same data.
"""

from __future__ import annotations

import time

import sqlalchemy as sa

REPS = 200  # sales reps rep0..rep199
TEAMS = 20  # ten reps each; team k is managed by mgr<k>
OPEN_STAGES = 4  # per pipeline, then won and lost
SOURCES = ["website", "phone", "exhibition", "referral", "advertising", "social_telegram", "email_campaign", "walk_in"]
PROVINCES = ["Tehran", "Isfahan", "Khorasan Razavi", "Fars", "East Azerbaijan", "Khuzestan", "Mazandaran", "Gilan"]
FAMILIES = ["رضایی", "محمدی", "حسینی", "احمدی", "کریمی", "موسوی", "جعفری", "کاظمی", "رحیمی", "صادقی"]
GIVEN = ["علی", "مریم", "حسین", "زهرا", "محمد", "فاطمه", "رضا", "سارا", "مهدی", "نرگس"]


def _arr(values: list[str]) -> str:
    return "ARRAY[" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + "]"


def load(engine: sa.Engine, n_leads: int, n_opps: int, n_open: int, say=print) -> dict:
    """Load everything into a migrated sales database; returns the ids the benchmark needs."""
    t0 = time.monotonic()
    with engine.begin() as conn:

        def x(sql: str):
            return conn.execute(sa.text(sql))

        x(
            "INSERT INTO teams (name, manager_id) SELECT 'Bench team ' || k, 'mgr' || k "
            f"FROM generate_series(0, {TEAMS - 1}) k"
        )
        x(
            "INSERT INTO team_members (team_id, member_id) SELECT t.id, 'rep' || r "
            f"FROM generate_series(0, {REPS - 1}) r JOIN teams t ON t.name = 'Bench team ' || (r % {TEAMS})"
        )
        x("INSERT INTO product_lines (code, name) SELECT 'bench' || k, 'Bench line ' || k FROM generate_series(0, 9) k")
        x(
            "INSERT INTO products (sku, name, product_line_id, tax_rate) "
            "SELECT 'B-' || k, 'Bench product ' || k, pl.id, 10 FROM generate_series(0, 99) k "
            "JOIN product_lines pl ON pl.code = 'bench' || (k % 10)"
        )
        x("INSERT INTO pipelines (name) VALUES ('Bench A'), ('Bench B')")
        x(
            "INSERT INTO stages (pipeline_id, position, name, kind, probability) "
            "SELECT p.id, s, CASE WHEN s < 4 THEN 'Stage ' || s WHEN s = 4 THEN 'Won' ELSE 'Lost' END, "
            "CASE WHEN s < 4 THEN 'open' WHEN s = 4 THEN 'won' ELSE 'lost' END, "
            "CASE WHEN s < 4 THEN 10 + 20 * s WHEN s = 4 THEN 100 ELSE 0 END "
            "FROM pipelines p, generate_series(0, 5) s WHERE p.name LIKE 'Bench %'"
        )
        # (pipeline index, position) -> stage, for the generated rows to join on
        x(
            "CREATE TEMP TABLE bench_stages ON COMMIT DROP AS SELECT (p.name = 'Bench B')::int AS pi, "
            "s.position AS si, s.id AS stage_id, p.id AS pipeline_id, s.probability, s.kind "
            "FROM stages s JOIN pipelines p ON p.id = s.pipeline_id WHERE p.name LIKE 'Bench %'"
        )
        x(
            "CREATE TEMP TABLE bench_teams ON COMMIT DROP AS SELECT row_number() OVER (ORDER BY name) - 1 AS k, id "
            "FROM teams WHERE name LIKE 'Bench team %'"
        )
        x(
            "CREATE TEMP TABLE bench_lines ON COMMIT DROP AS SELECT row_number() OVER (ORDER BY code) - 1 AS k, id FROM product_lines WHERE code LIKE 'bench%'"
        )
        x(
            "CREATE TEMP TABLE bench_products ON COMMIT DROP AS SELECT row_number() OVER (ORDER BY sku) - 1 AS k, id FROM products WHERE sku LIKE 'B-%'"
        )
        say(f"  catalog and teams: {time.monotonic() - t0:.1f} s")

        t = time.monotonic()
        # Open ones are g <= n_open (70 % in pipeline A); the rest won (g even) or lost.
        x(
            f"""
            INSERT INTO opportunities (id, name, customer_id, pipeline_id, stage_id, stage_enter_time, amount,
                currency_code, expected_close_date, probability, forecast_category, state, close_time, close_reason,
                owner_id, team_id, product_line_id, source, search_text, create_time, update_time)
            SELECT md5('opp' || g)::uuid, 'Deal ' || g, md5('cust' || (g % 300000))::uuid::text,
                bs.pipeline_id, bs.stage_id, ts - interval '3 days',
                (1000000 + (g::bigint * 7919) % 900000000)::numeric, 'IRR',
                date '2025-03-21' + (g % 730),
                bs.probability,
                CASE WHEN bs.kind = 'won' THEN 'closed' WHEN bs.kind = 'lost' THEN 'omitted'
                     ELSE (ARRAY['pipeline', 'best_case', 'commit', 'pipeline'])[1 + g % 4] END,
                CASE bs.kind WHEN 'open' THEN 'open' ELSE bs.kind END,
                CASE WHEN bs.kind <> 'open' THEN timestamptz '2025-03-21 10:00+03:30' + (g % 730) * interval '1 day' END,
                CASE WHEN bs.kind = 'lost' THEN 'price' ELSE '' END,
                'rep' || (g % {REPS}), bt.id, bl.id,
                ({_arr(SOURCES)})[1 + g % {len(SOURCES)}],
                'deal ' || g, ts, ts
            FROM (SELECT g, timestamptz '2024-01-01 00:00+00' + (g % 1000000) * interval '61 seconds' AS ts
                  FROM generate_series(1, {n_opps}) g) gs
            JOIN bench_stages bs ON bs.pi = CASE WHEN g % 10 < 7 THEN 0 ELSE 1 END
                 AND bs.si = CASE WHEN g <= {n_open} THEN g % {OPEN_STAGES} ELSE {OPEN_STAGES} + g % 2 END
            JOIN bench_teams bt ON bt.k = (g % {REPS}) % {TEAMS}
            JOIN bench_lines bl ON bl.k = g % 10
            """
        )
        x(
            """
            INSERT INTO opportunity_lines (opportunity_id, position, product_id, quantity, unit_price, tax_rate, amount)
            SELECT o.id, 0, bp.id, 1, o.amount, 10, o.amount
            FROM opportunities o JOIN bench_products bp ON bp.k = abs(hashtext(o.id::text)) % 100
            WHERE o.name LIKE 'Deal %'
            """
        )
        say(f"  {n_opps:,} opportunities ({n_open:,} open) with a line each: {time.monotonic() - t:.1f} s")

        t = time.monotonic()
        x(
            f"""
            INSERT INTO leads (given_name, family_name, email, mobile, province, city, source, status, owner_id, team_id,
                product_line_id, search_text, create_time, update_time, assign_time)
            SELECT ({_arr(GIVEN)})[1 + g % 10], ({_arr(FAMILIES)})[1 + (g / 10) % 10],
                'lead' || g || '@example.com', '+98912' || lpad((g % 10000000)::text, 7, '0'),
                ({_arr(PROVINCES)})[1 + g % {len(PROVINCES)}], '',
                ({_arr(SOURCES)})[1 + g % {len(SOURCES)}],
                (ARRAY['new', 'contacted', 'qualified', 'disqualified', 'new'])[1 + g % 5],
                'rep' || (g % {REPS}), bt.id, bl.id,
                ({_arr(GIVEN)})[1 + g % 10] || ' ' || ({_arr(FAMILIES)})[1 + (g / 10) % 10] || ' lead' || g || '@example.com',
                ts, ts, ts
            FROM (SELECT g, timestamptz '2024-01-01 00:00+00' + g * interval '47 seconds' AS ts
                  FROM generate_series(1, {n_leads}) g) gs
            JOIN bench_teams bt ON bt.k = (g % {REPS}) % {TEAMS}
            JOIN bench_lines bl ON bl.k = g % 10
            """
        )
        say(f"  {n_leads:,} leads: {time.monotonic() - t:.1f} s")
        pipeline = x("SELECT id FROM pipelines WHERE name = 'Bench A'").scalar()
        team0 = x("SELECT id FROM teams WHERE name = 'Bench team 0'").scalar()
    t = time.monotonic()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE")
    say(f"  VACUUM ANALYZE: {time.monotonic() - t:.1f} s (load {time.monotonic() - t0:.0f} s in all)")
    return {"pipeline": pipeline, "team0": team0, "rep": "rep7", "manager": "mgr7"}
