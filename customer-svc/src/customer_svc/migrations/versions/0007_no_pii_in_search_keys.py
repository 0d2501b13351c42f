"""search keys without national ids (a search must not confirm a masked value)

Revision ID: 0007
"""

from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    # National ids are stored as digits only, so they are safe inside the pattern.
    op.execute(
        "UPDATE customers SET search_text = btrim(regexp_replace(search_text, '(^| )' || national_id || '( |$)', ' ', 'g')) "
        "WHERE national_id <> '' AND search_text LIKE '%' || national_id || '%'"
    )


def downgrade() -> None:
    pass  # the keys are rebuilt with the national id on the next update of each customer
