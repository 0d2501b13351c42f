"""A service's first revision (crm_chassis.migrations.first_revision) makes every chassis table
as the chassis defines it, and its downgrade removes them all (a real database, sales-svc's
migrations as the example: its revision 0001 is the first revision alone; its head adds its
own tables, and a downgrade from the head removes every one of them too)."""

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
    cfg = Config()
    cfg.set_main_option("script_location", str(SPEC.migrations))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    command.upgrade(cfg, "0001")
    assert tables(url) == CHASSIS_TABLES
    command.downgrade(cfg, "base")
    assert tables(url) == set()
    migrate(url, SPEC.migrations)  # to the head: the service's own tables beside the chassis'
    assert tables(url) > CHASSIS_TABLES
    command.downgrade(cfg, "base")
    assert tables(url) == set()
