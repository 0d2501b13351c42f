"""Canned answers (CRUD, templates in the sandbox, rendering, replies), the knowledge base
(categories, articles, states, Persian search, ratings) and suggestions for a ticket, through
gRPC on a real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import pathlib
import random
import re
import subprocess
import sys
import textwrap
import time
import uuid

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2

from crm.support.v1 import answers_pb2 as pb
from crm.support.v1 import answers_pb2_grpc, ticket_pb2
from crm_chassis.dates import TEHRAN
from crm_chassis.errors import read_rpc_error
from crm_chassis.persian import format_jalali, normalize
from support_svc.answers import canned_answers
from support_svc.knowledge import ARTICLE_BODY_LIMIT, joined_forms, kb_articles
from support_svc.tables import agents, customer_refs, ticket_messages

from .conftest import ADMIN, agent_md, category_id, manager_md, open_ticket, ticket

MANAGER = manager_md("mona")
AGENT = agent_md("omid")
Art = pb.Article


@pytest.fixture(scope="module")
def answers(ch):
    return answers_pb2_grpc.AnswerServiceStub(ch)


@pytest.fixture(scope="module")
def kb(ch):
    return answers_pb2_grpc.KnowledgeServiceStub(ch)


def fails(call, code: grpc.StatusCode, field: str | None = None, text: str | None = None):
    """The call fails with `code`; `field` is among the violations and `text` in its description
    (or in the message). Returns the ErrorView."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = read_rpc_error(info.value)
    assert err.code == code, (err.code, err.message)
    if field is not None:
        named = {v.field: v.description for v in err.field_violations}
        assert field in named, err
        if text is not None:
            assert text in named[field], named[field]
    elif text is not None:
        assert text in err.message, err.message
    return err


def create_answer(answers, title, body, *, categories=(), language="fa", md=MANAGER, request_id="", **kw):
    return answers.CreateCannedAnswer(
        pb.CreateCannedAnswerRequest(
            canned_answer=pb.CannedAnswer(title=title, body=body, categories=list(categories), language=language, **kw),
            request_id=request_id,
        ),
        metadata=md,
    )


def mask(*paths):
    return field_mask_pb2.FieldMask(paths=list(paths))


def stored_template(svc, body: str, language: str = "fa") -> str:
    """A canned answer written straight into the table, past the checks of Create (as an old
    row or a hand-made one would be): the name."""
    with svc.ctx.engine.begin() as conn:
        aid = conn.execute(
            canned_answers.insert().values(title="raw", body=body, language=language).returning(canned_answers.c.id)
        ).scalar()
    return f"cannedAnswers/{aid}"


def usage(svc, name: str) -> int:
    with svc.ctx.engine.connect() as conn:
        return conn.execute(
            sa.select(canned_answers.c.usage_count).where(canned_answers.c.id == name.split("/")[1])
        ).scalar()


def a_customer(svc, display_name: str) -> str:
    cid = str(uuid.uuid4())
    with svc.ctx.engine.begin() as conn:
        conn.execute(customer_refs.insert().values(customer_id=cid, display_name=display_name, version=1))
    return cid


def an_agent(svc, sub: str, display_name: str) -> str:
    with svc.ctx.engine.begin() as conn:
        conn.execute(agents.insert().values(id=sub, display_name=display_name))
    return sub


