"""Surveys: CSAT and expectation (zone of tolerance) templates, surveys sent by signed links,
their answers and expectation levels (support_svc/surveys.py describes them); the default
templates are seeded.

Revision ID: 0010
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0010"
down_revision = "0009"

CSAT_QUESTIONS = [
    {"key": "speed", "text_fa": "سرعت پاسخگویی ما چطور بود؟", "text_en": "How was our speed of response?"},
    {
        "key": "knowledge",
        "text_fa": "کارشناس ما چقدر به موضوع مسلط بود؟",
        "text_en": "How well did our agent know the subject?",
    },
]
DIMENSIONS = [
    {
        "key": "reliability",
        "label_fa": "قابلیت اطمینان",
        "label_en": "Reliability",
        "description_fa": "انجام درست و به‌موقع آنچه وعده داده شده است",
        "description_en": "Doing what was promised, dependably and accurately",
    },
    {
        "key": "responsiveness",
        "label_fa": "پاسخگویی",
        "label_en": "Responsiveness",
        "description_fa": "تمایل به کمک و خدمت سریع",
        "description_en": "Willingness to help and prompt service",
    },
    {
        "key": "assurance",
        "label_fa": "اطمینان‌بخشی",
        "label_en": "Assurance",
        "description_fa": "دانش و ادب کارشناسان که اعتماد می‌آفریند",
        "description_en": "Knowledge and courtesy of the staff that inspire trust",
    },
    {
        "key": "empathy",
        "label_fa": "همدلی",
        "label_en": "Empathy",
        "description_fa": "توجه فردی و دلسوزانه به شما",
        "description_en": "Caring, individual attention",
    },
    {
        "key": "tangibles",
        "label_fa": "ملموسات",
        "label_en": "Tangibles",
        "description_fa": "ظاهر کانال‌ها، ابزارها و مکاتبات ما",
        "description_en": "The look of our channels, tools and correspondence",
    },
]


def upgrade() -> None:
    op.create_table(
        "survey_templates",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("display_name", sa.Text(), nullable=False),
        sa.Column("language", sa.Text(), server_default="fa", nullable=False),
        sa.Column("prompt_fa", sa.Text(), server_default="", nullable=False),
        sa.Column("prompt_en", sa.Text(), server_default="", nullable=False),
        sa.Column("questions", postgresql.JSONB(astext_type=sa.Text()), server_default="[]", nullable=False),
        sa.Column("dimensions", postgresql.JSONB(astext_type=sa.Text()), server_default="[]", nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("kind IN ('csat', 'expectation')", name="survey_templates_kind"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "survey_templates_active",
        "survey_templates",
        ["kind", "language"],
        unique=True,
        postgresql_where=sa.text("active"),
    )
    op.create_index(
        "survey_templates_request_id",
        "survey_templates",
        ["request_id"],
        unique=True,
        postgresql_where=sa.text("request_id IS NOT NULL"),
    )
    op.create_table(
        "surveys",
        sa.Column("id", sa.UUID(as_uuid=False), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("ticket_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("template_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("nonce", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), server_default="sent", nullable=False),
        sa.Column("language", sa.Text(), server_default="fa", nullable=False),
        sa.Column("content", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("customer_id", sa.Text(), server_default="", nullable=False),
        sa.Column("agent_id", sa.Text(), server_default="", nullable=False),
        sa.Column("team_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("csat", sa.SmallInteger(), nullable=True),
        sa.Column("comment", sa.Text(), server_default="", nullable=False),
        sa.Column("expectations_given", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("perception_open", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("delivery", sa.Text(), server_default="", nullable=False),
        sa.Column("message_id", sa.UUID(as_uuid=False), nullable=True),
        sa.Column("answer_address", sa.Text(), server_default="", nullable=False),
        sa.Column("send_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("answer_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expire_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("kind IN ('csat', 'expectation')", name="surveys_kind"),
        sa.CheckConstraint("state IN ('sent', 'answered', 'expired')", name="surveys_state"),
        sa.CheckConstraint("csat IS NULL OR csat BETWEEN 1 AND 5", name="surveys_csat"),
        sa.ForeignKeyConstraint(["team_id"], ["teams.id"], ondelete="SET NULL"),
        sa.ForeignKeyConstraint(
            ["template_id"],
            ["survey_templates.id"],
        ),
        sa.ForeignKeyConstraint(["ticket_id"], ["tickets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("surveys_agent", "surveys", ["agent_id", "answer_time"], unique=False)
    op.create_index(
        "surveys_answered",
        "surveys",
        ["kind", "answer_time"],
        unique=False,
        postgresql_where=sa.text("state = 'answered'"),
    )
    op.create_index(
        "surveys_open", "surveys", ["ticket_id", "kind"], unique=True, postgresql_where=sa.text("state = 'sent'")
    )
    op.create_index(
        "surveys_page", "surveys", [sa.literal_column("send_time DESC"), sa.literal_column("id DESC")], unique=False
    )
    op.create_index("surveys_team", "surveys", ["team_id", "answer_time"], unique=False)
    op.create_index("surveys_ticket", "surveys", ["ticket_id", "send_time"], unique=False)
    op.create_table(
        "expectation_levels",
        sa.Column("survey_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("dimension", sa.Text(), nullable=False),
        sa.Column("position", sa.SmallInteger(), server_default="0", nullable=False),
        sa.Column("desired", sa.SmallInteger(), nullable=False),
        sa.Column("adequate", sa.SmallInteger(), nullable=False),
        sa.Column("predicted", sa.SmallInteger(), nullable=False),
        sa.Column("perceived", sa.SmallInteger(), nullable=True),
        sa.CheckConstraint("adequate BETWEEN 1 AND desired", name="expectation_levels_adequate"),
        sa.CheckConstraint("desired BETWEEN 1 AND 9", name="expectation_levels_desired"),
        sa.CheckConstraint("perceived IS NULL OR perceived BETWEEN 1 AND 9", name="expectation_levels_perceived"),
        sa.CheckConstraint("predicted BETWEEN 1 AND 9", name="expectation_levels_predicted"),
        sa.ForeignKeyConstraint(["survey_id"], ["surveys.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("survey_id", "dimension"),
    )
    op.create_table(
        "survey_answers",
        sa.Column("survey_id", sa.UUID(as_uuid=False), nullable=False),
        sa.Column("question", sa.Text(), nullable=False),
        sa.Column("score", sa.SmallInteger(), nullable=False),
        sa.Column("comment", sa.Text(), server_default="", nullable=False),
        sa.CheckConstraint("score BETWEEN 1 AND 5", name="survey_answers_score"),
        sa.ForeignKeyConstraint(["survey_id"], ["surveys.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("survey_id", "question"),
    )

    templates = sa.table(
        "survey_templates",
        sa.column("kind", sa.Text),
        sa.column("display_name", sa.Text),
        sa.column("language", sa.Text),
        sa.column("prompt_fa", sa.Text),
        sa.column("prompt_en", sa.Text),
        sa.column("questions", postgresql.JSONB),
        sa.column("dimensions", postgresql.JSONB),
        sa.column("active", sa.Boolean),
    )
    op.bulk_insert(
        templates,
        [
            {
                "kind": "csat",
                "display_name": "رضایت مشتری (پیش‌فرض)",
                "language": "fa",
                "prompt_fa": "از رسیدگی به درخواست‌تان چقدر راضی بودید؟ (۱ خیلی ناراضی تا ۵ خیلی راضی)",
                "prompt_en": "How satisfied are you with how we handled your request? (1 very dissatisfied - 5 very satisfied)",
                "questions": CSAT_QUESTIONS,
                "dimensions": [],
                "active": True,
            },
            {
                "kind": "expectation",
                "display_name": "انتظارات از خدمت (پیش‌فرض)",
                "language": "fa",
                "prompt_fa": "برای هر مورد از ۱ (کم) تا ۹ (زیاد) بگویید: سطح مطلوب، کمترین سطح قابل قبول و سطحی که انتظار دارید بگیرید؛ پس از رسیدگی، سطحی که گرفتید.",
                "prompt_en": "For each item, from 1 (low) to 9 (high): the level you want, the lowest level you accept and the level you expect to get; after resolution, the level you got.",
                "questions": [],
                "dimensions": DIMENSIONS,
                "active": True,
            },
        ],
    )


def downgrade() -> None:
    op.drop_table("survey_answers")
    op.drop_table("expectation_levels")
    op.drop_table("surveys")
    op.drop_table("survey_templates")
