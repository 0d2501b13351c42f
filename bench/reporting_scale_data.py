"""reporting-svc's projection tables for N generated events, written set-based in SQL.

Three steps, all in the bench database (migrated with the real migrations):

1. `spec(conn, n)`: one UNLOGGED table per kind of entity in schema `gen` (customers, leads,
   opportunities, orders, invoices and credit notes, tickets, SLA breaches, surveys, calls,
   points ledger entries, loyalty tiers, campaign messages, responses, campaigns), from
   generate_series and a hash of the row number (hashint8: deterministic, no random state).
   Distributions: 3 years of instants (2023-12-01 .. 2026-11-30, denser towards the end),
   customers picked with a square law (customer 0 is the heaviest, the tail long), 8 acquisition
   sources, 200 agents in 8 teams (skewed), 5 channels, IRR / IRT / USD / EUR amounts.
2. `events`: the view gen.events, every event those entities go through (domain, routing key,
   id, time and the protobuf message as its canonical JSON), the same events the producers
   publish. The bench publishes a small slice of it through the broker to the real consumer
   to check step 3 (reporting_scale_bench.check_shape).
3. `project(conn, timeline_keys)`: the fact tables from each entity's newest state, the
   rollups as sums of the facts' contributions (the rules of the projections' `_contrib`
   functions), the timeline from gen.events (one row per event naming a customer).
"""

from __future__ import annotations

import sqlalchemy as sa

from reporting_svc.tables import SUPPORT_MEASURES

SPAN_DAYS = 1095
T0 = "2023-12-01 00:00:00+00"
CAMPAIGNS = 300
AGENTS, TEAMS = 200, 8

# share of the events each kind of entity brings (events per entity in the comment)
SHARES = {
    "customers": 0.08,  # created, a tenth updated
    "leads": 0.03,  # created; converted or disqualified for half
    "opportunities": 0.015,  # created; won or lost for 70%
    "orders": 0.03,  # placed; a tenth cancelled
    "invoices": 0.04,  # issued, 85% paid; 3% are credit notes (one event)
    "tickets": 0.04,  # opened, first responded, resolved, closed; 10% an SLA breach
    "surveys": 0.02,  # answered (csat)
    "calls": 0.04,  # logged
    "points": 0.2,  # earned or redeemed
    "tiers": 0.02,  # tier changed
    "messages": 0.2,  # sent, 40% opened, a tenth of those clicked
    "responses": 0.02,  # recorded
}
SCALE = 1.03  # the events per entity above sum to about 1.03 n


def sizes(n: int) -> dict[str, int]:
    return {k: max(20, round(n * s / SCALE)) for k, s in SHARES.items()} | {"campaigns": CAMPAIGNS}


def pick(u: str, choices: list[tuple[str, float]]) -> str:
    """A CASE choosing among weighted text values by the uniform value u."""
    out, acc = [], 0.0
    for name, w in choices[:-1]:
        acc += w
        out.append(f"WHEN {u} < {acc:.4f} THEN '{name}'")
    return f"(CASE {' '.join(out)} ELSE '{choices[-1][0]}' END)"


SOURCES = [("website", 0.3), ("referral", 0.2), ("instagram", 0.15), ("exhibition", 0.1), ("google_ads", 0.1),
           ("telegram", 0.08), ("cold_call", 0.05), ("", 0.02)]  # fmt: skip
CURRENCIES = [("IRR", 0.8), ("IRT", 0.1), ("USD", 0.07), ("EUR", 0.03)]
CHANNELS = [("CHANNEL_EMAIL", 0.35), ("CHANNEL_WEB", 0.25), ("CHANNEL_PHONE", 0.2), ("CHANNEL_TELEGRAM", 0.15),
            ("CHANNEL_FAX", 0.05)]  # fmt: skip
TIERS = [("bronze", 0.6), ("silver", 0.25), ("gold", 0.12), ("platinum", 0.03)]
PROGRAMMES = [("programmes/club", 0.8), ("programmes/vip", 0.2)]


def _units(cur: str, u: str) -> str:
    """Amount units by currency: rials 5M..5G, tomans a tenth, USD/EUR 50..20,050 (a cube law)."""
    return (f"(CASE {cur} WHEN 'IRR' THEN 5000000 + floor(({u}) ^ 3 * 5e9) WHEN 'IRT' THEN 500000 + floor(({u}) ^ 3 * 5e8)"
            f" ELSE 50 + floor(({u}) ^ 3 * 20000) END)::bigint")  # fmt: skip


