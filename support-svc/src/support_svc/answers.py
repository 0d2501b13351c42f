"""AnswerService (proto/crm/support/v1/answers.proto): canned answers (reply templates filled
from a ticket), replies made from them, and suggestions of answers and articles for a ticket.

Templates, in one place:
- a body is a Jinja2 template run by a `jinja2.sandbox.SandboxedEnvironment` subclass
  (`Sandbox`): autoescape off (plain text), StrictUndefined (`Missing`, whose message names the
  placeholder), no globals (range, cycler, joiner, lipsum, namespace, dict are gone), only the
  filters in FILTERS, every call refused, `*`/`**` sizes bounded and `str % x` refused;
- `check_template` runs on create and update: a syntax error is INVALID_ARGUMENT on
  canned_answer.body with its line; so is any node outside ALLOWED_NODES (loops, assignments,
  macros, includes, calls), an attribute starting with "_", an unknown filter and an unknown
  placeholder. Without loops or assignments a template's work is bounded by its size;
- the placeholders (PLACEHOLDERS) come from the ticket, its customer (customer_refs, else
  the sender's name on the ticket), the caller (agents.display_name) and the database clock
  (Asia/Tehran); a placeholder without a value for this ticket is left undefined, so
  `{{ customer.name | default("مشتری گرامی") }}` falls back and a bare `{{ customer.name }}`
  is INVALID_ARGUMENT naming it;
- rendering counts a use (usage_count, last_use_time) in the transaction that rendered it; a
  use is not an edit (the version and etag stay).

Suggestions: one query for the answers and one for the articles, both ranked with ts_rank of
the ticket's words (subject + first customer message, normalised, stop words dropped, any
word, prefixes) over the search vectors of knowledge.py; answers of the ticket's category
first, answers scoped to other categories left out; articles whose KB category serves the
ticket's category first.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import sqlalchemy as sa
from google.protobuf import empty_pb2
from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, nodes
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.utils import missing
from sqlalchemy.dialects import postgresql as pg

from crm.support.v1 import answers_pb2 as pb
from crm.support.v1 import answers_pb2_grpc
from crm_chassis import templating
from crm_chassis.auth import Principal
from crm_chassis.dates import TEHRAN, set_times
from crm_chassis.errors import FailedPrecondition, FieldViolation, InvalidArgument
from crm_chassis.filtering import (
    FieldType,
    FilterField,
    FilterSchema,
    keyset_page,
    parse_order_by,
    query_fingerprint,
    with_tiebreaker,
)
from crm_chassis.grpc_server import Registration
from crm_chassis.interceptors import current_principal
from crm_chassis.pagination import PageTokens, page_size
from crm_chassis.persian import format_jalali, to_persian_digits
from crm_chassis.resources import ResourceName, UpdateMask, changes, check_etag, etag, same_requester

from . import knowledge as kb
from .runtime import Support
from .tables import TEXTS, agents, customer_refs, metadata, ticket_messages, tickets
from .tables import UUID as UUID_TYPE
from .ticketing import BODY_LIMIT, TICKET, Tickets, message_to_proto, number_text

CANNED_ANSWER = ResourceName("cannedAnswers/{canned_answer_id}")
CATEGORY = kb.CATEGORY

TITLE_LIMIT = 200
TEMPLATE_LIMIT = 20_000
SUGGEST_DEFAULT, SUGGEST_MAX = 5, 20
FIELD = "canned_answer"
BODY_FIELD = "canned_answer.body"

canned_answers = sa.Table(
    "canned_answers",
    metadata,
    sa.Column("id", UUID_TYPE, primary_key=True, server_default=sa.text("gen_random_uuid()")),
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("body", sa.Text, nullable=False),  # the Jinja2 template
    # the ticket categories it is for; empty: every category
    sa.Column("category_ids", pg.ARRAY(UUID_TYPE), nullable=False, server_default="{}"),
    sa.Column("language", sa.Text, nullable=False, server_default="fa"),
    sa.Column("tags", TEXTS, nullable=False, server_default="{}"),
    sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("usage_count", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("last_use_time", sa.DateTime(timezone=True)),
    sa.Column("creator", sa.Text, nullable=False, server_default=""),
    sa.Column("request_id", sa.Text),
    *kb.search_columns(),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)
ca = canned_answers.c
kb.search_indexes(canned_answers)
sa.Index("canned_answers_page", ca.create_time.desc(), ca.id.desc())
sa.Index("canned_answers_categories", ca.category_ids, postgresql_using="gin")
sa.Index("canned_answers_request_id", ca.request_id, unique=True, postgresql_where=ca.request_id.isnot(None))
COLUMNS = [c for c in canned_answers.c if c.name != "search_vector"]

# -- templates ------------------------------------------------------------------------------------
PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "ticket": ("number", "subject", "state", "priority", "create_date_jalali"),
    "customer": ("name",),
    "agent": ("name",),
    "today_jalali": (),
}
PLACEHOLDER_LIST = ", ".join(f"{g}.{f}" if f else g for g, fs in PLACEHOLDERS.items() for f in (fs or ("",)))

LABELS = {
    "fa": {
        "new": "جدید",
        "open": "در حال بررسی",
        "waiting_on_customer": "در انتظار پاسخ شما",
        "waiting_on_third_party": "در انتظار واحد مرتبط",
        "resolved": "حل‌شده",
        "closed": "بسته‌شده",
        "reopened": "بازگشایی‌شده",
        "low": "کم",
        "normal": "عادی",
        "high": "زیاد",
        "urgent": "فوری",
    },
    "en": {
        "new": "new",
        "open": "in progress",
        "waiting_on_customer": "waiting for your reply",
        "waiting_on_third_party": "waiting on a third party",
        "resolved": "resolved",
        "closed": "closed",
        "reopened": "reopened",
        "low": "low",
        "normal": "normal",
        "high": "high",
        "urgent": "urgent",
    },
}

# What a template may contain: output, literals, placeholders, filters, tests, if/else and
# operators. Not loops, assignments, macros, blocks, includes, imports or calls.
ALLOWED_NODES = (
    nodes.Template,
    nodes.Output,
    nodes.TemplateData,
    nodes.Const,
    nodes.Name,
    nodes.Getattr,
    nodes.Getitem,
    nodes.Slice,
    nodes.Filter,
    nodes.FilterBlock,
    nodes.Test,
    nodes.If,
    nodes.CondExpr,
    nodes.And,
    nodes.Or,
    nodes.Not,
    nodes.Compare,
    nodes.Operand,
    nodes.Concat,
    nodes.Add,
    nodes.Sub,
    nodes.Mul,
    nodes.Div,
    nodes.FloorDiv,
    nodes.Mod,
    nodes.Pow,
    nodes.Neg,
    nodes.Pos,
    nodes.Tuple,
    nodes.List,
    nodes.Dict,
    nodes.Pair,
    nodes.Keyword,
)
NODE_WORDS = {
    "For": "{% for %} loops",
    "Assign": "{% set %}",
    "AssignBlock": "{% set %}",
    "Macro": "{% macro %}",
    "CallBlock": "{% call %}",
    "Call": "function and method calls (use filters)",
    "Include": "{% include %}",
    "Import": "{% import %}",
    "FromImport": "{% import %}",
    "Extends": "{% extends %}",
    "Block": "{% block %}",
    "With": "{% with %}",
}

FILTERS = [
    "default",
    "d",
    "upper",
    "lower",
    "title",
    "capitalize",
    "trim",
    "truncate",
    "length",
    "count",
    "first",
    "last",
    "string",
    "int",
    "float",
    "abs",
    "round",
    "striptags",
    "wordcount",
]


class Missing(StrictUndefined):
    """StrictUndefined whose error names the placeholder (ticket.foo, customer.name)."""

    __slots__ = ()

    @property
    def _undefined_message(self) -> str:
        if self._undefined_hint:
            return self._undefined_hint
        name = self._undefined_name
        obj = self._undefined_obj
        path = name if obj is missing else f"{getattr(obj, '_path', type(obj).__name__)}.{name}"
        group, _, field = path.partition(".")
        if field in PLACEHOLDERS.get(group, ()):
            return f'{path} has no value for this ticket; give a fallback: {{{{ {path} | default("…") }}}}'
        return f"{path} is not a placeholder; the placeholders are {PLACEHOLDER_LIST}"


class Group(dict):
    """The fields of one placeholder group (ticket, customer, agent); `_path` names it in errors
    and is out of a template's reach (the sandbox hides attributes starting with _)."""

    def __init__(self, path: str, values: dict):
        super().__init__(values)
        self._path = path


