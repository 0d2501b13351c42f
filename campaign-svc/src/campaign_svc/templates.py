"""TemplateService (proto/crm/campaign/v1/templates.proto): message templates, their immutable
versions, rendering for one recipient, and a test send to oneself.

Templates, in one place:
- every field (subject, html_body, text_body) is a Jinja2 template run in the suite's sandbox
  (`crm_chassis.templating.Sandbox`: no Python internals, no calls, bounded `*` and `**`):
  the HTML one with autoescape on (a customer's name cannot inject markup), the others off;
  `Missing` (StrictUndefined) makes a variable without a value an error naming it:
  INVALID_ARGUMENT on `template.html_body` "undefined variable 'customer.given_name' ...";
  `{{ customer.given_name | default("مشتری گرامی") }}` falls back instead, and a missing
  value is false in a test (`{% if customer.city %}`);
- `check` runs at save time: a syntax error names the field and line, and so does a variable
  outside VARIABLES (an unknown root or field, an attribute starting with "_"); a trial run
  with every variable filled (SAMPLE) finds what only running shows (a refused operation);
- the values (`values_of`) come from the recipient's audience row (the projection, never a
  call to customer-svc); an empty column is left undefined, so its fallback applies. Fields the
  projection does not have yet (given_name, family_name, points, tier) are known variables that
  are always undefined until it does;
- a Persian template's output (and the customer values in it) has Arabic Yeh/Kaf and digits
  replaced by the Persian ones (crm_chassis.persian.persian_letters);
- an e-mail's HTML (`html_document`) is made a whole document with dir and lang (a fragment is
  wrapped in a body and a div carrying the direction, since some clients drop <html>
  attributes), its <style> rules are inlined with css-inline, and its plain-text part is made
  from it (`html_to_text`) unless text_body is given.

Versions: create writes version 1; an update that changes the content (channel-specific
fields, language, direction) writes the next version in the same transaction. A version row is
never changed; a delete marks the template deleted and keeps its versions.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from dataclasses import dataclass
from decimal import Decimal
from html.parser import HTMLParser

import css_inline
import sqlalchemy as sa
from google.protobuf import empty_pb2, json_format
from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, meta, nodes
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.utils import missing

from crm.campaign.v1 import templates_pb2 as pb
from crm.campaign.v1 import templates_pb2_grpc
from crm_chassis import templating
from crm_chassis.auth import Principal
from crm_chassis.dates import TEHRAN, set_times
from crm_chassis.errors import FailedPrecondition, FieldViolation, InvalidArgument, Unavailable
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
from crm_chassis.persian import format_jalali, format_number, persian_letters, phone_e164, to_persian_digits
from crm_chassis.resources import ResourceName, UpdateMask, changes, check_etag, check_request_id, etag, same_requester

from . import consent
from .outgoing import Outgoing, SendError
from .runtime import Campaign
from .tables import audience
from .templates_tables import template_versions, templates

TEMPLATE = ResourceName("templates/{template_id}")
VERSION = ResourceName("templates/{template_id}/versions/{version}", version=r"[1-9][0-9]{0,8}")
CUSTOMER = ResourceName("customers/{customer_id}", customer_id=r"[A-Za-z0-9_.:-]{1,100}")

CHANNELS = ("email", "sms", "telegram", "bale")
RTL_LANGUAGES = frozenset({"fa", "ar", "ur", "he", "ckb", "ps"})
NAME_LIMIT, SUBJECT_LIMIT, HTML_LIMIT, TEXT_LIMIT = 200, 500, 200_000, 20_000
SMS_LIMIT = 1_000  # characters: about 14 Persian SMS parts, more than any campaign sends
FIELD = "template"
CONTENT = ("subject", "html_body", "text_body", "language", "direction")

# --- variables -----------------------------------------------------------------------------------
CUSTOMER_FIELDS = (
    "display_name",
    "given_name",
    "family_name",
    "email",
    "mobile",
    "phone",
    "city",
    "province",
    "country",
    "rank",
    "industry",
    "gender",
    "type",
    "kind",
    "groups",
    "tags",
    "order_count",
    "revenue",
    "first_purchase_date",
    "last_purchase_date",
    "last_ticket_date",
    "registration_date",
    "birth_date",
    "points",
    "tier",
)
VARIABLES: dict[str, tuple[str, ...]] = {
    "customer": CUSTOMER_FIELDS,
    "campaign": ("display_name",),
    "unsubscribe_url": (),
    "today_jalali": (),
}
VARIABLE_LIST = ", ".join(
    f"{g}.{{{', '.join(fs)}}}" if len(fs) > 1 else f"{g}.{fs[0]}" if fs else g for g, fs in VARIABLES.items()
)
# audience columns behind the fields whose name differs (dates shown as dates)
DATE_COLUMNS = {
    "first_purchase_date": "first_purchase_time",
    "last_purchase_date": "last_purchase_time",
    "last_ticket_date": "last_ticket_time",
    "registration_date": "create_time",
    "birth_date": "birth_date",
}


class Missing(StrictUndefined):
    """StrictUndefined whose error names the variable (customer.given_name). It is false in a
    test (`{% if customer.city %}`, `customer.city or "…"`); output, comparison and arithmetic
    of it are the error."""

    __slots__ = ()

    def __bool__(self) -> bool:
        return False

    @property
    def _undefined_message(self) -> str:
        if self._undefined_hint:
            return self._undefined_hint
        name, obj = self._undefined_name, self._undefined_obj
        path = name if obj is missing else f"{getattr(obj, '_path', type(obj).__name__)}.{name}"
        group, _, field = path.partition(".")
        if group in VARIABLES and (field in VARIABLES[group] or (not field and not VARIABLES[group])):
            return (
                f"undefined variable '{path}': it has no value for this recipient; "
                f'give a fallback: {{{{ {path} | default("…") }}}}'
            )
        return f"undefined variable '{path}'; the variables are {VARIABLE_LIST}"


class Group(dict):
    """The fields of one variable group; `_path` names it in errors (out of a template's reach:
    the sandbox hides attributes starting with _)."""

    def __init__(self, path: str, values: dict):
        super().__init__(values)
        self._path = path


class Sandbox(templating.Sandbox):
    what = "a template"


def _environment(autoescape: bool, trim: bool = True) -> Sandbox:
    env = Sandbox(autoescape=autoescape, undefined=Missing, trim_blocks=trim, lstrip_blocks=trim, auto_reload=False)
    env.globals = {}
    env.filters.pop("safe", None)  # no value is ever markup: a customer's text cannot inject HTML
    env.filters["persian_digits"] = to_persian_digits
    env.filters["number"] = lambda v, persian=True: format_number(v, persian_digits=persian)
    return env


TEXT_ENV = _environment(False)
HTML_ENV = _environment(True)
# the text part made from an HTML template: its line breaks are the markup's, kept as they are
DERIVED_ENV = _environment(False, trim=False)
ENVS = {"html_body": HTML_ENV, "derived_text": DERIVED_ENV}


def _env(field: str) -> Sandbox:
    return ENVS.get(field, TEXT_ENV)


@functools.lru_cache(maxsize=1024)
def compiled(source: str, field: str):
    return _env(field).from_string(source)


def _names(tree: nodes.Template) -> list[str]:
    """What variables the template reads that are not VARIABLES, with their line."""
    bad: list[str] = []
    for name in sorted(meta.find_undeclared_variables(tree)):
        if name not in VARIABLES:
            line = next((n.lineno for n in tree.find_all(nodes.Name) if n.name == name), 1)
            bad.append(f"line {line}: unknown variable '{name}'; the variables are {VARIABLE_LIST}")
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        attr = node.attr if isinstance(node, nodes.Getattr) else None
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            attr = node.arg.value
        if attr is None:
            continue
        if attr.startswith("_"):
            bad.append(f"line {node.lineno}: {attr} is not allowed (templates may not reach Python internals)")
        elif isinstance(node.node, nodes.Name) and node.node.name in VARIABLES:
            group = node.node.name
            if attr not in VARIABLES[group]:
                bad.append(f"line {node.lineno}: unknown variable '{group}.{attr}'; the variables are {VARIABLE_LIST}")
    return bad


def check(field: str, source: str, where: str | None = None) -> list[FieldViolation]:
    """Why this template field may not be stored (empty: it may)."""
    where = where or f"{FIELD}.{field}"
    env = _env(field)
    try:
        tree = env.parse(source)
    except TemplateSyntaxError as e:
        return [FieldViolation(where, f"line {e.lineno}: {e.message}")]
    except RecursionError:
        return [FieldViolation(where, "is nested too deeply")]
    try:
        bad = _names(tree)
    except TemplateSyntaxError as e:  # an unknown filter or test
        return [FieldViolation(where, f"line {e.lineno}: {e.message}")]
    if not bad:
        try:
            _render_one(field, source, SAMPLE, where)
        except InvalidArgument as e:
            bad += [v.description for v in e.violations]
    return [FieldViolation(where, b) for b in dict.fromkeys(bad)]


def _render_one(field: str, source: str, values: dict, where: str) -> str:
    if not source:
        return ""
    try:
        return templating.render(compiled(source, field), values)  # output bounded
    except TemplateSyntaxError as e:
        raise InvalidArgument.field(where, f"line {e.lineno}: {e.message}") from None
    except SecurityError as e:
        raise InvalidArgument.field(where, f"refused by the sandbox: {e}") from None
    except UndefinedError as e:
        raise InvalidArgument.field(where, str(e)) from None
    except RecursionError:
        raise InvalidArgument.field(where, "is nested too deeply") from None
    except (TemplateError, ArithmeticError, TypeError, ValueError, LookupError, AttributeError) as e:
        raise InvalidArgument.field(where, f"the template failed: {type(e).__name__}: {e}") from None


# --- HTML: the document, inlined CSS, the text part ------------------------------------------
INLINER = css_inline.CSSInliner(keep_style_tags=False, keep_at_rules=True, load_remote_stylesheets=False)
_HTML_TAG = re.compile(r"<html\b([^>]*)>", re.IGNORECASE)
_HAS_BODY = re.compile(r"<body\b", re.IGNORECASE)


def html_document(html: str, language: str, direction: str) -> str:
    """A whole HTML document of the rendered body, with dir and lang, CSS inlined."""
    if _HTML_TAG.search(html):

        def attrs(m: re.Match) -> str:
            a = m.group(1)
            if not re.search(r"\bdir\s*=", a, re.IGNORECASE):
                a += f' dir="{direction}"'
            if not re.search(r"\blang\s*=", a, re.IGNORECASE):
                a += f' lang="{language}"'
            return f"<html{a}>"

        doc = _HTML_TAG.sub(attrs, html, count=1)
    else:
        align = "right" if direction == "rtl" else "left"
        head, body = "", html
        if _HAS_BODY.search(html) is None:
            # <style> blocks of a fragment go to the head; the rest into a div with the direction
            styles = re.findall(r"<style\b.*?</style>", html, re.IGNORECASE | re.DOTALL)
            body = re.sub(r"<style\b.*?</style>", "", html, flags=re.IGNORECASE | re.DOTALL)
            head = "".join(styles)
            body = f'<body dir="{direction}"><div dir="{direction}" style="direction: {direction}; text-align: {align}">{body}</div></body>'
        doc = (
            f'<!DOCTYPE html><html dir="{direction}" lang="{language}"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">{head}</head>{body}</html>'
        )
    try:
        return INLINER.inline(doc)
    except ValueError as e:  # css-inline's InlineError: a style sheet it cannot read
        raise InvalidArgument.field(f"{FIELD}.html_body", f"its CSS cannot be inlined: {e}") from None


BLOCKS = frozenset(
    [
        "p",
        "div",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "table",
        "tr",
        "ul",
        "ol",
        "blockquote",
        "section",
        "article",
        "header",
        "footer",
        "hr",
        "pre",
        "address",
    ]
)
SKIPPED = frozenset({"head", "style", "script", "title", "template"})


class _Text(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0
        self.links: list[tuple[str, int]] = []  # href, position of the link's text

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in SKIPPED:
            self.skip += 1
        elif tag in BLOCKS:
            self.out.append("\n\n" if tag in ("p", "h1", "h2", "h3", "table", "ul", "ol", "blockquote") else "\n")
            if tag == "hr":
                self.out.append("―――――\n")
        elif tag == "br":
            self.out.append("\n")
        elif tag == "li":
            self.out.append("\n• ")
        elif tag in ("td", "th"):
            self.out.append(" ")
        elif tag == "img" and a.get("alt"):
            self.out.append(a["alt"])
        elif tag == "a":
            self.links.append((a.get("href") or "", len(self.out)))

    def handle_endtag(self, tag):
        if tag in SKIPPED:
            self.skip = max(0, self.skip - 1)
        elif tag in BLOCKS:
            self.out.append("\n")
        elif tag == "a" and self.links:
            href, at = self.links.pop()
            label = "".join(self.out[at:]).strip()
            if href and not href.startswith(("#", "mailto:", "tel:")) and href != label:
                self.out.append(f" ({href})")

    def handle_data(self, data):
        if not self.skip:
            self.out.append(re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    """The plain-text part of an HTML mail: blocks as paragraphs, list items as bullets, links
    as "text (url)", images by their alt text; no markup, styles or scripts."""
    p = _Text()
    p.feed(html)
    p.close()
    return _tidy("".join(p.out))


def _tidy(text: str) -> str:
    lines = [_BLANKS.sub(" ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


@functools.lru_cache(maxsize=256)
def text_template(html_source: str) -> str | None:
    """The text part's template made once from the HTML template (its markup turned to text,
    its Jinja left as it was), so a recipient's text part is rendered, not parsed out of their
    HTML; None when that is not a template of the same variables (Jinja inside markup in a way
    the conversion breaks): the text is then made from each rendered HTML."""
    if _TAG_IN_EXPRESSION.search(html_source) is not None:
        return None
    text = html_to_text(html_source)
    try:
        same = meta.find_undeclared_variables(DERIVED_ENV.parse(text)) == meta.find_undeclared_variables(
            HTML_ENV.parse(html_source)
        )
    except TemplateSyntaxError:
        return None
    return text if same else None


_BLANKS = re.compile(r"[ \t\r\f\v]+")
# `<` or `>` inside {{ }} or {% %} (a comparison): the HTML parser would read it as markup
_TAG_IN_EXPRESSION = re.compile(r"\{[{%][^}]*[<>][^}]*[}%]\}")


# --- values ----------------------------------------------------------------------------------------
def _date_text(value, persian: bool) -> str:
    if isinstance(value, dt.datetime):
        value = value.astimezone(TEHRAN).date()
    return format_jalali(value, persian_digits=True) if persian else value.isoformat()


def customer_group(row, language: str) -> Group:
    """The customer variables of an audience row: empty values left undefined (their fallback
    applies), dates as Jalali dates for Persian, text with Persian letters for Persian."""
    persian = language == "fa"
    m = row._mapping
    values: dict = {}
    for f in CUSTOMER_FIELDS:
        column = DATE_COLUMNS.get(f, f)
        if column not in m:
            continue
        v = m[column]
        if v is None or v == "" or v == []:
            continue
        if isinstance(v, dt.date):
            v = _date_text(v, persian)
        elif isinstance(v, Decimal):
            v = int(v) if v == v.to_integral_value() else float(v)
        elif isinstance(v, str) and persian:
            v = persian_letters(v)
        elif isinstance(v, list):
            v = [persian_letters(x) if persian and isinstance(x, str) else x for x in v]
        values[f] = v
    return Group("customer", values)


def audience_row(conn, customer_id: str):
    """The customer's audience row (a merged customer's survivor's), or None (unknown, erased)."""
    for _ in range(3):  # a merge chain is short; never loop on a bad one
        row = conn.execute(sa.select(audience).where(audience.c.customer_id == customer_id)).one_or_none()
        if row is None:
            return None
        if row.merged_into:  # merged rows are marked deleted too: follow to the survivor
            customer_id = row.merged_into
            continue
        return None if row.deleted else row
    return None


