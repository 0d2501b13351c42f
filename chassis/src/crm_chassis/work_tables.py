"""The tables of durable timers (`crm_chassis.timers`) and jobs (`crm_chassis.jobs`).

A service that uses them creates them in one of its Alembic migrations::

    from crm_chassis.work_tables import create_timer_tables, create_job_tables

    def upgrade() -> None:
        create_timer_tables(op)
        create_job_tables(op)

(tests call `work_metadata.create_all(engine)`), so the DDL exists once, here.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

work_metadata = sa.MetaData()

_NOW = sa.func.now()

# One row per pending timer, unique by (kind, key). A one-shot timer's row is deleted when it
# fires; a recurring one (cron) moves to its next occurrence. `state` is 'scheduled' or
# 'failed' (gave up after max attempts; last_error says why). A worker claims due rows by
# setting lease_token/lease_until (FOR UPDATE SKIP LOCKED); a new schedule or a cancel clears
# the lease, so an old claim cannot complete a timer that was moved meanwhile.
timers = sa.Table(
    "timers",
    work_metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("key", sa.Text, nullable=False),
    sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("payload", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("cron", sa.Text),
    sa.Column("timezone", sa.Text),
    sa.Column("state", sa.Text, nullable=False, server_default="scheduled"),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_error", sa.Text),
    sa.Column("lease_token", pg.UUID(as_uuid=False)),
    sa.Column("lease_until", sa.DateTime(timezone=True)),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
    sa.UniqueConstraint("kind", "key", name="timers_kind_key"),
    sa.CheckConstraint("state IN ('scheduled', 'failed')", name="timers_state"),
    sa.Index("timers_due", "next_attempt_at", postgresql_where=sa.text("state = 'scheduled'")),
)

# Every firing (success or failed attempt), for lateness figures and troubleshooting; rows
# older than the worker's retention are deleted.
timer_firings = sa.Table(
    "timer_firings",
    work_metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("key", sa.Text, nullable=False),
    sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("fired_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("lateness_seconds", sa.Float, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("ok", sa.Boolean, nullable=False),
    sa.Column("error", sa.Text),
    sa.Index("timer_firings_fired", "fired_at"),
)

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")

# One row per long-running job. `owner`/`claim_token`/`lease_until` say which worker runs it;
# a running job whose lease expired (its process died) is claimed again by another worker.
jobs = sa.Table(
    "jobs",
    work_metadata,
    sa.Column("id", pg.UUID(as_uuid=False), primary_key=True),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False, server_default="queued"),
    sa.Column("params", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("request_id", sa.Text),
    sa.Column("creator", sa.Text, nullable=False, server_default=""),
    sa.Column("processed", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("total", sa.BigInteger),
    sa.Column("counters", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("message", sa.Text, nullable=False, server_default=""),
    sa.Column("checkpoint", pg.JSONB),
    sa.Column("result", pg.JSONB),
    sa.Column("error", sa.Text, nullable=False, server_default=""),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("owner", sa.Text),
    sa.Column("claim_token", pg.UUID(as_uuid=False)),
    sa.Column("lease_until", sa.DateTime(timezone=True)),
    sa.Column("heartbeat_time", sa.DateTime(timezone=True)),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("interruptions", sa.Integer, nullable=False, server_default="0"),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
    sa.Column("start_time", sa.DateTime(timezone=True)),
    sa.Column("end_time", sa.DateTime(timezone=True)),
    sa.CheckConstraint(f"state IN {JOB_STATES}", name="jobs_state"),
    sa.Index("jobs_request_id", "kind", "request_id", unique=True, postgresql_where=sa.text("request_id IS NOT NULL")),
    sa.Index("jobs_newest", "create_time", "id"),
    sa.Index("jobs_claimable", "kind", "create_time", postgresql_where=sa.text("state IN ('queued', 'running')")),
    sa.Index("jobs_ended", "end_time", postgresql_where=sa.text("end_time IS NOT NULL")),
)

# A job's input file (an import's CSV), kept apart so the jobs row stays small: another
# replica that resumes the job reads it from here. Deleted with its job.
job_inputs = sa.Table(
    "job_inputs",
    work_metadata,
    sa.Column("job_id", pg.UUID(as_uuid=False), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)


def _create(op, *tables: sa.Table) -> None:
    work_metadata.create_all(op.get_bind(), tables=list(tables))


def create_timer_tables(op) -> None:
    """Alembic helper: `timers` and `timer_firings` with their indexes, as defined here."""
    _create(op, timers, timer_firings)


def create_job_tables(op) -> None:
    """Alembic helper: `jobs` and `job_inputs` with their indexes, as defined here."""
    _create(op, jobs, job_inputs)