class Sandbox(templating.Sandbox):
    what = "a canned answer"


def _environment() -> Sandbox:
    env = Sandbox(
        autoescape=False,
        undefined=Missing,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        auto_reload=False,
    )
    builtin = env.filters
    # the whitelist, and the sandbox's own loop counter (templating: every for-loop reads through it)
    env.filters = {name: builtin[name] for name in (*FILTERS, templating.LOOP_FILTER)}
    env.filters["persian_digits"] = to_persian_digits
    env.globals = {}
    return env


ENV = _environment()


def _line(node: nodes.Node) -> str:
    return f"line {node.lineno}: "


def check_template(body: str, field: str = BODY_FIELD) -> list[FieldViolation]:
    """Why the template may not be stored (empty list: it may)."""
    try:
        tree = ENV.parse(body)
    except TemplateSyntaxError as e:
        return [FieldViolation(field, f"line {e.lineno}: {e.message}")]
    except RecursionError:
        return [FieldViolation(field, "is nested too deeply")]
    bad: list[str] = []

    def walk(node: nodes.Node, parent: nodes.Node | None) -> None:
        if not isinstance(node, ALLOWED_NODES):
            kind = type(node).__name__
            bad.append(f"{_line(node)}{NODE_WORDS.get(kind, kind)} is not allowed in a canned answer")
            return
        if isinstance(node, nodes.Getattr) and node.attr.startswith("_"):
            bad.append(f"{_line(node)}{node.attr} is not allowed (templates may not reach Python internals)")
            return
        if isinstance(node, nodes.Getattr) and not isinstance(node.node, nodes.Name):
            bad.append(f"{_line(node)}.{node.attr}: only the placeholder groups have fields (use filters on values)")
            return
        key = node.arg.value if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) else None
        if isinstance(key, str) and key.startswith("_"):
            bad.append(f"{_line(node)}{key} is not allowed (templates may not reach Python internals)")
            return
        if isinstance(node, nodes.Filter) and node.name not in ENV.filters:
            bad.append(f"{_line(node)}the filter {node.name} is not available; filters: {', '.join(ENV.filters)}")
        if isinstance(node, nodes.Name):
            problem = _name_problem(node, parent)
            if problem:
                bad.append(f"{_line(node)}{problem}")
        for child in node.iter_child_nodes():
            walk(child, node)

    try:
        walk(tree, None)
    except RecursionError:
        return [FieldViolation(field, "is nested too deeply")]
    if not bad:  # a trial run with every placeholder filled: what only running shows (9 ** 9 ** 9)
        try:
            render(body, SAMPLE)
        except InvalidArgument as e:
            bad += [v.description for v in e.violations]
    return [FieldViolation(field, b) for b in dict.fromkeys(bad)]


