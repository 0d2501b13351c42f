"""Migrations: a database at 0002 with customer facts keeps them, and 0005 fills the acquisition
rollup from them (the report answers as before the upgrade); downgrade and upgrade round-trip."""

from __future__ import annotations

import pathlib

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