def values_of(customer: Group, language: str, campaign: dict | None = None, unsubscribe_url: str = "") -> dict:
    today = dt.datetime.now(TEHRAN).date()
    values = {
        "customer": customer,
        "campaign": Group("campaign", {k: v for k, v in (campaign or {}).items() if v not in (None, "")}),
        "today_jalali": format_jalali(today, persian_digits=language == "fa"),
    }
    if unsubscribe_url:
        values["unsubscribe_url"] = unsubscribe_url
    return values


SAMPLE_CUSTOMER = {
    "display_name": "سارا محمدی",
    "given_name": "سارا",
    "family_name": "محمدی",
    "email": "sara@example.com",
    "mobile": "+989121234567",
    "phone": "+982112345678",
    "city": "تهران",
    "province": "تهران",
    "country": "IR",
    "rank": "طلایی",
    "industry": "خرده‌فروشی",
    "gender": "female",
    "type": "person",
    "kind": "end_consumer",
    "groups": ["vip"],
    "tags": ["newsletter"],
    "order_count": 3,
    "revenue": 12_500_000,
    "first_purchase_date": "۱۴۰۴/۰۲/۱۰",
    "last_purchase_date": "۱۴۰۵/۰۸/۲۱",
    "last_ticket_date": "۱۴۰۵/۰۶/۰۳",
    "registration_date": "۱۴۰۳/۱۱/۰۱",
    "birth_date": "۱۳۷۰/۰۵/۱۲",
    "points": 1200,
    "tier": "طلایی",
}
SAMPLE = {
    "customer": Group("customer", SAMPLE_CUSTOMER),
    "campaign": Group("campaign", {"display_name": "جشنواره پاییز"}),
    "unsubscribe_url": "https://example.com/unsubscribe/sample",
    "today_jalali": "۱۴۰۵/۰۹/۱۲",
}


