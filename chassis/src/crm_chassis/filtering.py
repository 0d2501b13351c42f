"""List RPC filtering (AIP-160 subset), ordering (AIP-132) and keyset pagination.

One copy for every service: a caller declares which fields may be filtered and sorted on,
and gets back SQLAlchemy Core expressions. Every value is a bound parameter, and every
problem with the request is `InvalidArgument` naming `filter`, `order_by` or `page_token`.

Filter grammar
--------------
::

    filter     := [expr]                         (empty or blank: no filtering)
    expr       := and_expr { "OR" and_expr }
    and_expr   := unary { "AND" unary }           (AND binds tighter than OR)
    unary      := ("NOT" | "-") unary | primary
    primary    := "(" expr ")" | comparison
    comparison := FIELD OP value
    OP         := "=" | "!=" | "<" | "<=" | ">" | ">=" | ":"
    FIELD      := NAME { "." NAME }               NAME = [A-Za-z_][A-Za-z0-9_]*
    value      := STRING | ["-"]NUMBER | "true" | "false" | "null" | NAME

- ``AND``, ``OR`` and ``NOT`` are upper case and reserved. Note that AIP-160 itself binds
  OR tighter than AND; here AND binds tighter, as in SQL (use parentheses when unsure).
  There is no implicit AND: ``a = 1 b = 2`` is a syntax error.
- STRING: ``"..."`` or ``'...'``; a backslash escapes the next character (``\\n``, ``\\t``
  and ``\\r`` mean newline, tab and carriage return). A trailing unescaped ``*`` inside a
  quoted string makes a case-insensitive prefix match with ``=`` / ``!=``
  (``name = "Ali*"`` is ``name ILIKE 'Ali%'``, with ``%`` and ``_`` in the text matched
  literally); ``"Ali\\*"`` is the literal text ``Ali*``. A ``*`` elsewhere is literal.
- NUMBER: ``12``, ``-3``, ``2.50``, ``1e3`` (no quotes).
- ``null`` only with ``=`` / ``!=``: ``IS NULL`` / ``IS NOT NULL``.
- NAME as a value is bare text: an enum value name (``state = ACTIVE``) or a string
  (``tags:vip``). Anything else (``groups/1``) must be quoted.

Field types (`FieldType`) and the operators they take:

=============  ==============================  ==========================================
type           operators                       values
=============  ==============================  ==========================================
string         = != < <= > >=                  string, bare name or number text
int            = != < <= > >=                  integer (64-bit)
float          = != < <= > >=                  number, compared exactly (Decimal)
timestamp      = != < <= > >=                  quoted RFC 3339 ``"2026-01-31T09:30:00Z"``
                                               (offset required, digits past microseconds
                                               dropped) or a quoted date (midnight UTC)
date           = != < <= > >=                  quoted ``"2026-01-31"``
bool           = !=                            ``true`` / ``false``
enum           = !=                            a value name from the field's mapping
string_array   : (has)                         string: ``tags:vip``, ``groups:"groups/1"``
=============  ==============================  ==========================================

Relative time: a timestamp or date field also takes a time relative to the moment the filter
is compiled (``compile(text, now=...)``; the current time by default), so a stored filter
drifts with the clock::

    reltime  := ANCHOR [("+" | "-") DURATION]
    ANCHOR   := now | today | this_week | this_month | this_year | this_jalali_month | this_jalali_year
    DURATION := NUMBER UNIT        UNIT := s | min | h | d | w   (seconds, minutes, hours, days, weeks)

``last_purchase_time >= now - 90d`` (bought in the last 90 days), ``last_complaint_time >=
this_month`` (complained this month), ``create_time < today - 2w``. ``today`` and the
``this_*`` anchors are the start of the day, week (Saturday), month or year in the schema's
time zone (Asia/Tehran by default); the Jalali ones of the Persian calendar's month and year.
A date field compares with the date of that instant in the zone. `FilterSchema.analyse` also
says whether a filter uses relative time (it must be re-evaluated as time passes) and which
fields it names.

Any field also takes ``= null`` / ``!= null``. A field compiled by a callable (an EXISTS
over a join table...) gets the operator and the converted value; see `FilterField`.

NULL semantics: the filter is two-valued logic. A comparison with a NULL column is false,
except ``!=`` which is true (``IS DISTINCT FROM``), and ``NOT x`` is exactly the rows where
``x`` is not true: ``a != 1`` and ``NOT a = 1`` select the same rows, NULLs included.

Limits: at most 2000 characters and 20 levels of nesting (parentheses and NOT/``-``).
Errors say what is wrong and where, e.g. ``unknown field 'colour' at position 12;
filterable fields: ...``; positions count characters from 1.

Ordering and keyset pagination
------------------------------
``order_by`` is ``"field [asc|desc] {, field [asc|desc]}"`` over a mapping of sortable
fields; `with_tiebreaker` appends a unique column so the order is total. Pages continue
strictly after the last row returned (`keyset_condition`); the sort values of that row go
in a `PageTokens` token with a fingerprint of the filter and order_by
(`encode_page_token` / `decode_page_token` / `query_fingerprint`).

NULLs in sort columns sort as greater than every value, which is PostgreSQL's default
(``ASC NULLS LAST``, ``DESC NULLS FIRST``); use `order_by_clauses` for the ORDER BY so the
query and the keyset condition agree (and a default b-tree index still serves it).

Usage::

    FILTERS = FilterSchema(
        FilterField("display_name", customers.c.display_name),
        FilterField("create_time", customers.c.create_time, FieldType.TIMESTAMP),
        FilterField("state", customers.c.state, FieldType.ENUM, enum_values={"ACTIVE": 1, "CLOSED": 2}),
        FilterField("tags", customers.c.tags, FieldType.STRING_ARRAY),
        FilterField(
            "groups",
            lambda op, value: sa.exists().where(
                members.c.customer_id == customers.c.id, column_condition(members.c.group_name, "=", value)
            ),
            FieldType.STRING_ARRAY,
        ),
    )
    SORTABLE = {"create_time": customers.c.create_time, "display_name": customers.c.display_name}

    where = FILTERS.compile(request.filter)
    order = with_tiebreaker(parse_order_by(request.order_by or "create_time desc", SORTABLE), customers.c.id)
    fingerprint = query_fingerprint(request.filter, request.order_by)
    stmt = sa.select(customers).where(where).order_by(*order_by_clauses(order)).limit(limit + 1)
    last = decode_page_token(tokens, request.page_token, order, fingerprint)
    if last is not None:
        stmt = stmt.where(keyset_condition(order, last))
    rows = conn.execute(stmt).all()
    next_token = ""
    if len(rows) > limit:
        rows = rows[:limit]
        next_token = encode_page_token(tokens, rows[-1], order, fingerprint)
"""

