"""Loyalty expiry: one timer per member (at its soonest-expiring live lot) instead of one per lot
(campaign_svc/loyalty.py, `loyalty.expire` keyed by the member id).

Revision ID: 0008
"""

from alembic import op

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    op.execute("DELETE FROM timers WHERE kind = 'loyalty.expire'")
    op.execute(
        """INSERT INTO timers (kind, key, due_at, next_attempt_at, payload)
           SELECT 'loyalty.expire', member_id::text, min(expire_time), min(expire_time), '{}'::jsonb
             FROM loyalty_movements
            WHERE remaining > 0 AND expire_time IS NOT NULL
            GROUP BY member_id"""
    )


def downgrade() -> None:
    op.execute("DELETE FROM timers WHERE kind = 'loyalty.expire'")
    op.execute(
        """INSERT INTO timers (kind, key, due_at, next_attempt_at, payload)
           SELECT 'loyalty.expire', id::text, expire_time, expire_time, '{}'::jsonb
             FROM loyalty_movements
            WHERE remaining > 0 AND expire_time IS NOT NULL"""
    )
