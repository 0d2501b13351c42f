"""SurveyService (proto/crm/support/v1/surveys.proto): CSAT surveys and expectation surveys (the
zone of tolerance) of tickets, answered through signed links on the gateway's public routes.

Rules, in one place:
- a ticket that becomes resolved (and has a customer or a contact address) gets a CSAT survey
  from the active CSAT template of its language (else of any language), in the resolving
  transaction; one open (state sent) survey per ticket and kind at a time (a unique index), so
  a reopen + resolve while the first is unanswered makes no second one;
- the survey keeps a copy of its template's questions (a later edit does not change it);
- the link's token is base64url(survey id, 16 bytes) + "." + base64url(HMAC-SHA256(
  SURVEY_LINK_SECRET, "<survey id>.<nonce>.<expire epoch>")): the id finds the row, the nonce
  and expiry stored on it are signed, so a tampered id, signature or expiry is UNAUTHENTICATED;
  an authentic link past expire_time is FAILED_PRECONDITION (SURVEY_EXPIRED);
- links are posted on the ticket by the durable timer `survey.deliver` (key: the ticket id) as
  an agent reply authored "survey" (the ticket's channel delivers it, like any reply): one
  message with every pending link of the ticket;
- an expectation survey asks desired, adequate and predicted (1-9, adequate <= desired) first,
  then, when its ticket is resolved, perceived, through a renewed link (a new expiry, so the
  first link stops working). Made by SendExpectationSurvey, or when a ticket is opened if
  SURVEY_EXPECTATION_ON_OPEN; then its link is posted with the ticket's first agent reply (an
  automatic post before it would count as the first response);
- the timer `survey.expire` (key: the survey id) marks an unanswered survey expired;
- a complete answer publishes survey.answered.v1 (SurveyEvent); a second answer to the same
  phase is ALREADY_EXISTS (SURVEY_ALREADY_ANSWERED).

The zone-of-tolerance arithmetic is in the pure functions `zone_of` and `summarize`;
SummarizeExpectations computes the same averages in SQL (set-based).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import logging
import os
import re
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import sqlalchemy as sa
from google.protobuf import empty_pb2
from sqlalchemy.dialects.postgresql import insert as pg_insert

from crm.support.v1 import support_events_pb2 as ev_pb
from crm.support.v1 import surveys_pb2 as pb
from crm.support.v1 import surveys_pb2_grpc
from crm_chassis import timers
from crm_chassis.columns import TIMESTAMPTZ, UUID, id_column, text_column, times
from crm_chassis.dates import set_times
from crm_chassis.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    Unauthenticated,
)
from crm_chassis.filtering import (
    FieldType,
    FilterField,
    FilterSchema,
    column_condition,
    keyset_page,
    parse_order_by,
    query_fingerprint,
    with_tiebreaker,
)
from crm_chassis.grpc_server import Registration
from crm_chassis.interceptors import current_principal
from crm_chassis.pagination import PageTokens, page_size
from crm_chassis.resources import ResourceName, UpdateMask, check_etag, etag

from .runtime import Support
from .tables import JSONB, metadata, tickets
from .ticketing import CUSTOMER, TEAM, TICKET, Tickets, number_text

log = logging.getLogger(__name__)

SURVEY = ResourceName("tickets/{ticket_id}/surveys/{survey_id}")
TEMPLATE = ResourceName("surveyTemplates/{survey_template_id}")
EVENT_SURVEY = "surveys/{}"  # SurveyEvent.survey, as support_events.proto names it

KINDS = ("csat", "expectation")
STATES = ("sent", "answered", "expired")
LANGUAGES = ("fa", "en")
KIND_ENUM = {"csat": pb.SURVEY_KIND_CSAT, "expectation": pb.SURVEY_KIND_EXPECTATION}
KIND_OF = {v: k for k, v in KIND_ENUM.items()}
STATE_ENUM = {"sent": pb.SURVEY_STATE_SENT, "answered": pb.SURVEY_STATE_ANSWERED, "expired": pb.SURVEY_STATE_EXPIRED}
POSITION_ENUM = {
    None: pb.ZONE_POSITION_UNSPECIFIED,
    "below": pb.ZONE_POSITION_BELOW,
    "in": pb.ZONE_POSITION_IN,
    "above": pb.ZONE_POSITION_ABOVE,
}

AUTHOR = "survey"  # the author of the ticket messages that carry links
DELIVER = "survey.deliver"  # timer; key: the ticket id
EXPIRE = "survey.expire"  # timer; key: the survey id
TOKEN_LIMIT = 200
COMMENT_LIMIT = 2000
KEY = re.compile(r"[a-z0-9_]{1,40}")
CSAT_MIN, CSAT_MAX = 1, 5
LEVEL_MIN, LEVEL_MAX = 1, 9
MAX_QUESTIONS = 20
MAX_DIMENSIONS = 20


# -- tables -------------------------------------------------------------------------------------
survey_templates = sa.Table(
    "survey_templates",
    metadata,
    id_column(),
    sa.Column("kind", sa.Text, nullable=False),  # csat | expectation
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("language", sa.Text, nullable=False, server_default="fa"),
    text_column("prompt_fa"),
    text_column("prompt_en"),
    # csat: [{"key", "text_fa", "text_en"}]; expectation: [] (dimensions instead)
    sa.Column("questions", JSONB, nullable=False, server_default="[]"),
    # expectation: [{"key", "label_fa", "label_en", "description_fa", "description_en"}]
    sa.Column("dimensions", JSONB, nullable=False, server_default="[]"),
    sa.Column("active", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("request_id", sa.Text),
    *times(),
    sa.CheckConstraint("kind IN ('csat', 'expectation')", name="survey_templates_kind"),
)
st = survey_templates.c
sa.Index("survey_templates_active", st.kind, st.language, unique=True, postgresql_where=st.active)
sa.Index("survey_templates_request_id", st.request_id, unique=True, postgresql_where=st.request_id.is_not(None))

surveys = sa.Table(
    "surveys",
    metadata,
    id_column(),
    sa.Column("ticket_id", UUID, sa.ForeignKey("tickets.id", ondelete="CASCADE"), nullable=False),
    sa.Column("template_id", UUID, sa.ForeignKey("survey_templates.id"), nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("nonce", sa.Text, nullable=False),  # signed into the link's token
    sa.Column("state", sa.Text, nullable=False, server_default="sent"),  # sent | answered | expired
    sa.Column("language", sa.Text, nullable=False, server_default="fa"),
    # the template's prompt, questions and dimensions when it was sent
    sa.Column("content", JSONB, nullable=False),
    text_column("customer_id"),
    text_column("agent_id"),
    sa.Column("team_id", UUID, sa.ForeignKey("teams.id", ondelete="SET NULL")),
    sa.Column("csat", sa.SmallInteger),
    text_column("comment"),
    # an expectation survey: the first phase was answered / the perception phase is open
    sa.Column("expectations_given", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("perception_open", sa.Boolean, nullable=False, server_default=sa.false()),
    # '' | waiting (for the ticket's first agent reply) | pending (timer set) | posted
    text_column("delivery"),
    sa.Column("message_id", UUID),
    text_column("answer_address"),
    sa.Column("send_time", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
    sa.Column("answer_time", TIMESTAMPTZ),
    sa.Column("expire_time", TIMESTAMPTZ, nullable=False),
    sa.Column("create_time", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
    sa.CheckConstraint("kind IN ('csat', 'expectation')", name="surveys_kind"),
    sa.CheckConstraint("state IN ('sent', 'answered', 'expired')", name="surveys_state"),
    sa.CheckConstraint("csat IS NULL OR csat BETWEEN 1 AND 5", name="surveys_csat"),
)
s = surveys.c
sa.Index("surveys_open", s.ticket_id, s.kind, unique=True, postgresql_where=s.state == "sent")
sa.Index("surveys_ticket", s.ticket_id, s.send_time)
sa.Index("surveys_page", s.send_time.desc(), s.id.desc())
sa.Index("surveys_answered", s.kind, s.answer_time, postgresql_where=s.state == "answered")
sa.Index("surveys_agent", s.agent_id, s.answer_time)
sa.Index("surveys_team", s.team_id, s.answer_time)

survey_answers = sa.Table(
    "survey_answers",
    metadata,
    sa.Column("survey_id", UUID, sa.ForeignKey("surveys.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("question", sa.Text, primary_key=True),
    sa.Column("score", sa.SmallInteger, nullable=False),
    text_column("comment"),
    sa.CheckConstraint("score BETWEEN 1 AND 5", name="survey_answers_score"),
)

expectation_levels = sa.Table(
    "expectation_levels",
    metadata,
    sa.Column("survey_id", UUID, sa.ForeignKey("surveys.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("dimension", sa.Text, primary_key=True),
    sa.Column("position", sa.SmallInteger, nullable=False, server_default="0"),  # the template's order
    sa.Column("desired", sa.SmallInteger, nullable=False),
    sa.Column("adequate", sa.SmallInteger, nullable=False),
    sa.Column("predicted", sa.SmallInteger, nullable=False),
    sa.Column("perceived", sa.SmallInteger),  # after resolution
    sa.CheckConstraint("desired BETWEEN 1 AND 9", name="expectation_levels_desired"),
    sa.CheckConstraint("adequate BETWEEN 1 AND desired", name="expectation_levels_adequate"),
    sa.CheckConstraint("predicted BETWEEN 1 AND 9", name="expectation_levels_predicted"),
    sa.CheckConstraint("perceived IS NULL OR perceived BETWEEN 1 AND 9", name="expectation_levels_perceived"),
)
el = expectation_levels.c


# -- settings -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    secret: bytes
    link_days: int
    base_url: str
    expectation_on_open: bool

    @classmethod
    def read(cls, jwt_secret: str, env=os.environ) -> Settings:
        given = env.get("SURVEY_LINK_SECRET", "")
        secret = (
            given.encode()
            if given
            else hmac.new(jwt_secret.encode(), b"crm survey links", hashlib.sha256).hexdigest().encode()
        )
        try:
            days = int(env.get("SURVEY_LINK_DAYS", "14"))
        except ValueError:
            raise SystemExit("SURVEY_LINK_DAYS must be a whole number of days") from None
        if not 1 <= days <= 365:
            raise SystemExit("SURVEY_LINK_DAYS must be 1..365")
        return cls(
            secret=secret,
            link_days=days,
            base_url=env.get("SURVEY_BASE_URL", "http://localhost:8080").rstrip("/"),
            expectation_on_open=env.get("SURVEY_EXPECTATION_ON_OPEN", "false").lower() in ("1", "true", "yes"),
        )


# -- signed links -------------------------------------------------------------------------------
def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, survey_id: str, nonce: str, expire_time: dt.datetime) -> bytes:
    message = f"{survey_id}.{nonce}.{int(expire_time.timestamp())}".encode()
    return hmac.new(secret, message, hashlib.sha256).digest()


def make_token(secret: bytes, survey_id: str, nonce: str, expire_time: dt.datetime) -> str:
    """The token of a survey's link (see the module's docstring)."""
    return _b64(uuid.UUID(survey_id).bytes) + "." + _b64(_mac(secret, survey_id, nonce, expire_time))


def token_survey_id(token: str) -> str:
    """The survey id a token names; Unauthenticated if it is not a token's shape."""
    try:
        head, _, sig = token.partition(".")
        if not head or not sig or len(token) > TOKEN_LIMIT:
            raise ValueError
        return str(uuid.UUID(bytes=_unb64(head)))
    except (ValueError, TypeError):
        raise Unauthenticated("the survey link is not valid", reason="SURVEY_LINK_INVALID") from None