def sample_values(sample: dict | None) -> dict:
    """Values of a request's sample ({"customer": {...}, "campaign": {...}, "unsubscribe_url"}),
    or the built-in sample when none is given."""
    if not sample:
        return SAMPLE
    out = {
        "customer": Group("customer", dict(sample.get("customer") or {})),
        "campaign": Group("campaign", dict(sample.get("campaign") or {})),
        "today_jalali": SAMPLE["today_jalali"],
    }
    if sample.get("unsubscribe_url"):
        out["unsubscribe_url"] = str(sample["unsubscribe_url"])
    for k, v in out["customer"].items():  # Struct numbers are floats: 3.0 shows as 3
        if isinstance(v, float) and v.is_integer():
            out["customer"][k] = int(v)
    return out


# --- rendering ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rendered:
    channel: str
    subject: str
    html: str
    text: str
    version: int = 0

    def to_proto(self) -> pb.RenderedMessage:
        return pb.RenderedMessage(
            channel=self.channel, subject=self.subject, html=self.html, text=self.text, version=self.version
        )


def render(t, values: dict, where: str = FIELD) -> Rendered:
    """Template (or version) row `t` rendered with `values`; INVALID_ARGUMENT naming the field
    (`template.html_body`) and the variable when any part fails: nothing is half-rendered."""
    persian = t.language == "fa"
    fix = persian_letters if persian else (lambda s: s)
    subject = fix(" ".join(_render_one("subject", t.subject, values, f"{where}.subject").split()))
    html = ""
    if t.channel == "email":
        body = _render_one("html_body", t.html_body, values, f"{where}.html_body")
        html = fix(html_document(body, t.language, t.direction))
    if t.text_body:
        text = fix(_render_one("text_body", t.text_body, values, f"{where}.text_body").strip())
    elif (derived := text_template(t.html_body) if t.channel == "email" else None) is not None:
        text = fix(_tidy(_render_one("derived_text", derived, values, f"{where}.html_body")))
    else:
        text = html_to_text(html)
    if t.channel == "sms" and len(text) > SMS_LIMIT:
        raise InvalidArgument.field(f"{where}.text_body", f"the SMS would be longer than {SMS_LIMIT:,} characters")
    return Rendered(t.channel, subject, html, text, int(getattr(t, "version", 0) or 0))