def _name_problem(node: nodes.Name, parent: nodes.Node | None) -> str:
    group = node.name
    if group not in PLACEHOLDERS:
        return f"{group} is not a placeholder; the placeholders are {PLACEHOLDER_LIST}"
    fields = PLACEHOLDERS[group]
    field = None
    if isinstance(parent, nodes.Getattr) and parent.node is node:
        field = parent.attr
    elif isinstance(parent, nodes.Getitem) and parent.node is node and isinstance(parent.arg, nodes.Const):
        field = parent.arg.value
    if not fields:
        return f"{group}.{field} is not a placeholder ({group} has no fields)" if field is not None else ""
    if field is None:
        return f"{group} is a group: use one of {', '.join(f'{group}.{f}' for f in fields)}"
    if field not in fields:
        return f"{group}.{field} is not a placeholder; the placeholders are {PLACEHOLDER_LIST}"
    return ""


SAMPLE = {
    "ticket": Group(
        "ticket",
        {"number": "T-000001", "subject": "—", "state": "—", "priority": "—", "create_date_jalali": "1405/01/01"},
    ),
    "customer": Group("customer", {"name": "—"}),
    "agent": Group("agent", {"name": "—"}),
    "today_jalali": "1405/01/01",
}


@functools.lru_cache(maxsize=512)
def compiled(body: str):
    return ENV.from_string(body)


