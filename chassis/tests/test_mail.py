"""crm_chassis.mail's compose (the MIME a campaign sends, read back by the email package),
crm_chassis.templating's sandbox, crm_chassis.bots' settings and persian_letters."""

from __future__ import annotations

import email
import email.policy

import pytest
from jinja2 import StrictUndefined
from jinja2.exceptions import SecurityError

from crm_chassis import bots, templating
from crm_chassis.config import ConfigError
from crm_chassis.mail import Attachment, compose, encoded_words, smtp_settings
from crm_chassis.persian import persian_letters

LONG_SUBJECT = "سارا عزیز، جشنواره بزرگ پاییز با تخفیف‌های ویژه برای مشتریان طلایی در همه شعبه‌ها آغاز شد"


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


def test_compose_writes_7bit_headers_that_decode_to_the_text():
    unsub = "<mailto:unsubscribe+0123456789abcdef@crm.example.com?subject=unsubscribe>, <https://crm.example.com/u/0123456789abcdef0123456789abcdef>"
    data = compose(
        [
            ("From", "news@crm.test"),
            ("To", "sara@example.ir"),
            ("Subject", LONG_SUBJECT),
            ("Message-ID", "<cmp-1@crm.test>"),
            ("List-Unsubscribe", unsub),
        ],
        "متن ساده",
        "<p dir='rtl'>متن</p>",
    )
    head = data.split(b"\r\n\r\n", 1)[0]
    head.decode("ascii")  # every header byte is 7-bit
    assert all(len(line) <= 998 for line in head.split(b"\r\n"))
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF line ends only
    m = parse(data)
    assert m["Subject"] == LONG_SUBJECT and len(head.split(b"Subject:")[1].split(b"\r\nMessage-ID")[0]) > 100
    assert m["List-Unsubscribe"] == unsub and m["Date"] and m["MIME-Version"] == "1.0"
    text, html = m.iter_parts()
    assert (text.get_content(), html.get_content()) == ("متن ساده", "<p dir='rtl'>متن</p>")
    assert text["Content-Transfer-Encoding"] == "base64"  # Persian: base64, not quoted-printable


def test_compose_refuses_header_injection_and_writes_a_text_only_mail():
    data = compose([("To", "a@b.c"), ("Subject", "hi\r\nBcc: victim@example.com")], "plain text\nline two")
    m = parse(data)
    assert m["Bcc"] is None and m["Subject"] == "hi Bcc: victim@example.com"
    assert m.get_content_type() == "text/plain" and m["Content-Transfer-Encoding"] == "quoted-printable"
    assert m.get_content() == "plain text\r\nline two"  # canonical CRLF line breaks


def test_compose_attaches_files_after_the_text_and_html():
    payload = bytes(range(256)) * 40  # binary, several base64 lines
    data = compose(
        [("To", "a@b.c"), ("Subject", "گزارش")],
        "گزارش هفتگی پیوست است",
        "<p>report</p>",
        [
            Attachment("acquisition-1.xlsx", "application/vnd.ms-excel", payload),
            Attachment("گزارش.csv", "text/csv", b"a,b\r\n"),
        ],
    )
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    m = parse(data)
    assert m.get_content_type() == "multipart/mixed"
    body, first, second = m.iter_parts()
    assert body.get_content_type() == "multipart/alternative"
    assert [p.get_content() for p in body.iter_parts()] == ["گزارش هفتگی پیوست است", "<p>report</p>"]
    assert first.get_filename() == "acquisition-1.xlsx" and first.get_content() == payload
    assert second.get_filename() == "گزارش.csv" and second.is_attachment()
    plain = parse(compose([("To", "a@b.c")], "x", attachments=[Attachment("r.pdf", "application/pdf", b"%PDF")]))
    text, pdf = plain.iter_parts()
    assert text.get_content_type() == "text/plain" and pdf.get_content() == b"%PDF"


def test_encoded_words_keep_every_word_short_and_split_no_character():
    words = encoded_words(LONG_SUBJECT * 3).split("\r\n ")
    assert len(words) > 3 and all(len(w) <= 75 for w in words)
    assert str(email.header.make_header(email.header.decode_header(" ".join(words)))) == LONG_SUBJECT * 3
    assert encoded_words("plain") == "plain"


def test_smtp_settings():
    s = smtp_settings({"SMTP_PORT": "2600", "SMTP_FROM_NAME": "فروشگاه"}, default_from="news@crm.test")
    assert (s.port, s.sender, s.host) == (2600, "news@crm.test", "127.0.0.1")
    assert s.from_header.startswith("=?utf-8?") and s.from_header.endswith("<news@crm.test>")
    for env in ({"SMTP_PORT": "x"}, {"SMTP_PORT": "70000"}):
        with pytest.raises(ConfigError):
            smtp_settings(env)