# --- conversions ---------------------------------------------------------------------------------------
COLUMNS = [c for c in templates.c]
t_ = templates.c
v_ = template_versions.c


def to_proto(row) -> pb.Template:
    out = pb.Template(
        name=TEMPLATE.format(row.id),
        display_name=row.display_name,
        channel=row.channel,
        subject=row.subject,
        html_body=row.html_body,
        text_body=row.text_body,
        language=row.language,
        direction=row.direction,
        version=row.current_version,
        creator=row.creator,
        etag=etag(row.version),
    )
    set_times(out, row, "create_time", "update_time")
    return out


def version_to_proto(row) -> pb.TemplateVersion:
    out = pb.TemplateVersion(
        name=VERSION.format(row.template_id, row.version),
        version=row.version,
        channel=row.channel,
        subject=row.subject,
        html_body=row.html_body,
        text_body=row.text_body,
        language=row.language,
        direction=row.direction,
        creator=row.creator,
    )
    set_times(out, row, "create_time")
    return out


FILTERS_SCHEMA = FilterSchema(
    FilterField("display_name", t_.display_name),
    FilterField("channel", t_.channel),
    FilterField("language", t_.language),
    FilterField("creator", t_.creator),
    FilterField("create_time", t_.create_time, FieldType.TIMESTAMP),
    FilterField("update_time", t_.update_time, FieldType.TIMESTAMP),
)
SORTABLE = {"display_name": t_.display_name, "create_time": t_.create_time, "update_time": t_.update_time}
MASK = UpdateMask(
    ["display_name", "subject", "html_body", "text_body", "language", "direction"],
    immutable={"channel": "make a new template for another channel", "version": "", "creator": ""},
)


