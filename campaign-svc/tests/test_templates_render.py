"""Rendering without the service: the text part made once from the HTML template is the text
of each rendered HTML, the HTML is escaped and whole, and the sandbox's limits."""

from __future__ import annotations

import pytest

from bench.campaign_mail_bench import HTML as BENCH_HTML
from bench.campaign_mail_bench import recipients
from campaign_svc import templates as T
from crm_chassis.errors import InvalidArgument

TEMPLATES = [
    BENCH_HTML,
    "<p>{{ customer.display_name }}</p><ul>{% for t in customer.tags %}<li>{{ t }}</li>{% endfor %}</ul>",
    '<table><tr><td>{{ customer.city | default("—") }}</td><td><a href="{{ unsubscribe_url }}">لغو</a></td></tr></table>',
    "<div>{% if customer.given_name %}<h2>{{ customer.given_name }}</h2>{% endif %}<p>متن &amp; بیشتر</p><br>پایان</div>",
]


@pytest.mark.parametrize("html", TEMPLATES)
def test_the_text_template_gives_the_text_of_each_rendered_html(html):
    assert T.text_template(html) is not None
    draft = T.Draft("email", "s", html, "", "fa", "rtl")
    for _, values in recipients(12):
        values["customer"]["tags"] = ["الف", "ب & پ"]
        r = T.render(draft, values)
        assert r.text == T.html_to_text(r.html)


def test_markup_inside_an_expression_falls_back_to_parsing_each_html():
    html = "<p>{% if customer.order_count > 2 %}وفادار{% else %}جدید{% endif %}</p>"
    assert T.text_template(html) is None
    r = T.render(T.Draft("email", "s", html, "", "fa", "rtl"), T.SAMPLE)
    assert r.text == "وفادار"


def test_values_are_escaped_in_html_and_plain_in_text():
    values = T.values_of(T.Group("customer", {"display_name": "<b>سارا</b> & co"}), "fa")
    r = T.render(
        T.Draft("email", "{{ customer.display_name }}", "<p>{{ customer.display_name }}</p>", "", "fa", "rtl"), values
    )
    assert "&lt;b&gt;سارا&lt;/b&gt; &amp; co" in r.html and "<b>" not in r.html
    assert r.text == "<b>سارا</b> & co" and r.subject == "<b>سارا</b> & co"
    assert T.check("html_body", "{{ customer.display_name | safe }}")  # no way around the escaping


def test_an_sms_longer_than_the_limit_is_refused_naming_the_field():
    draft = T.Draft("sms", "", "", "{{ customer.display_name * 30 }}", "fa", "rtl")
    with pytest.raises(InvalidArgument) as err:
        T.render(draft, T.values_of(T.Group("customer", {"display_name": "سارا محمدی " * 5}), "fa"))
    assert err.value.violations[0].field == "template.text_body"


def test_a_fragment_becomes_a_document_and_a_document_keeps_its_own_direction():
    doc = T.html_document("<p>hi</p>", "en", "ltr")
    assert (
        doc.startswith('<!DOCTYPE html><html dir="ltr" lang="en">')
        and 'style="direction: ltr; text-align: left"' in doc
    )
    own = T.html_document('<html dir="ltr"><body><p>x</p></body></html>', "fa", "rtl")
    assert '<html dir="ltr" lang="fa">' in own