def token_matches(secret: bytes, token: str, row) -> bool:
    expected = make_token(secret, str(row.id), row.nonce, row.expire_time)
    return hmac.compare_digest(expected.encode(), token.encode())


# -- the zone of tolerance (pure) ---------------------------------------------------------------
@dataclass(frozen=True)
class Zone:
    """One dimension of one answer against its zone of tolerance [adequate, desired]."""

    dimension: str
    desired: int
    adequate: int
    predicted: int
    perceived: int | None
    width: int  # desired - adequate
    predicted_position: str  # below | in | above
    perceived_position: str | None
    msa: int | None  # perceived - adequate
    mss: int | None  # perceived - desired
    predicted_msa: int
    predicted_mss: int


def position(level: int, adequate: int, desired: int) -> str:
    """below (level < adequate), in ([adequate, desired]) or above (level > desired)."""
    if level < adequate:
        return "below"
    if level > desired:
        return "above"
    return "in"


def zone_of(dimension: str, desired: int, adequate: int, predicted: int, perceived: int | None) -> Zone:
    return Zone(
        dimension=dimension,
        desired=desired,
        adequate=adequate,
        predicted=predicted,
        perceived=perceived,
        width=desired - adequate,
        predicted_position=position(predicted, adequate, desired),
        perceived_position=None if perceived is None else position(perceived, adequate, desired),
        msa=None if perceived is None else perceived - adequate,
        mss=None if perceived is None else perceived - desired,
        predicted_msa=predicted - adequate,
        predicted_mss=predicted - desired,
    )


@dataclass(frozen=True)
class DimensionStats:
    """Averages of one dimension over many answers (those with a perceived level)."""

    dimension: str
    count: int
    desired: float
    adequate: float
    predicted: float
    perceived: float
    zone_width: float
    msa: float
    mss: float
    perceived_shares: tuple[float, float, float]  # below, in, above
    predicted_shares: tuple[float, float, float]


def summarize(levels: Iterable[tuple[str, int, int, int, int | None]]) -> dict[str, DimensionStats]:
    """Per dimension averages of (dimension, desired, adequate, predicted, perceived) answers;
    answers without perceived are left out (the survey is not complete)."""
    by: dict[str, list[Zone]] = {}
    for dim, desired, adequate, predicted, perceived in levels:
        if perceived is not None:
            by.setdefault(dim, []).append(zone_of(dim, desired, adequate, predicted, perceived))
    out = {}
    for dim, zones in sorted(by.items()):
        n = len(zones)

        def avg(values) -> float:
            return sum(values) / n  # noqa: B023 - n is this dimension's

        def shares(positions) -> tuple[float, float, float]:
            positions = list(positions)
            return tuple(positions.count(p) / n for p in ("below", "in", "above"))  # noqa: B023

        out[dim] = DimensionStats(
            dimension=dim,
            count=n,
            desired=avg(z.desired for z in zones),
            adequate=avg(z.adequate for z in zones),
            predicted=avg(z.predicted for z in zones),
            perceived=avg(z.perceived for z in zones),
            zone_width=avg(z.width for z in zones),
            msa=avg(z.msa for z in zones),
            mss=avg(z.mss for z in zones),
            perceived_shares=shares(z.perceived_position for z in zones),
            predicted_shares=shares(z.predicted_position for z in zones),
        )
    return out


