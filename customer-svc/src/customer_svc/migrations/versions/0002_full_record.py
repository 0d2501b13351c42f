"""The complete customer record, search keys, notes, groups, ranks, sources, custom fields, audit

Revision ID: 0002
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0002"
down_revision = "0001"

DEFAULT_SOURCES = [
    ("website", "Website"),
    ("phone", "Phone call"),
    ("exhibition", "Exhibition"),
    ("referral", "Referral"),
    ("advertising", "Advertising"),
    ("social_telegram", "Telegram"),
    ("social_instagram", "Instagram"),
    ("social_whatsapp", "WhatsApp"),
    ("social_linkedin", "LinkedIn"),
    ("email_campaign", "E-mail campaign"),
    ("sms_campaign", "SMS campaign"),
    ("walk_in", "Walk-in"),
    ("sales_visit", "Sales visit"),
    ("other", "Other"),
]


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    op.execute("CREATE SEQUENCE customer_code_seq")
    text = {"nullable": False, "server_default": ""}
    cols = [
        sa.Column(
            "customer_code",
            sa.Text,
            nullable=False,
            server_default=sa.text("'C-' || lpad(nextval('customer_code_seq')::text, 6, '0')"),
        ),
        sa.Column("gender", sa.SmallInteger, nullable=False, server_default="0"),
        sa.Column("title_prefix", sa.Text, **text),
        sa.Column("fax", sa.Text, **text),
        sa.Column("mobile", sa.Text, **text),
        sa.Column("website", sa.Text, **text),
        sa.Column("country", sa.Text, nullable=False, server_default="IR"),
        sa.Column("province", sa.Text, **text),
        sa.Column("city", sa.Text, **text),
        sa.Column("address", sa.Text, **text),
        sa.Column("postal_code", sa.Text, **text),
        sa.Column("po_box", sa.Text, **text),
        sa.Column("birth_certificate_number", sa.Text, **text),
        sa.Column("national_id", sa.Text, **text),
        sa.Column("birth_date", sa.Date),
        sa.Column("marriage_date", sa.Date),
        sa.Column("field_of_study", sa.Text, **text),
        sa.Column("education_degree", sa.SmallInteger, nullable=False, server_default="0"),
        sa.Column("industry", sa.Text, **text),
        sa.Column("founding_date", sa.Date),
        sa.Column("contact_persons", pg.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("kind", sa.SmallInteger, nullable=False, server_default="0"),
        sa.Column("lifecycle_stage", sa.SmallInteger, nullable=False, server_default="1"),
        sa.Column("acquisition_date", sa.Date),
        sa.Column("referrer_staff", sa.Text, **text),
        sa.Column("referrer_customer", pg.UUID(as_uuid=False)),
        sa.Column("owner", sa.Text, **text),
        sa.Column("rank_id", pg.UUID(as_uuid=False)),
        sa.Column("tags", pg.ARRAY(sa.Text), nullable=False, server_default=sa.text("'{}'::text[]")),
        sa.Column("custom_fields", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("delete_time", sa.DateTime(timezone=True)),
        sa.Column("merged_into", pg.UUID(as_uuid=False)),
        sa.Column("erased", sa.Boolean, nullable=False, server_default=sa.false()),
        # Normalised search key (Persian letters/digits unified): maintained by the service.
        sa.Column("search_text", sa.Text, **text),
    ]
    for col in cols:
        op.add_column("customers", col)
    op.create_unique_constraint("customers_customer_code_key", "customers", ["customer_code"])
    op.execute(
        "ALTER TABLE customers ADD COLUMN search_tsv tsvector "
        "GENERATED ALWAYS AS (to_tsvector('simple', search_text)) STORED"
    )
    op.execute("CREATE INDEX customers_search_tsv ON customers USING gin (search_tsv)")
    op.execute("CREATE INDEX customers_search_trgm ON customers USING gin (search_text gin_trgm_ops)")
    # Duplicate detection and filters.
    op.create_index(
        "customers_national_id", "customers", ["national_id"], postgresql_where=sa.text("national_id <> ''")
    )
    op.create_index(
        "customers_email_lower", "customers", [sa.text("lower(email)")], postgresql_where=sa.text("email <> ''")
    )
    op.create_index("customers_phone", "customers", ["phone"], postgresql_where=sa.text("phone <> ''"))
    op.create_index("customers_mobile", "customers", ["mobile"], postgresql_where=sa.text("mobile <> ''"))
    op.create_index("customers_city", "customers", ["city"])
    op.create_index("customers_source", "customers", ["acquisition_source"])
    op.create_index("customers_owner", "customers", ["owner"])
    op.create_index("customers_rank", "customers", ["rank_id"])
    op.create_index("customers_tags", "customers", ["tags"], postgresql_using="gin")

    op.create_table(
        "acquisition_sources",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("display_name", sa.Text, nullable=False),
        sa.Column("retired", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.bulk_insert(
        sa.table("acquisition_sources", sa.column("key"), sa.column("display_name")),
        [{"key": k, "display_name": d} for k, d in DEFAULT_SOURCES],
    )
    # Sources already used by existing customers stay valid.
    op.execute(
        "INSERT INTO acquisition_sources (key, display_name) SELECT DISTINCT acquisition_source, acquisition_source "
        "FROM customers WHERE acquisition_source <> '' ON CONFLICT DO NOTHING"
    )

    op.create_table(
        "groups",
        sa.Column("id", pg.UUID(as_uuid=False), primary_key=True, server_default=sa.text("gen_random_uuid()")),
        sa.Column("display_name", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    )
    op.create_index("groups_display_name", "groups", [sa.text("lower(display_name)")], unique=True)
    op.create_table(
        "group_members",
        sa.Column("group_id", pg.UUID(as_uuid=False), sa.ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True),
        sa.Column(
            "customer_id", pg.UUID(as_uuid=False), sa.ForeignKey("customers.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("add_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index("group_members_customer", "group_members", ["customer_id"])

    op.create_table(
        "ranks",
        sa.Column("id", pg.UUID(as_uuid=False), primary_key=True, server_default=sa.text("gen_random_uuid()")),
        sa.Column("display_name", sa.Text, nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    )
    op.create_index("ranks_display_name", "ranks", [sa.text("lower(display_name)")], unique=True)
    op.create_foreign_key("customers_rank_fk", "customers", "ranks", ["rank_id"], ["id"], ondelete="SET NULL")

    op.create_table(
        "custom_field_definitions",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("display_name", sa.Text, nullable=False),
        sa.Column("type", sa.SmallInteger, nullable=False),
        sa.Column("choices", pg.ARRAY(sa.Text), nullable=False, server_default=sa.text("'{}'::text[]")),
        sa.Column("required", sa.Boolean, nullable=False, server_default=sa.false()),
    )

    op.create_table(
        "notes",
        sa.Column("id", pg.UUID(as_uuid=False), primary_key=True, server_default=sa.text("gen_random_uuid()")),
        sa.Column(
            "customer_id", pg.UUID(as_uuid=False), sa.ForeignKey("customers.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("author", sa.Text, nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    )
    op.create_index("notes_customer_time", "notes", ["customer_id", sa.text("create_time DESC"), sa.text("id DESC")])

    op.create_table(
        "audit_entries",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("resource", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("changes", pg.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("request_id", sa.Text, nullable=False, server_default=""),
    )
    op.create_index("audit_entries_resource", "audit_entries", ["resource", sa.text("id DESC")])


NEW_COLUMNS = [
    "customer_code",
    "gender",
    "title_prefix",
    "fax",
    "mobile",
    "website",
    "country",
    "province",
    "city",
    "address",
    "postal_code",
    "po_box",
    "birth_certificate_number",
    "national_id",
    "birth_date",
    "marriage_date",
    "field_of_study",
    "education_degree",
    "industry",
    "founding_date",
    "contact_persons",
    "kind",
    "lifecycle_stage",
    "acquisition_date",
    "referrer_staff",
    "referrer_customer",
    "owner",
    "rank_id",
    "tags",
    "custom_fields",
    "delete_time",
    "merged_into",
    "erased",
    "search_tsv",
    "search_text",
]


def downgrade() -> None:
    for t in ("audit_entries", "notes", "custom_field_definitions", "group_members", "groups", "acquisition_sources"):
        op.drop_table(t)
    op.drop_constraint("customers_rank_fk", "customers")
    op.drop_table("ranks")
    for col in reversed(NEW_COLUMNS):
        op.drop_column("customers", col)
    op.execute("DROP SEQUENCE customer_code_seq")
