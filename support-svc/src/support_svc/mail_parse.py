"""support-svc's own mail helpers beside the chassis reader (crm_chassis.mail_parse, re-exported
here): fax by mail, and the subject and References of an outbound reply.
"""

from __future__ import annotations

import re

from crm_chassis.mail_parse import (  # noqa: F401 - the reader, as mail_in and the tests use it
    EMPTY_BODY,
    NO_SUBJECT,
    ParsedMail,
    decode_bytes,
    html_to_text,
    is_synthetic,
    message_ids,
    synthetic_message_id,
    text_to_html,
)
from crm_chassis.mail_parse import parse as _parse
from crm_chassis.mail_parse import unparsed as _unparsed
from crm_chassis.persian import digits_only, phone_e164

from .ticketing import BODY_LIMIT, SUBJECT_LIMIT

_FAX_DIGITS = re.compile(r"\+?[0-9\u06F0-\u06F9\u0660-\u0669][0-9\u06F0-\u06F9\u0660-\u0669 \-().]{3,}")
_PREFIX = re.compile(r"^\s*((re|fw|fwd|aw|wg|پاسخ|ارسال)\s*(\[\d+\])?\s*[:：]\s*)+", re.IGNORECASE)
_TICKET_TAG = re.compile(r"\[T-\d{1,12}\]\s*")


def parse(raw: bytes, envelope_from: str = "", rcpt_tos=()) -> ParsedMail:
    """Everything a ticket needs from one inbound mail, cut at a ticket message's limits."""
    return _parse(raw, envelope_from, rcpt_tos, body_limit=BODY_LIMIT, subject_limit=SUBJECT_LIMIT)


def unparsed(raw: bytes, envelope_from: str, rcpts: list[str], error: str) -> ParsedMail:
    return _unparsed(raw, envelope_from, rcpts, error, BODY_LIMIT, SUBJECT_LIMIT)


# -- fax by mail -----------------------------------------------------------------------------
def gateway_list(setting: str) -> tuple[str, ...]:
    """FAX_GATEWAY_ADDRESSES: comma-separated addresses, or "@domain" for a whole domain."""
    return tuple(a.strip().lower() for a in (setting or "").split(",") if a.strip())


def is_gateway(address: str, gateways) -> bool:
    address = (address or "").lower()
    if not address or "@" not in address:
        return False
    domain = "@" + address.rsplit("@", 1)[1]
    return any(g == address or (g.startswith("@") and g == domain) for g in gateways)


def fax_number(region: str, *texts: str) -> str:
    """The sender's fax number from the gateway's subject or From display name, in E.164 when
    it is a possible number (else its digits; '' if none)."""
    for text in texts:
        for m in _FAX_DIGITS.finditer(text or ""):
            candidate = m.group(0).strip()
            digits = digits_only(candidate)
            if len(digits) < 5:
                continue
            return phone_e164(candidate, region) or digits
    return ""


# -- replies ---------------------------------------------------------------------------------
def strip_prefixes(subject: str) -> str:
    """ "Re: Fwd: [T-000123] x" -> "x"."""
    s = _PREFIX.sub("", subject or "")
    s = _TICKET_TAG.sub("", s)
    return _PREFIX.sub("", s).strip()


def reply_subject(number: str, subject: str) -> str:
    """ "Re: [T-000123] subject": the ticket number once, one "Re:"."""
    rest = strip_prefixes(subject)
    return f"Re: [{number}] {rest}".rstrip()


def references(previous: list[str], message_id: str, limit: int = 20) -> list[str]:
    """The References of a reply to a message with `previous` References and `message_id`."""
    out = [m for m in [*previous, message_id] if m]
    seen: list[str] = []
    for m in out:
        if m not in seen:
            seen.append(m)
    return seen[-limit:]