FUNCTIONS = f"""
DROP SCHEMA IF EXISTS gen CASCADE;
CREATE SCHEMA gen;
CREATE FUNCTION gen.u(i bigint, s int) RETURNS float8 LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
  $$ SELECT (hashint8(i * 131 + s)::float8 + 2147483648) / 4294967296 $$;
-- an instant of the 3 years, whole seconds, denser towards the end (a growing business)
CREATE FUNCTION gen.at(i bigint, s int) RETURNS timestamptz LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
  $$ SELECT timestamptz '{T0}' + make_interval(secs => floor(sqrt(gen.u(i, s)) * {SPAN_DAYS * 86400})) $$;
CREATE FUNCTION gen.later(t timestamptz, i bigint, s int, max_s float8) RETURNS timestamptz
  LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT t + make_interval(secs => 60 + floor(gen.u(i, s) * max_s)) $$;
CREATE FUNCTION gen.cust(i bigint, s int, c bigint) RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
  $$ SELECT floor(c * gen.u(i, s) ^ 2)::bigint::text $$;
CREATE FUNCTION gen.ts(t timestamptz) RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
  $$ SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') $$;
CREATE FUNCTION gen.money(cur text, units bigint) RETURNS jsonb LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
  $$ SELECT jsonb_build_object('currency_code', cur, 'units', units::text) $$;
CREATE FUNCTION gen.micros(t timestamptz) RETURNS bigint LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
  $$ SELECT (extract(epoch FROM t) * 1000000)::bigint $$;
CREATE FUNCTION gen.rials(cur text, amount numeric) RETURNS numeric LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
  $$ SELECT CASE WHEN cur = 'IRT' THEN amount * 10 ELSE amount END $$;
"""


