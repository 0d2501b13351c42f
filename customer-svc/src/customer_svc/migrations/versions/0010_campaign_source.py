"""The acquisition source "campaign": sales-svc opens a lead from every campaign response with
source "campaign" (campaign_responses.py), and converting that lead creates a customer with
its source, which customer-svc accepts only from the managed list. Seeded with the others from
now on; a database that already has it (an admin added it) keeps its own name for it.

Revision ID: 0010
"""

from alembic import op

revision = "0010"
down_revision = "0009"


def upgrade() -> None:
    op.execute(
        "INSERT INTO acquisition_sources (key, display_name) VALUES ('campaign', 'Campaign response') "
        "ON CONFLICT (key) DO NOTHING"
    )


def downgrade() -> None:
    # left in place when customers came by it (their source must stay a listed one)
    op.execute(
        "DELETE FROM acquisition_sources WHERE key = 'campaign' "
        "AND NOT EXISTS (SELECT 1 FROM customers WHERE acquisition_source = 'campaign')"
    )
