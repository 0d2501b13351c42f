"""The loyalty club's tables (on tables.metadata; created by migration 0005).

- `loyalty_programs`: a programme: its currency, earning rules (points per amount spent and
  the rounding, product / product line rules and bonus periods as JSONB lists), point lifetime,
  tiers (JSONB list, ordered by threshold) with the basis, period and downgrade rule.
- `loyalty_rewards`: what points buy, one row per (programme, key); `stock` is what is left
  (NULL: unlimited), decremented by a redemption in its transaction.
- `loyalty_members`: a customer in a programme: the balance (the sum of its movements, kept in
  the same transaction as each movement; a deferred constraint trigger of the migration checks
  the equality at commit), totals, the tier and when it was reached.
- `loyalty_movements`: the points ledger, one row per movement (earn, redeem, expire, adjust,
  reverse) with its source (event id, invoice or credit note, reward, request id), reason,
  actor and the balance after. A row that adds points is a *lot*: `remaining` and
  `expire_time`; a row that takes points records the lots it took them from (`lots`:
  [{"lot": id, "points": n}]), soonest-expiring first. `qualify_time` is the time the movement
  counts for tiers (a reversal counts when the invoice it reverses was paid).

The member column is `customer` (the customer id), not `customer_id`: the audience's merge
re-points every `customer_id` column in one UPDATE, which would break the one-member-per-
programme rule; loyalty merges members itself (loyalty.py).
"""

from __future__ import annotations

import sqlalchemy as sa

from crm_chassis.columns import TIMESTAMPTZ, UUID, id_column, text_column, times

from .tables import JSONB, MONEY, metadata

loyalty_programs = sa.Table(
    "loyalty_programs",
    metadata,
    id_column(),
    sa.Column("display_name", sa.Text, nullable=False),
    text_column("description"),
    sa.Column("currency", sa.Text, nullable=False),
    sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
    # earning: `earn_points` points for every `earn_amount` spent (net of tax), then rounded
    sa.Column("earn_amount", MONEY, nullable=False),
    sa.Column("earn_points", sa.BigInteger, nullable=False),
    sa.Column("rounding", sa.Text, nullable=False, server_default="floor"),  # floor | nearest | ceil
    sa.Column("product_rules", JSONB, nullable=False, server_default="[]"),
    sa.Column("bonus_periods", JSONB, nullable=False, server_default="[]"),
    # lifetime of earned points: none | days | months, and how many
    sa.Column("lifetime_unit", sa.Text, nullable=False, server_default="none"),
    sa.Column("lifetime_count", sa.Integer, nullable=False, server_default="0"),
    # tiers: basis points | spend; period lifetime | gregorian_year | jalali_year | rolling_days
    sa.Column("tiers", JSONB, nullable=False, server_default="[]"),
    sa.Column("tier_basis", sa.Text, nullable=False, server_default="points"),
    sa.Column("tier_period", sa.Text, nullable=False, server_default="lifetime"),
    sa.Column("tier_period_days", sa.Integer, nullable=False, server_default="0"),
    sa.Column("downgrade", sa.Text, nullable=False, server_default="none"),  # none | period_end | grace
    sa.Column("downgrade_grace_days", sa.Integer, nullable=False, server_default="0"),
    sa.Column("request_id", sa.Text, unique=True),
    *times(),
)

