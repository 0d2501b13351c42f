"""The catalog: request ids of catalog creates, products' search key, the rules the database
keeps (one default pipeline, one active pipeline per product or product line, default price
lists that do not overlap in time, sane percentages and prices), list indexes, and the seed:
the default pipeline "Standard" and the product line "general"

Revision ID: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"

STANDARD_STAGES = [  # (name, kind, probability)
    ("Qualification", "open", 10),
    ("Needs analysis", "open", 25),
    ("Proposal", "open", 50),
    ("Negotiation", "open", 75),
    ("Won", "won", 100),
    ("Lost", "lost", 0),
]


def upgrade() -> None:
    op.create_table(
        "catalog_requests",
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("request_id", sa.Text(), nullable=False),
        sa.Column("resource_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("kind", "request_id"),
    )
    op.add_column("products", sa.Column("search_name", sa.Text(), server_default="", nullable=False))
    op.create_index(
        "products_search",
        "products",
        ["search_name"],
        postgresql_using="gin",
        postgresql_ops={"search_name": "gin_trgm_ops"},
    )
    op.create_index("products_line_sku", "products", ["product_line_id", "sku"])
    op.create_index("products_name_page", "products", ["name", "id"])
    op.create_index("product_lines_name_page", "product_lines", ["name", "id"])
    op.create_check_constraint("products_tax_rate", "products", "tax_rate >= 0 AND tax_rate <= 100")

    op.create_check_constraint(
        "price_lists_period", "price_lists", "valid_from IS NULL OR valid_to IS NULL OR valid_from <= valid_to"
    )
    # Which default list prices a date is never ambiguous.
    op.execute(
        "ALTER TABLE price_lists ADD CONSTRAINT price_lists_default_overlap "
        "EXCLUDE USING gist (daterange(valid_from, valid_to, '[]') WITH &&) WHERE (is_default AND active)"
    )
    op.create_check_constraint(
        "price_list_items_values",
        "price_list_items",
        "unit_price >= 0 AND min_quantity > 0 AND discount_percent >= 0 AND discount_percent <= 100",
    )
    op.create_index("price_list_items_product", "price_list_items", ["product_id"])

    op.create_check_constraint(
        "pipelines_product_or_line", "pipelines", "product_id IS NULL OR product_line_id IS NULL"
    )
    op.create_index(
        "pipelines_one_default", "pipelines", ["is_default"], unique=True, postgresql_where=sa.text("is_default")
    )
    op.create_index(
        "pipelines_product",
        "pipelines",
        ["product_id"],
        unique=True,
        postgresql_where=sa.text("product_id IS NOT NULL AND active"),
    )
    op.create_index(
        "pipelines_product_line",
        "pipelines",
        ["product_line_id"],
        unique=True,
        postgresql_where=sa.text("product_line_id IS NOT NULL AND active"),
    )
    op.create_check_constraint(
        "stages_values",
        "stages",
        "kind IN ('open', 'won', 'lost') AND probability >= 0 AND probability <= 100 "
        "AND (rotting_days IS NULL OR rotting_days > 0)",
    )

    op.execute("INSERT INTO product_lines (code, name) VALUES ('general', 'General')")
    op.execute("INSERT INTO pipelines (name, is_default) VALUES ('Standard', true)")
    values = ", ".join(
        f"({i}, '{name}', '{kind}', {probability})" for i, (name, kind, probability) in enumerate(STANDARD_STAGES)
    )
    op.execute(
        "INSERT INTO stages (pipeline_id, position, name, kind, probability) "
        f"SELECT p.id, s.position, s.name, s.kind, s.probability FROM pipelines p, (VALUES {values}) "
        "AS s(position, name, kind, probability) WHERE p.name = 'Standard'"
    )


def downgrade() -> None:
    op.execute(
        "DELETE FROM stages WHERE pipeline_id IN (SELECT id FROM pipelines WHERE name = 'Standard') "
        "AND NOT EXISTS (SELECT 1 FROM opportunities o WHERE o.stage_id = stages.id)"
    )
    op.execute(
        "DELETE FROM pipelines p WHERE name = 'Standard' AND NOT EXISTS (SELECT 1 FROM stages s WHERE s.pipeline_id = p.id)"
    )
    op.drop_constraint("stages_values", "stages")
    op.drop_index("pipelines_product_line", "pipelines")
    op.drop_index("pipelines_product", "pipelines")
    op.drop_index("pipelines_one_default", "pipelines")
    op.drop_constraint("pipelines_product_or_line", "pipelines")
    op.drop_index("price_list_items_product", "price_list_items")
    op.drop_constraint("price_list_items_values", "price_list_items")
    op.drop_constraint("price_lists_default_overlap", "price_lists")
    op.drop_constraint("price_lists_period", "price_lists")
    op.drop_constraint("products_tax_rate", "products")
    op.drop_index("product_lines_name_page", "product_lines")
    op.drop_index("products_name_page", "products")
    op.drop_index("products_line_sku", "products")
    op.drop_index("products_search", "products")
    op.drop_column("products", "search_name")
    op.drop_table("catalog_requests")
