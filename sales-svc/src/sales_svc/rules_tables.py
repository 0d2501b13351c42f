"""The tables of lead scoring and assignment (migration 0009_lead_rules)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from .tables import UUID, _id, _times, metadata

scoring_rules = sa.Table(
    "scoring_rules",
    metadata,
    _id(),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("points", sa.Integer, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),  # profile | behavior
    sa.Column("filter", sa.Text, nullable=False, server_default=""),  # profile: AIP-160 over leads
    sa.Column("event_kind", sa.Text, nullable=False, server_default=""),  # behavior
    sa.Column("min_count", sa.Integer, nullable=False, server_default="1"),
    sa.Column("window_days", sa.Integer, nullable=False, server_default="0"),  # 0: all time
    sa.Column("cap", sa.Integer, nullable=False, server_default="1"),  # times the points count at most
    sa.Column("request_id", sa.Text, unique=True),
    *_times(),
    sa.CheckConstraint("kind IN ('profile', 'behavior')", name="scoring_rules_kind"),
)
sa.Index("scoring_rules_page", scoring_rules.c.create_time.desc(), scoring_rules.c.id.desc())

assignment_rules = sa.Table(
    "assignment_rules",
    metadata,
    _id(),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("position", sa.Integer, nullable=False, server_default="0"),
    sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
    # Match: each non-empty list must hold the lead's value (texts persian.normalize'd).
    sa.Column("provinces", pg.ARRAY(sa.Text), nullable=False, server_default="{}"),
    sa.Column("cities", pg.ARRAY(sa.Text), nullable=False, server_default="{}"),
    sa.Column("sources", pg.ARRAY(sa.Text), nullable=False, server_default="{}"),
    sa.Column("product_line_ids", pg.ARRAY(UUID), nullable=False, server_default="{}"),
    sa.Column("strategy", sa.Text, nullable=False),  # round_robin | least_open | fixed_owner
    sa.Column("team_id", UUID, sa.ForeignKey("teams.id")),
    sa.Column("owner_id", sa.Text, nullable=False, server_default=""),
    sa.Column("untouched_hours", sa.Numeric(10, 4), nullable=False, server_default="0"),
    sa.Column("request_id", sa.Text, unique=True),
    *_times(),
    sa.CheckConstraint("strategy IN ('round_robin', 'least_open', 'fixed_owner')", name="assignment_rules_strategy"),
)
sa.Index("assignment_rules_order", assignment_rules.c.position, assignment_rules.c.create_time, assignment_rules.c.id)
sa.Index("assignment_rules_team", assignment_rules.c.team_id)

# A round-robin rule's durable cursor: the member who got its last lead. Locked (FOR UPDATE)
# by each assignment through the rule, so concurrent creates take turns.
assignment_cursors = sa.Table(
    "assignment_cursors",
    metadata,
    sa.Column("rule_id", UUID, sa.ForeignKey("assignment_rules.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("last_member", sa.Text, nullable=False, server_default=""),
    sa.Column("turns", sa.BigInteger, nullable=False, server_default="0"),
)

# What leads did (campaign responses, e-mail clicks, website visits, ...), for behaviour rules.
lead_behaviors = sa.Table(
    "lead_behaviors",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("lead_id", UUID, sa.ForeignKey("leads.id", ondelete="CASCADE"), nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("idempotency_key", sa.Text),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.UniqueConstraint("lead_id", "idempotency_key", name="lead_behaviors_key"),
)
sa.Index("lead_behaviors_lead", lead_behaviors.c.lead_id, lead_behaviors.c.kind, lead_behaviors.c.time)
