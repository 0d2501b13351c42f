"""KnowledgeService (proto/crm/support/v1/answers.proto): the knowledge base of support:
categories (a tree), articles (markdown or plain text) written as drafts, published and
archived, a full-text search with Persian normalisation, views and one rating per reader.

Search, in one place (canned answers use the same columns for suggestions, answers.py):
- each row keeps `search_title` = crm_chassis.persian.normalize(title) and `search_text` =
  normalize(title + body): Arabic ي/ك and Persian ی/ک, a zero-width non-joiner and a space,
  Persian and ASCII digits are the same there, so every spelling of a word meets every other;
- `search_vector` is a generated column, to_tsvector('simple', ...) of those two with the
  title weighted A and the text D (GIN index); `search_head` has a pg_trgm GIN index;
- a query is normalised the same way and split into words; each word matches as a prefix
  (فاکتور finds فاکتورها) and all must match (`w1:* & w2:*`); a partial or misspelt word is
  found by trigram word similarity on search_head, the text's first SEARCH_HEAD characters
  (`query <% search_head`);
- order: a match in the title first (`ts_filter(search_vector, '{a}') @@ query` or a trigram
  match on the title), then ts_rank, then trigram similarity; top N (no pages), each with a
  ts_headline snippet of the normalised text, matches between ** and **.

Articles start as drafts; PublishArticle and ArchiveArticle move them; only published ones are
viewed, rated, suggested and (unless the search asks for other states) found.
"""

from __future__ import annotations

import re

import sqlalchemy as sa
from google.protobuf import empty_pb2
from sqlalchemy.dialects import postgresql as pg

from crm.support.v1 import answers_pb2 as pb
from crm.support.v1 import answers_pb2_grpc
from crm_chassis.auth import Principal
from crm_chassis.dates import set_times
from crm_chassis.errors import AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument
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
from crm_chassis.persian import normalize
from crm_chassis.resources import ResourceName, UpdateMask, changes, check_etag, etag, same_requester

from .runtime import Support
from .tables import TEXTS, categories, metadata
from .tables import UUID as UUID_TYPE

KB_CATEGORY = ResourceName("kbCategories/{kb_category_id}")
ARTICLE = ResourceName("articles/{article_id}")
CATEGORY = ResourceName("categories/{category_id}")  # the ticket categories (tables.categories)

TITLE_LIMIT = 300
ARTICLE_BODY_LIMIT = 200_000
NAME_LIMIT = 200
DESCRIPTION_LIMIT = 2_000
QUERY_LIMIT = 500
MAX_TAGS, TAG_LIMIT = 20, 40
MAX_CATEGORIES = 50
MAX_POSITION = 1_000_000
REQUEST_ID_LIMIT = 128
SEARCH_DEFAULT, SEARCH_MAX = 10, 50
LANGUAGE = re.compile(r"[a-z]{2,8}")

STATES = ("draft", "published", "archived")
FORMATS = ("markdown", "plain")
STATE_ENUM = {s: pb.Article.State.Value(f"STATE_{s.upper()}") for s in STATES}
STATE_OF = {v: k for k, v in STATE_ENUM.items()}
FORMAT_ENUM = {f: pb.Article.Format.Value(f"FORMAT_{f.upper()}") for f in FORMATS}
FORMAT_OF = {v: k for k, v in FORMAT_ENUM.items()}

# The weighted vector of a row with search_title and search_text (kb_articles, canned_answers).
VECTOR_SQL = (
    "setweight(to_tsvector('simple'::regconfig, search_title), 'A') || "
    "setweight(to_tsvector('simple'::regconfig, search_text), 'D')"
)
TSVECTOR = pg.TSVECTOR
NO_PARENT = "00000000-0000-0000-0000-000000000000"


# The part of search_text the trigram match and its similarity read: pg_trgm's word_similarity
# grows with the square of the text where trigrams repeat (a body of one letter repeated:
# 20,000 letters 0.3 s, 400,000 letters 84 s per search that reaches it), so it reads the
# first SEARCH_HEAD characters; the full-text vector still covers the whole text.
SEARCH_HEAD = 20_000
HEAD_SQL = f"left(search_text, {SEARCH_HEAD})"


def search_columns() -> list[sa.Column]:
    """search_title, search_text and the generated search_vector and search_head of a searchable
    table."""
    return [
        sa.Column("search_title", sa.Text, nullable=False, server_default=""),
        sa.Column("search_text", sa.Text, nullable=False, server_default=""),
        sa.Column("search_vector", TSVECTOR, sa.Computed(VECTOR_SQL, persisted=True), nullable=False),
        sa.Column("search_head", sa.Text, sa.Computed(HEAD_SQL, persisted=True), nullable=False),
    ]


