"""The first Alembic revision of a service built on the chassis, in two lines:

    revision, down_revision = "0001", None
    upgrade, downgrade = first_revision()

It creates the tables the chassis' building blocks keep in the service's own database: the
outbox and inbox (messaging), the audit trail, durable timers and jobs, each exactly as the
chassis defines it. A service's own tables come in its next revisions.
"""

from __future__ import annotations

from collections.abc import Callable

from . import audit
from .messaging.tables import create_messaging_tables
from .work_tables import create_job_tables, create_timer_tables

# Dropped in this order by downgrade (job_inputs and timer_firings reference their parents).
_TABLES = ("job_inputs", "jobs", "timer_firings", "timers", audit.audit_entries.name, "inbox", "outbox")


def first_revision() -> tuple[Callable[[], None], Callable[[], None]]:
    """(upgrade, downgrade) of a service's revision 0001: every chassis table."""

    def upgrade() -> None:
        from alembic import op

        create_messaging_tables(op)
        audit.create_audit_table(op)
        create_timer_tables(op)
        create_job_tables(op)

    def downgrade() -> None:
        from alembic import op

        for table in _TABLES:
            op.drop_table(table)

    return upgrade, downgrade
