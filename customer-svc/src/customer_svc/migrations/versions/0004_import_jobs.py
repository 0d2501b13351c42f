"""import jobs: progress and counters of ImportCustomers, and the rows each one rejected

Revision ID: 0004
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    count = {"nullable": False, "server_default": "0"}
    op.create_table(
        "import_jobs",
        sa.Column("id", pg.UUID(as_uuid=False), primary_key=True, server_default=sa.text("gen_random_uuid()")),
        # Idempotency key of ImportCustomers: a retry returns the first job.
        sa.Column("request_id", sa.Text, unique=True),
        # ImportState: 1 running, 2 succeeded, 3 failed.
        sa.Column("state", sa.SmallInteger, nullable=False),
        sa.Column("customer_type", sa.SmallInteger, nullable=False),
        sa.Column("file_format", sa.SmallInteger, nullable=False),
        sa.Column("dedupe_policy", sa.SmallInteger, nullable=False),
        sa.Column("validate_only", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("creator", sa.Text, nullable=False),
        # The file's header row, for the error report.
        sa.Column("headers", pg.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("total_rows", sa.BigInteger, **count),
        sa.Column("processed_rows", sa.BigInteger, **count),
        sa.Column("created_rows", sa.BigInteger, **count),
        sa.Column("updated_rows", sa.BigInteger, **count),
        sa.Column("skipped_rows", sa.BigInteger, **count),
        sa.Column("failed_rows", sa.BigInteger, **count),
        sa.Column("error", sa.Text, nullable=False, server_default=""),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("end_time", sa.DateTime(timezone=True)),
    )
    # Service start looks for jobs a crashed process left running.
    op.create_index("import_jobs_running", "import_jobs", ["id"], postgresql_where=sa.text("state = 1"))
    op.create_table(
        "import_job_errors",
        sa.Column(
            "job_id",
            pg.UUID(as_uuid=False),
            sa.ForeignKey("import_jobs.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        # The row as a person sees it in the file (the header is row 1).
        sa.Column("row_number", sa.Integer, primary_key=True),
        sa.Column("fields", pg.ARRAY(sa.Text), nullable=False),
        sa.Column("problems", pg.ARRAY(sa.Text), nullable=False),
        # The row's original cells, as text.
        sa.Column("cells", pg.JSONB, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("import_job_errors")
    op.drop_table("import_jobs")