def spec_sql(n: int) -> list[str]:
    s = sizes(n)
    c = s["customers"]
    agent = f"floor(gen.u(k, 52) ^ 1.5 * {AGENTS})::int"
    campaign = "'campaigns/' || floor(gen.u(k, {s}) * " + str(CAMPAIGNS) + ")::int"
    maybe_campaign = "CASE WHEN gen.u(k, {s}) < {p} THEN " + campaign.replace("{s}", "{s2}") + " END"
    series = "FROM generate_series(0, {n} - 1) k"
    return [
        f"""CREATE UNLOGGED TABLE gen.customers AS SELECT k::text AS id, {pick("gen.u(k, 1)", SOURCES)} AS source,
            gen.at(k, 2) AS created_at, gen.u(k, 3) < 0.1 AS updated, {pick("gen.u(k, 4)", SOURCES)} AS source2
            {series.format(n=c)}""",
        f"""CREATE UNLOGGED TABLE gen.leads AS SELECT k::text AS id, gen.cust(k, 11, {c}) AS customer,
            {pick("gen.u(k, 12)", SOURCES)} AS source, gen.at(k, 13) AS created,
            CASE WHEN gen.u(k, 14) < 0.3 THEN 'converted' WHEN gen.u(k, 14) < 0.5 THEN 'disqualified' END AS outcome,
            gen.later(gen.at(k, 13), k, 15, 60 * 86400) AS t2, {maybe_campaign.format(s=16, s2=17, p=0.25)} AS campaign,
            'users/' || mod(k, 50) AS owner {series.format(n=s["leads"])}""",
        f"""CREATE UNLOGGED TABLE gen.opportunities AS SELECT k::text AS id, gen.cust(k, 21, {c}) AS customer,
            {pick("gen.u(k, 22)", SOURCES)} AS source, gen.at(k, 23) AS created,
            CASE WHEN gen.u(k, 24) < 0.4 THEN 'won' WHEN gen.u(k, 24) < 0.7 THEN 'lost' END AS outcome,
            gen.later(gen.at(k, 23), k, 25, 90 * 86400) AS closed, cur, {_units("cur", "gen.u(k, 27)")} AS units,
            'users/' || mod(k, 50) AS owner
            FROM (SELECT k, {pick("gen.u(k, 26)", CURRENCIES)} AS cur FROM generate_series(0, {s["opportunities"]} - 1) k) x""",
        f"""CREATE UNLOGGED TABLE gen.orders AS SELECT k::text AS id, gen.cust(k, 31, {c}) AS customer,
            gen.at(k, 32) AS placed, gen.u(k, 33) < 0.1 AS cancelled, gen.later(gen.at(k, 32), k, 34, 10 * 86400) AS t2,
            {maybe_campaign.format(s=35, s2=38, p=0.2)} AS campaign, cur, {_units("cur", "gen.u(k, 37)")} / 4 AS units
            FROM (SELECT k, {pick("gen.u(k, 36)", CURRENCIES)} AS cur FROM generate_series(0, {s["orders"]} - 1) k) x""",
        f"""CREATE UNLOGGED TABLE gen.invoices AS SELECT id, customer, kind, issued, paid, campaign, cur, units,
            round(units * 0.09)::bigint AS tax FROM (
            SELECT k::text AS id, gen.cust(k, 41, {c}) AS customer,
            CASE WHEN gen.u(k, 44) < 0.03 THEN 'credit_note' ELSE 'invoice' END AS kind, gen.at(k, 42) AS issued,
            CASE WHEN gen.u(k, 44) >= 0.03 AND gen.u(k, 43) < 0.85 THEN gen.later(gen.at(k, 42), k, 45, 30 * 86400) END AS paid,
            {maybe_campaign.format(s=46, s2=49, p=0.2)} AS campaign, cur,
            {_units("cur", "gen.u(k, 48)")} / (CASE WHEN gen.u(k, 44) < 0.03 THEN 20 ELSE 4 END) AS units
            FROM (SELECT k, {pick("gen.u(k, 47)", CURRENCIES)} AS cur FROM generate_series(0, {s["invoices"]} - 1) k) x) y""",
        f"""CREATE UNLOGGED TABLE gen.tickets AS SELECT k::text AS id, gen.cust(k, 51, {c}) AS customer,
            'agents/' || a AS agent, 'teams/' || mod(a, {TEAMS}) AS team, {pick("gen.u(k, 54)", CHANNELS)} AS channel,
            gen.u(k, 55) < 0.08 AS complaint, t1, gen.later(t1, k, 56, 8 * 3600) AS t2,
            gen.later(gen.later(t1, k, 56, 8 * 3600), k, 57, 72 * 3600) AS t3,
            gen.later(gen.later(gen.later(t1, k, 56, 8 * 3600), k, 57, 72 * 3600), k, 58, 86400) AS t4,
            CASE WHEN gen.u(k, 59) < 0.7 THEN 'slaPolicies/std' ELSE '' END AS policy,
            gen.u(k, 60) < 0.85 AS fr_met, gen.u(k, 61) < 0.8 AS res_met, gen.u(k, 62) < 0.1 AS breached,
            gen.u(k, 63) < 0.5 AS surveyed, 1 + floor(gen.u(k, 64) ^ 0.6 * 5)::int AS csat,
            gen.later(gen.later(gen.later(gen.later(t1, k, 56, 8 * 3600), k, 57, 72 * 3600), k, 58, 86400), k, 65,
                      2 * 86400) AS answered
            FROM (SELECT k, {agent} AS a, gen.at(k, 53) AS t1 FROM generate_series(0, {s["tickets"]} - 1) k) x""",
        f"""CREATE UNLOGGED TABLE gen.calls AS SELECT k::text AS id,
            CASE WHEN gen.u(k, 71) < 0.7 THEN gen.cust(k, 71, {c}) END AS customer,
            'agents/' || floor(gen.u(k, 72) ^ 1.5 * {AGENTS})::int AS agent, gen.at(k, 73) AS started,
            CASE WHEN gen.u(k, 74) < 0.6 THEN 'inbound' ELSE 'outbound' END AS direction,
            CASE WHEN gen.u(k, 75) < 0.8 THEN 'answered' ELSE 'missed' END AS outcome,
            CASE WHEN gen.u(k, 75) < 0.8 THEN 20 + floor(gen.u(k, 76) * 900)::int ELSE 0 END AS talk
            {series.format(n=s["calls"])}""",
        f"""CREATE UNLOGGED TABLE gen.points AS SELECT k::text AS id, customer, {pick("gen.u(k, 82)", PROGRAMMES)} AS programme,
            CASE WHEN gen.u(k, 83) < 0.7 THEN 'earned' ELSE 'redeemed' END AS kind,
            CASE WHEN gen.u(k, 83) < 0.7 THEN 10 + floor(gen.u(k, 84) * 490) ELSE -(50 + floor(gen.u(k, 84) * 950)) END::bigint
              AS points, floor(gen.u(k, 85) * 20000)::bigint AS balance, gen.at(k, 86) AS at
            FROM (SELECT k, gen.cust(k, 81, {c}) AS customer FROM generate_series(0, {s["points"]} - 1) k) x""",
        f"""CREATE UNLOGGED TABLE gen.tiers AS SELECT k::text AS id, {pick("gen.u(k, 91)", PROGRAMMES)} AS programme,
            {pick("gen.u(k, 92)", TIERS)} AS tier, gen.at(k, 93) AS at {series.format(n=min(s["tiers"], c))}""",
        f"""CREATE UNLOGGED TABLE gen.messages AS SELECT k::text AS id, {campaign.format(s=101)} AS campaign,
            gen.cust(k, 102, {c}) AS customer, CASE WHEN gen.u(k, 103) < 0.7 THEN 'email' ELSE 'sms' END AS channel,
            gen.at(k, 104) AS sent, gen.u(k, 105) < 0.4 AS opened, gen.later(gen.at(k, 104), k, 106, 2 * 86400) AS t2,
            gen.u(k, 105) < 0.04 AS clicked, gen.later(gen.later(gen.at(k, 104), k, 106, 2 * 86400), k, 107, 3600) AS t3
            {series.format(n=s["messages"])}""",
        f"""CREATE UNLOGGED TABLE gen.responses AS SELECT k::text AS id, {campaign.format(s=111)} AS campaign,
            gen.cust(k, 112, {c}) AS customer, gen.at(k, 113) AS at {series.format(n=s["responses"])}""",
        f"""CREATE UNLOGGED TABLE gen.campaigns AS SELECT k::text AS id,
            CASE WHEN gen.u(k, 121) < 0.6 THEN 'email' ELSE 'sms' END AS channel, gen.at(k, 122) AS launched,
            gen.u(k, 123) < 0.8 AS completed, gen.later(gen.at(k, 122), k, 124, 30 * 86400) AS t2,
            {pick("gen.u(k, 125)", [("leads", 0.3), ("orders", 0.2), ("revenue", 0.3), ("responses", 0.2)])} AS goal_kind,
            (100 + floor(gen.u(k, 126) * 5000))::bigint AS goal, (10000000 + floor(gen.u(k, 127) * 1e9))::bigint AS cost,
            (1000 + floor(gen.u(k, 128) * 100000))::bigint AS recipients {series.format(n=CAMPAIGNS)}""",
    ]