from __future__ import annotations

import datetime as dt
import enum
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple, NoReturn
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.sql.elements import ColumnElement

from . import persian
from .errors import InvalidArgument
from .pagination import PageTokens

MAX_FILTER_LENGTH = 2000
MAX_FILTER_DEPTH = 20
MAX_ORDER_BY_LENGTH = 2000

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_FIELD_RE = re.compile(rf"{_NAME}(?:\.{_NAME})*")
_NUMBER_RE = re.compile(r"[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_INT_RE = re.compile(r"-?[0-9]+")
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_TIMESTAMP_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_KEYWORDS = frozenset({"AND", "OR", "NOT"})
_DURATION_RE = re.compile(r"([0-9]+)(s|min|h|d|w)(?![A-Za-z0-9_])")
_UNITS = {"s": 1, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
ANCHORS = ("now", "today", "this_week", "this_month", "this_year", "this_jalali_month", "this_jalali_year")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}


class FieldType(enum.StrEnum):
    STRING = "string"
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    TIMESTAMP = "timestamp"
    DATE = "date"
    ENUM = "enum"
    STRING_ARRAY = "string_array"


_ORDERED = frozenset({"=", "!=", "<", "<=", ">", ">="})
_OPERATORS: dict[FieldType, frozenset[str]] = {
    FieldType.STRING: _ORDERED,
    FieldType.INT: _ORDERED,
    FieldType.FLOAT: _ORDERED,
    FieldType.TIMESTAMP: _ORDERED,
    FieldType.DATE: _ORDERED,
    FieldType.BOOL: frozenset({"=", "!="}),
    FieldType.ENUM: frozenset({"=", "!="}),
    FieldType.STRING_ARRAY: frozenset({":"}),
}


class Prefix(str):
    """A string value written with a trailing ``*``: values starting with it (any case)."""

    __slots__ = ()


Compiler = Callable[[str, Any], ColumnElement[bool]]


@dataclass(frozen=True)
class FilterField:
    """A filterable field: its public name, what it compiles to, and its value type.

    `target` is a column (or any SQL expression), or a callable ``(op, value) -> boolean
    expression`` for anything else (an EXISTS over a join table...). The callable gets the
    operator as written (``"="``, ``"<"``, ``":"``...) and the value already converted for
    `type` (int, Decimal, datetime, date, bool, the enum's stored value, str or `Prefix`;
    None for ``null``); it may raise ValueError to reject a value (reported with its
    position). `column_condition` builds the usual condition on a column for it.
    `operators` overrides the operators the type allows.
    """

    name: str
    target: ColumnElement[Any] | Compiler
    type: FieldType | str = FieldType.STRING
    enum_values: Mapping[str, Any] | None = None
    operators: frozenset[str] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", FieldType(self.type))
        if not _FIELD_RE.fullmatch(self.name) or set(self.name.split(".")) & _KEYWORDS:
            raise ValueError(f"invalid filter field name {self.name!r}")
        if (self.type is FieldType.ENUM) != (self.enum_values is not None):
            raise ValueError(f"filter field {self.name!r}: enum_values is for (and required by) enum fields")
        ops = frozenset(self.operators) if self.operators is not None else _OPERATORS[self.type]
        if not ops <= _ORDERED | {":"}:
            raise ValueError(f"filter field {self.name!r}: unknown operators {sorted(ops - _ORDERED - {':'})}")
        object.__setattr__(self, "operators", ops)


class FilterSchema:
    """The filterable fields of one List RPC; `compile` turns a filter string into SQL."""

    def __init__(
        self,
        *fields: FilterField,
        max_length: int = MAX_FILTER_LENGTH,
        max_depth: int = MAX_FILTER_DEPTH,
        zone: str = "Asia/Tehran",
    ) -> None:
        self.fields: dict[str, FilterField] = {}
        for f in fields:
            if f.name in self.fields:
                raise ValueError(f"duplicate filter field {f.name!r}")
            self.fields[f.name] = f
        self.max_length = max_length
        self.max_depth = max_depth
        self.zone = ZoneInfo(zone)

    def compile(self, text: str, now: dt.datetime | None = None) -> ColumnElement[bool]:
        """The boolean SQL expression for `text` (``true`` when blank); InvalidArgument on `filter`.
        Relative times (``now - 90d``) are resolved against `now` (default: the current time)."""
        return self.analyse(text, now).where

    def analyse(self, text: str, now: dt.datetime | None = None, field: str = "filter") -> Compiled:
        """`compile` plus what the filter depends on: whether it uses relative time, which fields
        it names. Errors are InvalidArgument naming `field`."""
        text = text or ""
        try:
            if len(text) > self.max_length:
                _fail(self.max_length, f"filter is longer than {self.max_length} characters")
            parser = _Parser(text, _tokenize(text), self, now)
            where = parser.parse()
        except InvalidArgument as exc:
            if field == "filter":
                raise
            raise InvalidArgument.field(field, exc.violations[0].description) from None
        return Compiled(where, parser.relative, frozenset(parser.names), tuple(parser.relative_values))


@dataclass(frozen=True)
class Compiled:
    """A compiled filter: the WHERE expression, whether it uses relative time (``now - 90d``:
    its result drifts with the clock), the fields it names, and each relative comparison's
    (field, resolved value) in filter order: compiled at two times, a row's result can only
    differ if a field is between its two values (what a periodic re-evaluation must look at)."""

    where: ColumnElement[bool]
    relative: bool
    fields: frozenset[str]
    relative_values: tuple[tuple[str, Any], ...] = ()


# -- errors ---------------------------------------------------------------------------------


def _fail(pos: int, message: str, hint: str = "", field: str = "filter") -> NoReturn:
    description = f"{message} at position {pos + 1}" + (f"; {hint}" if hint else "")
    raise InvalidArgument.field(field, description)


# -- tokenizer ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "(" ")" "-" "op" "word" "string" "number" "end"
    text: str  # operator, word, number text or the decoded string (without a wildcard star)
    pos: int  # 0-based offset of the first character
    end: int = 0  # offset just after the token
    prefix: bool = False  # a string that ended in an unescaped "*"
    value: Any = None  # a resolved relative time (kind "time")

    def describe(self) -> str:
        if self.kind == "end":
            return "end of filter"
        if self.kind == "string":
            shown = self.text if len(self.text) <= 30 else self.text[:27] + "..."
            return f"string {shown!r}"
        return f"{self.text!r}"


def _tokenize(src: str) -> list[_Token]:
    out: list[_Token] = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if c.isspace():
            i += 1
        elif c in "()":
            out.append(_Token(c, c, i, i + 1))
            i += 1
        elif c in "<>!=:":
            op = src[i : i + 2] if src[i : i + 2] in ("<=", ">=", "!=") else c
            if op == "!":
                _fail(i, "unexpected '!'", "use '!=' or NOT")
            out.append(_Token("op", op, i, i + len(op)))
            i += len(op)
        elif c in "-+":
            out.append(_Token(c, c, i, i + 1))
            i += 1
        elif c in "\"'":
            tok = _string(src, i)
            out.append(tok)
            i = tok.end
        elif c.isascii() and c.isdigit() and (d := _DURATION_RE.match(src, i)):
            out.append(_Token("duration", d.group(), i, d.end()))
            i = d.end()
        elif c.isascii() and c.isdigit():
            m = _NUMBER_RE.match(src, i)
            end = m.end()
            if end < n and (src[end].isalnum() or src[end] in "_."):
                hint = "quote strings, timestamps and dates"
                if src[end : end + 1] == "m" and src[end : end + 3] != "min":
                    hint = "minutes are 'min'; for months use days (90d) or this_month"
                _fail(i, f"malformed number {src[i : end + 1]!r}", hint)
            out.append(_Token("number", m.group(), i, end))
            i = end
        elif c.isascii() and (c.isalpha() or c == "_"):
            m = _FIELD_RE.match(src, i)
            out.append(_Token("word", m.group(), i, m.end()))
            i = m.end()
        else:
            _fail(i, f"unexpected character {c!r}")
    out.append(_Token("end", "", n, n))
    return out


def _string(src: str, start: int) -> _Token:
    quote, buf, i, n = src[start], [], start + 1, len(src)
    star = False  # the last character taken was an unescaped "*"
    while True:
        if i >= n:
            _fail(start, "unterminated string")
        c = src[i]
        if c == "\\":
            if i + 1 >= n:
                _fail(start, "unterminated string")
            buf.append(_ESCAPES.get(src[i + 1], src[i + 1]))
            star, i = False, i + 2
            continue
        if c == quote:
            break
        if c == "\x00" or not _encodable(c):
            _fail(i, "invalid character in string")
        buf.append(c)
        star, i = c == "*", i + 1
    if star:
        buf.pop()
    return _Token("string", "".join(buf), start, i + 1, prefix=star)


def _encodable(c: str) -> bool:
    try:
        c.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: the driver could not send it
        return False
    return True


# -- parser ---------------------------------------------------------------------------------


class _Parser:
    def __init__(self, src: str, tokens: list[_Token], schema: FilterSchema, now: dt.datetime | None = None) -> None:
        self.src, self.tokens, self.schema, self.i = src, tokens, schema, 0
        self.now = now
        self.relative = False  # a relative time was used
        self.names: set[str] = set()
        self.relative_values: list[tuple[str, Any]] = []

    @property
    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def keyword(self, word: str) -> bool:
        return self.peek.kind == "word" and self.peek.text == word

    def parse(self) -> ColumnElement[bool]:
        if self.peek.kind == "end":
            return sa.true()
        expr = self.disjunction(0)
        tok = self.peek
        if tok.kind == ")":
            _fail(tok.pos, "unbalanced ')'")
        if tok.kind != "end":
            hint = f"did you mean {tok.text.upper()}?" if tok.text.upper() in _KEYWORDS else ""
            _fail(tok.pos, f"expected AND, OR or the end of the filter, found {tok.describe()}", hint)
        return expr

    def disjunction(self, depth: int) -> ColumnElement[bool]:
        terms = [self.conjunction(depth)]
        while self.keyword("OR"):
            self.take()
            terms.append(self.conjunction(depth))
        return terms[0] if len(terms) == 1 else sa.or_(*terms)

    def conjunction(self, depth: int) -> ColumnElement[bool]:
        terms = [self.unary(depth)]
        while self.keyword("AND"):
            self.take()
            terms.append(self.unary(depth))
        return terms[0] if len(terms) == 1 else sa.and_(*terms)

    def nest(self, depth: int, tok: _Token) -> int:
        if depth >= self.schema.max_depth:
            _fail(tok.pos, f"filter is nested deeper than {self.schema.max_depth} levels")
        return depth + 1

    def unary(self, depth: int) -> ColumnElement[bool]:
        tok = self.peek
        if self.keyword("NOT") or tok.kind == "-":
            inner = self.nest(depth, tok)
            self.take()
            return negate(self.unary(inner))
        if tok.kind == "(":
            inner = self.nest(depth, tok)
            self.take()
            if self.peek.kind == ")":
                _fail(self.peek.pos, "empty parentheses")
            expr = self.disjunction(inner)
            if self.peek.kind != ")":
                _fail(
                    self.peek.pos,
                    f"expected ')' or AND/OR, found {self.peek.describe()}",
                    f"unbalanced '(' at position {tok.pos + 1}",
                )
            self.take()
            return expr
        return self.comparison()

    def comparison(self) -> ColumnElement[bool]:
        tok = self.take()
        if tok.kind != "word" or tok.text in _KEYWORDS:
            _fail(tok.pos, f"expected a field name, found {tok.describe()}")
        field = self.schema.fields.get(tok.text)
        if field is None:
            names = sorted(self.schema.fields)
            shown = ", ".join(names[:30]) + (", ..." if len(names) > 30 else "")
            _fail(tok.pos, f"unknown field {tok.text!r}", f"filterable fields: {shown or 'none'}")
        self.names.add(field.name)
        op = self.take()
        if op.kind != "op":
            _fail(op.pos, f"expected an operator (= != < <= > >= :) after {tok.text!r}, found {op.describe()}")
        value = self.value(field)
        return self.condition(field, op, value)

    def relative_time(self, anchor: _Token, field: FilterField) -> _Token:
        """ANCHOR [(+|-) DURATION] as a "time" token holding the instant."""
        now = self.now if self.now is not None else dt.datetime.now(dt.UTC)
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        at = _anchor(anchor.text, now, self.schema.zone)
        end = anchor.end
        if self.peek.kind in ("+", "-"):
            sign = self.take()
            dur = self.take()
            if dur.kind != "duration":
                unit = "; minutes are 'min'" if dur.kind == "word" and dur.text.startswith("m") else ""
                _fail(
                    dur.pos,
                    f"expected a duration like 90d, 12h, 30min, 45s or 2w after {sign.text!r}, found {dur.describe()}",
                    f"units: s, min, h, d, w{unit}",
                )
            m = _DURATION_RE.fullmatch(dur.text)
            seconds = int(m.group(1)) * _UNITS[m.group(2)]
            if seconds > 200 * 366 * 86400:
                _fail(dur.pos, f"duration {dur.text} is longer than 200 years")
            delta = dt.timedelta(seconds=seconds)
            at = at + delta if sign.kind == "+" else at - delta
            end = dur.end
        self.relative = True
        value = at.astimezone(self.schema.zone).date() if field.type is FieldType.DATE else at
        return _Token("time", self.src[anchor.pos : end], anchor.pos, end, value=value)

    def value(self, field: FilterField | None = None) -> _Token:
        tok = self.take()
        if (
            tok.kind == "word"
            and tok.text in ANCHORS
            and field is not None
            and field.type in (FieldType.TIMESTAMP, FieldType.DATE)
        ):
            return self.relative_time(tok, field)
        if tok.kind == "-":
            num = self.peek
            if num.kind != "number" or num.pos != tok.end:
                _fail(tok.pos, "expected a number after '-'")
            self.take()
            return _Token("number", "-" + num.text, tok.pos, num.end)
        if tok.kind in ("string", "number") or (tok.kind == "word" and tok.text not in _KEYWORDS):
            return tok
        _fail(tok.pos, f"expected a value, found {tok.describe()}")

    def condition(self, field: FilterField, op: _Token, tok: _Token) -> ColumnElement[bool]:
        is_null = tok.kind == "word" and tok.text == "null"
        if is_null:
            if op.text not in ("=", "!="):
                _fail(op.pos, f"null can only be compared with = or !=, not {op.text!r}")
        elif op.text not in field.operators:
            allowed = " ".join(o for o in ("=", "!=", "<", "<=", ">", ">=", ":") if o in field.operators)
            hint = f"{field.name!r} takes {allowed}"
            if op.text == ":":
                hint = f"':' (has) is for repeated fields; {hint}"
            _fail(op.pos, f"operator {op.text!r} is not supported for {field.type.value} field {field.name!r}", hint)
        value = None if is_null else _convert(field, op.text, tok)
        if tok.kind == "time":
            self.relative_values.append((field.name, value))
        if callable(field.target) and not isinstance(field.target, sa.ColumnElement):
            try:
                return field.target(op.text, value)
            except ValueError as exc:
                _fail(tok.pos, f"invalid value for {field.name!r}: {exc}")
        return column_condition(field.target, op.text, value)


# -- values ---------------------------------------------------------------------------------


def _convert(field: FilterField, op: str, tok: _Token) -> Any:
    t, name = field.type, field.name

    def bad(expected: str, hint: str = "") -> NoReturn:
        _fail(tok.pos, f"{field.name!r} expects {expected}, found {tok.describe()}", hint)

    if tok.prefix and (t not in (FieldType.STRING, FieldType.STRING_ARRAY) or op not in ("=", "!=")):
        _fail(tok.pos, f"a trailing '*' wildcard only works with = or != on string fields ({name!r})")
    if t in (FieldType.STRING, FieldType.STRING_ARRAY):
        if tok.kind == "word" and tok.text in ("true", "false"):
            bad("a string", "quote it")
        return Prefix(tok.text) if tok.prefix else tok.text
    if t is FieldType.INT:
        if tok.kind != "number" or not _INT_RE.fullmatch(tok.text):
            bad("an integer")
        value = int(tok.text)
        if not _INT64_MIN <= value <= _INT64_MAX:
            bad("a 64-bit integer")
        return value
    if t is FieldType.FLOAT:
        if tok.kind != "number":
            bad("a number")
        try:
            value = Decimal(tok.text)
        except InvalidOperation:  # pragma: no cover - the tokenizer only makes valid numbers
            bad("a number")
        if not value.is_finite() or not -300 <= value.adjusted() <= 300:
            bad("a number between 1e-300 and 1e300")
        return value
    if t is FieldType.BOOL:
        if tok.kind != "word" or tok.text not in ("true", "false"):
            bad("true or false")
        return tok.text == "true"
    if t is FieldType.ENUM:
        assert field.enum_values is not None
        if tok.kind not in ("word", "string") or tok.text not in field.enum_values:
            names = list(field.enum_values)
            shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            bad("one of its value names", f"{name!r} values: {shown}")
        return field.enum_values[tok.text]
    if tok.kind == "time" and t in (FieldType.DATE, FieldType.TIMESTAMP):
        return tok.value
    if t is FieldType.DATE:
        if tok.kind != "string" or not _DATE_RE.fullmatch(tok.text):
            bad('a quoted date like "2026-01-31" or, Jalali, "1405-01-01"')
        day = _day(tok.text)
        if day is None:
            bad('a valid date like "2026-01-31" or, Jalali, "1405-01-01"')
        return day
    if t is FieldType.TIMESTAMP:
        hint = 'like "2026-01-31T09:30:00Z", "2026-01-31" or, Jalali, "1405-01-01"'
        if tok.kind != "string":
            bad("a quoted RFC 3339 timestamp or a relative time (now - 90d, this_month)", hint)
        try:
            if _DATE_RE.fullmatch(tok.text):
                day = _day(tok.text)
                if day is None:
                    raise ValueError(tok.text)
                # A Jalali day starts at midnight in Tehran (where people write them); a
                # Gregorian date-only value at midnight UTC, as RFC 3339 dates are read.
                zone = _TEHRAN if int(tok.text[:4]) < JALALI_BEFORE else dt.UTC
                return dt.datetime.combine(day, dt.time(), zone)
            if _TIMESTAMP_RE.fullmatch(tok.text):
                return _parse_rfc3339(tok.text)
        except (ValueError, OverflowError):
            pass
        bad("a valid RFC 3339 timestamp with a UTC offset", hint)
    raise AssertionError(t)  # pragma: no cover


def _anchor(name: str, now: dt.datetime, zone: ZoneInfo) -> dt.datetime:
    """The instant an anchor names: now, or the start of today / this week (Saturday) / month /
    year (Gregorian or Jalali) in `zone`."""
    if name == "now":
        return now
    local = now.astimezone(zone).date()
    if name == "today":
        day = local
    elif name == "this_week":  # the Iranian week starts on Saturday
        day = local - dt.timedelta(days=(local.weekday() - 5) % 7)
    elif name == "this_month":
        day = local.replace(day=1)
    elif name == "this_year":
        day = local.replace(month=1, day=1)
    else:
        j = persian.to_jalali(local)
        if name == "this_jalali_month":
            day = persian.jalali_month_bounds(j.year, j.month)[0]
        else:
            day = persian.jalali_year_bounds(j.year)[0]
    return dt.datetime.combine(day, dt.time(), zone)


# A date whose year is below this is a Jalali (Persian calendar) date: 1405-01-01 is 2026-03-21.
JALALI_BEFORE = 1700
_TEHRAN = ZoneInfo("Asia/Tehran")


def _day(text: str) -> dt.date | None:
    """A YYYY-MM-DD date, Gregorian or (year below 1700) Jalali; None if there is no such day."""
    y, m, d = (int(x) for x in text.split("-"))
    if y < JALALI_BEFORE:
        return persian.jalali_to_gregorian(y, m, d)
    try:
        return dt.date(y, m, d)
    except ValueError:
        return None


def _parse_rfc3339(text: str) -> dt.datetime:
    text = text.replace("t", "T").replace("z", "Z").replace(" ", "T").replace("Z", "+00:00")
    date_time, frac_and_offset = text[:19], text[19:]
    micros = ""
    if frac_and_offset.startswith("."):
        digits = re.match(r"\.([0-9]+)", frac_and_offset).group(1)
        micros = digits[:6].ljust(6, "0")  # PostgreSQL keeps microseconds; finer digits are dropped
        frac_and_offset = frac_and_offset[1 + len(digits) :]
    return dt.datetime.fromisoformat(date_time + (f".{micros}" if micros else "") + frac_and_offset)


# -- SQL ------------------------------------------------------------------------------------


def negate(expr: ColumnElement[bool]) -> ColumnElement[bool]:
    """NOT with two-valued logic: true where `expr` is false *or NULL*."""
    return sa.not_(sa.func.coalesce(expr, sa.false()))


def _like_prefix(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _unsized(type_: sa.types.TypeEngine) -> sa.types.TypeEngine:
    # Casting to varchar(n) would silently truncate the value (and then match a prefix).
    if isinstance(type_, sa.String) and type_.length is not None:
        type_ = type_.copy()
        type_.length = None
    return type_


def array_contains(column: ColumnElement[Any], value: Any) -> ColumnElement[bool]:
    """`column` (an array) has `value` as an element: ``@>`` (GIN-indexable) or ``= ANY``."""
    if isinstance(column.type, sa.ARRAY) and not isinstance(column.type.item_type, sa.CHAR):
        array_type = pg.ARRAY(_unsized(column.type.item_type))
        return column.op("@>", is_comparison=True)(sa.literal([value], array_type))
    return sa.literal(value) == sa.any_(column)


def _bind(column: ColumnElement[Any], value: Any) -> Any:
    # A bound value is cast to the column's type: widen it so that `int_column > 9999999999`
    # or `int_column < 1.5` compares instead of failing the cast in PostgreSQL.
    if isinstance(value, bool):  # SQLAlchemy takes a bare True/False only with = and !=
        return sa.literal(value, sa.Boolean())
    if isinstance(column.type, sa.Integer):
        if isinstance(value, int):
            return sa.literal(value, sa.BigInteger())
        if isinstance(value, Decimal):
            return sa.literal(value, sa.Numeric())
    return value


def column_condition(column: ColumnElement[Any], op: str, value: Any) -> ColumnElement[bool]:
    """The condition ``column OP value`` with this module's semantics (see the docstring)."""
    if value is None:
        if op == "=":
            return column.is_(None)
        if op == "!=":
            return column.is_not(None)
        raise ValueError("null takes only = and !=")
    if isinstance(value, Prefix):
        if op not in ("=", "!="):
            raise ValueError("a '*' wildcard takes only = and !=")
        like = column.ilike(_like_prefix(str(value)), escape="\\")
        return like if op == "=" else negate(like)
    if op == ":":
        return array_contains(column, value)
    value = _bind(column, value)
    if op == "=":
        return column == value
    if op == "!=":
        return column.is_distinct_from(value)
    if op == "<":
        return column < value
    if op == "<=":
        return column <= value
    if op == ">":
        return column > value
    if op == ">=":
        return column >= value
    raise ValueError(f"unknown operator {op!r}")


# -- order_by -------------------------------------------------------------------------------


class SortKey(NamedTuple):
    column: ColumnElement[Any]
    descending: bool = False


def parse_order_by(text: str, sortable: Mapping[str, ColumnElement[Any]]) -> list[SortKey]:
    """``"a desc, b"`` against the sortable fields; [] when blank; InvalidArgument on `order_by`."""
    text = text or ""
    if len(text) > MAX_ORDER_BY_LENGTH:
        _fail(MAX_ORDER_BY_LENGTH, f"order_by is longer than {MAX_ORDER_BY_LENGTH} characters", field="order_by")
    if not text.strip():
        return []
    keys: list[SortKey] = []
    seen: set[str] = set()
    start = 0
    for item in text.split(","):
        words = [(m.group(), start + m.start()) for m in re.finditer(r"\S+", item)]
        if not words:
            _fail(start, "empty sort field", "is there a stray comma?", field="order_by")
        (name, pos), rest = words[0], words[1:]
        if not _FIELD_RE.fullmatch(name):
            _fail(pos, f"invalid field name {name!r}", field="order_by")
        if name not in sortable:
            shown = ", ".join(sorted(sortable)) or "none"
            _fail(pos, f"cannot sort by {name!r}", f"sortable fields: {shown}", field="order_by")
        if name in seen:
            _fail(pos, f"{name!r} appears twice", field="order_by")
        seen.add(name)
        descending = False
        if rest:
            word, wpos = rest[0]
            if word.lower() not in ("asc", "desc"):
                _fail(wpos, f"expected asc, desc or ',' after {name!r}, found {word!r}", field="order_by")
            descending = word.lower() == "desc"
            if len(rest) > 1:
                _fail(rest[1][1], f"expected ',' found {rest[1][0]!r}", field="order_by")
        keys.append(SortKey(sortable[name], descending))
        start += len(item) + 1
    return keys


def with_tiebreaker(
    order: Sequence[tuple[ColumnElement[Any], bool]], column: ColumnElement[Any], descending: bool = False
) -> list[SortKey]:
    """`order` with the unique `column` appended unless it is already in it (a total order)."""
    keys = [SortKey(c, d) for c, d in order]
    if not any(c.compare(column) for c, _ in keys):
        keys.append(SortKey(column, descending))
    return keys


def order_by_clauses(order: Sequence[tuple[ColumnElement[Any], bool]]) -> list[ColumnElement[Any]]:
    """ORDER BY clauses that match `keyset_condition`: NULL sorts as the greatest value."""
    return [c.desc().nulls_first() if d else c.asc().nulls_last() for c, d in order]


# -- keyset ---------------------------------------------------------------------------------


def _not_null(column: ColumnElement[Any]) -> bool:
    return getattr(column, "nullable", True) is False


def keyset_condition(
    order: Sequence[tuple[ColumnElement[Any], bool]], last_values: Sequence[Any]
) -> ColumnElement[bool]:
    """Rows strictly after the row whose sort values are `last_values`, in `order`.

    NULL is greater than every value (as `order_by_clauses` sorts). When every key has the
    same direction, is NOT NULL and the values are not NULL, this is one row-value
    comparison ``(a, b) > (x, y)``, which PostgreSQL serves from a matching index.
    Otherwise the expanded chain ``a > x OR (a = x AND b < y) OR ...``.
    """
    if len(order) != len(last_values) or not order:
        raise ValueError(f"{len(last_values)} keyset values for {len(order)} sort keys")
    directions = {d for _, d in order}
    if len(directions) == 1 and all(
        _not_null(c) and v is not None for (c, _), v in zip(order, last_values, strict=True)
    ):
        left = sa.tuple_(*(c for c, _ in order))
        right = sa.tuple_(*(sa.literal(v, c.type) for (c, _), v in zip(order, last_values, strict=True)))
        return left < right if directions == {True} else left > right
    branches: list[ColumnElement[bool]] = []
    equal: list[ColumnElement[bool]] = []
    for (column, descending), value in zip(order, last_values, strict=True):
        if value is None:
            after = column.is_not(None) if descending else None  # nothing sorts after NULL ascending
            same = column.is_(None)
        else:
            bound = sa.literal(value, column.type)
            after = column < bound if descending else column > bound
            if not descending and not _not_null(column):
                after = sa.or_(after, column.is_(None))
            same = column == bound
        if after is not None:
            branches.append(sa.and_(*equal, after))
        equal.append(same)
    if not branches:
        return sa.false()
    condition = sa.or_(*branches)
    column, descending = order[0]
    if last_values[0] is not None and _not_null(column):  # a range on the leading column for the index
        bound = sa.literal(last_values[0], column.type)
        condition = sa.and_(column <= bound if descending else column >= bound, condition)
    return condition


def sort_values(row: Any, order: Sequence[tuple[ColumnElement[Any], bool]]) -> list[Any]:
    """The values of `row` (a result Row) for each sort key."""
    mapping = row._mapping
    out = []
    for column, _ in order:
        try:
            out.append(mapping[column])
        except KeyError:
            out.append(mapping[column.key])
    return out


def to_json_values(values: Iterable[Any]) -> list[Any]:
    """Sort values as JSON-safe values (datetime/date/time ISO 8601, Decimal and UUID as strings)."""
    out: list[Any] = []
    for v in values:
        if v is None or isinstance(v, bool | int | str | float):
            out.append(v)
        elif isinstance(v, dt.datetime | dt.date | dt.time):
            out.append(v.isoformat())
        elif isinstance(v, Decimal | uuid.UUID):
            out.append(str(v))
        elif isinstance(v, enum.Enum):
            out.append(v.name)
        else:
            raise TypeError(f"cannot put a {type(v).__name__} sort value in a page token")
    return out


def from_json_values(order: Sequence[tuple[ColumnElement[Any], bool]], data: Any) -> list[Any]:
    """Inverse of `to_json_values`, by the sort columns' types; InvalidArgument on `page_token`."""
    bad = InvalidArgument.field("page_token", "is not a valid page token for this query")
    if not isinstance(data, list) or len(data) != len(order):
        raise bad
    out = []
    for (column, _), value in zip(order, data, strict=True):
        try:
            out.append(None if value is None else _from_json(column.type, value))
        except (ValueError, TypeError, KeyError, InvalidOperation, NotImplementedError):
            raise bad from None
    return out


def _from_json(type_: sa.types.TypeEngine, value: Any) -> Any:
    if isinstance(type_, sa.Enum) and type_.enum_class is not None:
        return type_.enum_class[value]
    try:
        python_type = type_.python_type
    except NotImplementedError:
        return value
    if python_type is bool:
        ok = isinstance(value, bool)
    elif python_type is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif python_type is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif python_type is str:
        ok = isinstance(value, str)
    elif python_type in (dt.datetime, dt.date, dt.time, Decimal, uuid.UUID):
        ok = isinstance(value, str)
        if ok:
            value = python_type(value) if python_type in (Decimal, uuid.UUID) else python_type.fromisoformat(value)
    else:
        ok = True
    if not ok:
        raise TypeError(f"{value!r} is not a {python_type.__name__}")
    return value


def query_fingerprint(filter: str = "", order_by: str = "", **extra: Any) -> str:
    """A fingerprint for page tokens: a token only continues the same filter and order_by."""
    order_by = ",".join(" ".join(part.split()) for part in (order_by or "").split(","))
    return PageTokens.fingerprint(filter=(filter or "").strip(), order_by=order_by, **extra)


def encode_page_token(
    tokens: PageTokens, row: Any, order: Sequence[tuple[ColumnElement[Any], bool]], fingerprint: str = ""
) -> str:
    """A page token continuing after `row` (the last row of this page)."""
    return tokens.encode(to_json_values(sort_values(row, order)), fingerprint)


def decode_page_token(
    tokens: PageTokens, token: str, order: Sequence[tuple[ColumnElement[Any], bool]], fingerprint: str = ""
) -> list[Any] | None:
    """The last row's sort values from `token` (None when blank), for `keyset_condition`."""
    data = tokens.decode(token, fingerprint)
    return None if data is None else from_json_values(order, data)


def keyset_page(
    conn: sa.Connection, query: sa.Select, order: list, tokens: PageTokens, purpose: str, limit: int, token: str
):
    """One keyset page of `query` in `order` ([(column, descending), ...], ending in a unique
    key), after the row the page token names; returns (rows, next page token, "" at the end)."""
    after = decode_page_token(tokens, token, order, purpose)
    q = query.order_by(*order_by_clauses(order)).limit(limit + 1)
    if after is not None:
        q = q.where(keyset_condition(order, after))
    rows = list(conn.execute(q))
    if len(rows) <= limit:
        return rows, ""
    rows = rows[:limit]
    return rows, encode_page_token(tokens, rows[-1], order, purpose)


def newest_first(table: sa.Table) -> list:
    """Newest first, by (create_time, id): the order of notes, jobs and the like."""
    return [(table.c.create_time, True), (table.c.id, True)]