# -- canned answers: CRUD ---------------------------------------------------------------------------
def test_canned_answers_crud_with_category_scope_mask_and_etag(svc, answers):
    billing, technical = category_id(svc, "billing"), category_id(svc, "technical")
    scoped = create_answer(
        answers,
        "  ارسال فاکتور ",
        "فاکتور تیکت {{ ticket.number }} ارسال شد.",
        categories=[f"categories/{billing}"],
        tags=["Billing", "billing", "invoice"],
        request_id="crud-1",
    )
    assert scoped.title == "ارسال فاکتور" and scoped.language == "fa" and scoped.active
    assert list(scoped.categories) == [f"categories/{billing}"] and list(scoped.tags) == ["billing", "invoice"]
    assert scoped.creator == "mona" and scoped.etag == '"1"' and scoped.usage_count == 0
    again = create_answer(answers, "x", "y", request_id="crud-1")  # a retry: the first result
    assert again.name == scoped.name
    fails(
        lambda: create_answer(answers, "x", "y", request_id="crud-1", md=manager_md("other")),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    everywhere = create_answer(answers, "خوش‌آمد", "سلام {{ customer.name | default('مشتری گرامی') }}")
    english = create_answer(answers, "Welcome", "Hello", language="en", active=False)
    assert not english.active

    assert answers.GetCannedAnswer(pb.GetCannedAnswerRequest(name=scoped.name), metadata=AGENT) == scoped

    def listed(filter_, order_by=""):
        resp = answers.ListCannedAnswers(pb.ListCannedAnswersRequest(filter=filter_, order_by=order_by), metadata=AGENT)
        return [a.name for a in resp.canned_answers]

    assert set(listed(f'category = "categories/{billing}"')) == {scoped.name, everywhere.name, english.name}
    assert set(listed(f'category = "categories/{technical}" AND language = "fa"')) == {everywhere.name}
    assert listed("active = false") == [english.name]
    assert listed("tags:invoice") == [scoped.name]
    page = answers.ListCannedAnswers(pb.ListCannedAnswersRequest(page_size=2, order_by="title"), metadata=AGENT)
    rest = answers.ListCannedAnswers(
        pb.ListCannedAnswersRequest(page_size=2, order_by="title", page_token=page.next_page_token), metadata=AGENT
    )
    assert len(page.canned_answers) == 2 and page.next_page_token and len(rest.canned_answers) == 1
    fails(lambda: listed("colour = 1"), grpc.StatusCode.INVALID_ARGUMENT, "filter")
    fails(lambda: listed('category = "teams/1"'), grpc.StatusCode.INVALID_ARGUMENT, "filter")

    # update: the mask says what changes, a stale etag is ABORTED, an agent may not write
    change = pb.CannedAnswer(name=scoped.name, title="فاکتور رسمی", body="changed too?", etag=scoped.etag)
    updated = answers.UpdateCannedAnswer(
        pb.UpdateCannedAnswerRequest(canned_answer=change, update_mask=mask("title")), metadata=MANAGER
    )
    assert updated.title == "فاکتور رسمی" and updated.body == scoped.body and updated.etag == '"2"'
    fails(
        lambda: answers.UpdateCannedAnswer(
            pb.UpdateCannedAnswerRequest(canned_answer=change, update_mask=mask("title")), metadata=MANAGER
        ),
        grpc.StatusCode.ABORTED,
    )
    fails(
        lambda: answers.UpdateCannedAnswer(
            pb.UpdateCannedAnswerRequest(canned_answer=change, update_mask=mask("usage_count")), metadata=MANAGER
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "update_mask",
    )
    fails(
        lambda: answers.UpdateCannedAnswer(
            pb.UpdateCannedAnswerRequest(
                canned_answer=pb.CannedAnswer(name=scoped.name, categories=["categories/nope"]),
                update_mask=mask("categories"),
            ),
            metadata=MANAGER,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "canned_answer.categories",
    )
    fails(
        lambda: answers.UpdateCannedAnswer(
            pb.UpdateCannedAnswerRequest(
                canned_answer=pb.CannedAnswer(name=scoped.name, categories=[f"categories/{uuid.uuid4()}"]),
                update_mask=mask("categories"),
            ),
            metadata=MANAGER,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "canned_answer.categories",
        "does not exist",
    )
    widened = answers.UpdateCannedAnswer(
        pb.UpdateCannedAnswerRequest(
            canned_answer=pb.CannedAnswer(name=scoped.name, categories=[], active=False, etag=updated.etag),
            update_mask=mask("categories", "active"),
        ),
        metadata=MANAGER,
    )
    assert list(widened.categories) == [] and not widened.active and widened.etag == '"3"'
    fails(
        lambda: answers.UpdateCannedAnswer(
            pb.UpdateCannedAnswerRequest(canned_answer=change, update_mask=mask("title")), metadata=AGENT
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    fails(lambda: create_answer(answers, "t", "b", md=AGENT), grpc.StatusCode.PERMISSION_DENIED)

    fails(
        lambda: answers.DeleteCannedAnswer(
            pb.DeleteCannedAnswerRequest(name=scoped.name, etag='"1"'), metadata=MANAGER
        ),
        grpc.StatusCode.ABORTED,
    )
    answers.DeleteCannedAnswer(pb.DeleteCannedAnswerRequest(name=scoped.name, etag=widened.etag), metadata=MANAGER)
    fails(
        lambda: answers.GetCannedAnswer(pb.GetCannedAnswerRequest(name=scoped.name), metadata=AGENT),
        grpc.StatusCode.NOT_FOUND,
    )


def test_create_refuses_bad_input_naming_the_field(answers):
    err = fails(lambda: create_answer(answers, "", "", language="FA!"), grpc.StatusCode.INVALID_ARGUMENT)
    assert {v.field for v in err.field_violations} == {
        "canned_answer.title",
        "canned_answer.body",
        "canned_answer.language",
    }
    fails(lambda: create_answer(answers, "t", "x" * 20_001), grpc.StatusCode.INVALID_ARGUMENT, "canned_answer.body")
    fails(
        lambda: create_answer(answers, "t", "b", categories=["tickets/x"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "canned_answer.categories",
    )


# -- templates ----------------------------------------------------------------------------------------
def test_a_template_that_does_not_compile_is_refused_naming_the_line(answers):
    fails(
        lambda: create_answer(answers, "t", "سلام\n{{ ticket.number }\nبا احترام"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "canned_answer.body",
        "line 2",
    )
    fails(
        lambda: create_answer(answers, "t", "{% if ticket.state %}open"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "canned_answer.body",
        "line 1",
    )


def test_unknown_placeholders_and_statements_are_refused_on_create_and_update(answers):
    fails(
        lambda: create_answer(answers, "t", "سلام\n{{ ticket.amount }}"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "canned_answer.body",
        "line 2: ticket.amount is not a placeholder",
    )
    fails(
        lambda: create_answer(answers, "t", "{{ password }}"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "canned_answer.body",
        "password is not a placeholder",
    )
    fails(
        lambda: create_answer(answers, "t", "{{ customer }}"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "canned_answer.body",
        "customer is a group",
    )
    for body, word in [
        ("{% for i in [1, 2] %}x{% endfor %}", "for"),
        ("{% set x = 1 %}", "set"),
        ("{% include 'other' %}", "include"),
        ("{{ ticket.subject.upper() }}", "calls"),
        ("{{ ticket.subject | center(100) }}", "center"),
        ("{{ ticket.subject.upper }}", "only the placeholder groups have fields"),
    ]:
        fails(
            lambda b=body: create_answer(answers, "t", b), grpc.StatusCode.INVALID_ARGUMENT, "canned_answer.body", word
        )
    ok = create_answer(answers, "ok", "{{ ticket.subject | upper }}")
    fails(
        lambda: answers.UpdateCannedAnswer(
            pb.UpdateCannedAnswerRequest(
                canned_answer=pb.CannedAnswer(name=ok.name, body="{{ agent.phone }}"), update_mask=mask("body")
            ),
            metadata=MANAGER,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "canned_answer.body",
        "agent.phone",
    )


def test_render_fills_every_placeholder_from_the_ticket_customer_and_caller(svc, answers):
    cid = a_customer(svc, "زهرا احمدی")
    an_agent(svc, "omid", "امید رضایی")
    t = open_ticket(svc, subject="فاکتور سفارش", customer_id=cid, priority="high")
    body = (
        "{{ customer.name }} عزیز،\n"
        "درخواست {{ ticket.number }} با موضوع «{{ ticket.subject }}» ({{ ticket.state }}، اولویت {{ ticket.priority }})"
        " در {{ ticket.create_date_jalali }} ثبت شد.\n"
        "امروز {{ today_jalali }}\n"
        "{{ agent.name }}"
    )
    answer = create_answer(answers, "همه", body)
    out = answers.RenderCannedAnswer(
        pb.RenderCannedAnswerRequest(name=answer.name, ticket=f"tickets/{t.id}"), metadata=AGENT
    )
    opened = format_jalali(t.create_time.astimezone(TEHRAN).date(), persian_digits=True)
    today = format_jalali(dt.datetime.now(TEHRAN).date(), persian_digits=True)
    assert opened.startswith("۱۴") and "/" in opened  # a Jalali date in Persian digits
    assert out.text == (
        "زهرا احمدی عزیز،\n"
        f"درخواست T-{t.number:06d} با موضوع «فاکتور سفارش» (جدید، اولویت زیاد) در {opened} ثبت شد.\n"
        f"امروز {today}\n"
        "امید رضایی"
    )
    # the use is counted; a use is not an edit (the etag stays)
    assert out.canned_answer.usage_count == 1 and out.canned_answer.etag == answer.etag
    assert out.canned_answer.HasField("last_use_time")

    english = create_answer(
        answers, "en", "{{ ticket.state }} / {{ ticket.priority }} / {{ today_jalali }}", language="en"
    )
    text = answers.RenderCannedAnswer(
        pb.RenderCannedAnswerRequest(name=english.name, ticket=f"tickets/{t.id}"), metadata=AGENT
    ).text
    assert text == f"new / high / {format_jalali(dt.datetime.now(TEHRAN).date())}"  # ASCII digits in English


def test_a_missing_value_takes_the_documented_fallback_or_is_invalid_naming_it(svc, answers):
    t = open_ticket(svc, subject="سوال")  # no customer, no sender name
    friendly = create_answer(answers, "f", '{{ customer.name | default("مشتری گرامی") }}، سلام')
    out = answers.RenderCannedAnswer(
        pb.RenderCannedAnswerRequest(name=friendly.name, ticket=f"tickets/{t.id}"), metadata=MANAGER
    )
    assert out.text == "مشتری گرامی، سلام"
    branch = create_answer(
        answers, "if", "{% if agent.name is defined %}{{ agent.name }}{% else %}پشتیبانی{% endif %}\n"
    )
    assert (  # the manager is not an agent: no agent.name
        answers.RenderCannedAnswer(
            pb.RenderCannedAnswerRequest(name=branch.name, ticket=f"tickets/{t.id}"), metadata=MANAGER
        ).text
        == "پشتیبانی"
    )
    fails(
        lambda: create_answer(answers, "deep", "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "canned_answer.body",
    )
    bare = create_answer(answers, "b", "{{ customer.name }}، سلام")
    fails(
        lambda: answers.RenderCannedAnswer(
            pb.RenderCannedAnswerRequest(name=bare.name, ticket=f"tickets/{t.id}"), metadata=AGENT
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "canned_answer.body",
        "customer.name has no value for this ticket",
    )
    assert usage(svc, bare.name) == 0  # a failed render counts nothing
    # the sender's name stands in for an unknown customer
    named = open_ticket(svc, subject="سوال", contact_name="رضا")
    assert (
        answers.RenderCannedAnswer(
            pb.RenderCannedAnswerRequest(name=bare.name, ticket=f"tickets/{named.id}"), metadata=AGENT
        ).text
        == "رضا، سلام"
    )


def test_an_unknown_variable_at_render_time_is_invalid_argument_naming_it(svc, answers):
    t = open_ticket(svc)
    for body, named in [
        ("{{ discount_code }}", "discount_code is not a placeholder"),
        ("{{ ticket.amount }}", "ticket.amount is not a placeholder"),
    ]:
        name = stored_template(svc, body)
        fails(
            lambda n=name: answers.RenderCannedAnswer(
                pb.RenderCannedAnswerRequest(name=n, ticket=f"tickets/{t.id}"), metadata=AGENT
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "canned_answer.body",
            named,
        )


ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch {sentinel}') }}",
    "{{ ticket['__class__'] }}",
    "{{ self.__init__.__globals__ }}",
    "{{ (ticket|attr('__class__')) }}",
    "{{ 'x' * 100000000 }}",
    "{{ 9 ** 9 ** 9 }}",
    "{{ '%0999999999d' % 1 }}",
    "{{ lipsum.__globals__['os'].popen('touch {sentinel}').read() }}",
]


def test_templates_trying_to_escape_the_sandbox_are_refused_and_never_execute(svc, answers, tmp_path):
    sentinel = pathlib.Path(tmp_path) / "escaped"
    t = open_ticket(svc)
    for template in ESCAPES:
        body = template.replace("{sentinel}", str(sentinel))
        # refused when written ...
        fails(
            lambda b=body: create_answer(answers, "escape", b), grpc.StatusCode.INVALID_ARGUMENT, "canned_answer.body"
        )
        # ... and, stored past the checks, refused by the sandbox when rendered
        name = stored_template(svc, body)
        fails(
            lambda n=name: answers.RenderCannedAnswer(
                pb.RenderCannedAnswerRequest(name=n, ticket=f"tickets/{t.id}"), metadata=AGENT
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "canned_answer.body",
        )
        assert usage(svc, name) == 0
    assert not sentinel.exists()


def test_render_and_reply_check_their_inputs(svc, answers):
    t = open_ticket(svc)
    ok = create_answer(answers, "ok", "سلام")
    fails(
        lambda: answers.RenderCannedAnswer(
            pb.RenderCannedAnswerRequest(name=ok.name, ticket="tickets/1"), metadata=AGENT
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ticket",
    )
    fails(
        lambda: answers.RenderCannedAnswer(
            pb.RenderCannedAnswerRequest(name=ok.name, ticket=f"tickets/{uuid.uuid4()}"), metadata=AGENT
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    fails(
        lambda: answers.RenderCannedAnswer(
            pb.RenderCannedAnswerRequest(name=f"cannedAnswers/{uuid.uuid4()}", ticket=f"tickets/{t.id}"), metadata=AGENT
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    off = create_answer(answers, "off", "سلام", active=False)
    err = fails(
        lambda: answers.RenderCannedAnswer(
            pb.RenderCannedAnswerRequest(name=off.name, ticket=f"tickets/{t.id}"), metadata=AGENT
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert err.reason == "CANNED_ANSWER_INACTIVE" and usage(svc, off.name) == 0


def test_reply_with_a_canned_answer_adds_one_agent_reply_per_request_id(svc, answers):
    cid = a_customer(svc, "مریم کاظمی")
    t = open_ticket(svc, subject="پیگیری", customer_id=cid)
    answer = create_answer(answers, "r", "{{ customer.name }} گرامی، درخواست {{ ticket.number }} بررسی شد.")
    req = pb.ReplyWithCannedAnswerRequest(ticket=f"tickets/{t.id}", canned_answer=answer.name, request_id="reply-1")
    msg = answers.ReplyWithCannedAnswer(req, metadata=agent_md("sara"))
    assert msg.kind == ticket_pb2.TicketMessage.KIND_AGENT and msg.author == "sara"
    assert msg.body == f"مریم کاظمی گرامی، درخواست T-{t.number:06d} بررسی شد."
    again = answers.ReplyWithCannedAnswer(req, metadata=agent_md("sara"))  # a retry
    assert again.name == msg.name
    after = ticket(svc, t.id)
    assert after.message_count == 2 and after.state == "open" and after.first_response_time is not None
    assert usage(svc, answer.name) == 1
    with svc.ctx.engine.connect() as conn:
        kinds = (
            conn.execute(
                sa.select(ticket_messages.c.kind)
                .where(ticket_messages.c.ticket_id == t.id)
                .order_by(ticket_messages.c.create_time)
            )
            .scalars()
            .all()
        )
    assert kinds == ["customer", "agent"]
    fails(
        lambda: answers.ReplyWithCannedAnswer(req, metadata=md_none()),
        grpc.StatusCode.UNAUTHENTICATED,
    )


def md_none():
    return []


# -- the knowledge base ---------------------------------------------------------------------------------
def article(kb, title, body="", *, publish=True, category="", language="fa", md=MANAGER, **kw) -> pb.Article:
    a = kb.CreateArticle(
        pb.CreateArticleRequest(
            article=pb.Article(title=title, body=body, kb_category=category, language=language, **kw)
        ),
        metadata=md,
    )
    if publish:
        a = kb.PublishArticle(pb.PublishArticleRequest(name=a.name, etag=a.etag), metadata=md)
    return a


def search(kb, query, md=AGENT, **kw) -> list[pb.ArticleHit]:
    return list(kb.SearchArticles(pb.SearchArticlesRequest(query=query, **kw), metadata=md).results)


def test_categories_tree_crud(svc, kb):
    top = kb.CreateKbCategory(
        pb.CreateKbCategoryRequest(kb_category=pb.KbCategory(display_name="مالی", position=1)), metadata=MANAGER
    )
    child = kb.CreateKbCategory(
        pb.CreateKbCategoryRequest(
            kb_category=pb.KbCategory(
                display_name="فاکتورها",
                parent=top.name,
                ticket_categories=[f"categories/{category_id(svc, 'billing')}"],
            )
        ),
        metadata=MANAGER,
    )
    assert child.parent == top.name and child.etag == '"1"'
    fails(  # the same name under the same parent, in another spelling
        lambda: kb.CreateKbCategory(
            pb.CreateKbCategoryRequest(kb_category=pb.KbCategory(display_name="فاكتورها", parent=top.name)),
            metadata=MANAGER,
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    fails(
        lambda: kb.CreateKbCategory(
            pb.CreateKbCategoryRequest(kb_category=pb.KbCategory(display_name="x")), metadata=AGENT
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    fails(  # a category may not move below itself
        lambda: kb.UpdateKbCategory(
            pb.UpdateKbCategoryRequest(
                kb_category=pb.KbCategory(name=top.name, parent=child.name), update_mask=mask("parent")
            ),
            metadata=MANAGER,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "kb_category.parent",
    )
    renamed = kb.UpdateKbCategory(
        pb.UpdateKbCategoryRequest(
            kb_category=pb.KbCategory(name=top.name, display_name="مالی و حسابداری", etag=top.etag),
            update_mask=mask("display_name"),
        ),
        metadata=MANAGER,
    )
    assert renamed.display_name == "مالی و حسابداری" and renamed.etag == '"2"'
    tops = kb.ListKbCategories(pb.ListKbCategoriesRequest(filter='parent = ""'), metadata=AGENT).kb_categories
    assert [c.name for c in tops] == [top.name]
    a = article(kb, "مقاله", "متن", category=child.name)
    err = fails(
        lambda: kb.DeleteKbCategory(pb.DeleteKbCategoryRequest(name=child.name), metadata=MANAGER),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert err.reason == "KB_CATEGORY_NOT_EMPTY"
    kb.DeleteArticle(pb.DeleteArticleRequest(name=a.name), metadata=MANAGER)
    kb.DeleteKbCategory(pb.DeleteKbCategoryRequest(name=child.name), metadata=MANAGER)
    fails(lambda: kb.GetKbCategory(pb.GetKbCategoryRequest(name=child.name), metadata=AGENT), grpc.StatusCode.NOT_FOUND)


def test_articles_crud_states_views_and_one_vote_per_reader(kb):
    draft = kb.CreateArticle(
        pb.CreateArticleRequest(
            article=pb.Article(title="بازگشت کالا", body="# مراحل\nکالا را ...", tags=["Return"]),
            request_id="art-1",
        ),
        metadata=MANAGER,
    )
    assert draft.state == Art.STATE_DRAFT and draft.format == Art.FORMAT_MARKDOWN and draft.author == "mona"
    assert list(draft.tags) == ["return"]
    again = kb.CreateArticle(
        pb.CreateArticleRequest(article=pb.Article(title="other"), request_id="art-1"), metadata=MANAGER
    )
    assert again.name == draft.name
    fails(
        lambda: kb.CreateArticle(pb.CreateArticleRequest(article=pb.Article(title="")), metadata=MANAGER),
        grpc.StatusCode.INVALID_ARGUMENT,
        "article.title",
    )
    fails(
        lambda: kb.UpdateArticle(
            pb.UpdateArticleRequest(
                article=pb.Article(name=draft.name, state=Art.STATE_PUBLISHED), update_mask=mask("state")
            ),
            metadata=MANAGER,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "update_mask",
    )
    err = fails(
        lambda: kb.ViewArticle(pb.ViewArticleRequest(name=draft.name), metadata=AGENT),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert err.reason == "ARTICLE_NOT_PUBLISHED"
    fails(
        lambda: kb.PublishArticle(pb.PublishArticleRequest(name=draft.name, etag='"9"'), metadata=MANAGER),
        grpc.StatusCode.ABORTED,
    )
    live = kb.PublishArticle(pb.PublishArticleRequest(name=draft.name, etag=draft.etag), metadata=MANAGER)
    assert live.state == Art.STATE_PUBLISHED and live.HasField("publish_time") and live.etag == '"2"'
    edited = kb.UpdateArticle(
        pb.UpdateArticleRequest(
            article=pb.Article(name=live.name, body="متن تازه", format=Art.FORMAT_PLAIN, etag=live.etag),
            update_mask=mask("body", "format"),
        ),
        metadata=MANAGER,
    )
    assert edited.state == Art.STATE_PUBLISHED and edited.body == "متن تازه" and edited.format == Art.FORMAT_PLAIN
    assert kb.ViewArticle(pb.ViewArticleRequest(name=live.name), metadata=AGENT).view_count == 1
    assert kb.ViewArticle(pb.ViewArticleRequest(name=live.name), metadata=AGENT).view_count == 2

    def vote(who, helpful):
        return kb.RecordArticleFeedback(
            pb.RecordArticleFeedbackRequest(name=live.name, helpful=helpful), metadata=agent_md(who)
        )

    assert (vote("a", True).helpful_count, vote("b", True).helpful_count) == (1, 2)
    changed = vote("a", False)  # a second vote replaces the first
    assert (changed.helpful_count, changed.not_helpful_count) == (1, 1)
    same = vote("a", False)
    assert (same.helpful_count, same.not_helpful_count) == (1, 1)
    assert same.etag == edited.etag  # views and votes are not edits

    archived = kb.ArchiveArticle(pb.ArchiveArticleRequest(name=live.name), metadata=MANAGER)
    assert archived.state == Art.STATE_ARCHIVED
    fails(lambda: vote("c", True), grpc.StatusCode.FAILED_PRECONDITION)
    listed = kb.ListArticles(pb.ListArticlesRequest(filter="state = ARCHIVED"), metadata=AGENT).articles
    assert draft.name in [a.name for a in listed]
    kb.DeleteArticle(pb.DeleteArticleRequest(name=live.name, etag=archived.etag), metadata=MANAGER)
    fails(lambda: kb.GetArticle(pb.GetArticleRequest(name=live.name), metadata=AGENT), grpc.StatusCode.NOT_FOUND)


def test_search_matches_arabic_and_persian_letters_and_zwnj_variants_both_ways(kb):
    # written with Arabic ي and ك
    arabic = article(kb, "راهنماي كارت هديه", "براي استفاده از كارت هديه كد را وارد كنيد.", language="fa")
    # written with Persian ی and ک and a zero-width non-joiner
    persian = article(kb, "تنظیمات حساب", "اگر رمز عبور را فراموش کرده‌اید می‌توانید آن را بازیابی کنید.")

    def found(query):
        return [h.article.name for h in search(kb, query)]

    assert arabic.name in found("راهنمای کارت هدیه")  # Persian letters find Arabic ones
    assert arabic.name in found("كارت")
    assert persian.name in found("كرده‌ايد")  # Arabic letters find Persian ones
    assert persian.name in found("فراموش کرده اید")  # a space for the ZWNJ
    assert persian.name in found("می‌توانید بازیابی")  # the ZWNJ as written
    assert persian.name in found("مي توانيد")  # Arabic letters and a space
    assert persian.name in found("میتوانید")  # joined, without the ZWNJ
    joined = article(kb, "پیگیری درخواستهای پشتیبانی", "")  # written joined
    assert joined.name in found("درخواست‌های")  # found when typed with the ZWNJ
    hit = search(kb, "بازيابي")[0]
    assert hit.article.name == persian.name and "**بازیابی**" in hit.snippet
    fails(lambda: search(kb, "  "), grpc.StatusCode.INVALID_ARGUMENT, "query")
    fails(lambda: search(kb, "!!!"), grpc.StatusCode.INVALID_ARGUMENT, "query")
    fails(lambda: search(kb, "x", language="??"), grpc.StatusCode.INVALID_ARGUMENT, "language")


# The pattern joined_forms used until the fuzz found it quadratic: the reference its output is
# compared with on texts short enough for it.
_QUADRATIC_COMPOUND = re.compile(r"[^\W_]+(?:\u200c[^\W_]+)+")


def _reference_joined_forms(text: str) -> str:
    return " ".join(dict.fromkeys(normalize(w.replace("\u200c", "")) for w in _QUADRATIC_COMPOUND.findall(text or "")))


def test_joined_forms_are_what_they_were_on_persian_text_and_any_short_text():
    """joined_forms was rewritten to be linear in the text: on normal Persian text and on every
    short text (random ones from letters, digits, '_', ZWNJ, ZWJ, marks and punctuation) it gives
    what the old pattern gave."""
    samples = [
        "اگر رمز عبور را فراموش کرده‌اید می‌توانید آن را بازیابی کنید.",
        "پیگیری درخواست‌های پشتیبانی — درخواست‌ها و می‌خواهم",
        "راهنماي كارت هديه؛ خوش‌آمد‌گویی و نیم‌فاصله‌ها ۱۲‌۳",
        "a\u200cb _x\u200cy\u200c\u200cz x_\u200cy \u200cمی\u200c ّم\u200cی",
        "",
    ]
    for text in samples:
        assert joined_forms(text) == _reference_joined_forms(text), text
    assert joined_forms(samples[0]) == "کردهاید میتوانید"
    assert joined_forms(samples[1]) == "درخواستهای درخواستها میخواهم"
    alphabet = ["ب", "ي", "a", "1", "۱", "_", "\u200c", "\u200c", " ", "\n", "-", "\u0651", "\u200d", "\u200f", "é"]
    rng = random.Random(20261204)
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 16)))
        assert joined_forms(text) == _reference_joined_forms(text), repr(text)


def test_joined_forms_of_a_word_of_200000_letters_is_found_in_linear_time():
    """joined_forms on a word of 10,000, 100,000 and 200,000 letters, with and without a ZWNJ
    part: the same output at each size (none; the word joined). Run in a child held to 30 CPU
    seconds (the quadratic pattern took seconds at 20,000 letters and would take minutes at
    200,000, in C code that no signal interrupts); the budget of 5 CPU seconds for all of it is
    generous, a guard against the quadratic run only."""
    child = textwrap.dedent(
        """
        import json, resource, time
        resource.setrlimit(resource.RLIMIT_CPU, (30, 30))
        from support_svc.knowledge import joined_forms, search_values
        out = {}
        start = time.process_time()
        for n in (10_000, 100_000, 200_000):
            word = "\u0628" * n
            out[n] = [
                joined_forms(word),
                joined_forms(word + "\u200c\u0647\u0627") == word + "\u0647\u0627",
                search_values("\u0639", word)["search_text"] == "\u0639 " + word,
            ]
        out["cpu"] = time.process_time() - start
        print(json.dumps(out))
        """
    )
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])  # killed (SIGXCPU, SIGKILL): over 30 CPU s
    out = json.loads(proc.stdout)
    for n in ("10000", "100000", "200000"):
        assert out[n] == ["", True, True], n
    assert out["cpu"] < 5, out["cpu"]


def test_search_finds_partial_words_and_ranks_title_matches_first(kb):
    body_only = article(
        kb,
        "شرایط خرید اقساطی",
        "ضمانت نامه گارانتی دستگاه، گارانتی قطعات و گارانتی تعویض؛ همه گارانتی ها در این متن آمده اند.",
    )
    in_title = article(kb, "گارانتی دستگاه", "مدت و شرایط خدمات پس از فروش.")
    hits = search(kb, "گارانتی")
    assert [h.article.name for h in hits[:2]] == [in_title.name, body_only.name]
    assert hits[0].title_match and not hits[1].title_match and hits[0].score > 0
    assert in_title.name in [h.article.name for h in search(kb, "گاران")]  # a prefix
    assert in_title.name in [h.article.name for h in search(kb, "ارانتی")]  # a partial word: trigrams


def test_drafts_are_not_found_by_agents_unless_asked(kb):
    draft = article(kb, "پیش‌نویس قیمت‌گذاری ویژه", "قیمت گذاری", publish=False)
    live = article(kb, "قیمت‌گذاری محصولات", "قیمت گذاری")
    names = [h.article.name for h in search(kb, "قیمت گذاری")]
    assert live.name in names and draft.name not in names
    asked = [h.article.name for h in search(kb, "قیمت گذاری", states=[Art.STATE_DRAFT])]
    assert asked == [draft.name]
    both = {h.article.name for h in search(kb, "قیمت گذاری", states=[Art.STATE_DRAFT, Art.STATE_PUBLISHED])}
    assert both == {draft.name, live.name}
    archived = kb.ArchiveArticle(pb.ArchiveArticleRequest(name=live.name), metadata=MANAGER)
    assert archived.name not in [h.article.name for h in search(kb, "قیمت گذاری")]


def test_search_narrows_by_language_and_category_tree(kb):
    top = kb.CreateKbCategory(
        pb.CreateKbCategoryRequest(kb_category=pb.KbCategory(display_name="ارسال")), metadata=MANAGER
    )
    sub = kb.CreateKbCategory(
        pb.CreateKbCategoryRequest(kb_category=pb.KbCategory(display_name="پست", parent=top.name)), metadata=MANAGER
    )
    in_sub = article(kb, "زمان تحویل مرسوله", "", category=sub.name)
    elsewhere = article(kb, "تحویل حضوری مرسوله", "")
    english = article(kb, "Parcel delivery time", "", language="en", category=sub.name)
    names = [h.article.name for h in search(kb, "مرسوله", kb_category=top.name)]
    assert names == [in_sub.name] and elsewhere.name in [h.article.name for h in search(kb, "مرسوله")]
    assert [h.article.name for h in search(kb, "parcel", language="en")] == [english.name]
    assert search(kb, "parcel", language="fa") == []


# -- suggestions -------------------------------------------------------------------------------------------
def test_suggestions_for_an_invoice_ticket_put_the_billing_answer_and_the_invoice_article_first(svc, answers, kb):
    billing, technical = category_id(svc, "billing"), category_id(svc, "technical")
    bill_answer = create_answer(
        answers,
        "ارسال فاکتور رسمی",
        "{{ customer.name | default('مشتری گرامی') }}، فاکتور رسمی سفارش شما پیوست شد.",
        categories=[f"categories/{billing}"],
    )
    generic = create_answer(answers, "پاسخ عمومی فاکتور", "درباره فاکتور به زودی پاسخ می دهیم.")
    create_answer(answers, "فاکتور تعمیرات", "فاکتور تعمیر", categories=[f"categories/{technical}"])
    create_answer(answers, "Invoice", "invoice", language="en")
    create_answer(answers, "فاکتور غیرفعال", "فاکتور", categories=[f"categories/{billing}"], active=False)
    finance = kb.CreateKbCategory(
        pb.CreateKbCategoryRequest(
            kb_category=pb.KbCategory(display_name="صورتحساب", ticket_categories=[f"categories/{billing}"])
        ),
        metadata=MANAGER,
    )
    invoice = article(
        kb, "دریافت فاکتور رسمی", "برای دریافت فاکتور رسمی کد اقتصادی را وارد کنید.", category=finance.name
    )
    other = article(kb, "ارسال کالا", "زمان ارسال کالا و فاکتور همراه بسته")
    hidden = article(kb, "فاکتور پیش‌نویس", "فاکتور", publish=False)
    t = open_ticket(
        svc,
        subject="فاكتور خريد",  # Arabic letters in the subject
        body="سلام، لطفاً فاکتورِ رسمی سفارش ۱۲۳۴ را برایم بفرستید.",
        category_id=billing,
    )
    resp = answers.SuggestForTicket(pb.SuggestForTicketRequest(ticket=f"tickets/{t.id}"), metadata=AGENT)
    names = [s.canned_answer.name for s in resp.canned_answers]
    assert names[0] == bill_answer.name and resp.canned_answers[0].in_category
    assert generic.name in names and not resp.canned_answers[names.index(generic.name)].in_category
    assert len(names) == 2  # not the other category's, the English or the inactive one
    articles = [h.article.name for h in resp.articles]
    assert articles[0] == invoice.name and other.name in articles and hidden.name not in articles
    assert "**فاکتور**" in resp.articles[0].snippet
    # a ticket of another category: the answer scoped to billing is left out
    t2 = open_ticket(svc, subject="فاکتور تعمیر دستگاه", category_id=technical)
    resp2 = answers.SuggestForTicket(pb.SuggestForTicketRequest(ticket=f"tickets/{t2.id}"), metadata=AGENT)
    assert bill_answer.name not in [s.canned_answer.name for s in resp2.canned_answers]
    fails(
        lambda: answers.SuggestForTicket(pb.SuggestForTicketRequest(ticket=f"tickets/{uuid.uuid4()}"), metadata=AGENT),
        grpc.StatusCode.NOT_FOUND,
    )


def test_admin_and_roles(answers, kb):
    create_answer(answers, "by admin", "سلام", md=ADMIN)
    fails(
        lambda: kb.CreateArticle(pb.CreateArticleRequest(article=pb.Article(title="x")), metadata=AGENT),
        grpc.StatusCode.PERMISSION_DENIED,
    )


def test_over_http_through_the_gateway(svc, answers):
    from crm_gateway import create_app
    from crm_gateway.clients import Clients
    from tests.support.harness import assert_problem, token

    down = "127.0.0.1:9"
    clients = Clients({"customer": down, "sales": down, "support": f"127.0.0.1:{svc.port}", "reporting": down})
    http = create_app(clients).test_client()
    manager = {"Authorization": f"Bearer {token('support_manager', 'mona')}"}
    agent = {"Authorization": f"Bearer {token('support_agent', 'omid')}"}
    try:
        made = http.post(
            "/v1/cannedAnswers", json={"title": "http", "body": "{{ ticket.number }} {{ x }}"}, headers=manager
        )
        body = assert_problem(made, 400, "body")  # the gateway names fields within the HTTP body
        assert "x is not a placeholder" in str(body["errors"])
        made = http.post("/v1/cannedAnswers", json={"title": "http", "body": "{{ ticket.number }}"}, headers=manager)
        assert made.status_code == 201, made.get_data(as_text=True)
        name = made.get_json()["name"]
        t = open_ticket(svc)
        out = http.post(f"/v1/{name}:render", json={"ticket": f"tickets/{t.id}"}, headers=agent)
        assert out.status_code == 200 and out.get_json()["text"] == f"T-{t.number:06d}"
        created = http.post("/v1/articles", json={"title": "راهنمای پرداخت", "body": "پرداخت"}, headers=manager)
        art = created.get_json()["name"]
        http.post(f"/v1/{art}:publish", json={}, headers=manager)
        found = http.get("/v1/articles:search", query_string={"query": "پرداخت"}, headers=agent)
        assert found.status_code == 200, found.get_data(as_text=True)
        assert [r["article"]["name"] for r in found.get_json()["results"]] == [art]
        assert_problem(http.post("/v1/articles", json={"title": "x"}, headers=agent), 403)
    finally:
        clients.close()


def test_articles_of_long_words_and_of_200000_characters_are_created_quickly(svc, answers, kb):
    """Sent (fuzz): CreateCannedAnswer whose body is one 20,000-letter word. Came back: OK after
    5.8 s of CPU (the ZWNJ pattern of joined_forms retried the word from each of its letters);
    an article body of 200,000 letters takes a hundred times that, so any support user could
    keep a core busy for minutes. Should be: linear. Checked by what is stored and found, with a
    generous CPU budget (process CPU seconds: the service runs in this process) only as a guard
    against the quadratic run. The word is 50,000 letters here (the quadratic pattern: tens of
    seconds, holding the GIL of this process, so no deadline ends it); the test above takes
    200,000. Last in the module, the long-word articles drafts: a search whose candidates hold a
    word of 200,000 repeated letters is slow in PostgreSQL (pg_trgm's word_similarity), which is
    not what this test is about."""
    start = time.process_time()
    one_word = article(kb, "مقاله یک‌کلمه‌ای", "پ" * 50_000, publish=False)
    answer = create_answer(answers, "پاسخ بلند", "ب" * 20_000)
    assert time.process_time() - start < 5, "an article of one 50,000-letter word, an answer of one of 20,000"
    start = time.process_time()
    long_word = "ت" * (ARTICLE_BODY_LIMIT - 3)
    joined = article(kb, "مقاله دیگر", long_word + "\u200cها", publish=False)  # the longest body, one ZWNJ word
    phrase = "برای پیگیری درخواست‌های پشتیبانی می‌توانید شماره تیکت را وارد کنید. "
    prose = article(kb, "راهنمای پیگیری بلند", (phrase * (ARTICLE_BODY_LIMIT // len(phrase)))[:ARTICLE_BODY_LIMIT])
    assert time.process_time() - start < 5, "two articles of 200,000 characters"

    with svc.ctx.engine.connect() as conn:
        stored = conn.execute(
            sa.select(canned_answers.c.search_text).where(canned_answers.c.id == answer.name.split("/")[1])
        ).scalar()
        texts = {str(k): v for k, v in conn.execute(sa.select(kb_articles.c.id, kb_articles.c.search_text))}
    assert stored == "پاسخ بلند " + "ب" * 20_000  # no ZWNJ word: nothing joined after the text
    assert texts[one_word.name.split("/")[1]] == "مقاله یک کلمه ای " + "پ" * 50_000 + "\nیککلمهای"
    assert texts[joined.name.split("/")[1]].endswith("\n" + long_word + "ها")
    assert texts[prose.name.split("/")[1]].endswith("\nدرخواستهای میتوانید")
    assert prose.name in [h.article.name for h in search(kb, "درخواستهای پشتیبانی")]  # typed joined


def test_a_search_reaching_an_article_of_one_repeated_letter_reads_only_its_head(svc, kb):
    """pg_trgm's word_similarity grows with the square of a text whose trigrams repeat: one
    published article of 200,000 repeated letters made every search that reached it take about
    20 s in PostgreSQL (400,000: 84 s). The trigram match and its similarity read the first
    20,000 characters of the text (search_head); the full-text match still reads all of it. The
    deadline is only a guard: without the bound the call ends DEADLINE_EXCEEDED."""
    from support_svc.knowledge import SEARCH_HEAD

    body = "ژ" * (ARTICLE_BODY_LIMIT - 100) + " پایان‌نامه"
    a = article(kb, "مقاله تکراری", body)
    with svc.ctx.engine.connect() as conn:
        head, text = conn.execute(
            sa.select(sa.func.length(kb_articles.c.search_head), sa.func.length(kb_articles.c.search_text)).where(
                kb_articles.c.id == a.name.split("/")[1]
            )
        ).one()
    assert head == SEARCH_HEAD and text > ARTICLE_BODY_LIMIT - 100
    hits = kb.SearchArticles(pb.SearchArticlesRequest(query="ژژژژژژ"), metadata=AGENT, timeout=10).results
    assert a.name in [h.article.name for h in hits]  # the trigram match, on the head
    hits = kb.SearchArticles(pb.SearchArticlesRequest(query="پایان نامه"), metadata=AGENT, timeout=10).results
    assert a.name in [h.article.name for h in hits]  # the full text, past the head
    kb.ArchiveArticle(pb.ArchiveArticleRequest(name=a.name), metadata=MANAGER)
