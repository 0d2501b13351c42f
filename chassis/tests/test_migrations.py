"""A service's first revision (crm_chassis.migrations.first_revision) makes every chassis table
as the chassis defines it, and its downgrade removes them all (a real database, sales-svc's
migrations as an example of a service that has no tables of its own yet)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from crm_chassis.db import migrate, normalise_url
from sales_svc.__main__ import SPEC

CHASSIS_TABLES = {"outbox", "inbox", "audit_entries", "timers", "timer_firings", "jobs", "job_inputs"}


def tables(url: str) -> set[str]:
    engine = sa.create_engine(normalise_url(url), poolclass=sa.NullPool)
    try:
        return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_the_first_revision_makes_every_chassis_table_and_its_downgrade_removes_them(databases):
    url = databases.fresh("migrations")
    migrate(url, SPEC.migrations)
    assert tables(url) == CHASSIS_TABLES
    cfg = Config()
    cfg.set_main_option("script_location", str(SPEC.migrations))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    command.downgrade(cfg, "base")
    assert tables(url) == set()