loyalty_rewards = sa.Table(
    "loyalty_rewards",
    metadata,
    sa.Column("program_id", UUID, sa.ForeignKey("loyalty_programs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("cost_points", sa.BigInteger, nullable=False),
    sa.Column("stock", sa.BigInteger),  # left; NULL: unlimited
    sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("position", sa.Integer, nullable=False, server_default="0"),
    sa.CheckConstraint("stock IS NULL OR stock >= 0", name="loyalty_rewards_stock"),
)

loyalty_members = sa.Table(
    "loyalty_members",
    metadata,
    id_column(),
    sa.Column("program_id", UUID, sa.ForeignKey("loyalty_programs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("customer", sa.Text, nullable=False),  # the customer id (see the module's note)
    sa.Column("balance", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("earned", sa.BigInteger, nullable=False, server_default="0"),  # earned minus reversed
    sa.Column("redeemed", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("expired", sa.BigInteger, nullable=False, server_default="0"),
    text_column("tier"),  # the tier's key ("" none)
    sa.Column("tier_time", TIMESTAMPTZ),  # when it was reached
    sa.Column("enroll_source", sa.Text, nullable=False, server_default="auto"),  # auto | explicit
    sa.Column("enroll_time", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
    *times(),
    sa.UniqueConstraint("program_id", "customer", name="loyalty_members_one_per_program"),
    sa.UniqueConstraint("id", "program_id", name="loyalty_members_id_program"),  # the movements' key
    sa.CheckConstraint("balance >= 0", name="loyalty_members_balance_not_negative"),
    # fillfactor 70 (migration 0014): room on the page, a rewritten member is a heap-only tuple
)
sa.Index("loyalty_members_customer", loyalty_members.c.customer)

loyalty_movements = sa.Table(
    "loyalty_movements",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("program_id", UUID, nullable=False),
    sa.Column("member_id", UUID, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),  # earn | redeem | expire | adjust | reverse
    sa.Column("points", sa.BigInteger, nullable=False),  # signed: in positive, out negative
    sa.Column("balance", sa.BigInteger, nullable=False),  # after the movement
    sa.Column("amount", MONEY, nullable=False, server_default="0"),  # spend (earn) or credited (reverse, negative)
    text_column("invoice_id"),  # the invoice that earned (earn, reverse)
    text_column("credit_note_id"),  # reverse
    text_column("reward_key"),  # redeem of a reward
    text_column("reason"),
    text_column("actor"),  # the subject of a person's RPC; "system" for events and timers
    sa.Column("source_event_id", sa.Text),  # the event that caused it
    sa.Column("request_id", sa.Text),  # the RPC's idempotency key
    # a lot (earn, positive adjust): points not used yet, and when they expire (NULL: never)
    sa.Column("remaining", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("expire_time", TIMESTAMPTZ),
    sa.Column("lots", JSONB, nullable=False, server_default="[]"),  # the lots a taking movement used
    sa.Column("shortfall", sa.BigInteger, nullable=False, server_default="0"),  # reverse: not clawed back
    sa.Column("details", JSONB, nullable=False, server_default="{}"),  # how earned points were computed
    sa.Column("qualify_time", TIMESTAMPTZ, nullable=False),
    sa.Column("occur_time", TIMESTAMPTZ, nullable=False),
    sa.Column("record_time", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
    # one key for both: the member, in the movement's programme (migration 0014)
    sa.ForeignKeyConstraint(
        ["member_id", "program_id"],
        ["loyalty_members.id", "loyalty_members.program_id"],
        name="loyalty_movements_member_fkey",
        ondelete="CASCADE",
    ),
    sa.CheckConstraint("remaining >= 0", name="loyalty_movements_remaining"),
    sa.CheckConstraint("balance >= 0", name="loyalty_movements_balance"),
)
mv = loyalty_movements.c
# a redelivered (or re-published) event never moves points twice
sa.Index(
    "loyalty_movements_event",
    mv.program_id,
    mv.source_event_id,
    mv.kind,
    unique=True,
    postgresql_where=mv.source_event_id.isnot(None),
)
sa.Index(
    "loyalty_movements_invoice_earn", mv.program_id, mv.invoice_id, unique=True, postgresql_where=mv.kind == "earn"
)
sa.Index(
    "loyalty_movements_request", mv.program_id, mv.request_id, unique=True, postgresql_where=mv.request_id.isnot(None)
)
sa.Index("loyalty_movements_history", mv.member_id, mv.id.desc())
sa.Index("loyalty_movements_lots", mv.member_id, mv.expire_time, postgresql_where=mv.remaining > 0)
sa.Index("loyalty_movements_qualify", mv.member_id, mv.qualify_time, postgresql_where=mv.kind.in_(["earn", "reverse"]))
sa.Index("loyalty_movements_credited", mv.program_id, mv.invoice_id, postgresql_where=mv.kind == "reverse")

__all__ = ["loyalty_members", "loyalty_movements", "loyalty_programs", "loyalty_rewards"]