@dataclass(frozen=True)
class Draft:
    """The content of a template as checked (a stored row's stand-in when previewing)."""

    channel: str
    subject: str
    html_body: str
    text_body: str
    language: str
    direction: str
    version: int = 0


def _limit(value: str, where: str, limit: int, bad: list) -> str:
    if len(value) > limit:
        bad.append(FieldViolation(where, f"must be at most {limit:,} characters"))
    return value


def checked(channel: str, values: dict, where: str = FIELD) -> dict:
    """The content fields after every check (raises INVALID_ARGUMENT naming each problem)."""
    bad: list[FieldViolation] = []
    language = (values.get("language") or "fa").strip().lower()
    if not re.fullmatch(r"[a-z]{2,8}", language):
        bad.append(FieldViolation(f"{where}.language", "must be 2 to 8 lower-case letters (fa, en, ...)"))
    direction = (values.get("direction") or ("rtl" if language in RTL_LANGUAGES else "ltr")).strip().lower()
    if direction not in ("rtl", "ltr"):
        bad.append(FieldViolation(f"{where}.direction", "must be rtl or ltr"))
    subject = _limit(values.get("subject") or "", f"{where}.subject", SUBJECT_LIMIT, bad)
    html = _limit(values.get("html_body") or "", f"{where}.html_body", HTML_LIMIT, bad)
    text = _limit(values.get("text_body") or "", f"{where}.text_body", TEXT_LIMIT, bad)
    if channel == "email":
        if not subject.strip():
            bad.append(FieldViolation(f"{where}.subject", "is required for an e-mail template"))
        if not html.strip():
            bad.append(FieldViolation(f"{where}.html_body", "is required for an e-mail template"))
    else:
        if subject:
            bad.append(FieldViolation(f"{where}.subject", f"is for e-mail templates only, not {channel}"))
        if html:
            bad.append(FieldViolation(f"{where}.html_body", f"is for e-mail templates only, not {channel}"))
        if not text.strip():
            bad.append(FieldViolation(f"{where}.text_body", f"is required for a {channel} template"))
    if not bad:
        for field, source in (("subject", subject), ("html_body", html), ("text_body", text)):
            if source:
                bad += check(field, source, f"{where}.{field}")
    if bad:
        raise InvalidArgument(bad)
    return {
        "subject": subject,
        "html_body": html,
        "text_body": text,
        "language": language,
        "direction": direction,
    }


