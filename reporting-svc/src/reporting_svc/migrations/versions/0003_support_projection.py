"""support-desk facts and daily rollup, lag per producer, rebuild state, job tables

Revision ID: 0003
"""

from alembic import op

from crm_chassis.work_tables import create_job_tables, create_timer_tables
from reporting_svc import tables as t

revision = "0003"
down_revision = "0002"

NEW = [
    t.ticket_facts,
    t.survey_facts,
    t.sla_breach_facts,
    t.call_facts,
    t.support_daily,
    t.projection_sources,
    t.projection_rebuilds,
]


def upgrade() -> None:
    create_job_tables(op)
    create_timer_tables(op)  # the parts runtime's timer worker
    for table in NEW:
        op.create_table(table.name, *(c._copy() for c in table.columns))
    op.create_index("support_daily_agent", "support_daily", ["agent", "day"])


def downgrade() -> None:
    for table in reversed(NEW):
        op.drop_table(table.name)
    for name in ("timer_firings", "timers", "job_inputs"):
        op.drop_table(name)
    op.drop_table("jobs")
