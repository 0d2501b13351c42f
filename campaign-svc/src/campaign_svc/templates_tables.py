"""The tables of the templates part (templates.py), on campaign-svc's metadata.

- `templates`: one row per template, its current content and `current_version`; a delete
  sets delete_time (the versions stay: campaigns pin them).
- `template_versions`: every content a template had, one immutable row per version (1, 2,
  ...); a campaign message is rendered from the version its campaign pinned.
"""

from __future__ import annotations

import sqlalchemy as sa

from .tables import TIMESTAMPTZ, UUID, id_column, metadata, text_column, times

templates = sa.Table(
    "templates",
    metadata,
    id_column(),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("channel", sa.Text, nullable=False),  # email | sms | telegram | bale
    text_column("subject"),
    text_column("html_body"),
    text_column("text_body"),
    sa.Column("language", sa.Text, nullable=False, server_default="fa"),
    sa.Column("direction", sa.Text, nullable=False, server_default="rtl"),  # rtl | ltr
    sa.Column("current_version", sa.Integer, nullable=False, server_default="1"),
    text_column("creator"),
    sa.Column("request_id", sa.Text),
    *times(deletable=True),
)
sa.Index(
    "templates_page",
    templates.c.update_time.desc(),
    templates.c.id.desc(),
    postgresql_where=templates.c.delete_time.is_(None),
)
sa.Index(
    "templates_request_id", templates.c.request_id, unique=True, postgresql_where=templates.c.request_id.isnot(None)
)

template_versions = sa.Table(
    "template_versions",
    metadata,
    sa.Column("template_id", UUID, sa.ForeignKey("templates.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("channel", sa.Text, nullable=False),
    text_column("subject"),
    text_column("html_body"),
    text_column("text_body"),
    sa.Column("language", sa.Text, nullable=False),
    sa.Column("direction", sa.Text, nullable=False),
    text_column("creator"),
    sa.Column("create_time", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
)
