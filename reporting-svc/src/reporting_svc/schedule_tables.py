"""The tables of scheduled reports (schedules.py, schedule_runs.py), on the metadata of tables.py;
migration 0014. Not projections: authoritative here (a rebuild leaves them alone).

report_schedules: one row per schedule (its owner, the owner's roles when last saved: the
report is made with them); its timer is `reporting.report_schedule` keyed by the id. Its next
run time is that timer's due time, its last run its newest run: the firing writes no row here.
report_schedule_runs: one row per run, unique per (schedule, trigger, slot): a slot is made and
mailed once (schedule_runs.py says how a crash is handled).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

from .tables import TS, metadata

report_schedules = sa.Table(
    "report_schedules",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("report", sa.Text, nullable=False),
    sa.Column("parameters", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("format", sa.Text, nullable=False),
    sa.Column("cron", sa.Text, nullable=False),
    sa.Column("time_zone", sa.Text, nullable=False),
    sa.Column("recipients", ARRAY(sa.Text), nullable=False),
    sa.Column("language_code", sa.Text, nullable=False),
    sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("lookback_days", sa.Integer, nullable=False, server_default="0"),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("owner_roles", ARRAY(sa.Text), nullable=False),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    sa.Column("request_id", sa.Text, unique=True),
    sa.Column("create_time", TS, nullable=False, server_default=sa.func.now()),
    sa.Column("update_time", TS, nullable=False, server_default=sa.func.now()),
)

report_schedule_runs = sa.Table(
    "report_schedule_runs",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")),
    sa.Column(
        "schedule_id", UUID(as_uuid=True), sa.ForeignKey("report_schedules.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("trigger", sa.Text, nullable=False),  # schedule | manual
    sa.Column("slot_time", TS, nullable=False),
    sa.Column("state", sa.Text, nullable=False),  # pending sending sent retrying failed
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("error", sa.Text),
    sa.Column("sent_time", TS),
    sa.Column("filename", sa.Text),
    sa.Column("size_bytes", sa.BigInteger),
    sa.Column("row_count", sa.BigInteger),
    sa.Column("create_time", TS, nullable=False, server_default=sa.func.now()),
    sa.Column("update_time", TS, nullable=False, server_default=sa.func.now()),
    sa.UniqueConstraint("schedule_id", "trigger", "slot_time", name="report_schedule_runs_slot"),
)