def search_indexes(table: sa.Table) -> None:
    sa.Index(f"{table.name}_search", table.c.search_vector, postgresql_using="gin")
    sa.Index(
        f"{table.name}_search_trgm",
        table.c.search_head,
        postgresql_using="gin",
        postgresql_ops={"search_head": "gin_trgm_ops"},
    )


# A word written with a zero-width non-joiner: letter or digit runs joined by single ZWNJs. The
# look-behind lets a match start only where a run starts: without it a run with no ZWNJ after it
# was tried again from each of its letters, each try reading to its end: quadratic, seconds of
# CPU for a canned answer of one 20,000-letter word and a hundred times that for an article body
# of 200,000. With it the work is linear in the text, and the matches are the same (a match
# could only ever start where a run starts).
_COMPOUND = re.compile(r"(?<![^\W_])[^\W_]+(?:\u200c[^\W_]+)+")


def joined_forms(text: str) -> str:
    """The words written with a ZWNJ, also written joined (درخواست‌ها -> درخواستها): normalize
    makes the ZWNJ a space, and these let a reader who types the word joined find it too."""
    return " ".join(dict.fromkeys(normalize(w.replace("\u200c", "")) for w in _COMPOUND.findall(text or "")))


def search_values(title: str, body: str) -> dict:
    """search_title and search_text of a row (normalised; joined forms of ZWNJ words at the end)."""
    text = f"{title}\n{body}"
    return {
        "search_title": " ".join(p for p in (normalize(title), joined_forms(title)) if p),
        "search_text": "\n".join(p for p in (normalize(text), joined_forms(text)) if p),
    }


kb_categories = sa.Table(
    "kb_categories",
    metadata,
    sa.Column("id", UUID_TYPE, primary_key=True, server_default=sa.text("gen_random_uuid()")),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("name_key", sa.Text, nullable=False),  # normalize(display_name): unique per parent
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("parent_id", UUID_TYPE, sa.ForeignKey("kb_categories.id")),
    sa.Column("position", sa.Integer, nullable=False, server_default="0"),
    # the ticket categories whose tickets its articles serve (suggestions prefer them)
    sa.Column("ticket_category_ids", pg.ARRAY(UUID_TYPE), nullable=False, server_default="{}"),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)
kc = kb_categories.c
sa.Index(
    "kb_categories_name",
    sa.func.coalesce(kc.parent_id, sa.text(f"'{NO_PARENT}'::uuid")),
    kc.name_key,
    unique=True,
)
sa.Index("kb_categories_page", kc.position, kc.name_key, kc.id)
sa.Index("kb_categories_parent", kc.parent_id)