# -- conversions --------------------------------------------------------------------------------
def survey_name(row) -> str:
    return SURVEY.format(row.ticket_id, row.id)


def _agent(agent_id: str) -> str:
    return f"agents/{agent_id}" if agent_id else ""


def _question(q: dict) -> pb.SurveyQuestion:
    return pb.SurveyQuestion(key=q["key"], text_fa=q.get("text_fa", ""), text_en=q.get("text_en", ""))


def _dimension(d: dict) -> pb.SurveyDimension:
    return pb.SurveyDimension(
        key=d["key"],
        label_fa=d.get("label_fa", ""),
        label_en=d.get("label_en", ""),
        description_fa=d.get("description_fa", ""),
        description_en=d.get("description_en", ""),
    )


def template_to_proto(row) -> pb.SurveyTemplate:
    out = pb.SurveyTemplate(
        name=TEMPLATE.format(row.id),
        kind=KIND_ENUM[row.kind],
        display_name=row.display_name,
        language=row.language,
        prompt_fa=row.prompt_fa,
        prompt_en=row.prompt_en,
        questions=[_question(q) for q in row.questions],
        dimensions=[_dimension(d) for d in row.dimensions],
        active=row.active,
        etag=etag(row.version),
    )
    set_times(out, row, "create_time", "update_time")
    return out


def _score(level) -> ev_pb.DimensionScore:
    return ev_pb.DimensionScore(
        dimension=level.dimension,
        desired=level.desired,
        adequate=level.adequate,
        predicted=level.predicted,
        perceived=level.perceived or 0,
    )


def survey_to_proto(row, answers=(), levels=()) -> pb.Survey:
    out = pb.Survey(
        name=survey_name(row),
        ticket=TICKET.format(row.ticket_id),
        template=TEMPLATE.format(row.template_id),
        kind=KIND_ENUM[row.kind],
        state=STATE_ENUM[row.state],
        customer=CUSTOMER.format(row.customer_id) if row.customer_id else "",
        agent=_agent(row.agent_id),
        team=TEAM.format(row.team_id) if row.team_id else "",
        language=row.language,
        csat=row.csat or 0,
        comment=row.comment,
        answers=[pb.QuestionAnswer(question=a.question, score=a.score) for a in answers],
        dimensions=[_score(v) for v in levels],
        expectations_given=row.expectations_given,
        message=f"tickets/{row.ticket_id}/messages/{row.message_id}" if row.message_id else "",
    )
    set_times(out, row, "send_time", "answer_time", "expire_time")
    return out


def _names_filter(column, prefix: str, field: str):
    """A filter on a resource name (teams/{id}) or the bare id, over a column of bare ids."""

    def compile_(op: str, value):
        if value is None:
            return column.is_(None) if op == "=" else column.is_not(None)
        if not isinstance(value, str):
            raise ValueError(f"{field} takes a name like {prefix}/…")
        bare = value.removeprefix(prefix + "/")
        if column.type.__class__ is UUID.__class__:
            try:
                bare = str(uuid.UUID(bare))
            except ValueError:
                raise ValueError(f"{field} takes a name like {prefix}/<uuid>") from None
        return column_condition(column, op, bare)

    return compile_


def _enum_values(names: Iterable[str], prefix: str) -> dict[str, str]:
    out = {}
    for n in names:
        out[n] = out[n.upper()] = out[f"{prefix}_{n.upper()}"] = n
    return out


EQ = frozenset({"=", "!="})
SURVEY_FILTERS = FilterSchema(
    FilterField("ticket", _names_filter(s.ticket_id, "tickets", "ticket"), operators=EQ),
    FilterField("customer", _names_filter(s.customer_id, "customers", "customer"), operators=EQ),
    FilterField("agent", _names_filter(s.agent_id, "agents", "agent"), operators=EQ),
    FilterField("team", _names_filter(s.team_id, "teams", "team"), operators=EQ),
    FilterField("kind", s.kind, FieldType.ENUM, enum_values=_enum_values(KINDS, "SURVEY_KIND")),
    FilterField("state", s.state, FieldType.ENUM, enum_values=_enum_values(STATES, "SURVEY_STATE")),
    FilterField("csat", s.csat, FieldType.INT),
    FilterField("send_time", s.send_time, FieldType.TIMESTAMP),
    FilterField("answer_time", s.answer_time, FieldType.TIMESTAMP),
    FilterField("expire_time", s.expire_time, FieldType.TIMESTAMP),
)
SURVEY_SORTABLE = {"send_time": s.send_time, "answer_time": s.answer_time}
TEMPLATE_FILTERS = FilterSchema(
    FilterField("kind", st.kind, FieldType.ENUM, enum_values=_enum_values(KINDS, "SURVEY_KIND")),
    FilterField("language", st.language),
    FilterField("active", st.active, FieldType.BOOL),
)
TEMPLATE_SORTABLE = {"create_time": st.create_time, "display_name": st.display_name}
TEMPLATE_MASK = UpdateMask(
    ["display_name", "language", "prompt_fa", "prompt_en", "questions", "dimensions", "active"],
    immutable={"kind": "create another template instead", "name": "", "etag": "give it in survey_template.etag"},
)


# -- template validation ------------------------------------------------------------------------
def _text(value: str, field: str, limit: int, bad: list, required: bool = False) -> str:
    v = value.strip()
    if required and not v:
        bad.append(FieldViolation(field, "is required"))
    elif len(v) > limit:
        bad.append(FieldViolation(field, f"must be at most {limit} characters"))
    return v


def _keys_ok(key: str, field: str, seen: set, bad: list) -> None:
    if not KEY.fullmatch(key):
        bad.append(FieldViolation(field, "must be 1-40 lower-case letters, digits or '_'"))
    elif key in seen:
        bad.append(FieldViolation(field, f"{key!r} appears twice"))
    seen.add(key)


def check_questions(items, bad: list, where: str = "survey_template.questions") -> list[dict]:
    if len(items) > MAX_QUESTIONS:
        bad.append(FieldViolation(where, f"at most {MAX_QUESTIONS} questions"))
    out, seen = [], set()
    for i, q in enumerate(items):
        f = f"{where}[{i}]"
        _keys_ok(q.key, f"{f}.key", seen, bad)
        out.append(
            {
                "key": q.key,
                "text_fa": _text(q.text_fa, f"{f}.text_fa", 500, bad, required=True),
                "text_en": _text(q.text_en, f"{f}.text_en", 500, bad),
            }
        )
    return out


