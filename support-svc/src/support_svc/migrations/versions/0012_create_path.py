"""The create path: round robin by each member's last offer in the team (routing.py)

Revision ID: 0012
"""

from alembic import op

revision = "0012"
down_revision = "0011"


def upgrade() -> None:
    # max(offer_time) of an agent's offers in a team: one index entry read, not their history
    op.create_index("ticket_offers_agent_team", "ticket_offers", ["agent_id", "team_id", "offer_time"])


def downgrade() -> None:
    op.drop_index("ticket_offers_agent_team", table_name="ticket_offers")
