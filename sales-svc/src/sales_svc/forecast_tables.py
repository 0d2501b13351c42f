"""The forecasts part's own tables: exchange rates and forecast snapshots (migration 0010)."""

from __future__ import annotations

import sqlalchemy as sa

from .tables import MONEY, UUID, metadata

# Units of `to_currency` (the reporting currency when it was set) for one unit of
# `currency_code`, from `rate_date` until the next stored day. NUMERIC without a scale: a rate
# from rials to euros needs more than nine decimals.
exchange_rates = sa.Table(
    "exchange_rates",
    metadata,
    sa.Column("currency_code", sa.Text, primary_key=True),
    sa.Column("to_currency", sa.Text, primary_key=True),
    sa.Column("rate_date", sa.Date, primary_key=True),
    sa.Column("rate", sa.Numeric, nullable=False),
    sa.Column("set_by", sa.Text, nullable=False, server_default=""),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.CheckConstraint("rate > 0", name="exchange_rates_positive"),
)

# The figures a snapshot keeps (ForecastFigures' fields; amounts in `currency_code`).
AMOUNTS = (
    "open_amount",
    "weighted_amount",
    "pipeline_amount",
    "best_case_amount",
    "commit_amount",
    "closed_amount",
    "omitted_amount",
    "won_amount",
)
COUNTS = ("open_count", "won_count", "omitted_count")

forecast_snapshots = sa.Table(
    "forecast_snapshots",
    metadata,
    sa.Column("id", UUID, primary_key=True, server_default=sa.text("gen_random_uuid()")),
    sa.Column("period", sa.Text, nullable=False),  # label: 1405-Q1, 2026-05, ...
    sa.Column("calendar", sa.Text, nullable=False),  # gregorian | jalali
    sa.Column("unit", sa.Text, nullable=False),  # month | quarter | year
    sa.Column("period_start", sa.Date, nullable=False),
    sa.Column("period_end", sa.Date, nullable=False),  # the day after the last
    sa.Column("owner_id", sa.Text, nullable=False),
    sa.Column("currency_code", sa.Text, nullable=False),
    *(sa.Column(a, MONEY, nullable=False, server_default="0") for a in AMOUNTS),
    *(sa.Column(c, sa.BigInteger, nullable=False, server_default="0") for c in COUNTS),
    sa.Column("adjusted_commit", MONEY),
    sa.Column("note", sa.Text, nullable=False, server_default=""),
    sa.Column("submitter", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),  # submitted | weekly
    sa.Column("request_id", sa.Text, unique=True),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.CheckConstraint("kind IN ('submitted', 'weekly')", name="forecast_snapshots_kind"),
)
sa.Index("forecast_snapshots_page", forecast_snapshots.c.create_time.desc(), forecast_snapshots.c.id.desc())
sa.Index(
    "forecast_snapshots_owner_page",
    forecast_snapshots.c.owner_id,
    forecast_snapshots.c.create_time.desc(),
    forecast_snapshots.c.id.desc(),
)
sa.Index("forecast_snapshots_period", forecast_snapshots.c.period_start, forecast_snapshots.c.owner_id)