def check_dimensions(items, bad: list, where: str = "survey_template.dimensions") -> list[dict]:
    if len(items) > MAX_DIMENSIONS:
        bad.append(FieldViolation(where, f"at most {MAX_DIMENSIONS} dimensions"))
    out, seen = [], set()
    for i, d in enumerate(items):
        f = f"{where}[{i}]"
        _keys_ok(d.key, f"{f}.key", seen, bad)
        out.append(
            {
                "key": d.key,
                "label_fa": _text(d.label_fa, f"{f}.label_fa", 200, bad, required=True),
                "label_en": _text(d.label_en, f"{f}.label_en", 200, bad),
                "description_fa": _text(d.description_fa, f"{f}.description_fa", 500, bad),
                "description_en": _text(d.description_en, f"{f}.description_en", 500, bad),
            }
        )
    return out


def _check_kind_content(kind: str, questions: list, dimensions: list, bad: list) -> None:
    if kind == "expectation":
        if not dimensions:
            bad.append(FieldViolation("survey_template.dimensions", "an expectation template needs 1-20 dimensions"))
        if questions:
            bad.append(FieldViolation("survey_template.questions", "an expectation template asks dimensions only"))
    elif kind == "csat" and dimensions:
        bad.append(FieldViolation("survey_template.dimensions", "a CSAT template has questions, not dimensions"))


# -- link texts ---------------------------------------------------------------------------------
TEXTS = {
    ("fa", "csat"): "از شما سپاسگزاریم. لطفاً در یک دقیقه بگویید رسیدگی به درخواست {number} چگونه بود: {url}",
    ("en", "csat"): "Thank you. Please tell us in a minute how we handled request {number}: {url}",
    ("fa", "expectation"): "لطفاً بگویید از پشتیبانی ما در درخواست {number} چه انتظاری دارید: {url}",
    ("en", "expectation"): "Please tell us what you expect from our support on request {number}: {url}",
    ("fa", "perception"): "درخواست {number} انجام شد. لطفاً بگویید خدمتی که گرفتید در هر زمینه چگونه بود: {url}",
    ("en", "perception"): "Request {number} is resolved. Please tell us how the service you got measured up: {url}",
}