def render(body: str, values: dict) -> str:
    """The template filled with `values`; INVALID_ARGUMENT on canned_answer.body (naming the
    placeholder, or why the sandbox refused) for anything that goes wrong."""
    try:
        text = compiled(body).render(values)
    except TemplateSyntaxError as e:
        raise InvalidArgument.field(BODY_FIELD, f"line {e.lineno}: {e.message}") from None
    except SecurityError as e:
        raise InvalidArgument.field(BODY_FIELD, f"refused by the sandbox: {e}") from None
    except UndefinedError as e:
        raise InvalidArgument.field(BODY_FIELD, str(e)) from None
    except RecursionError:
        raise InvalidArgument.field(BODY_FIELD, "is nested too deeply") from None
    except (TemplateError, ArithmeticError, TypeError, ValueError, LookupError, AttributeError) as e:
        raise InvalidArgument.field(BODY_FIELD, f"the template failed: {type(e).__name__}: {e}") from None
    if len(text) > BODY_LIMIT:
        raise InvalidArgument.field(BODY_FIELD, f"the text would be longer than {BODY_LIMIT:,} characters")
    return text


def placeholder_values(t, customer_name: str, agent_name: str, local_now, language: str) -> dict:
    """The values of the placeholders for ticket row `t` (a name missing stays undefined)."""
    labels = LABELS.get(language, LABELS["en"])
    persian = language == "fa"
    opened = t.create_time.astimezone(TEHRAN).date()
    return {
        "ticket": Group(
            "ticket",
            {
                "number": number_text(t.number),
                "subject": t.subject,
                "state": labels.get(t.state, t.state),
                "priority": labels.get(t.priority, t.priority),
                "create_date_jalali": format_jalali(opened, persian_digits=persian),
            },
        ),
        "customer": Group("customer", {"name": customer_name} if customer_name else {}),
        "agent": Group("agent", {"name": agent_name} if agent_name else {}),
        "today_jalali": format_jalali(local_now.date(), persian_digits=persian),
    }


# -- conversions, filters ---------------------------------------------------------------------------
def to_proto(row) -> pb.CannedAnswer:
    out = pb.CannedAnswer(
        name=CANNED_ANSWER.format(row.id),
        title=row.title,
        body=row.body,
        categories=[CATEGORY.format(c) for c in row.category_ids],
        language=row.language,
        tags=list(row.tags),
        active=row.active,
        usage_count=row.usage_count,
        creator=row.creator,
        etag=etag(row.version),
    )
    set_times(out, row, "last_use_time", "create_time", "update_time")
    return out


