"""Migrations: a database at 0002 with customer facts keeps them, and 0005 fills the acquisition
rollup from them (the report answers as before the upgrade); downgrade and upgrade round-trip."""

from __future__ import annotations

import datetime as dt
import pathlib
from decimal import Decimal

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from crm_chassis.db import migrate, normalise_url
from reporting_svc.__main__ import SPEC


def cfg(url: str) -> Config:
    c = Config()
    c.set_main_option("script_location", str(pathlib.Path(SPEC.migrations)))
    c.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return c


def test_upgrade_from_0002_keeps_the_facts_and_fills_the_rollup(databases):
    url = databases.fresh("rep_migr")
    migrate(url, SPEC.migrations, "0002")
    engine = sa.create_engine(normalise_url(url))
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO customer_source_facts (customer_id, acquisition_source, created_at, deleted, version) VALUES "
                "('a', 'website', '2026-11-21 20:45+00', false, 1), ('b', 'website', '2026-11-21 10:00+00', false, 1), "
                "('c', 'referral', '2026-11-21 10:00+00', true, 2)"
            )
        )
    migrate(url, SPEC.migrations)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT day::text, source, customers FROM acquisition_daily ORDER BY 1, 2")).all()
        assert [tuple(r) for r in rows] == [("2026-11-21", "website", 1), ("2026-11-22", "website", 1)]
        assert conn.execute(sa.text("SELECT count(*) FROM customer_source_facts")).scalar() == 3
    command.downgrade(cfg(url), "0002")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT to_regclass('support_daily')")).scalar() is None
        assert conn.execute(sa.text("SELECT count(*) FROM customer_source_facts")).scalar() == 3
    command.upgrade(cfg(url), "head")
    engine.dispose()


def test_0012_fills_the_pipeline_rollup_from_the_opportunity_facts(databases):
    url = databases.fresh("rep_migr12")
    migrate(url, SPEC.migrations, "0010")
    engine = sa.create_engine(normalise_url(url))
    with engine.begin() as conn:  # an open opportunity without a close date, a won one, a lost one
        conn.execute(
            sa.text(
                "INSERT INTO opportunity_facts (opportunity_id, version, source, state, currency, amount, close_time,"
                " owner, probability, expected_close_date) VALUES"
                " ('a', 1, 'web', 'open', 'IRR', 1000, NULL, 'ana', 12.5, NULL),"
                " ('b', 1, 'web', 'open', 'IRR', 3, NULL, 'ana', 50, NULL),"
                " ('c', 2, 'web', 'won', 'IRR', 700, '2026-11-21 20:45+00', 'ana', 100, '2026-11-01'),"
                " ('d', 1, 'web', 'lost', 'IRR', 9, '2026-11-21 10:00+00', 'ana', 0, NULL)"
            )
        )
    migrate(url, SPEC.migrations)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT day::text, owner, open_opportunities, open_amount, weighted_amount, won_opportunities,"
                " won_amount FROM sales_pipeline_daily ORDER BY day"
            )
        ).all()
    # weighted as sales.weighted rounds it: 1000 x 12.5% + 3 x 50% (1.5)
    assert [tuple(r) for r in rows] == [
        ("0001-01-01", "ana", 2, 1003, Decimal("126.500000000"), 0, 0),
        ("2026-11-22", "ana", 0, 0, 0, 1, 700),  # the Tehran day of the win
    ]
    command.downgrade(cfg(url), "0010")
    command.upgrade(cfg(url), "head")
    engine.dispose()