# -- the use cases ------------------------------------------------------------------------------
class Surveys:
    def __init__(self, support: Support, settings: Settings | None = None):
        self.support = support
        self.uow = support.uow
        self.settings = settings or Settings.read(support.settings.jwt_secret)
        self.pages = PageTokens(support.settings.jwt_secret, "surveys")
        self.template_pages = PageTokens(support.settings.jwt_secret, "survey_templates")

    # links ------------------------------------------------------------------------------------
    def token(self, row) -> str:
        return make_token(self.settings.secret, str(row.id), row.nonce, row.expire_time)

    def url(self, row) -> str:
        return f"{self.settings.base_url}/v1/surveys/{self.token(row)}"

    # making surveys (in the ticket's transaction) ----------------------------------------------
    @staticmethod
    def _template(conn, kind: str, language: str):
        """The active template of this kind for the language (else any active one of the kind)."""
        return conn.execute(
            sa.select(survey_templates)
            .where(st.kind == kind, st.active)
            .order_by((st.language == language).desc(), st.update_time.desc())
            .limit(1)
        ).one_or_none()

    def create(self, tx, ticket, kind: str, delivery: str):
        """A survey of `kind` for the ticket, or the ticket's open one; (row, created). None
        (and no survey) when no template of the kind is active."""
        conn = tx.conn
        template = self._template(conn, kind, ticket.language)
        if template is None:
            log.warning("no active %s survey template: ticket %s gets no survey", kind, ticket.id)
            return None, False
        now = conn.execute(sa.select(sa.func.now())).scalar()
        expire = now + dt.timedelta(days=self.settings.link_days)
        content = {
            "prompt_fa": template.prompt_fa,
            "prompt_en": template.prompt_en,
            "questions": template.questions,
            "dimensions": template.dimensions,
        }
        resolved = ticket.state in ("resolved", "closed")
        row = conn.execute(
            pg_insert(surveys)
            .values(
                ticket_id=ticket.id,
                template_id=template.id,
                kind=kind,
                nonce=secrets.token_urlsafe(12),
                state="sent",
                language=ticket.language,
                content=content,
                customer_id=ticket.customer_id,
                agent_id=ticket.assignee_id,
                team_id=ticket.team_id,
                perception_open=kind == "expectation" and resolved,
                delivery=delivery,
                send_time=now,
                expire_time=expire,
                create_time=now,
            )
            .on_conflict_do_nothing(index_elements=["ticket_id", "kind"], index_where=s.state == "sent")
            .returning(surveys)
        ).one_or_none()
        if row is None:
            existing = conn.execute(
                sa.select(surveys).where(s.ticket_id == ticket.id, s.kind == kind, s.state == "sent")
            ).one()
            return existing, False
        timers.schedule(conn, EXPIRE, str(row.id), expire)
        if delivery == "pending":
            timers.schedule(conn, DELIVER, str(ticket.id), now)
        return row, True

    # hooks ------------------------------------------------------------------------------------
    def on_opened(self, tx, ticket) -> None:
        if self.settings.expectation_on_open and (ticket.customer_id or ticket.contact_address):
            self.create(tx, ticket, "expectation", "waiting")

    def on_message(self, tx, ticket, message) -> None:
        """The ticket's first agent reply releases a waiting expectation link."""
        if message.kind != "agent" or message.author == AUTHOR:
            return
        released = tx.conn.execute(
            surveys.update()
            .where(s.ticket_id == ticket.id, s.delivery == "waiting", s.state == "sent")
            .values(delivery="pending")
            .returning(s.id)
        ).all()
        if released:
            timers.schedule(tx.conn, DELIVER, str(ticket.id), tx.conn.execute(sa.select(sa.func.now())).scalar())

    def on_changed(self, tx, before, after) -> None:
        if after.state != "resolved" or before.state == "resolved":
            return
        if not (after.customer_id or after.contact_address):
            return
        conn = tx.conn
        self.create(tx, after, "csat", "pending")
        # the open expectation survey now asks the perceived levels, through a renewed link
        now = conn.execute(sa.select(sa.func.now())).scalar()
        expire = now + dt.timedelta(days=self.settings.link_days)
        renewed = conn.execute(
            surveys.update()
            .where(s.ticket_id == after.id, s.kind == "expectation", s.state == "sent")
            .values(
                perception_open=True,
                nonce=secrets.token_urlsafe(12),  # a new link: the first one stops working
                agent_id=after.assignee_id,
                team_id=after.team_id,
                expire_time=expire,
                send_time=now,
                delivery="pending",
            )
            .returning(s.id)
        ).all()
        for r in renewed:
            timers.schedule(conn, EXPIRE, str(r.id), expire)
            timers.schedule(conn, DELIVER, str(after.id), now)

    # timers -----------------------------------------------------------------------------------
    def deliver(self, conn, timer) -> None:
        """Post every pending link of the ticket in one agent reply authored "survey".

        The ticket is locked first and without waiting: this handler holds its timer row, and a
        change holding the ticket (a resolve) may be waiting for that very row (it schedules
        survey.deliver for the same ticket): waiting here was a deadlock that failed the
        change. A held ticket fails the firing instead, and the timer retries it."""
        conn.execute(sa.select(tickets.c.id).where(tickets.c.id == timer.key).with_for_update(nowait=True))
        pending = conn.execute(
            sa.select(surveys)
            .where(s.ticket_id == timer.key, s.delivery == "pending", s.state == "sent")
            .order_by(s.kind)
            .with_for_update()
        ).all()
        if not pending:
            return
        ticket = Tickets.get(conn, timer.key)
        lang = ticket.language if ticket.language in LANGUAGES else "fa"
        lines = []
        for row in pending:
            what = "perception" if row.kind == "expectation" and row.perception_open else row.kind
            lines.append(TEXTS[(lang, what)].format(number=number_text(ticket.number), url=self.url(row)))
        with self.uow.joined(conn) as tx:
            msg, _ = self.support.tickets.add_message(
                tx, ticket.id, "agent", "\n\n".join(lines), author=AUTHOR, actor=AUTHOR
            )
            tx.execute(
                surveys.update().where(s.id.in_([r.id for r in pending])).values(delivery="posted", message_id=msg.id)
            )

    def expire(self, conn, timer) -> None:
        conn.execute(
            surveys.update()
            .where(s.id == timer.key, s.state == "sent", s.expire_time <= sa.func.now())
            .values(state="expired")
        )

    # public -----------------------------------------------------------------------------------
    def _verified(self, conn, token: str, lock: bool = False):
        """The survey the token names, if the token is authentic; its expiry is checked too."""
        if not token:
            raise InvalidArgument.field("token", "is required")
        survey_id = token_survey_id(token)
        q = sa.select(surveys).where(s.id == survey_id)
        row = conn.execute(q.with_for_update() if lock else q).one_or_none()
        if row is None or not token_matches(self.settings.secret, token, row):
            raise Unauthenticated("the survey link is not valid", reason="SURVEY_LINK_INVALID")
        now = conn.execute(sa.select(sa.func.now())).scalar()
        if row.state == "expired" or (row.state == "sent" and row.expire_time <= now):
            raise FailedPrecondition(
                "this survey link has expired",
                reason="SURVEY_EXPIRED",
                metadata={"expire_time": row.expire_time.isoformat()},
            )
        return row

    @staticmethod
    def _asks(row) -> tuple[bool, bool]:
        """(ask expectations, ask perceived) of the survey's next answer."""
        if row.kind != "expectation" or row.state != "sent":
            return False, False
        return not row.expectations_given, row.perception_open

    def _public(self, conn, row) -> pb.PublicSurvey:
        ticket = conn.execute(sa.select(tickets.c.number, tickets.c.subject).where(tickets.c.id == row.ticket_id)).one()
        ask_expectations, ask_perceived = self._asks(row)
        c = row.content
        out = pb.PublicSurvey(
            kind=KIND_ENUM[row.kind],
            state=STATE_ENUM[row.state],
            language=row.language,
            ticket_number=number_text(ticket.number),
            ticket_subject=ticket.subject,
            prompt_fa=c.get("prompt_fa", ""),
            prompt_en=c.get("prompt_en", ""),
            questions=[_question(q) for q in c.get("questions", [])],
            dimensions=[_dimension(d) for d in c.get("dimensions", [])],
            ask_expectations=ask_expectations,
            ask_perceived=ask_perceived,
            complete=row.state != "sent" or (row.kind == "expectation" and not (ask_expectations or ask_perceived)),
        )
        set_times(out, row, "expire_time")
        return out

    def get_by_token(self, token: str) -> pb.PublicSurvey:
        with self.uow.read() as conn:
            return self._public(conn, self._verified(conn, token))

    def submit(self, req: pb.SubmitSurveyRequest) -> pb.PublicSurvey:
        with self.uow.begin() as tx:
            conn = tx.conn
            row = self._verified(conn, req.token, lock=True)
            if row.kind == "csat":
                done = self._submit_csat(tx, row, req)
            else:
                done = self._submit_expectation(tx, row, req)
            if done.state == "answered":
                tx.publish("survey.answered.v1", self._event(conn, done), EVENT_SURVEY.format(done.id))
            return self._public(conn, done)

    @staticmethod
    def _already(row) -> AlreadyExists:
        return AlreadyExists(
            "this survey was already answered; thank you",
            reason="SURVEY_ALREADY_ANSWERED",
            metadata={"answer_time": row.answer_time.isoformat() if row.answer_time else ""},
        )

    def _submit_csat(self, tx, row, req):
        if row.state == "answered":
            raise self._already(row)
        bad: list[FieldViolation] = []
        if not CSAT_MIN <= req.csat <= CSAT_MAX:
            bad.append(FieldViolation("csat", f"is required: {CSAT_MIN}-{CSAT_MAX}"))
        if len(req.comment) > COMMENT_LIMIT:
            bad.append(FieldViolation("comment", f"must be at most {COMMENT_LIMIT} characters"))
        if req.dimensions:
            bad.append(FieldViolation("dimensions", "a CSAT survey has no dimensions"))
        known = {q["key"] for q in row.content.get("questions", [])}
        seen: set[str] = set()
        for i, a in enumerate(req.answers):
            if a.question not in known:
                bad.append(
                    FieldViolation(f"answers[{i}].question", f"is not a question of this survey: {sorted(known)}")
                )
            elif a.question in seen:
                bad.append(FieldViolation(f"answers[{i}].question", f"{a.question!r} is answered twice"))
            seen.add(a.question)
            if not CSAT_MIN <= a.score <= CSAT_MAX:
                bad.append(FieldViolation(f"answers[{i}].score", f"must be {CSAT_MIN}-{CSAT_MAX}"))
        if bad:
            raise InvalidArgument(bad)
        if req.answers:
            tx.execute(
                survey_answers.insert(),
                [{"survey_id": row.id, "question": a.question, "score": a.score} for a in req.answers],
            )
        return tx.execute(
            surveys.update()
            .where(s.id == row.id)
            .values(
                state="answered",
                csat=req.csat,
                comment=req.comment.strip(),
                answer_time=sa.func.now(),
                answer_address=req.client_address[:100],
            )
            .returning(surveys)
        ).one()

    def _submit_expectation(self, tx, row, req):
        ask_expectations, ask_perceived = self._asks(row)
        if not (ask_expectations or ask_perceived):
            if row.state == "answered":
                raise self._already(row)
            raise AlreadyExists(
                "the expectations were given; the perceived levels are asked once the ticket is resolved",
                reason="SURVEY_ALREADY_ANSWERED",
            )
        bad: list[FieldViolation] = []
        if req.csat:
            bad.append(FieldViolation("csat", "an expectation survey has no CSAT; leave it 0"))
        if req.answers:
            bad.append(FieldViolation("answers", "an expectation survey has no questions; give dimensions"))
        if len(req.comment) > COMMENT_LIMIT:
            bad.append(FieldViolation("comment", f"must be at most {COMMENT_LIMIT} characters"))
        order = [d["key"] for d in row.content.get("dimensions", [])]
        stored = {}
        if not ask_expectations:
            stored = {
                v.dimension: v for v in tx.execute(sa.select(expectation_levels).where(el.survey_id == row.id)).all()
            }
        seen: set[str] = set()

        def level(i: int, name: str, value: int, asked: bool) -> None:
            f = f"dimensions[{i}].{name}"
            if asked:
                if not LEVEL_MIN <= value <= LEVEL_MAX:
                    bad.append(FieldViolation(f, f"is required: {LEVEL_MIN}-{LEVEL_MAX}"))
            elif name == "perceived" and value:
                bad.append(FieldViolation(f, "is asked once the ticket is resolved; leave it 0"))

        for i, d in enumerate(req.dimensions):
            if d.dimension not in order:
                bad.append(FieldViolation(f"dimensions[{i}].dimension", f"is not a dimension of this survey: {order}"))
                continue
            if d.dimension in seen:
                bad.append(FieldViolation(f"dimensions[{i}].dimension", f"{d.dimension!r} is given twice"))
                continue
            seen.add(d.dimension)
            for name in ("desired", "adequate", "predicted"):
                value = getattr(d, name)
                if ask_expectations:
                    level(i, name, value, True)
                elif value and value != getattr(stored[d.dimension], name):
                    bad.append(FieldViolation(f"dimensions[{i}].{name}", "was given in the first answer; leave it 0"))
            level(i, "perceived", d.perceived, ask_perceived)
            in_range = LEVEL_MIN <= d.adequate <= LEVEL_MAX and LEVEL_MIN <= d.desired <= LEVEL_MAX
            if ask_expectations and in_range and d.adequate > d.desired:
                bad.append(FieldViolation(f"dimensions[{i}].adequate", "must not be above desired"))
        missing = [k for k in order if k not in seen]
        if missing:
            bad.append(FieldViolation("dimensions", f"every dimension is required; missing: {', '.join(missing)}"))
        if bad:
            raise InvalidArgument(bad)
        given = {d.dimension: d for d in req.dimensions}
        if ask_expectations:
            tx.execute(
                expectation_levels.insert(),
                [
                    {
                        "survey_id": row.id,
                        "dimension": k,
                        "position": n,
                        "desired": given[k].desired,
                        "adequate": given[k].adequate,
                        "predicted": given[k].predicted,
                        "perceived": given[k].perceived if ask_perceived else None,
                    }
                    for n, k in enumerate(order)
                ],
            )
        elif ask_perceived:
            values = sa.values(sa.column("dimension", sa.Text), sa.column("perceived", sa.SmallInteger), name="v").data(
                [(k, given[k].perceived) for k in order]
            )
            tx.execute(
                expectation_levels.update()
                .where(el.survey_id == row.id, el.dimension == values.c.dimension)
                .values(perceived=values.c.perceived)
            )
        values: dict = {"expectations_given": True, "answer_address": req.client_address[:100]}
        if req.comment.strip():
            values["comment"] = req.comment.strip()
        if ask_perceived:
            values.update(state="answered", answer_time=sa.func.now())
        return tx.execute(surveys.update().where(s.id == row.id).values(**values).returning(surveys)).one()

    def _event(self, conn, row) -> ev_pb.SurveyEvent:
        levels = conn.execute(sa.select(expectation_levels).where(el.survey_id == row.id).order_by(el.position)).all()
        e = ev_pb.SurveyEvent(
            survey=EVENT_SURVEY.format(row.id),
            ticket=TICKET.format(row.ticket_id),
            customer=CUSTOMER.format(row.customer_id) if row.customer_id else "",
            agent=_agent(row.agent_id),
            team=TEAM.format(row.team_id) if row.team_id else "",
            kind=row.kind,
            csat=row.csat or 0,
            dimensions=[_score(v) for v in levels],
        )
        e.answer_time.FromDatetime(row.answer_time)
        return e

    # staff: expectation surveys ----------------------------------------------------------------
    def send_expectation(self, parent: str, principal) -> pb.SendExpectationSurveyResponse:
        tid = TICKET.parse(parent, "parent").id
        with self.uow.begin() as tx:
            ticket = Tickets.lock(tx.conn, tid)
            if ticket.state == "closed":
                raise FailedPrecondition(f"ticket {number_text(ticket.number)} is closed", reason="TICKET_CLOSED")
            if not (ticket.customer_id or ticket.contact_address):
                raise FailedPrecondition(
                    f"ticket {number_text(ticket.number)} has no customer or contact to ask", reason="NO_CONTACT"
                )
            row, created = self.create(tx, ticket, "expectation", "pending")
            if row is None:
                raise FailedPrecondition("no expectation survey template is active", reason="NO_ACTIVE_TEMPLATE")
            if not created and row.delivery in ("waiting", ""):
                row = tx.execute(
                    surveys.update().where(s.id == row.id).values(delivery="pending").returning(surveys)
                ).one()
                timers.schedule(tx.conn, DELIVER, str(ticket.id), tx.conn.execute(sa.select(sa.func.now())).scalar())
            if created:
                tx.audit(survey_name(row), "survey.send", principal, [])
        return pb.SendExpectationSurveyResponse(survey=survey_to_proto(row), created=created, url=self.url(row))

    # staff: reading -----------------------------------------------------------------------------
    def _row(self, conn, name: str, field: str = "name"):
        ids = SURVEY.parse(name, field)
        row = conn.execute(sa.select(surveys).where(s.id == ids.survey_id, s.ticket_id == ids.ticket_id)).one_or_none()
        if row is None:
            raise SURVEY.not_found(name)
        return row

    @staticmethod
    def _details(conn, ids: list):
        answers: dict = {}
        levels: dict = {}
        if ids:
            for a in conn.execute(
                sa.select(survey_answers).where(survey_answers.c.survey_id.in_(ids)).order_by(survey_answers.c.question)
            ):
                answers.setdefault(a.survey_id, []).append(a)
            for v in conn.execute(
                sa.select(expectation_levels).where(el.survey_id.in_(ids)).order_by(el.survey_id, el.position)
            ):
                levels.setdefault(v.survey_id, []).append(v)
        return answers, levels

    def get(self, name: str) -> pb.Survey:
        with self.uow.read() as conn:
            row = self._row(conn, name)
            answers, levels = self._details(conn, [row.id])
        return survey_to_proto(row, answers.get(row.id, ()), levels.get(row.id, ()))

    def list(self, req: pb.ListSurveysRequest) -> tuple[list[pb.Survey], str]:
        limit = page_size(req.page_size)
        where = SURVEY_FILTERS.compile(req.filter)
        keys = parse_order_by(req.order_by.strip() or "send_time desc", SURVEY_SORTABLE)
        order = with_tiebreaker(keys, s.id, descending=keys[-1].descending)
        purpose = query_fingerprint(req.filter, req.order_by)
        with self.uow.read() as conn:
            rows, token = keyset_page(
                conn, sa.select(surveys).where(where), order, self.pages, purpose, limit, req.page_token
            )
            answers, levels = self._details(conn, [r.id for r in rows])
        return [survey_to_proto(r, answers.get(r.id, ()), levels.get(r.id, ())) for r in rows], token

    def expectation_result(self, name: str) -> pb.ExpectationResult:
        with self.uow.read() as conn:
            row = self._row(conn, name)
            if row.kind != "expectation":
                raise FailedPrecondition(f"{name} is a CSAT survey", reason="NOT_AN_EXPECTATION_SURVEY")
            _, levels = self._details(conn, [row.id])
        labels = {d["key"]: d for d in row.content.get("dimensions", [])}
        out = pb.ExpectationResult(survey=name)
        for v in levels.get(row.id, ()):
            z = zone_of(v.dimension, v.desired, v.adequate, v.predicted, v.perceived)
            label = labels.get(v.dimension, {})
            out.dimensions.append(
                pb.DimensionResult(
                    dimension=v.dimension,
                    label_fa=label.get("label_fa", ""),
                    label_en=label.get("label_en", ""),
                    levels=_score(v),
                    zone_width=z.width,
                    predicted_position=POSITION_ENUM[z.predicted_position],
                    perceived_position=POSITION_ENUM[z.perceived_position],
                    msa=z.msa or 0,
                    mss=z.mss or 0,
                    predicted_msa=z.predicted_msa,
                    predicted_mss=z.predicted_mss,
                )
            )
        return out

    @staticmethod
    def _period(req, bad: list) -> tuple[dt.datetime | None, dt.datetime | None, str | None]:
        start = req.start_time.ToDatetime(tzinfo=dt.UTC) if req.HasField("start_time") else None
        end = req.end_time.ToDatetime(tzinfo=dt.UTC) if req.HasField("end_time") else None
        if start is None:
            bad.append(FieldViolation("start_time", "is required"))
        if end is None:
            bad.append(FieldViolation("end_time", "is required"))
        if start and end and end <= start:
            bad.append(FieldViolation("end_time", "must be after start_time"))
        team = None
        if req.team:
            try:
                team = TEAM.parse(req.team, "team").team_id
            except InvalidArgument as e:
                bad.extend(e.violations)
        return start, end, team

    def summarize_expectations(self, req: pb.SummarizeExpectationsRequest) -> pb.ExpectationSummary:
        bad: list[FieldViolation] = []
        start, end, team = self._period(req, bad)
        if bad:
            raise InvalidArgument(bad)
        where = [
            s.kind == "expectation",
            s.state == "answered",
            s.answer_time >= start,
            s.answer_time < end,
            el.perceived.is_not(None),
        ]
        if team:
            where.append(s.team_id == team)
        n = sa.func.count()

        def share(cond):
            return sa.cast(sa.func.count().filter(cond), sa.Float) / n

        q = (
            sa.select(
                el.dimension,
                n.label("count"),
                sa.func.avg(el.desired).label("desired"),
                sa.func.avg(el.adequate).label("adequate"),
                sa.func.avg(el.predicted).label("predicted"),
                sa.func.avg(el.perceived).label("perceived"),
                sa.func.avg(el.desired - el.adequate).label("width"),
                sa.func.avg(el.perceived - el.adequate).label("msa"),
                sa.func.avg(el.perceived - el.desired).label("mss"),
                share(el.perceived < el.adequate).label("p_below"),
                share(el.perceived.between(el.adequate, el.desired)).label("p_in"),
                share(el.perceived > el.desired).label("p_above"),
                share(el.predicted < el.adequate).label("r_below"),
                share(el.predicted.between(el.adequate, el.desired)).label("r_in"),
                share(el.predicted > el.desired).label("r_above"),
            )
            .select_from(expectation_levels.join(surveys, s.id == el.survey_id))
            .where(*where)
            .group_by(el.dimension)
            .order_by(el.dimension)
        )
        count_q = sa.select(sa.func.count(sa.distinct(s.id))).select_from(
            expectation_levels.join(surveys, s.id == el.survey_id)
        )
        with self.uow.read() as conn:
            rows = conn.execute(q).all()
            total = conn.execute(count_q.where(*where)).scalar() or 0
        return pb.ExpectationSummary(
            survey_count=total,
            dimensions=[
                pb.DimensionSummary(
                    dimension=r.dimension,
                    count=r.count,
                    desired=float(r.desired),
                    adequate=float(r.adequate),
                    predicted=float(r.predicted),
                    perceived=float(r.perceived),
                    zone_width=float(r.width),
                    msa=float(r.msa),
                    mss=float(r.mss),
                    perceived_shares=pb.ZoneShares(below=r.p_below, within=r.p_in, above=r.p_above),
                    predicted_shares=pb.ZoneShares(below=r.r_below, within=r.r_in, above=r.r_above),
                )
                for r in rows
            ],
        )

    def summarize_csat(self, req: pb.SummarizeCsatRequest) -> pb.CsatSummary:
        bad: list[FieldViolation] = []
        start, end, team = self._period(req, bad)
        if bad:
            raise InvalidArgument(bad)
        where = [s.kind == "csat", s.state == "answered", s.answer_time >= start, s.answer_time < end]
        if team:
            where.append(s.team_id == team)
        cols = [
            sa.func.count().label("count"),
            sa.func.avg(s.csat).label("average"),
            *(sa.func.count().filter(s.csat == k).label(f"n{k}") for k in range(1, 6)),
        ]

        def group(r, name: str) -> pb.CsatGroup:
            dist = [getattr(r, f"n{k}") for k in range(1, 6)]
            return pb.CsatGroup(
                group=name,
                count=r.count,
                average=float(r.average or 0),
                distribution=dist,
                satisfied_share=(dist[3] + dist[4]) / r.count if r.count else 0.0,
            )

        with self.uow.read() as conn:
            agents = conn.execute(
                sa.select(s.agent_id, *cols).where(*where).group_by(s.agent_id).order_by(sa.desc("count"), s.agent_id)
            ).all()
            teams = conn.execute(
                sa.select(s.team_id, *cols).where(*where).group_by(s.team_id).order_by(sa.desc("count"), s.team_id)
            ).all()
            overall = conn.execute(sa.select(*cols).where(*where)).one()
        return pb.CsatSummary(
            agents=[group(r, _agent(r.agent_id)) for r in agents],
            teams=[group(r, TEAM.format(r.team_id) if r.team_id else "") for r in teams],
            overall=group(overall, ""),
        )

    # staff: templates ----------------------------------------------------------------------------
    @staticmethod
    def _deactivate_others(conn, kind: str, language: str, keep=None) -> None:
        q = survey_templates.update().where(st.kind == kind, st.language == language, st.active)
        if keep is not None:
            q = q.where(st.id != keep)
        conn.execute(q.values(active=False, version=st.version + 1, update_time=sa.func.now()))

    def create_template(self, t: pb.SurveyTemplate, request_id: str, principal) -> pb.SurveyTemplate:
        bad: list[FieldViolation] = []
        if len(request_id) > 128:
            bad.append(FieldViolation("request_id", "must be at most 128 characters"))
        kind = KIND_OF.get(t.kind)
        if kind is None:
            bad.append(
                FieldViolation("survey_template.kind", "is required: SURVEY_KIND_CSAT or SURVEY_KIND_EXPECTATION")
            )
        name = _text(t.display_name, "survey_template.display_name", 200, bad, required=True)
        language = t.language.strip() or "fa"
        if language not in LANGUAGES:
            bad.append(FieldViolation("survey_template.language", f"must be one of {', '.join(LANGUAGES)}"))
        prompt_fa = _text(t.prompt_fa, "survey_template.prompt_fa", 1000, bad)
        prompt_en = _text(t.prompt_en, "survey_template.prompt_en", 1000, bad)
        questions = check_questions(t.questions, bad)
        dimensions = check_dimensions(t.dimensions, bad)
        if kind:
            _check_kind_content(kind, questions, dimensions, bad)
        if bad:
            raise InvalidArgument(bad)
        with self.uow.begin() as tx:
            if request_id:
                seen = tx.execute(sa.select(survey_templates).where(st.request_id == request_id)).one_or_none()
                if seen is not None:
                    return template_to_proto(seen)
            if t.active:
                self._deactivate_others(tx.conn, kind, language)
            row = tx.execute(
                survey_templates.insert()
                .values(
                    kind=kind,
                    display_name=name,
                    language=language,
                    prompt_fa=prompt_fa,
                    prompt_en=prompt_en,
                    questions=questions,
                    dimensions=dimensions,
                    active=t.active,
                    request_id=request_id or None,
                )
                .returning(survey_templates)
            ).one()
            tx.audit(TEMPLATE.format(row.id), "survey_template.create", principal, [])
        return template_to_proto(row)

    def _template_row(self, conn, name: str, field: str = "name", lock: bool = False):
        tid = TEMPLATE.parse(name, field).id
        q = sa.select(survey_templates).where(st.id == tid)
        row = conn.execute(q.with_for_update() if lock else q).one_or_none()
        if row is None:
            raise TEMPLATE.not_found(name)
        return row

    def get_template(self, name: str) -> pb.SurveyTemplate:
        with self.uow.read() as conn:
            return template_to_proto(self._template_row(conn, name))

    def list_templates(self, req: pb.ListSurveyTemplatesRequest):
        limit = page_size(req.page_size)
        where = TEMPLATE_FILTERS.compile(req.filter)
        keys = parse_order_by(req.order_by.strip() or "create_time desc", TEMPLATE_SORTABLE)
        order = with_tiebreaker(keys, st.id, descending=keys[-1].descending)
        purpose = query_fingerprint(req.filter, req.order_by)
        with self.uow.read() as conn:
            rows, token = keyset_page(
                conn,
                sa.select(survey_templates).where(where),
                order,
                self.template_pages,
                purpose,
                limit,
                req.page_token,
            )
        return [template_to_proto(r) for r in rows], token

    def update_template(self, t: pb.SurveyTemplate, mask, principal) -> pb.SurveyTemplate:
        paths = TEMPLATE_MASK.paths(mask)
        bad: list[FieldViolation] = []
        new: dict = {}
        for p in paths:
            f = f"survey_template.{p}"
            if p == "display_name":
                new[p] = _text(t.display_name, f, 200, bad, required=True)
            elif p == "language":
                new[p] = t.language.strip() or "fa"
                if new[p] not in LANGUAGES:
                    bad.append(FieldViolation(f, f"must be one of {', '.join(LANGUAGES)}"))
            elif p in ("prompt_fa", "prompt_en"):
                new[p] = _text(getattr(t, p), f, 1000, bad)
            elif p == "questions":
                new[p] = check_questions(t.questions, bad)
            elif p == "dimensions":
                new[p] = check_dimensions(t.dimensions, bad)
            elif p == "active":
                new[p] = t.active
        if bad:
            raise InvalidArgument(bad)
        with self.uow.begin() as tx:
            row = self._template_row(tx.conn, t.name, "survey_template.name", lock=True)
            check_etag(t.etag, row.version, t.name)
            merged = {**row._mapping, **new}
            _check_kind_content(row.kind, merged["questions"], merged["dimensions"], bad)
            if bad:
                raise InvalidArgument(bad)
            changed = [p for p in paths if row._mapping[p] != new[p]]
            if not changed:
                return template_to_proto(row)
            if merged["active"]:
                self._deactivate_others(tx.conn, row.kind, merged["language"], keep=row.id)
            row = tx.execute(
                survey_templates.update()
                .where(st.id == row.id)
                .values(**{p: new[p] for p in changed}, version=st.version + 1, update_time=sa.func.now())
                .returning(survey_templates)
            ).one()
            tx.audit(t.name, "survey_template.update", principal, [{"field": p} for p in changed])
        return template_to_proto(row)

    def delete_template(self, req: pb.DeleteSurveyTemplateRequest, principal) -> None:
        with self.uow.begin() as tx:
            row = self._template_row(tx.conn, req.name, lock=True)
            check_etag(req.etag, row.version, req.name)
            used = tx.execute(sa.select(sa.exists().where(s.template_id == row.id))).scalar()
            if used:
                raise FailedPrecondition(
                    f"{req.name} was used by surveys; deactivate it instead", reason="SURVEY_TEMPLATE_IN_USE"
                )
            tx.execute(survey_templates.delete().where(st.id == row.id))
            tx.audit(req.name, "survey_template.delete", principal, [])


