"""customer codes past C-999999: the column default no longer truncates

Revision ID: 0006
"""

from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    # A default cannot hold a sub-select; a function can.
    op.execute(
        "CREATE FUNCTION next_customer_code() RETURNS text LANGUAGE sql AS $$ "
        "SELECT 'C-' || lpad(n::text, greatest(6, length(n::text)), '0') FROM nextval('customer_code_seq') AS n $$"
    )
    op.execute("ALTER TABLE customers ALTER COLUMN customer_code SET DEFAULT next_customer_code()")


def downgrade() -> None:
    op.execute(
        "ALTER TABLE customers ALTER COLUMN customer_code SET DEFAULT "
        "'C-' || lpad(nextval('customer_code_seq')::text, 6, '0')"
    )
    op.execute("DROP FUNCTION next_customer_code()")
