"""support_monthly (support_daily per Gregorian and per Jalali month) and customer_value_summary
(customer_value_daily per customer x currency), filled from the daily rollups

Revision ID: 0016

Both are sums of the daily rollups the projections keep (support.py, value.py), so an existing
database gets them in SQL, set-based, from what it holds: support_monthly as the GROUP BY of
support_daily by month (a Jalali month keyed by the Gregorian date of its 1st, the day less its
jalali_day_of_month - 1), customer_value_summary as the GROUP BY of customer_value_daily's
non-zero rows by customer and currency.
"""

from alembic import op

from reporting_svc import tables, value_tables

revision = "0016"
# 0010 -> 0012 -> 0013 -> 0014 -> 0015 -> 0011 -> 0017 -> 0016 (written on 0011; main's 0017
# took 0011 as its parent meanwhile, so 0016 follows it, as 0011 follows 0015)
down_revision = "0017"

NEW = [tables.support_monthly, value_tables.customer_value_summary]
MEASURES = ", ".join(tables.SUPPORT_MEASURES)
SUMS = ", ".join(f"sum({m})" for m in tables.SUPPORT_MEASURES)


def upgrade() -> None:
    for table in NEW:
        op.create_table(table.name, *(c._copy() for c in table.columns))
    op.execute(
        f"""INSERT INTO support_monthly (calendar, month, team, agent, channel, {MEASURES})
        SELECT 'gregorian', date_trunc('month', day)::date, team, agent, channel, {SUMS}
        FROM support_daily GROUP BY 2, 3, 4, 5
        UNION ALL
        SELECT 'jalali', day - (jalali_day_of_month(day) - 1), team, agent, channel, {SUMS}
        FROM support_daily GROUP BY 2, 3, 4, 5
        ORDER BY 1, 2, 3, 4, 5"""
    )
    op.execute(
        """INSERT INTO customer_value_summary (customer_id, currency, first_day, last_day, last_purchase_day,
                                               purchase_days, purchases, revenue, credit_notes)
        SELECT customer_id, currency, min(day), max(day), max(day) FILTER (WHERE purchases > 0),
               count(*) FILTER (WHERE purchases > 0), sum(purchases), sum(revenue), sum(credit_notes)
        FROM customer_value_daily WHERE revenue <> 0 OR purchases <> 0 OR credit_notes <> 0
        GROUP BY customer_id, currency"""
    )
    op.execute("ANALYZE support_monthly")  # the planner's row counts from the start
    op.execute("ANALYZE customer_value_summary")


def downgrade() -> None:
    for table in reversed(NEW):
        op.drop_table(table.name)
