"""Forecasts: exchange rates, forecast snapshots, the weekly freeze timer and two covering
indexes the forecast query reads (open opportunities by expected close date, won ones by close
time, with the columns it sums)

Revision ID: 0005
"""

import sqlalchemy as sa
from alembic import op

from crm_chassis import timers

revision = "0005"
down_revision = "0004"

MONEY = sa.Numeric(28, 9)
FIGURES = ["owner_id", "team_id", "currency_code", "amount", "probability", "forecast_category", "product_line_id"]


def upgrade() -> None:
    op.create_table(
        "exchange_rates",
        sa.Column("currency_code", sa.Text(), nullable=False),
        sa.Column("to_currency", sa.Text(), nullable=False),
        sa.Column("rate_date", sa.Date(), nullable=False),
        sa.Column("rate", sa.Numeric(), nullable=False),
        sa.Column("set_by", sa.Text(), server_default="", nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("rate > 0", name="exchange_rates_positive"),
        sa.PrimaryKeyConstraint("currency_code", "to_currency", "rate_date"),
    )
    amounts = [
        "open_amount",
        "weighted_amount",
        "pipeline_amount",
        "best_case_amount",
        "commit_amount",
        "closed_amount",
        "omitted_amount",
        "won_amount",
    ]
    op.create_table(
        "forecast_snapshots",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("period", sa.Text(), nullable=False),
        sa.Column("calendar", sa.Text(), nullable=False),
        sa.Column("unit", sa.Text(), nullable=False),
        sa.Column("period_start", sa.Date(), nullable=False),
        sa.Column("period_end", sa.Date(), nullable=False),
        sa.Column("owner_id", sa.Text(), nullable=False),
        sa.Column("currency_code", sa.Text(), nullable=False),
        *(sa.Column(a, MONEY, server_default="0", nullable=False) for a in amounts),
        *(
            sa.Column(c, sa.BigInteger(), server_default="0", nullable=False)
            for c in ("open_count", "won_count", "omitted_count")
        ),
        sa.Column("adjusted_commit", MONEY, nullable=True),
        sa.Column("note", sa.Text(), server_default="", nullable=False),
        sa.Column("submitter", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("kind IN ('submitted', 'weekly')", name="forecast_snapshots_kind"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_id"),
    )
    op.create_index(
        "forecast_snapshots_page",
        "forecast_snapshots",
        [sa.literal_column("create_time DESC"), sa.literal_column("id DESC")],
    )
    op.create_index(
        "forecast_snapshots_owner_page",
        "forecast_snapshots",
        ["owner_id", sa.literal_column("create_time DESC"), sa.literal_column("id DESC")],
    )
    op.create_index("forecast_snapshots_period", "forecast_snapshots", ["period_start", "owner_id"])
    # The forecast reads a period's open and won opportunities; with these it reads no heap page
    # when the visibility map allows (an index-only scan).
    op.create_index(
        "opportunities_forecast_open",
        "opportunities",
        ["expected_close_date"],
        postgresql_include=FIGURES + ["id"],
        postgresql_where=sa.text("state = 'open' AND delete_time IS NULL"),
    )
    op.create_index(
        "opportunities_forecast_won",
        "opportunities",
        ["close_time"],
        postgresql_include=FIGURES + ["id", "lead_id", "source"],
        postgresql_where=sa.text("state = 'won' AND delete_time IS NULL"),
    )
    # The weekly freeze (sales_svc.forecasts; a start re-arms it if FORECAST_FREEZE_CRON differs).
    conn = op.get_bind()
    if timers.get(conn, "forecast.freeze", "weekly") is None:
        timers.schedule_recurring(conn, "forecast.freeze", "weekly", "0 18 * * wed")


def downgrade() -> None:
    op.execute("DELETE FROM timers WHERE kind = 'forecast.freeze'")
    op.drop_index("opportunities_forecast_won", table_name="opportunities")
    op.drop_index("opportunities_forecast_open", table_name="opportunities")
    op.drop_table("forecast_snapshots")
    op.drop_table("exchange_rates")
