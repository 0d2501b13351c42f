"""The loyalty club: programmes, rewards, members and the points ledger (campaign_svc/
loyalty_tables.py describes them), and a deferred constraint trigger that checks at commit that
a member's balance is the sum of its movements.

Revision ID: 0005
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# At commit, every member written in the transaction, and the member of every movement written,
# must hold the sum of its ledger (a movement without its balance, or a balance without its
# movement, is refused).
CHECK_BALANCE = """
CREATE FUNCTION loyalty_check_balance() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE mid uuid; total bigint; now_balance bigint;
BEGIN
  IF TG_TABLE_NAME = 'loyalty_members' THEN mid := NEW.id; ELSE mid := NEW.member_id; END IF;
  -- NEW is the row as this event wrote it; the check is of the member as the transaction leaves it
  SELECT balance INTO now_balance FROM loyalty_members WHERE id = mid;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  SELECT coalesce(sum(points), 0) INTO total FROM loyalty_movements WHERE member_id = mid;
  IF total <> now_balance THEN
    RAISE EXCEPTION 'loyalty member % balance % is not the sum of its movements %', mid, now_balance, total
      USING ERRCODE = 'check_violation';
  END IF;
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER loyalty_members_balance_is_ledger_sum
  AFTER INSERT OR UPDATE OF balance ON loyalty_members
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION loyalty_check_balance();
CREATE CONSTRAINT TRIGGER loyalty_movements_balance_is_ledger_sum
  AFTER INSERT OR UPDATE OF points, member_id ON loyalty_movements
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION loyalty_check_balance();
"""


def upgrade() -> None:
    op.create_table(
        "loyalty_programs",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("display_name", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("currency", sa.Text(), nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("earn_amount", sa.Numeric(precision=18, scale=2), nullable=False),
        sa.Column("earn_points", sa.BigInteger(), nullable=False),
        sa.Column("rounding", sa.Text(), server_default="floor", nullable=False),
        sa.Column("product_rules", postgresql.JSONB(astext_type=sa.Text()), server_default="[]", nullable=False),
        sa.Column("bonus_periods", postgresql.JSONB(astext_type=sa.Text()), server_default="[]", nullable=False),
        sa.Column("lifetime_unit", sa.Text(), server_default="none", nullable=False),
        sa.Column("lifetime_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("tiers", postgresql.JSONB(astext_type=sa.Text()), server_default="[]", nullable=False),
        sa.Column("tier_basis", sa.Text(), server_default="points", nullable=False),
        sa.Column("tier_period", sa.Text(), server_default="lifetime", nullable=False),
        sa.Column("tier_period_days", sa.Integer(), server_default="0", nullable=False),
        sa.Column("downgrade", sa.Text(), server_default="none", nullable=False),
        sa.Column("downgrade_grace_days", sa.Integer(), server_default="0", nullable=False),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_id"),
    )
    op.create_table(
        "loyalty_members",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("program_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("customer", sa.Text(), nullable=False),
        sa.Column("balance", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("earned", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("redeemed", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("expired", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("tier", sa.Text(), server_default="", nullable=False),
        sa.Column("tier_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("enroll_source", sa.Text(), server_default="auto", nullable=False),
        sa.Column("enroll_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("balance >= 0", name="loyalty_members_balance_not_negative"),
        sa.ForeignKeyConstraint(["program_id"], ["loyalty_programs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("program_id", "customer", name="loyalty_members_one_per_program"),
    )
    op.create_index("loyalty_members_customer", "loyalty_members", ["customer"], unique=False)
    op.create_table(
        "loyalty_rewards",
        sa.Column("program_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("display_name", sa.Text(), nullable=False),
        sa.Column("cost_points", sa.BigInteger(), nullable=False),
        sa.Column("stock", sa.BigInteger(), nullable=True),
        sa.Column("active", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("position", sa.Integer(), server_default="0", nullable=False),
        sa.CheckConstraint("stock IS NULL OR stock >= 0", name="loyalty_rewards_stock"),
        sa.ForeignKeyConstraint(["program_id"], ["loyalty_programs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("program_id", "key"),
    )
    op.create_table(
        "loyalty_movements",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("program_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("member_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("points", sa.BigInteger(), nullable=False),
        sa.Column("balance", sa.BigInteger(), nullable=False),
        sa.Column("amount", sa.Numeric(precision=18, scale=2), server_default="0", nullable=False),
        sa.Column("invoice_id", sa.Text(), server_default="", nullable=False),
        sa.Column("credit_note_id", sa.Text(), server_default="", nullable=False),
        sa.Column("reward_key", sa.Text(), server_default="", nullable=False),
        sa.Column("reason", sa.Text(), server_default="", nullable=False),
        sa.Column("actor", sa.Text(), server_default="", nullable=False),
        sa.Column("source_event_id", sa.Text(), nullable=True),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("remaining", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("expire_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lots", postgresql.JSONB(astext_type=sa.Text()), server_default="[]", nullable=False),
        sa.Column("shortfall", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("details", postgresql.JSONB(astext_type=sa.Text()), server_default="{}", nullable=False),
        sa.Column("qualify_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("occur_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("record_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("balance >= 0", name="loyalty_movements_balance"),
        sa.CheckConstraint("remaining >= 0", name="loyalty_movements_remaining"),
        sa.ForeignKeyConstraint(["member_id"], ["loyalty_members.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["program_id"], ["loyalty_programs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "loyalty_movements_credited",
        "loyalty_movements",
        ["program_id", "invoice_id"],
        unique=False,
        postgresql_where=sa.text("kind = 'reverse'"),
    )
    op.create_index(
        "loyalty_movements_event",
        "loyalty_movements",
        ["program_id", "source_event_id", "kind"],
        unique=True,
        postgresql_where=sa.text("source_event_id IS NOT NULL"),
    )
    op.create_index(
        "loyalty_movements_history", "loyalty_movements", ["member_id", sa.literal_column("id DESC")], unique=False
    )
    op.create_index(
        "loyalty_movements_invoice_earn",
        "loyalty_movements",
        ["program_id", "invoice_id"],
        unique=True,
        postgresql_where=sa.text("kind = 'earn'"),
    )
    op.create_index(
        "loyalty_movements_lots",
        "loyalty_movements",
        ["member_id", "expire_time"],
        unique=False,
        postgresql_where=sa.text("remaining > 0"),
    )
    op.create_index(
        "loyalty_movements_qualify",
        "loyalty_movements",
        ["member_id", "qualify_time"],
        unique=False,
        postgresql_where=sa.text("kind IN ('earn', 'reverse')"),
    )
    op.create_index(
        "loyalty_movements_request",
        "loyalty_movements",
        ["program_id", "request_id"],
        unique=True,
        postgresql_where=sa.text("request_id IS NOT NULL"),
    )
    op.execute(CHECK_BALANCE)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS loyalty_movements_balance_is_ledger_sum ON loyalty_movements")
    op.execute("DROP TRIGGER IF EXISTS loyalty_members_balance_is_ledger_sum ON loyalty_members")
    op.execute("DROP FUNCTION IF EXISTS loyalty_check_balance()")
    op.drop_table("loyalty_movements")
    op.drop_table("loyalty_rewards")
    op.drop_table("loyalty_members")
    op.drop_table("loyalty_programs")