def _channel(value: str, where: str) -> str:
    channel = value.strip().lower()
    if channel not in CHANNELS:
        raise InvalidArgument.field(where, f"must be one of {', '.join(CHANNELS)}")
    return channel


def _name(value: str, where: str) -> str:
    value = " ".join(value.split())
    if not value:
        raise InvalidArgument.field(where, "is required")
    if len(value) > NAME_LIMIT:
        raise InvalidArgument.field(where, f"must be at most {NAME_LIMIT} characters")
    return value


# --- the use cases -------------------------------------------------------------------------------------
class Templates:
    def __init__(self, rt: Campaign):
        self.rt = rt
        self.uow = rt.uow
        self.tokens = PageTokens(rt.settings.jwt_secret, "templates")
        self.version_tokens = PageTokens(rt.settings.jwt_secret, "template_versions")
        self._versions: dict = {}  # (template id, version) -> its row: versions never change

    # create / read / update / delete ----------------------------------------------------------------
    def create(self, t: pb.Template, request_id: str, principal: Principal) -> pb.Template:
        check_request_id(request_id)
        channel = _channel(t.channel, f"{FIELD}.channel")
        display_name = _name(t.display_name, f"{FIELD}.display_name")
        content = checked(channel, {f: getattr(t, f) for f in CONTENT})
        try:
            with self.uow.begin() as tx:
                if request_id:
                    seen = tx.execute(sa.select(*COLUMNS).where(t_.request_id == request_id)).one_or_none()
                    if seen is not None:
                        same_requester(seen.creator, principal, "template")
                        return to_proto(seen)
                row = tx.execute(
                    templates.insert()
                    .values(
                        display_name=display_name,
                        channel=channel,
                        **content,
                        current_version=1,
                        creator=principal.subject,
                        request_id=request_id or None,
                    )
                    .returning(*COLUMNS)
                ).one()
                self._version(tx, row, principal)
                tx.audit(TEMPLATE.format(row.id), "template.create", principal, [])
        except sa.exc.IntegrityError:
            if not request_id:
                raise
            with self.uow.read() as conn:
                seen = conn.execute(sa.select(*COLUMNS).where(t_.request_id == request_id)).one()
            same_requester(seen.creator, principal, "template")
            return to_proto(seen)
        return to_proto(row)

    @staticmethod
    def _version(tx, row, principal: Principal) -> None:
        tx.execute(
            template_versions.insert().values(
                template_id=row.id,
                version=row.current_version,
                channel=row.channel,
                **{f: getattr(row, f) for f in CONTENT},
                creator=principal.subject,
            )
        )

    def _row(self, conn, name: str, field: str = "name", lock: bool = False):
        tid = TEMPLATE.parse(name, field).template_id
        q = sa.select(*COLUMNS).where(t_.id == tid, t_.delete_time.is_(None))
        return TEMPLATE.one(conn, q.with_for_update() if lock else q, name)

    def get(self, name: str) -> pb.Template:
        with self.uow.read() as conn:
            return to_proto(self._row(conn, name))

    def list(self, req: pb.ListTemplatesRequest):
        limit = page_size(req.page_size)
        where = FILTERS_SCHEMA.compile(req.filter)
        keys = parse_order_by(req.order_by.strip() or "update_time desc", SORTABLE)
        order = with_tiebreaker(keys, t_.id, descending=keys[-1].descending)
        with self.uow.read() as conn:
            rows, token = keyset_page(
                conn,
                sa.select(*COLUMNS).where(where, t_.delete_time.is_(None)),
                order,
                self.tokens,
                query_fingerprint(req.filter, req.order_by),
                limit,
                req.page_token,
            )
        return [to_proto(r) for r in rows], token

    def update(self, t: pb.Template, mask, principal: Principal) -> pb.Template:
        paths = MASK.paths(mask)
        with self.uow.begin() as tx:
            row = self._row(tx.conn, t.name, f"{FIELD}.name", lock=True)
            check_etag(t.etag, row.version, t.name)
            values: dict = {}
            if "display_name" in paths:
                values["display_name"] = _name(t.display_name, f"{FIELD}.display_name")
            content_paths = [p for p in paths if p in CONTENT]
            if content_paths:
                merged = {f: getattr(row, f) for f in CONTENT}
                merged.update({p: getattr(t, p) for p in content_paths})
                if "language" in content_paths and "direction" not in content_paths:
                    merged["direction"] = ""  # follows the new language unless given
                values.update(checked(row.channel, merged))
            diff = changes(row._mapping, values)
            if not diff:
                return to_proto(row)
            new_content = any(d.field in CONTENT for d in diff)
            row = tx.execute(
                templates.update()
                .where(t_.id == row.id)
                .values(
                    **values,
                    version=t_.version + 1,
                    current_version=t_.current_version + (1 if new_content else 0),
                    update_time=sa.func.now(),
                )
                .returning(*COLUMNS)
            ).one()
            if new_content:
                self._version(tx, row, principal)
            tx.audit(t.name, "template.update", principal, [d.as_audit() for d in diff])
        return to_proto(row)

    def delete(self, req: pb.DeleteTemplateRequest, principal: Principal) -> None:
        with self.uow.begin() as tx:
            row = self._row(tx.conn, req.name, lock=True)
            check_etag(req.etag, row.version, req.name)
            tx.execute(
                templates.update()
                .where(t_.id == row.id)
                .values(delete_time=sa.func.now(), version=t_.version + 1, request_id=None)
            )
            tx.audit(req.name, "template.delete", principal, [])

    # versions ------------------------------------------------------------------------------------------
    def pin(self, conn, name: str, field: str = "template") -> tuple[str, int]:
        """(template id, current version) of a template a campaign is about to use: the version
        it pins (NOT_FOUND for a deleted template; INVALID_ARGUMENT on `field` for a bad name)."""
        row = self._row(conn, name, field)
        return row.id, row.current_version

    def version_row(self, conn, template_id: str, version: int, name: str):
        """A version of a template (of a deleted one too: campaigns pinned it)."""
        if not 0 < version <= 2**31 - 1:  # the column's range: no such version
            raise VERSION.not_found(name)
        row = conn.execute(
            sa.select(template_versions).where(v_.template_id == template_id, v_.version == version)
        ).one_or_none()
        if row is None:
            raise VERSION.not_found(name)
        return row

    def get_version(self, name: str) -> pb.TemplateVersion:
        ids = VERSION.parse(name)
        with self.uow.read() as conn:
            return version_to_proto(self.version_row(conn, ids.template_id, int(ids.version), name))

    def list_versions(self, req: pb.ListTemplateVersionsRequest):
        tid = TEMPLATE.parse(req.parent, "parent").template_id
        limit = page_size(req.page_size)
        order = [(v_.version, True)]
        with self.uow.read() as conn:
            if conn.execute(sa.select(t_.id).where(t_.id == tid)).first() is None:
                raise TEMPLATE.not_found(req.parent)
            rows, token = keyset_page(
                conn,
                sa.select(template_versions).where(v_.template_id == tid),
                order,
                self.version_tokens,
                query_fingerprint(parent=req.parent),
                limit,
                req.page_token,
            )
        return [version_to_proto(r) for r in rows], token

    # rendering -------------------------------------------------------------------------------------------
    def _pinned(self, conn, name: str, version: int):
        """The version row to render: `version`, or the template's current one."""
        if version < 0:
            raise InvalidArgument.field("version", "must not be negative")
        if version == 0:
            row = self._row(conn, name)
            version = row.current_version
        tid = TEMPLATE.parse(name).template_id
        return self.version_row(conn, tid, version, VERSION.format(tid, version))

    def _values(self, conn, customer: str, sample, language: str, field: str = "customer") -> dict:
        if customer:
            cid = CUSTOMER.parse(customer, field).customer_id
            row = audience_row(conn, cid)
            if row is None:
                raise CUSTOMER.not_found(customer)
            return values_of(customer_group(row, language), language, unsubscribe_url=SAMPLE["unsubscribe_url"])
        given = json_format.MessageToDict(sample) if sample is not None and sample.ListFields() else None
        return sample_values(given)

    def render_for(self, conn, template_id: str, version: int, ctx: dict) -> Rendered:
        """runtime.Campaign.renderer: a pinned version for one recipient (ctx: "customer" the
        audience row or None, "campaign" a dict, "unsubscribe_url")."""
        key = (str(template_id), int(version))
        v = self._versions.get(key)
        if v is None:  # a version never changes: read once per process
            v = self.version_row(conn, template_id, version, VERSION.format(template_id, version))
            if len(self._versions) > 1000:
                self._versions.clear()
            self._versions[key] = v
        row = ctx.get("customer")
        group = customer_group(row, v.language) if row is not None else Group("customer", {})
        return render(v, values_of(group, v.language, ctx.get("campaign"), ctx.get("unsubscribe_url", "")))

    def render(self, req: pb.RenderTemplateRequest) -> pb.RenderedMessage:
        with self.uow.read() as conn:
            v = self._pinned(conn, req.name, req.version)
            values = self._values(conn, req.customer, req.sample, v.language)
        return render(v, values).to_proto()

    def preview(self, req: pb.PreviewTemplateRequest) -> pb.RenderedMessage:
        t = req.template
        channel = _channel(t.channel, f"{FIELD}.channel")
        content = checked(channel, {f: getattr(t, f) for f in CONTENT})
        draft = Draft(channel=channel, **content)
        with self.uow.read() as conn:
            values = self._values(conn, req.customer, req.sample, draft.language)
        return render(draft, values).to_proto()

    def outgoing(
        self,
        version_row,
        values: dict,
        address: str,
        *,
        message_id: str = "",
        campaign_id: str = "",
        unsubscribe_url: str = "",
        unsubscribe_mailto: str = "",
        headers: dict | None = None,
    ) -> Outgoing:
        """The Outgoing of one recipient (the delivery workers' and the test send's): rendered
        from the pinned version, or INVALID_ARGUMENT naming the variable (nothing to send)."""
        r = render(version_row, values)
        return Outgoing(
            channel=r.channel,
            address=address,
            text=r.text,
            subject=r.subject,
            html=r.html,
            headers=dict(headers or {}),
            message_id=message_id,
            campaign_id=campaign_id,
            unsubscribe_url=unsubscribe_url,
            unsubscribe_mailto=unsubscribe_mailto,
        )

    def send_test(self, req: pb.SendTestMessageRequest) -> pb.SendTestMessageResponse:
        with self.uow.read() as conn:
            v = self._pinned(conn, req.name, req.version)
            values = self._values(conn, req.customer, req.sample, v.language)
        address = test_address(v.channel, req.address, self.rt.phone_region)
        with self.uow.read() as conn:  # suppression holds for every send, a test's too
            row = consent.suppression_of(conn, v.channel, address)
            sup = row.reason if row is not None else None
        if sup is not None:
            raise FailedPrecondition(
                f"{address} is suppressed on {v.channel} ({sup}): nothing is sent to it",
                reason="ADDRESS_SUPPRESSED",
                metadata={"reason": sup},
            )
        out = self.outgoing(v, values, address, headers={"X-CRM-Test": "1"})
        send = self.rt.senders.get(v.channel)
        if send is None:
            raise FailedPrecondition(
                f"no {v.channel} sender is configured (docs/channels.md: "
                f"{'SMS_PROVIDER' if v.channel == 'sms' else v.channel.upper() + '_BOT_TOKEN'})",
                reason="CHANNEL_NOT_CONFIGURED",
                metadata={"channel": v.channel},
            )
        try:
            provider_id = send(out)
        except SendError as e:
            if e.retryable:
                raise Unavailable(
                    f"the {v.channel} provider failed; try again: {e}", reason="PROVIDER_UNAVAILABLE"
                ) from None
            raise FailedPrecondition(
                f"the {v.channel} provider refused the message: {e}",
                reason="PROVIDER_REFUSED",
                metadata={"code": e.code or "", "hard_bounce": str(e.hard_bounce).lower()},
            ) from None
        return pb.SendTestMessageResponse(
            message=render_to_proto(out, v.version), provider_message_id=str(provider_id), address=address
        )