def test_the_sandbox_refuses_calls_and_unbounded_work():
    class Box(templating.Sandbox):
        what = "a test template"

    env = Box(undefined=StrictUndefined)
    assert env.from_string("{{ name | upper }}").render(name="x") == "X"
    for source, words in (
        ("{{ name.upper() }}", "calls are not allowed in a test template"),
        ("{{ 'ab' * 100000 }}", "repetition"),
        ("{{ 9 ** 9 ** 9 }}", "power"),
        ("{{ '%s' % name }}", "formatting with %"),
        ("{{ name.__class__ }}", ""),
    ):
        with pytest.raises(SecurityError) as err:
            env.from_string(source).render(name="x")
        assert words in str(err.value)


def test_the_sandbox_bounds_the_work_of_filters_and_the_output():
    """A width or count of a filter (center(999999999) made a gigabyte, slice(99999999) ran for
    minutes), an output growing with an argument (replace, join), a %-format width, a loop
    repeating a long text: refused before the work is done; a filter's assertion
    (truncate(-5)) is a template error, not an AssertionError."""
    from jinja2.exceptions import TemplateError

    class Box(templating.Sandbox):
        what = "a test template"

    env = Box(undefined=StrictUndefined)
    values = {"name": "سارا", "tags": ["a", "b"]}
    for source in (
        "{{ name | center(999999999) }}",
        "{{ name | indent(99999999, true) }}",
        "{{ tags | slice(99999999) | list }}",
        "{{ '%99999999s' | format(name) }}",
        "{{ ('x' * 9999) | replace('x', 'x' * 9999) }}",
        "{{ ('x' * 9999) | list | join('y' * 9999) }}",
        "{% for a in 'x' * 9999 %}{{ 'y' * 9999 }}{% endfor %}",
        "{{ name | truncate(-5) }}",
    ):
        with pytest.raises(TemplateError):
            templating.render(env.from_string(source), values)
    ok = "{{ tags | join(', ') }} {{ name | center(8) | trim }} {{ name | replace('ا', 'آ') }} {{ '%5.2f' | format(3.14159) }}"
    assert templating.render(env.from_string(ok), values) == "a, b سارا سآرآ  3.14"


def test_the_sandbox_bounds_loops_that_output_nothing():
    """Nested loops over long strings output nothing, so the output bound never stops them (three
    of 'x' * 9999 are 10^12 steps): the loops' budget does, and loops within it work as ever
    (`loop.index`, `loop.length`, `else`, a filtered loop)."""

    class Box(templating.Sandbox):
        what = "a test template"

    env = Box(undefined=StrictUndefined)
    # 4,000,000 steps (unbounded they would run to the end: a second here, 10^12 for three of 9999)
    slow = "{% set s = 'x' * 2000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}done"
    with pytest.raises(SecurityError) as err:
        templating.render(env.from_string(slow), {})
    assert "steps" in str(err.value)
    ok = (
        "{% for x in tags if x != 'b' %}{{ loop.index }}{{ x }}{% endfor %}"
        "|{% for t in [] %}{{ t }}{% else %}none{% endfor %}|{% for t in tags %}{{ loop.length }}{% endfor %}"
    )
    assert templating.render(env.from_string(ok), {"tags": ["a", "b", "c"]}) == "1a2c|none|333"
    # the budget is per render: one under it renders every time
    fine = "{% for a in 'x' * 400 %}{% for b in 'y' * 400 %}{% endfor %}{% endfor %}done"
    for _ in range(3):
        assert templating.render(env.from_string(fine), {}) == "done"


def test_bot_settings():
    env = {"TELEGRAM_BOT_TOKEN": " 1:A ", "BALE_API_BASE": "http://bale.local/", "BOT_API_TIMEOUT_SECONDS": "-1"}
    assert bots.bot_token("telegram", env) == "1:A" and bots.bot_token("bale", env) == ""
    assert (
        bots.api_base("bale", env) == "http://bale.local"
        and bots.api_base("telegram", env) == "https://api.telegram.org"
    )
    assert bots.api_timeout(env) == 10.0
    clients = bots.clients(env)
    assert list(clients) == ["telegram"] and isinstance(clients["telegram"], bots.TelegramBot)
    assert [bots.BotApiError(c, "").retryable for c in (0, 400, 403, 429, 502)] == [True, False, False, True, True]


def test_persian_letters_changes_only_arabic_forms():
    assert persian_letters("علي كريمي ٣ نیم‌فاصله ABC") == "علی کریمی ۳ نیم‌فاصله ABC"
    assert persian_letters(None) == ""