def _sums(cols) -> str:
    return ", ".join(f"sum({c})" for c in cols)


def _j(*pairs: str) -> str:
    return f"jsonb_strip_nulls(jsonb_build_object({', '.join(pairs)}))"


def _ev(dom: str, rk: str, msg: str, at: str, subject: str, payload: str, customer: str, ref: str, title: str,
        detail: list[str], frm: str, step: str) -> str:  # fmt: skip
    """One kind of event of gen.events; the timeline's detail is the payload's named fields."""
    keep = "ARRAY[" + ", ".join(f"'{f}'" for f in detail) + "]::text[]" if detail else "ARRAY[]::text[]"
    return f"""SELECT '{dom}'::text AS dom, {rk}::text AS rk, md5({rk} || ':{step}:' || id)::uuid::text AS event_id,
        {at} AS at, {subject} AS subject, {msg if not msg.startswith("crm.") else repr(msg)}::text AS msg, p AS payload, {customer} AS customer, {ref} AS ref,
        {title} AS title, (SELECT coalesce(jsonb_object_agg(key, value), '{{}}') FROM jsonb_each(p) WHERE key = ANY({keep}))
        AS detail FROM {frm}"""


def events_sql() -> str:
    cust = "'customers/' || customer"
    created = _j(
        "'name', 'customers/' || id",
        "'acquisition_source', nullif(source, '')",
        "'create_time', gen.ts(created_at)",
        "'etag', '\"1\"'",
    )
    updated = _j(
        "'name', 'customers/' || id",
        "'acquisition_source', nullif(source2, '')",
        "'create_time', gen.ts(created_at)",
        "'etag', '\"2\"'",
    )
    parts = [
        # customer-svc
        _ev("customer", "rk", "CASE rk WHEN 'customer.created.v1' THEN 'crm.customer.v1.CustomerCreated' ELSE 'crm.customer.v1.CustomerUpdated' END", "at", "'customers/' || id",
            "p", "id", "'customers/' || id", "title", ["changed_fields"],
            f"""gen.customers, LATERAL (VALUES ('customer.created.v1', created_at, 'Customer record created',
                jsonb_build_object('customer', {created})),
                ('customer.updated.v1', created_at + interval '7 days', 'Customer record updated',
                jsonb_build_object('customer', {updated}, 'changed_fields', '["acquisition_source"]'::jsonb))
                ) v(rk, at, title, p) WHERE rk = 'customer.created.v1' OR updated""", "c"),
        # sales-svc
        _ev("sales", "rk", "crm.sales.v1.LeadEvent", "at", "'leads/' || id", "p", "customer", "'leads/' || id",
            "'Lead ' || verb || CASE WHEN source <> '' THEN ' (' || source || ')' ELSE '' END",
            ["status", "source", "product_line", "owner", "disqualify_reason", "opportunity"],
            f"""gen.leads, LATERAL (VALUES ('created', 'new', created, 1), (outcome, outcome, t2, 2)) v(verb, status, at, version),
                LATERAL (SELECT 'lead.' || verb || '.v1' AS rk, {_j("'lead', 'leads/' || id", "'status', status", "'owner', owner",
                "'source', nullif(source, '')", "'campaign_id', campaign", f"'customer', {cust}",
                "'create_time', gen.ts(created)", "'event_time', gen.ts(at)", "'version', version::text")} AS p) e
                WHERE verb IS NOT NULL""", "l"),
        _ev("sales", "rk", "crm.sales.v1.OpportunityEvent", "at", "'opportunities/' || id", "p", "customer",
            "'opportunities/' || id", "'Opportunity Deal ' || id || ' ' || verb || ': ' || units || ' ' || cur",
            ["name", "stage_name", "state", "amount", "owner", "close_reason"],
            f"""gen.opportunities, LATERAL (VALUES ('created', 'open', created, 1), (outcome, outcome, closed, 2))
                v(verb, state, at, version),
                LATERAL (SELECT 'opportunity.' || verb || '.v1' AS rk, {_j("'opportunity', 'opportunities/' || id",
                "'name', 'Deal ' || id", f"'customer', {cust}", "'amount', gen.money(cur, units)", "'state', state",
                "'owner', owner", "'source', nullif(source, '')", "'create_time', gen.ts(created)",
                "'close_time', CASE WHEN version = 2 THEN gen.ts(closed) END", "'event_time', gen.ts(at)",
                "'version', version::text")} AS p) e WHERE verb IS NOT NULL""", "o"),
        _ev("sales", "rk", "crm.sales.v1.OrderEvent", "at", "'orders/' || id", "p", "customer", "'orders/' || id",
            "'Order SO-' || id || ' ' || state || ': ' || units || ' ' || cur",
            ["number", "state", "total", "owner", "cancel_reason"],
            f"""gen.orders, LATERAL (VALUES ('placed', placed), (CASE WHEN cancelled THEN 'cancelled' END, t2)) v(state, at),
                LATERAL (SELECT 'order.' || state || '.v1' AS rk, {_j("'order', 'orders/' || id", "'number', 'SO-' || id",
                f"'customer', {cust}", "'total', gen.money(cur, units)", "'campaign_id', campaign",
                "'event_time', gen.ts(at)", "'state', state")} AS p) e WHERE state IS NOT NULL""", "r"),
        _ev("sales", "rk", "crm.sales.v1.InvoiceEvent", "at", "'invoices/' || id", "p", "customer", "'invoices/' || id",
            "'Invoice INV-' || id || ' ' || verb || ': ' || units || ' ' || cur",
            ["number", "kind", "state", "total", "paid_total", "due_date", "credited_invoice"],
            f"""gen.invoices, LATERAL (VALUES (CASE WHEN kind = 'invoice' THEN 'issued' ELSE 'credited' END, 'issued', issued),
                (CASE WHEN paid IS NOT NULL THEN 'paid' END, 'paid', paid)) v(verb, state, at),
                LATERAL (SELECT 'invoice.' || verb || '.v1' AS rk, {_j("'invoice', 'invoices/' || id",
                "'number', 'INV-' || id", "'kind', kind", f"'customer', {cust}", "'total', gen.money(cur, units)",
                "'tax_total', gen.money(cur, tax)", "'state', state", "'campaign_id', campaign",
                "'event_time', gen.ts(at)")} AS p) e WHERE verb IS NOT NULL""", "i"),
        # support-svc
        _ev("support", "rk", "crm.support.v1.TicketEvent", "at", "'tickets/' || id", "p", "customer", "'tickets/' || id",
            "'Ticket T-' || id || ' ' || verb || CASE WHEN complaint THEN ' (complaint)' ELSE '' END",
            ["number", "channel", "category", "complaint", "priority", "team", "assignee", "state"],
            f"""gen.tickets, LATERAL (VALUES ('opened', 1, t1), ('first_responded', 2, t2), ('resolved', 3, t3),
                ('closed', 4, t4)) v(verb, version, at),
                LATERAL (SELECT 'ticket.' || verb || '.v1' AS rk, {_j("'ticket', 'tickets/' || id", "'number', 'T-' || id",
                f"'customer', {cust}", "'channel', channel", "'complaint', CASE WHEN complaint THEN true END",
                "'team', team", "'assignee', agent", "'exchange_count', version", "'create_time', gen.ts(t1)",
                "'first_response_time', CASE WHEN version >= 2 THEN gen.ts(t2) END",
                "'resolve_time', CASE WHEN version >= 3 THEN gen.ts(t3) END",
                "'close_time', CASE WHEN version >= 4 THEN gen.ts(t4) END", "'event_time', gen.ts(at)",
                "'version', version::text", "'sla_policy', nullif(policy, '')",
                "'sla_first_response_met', CASE WHEN version >= 2 AND fr_met THEN true END",
                "'sla_resolution_met', CASE WHEN version >= 3 AND res_met THEN true END")} AS p) e""", "t"),
        _ev("support", "'ticket.sla_breached.v1'", "crm.support.v1.SlaEvent", "t1 + interval '2 hours'",
            "'tickets/' || id", "p", "customer", "'tickets/' || id", "''", [],
            f"""gen.tickets, LATERAL (SELECT {_j("'ticket', 'tickets/' || id", "'policy', 'slaPolicies/std'",
                "'metric', 'first_response'", "'event_time', gen.ts(t1 + interval '2 hours')", "'team', team",
                "'assignee', agent", f"'customer', {cust}")} AS p) e WHERE breached""", "b"),
        _ev("support", "'survey.answered.v1'", "crm.support.v1.SurveyEvent", "answered", "'surveys/' || id", "p",
            "customer", "'surveys/' || id", "'Survey answered: satisfaction ' || csat || '/5'",
            ["kind", "csat", "ticket", "agent"],
            f"""gen.tickets, LATERAL (SELECT {_j("'survey', 'surveys/' || id", "'ticket', 'tickets/' || id",
                f"'customer', {cust}", "'agent', agent", "'team', team", "'kind', 'csat'", "'csat', csat",
                "'answer_time', gen.ts(answered)")} AS p) e WHERE surveyed""", "s"),
        _ev("support", "'call.logged.v1'", "crm.support.v1.CallEvent", "started", "'calls/' || id", "p", "customer",
            "'calls/' || id", "initcap(direction) || ' call, ' || outcome",
            ["direction", "queue", "agent", "outcome", "disposition", "talk_seconds", "ticket"],
            f"""gen.calls, LATERAL (SELECT {_j("'call', 'calls/' || id", "'direction', direction",
                f"'customer', {cust}", "'agent', agent", "'outcome', outcome",
                "'talk_seconds', CASE WHEN talk > 0 THEN talk::text END", "'start_time', gen.ts(started)",
                "'version', '1'")} AS p) e""", "k"),
        # campaign-svc
        _ev("campaign", "'points.' || kind || '.v1'", "crm.campaign.v1.PointsEvent", "at", "'ledger/' || id", "p",
            "customer", "'ledger/' || id", "abs(points) || ' points ' || kind || ', balance ' || balance",
            ["account", "programme", "kind", "points", "balance", "amount", "reference", "reason"],
            f"""gen.points, LATERAL (SELECT {_j("'entry', 'ledger/' || id", "'account', 'accounts/' || customer",
                f"'customer', {cust}", "'programme', programme", "'kind', kind", "'points', points::text",
                "'balance', nullif(balance, 0)::text", "'event_time', gen.ts(at)")} AS p) e""", "p"),
        _ev("campaign", "'tier.changed.v1'", "crm.campaign.v1.TierEvent", "at", "'accounts/' || id", "p", "id",
            "'accounts/' || id", "'Tier up: - → ' || tier", ["programme", "previous_tier", "tier", "direction", "reason"],
            f"""gen.tiers, LATERAL (SELECT {_j("'account', 'accounts/' || id", "'customer', 'customers/' || id",
                "'programme', programme", "'tier', tier", "'direction', 'up'", "'event_time', gen.ts(at)")} AS p) e""",
            "g"),
        _ev("campaign", "'message.' || state || '.v1'", "crm.campaign.v1.MessageEvent", "at", "'messages/' || id",
            "p", "customer", "'messages/' || id",
            "'Campaign ' || channel || ' ' || state || CASE WHEN state = 'clicked' THEN ': ' || url ELSE '' END",
            ["campaign", "variant", "channel", "state", "url"],
            f"""gen.messages, LATERAL (VALUES ('sent', sent, NULL), (CASE WHEN opened THEN 'opened' END, t2, NULL),
                (CASE WHEN clicked THEN 'clicked' END, t3, 'https://shop.example/p/' || mod(id::bigint, 100)))
                v(state, at, url),
                LATERAL (SELECT {_j("'message', 'messages/' || id", "'campaign', campaign", f"'customer', {cust}",
                "'channel', channel", "'state', state", "'url', url", "'event_time', gen.ts(at)")} AS p) e
                WHERE state IS NOT NULL""", "m"),
        _ev("campaign", "'response.recorded.v1'", "crm.campaign.v1.ResponseEvent", "at", "'responses/' || id", "p",
            "customer", "'responses/' || id", "'Responded to a campaign (form)'",
            ["campaign", "message", "kind", "channel", "utm_source", "utm_medium", "utm_campaign"],
            f"""gen.responses, LATERAL (SELECT {_j("'response', 'responses/' || id", "'campaign', campaign",
                f"'customer', {cust}", "'kind', 'form'", "'channel', 'web'", "'event_time', gen.ts(at)")} AS p) e""",
            "q"),
        _ev("campaign", "'campaign.' || verb || '.v1'", "crm.campaign.v1.CampaignEvent", "at", "'campaigns/' || id",
            "p", "NULL::text", "'campaigns/' || id", "''", [],
            f"""gen.campaigns, LATERAL (VALUES ('launched', 'running', launched, 1),
                (CASE WHEN completed THEN 'completed' END, 'completed', t2, 2)) v(verb, state, at, version),
                LATERAL (SELECT {_j("'campaign', 'campaigns/' || id", "'display_name', 'Campaign ' || id",
                "'channel', channel", "'state', state", "'recipients', recipients::text", "'goal_kind', goal_kind",
                "'goal_target', gen.money('IRR', goal)", "'cost', gen.money('IRR', cost)", "'event_time', gen.ts(at)",
                "'version', version::text")} AS p) e WHERE verb IS NOT NULL""", "a"),
    ]  # fmt: skip
    return "CREATE VIEW gen.events AS\n" + "\nUNION ALL\n".join(parts)