def render_to_proto(out: Outgoing, version: int) -> pb.RenderedMessage:
    return pb.RenderedMessage(channel=out.channel, subject=out.subject, html=out.html, text=out.text, version=version)


_EMAIL = re.compile(r"[^@\s<>,;]+@[^@\s<>,;]+\.[^@\s<>,;]+")


def test_address(channel: str, raw: str, region: str) -> str:
    """The test send's address, normalised; INVALID_ARGUMENT naming `address` otherwise."""
    raw = raw.strip()
    if not raw:
        raise InvalidArgument.field("address", "is required (where to send the test)")
    if channel == "email":
        if not _EMAIL.fullmatch(raw) or len(raw) > 254:
            raise InvalidArgument.field("address", "must be an e-mail address")
        return raw.lower()
    if channel == "sms":
        number = phone_e164(raw, region)
        if number is None:
            raise InvalidArgument.field("address", "must be a mobile number")
        return number
    if not raw.lstrip("-").isdigit() or len(raw) > 30:
        raise InvalidArgument.field("address", f"must be a {channel} chat id (an integer)")
    return raw


class TemplateServicer(templates_pb2_grpc.TemplateServiceServicer):
    def __init__(self, uc: Templates):
        self.uc = uc

    def CreateTemplate(self, request, context):
        return self.uc.create(request.template, request.request_id, current_principal())

    def GetTemplate(self, request, context):
        return self.uc.get(request.name)

    def ListTemplates(self, request, context):
        items, token = self.uc.list(request)
        return pb.ListTemplatesResponse(templates=items, next_page_token=token)

    def UpdateTemplate(self, request, context):
        return self.uc.update(request.template, request.update_mask, current_principal())

    def DeleteTemplate(self, request, context):
        self.uc.delete(request, current_principal())
        return empty_pb2.Empty()

    def GetTemplateVersion(self, request, context):
        return self.uc.get_version(request.name)

    def ListTemplateVersions(self, request, context):
        items, token = self.uc.list_versions(request)
        return pb.ListTemplateVersionsResponse(versions=items, next_page_token=token)

    def RenderTemplate(self, request, context):
        return self.uc.render(request)

    def PreviewTemplate(self, request, context):
        return self.uc.preview(request)

    def SendTestMessage(self, request, context):
        return self.uc.send_test(request)


def use_cases(rt: Campaign) -> Templates:
    return rt.once("templates", lambda: Templates(rt))


def registration(rt: Campaign) -> Registration:
    return Registration.of(TemplateServicer(use_cases(rt)))


def install(rt: Campaign) -> None:
    rt.renderer = use_cases(rt).render_for
