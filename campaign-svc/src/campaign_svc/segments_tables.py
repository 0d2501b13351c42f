"""The tables of segments (segments.py), on the service's metadata (tables.py).

- `segments`: a segment's definition (its id in creation order, see below) (kind dynamic | static | combined, the filter, the
  included and excluded segments), `relative` (membership drifts with the clock), `depth`
  (0 for dynamic and static, 1 + the deepest part for a combined one: the order in which
  combined segments are re-evaluated), the materialised `member_count`, the latest rebuild job.
- `segment_members`: one row per (segment, customer), `since` when they entered and `source`
  (filter | combined | manual | import); its key (segment, customer) serves every lookup, one
  customer's segments included (a probe per segment), so a big build writes one index. A merge of customers moves these rows itself
  (info["merge"] = "own": a customer in a segment twice would break the key), see segments.py.
- Indexes on the audience for the fields segments filter on most (partial: live customers only,
  the condition every segment query carries).
"""

from __future__ import annotations

import sqlalchemy as sa

from crm_chassis.columns import TIMESTAMPTZ, UUID, text_column, times

from .tables import TEXTS, audience, metadata

segments = sa.Table(
    "segments",
    metadata,
    # in creation order (migration 0012: the millisecond clock first, as a version 7 UUID): a new
    # segment's members append at the right edge of the segment_members key
    sa.Column("id", UUID, primary_key=True, server_default=sa.text("segment_id()")),
    sa.Column("display_name", sa.Text, nullable=False, unique=True),
    text_column("description"),
    sa.Column("kind", sa.Text, nullable=False),  # dynamic | static | combined
    text_column("filter"),
    sa.Column("include_ids", TEXTS, nullable=False, server_default="{}"),
    sa.Column("include_all", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("exclude_ids", TEXTS, nullable=False, server_default="{}"),
    sa.Column("relative", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("depth", sa.Integer, nullable=False, server_default="0"),
    sa.Column("member_count", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("rebuild_job", UUID),  # the latest rebuild (crm_chassis.jobs)
    sa.Column("rebuild_time", TIMESTAMPTZ),
    # the clock the membership was last evaluated at in full (a rebuild's start, a refresh)
    sa.Column("evaluated_time", TIMESTAMPTZ),
    text_column("creator"),
    sa.Column("request_id", sa.Text, unique=True),
    *times(),
)

segment_members = sa.Table(
    "segment_members",
    metadata,
    # no foreign key: its check per row was a sixth of a big build; DeleteSegment deletes the rows
    sa.Column("segment_id", UUID, primary_key=True),
    sa.Column("customer_id", sa.Text, primary_key=True),
    sa.Column("since", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
    sa.Column("source", sa.Text, nullable=False, server_default="filter"),
    info={"merge": "own"},
)

LIVE = sa.and_(~audience.c.deleted, audience.c.merged_into == "")
# The most common segment is region + recency (+ frequency): its count is an index-only scan.
AUDIENCE_INDEXES = {
    "audience_seg_province": (["province", "last_purchase_time"], None),
    "audience_seg_last_purchase": (["last_purchase_time"], None),
    "audience_seg_last_activity": (["last_activity_time"], None),
    "audience_seg_create_time": (["create_time"], None),
    "audience_seg_last_web_visit": (["last_web_visit_time"], None),
    "audience_seg_tags": (["tags"], "gin"),
    "audience_seg_groups": (["groups"], "gin"),
}
INCLUDE = {"audience_seg_province": ["city", "order_count"]}
for _name, (_cols, _using) in AUDIENCE_INDEXES.items():
    sa.Index(
        _name,
        *(audience.c[c] for c in _cols),
        postgresql_where=LIVE,
        **({"postgresql_using": _using} if _using else {}),
        **({"postgresql_include": INCLUDE[_name]} if _name in INCLUDE else {}),
    )