def _category_filter(op: str, value):
    if op not in ("=", "!="):
        raise ValueError("category takes only = and !=")
    if not isinstance(value, str) or not CATEGORY.matches(value):
        raise ValueError("category takes a name like 'categories/…'")
    cid = value.split("/", 1)[1]
    cond = sa.or_(
        sa.func.cardinality(ca.category_ids) == 0, ca.category_ids.contains(sa.cast([cid], pg.ARRAY(UUID_TYPE)))
    )
    return cond if op == "=" else sa.not_(cond)


FILTERS_SCHEMA = FilterSchema(
    FilterField("title", ca.title),
    FilterField("language", ca.language),
    FilterField("active", ca.active, FieldType.BOOL),
    FilterField("tags", ca.tags, FieldType.STRING_ARRAY),
    FilterField("category", _category_filter, operators=frozenset({"=", "!="})),
    FilterField("usage_count", ca.usage_count, FieldType.INT),
    FilterField("create_time", ca.create_time, FieldType.TIMESTAMP),
    FilterField("update_time", ca.update_time, FieldType.TIMESTAMP),
)
SORTABLE = {
    "title": ca.title,
    "usage_count": ca.usage_count,
    "create_time": ca.create_time,
    "update_time": ca.update_time,
}
MASK = UpdateMask(
    ["title", "body", "categories", "language", "tags", "active"],
    immutable={"usage_count": "counted by RenderCannedAnswer", "creator": ""},
)
COLUMN_OF = {"categories": "category_ids"}


@dataclass
class Rendered:
    text: str
    answer: object  # the canned_answers row after the use


