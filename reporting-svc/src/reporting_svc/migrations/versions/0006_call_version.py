"""call facts keyed on CallEvent.version (the call log's etag), the start day kept apart

Revision ID: 0006
"""

from alembic import op

revision = "0006"
down_revision = "0005"

# 0003 creates the tables from the current metadata, so a database made from scratch has the
# new columns already: only one made before this revision is changed. Calls stored so far keep
# their start time and get version 0 (the next event of each call replaces them).
UPGRADE = """
DO $$
BEGIN
  IF (SELECT data_type FROM information_schema.columns WHERE table_schema = current_schema()
      AND table_name = 'call_facts' AND column_name = 'version') LIKE 'timestamp%' THEN
    ALTER TABLE call_facts ADD COLUMN start_time timestamptz;
    UPDATE call_facts SET start_time = version;
    ALTER TABLE call_facts ALTER COLUMN start_time SET NOT NULL;
    ALTER TABLE call_facts ALTER COLUMN version TYPE bigint USING 0;
  END IF;
END $$
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute("ALTER TABLE call_facts ALTER COLUMN version TYPE timestamptz USING start_time")
    op.execute("ALTER TABLE call_facts DROP COLUMN start_time")