# The facts (each entity's newest state) and the rollups (sums of the facts' contributions, the
# rules of the projections' _contrib functions), then the timeline from gen.events. The per-day
# rollups are written in day order (their primary key's) and the timeline in time order, as the
# live path lays them out: a day's rollup rows are made, and stop changing, while its events
# arrive (written in hash order, a month's support_daily rows were spread over the whole heap).
PROJECT = [
    """INSERT INTO customer_source_facts (customer_id, acquisition_source, created_at, deleted, version)
       SELECT id, coalesce(nullif(CASE WHEN updated THEN source2 ELSE source END, ''), 'unknown'), created_at, false,
              CASE WHEN updated THEN 2 ELSE 1 END FROM gen.customers""",
    """INSERT INTO lead_facts (lead_id, version, source, status, create_time)
       SELECT id, CASE WHEN outcome IS NULL THEN 1 ELSE 2 END, coalesce(nullif(source, ''), 'unknown'),
              coalesce(outcome, 'new'), created FROM gen.leads""",
    """INSERT INTO opportunity_facts (opportunity_id, version, source, state, currency, amount, close_time)
       SELECT id, CASE WHEN outcome IS NULL THEN 1 ELSE 2 END, coalesce(nullif(source, ''), 'unknown'),
              coalesce(outcome, 'open'), CASE WHEN cur = 'IRT' THEN 'IRR' ELSE cur END, gen.rials(cur, units),
              CASE WHEN outcome IS NOT NULL THEN closed END FROM gen.opportunities""",
    """INSERT INTO acquisition_daily (day, source, currency, customers, leads, converted_leads, won_opportunities,
                                      won_amount)
       SELECT day, source, currency, sum(c), sum(l), sum(cl), sum(w), sum(a) FROM (
         SELECT tehran_day(created_at) AS day, acquisition_source AS source, '' AS currency, 1 AS c, 0 AS l, 0 AS cl,
                0 AS w, 0::numeric AS a FROM customer_source_facts WHERE NOT deleted
         UNION ALL SELECT tehran_day(create_time), source, '', 0, 1, (status = 'converted')::int, 0, 0 FROM lead_facts
         UNION ALL SELECT tehran_day(close_time), source, currency, 0, 0, 0, 1, amount FROM opportunity_facts
           WHERE state = 'won' AND close_time IS NOT NULL
       ) x GROUP BY 1, 2, 3 ORDER BY 1, 2, 3""",
    """INSERT INTO ticket_facts (ticket_id, version, channel, team, assignee, complaint, exchange_count, create_time,
                                 first_response_time, resolve_time, close_time, sla_policy, sla_first_response_met,
                                 sla_resolution_met)
       SELECT id, 4, lower(substr(channel, 9)), team, agent, complaint, 4, t1, t2, t3, t4, policy, fr_met, res_met
       FROM gen.tickets""",
    """INSERT INTO survey_facts (survey_id, version, agent, team, csat)
       SELECT id, answered, agent, team, csat FROM gen.tickets WHERE surveyed""",
    """INSERT INTO sla_breach_facts (ticket_id, metric, version, team, assignee)
       SELECT id, 'first_response', t1 + interval '2 hours', team, agent FROM gen.tickets WHERE breached""",
    """INSERT INTO call_facts (call_id, version, agent, start_time) SELECT id, 1, agent, started FROM gen.calls""",
    """INSERT INTO support_daily (day, team, agent, channel, requests, complaints, exchanges, first_responses,
                                  first_response_seconds, resolutions, resolution_seconds, sla_targets, sla_met, closed,
                                  sla_breaches, csat_sum, csat_count, calls)
       SELECT day, team, agent, channel, sum(rq), sum(cp), sum(ex), sum(fr), sum(frs), sum(rs), sum(rss), sum(st),
              sum(sm), sum(cl), sum(br), sum(cs), sum(cc), sum(ca) FROM (
         SELECT tehran_day(create_time) AS day, team, assignee AS agent, channel, 1 AS rq, complaint::int AS cp,
                exchange_count AS ex, (first_response_time IS NOT NULL)::int AS fr,
                coalesce(greatest(0, floor(extract(epoch FROM first_response_time - create_time)))::bigint, 0) AS frs,
                (resolve_time IS NOT NULL)::int AS rs,
                coalesce(greatest(0, floor(extract(epoch FROM resolve_time - create_time)))::bigint, 0) AS rss,
                (sla_policy <> '' AND first_response_time IS NOT NULL)::int
                  + (sla_policy <> '' AND resolve_time IS NOT NULL)::int AS st,
                (sla_policy <> '' AND first_response_time IS NOT NULL AND sla_first_response_met)::int
                  + (sla_policy <> '' AND resolve_time IS NOT NULL AND sla_resolution_met)::int AS sm,
                0 AS cl, 0 AS br, 0 AS cs, 0 AS cc, 0 AS ca FROM ticket_facts
         UNION ALL SELECT tehran_day(close_time), team, assignee, channel, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0
           FROM ticket_facts WHERE close_time IS NOT NULL
         UNION ALL SELECT tehran_day(version), team, assignee, '', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0
           FROM sla_breach_facts
         UNION ALL SELECT tehran_day(version), team, agent, '', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, csat, 1, 0
           FROM survey_facts
         UNION ALL SELECT tehran_day(start_time), '', agent, 'phone', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1
           FROM call_facts
       ) x GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4""",
    # support_monthly: support_daily's sums per Gregorian month and per Jalali month (keyed by
    # the Gregorian date of its 1st), as support.monthly contributes them
    f"""INSERT INTO support_monthly (calendar, month, team, agent, channel, {", ".join(SUPPORT_MEASURES)})
       SELECT 'gregorian', date_trunc('month', day)::date, team, agent, channel, {_sums(SUPPORT_MEASURES)}
       FROM support_daily GROUP BY 2, 3, 4, 5
       UNION ALL SELECT 'jalali', day - (jalali_day_of_month(day) - 1), team, agent, channel, {_sums(SUPPORT_MEASURES)}
       FROM support_daily GROUP BY 2, 3, 4, 5
       ORDER BY 1, 2, 3, 4, 5""",
    """INSERT INTO points_facts (entry_id, version, programme, kind, points)
       SELECT 'ledger/' || id, at, programme, kind, points FROM gen.points""",
    """INSERT INTO loyalty_daily (day, programme, earned, redeemed, expired, adjusted, reversed)
       SELECT tehran_day(version), programme, coalesce(sum(points) FILTER (WHERE kind = 'earned'), 0),
              coalesce(sum(points) FILTER (WHERE kind = 'redeemed'), 0), 0, 0, 0
       FROM points_facts GROUP BY 1, 2 ORDER BY 1, 2""",
    """INSERT INTO tier_facts (account_id, version, programme, tier)
       SELECT 'accounts/' || id, at, programme, tier FROM gen.tiers""",
    """INSERT INTO tier_counts (programme, tier, accounts) SELECT programme, tier, count(*) FROM tier_facts GROUP BY 1, 2""",
    """INSERT INTO campaign_facts (campaign_id, version, display_name, channel, state, goal_kind, goal_target, currency,
                                   cost, recipients)
       SELECT id, CASE WHEN completed THEN 2 ELSE 1 END, 'Campaign ' || id, channel,
              CASE WHEN completed THEN 'completed' ELSE 'running' END, goal_kind, goal, 'IRR', cost, recipients
       FROM gen.campaigns""",
    """INSERT INTO campaign_attribution_facts (ref, version, campaign_id, measure, counts, amount)
       SELECT 'responses/' || id, gen.micros(at), substr(campaign, 11), 'responses', true, 0 FROM gen.responses
       UNION ALL SELECT 'leads/' || id, CASE WHEN outcome IS NULL THEN 1 ELSE 2 END, substr(campaign, 11), 'leads', true, 0
         FROM gen.leads WHERE campaign IS NOT NULL
       UNION ALL SELECT 'orders/' || id, gen.micros(CASE WHEN cancelled THEN t2 ELSE placed END), substr(campaign, 11),
         'orders', NOT cancelled, 0 FROM gen.orders WHERE campaign IS NOT NULL
       UNION ALL SELECT 'invoices/' || id, gen.micros(coalesce(paid, issued)), substr(campaign, 11), 'revenue',
         kind = 'credit_note' OR paid IS NOT NULL,
         CASE WHEN cur IN ('IRR', 'IRT') THEN gen.rials(cur, units) * CASE WHEN kind = 'credit_note' THEN -1 ELSE 1 END
         ELSE 0 END
         FROM gen.invoices WHERE campaign IS NOT NULL""",
    """INSERT INTO campaign_stats (campaign_id, responses, leads, orders, revenue)
       SELECT campaign_id, count(*) FILTER (WHERE measure = 'responses'), count(*) FILTER (WHERE measure = 'leads'),
              count(*) FILTER (WHERE measure = 'orders'), coalesce(sum(amount) FILTER (WHERE measure = 'revenue'), 0)
       FROM campaign_attribution_facts WHERE counts GROUP BY campaign_id""",
    """INSERT INTO invoice_value_facts (invoice_id, version, customer_id, kind, state, currency, net_amount, value_time)
       SELECT id, coalesce(paid, issued), customer, kind, CASE WHEN paid IS NOT NULL THEN 'paid' ELSE 'issued' END,
              CASE WHEN cur = 'IRT' THEN 'IRR' ELSE cur END, gen.rials(cur, units - tax),
              CASE WHEN kind = 'credit_note' THEN issued ELSE paid END FROM gen.invoices""",
    """INSERT INTO customer_value_daily (day, customer_id, currency, revenue, purchases, credit_notes)
       SELECT tehran_day(value_time), customer_id, currency,
              sum(CASE WHEN kind = 'credit_note' THEN -net_amount ELSE net_amount END),
              count(*) FILTER (WHERE kind <> 'credit_note'), count(*) FILTER (WHERE kind = 'credit_note')
       FROM invoice_value_facts WHERE value_time IS NOT NULL AND customer_id <> ''
         AND (kind = 'credit_note' OR state = 'paid') GROUP BY 1, 2, 3 ORDER BY 1, 2, 3""",
    # customer_value_summary: per customer x currency over the non-zero daily rows (value.refresh_summary)
    """INSERT INTO customer_value_summary (customer_id, currency, first_day, last_day, last_purchase_day,
                                          purchase_days, purchases, revenue, credit_notes)
       SELECT customer_id, currency, min(day), max(day), max(day) FILTER (WHERE purchases > 0),
              count(*) FILTER (WHERE purchases > 0), sum(purchases), sum(revenue), sum(credit_notes)
       FROM customer_value_daily WHERE revenue <> 0 OR purchases <> 0 OR credit_notes <> 0
       GROUP BY customer_id, currency ORDER BY customer_id, currency""",
]

TIMELINE = """INSERT INTO timeline (customer_id, origin_customer_id, occurred_at, kind, source, ref, title, detail, event_id)
    SELECT customer, customer, at, left(rk, -3), dom, ref, title, detail, event_id FROM gen.events
    WHERE rk = ANY(:keys) AND customer IS NOT NULL ORDER BY at"""


def create_spec(conn: sa.Connection, n: int) -> None:
    conn.exec_driver_sql(FUNCTIONS)
    for stmt in spec_sql(n):
        conn.exec_driver_sql(stmt)
    conn.exec_driver_sql(events_sql())


def project(conn: sa.Connection, timeline_keys: list[str], timeline: bool = True) -> None:
    for stmt in PROJECT:
        conn.exec_driver_sql(stmt)
    if timeline:
        conn.execute(sa.text(TIMELINE), {"keys": timeline_keys})


def drop_spec(conn: sa.Connection) -> None:
    conn.exec_driver_sql("DROP SCHEMA IF EXISTS gen CASCADE")