# -- the use cases ------------------------------------------------------------------------------------
class Answers:
    def __init__(self, support: Support):
        self.support = support
        self.uow = support.uow
        self.tokens = PageTokens(support.settings.jwt_secret, "canned_answers")

    def _values(self, conn, a: pb.CannedAnswer, paths, create: bool = False) -> dict:
        bad: list[FieldViolation] = []
        values: dict = {}
        if "title" in paths:
            values["title"] = kb.check_text(a.title, f"{FIELD}.title", TITLE_LIMIT, bad, True)
        if "body" in paths:
            if not a.body.strip():
                bad.append(FieldViolation(BODY_FIELD, "is required"))
            elif len(a.body) > TEMPLATE_LIMIT:
                bad.append(FieldViolation(BODY_FIELD, f"must be at most {TEMPLATE_LIMIT:,} characters"))
            else:
                bad += check_template(a.body)
            values["body"] = a.body
        if "language" in paths:
            values["language"] = kb.check_language(a.language, f"{FIELD}.language", bad)
        if "tags" in paths:
            values["tags"] = kb.check_tags(a.tags, f"{FIELD}.tags", bad)
        if "active" in paths:
            values["active"] = a.active if (a.HasField("active") or not create) else True
        if bad:
            raise InvalidArgument(bad)
        if "categories" in paths:
            values["category_ids"] = kb.ticket_categories(conn, a.categories, f"{FIELD}.categories")
        return values

    # create / read / update / delete ------------------------------------------------------------
    def create(self, a: pb.CannedAnswer, request_id: str, principal: Principal) -> pb.CannedAnswer:
        if len(request_id) > kb.REQUEST_ID_LIMIT:
            raise InvalidArgument.field("request_id", f"must be at most {kb.REQUEST_ID_LIMIT} characters")
        try:
            with self.uow.begin() as tx:
                if request_id:
                    existing = tx.execute(sa.select(*COLUMNS).where(ca.request_id == request_id)).one_or_none()
                    if existing is not None:
                        return self._same_caller(existing, principal)
                values = self._values(tx.conn, a, MASK.updatable, create=True)
                row = tx.execute(
                    canned_answers.insert()
                    .values(
                        **values,
                        **kb.search_values(values["title"], values["body"]),
                        creator=principal.subject,
                        request_id=request_id or None,
                    )
                    .returning(*COLUMNS)
                ).one()
                tx.audit(CANNED_ANSWER.format(row.id), "canned_answer.create", principal, [])
        except sa.exc.IntegrityError:
            if request_id:
                with self.uow.read() as conn:
                    existing = conn.execute(sa.select(*COLUMNS).where(ca.request_id == request_id)).one()
                return self._same_caller(existing, principal)
            raise
        return to_proto(row)

    @staticmethod
    def _same_caller(row, principal: Principal):
        same_requester(row.creator, principal, "canned answer")
        return to_proto(row)

    def get(self, name: str) -> pb.CannedAnswer:
        aid = CANNED_ANSWER.parse(name).id
        with self.uow.read() as conn:
            row = CANNED_ANSWER.one(conn, sa.select(*COLUMNS).where(ca.id == aid), name)
        return to_proto(row)

    def list(self, req: pb.ListCannedAnswersRequest):
        limit = page_size(req.page_size)
        where = FILTERS_SCHEMA.compile(req.filter)
        keys = parse_order_by(req.order_by.strip() or "create_time desc", SORTABLE)
        order = with_tiebreaker(keys, ca.id, descending=keys[-1].descending)
        with self.uow.read() as conn:
            rows, token = keyset_page(
                conn,
                sa.select(*COLUMNS).where(where),
                order,
                self.tokens,
                query_fingerprint(req.filter, req.order_by),
                limit,
                req.page_token,
            )
        return [to_proto(r) for r in rows], token

    def _locked(self, conn, name: str, field: str = "name"):
        aid = CANNED_ANSWER.parse(name, field).id
        row = CANNED_ANSWER.one(conn, sa.select(*COLUMNS).where(ca.id == aid).with_for_update(), name)
        return row

    def update(self, a: pb.CannedAnswer, mask, principal: Principal) -> pb.CannedAnswer:
        paths = MASK.paths(mask)
        with self.uow.begin() as tx:
            row = self._locked(tx.conn, a.name, f"{FIELD}.name")
            check_etag(a.etag, row.version, a.name)
            values = self._values(tx.conn, a, paths)
            diff = changes(row._mapping, values)
            if not diff:
                return to_proto(row)
            merged = {**row._mapping, **values}
            if "title" in values or "body" in values:
                values.update(kb.search_values(merged["title"], merged["body"]))
            row = tx.execute(
                canned_answers.update()
                .where(ca.id == row.id)
                .values(**values, version=ca.version + 1, update_time=sa.func.now())
                .returning(*COLUMNS)
            ).one()
            tx.audit(a.name, "canned_answer.update", principal, [d.as_audit() for d in diff])
        return to_proto(row)

    def delete(self, req: pb.DeleteCannedAnswerRequest, principal: Principal) -> None:
        with self.uow.begin() as tx:
            row = self._locked(tx.conn, req.name)
            check_etag(req.etag, row.version, req.name)
            tx.execute(canned_answers.delete().where(ca.id == row.id))
            tx.audit(req.name, "canned_answer.delete", principal, [])

    # rendering ------------------------------------------------------------------------------------
    def _render(self, conn, answer_name: str, ticket_id: str, principal: Principal, field: str) -> Rendered:
        """Count a use of the answer and fill it from the ticket (in the caller's transaction:
        a failed render counts nothing)."""
        aid = CANNED_ANSWER.parse(answer_name, field).id
        answer = conn.execute(
            canned_answers.update()
            .where(ca.id == aid)
            .values(usage_count=ca.usage_count + 1, last_use_time=sa.func.now())
            .returning(*COLUMNS)
        ).one_or_none()
        if answer is None:
            raise CANNED_ANSWER.not_found(answer_name)
        if not answer.active:
            raise FailedPrecondition(
                f"{answer_name} is not active", reason="CANNED_ANSWER_INACTIVE", metadata={"name": answer_name}
            )
        found = conn.execute(
            sa.select(
                tickets,
                customer_refs.c.display_name.label("customer_name"),
                agents.c.display_name.label("agent_name"),
                sa.func.timezone("Asia/Tehran", sa.func.now()).label("local_now"),
            )
            .select_from(
                tickets.outerjoin(customer_refs, customer_refs.c.customer_id == tickets.c.customer_id).outerjoin(
                    agents, agents.c.id == sa.literal(principal.subject)
                )
            )
            .where(tickets.c.id == ticket_id)
        ).one_or_none()
        if found is None:
            raise TICKET.not_found(TICKET.format(ticket_id))
        values = placeholder_values(
            found,
            (found.customer_name or "").strip() or found.contact_name.strip(),
            (found.agent_name or "").strip(),
            found.local_now,
            answer.language,
        )
        return Rendered(render(answer.body, values), answer)

    def render(self, req: pb.RenderCannedAnswerRequest, principal: Principal) -> pb.RenderCannedAnswerResponse:
        CANNED_ANSWER.parse(req.name)
        tid = TICKET.parse(req.ticket, "ticket").ticket_id
        with self.uow.begin() as tx:
            out = self._render(tx.conn, req.name, tid, principal, "name")
        return pb.RenderCannedAnswerResponse(text=out.text, canned_answer=to_proto(out.answer))

    def reply(self, req: pb.ReplyWithCannedAnswerRequest, principal: Principal):
        tid = TICKET.parse(req.ticket, "ticket").ticket_id
        CANNED_ANSWER.parse(req.canned_answer, "canned_answer")
        if len(req.request_id) > kb.REQUEST_ID_LIMIT:
            raise InvalidArgument.field("request_id", f"must be at most {kb.REQUEST_ID_LIMIT} characters")
        tm = ticket_messages.c
        with self.uow.begin() as tx:
            Tickets.lock(tx.conn, tid)  # retries with one request_id queue here
            if req.request_id:
                seen = tx.execute(
                    sa.select(ticket_messages).where(
                        tm.ticket_id == tid, tm.kind == "agent", tm.headers["X-Request-Id"].astext == req.request_id
                    )
                ).first()
                if seen is not None:
                    return message_to_proto(seen)
            out = self._render(tx.conn, req.canned_answer, tid, principal, "canned_answer")
            headers = {"X-Canned-Answer": req.canned_answer}
            if req.request_id:
                headers["X-Request-Id"] = req.request_id
            msg, _ = self.support.tickets.add_message(
                tx, tid, "agent", out.text, author=principal.subject, headers=headers, actor=principal.subject
            )
        return message_to_proto(msg)

    # suggestions ------------------------------------------------------------------------------------
    def suggest(self, req: pb.SuggestForTicketRequest) -> pb.SuggestForTicketResponse:
        tid = TICKET.parse(req.ticket, "ticket").ticket_id
        if req.page_size < 0:
            raise InvalidArgument.field("page_size", "must not be negative")
        limit = min(req.page_size or SUGGEST_DEFAULT, SUGGEST_MAX)
        tm = ticket_messages.c
        with self.uow.read() as conn:
            first = (
                sa.select(tm.body)
                .where(tm.ticket_id == tickets.c.id, tm.kind == "customer")
                .order_by(tm.create_time, tm.id)
                .limit(1)
                .scalar_subquery()
            )
            t = conn.execute(
                sa.select(
                    tickets.c.subject, tickets.c.category_id, tickets.c.language, first.label("first_body")
                ).where(tickets.c.id == tid)
            ).one_or_none()
            if t is None:
                raise TICKET.not_found(req.ticket)
            words = kb.query_words(f"{t.subject}\n{t.first_body or ''}", limit=48)
            text = kb.any_word_query(words)
            answers = conn.execute(self._answers_query(text, t.category_id, t.language, limit)).all()
            articles = conn.execute(self._articles_query(text, t.category_id, t.language, limit)).all() if text else []
        return pb.SuggestForTicketResponse(
            canned_answers=[
                pb.SuggestedAnswer(canned_answer=to_proto(r), in_category=bool(r.in_category), score=float(r.score))
                for r in answers
            ],
            articles=[kb.hit(r) for r in articles],
        )

    def _answers_query(self, text: str, category_id, language: str, limit: int) -> sa.Select:
        if category_id:
            in_category = ca.category_ids.any(category_id)
            scope = sa.or_(sa.func.cardinality(ca.category_ids) == 0, in_category)
        else:
            in_category, scope = sa.false(), sa.true()
        where = [ca.active, ca.language == language, scope]
        if not text:  # no words: the category's answers, most used first
            return (
                sa.select(*COLUMNS, in_category.label("in_category"), sa.literal(0.0).label("score"))
                .where(*where, in_category)
                .order_by(ca.usage_count.desc(), ca.id)
                .limit(limit)
            )
        q = kb.tsquery(text)
        score = sa.func.ts_rank(ca.search_vector, q)
        return (
            sa.select(*COLUMNS, in_category.label("in_category"), score.label("score"))
            .where(*where, sa.or_(ca.search_vector.op("@@")(q), in_category))
            .order_by(sa.text("in_category DESC"), sa.text("score DESC"), ca.usage_count.desc(), ca.id)
            .limit(limit)
        )

    def _articles_query(self, text: str, category_id, language: str, limit: int) -> sa.Select:
        ka, kc = kb.kb_articles.c, kb.kb_categories.c
        q = kb.tsquery(text)
        if category_id:
            serves = sa.exists().where(kc.id == ka.category_id, kc.ticket_category_ids.any(category_id))
        else:
            serves = sa.false()
        top = (
            sa.select(
                ka.id.label("hit_id"),
                serves.label("serves"),
                kb.title_match(kb.kb_articles, q).label("in_title"),
                sa.func.ts_rank(ka.search_vector, q).label("rank"),
            )
            .where(ka.state == "published", ka.language == language, ka.search_vector.op("@@")(q))
            .order_by(sa.text("serves DESC"), sa.text("rank DESC"), ka.id)
            .limit(limit)
            .subquery("top")
        )
        return (
            sa.select(
                *kb.ARTICLE_COLUMNS,
                top.c.in_title,
                top.c.rank,
                sa.literal(0.0).label("similarity"),
                kb.headline(ka.search_text, q).label("snippet"),
            )
            .select_from(top.join(kb.kb_articles, ka.id == top.c.hit_id))
            .order_by(top.c.serves.desc(), top.c.rank.desc(), ka.id)
        )


class AnswerServicer(answers_pb2_grpc.AnswerServiceServicer):
    def __init__(self, uc: Answers):
        self.uc = uc

    def CreateCannedAnswer(self, request, context):
        return self.uc.create(request.canned_answer, request.request_id, current_principal())

    def GetCannedAnswer(self, request, context):
        return self.uc.get(request.name)

    def ListCannedAnswers(self, request, context):
        items, token = self.uc.list(request)
        return pb.ListCannedAnswersResponse(canned_answers=items, next_page_token=token)

    def UpdateCannedAnswer(self, request, context):
        return self.uc.update(request.canned_answer, request.update_mask, current_principal())

    def DeleteCannedAnswer(self, request, context):
        self.uc.delete(request, current_principal())
        return empty_pb2.Empty()

    def RenderCannedAnswer(self, request, context):
        return self.uc.render(request, current_principal())

    def ReplyWithCannedAnswer(self, request, context):
        return self.uc.reply(request, current_principal())

    def SuggestForTicket(self, request, context):
        return self.uc.suggest(request)


def use_cases(support: Support) -> Answers:
    return support.once("answers", lambda: Answers(support))


def registration(support: Support) -> Registration:
    return Registration.of(AnswerServicer(use_cases(support)))