class SurveyServicer(surveys_pb2_grpc.SurveyServiceServicer):
    def __init__(self, uc: Surveys):
        self.uc = uc

    def GetSurveyByToken(self, request, context):
        return self.uc.get_by_token(request.token)

    def SubmitSurvey(self, request, context):
        return self.uc.submit(request)

    def SendExpectationSurvey(self, request, context):
        return self.uc.send_expectation(request.parent, current_principal())

    def GetSurvey(self, request, context):
        return self.uc.get(request.name)

    def ListSurveys(self, request, context):
        items, token = self.uc.list(request)
        return pb.ListSurveysResponse(surveys=items, next_page_token=token)

    def GetExpectationResult(self, request, context):
        return self.uc.expectation_result(request.name)

    def SummarizeExpectations(self, request, context):
        return self.uc.summarize_expectations(request)

    def SummarizeCsat(self, request, context):
        return self.uc.summarize_csat(request)

    def CreateSurveyTemplate(self, request, context):
        return self.uc.create_template(request.survey_template, request.request_id, current_principal())

    def GetSurveyTemplate(self, request, context):
        return self.uc.get_template(request.name)

    def ListSurveyTemplates(self, request, context):
        items, token = self.uc.list_templates(request)
        return pb.ListSurveyTemplatesResponse(survey_templates=items, next_page_token=token)

    def UpdateSurveyTemplate(self, request, context):
        return self.uc.update_template(request.survey_template, request.update_mask, current_principal())

    def DeleteSurveyTemplate(self, request, context):
        self.uc.delete_template(request, current_principal())
        return empty_pb2.Empty()


# -- the part -----------------------------------------------------------------------------------
def use_cases(support: Support) -> Surveys:
    return support.once("surveys", lambda: Surveys(support))


def install(support: Support) -> None:
    uc = use_cases(support)
    support.hooks.opened.append(uc.on_opened)
    support.hooks.message.append(uc.on_message)
    support.hooks.changed.append(uc.on_changed)


def registration(support: Support) -> Registration:
    return Registration.of(SurveyServicer(use_cases(support)))


def timer_handlers(support: Support) -> None:
    uc = use_cases(support)
    support.timers.register(DELIVER, uc.deliver)
    support.timers.register(EXPIRE, uc.expire)