kb_articles = sa.Table(
    "kb_articles",
    metadata,
    sa.Column("id", UUID_TYPE, primary_key=True, server_default=sa.text("gen_random_uuid()")),
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("body", sa.Text, nullable=False, server_default=""),
    sa.Column("format", sa.Text, nullable=False, server_default="markdown"),
    sa.Column("category_id", UUID_TYPE, sa.ForeignKey("kb_categories.id")),
    sa.Column("state", sa.Text, nullable=False, server_default="draft"),
    sa.Column("language", sa.Text, nullable=False, server_default="fa"),
    sa.Column("tags", TEXTS, nullable=False, server_default="{}"),
    *search_columns(),
    sa.Column("view_count", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("helpful_count", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("not_helpful_count", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("author", sa.Text, nullable=False, server_default=""),
    sa.Column("publish_time", sa.DateTime(timezone=True)),
    sa.Column("request_id", sa.Text),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.CheckConstraint("state IN ('draft', 'published', 'archived')", name="kb_articles_state"),
    sa.CheckConstraint("format IN ('markdown', 'plain')", name="kb_articles_format"),
)
ka = kb_articles.c
search_indexes(kb_articles)
sa.Index("kb_articles_page", ka.create_time.desc(), ka.id.desc())
sa.Index("kb_articles_category", ka.category_id)
sa.Index("kb_articles_request_id", ka.request_id, unique=True, postgresql_where=ka.request_id.isnot(None))

# One rating per reader and article (a second vote replaces the first; the counts follow).
kb_article_feedback = sa.Table(
    "kb_article_feedback",
    metadata,
    sa.Column("article_id", UUID_TYPE, sa.ForeignKey("kb_articles.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("voter", sa.Text, primary_key=True),
    sa.Column("helpful", sa.Boolean, nullable=False),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)


# -- shared input checks (answers.py uses them too) ---------------------------------------------
def check_text(value: str, field: str, limit: int, bad: list[FieldViolation], required: bool = False) -> str:
    v = value.strip()
    if required and not v:
        bad.append(FieldViolation(field, "is required"))
    elif len(v) > limit:
        bad.append(FieldViolation(field, f"must be at most {limit:,} characters"))
    return v


def check_tags(values, field: str, bad: list[FieldViolation]) -> list[str]:
    tags = list(dict.fromkeys(t.strip().lower() for t in values if t.strip()))
    if len(tags) > MAX_TAGS:
        bad.append(FieldViolation(field, f"at most {MAX_TAGS} tags"))
    for t in tags:
        if len(t) > TAG_LIMIT:
            bad.append(FieldViolation(field, f"a tag is at most {TAG_LIMIT} characters: {t[:20]}…"))
            break
    return tags


def check_language(value: str, field: str, bad: list[FieldViolation]) -> str:
    v = value.strip().lower() or "fa"
    if not LANGUAGE.fullmatch(v):
        bad.append(FieldViolation(field, "must be a language code of 2 to 8 letters (fa, en, ...)"))
    return v


def ticket_categories(conn, names, field: str) -> list[str]:
    """The ids of ticket categories given by name; INVALID_ARGUMENT on `field` for a bad or
    unknown one."""
    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    if len(names) > MAX_CATEGORIES:
        raise InvalidArgument.field(field, f"at most {MAX_CATEGORIES} categories")
    ids = [CATEGORY.parse(n, field).id for n in names]
    if ids:
        found = set(conn.execute(sa.select(categories.c.id).where(categories.c.id.in_(ids))).scalars())
        missing = [n for n, i in zip(names, ids, strict=True) if i not in found]
        if missing:
            raise InvalidArgument.field(field, f"category {missing[0]} does not exist")
    return ids


def name_filter(column, pattern: ResourceName, field: str):
    """A filter on a resource name over a column keeping the bare id ("" for none)."""

    def compile_(op: str, value):
        if op not in ("=", "!="):
            raise ValueError(f"{field} takes only = and !=")
        if value is None or value == "":
            cond = column.is_(None)
        elif isinstance(value, str) and pattern.matches(value):
            cond = column == value.split("/", 1)[1]
        else:
            raise ValueError(f'{field} takes a name like {pattern.format("…")!r}, or "" for none')
        return cond if op == "=" else sa.not_(cond)

    return compile_


def enum_names(keys, prefix: str) -> dict[str, str]:
    out = {}
    for k in keys:
        out[k] = out[k.upper()] = out[f"{prefix}_{k.upper()}"] = k
    return out


# -- the words of a query -------------------------------------------------------------------------
_WORD = re.compile(r"[^\W_]+")  # letters and digits of any script
# Words too common to say what a ticket is about (normalised: ی and ک are Persian here).
STOPWORDS = frozenset(
    normalize(w)
    for w in [
        "و",
        "در",
        "به",
        "از",
        "که",
        "این",
        "را",
        "با",
        "است",
        "برای",
        "آن",
        "یک",
        "تا",
        "بر",
        "هم",
        "نیز",
        "اما",
        "یا",
        "شد",
        "شده",
        "می",
        "ها",
        "های",
        "ای",
        "من",
        "ما",
        "شما",
        "او",
        "ایشان",
        "سلام",
        "لطفا",
        "ممنون",
        "با",
        "تشکر",
        "باشد",
        "بود",
        "هست",
        "نیست",
        "کنید",
        "کنم",
        "کرد",
        "کردم",
        "کرده",
        "دارم",
        "دارد",
        "داریم",
        "the",
        "a",
        "an",
        "and",
        "or",
        "of",
        "to",
        "in",
        "on",
        "for",
        "is",
        "are",
        "it",
        "this",
        "that",
        "be",
        "with",
        "my",
        "your",
        "please",
        "hi",
        "hello",
    ]
)


def query_words(text: str, limit: int = 32) -> list[str]:
    """The distinct words of a text, normalised (crm_chassis.persian.normalize), in order."""
    return list(dict.fromkeys(_WORD.findall(normalize(text))))[:limit]


def all_words_query(text: str, limit: int = 32) -> str:
    """to_tsquery text: every word of `text`, each as a prefix; a word written with a ZWNJ
    matches its two halves or the joined form (a text may have written it either way)."""
    terms: list[str] = []
    for chunk in text.split():
        halves = _WORD.findall(normalize(chunk))
        if not halves:
            continue
        joined = "".join(halves) if "\u200c" in chunk and len(halves) > 1 else ""
        split = " & ".join(f"{w}:*" for w in halves)
        terms.append(f"({split} | {joined}:*)" if joined else split)
    return " & ".join(dict.fromkeys(terms[:limit]))


def any_word_query(words: list[str]) -> str:
    """to_tsquery text: any word that says something (no stop words); prefixes from 3 letters."""
    useful = [w for w in words if w not in STOPWORDS and len(w) > 1]
    return " | ".join(f"{w}:*" if len(w) >= 3 else w for w in useful)


HEADLINE = 'StartSel=**, StopSel=**, MaxWords=35, MinWords=12, MaxFragments=2, FragmentDelimiter=" … "'


def tsquery(text: str) -> sa.ColumnElement:
    """to_tsquery('simple', text): immutable, so folded to a constant the GIN index can use."""
    return sa.func.to_tsquery(sa.literal_column("'simple'::regconfig"), text)


def headline(text_column, query) -> sa.ColumnElement:
    return sa.func.ts_headline(sa.literal_column("'simple'::regconfig"), text_column, query, HEADLINE)


def title_match(table: sa.Table, query) -> sa.ColumnElement:
    """One of the query's words is in the title (the A-weighted part of the vector)."""
    return sa.func.ts_filter(table.c.search_vector, sa.literal_column("'{a}'::\"char\"[]")).op("@@")(query)


# -- conversions ---------------------------------------------------------------------------------
def category_to_proto(row) -> pb.KbCategory:
    out = pb.KbCategory(
        name=KB_CATEGORY.format(row.id),
        display_name=row.display_name,
        description=row.description,
        parent=KB_CATEGORY.format(row.parent_id) if row.parent_id else "",
        position=row.position,
        ticket_categories=[CATEGORY.format(c) for c in row.ticket_category_ids],
        etag=etag(row.version),
    )
    set_times(out, row, "create_time", "update_time")
    return out


def article_to_proto(row) -> pb.Article:
    out = pb.Article(
        name=ARTICLE.format(row.id),
        title=row.title,
        body=row.body,
        format=FORMAT_ENUM[row.format],
        kb_category=KB_CATEGORY.format(row.category_id) if row.category_id else "",
        state=STATE_ENUM[row.state],
        language=row.language,
        tags=list(row.tags),
        view_count=row.view_count,
        helpful_count=row.helpful_count,
        not_helpful_count=row.not_helpful_count,
        author=row.author,
        etag=etag(row.version),
    )
    set_times(out, row, "publish_time", "create_time", "update_time")
    return out


ARTICLE_COLUMNS = [c for c in kb_articles.c if c.name != "search_vector"]

CATEGORY_FILTERS = FilterSchema(
    FilterField("display_name", kc.display_name),
    FilterField("parent", name_filter(kc.parent_id, KB_CATEGORY, "parent"), operators=frozenset({"=", "!="})),
)
CATEGORY_ORDER = [(kc.position, False), (kc.name_key, False), (kc.id, False)]
CATEGORY_MASK = UpdateMask(["display_name", "description", "parent", "position", "ticket_categories"])

ARTICLE_FILTERS = FilterSchema(
    FilterField("title", ka.title),
    FilterField("state", ka.state, FieldType.ENUM, enum_values=enum_names(STATES, "STATE")),
    FilterField("format", ka.format, FieldType.ENUM, enum_values=enum_names(FORMATS, "FORMAT")),
    FilterField(
        "kb_category", name_filter(ka.category_id, KB_CATEGORY, "kb_category"), operators=frozenset({"=", "!="})
    ),
    FilterField("language", ka.language),
    FilterField("tags", ka.tags, FieldType.STRING_ARRAY),
    FilterField("author", ka.author),
    FilterField("view_count", ka.view_count, FieldType.INT),
    FilterField("helpful_count", ka.helpful_count, FieldType.INT),
    FilterField("publish_time", ka.publish_time, FieldType.TIMESTAMP),
    FilterField("create_time", ka.create_time, FieldType.TIMESTAMP),
    FilterField("update_time", ka.update_time, FieldType.TIMESTAMP),
)
ARTICLE_SORTABLE = {
    "title": ka.title,
    "view_count": ka.view_count,
    "helpful_count": ka.helpful_count,
    "publish_time": ka.publish_time,
    "create_time": ka.create_time,
    "update_time": ka.update_time,
}
ARTICLE_MASK = UpdateMask(
    ["title", "body", "format", "kb_category", "language", "tags"],
    immutable={
        "state": "use PublishArticle or ArchiveArticle",
        "view_count": "counted by ViewArticle",
        "helpful_count": "counted by RecordArticleFeedback",
        "not_helpful_count": "counted by RecordArticleFeedback",
        "author": "",
    },
)


def _check_request_id(request_id: str) -> None:
    if len(request_id) > REQUEST_ID_LIMIT:
        raise InvalidArgument.field("request_id", f"must be at most {REQUEST_ID_LIMIT} characters")


# -- the use cases -------------------------------------------------------------------------------
class Knowledge:
    def __init__(self, support: Support):
        self.support = support
        self.uow = support.uow
        secret = support.settings.jwt_secret
        self.category_tokens = PageTokens(secret, "kb_categories")
        self.article_tokens = PageTokens(secret, "kb_articles")

    # categories ---------------------------------------------------------------------------------
    def _category_values(self, conn, c: pb.KbCategory, paths, own_id: str | None = None) -> dict:
        bad: list[FieldViolation] = []
        values: dict = {}
        if "display_name" in paths:
            values["display_name"] = check_text(c.display_name, "kb_category.display_name", NAME_LIMIT, bad, True)
            values["name_key"] = normalize(values["display_name"])
        if "description" in paths:
            values["description"] = check_text(c.description, "kb_category.description", DESCRIPTION_LIMIT, bad)
        if "position" in paths:
            if not 0 <= c.position <= MAX_POSITION:
                bad.append(FieldViolation("kb_category.position", f"must be 0..{MAX_POSITION:,}"))
            values["position"] = c.position
        if bad:
            raise InvalidArgument(bad)
        if "parent" in paths:
            values["parent_id"] = self._parent(conn, c.parent, own_id) if c.parent else None
        if "ticket_categories" in paths:
            values["ticket_category_ids"] = ticket_categories(
                conn, c.ticket_categories, "kb_category.ticket_categories"
            )
        return values

    @staticmethod
    def _parent(conn, name: str, own_id: str | None) -> str:
        pid = KB_CATEGORY.parse(name, "kb_category.parent").id
        if own_id is not None:
            # the new parent must not be the category itself or one below it
            below = (
                sa.select(kc.id).where(kc.id == own_id).cte("below", recursive=True)
            )  # the category and its descendants
            below = below.union_all(sa.select(kc.id).join(below, kc.parent_id == below.c.id))
            if conn.execute(sa.select(sa.exists().where(below.c.id == pid))).scalar():
                raise InvalidArgument.field("kb_category.parent", "must not be the category itself or one below it")
        if not conn.execute(sa.select(sa.exists().where(kc.id == pid))).scalar():
            raise InvalidArgument.field("kb_category.parent", f"category {name} does not exist")
        return pid

    @staticmethod
    def _name_taken(exc: sa.exc.IntegrityError) -> bool:
        return "kb_categories_name" in str(exc.orig)

    def create_category(self, c: pb.KbCategory, principal: Principal) -> pb.KbCategory:
        try:
            with self.uow.begin() as tx:
                values = self._category_values(tx.conn, c, CATEGORY_MASK.updatable)
                with tx.savepoint():
                    row = tx.execute(kb_categories.insert().values(**values).returning(kb_categories)).one()
                name = KB_CATEGORY.format(row.id)
                tx.audit(name, "kb_category.create", principal, [])
        except sa.exc.IntegrityError as exc:
            if self._name_taken(exc):
                raise AlreadyExists(
                    f"a category named {c.display_name.strip()!r} is already there",
                    metadata={"field": "kb_category.display_name"},
                ) from None
            raise
        return category_to_proto(row)

    def get_category(self, name: str) -> pb.KbCategory:
        cid = KB_CATEGORY.parse(name).id
        with self.uow.read() as conn:
            row = KB_CATEGORY.one(conn, sa.select(kb_categories).where(kc.id == cid), name)
        return category_to_proto(row)

    def list_categories(self, req: pb.ListKbCategoriesRequest):
        limit = page_size(req.page_size)
        where = CATEGORY_FILTERS.compile(req.filter)
        with self.uow.read() as conn:
            rows, token = keyset_page(
                conn,
                sa.select(kb_categories).where(where),
                CATEGORY_ORDER,
                self.category_tokens,
                query_fingerprint(req.filter),
                limit,
                req.page_token,
            )
        return [category_to_proto(r) for r in rows], token

    def update_category(self, c: pb.KbCategory, mask, principal: Principal) -> pb.KbCategory:
        paths = CATEGORY_MASK.paths(mask)
        cid = KB_CATEGORY.parse(c.name, "kb_category.name").id
        try:
            with self.uow.begin() as tx:
                row = tx.execute(sa.select(kb_categories).where(kc.id == cid).with_for_update()).one_or_none()
                if row is None:
                    raise KB_CATEGORY.not_found(c.name)
                check_etag(c.etag, row.version, c.name)
                values = self._category_values(tx.conn, c, paths, own_id=cid)
                diff = changes(row._mapping, values)
                if not diff:
                    return category_to_proto(row)
                with tx.savepoint():
                    row = tx.execute(
                        kb_categories.update()
                        .where(kc.id == cid)
                        .values(**values, version=kc.version + 1, update_time=sa.func.now())
                        .returning(kb_categories)
                    ).one()
                tx.audit(c.name, "kb_category.update", principal, [d.as_audit() for d in diff])
        except sa.exc.IntegrityError as exc:
            if self._name_taken(exc):
                raise AlreadyExists(
                    f"a category named {c.display_name.strip()!r} is already there",
                    metadata={"field": "kb_category.display_name"},
                ) from None
            raise
        return category_to_proto(row)

    def delete_category(self, req: pb.DeleteKbCategoryRequest, principal: Principal) -> None:
        cid = KB_CATEGORY.parse(req.name).id
        with self.uow.begin() as tx:
            row = tx.execute(sa.select(kb_categories).where(kc.id == cid).with_for_update()).one_or_none()
            if row is None:
                raise KB_CATEGORY.not_found(req.name)
            check_etag(req.etag, row.version, req.name)
            used = tx.execute(
                sa.select(
                    sa.exists().where(ka.category_id == cid).label("articles"),
                    sa.exists().where(kc.parent_id == cid).label("children"),
                )
            ).one()
            if used.articles or used.children:
                what = "articles" if used.articles else "sub-categories"
                raise FailedPrecondition(
                    f"{req.name} still has {what}; move or delete them first",
                    reason="KB_CATEGORY_NOT_EMPTY",
                    metadata={"name": req.name},
                )
            tx.execute(kb_categories.delete().where(kc.id == cid))
            tx.audit(req.name, "kb_category.delete", principal, [])

    # articles -----------------------------------------------------------------------------------
    def _article_values(self, conn, a: pb.Article, paths, field: str = "article") -> dict:
        bad: list[FieldViolation] = []
        values: dict = {}
        if "title" in paths:
            values["title"] = check_text(a.title, f"{field}.title", TITLE_LIMIT, bad, True)
        if "body" in paths:
            if len(a.body) > ARTICLE_BODY_LIMIT:
                bad.append(FieldViolation(f"{field}.body", f"must be at most {ARTICLE_BODY_LIMIT:,} characters"))
            values["body"] = a.body
        if "format" in paths:
            values["format"] = FORMAT_OF.get(a.format, "markdown" if a.format == 0 else "")
            if not values["format"]:
                bad.append(FieldViolation(f"{field}.format", "is not a known format"))
        if "language" in paths:
            values["language"] = check_language(a.language, f"{field}.language", bad)
        if "tags" in paths:
            values["tags"] = check_tags(a.tags, f"{field}.tags", bad)
        if bad:
            raise InvalidArgument(bad)
        if "kb_category" in paths:
            values["category_id"] = None
            if a.kb_category:
                cid = KB_CATEGORY.parse(a.kb_category, f"{field}.kb_category").id
                if not conn.execute(sa.select(sa.exists().where(kc.id == cid))).scalar():
                    raise InvalidArgument.field(f"{field}.kb_category", f"category {a.kb_category} does not exist")
                values["category_id"] = cid
        return values

    def create_article(self, a: pb.Article, request_id: str, principal: Principal) -> pb.Article:
        _check_request_id(request_id)
        try:
            with self.uow.begin() as tx:
                if request_id:
                    existing = tx.execute(sa.select(*ARTICLE_COLUMNS).where(ka.request_id == request_id)).one_or_none()
                    if existing is not None:
                        return self._same_caller(existing, principal)
                values = self._article_values(tx.conn, a, ARTICLE_MASK.updatable)
                row = tx.execute(
                    kb_articles.insert()
                    .values(
                        **values,
                        **search_values(values["title"], values["body"]),
                        state="draft",
                        author=principal.subject,
                        request_id=request_id or None,
                    )
                    .returning(*ARTICLE_COLUMNS)
                ).one()
                tx.audit(ARTICLE.format(row.id), "article.create", principal, [])
        except sa.exc.IntegrityError:
            if request_id:  # a concurrent retry committed first
                with self.uow.read() as conn:
                    existing = conn.execute(sa.select(*ARTICLE_COLUMNS).where(ka.request_id == request_id)).one()
                return self._same_caller(existing, principal)
            raise
        return article_to_proto(row)

    @staticmethod
    def _same_caller(row, principal: Principal):
        same_requester(row.author, principal, "article")
        return article_to_proto(row)

    def get_article(self, name: str) -> pb.Article:
        aid = ARTICLE.parse(name).id
        with self.uow.read() as conn:
            row = ARTICLE.one(conn, sa.select(*ARTICLE_COLUMNS).where(ka.id == aid), name)
        return article_to_proto(row)

    def list_articles(self, req: pb.ListArticlesRequest):
        limit = page_size(req.page_size)
        where = ARTICLE_FILTERS.compile(req.filter)
        keys = parse_order_by(req.order_by.strip() or "create_time desc", ARTICLE_SORTABLE)
        order = with_tiebreaker(keys, ka.id, descending=keys[-1].descending)
        with self.uow.read() as conn:
            rows, token = keyset_page(
                conn,
                sa.select(*ARTICLE_COLUMNS).where(where),
                order,
                self.article_tokens,
                query_fingerprint(req.filter, req.order_by),
                limit,
                req.page_token,
            )
        return [article_to_proto(r) for r in rows], token

    def _locked(self, conn, name: str, field: str = "name"):
        aid = ARTICLE.parse(name, field).id
        row = ARTICLE.one(conn, sa.select(*ARTICLE_COLUMNS).where(ka.id == aid).with_for_update(), name)
        return row

    def update_article(self, a: pb.Article, mask, principal: Principal) -> pb.Article:
        paths = ARTICLE_MASK.paths(mask)
        with self.uow.begin() as tx:
            row = self._locked(tx.conn, a.name, "article.name")
            check_etag(a.etag, row.version, a.name)
            values = self._article_values(tx.conn, a, paths)
            diff = changes(row._mapping, values)
            if not diff:
                return article_to_proto(row)
            merged = {**row._mapping, **values}
            if "title" in values or "body" in values:
                values.update(search_values(merged["title"], merged["body"]))
            row = tx.execute(
                kb_articles.update()
                .where(ka.id == row.id)
                .values(**values, version=ka.version + 1, update_time=sa.func.now())
                .returning(*ARTICLE_COLUMNS)
            ).one()
            # the body can be long: the audit says it changed, not what it was
            tx.audit(
                a.name,
                "article.update",
                principal,
                [d.as_audit() if d.field != "body" else {"field": "body", "old": '"…"', "new": '"…"'} for d in diff],
            )
        return article_to_proto(row)

    def delete_article(self, req: pb.DeleteArticleRequest, principal: Principal) -> None:
        with self.uow.begin() as tx:
            row = self._locked(tx.conn, req.name)
            check_etag(req.etag, row.version, req.name)
            tx.execute(kb_articles.delete().where(ka.id == row.id))
            tx.audit(req.name, "article.delete", principal, [])

    def move(self, name: str, given_etag: str, state: str, principal: Principal) -> pb.Article:
        """PublishArticle / ArchiveArticle: the same state again is the article unchanged."""
        with self.uow.begin() as tx:
            row = self._locked(tx.conn, name)
            check_etag(given_etag, row.version, name)
            if row.state == state:
                return article_to_proto(row)
            values: dict = {"state": state}
            if state == "published":
                values["publish_time"] = sa.func.now()
            row = tx.execute(
                kb_articles.update()
                .where(ka.id == row.id)
                .values(**values, version=ka.version + 1, update_time=sa.func.now())
                .returning(*ARTICLE_COLUMNS)
            ).one()
            tx.audit(name, f"article.{'publish' if state == 'published' else 'archive'}", principal, [])
        return article_to_proto(row)

    def _not_published(self, conn, name: str, aid: str) -> Exception:
        state = conn.execute(sa.select(ka.state).where(ka.id == aid)).scalar()
        if state is None:
            return ARTICLE.not_found(name)
        return FailedPrecondition(
            f"{name} is {state}: only published articles are read and rated",
            reason="ARTICLE_NOT_PUBLISHED",
            metadata={"name": name, "state": state},
        )

    def view(self, name: str) -> pb.Article:
        aid = ARTICLE.parse(name).id
        with self.uow.begin() as tx:
            row = tx.execute(
                kb_articles.update()
                .where(ka.id == aid, ka.state == "published")
                .values(view_count=ka.view_count + 1)
                .returning(*ARTICLE_COLUMNS)
            ).one_or_none()
            if row is None:
                raise self._not_published(tx.conn, name, aid)
        return article_to_proto(row)

    def feedback(self, req: pb.RecordArticleFeedbackRequest, principal: Principal) -> pb.Article:
        aid = ARTICLE.parse(req.name).id
        fb = kb_article_feedback.c
        with self.uow.begin() as tx:
            row = tx.execute(
                sa.select(ka.state).where(ka.id == aid, ka.state == "published").with_for_update()
            ).one_or_none()
            if row is None:
                raise self._not_published(tx.conn, req.name, aid)
            before = tx.execute(
                sa.select(fb.helpful).where(fb.article_id == aid, fb.voter == principal.subject)
            ).scalar_one_or_none()
            counts: dict = {}
            if before is None:
                tx.execute(
                    kb_article_feedback.insert().values(article_id=aid, voter=principal.subject, helpful=req.helpful)
                )
            elif before != req.helpful:
                tx.execute(
                    kb_article_feedback.update()
                    .where(fb.article_id == aid, fb.voter == principal.subject)
                    .values(helpful=req.helpful, update_time=sa.func.now())
                )
                old = "helpful_count" if before else "not_helpful_count"
                counts[old] = ka[old] - 1
            if before != req.helpful:  # a new vote, or a changed one
                new = "helpful_count" if req.helpful else "not_helpful_count"
                counts[new] = ka[new] + 1
                out = tx.execute(
                    kb_articles.update().where(ka.id == aid).values(**counts).returning(*ARTICLE_COLUMNS)
                ).one()
            else:  # the same vote again: nothing changes
                out = tx.execute(sa.select(*ARTICLE_COLUMNS).where(ka.id == aid)).one()
        return article_to_proto(out)

    # search -------------------------------------------------------------------------------------
    def search(self, req: pb.SearchArticlesRequest) -> list[pb.ArticleHit]:
        bad: list[FieldViolation] = []
        text = check_text(req.query, "query", QUERY_LIMIT, bad, required=True)
        words = query_words(text)
        if text and not words and not bad:
            bad.append(FieldViolation("query", "has no words to look for"))
        language = req.language.strip().lower()
        if language and not LANGUAGE.fullmatch(language):
            bad.append(FieldViolation("language", "must be a language code of 2 to 8 letters (fa, en, ...)"))
        states = []
        for s in req.states:
            if s not in STATE_OF:
                bad.append(FieldViolation("states", "must be STATE_DRAFT, STATE_PUBLISHED or STATE_ARCHIVED"))
                break
            states.append(STATE_OF[s])
        if req.page_size < 0:
            bad.append(FieldViolation("page_size", "must not be negative"))
        category_id = None
        if req.kb_category:
            try:
                category_id = KB_CATEGORY.parse(req.kb_category, "kb_category").id
            except InvalidArgument as e:
                bad += e.violations
        if bad:
            raise InvalidArgument(bad)
        limit = min(req.page_size or SEARCH_DEFAULT, SEARCH_MAX)
        raw = " ".join(words)
        query = tsquery(all_words_query(text))
        where = [ka.state.in_(states or ["published"])]
        if language:
            where.append(ka.language == language)
        if category_id:
            tree = sa.select(kc.id).where(kc.id == category_id).cte("tree", recursive=True)
            tree = tree.union_all(sa.select(kc.id).join(tree, kc.parent_id == tree.c.id))
            where.append(ka.category_id.in_(sa.select(tree.c.id)))
        fulltext = ka.search_vector.op("@@")(query)
        trigram = sa.literal(raw).op("<%")(ka.search_head)
        top = (
            sa.select(
                ka.id.label("hit_id"),
                sa.or_(title_match(kb_articles, query), sa.literal(raw).op("<%")(ka.search_title)).label("in_title"),
                sa.func.ts_rank(ka.search_vector, query).label("rank"),
                sa.func.word_similarity(raw, ka.search_head).label("similarity"),
            )
            .where(*where, sa.or_(fulltext, trigram))
            .order_by(sa.text("in_title DESC"), sa.text("rank DESC"), sa.text("similarity DESC"), ka.update_time.desc())
            .limit(limit)
            .subquery("top")
        )
        stmt = (
            sa.select(
                *ARTICLE_COLUMNS,
                top.c.in_title,
                top.c.rank,
                top.c.similarity,
                headline(ka.search_text, query).label("snippet"),
            )
            .select_from(top.join(kb_articles, ka.id == top.c.hit_id))
            .order_by(top.c.in_title.desc(), top.c.rank.desc(), top.c.similarity.desc(), ka.update_time.desc())
        )
        with self.uow.read() as conn:
            rows = conn.execute(stmt).all()
        return [hit(r) for r in rows]


def hit(row) -> pb.ArticleHit:
    score = row.rank if row.rank > 0 else row.similarity
    return pb.ArticleHit(
        article=article_to_proto(row), snippet=row.snippet, title_match=bool(row.in_title), score=float(score)
    )


class KnowledgeServicer(answers_pb2_grpc.KnowledgeServiceServicer):
    def __init__(self, uc: Knowledge):
        self.uc = uc

    def CreateKbCategory(self, request, context):
        return self.uc.create_category(request.kb_category, current_principal())

    def GetKbCategory(self, request, context):
        return self.uc.get_category(request.name)

    def ListKbCategories(self, request, context):
        items, token = self.uc.list_categories(request)
        return pb.ListKbCategoriesResponse(kb_categories=items, next_page_token=token)

    def UpdateKbCategory(self, request, context):
        return self.uc.update_category(request.kb_category, request.update_mask, current_principal())

    def DeleteKbCategory(self, request, context):
        self.uc.delete_category(request, current_principal())
        return empty_pb2.Empty()

    def CreateArticle(self, request, context):
        return self.uc.create_article(request.article, request.request_id, current_principal())

    def GetArticle(self, request, context):
        return self.uc.get_article(request.name)

    def ListArticles(self, request, context):
        items, token = self.uc.list_articles(request)
        return pb.ListArticlesResponse(articles=items, next_page_token=token)

    def UpdateArticle(self, request, context):
        return self.uc.update_article(request.article, request.update_mask, current_principal())

    def DeleteArticle(self, request, context):
        self.uc.delete_article(request, current_principal())
        return empty_pb2.Empty()

    def PublishArticle(self, request, context):
        return self.uc.move(request.name, request.etag, "published", current_principal())

    def ArchiveArticle(self, request, context):
        return self.uc.move(request.name, request.etag, "archived", current_principal())

    def ViewArticle(self, request, context):
        return self.uc.view(request.name)

    def SearchArticles(self, request, context):
        return pb.SearchArticlesResponse(results=self.uc.search(request))

    def RecordArticleFeedback(self, request, context):
        return self.uc.feedback(request, current_principal())


def use_cases(support: Support) -> Knowledge:
    return support.once("knowledge", lambda: Knowledge(support))


def registration(support: Support) -> Registration:
    return Registration.of(KnowledgeServicer(use_cases(support)))