def test_0016_fills_the_monthly_rollup_and_the_summary_from_the_daily_rollups(databases):
    url = databases.fresh("rep_migr16")
    migrate(url, SPEC.migrations, "0011")
    engine = sa.create_engine(normalise_url(url))
    with engine.begin() as conn:  # 2026-03-20 is in Esfand 1404 and March; 03-21 Farvardin 1405; 04-02 April
        conn.execute(
            sa.text(
                "INSERT INTO support_daily (day, team, agent, channel, requests, closed) VALUES"
                " ('2026-03-20', 't', 'a', 'email', 2, 1), ('2026-03-21', 't', 'a', 'email', 3, 0),"
                " ('2026-04-02', 't', 'a', 'email', 5, 2), ('2026-04-02', 't', 'b', 'web', 0, 0)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO customer_value_daily (day, customer_id, currency, revenue, purchases, credit_notes) VALUES"
                " ('2026-03-20', 'c', 'IRR', 100, 1, 0), ('2026-04-02', 'c', 'IRR', -30, 0, 1),"
                " ('2026-05-01', 'c', 'IRR', 0, 0, 0), ('2026-04-03', 'd', 'USD', 0, 0, 0)"
            )
        )
    migrate(url, SPEC.migrations)
    with engine.connect() as conn:
        monthly = conn.execute(
            sa.text("SELECT calendar, month::text, agent, requests, closed FROM support_monthly ORDER BY 1, 2, 3")
        ).all()
        summary = conn.execute(sa.text("SELECT * FROM customer_value_summary")).all()
    assert [tuple(r) for r in monthly] == [
        ("gregorian", "2026-03-01", "a", 5, 1),
        ("gregorian", "2026-04-01", "a", 5, 2),
        ("gregorian", "2026-04-01", "b", 0, 0),
        ("jalali", "2026-02-20", "a", 2, 1),  # Esfand 1404 began on 2026-02-20
        ("jalali", "2026-03-21", "a", 8, 2),  # Farvardin 1405
        ("jalali", "2026-03-21", "b", 0, 0),
    ]
    # the all-zero rows count for nothing (d has none left)
    assert [tuple(r) for r in summary] == [
        ("c", "IRR", dt.date(2026, 3, 20), dt.date(2026, 4, 2), dt.date(2026, 3, 20), 1, 1, Decimal(70), 1)
    ]
    command.downgrade(cfg(url), "0011")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT to_regclass('support_monthly')")).scalar() is None
        assert conn.execute(sa.text("SELECT count(*) FROM support_daily")).scalar() == 4
    command.upgrade(cfg(url), "head")
    engine.dispose()


def test_0017_splits_customer_type_from_customer_kind_and_keeps_the_sales(databases):
    """A database from before 0017 (report 2's customer_kind held the type) keeps its rows: the
    type moves to customer_type, customer_kind is "unknown" until a rebuild; the downgrade adds
    rows apart only by the kind back together."""
    url = databases.fresh("rep_migr17")
    migrate(url, SPEC.migrations)
    command.downgrade(cfg(url), "0011")  # the shape before 0017
    engine = sa.create_engine(normalise_url(url))
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO customer_demo_facts (customer_id, version, gender, province, city, customer_kind) "
                "VALUES ('c1', 3, 'female', 'Fars', 'Shiraz', 'person')"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO sales_daily (day, grain, age_band, gender, province, city, customer_kind, product, "
                "product_line, currency, orders, quantity, revenue) VALUES "
                "('2026-11-21', 'order', '25-34', 'female', 'Fars', 'Shiraz', 'person', '', '', 'IRR', 2, 3, 900)"
            )
        )
    command.upgrade(cfg(url), "head")
    with engine.connect() as conn:
        demo = conn.execute(sa.text("SELECT customer_type, customer_kind FROM customer_demo_facts")).one()
        assert tuple(demo) == ("person", "unknown")
        row = conn.execute(sa.text("SELECT customer_type, customer_kind, orders, revenue FROM sales_daily")).one()
        assert tuple(row) == ("person", "unknown", 2, Decimal("900"))
        key = conn.execute(
            sa.text(
                "SELECT array_agg(a.attname ORDER BY k.n) FROM pg_index i, unnest(i.indkey) WITH ORDINALITY k(attnum, n) "
                "JOIN pg_attribute a ON a.attrelid = 'sales_daily'::regclass AND a.attnum = k.attnum "
                "WHERE i.indrelid = 'sales_daily'::regclass AND i.indisprimary"
            )
        ).scalar()
        assert "customer_kind" in key and "customer_type" in key
    with engine.begin() as conn:  # two kinds of the same type: one row again after a downgrade
        conn.execute(
            sa.text(
                "INSERT INTO sales_daily (day, grain, age_band, gender, province, city, customer_type, customer_kind, "
                "product, product_line, currency, orders, quantity, revenue) VALUES ('2026-11-21', 'order', '25-34', "
                "'female', 'Fars', 'Shiraz', 'person', 'intermediary', '', '', 'IRR', 1, 1, 100)"
            )
        )
    command.downgrade(cfg(url), "0011")
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT customer_kind, orders, revenue FROM sales_daily")).one()
        assert tuple(row) == ("person", 3, Decimal("1000"))
    command.upgrade(cfg(url), "head")
    engine.dispose()
