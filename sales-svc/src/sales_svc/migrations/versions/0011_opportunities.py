"""opportunities: indexes for the pipeline board, the product filter and list orders

- opportunities_board_cards: the open opportunities of a pipeline by stage, largest first,
  covering what the board's aggregate and its scope and filters read (owner, team, product
  line, currency, probability, stage entry time), so GetPipelineBoard sums a stage without
  visiting the table (when the visibility map allows) and takes its cards in index order.
- opportunity_lines_product: "has a line of this product" (the board's product filter).
- opportunities_{amount,close,update}_page: ListOpportunities ordered by amount, expected
  close date or update time, in keyset pages (either direction).

Revision ID: 0011
"""

from alembic import op

revision = "0011"
down_revision = "0010"


def upgrade() -> None:
    op.execute(
        "CREATE INDEX opportunities_board_cards ON opportunities "
        "(pipeline_id, stage_id, amount DESC, id DESC) "
        "INCLUDE (owner_id, team_id, product_line_id, currency_code, probability, stage_enter_time) "
        "WHERE state = 'open' AND delete_time IS NULL"
    )
    op.execute(
        "CREATE INDEX opportunity_lines_product ON opportunity_lines (product_id, opportunity_id) "
        "WHERE product_id IS NOT NULL"
    )
    op.execute("CREATE INDEX opportunities_amount_page ON opportunities (amount, id)")
    op.execute("CREATE INDEX opportunities_close_page ON opportunities (expected_close_date, id)")
    op.execute("CREATE INDEX opportunities_update_page ON opportunities (update_time, id)")


def downgrade() -> None:
    for name in (
        "opportunities_update_page",
        "opportunities_close_page",
        "opportunities_amount_page",
        "opportunity_lines_product",
        "opportunities_board_cards",
    ):
        op.execute(f"DROP INDEX IF EXISTS {name}")
