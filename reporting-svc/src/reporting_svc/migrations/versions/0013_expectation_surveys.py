"""Report 4, the expectation survey's zone of tolerance: expectation facts and their rollup.
Surveys answered before are projected by a rebuild (RebuildProjections).

Revision ID: 0013
"""

from alembic import op

from reporting_svc import tables as t

revision = "0013"
down_revision = "0012"

NEW = [t.expectation_facts, t.expectation_daily]


def upgrade() -> None:
    for table in NEW:
        op.create_table(table.name, *(c._copy() for c in table.columns))


def downgrade() -> None:
    for table in reversed(NEW):
        op.drop_table(table.name)
