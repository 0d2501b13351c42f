"""imports run as chassis jobs: the jobs tables, import_jobs' rows moved into them, the error
rows of a job referencing jobs.id (deleted with it), import_jobs dropped

Revision ID: 0009
"""

from alembic import op

from crm_chassis.work_tables import create_job_tables

revision = "0009"
down_revision = "0008"

# ImportState numbers of import_jobs -> the chassis job states (1 running, 2 succeeded,
# 3 failed, 4 cancelled). An import still running when this migration runs cannot be resumed
# (its file was never stored): it ends failed, "interrupted", as it would have before.
MOVE = """
INSERT INTO jobs (id, kind, state, params, request_id, creator, processed, total, counters, error,
                  checkpoint, create_time, update_time, end_time)
SELECT id, 'customer.import',
       CASE state WHEN 2 THEN 'succeeded' WHEN 3 THEN 'failed' WHEN 4 THEN 'cancelled' ELSE 'failed' END,
       jsonb_build_object('customer_type', customer_type, 'file_format', file_format,
                          'dedupe_policy', dedupe_policy, 'validate_only', validate_only, 'moved', true),
       request_id, creator, processed_rows, total_rows,
       jsonb_build_object('created', created_rows, 'updated', updated_rows, 'skipped', skipped_rows,
                          'failed', failed_rows),
       CASE WHEN state = 1 THEN 'interrupted' ELSE error END,
       jsonb_build_object('headers', headers), create_time, update_time,
       CASE WHEN state = 1 THEN now() ELSE end_time END
FROM import_jobs
"""


def upgrade() -> None:
    create_job_tables(op)
    op.execute(MOVE)
    op.drop_constraint("import_job_errors_job_id_fkey", "import_job_errors", type_="foreignkey")
    op.create_foreign_key(
        "import_job_errors_job_id_fkey", "import_job_errors", "jobs", ["job_id"], ["id"], ondelete="CASCADE"
    )
    op.drop_table("import_jobs")


def downgrade() -> None:
    raise NotImplementedError("imports do not move back to import_jobs; restore a backup instead")
