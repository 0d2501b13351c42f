"""scheduled reports: report_schedules and their runs

Revision ID: 0014
"""

import sqlalchemy as sa
from alembic import op

from reporting_svc import schedule_tables as t

revision = "0014"
down_revision = "0013"

NEW = [t.report_schedules, t.report_schedule_runs]


def upgrade() -> None:
    op.create_table(t.report_schedules.name, *(c._copy() for c in t.report_schedules.columns))
    op.create_table(
        t.report_schedule_runs.name,
        *(c._copy() for c in t.report_schedule_runs.columns),
        sa.UniqueConstraint("schedule_id", "trigger", "slot_time", name="report_schedule_runs_slot"),
        # Column._copy leaves foreign keys behind: the runs go with their schedule
        sa.ForeignKeyConstraint(["schedule_id"], ["report_schedules.id"], ondelete="CASCADE"),
    )
    op.create_index("report_schedules_owner", "report_schedules", ["owner", "create_time", "id"])
    op.create_index("report_schedule_runs_newest", "report_schedule_runs", ["schedule_id", "slot_time", "id"])


def downgrade() -> None:
    for table in reversed(NEW):
        op.drop_table(table.name)
