"""The inbound mail reader's reply helpers (the parser itself is tested with support-svc's
mail, its first user: support-svc/tests/test_mail.py)."""

from __future__ import annotations

import pytest

from crm_chassis.mail_parse import parse, reply_text


@pytest.mark.parametrize(
    "body, written",
    [
        ("سلام، مایلم بیشتر بدانم.\n\nدر تاریخ ۱۲ آذر ۱۴۰۵، خبرنامه نوشت:\n> متن قبلی\n", "سلام، مایلم بیشتر بدانم."),
        (
            "Yes please call me\n\nOn Tue, Dec 1, 2026 at 10:00 AM News <news@x.ir>\nwrote:\n> old\n",
            "Yes please call me",
        ),
        ("Interested.\r\n-----Original Message-----\r\nFrom: news\r\n", "Interested."),
        ("Sure.\n\n________________________________\nFrom: News\nSent: Monday\n", "Sure."),
        ("> only a quote\nand my answer", "and my answer"),
        ("From: the first line is mine\nbody", "From: the first line is mine\nbody"),  # nothing above it
    ],
)
def test_reply_text_keeps_what_the_sender_wrote_above_the_quote(body, written):
    assert reply_text(body) == written


@pytest.mark.parametrize(
    "header, auto",
    [
        ("Auto-Submitted: auto-replied", True),
        ("Auto-Submitted: no", False),
        ("X-Autoreply: yes", True),
        ("Precedence: bulk", True),
        ("", False),
    ],
)
def test_auto_submitted_mail_is_told_from_a_persons(header, auto):
    raw = f"From: a@b.ir\r\nSubject: x\r\n{header + chr(13) + chr(10) if header else ''}\r\nbody\r\n".encode()
    assert parse(raw).auto_submitted is auto
