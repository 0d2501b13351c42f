"""Field validators: e-mail, phone (E.164), Iranian national id, dates, URLs."""

from __future__ import annotations

import datetime as dt
import re

import phonenumbers

from .text import digits_only

_EMAIL = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)
_URL = re.compile(r"^(https?://)?[A-Za-z0-9.-]+\.[A-Za-z]{2,}(:\d+)?(/\S*)?$")


def email_ok(value: str) -> bool:
    return len(value) <= 254 and bool(_EMAIL.match(value))


def website_ok(value: str) -> bool:
    return len(value) <= 500 and bool(_URL.match(value))


def phone_e164(value: str, region: str) -> str | None:
    """The number in E.164 (+982112345678), or None if it is not a possible number.
    Persian digits are accepted; a national number is read in `region`."""
    raw = value.strip()
    plus = raw.startswith("+") or raw.startswith("00")
    digits = digits_only(raw)
    if raw.startswith("00"):
        digits = digits[2:]
    if not 4 <= len(digits) <= 17:
        return None
    try:
        num = phonenumbers.parse(("+" if plus else "") + digits, None if plus else region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(num):
        return None
    return phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)


def iran_national_id_ok(value: str) -> bool:
    """The 10-digit kod-e melli with its check digit (mod 11 scheme); all-same digits are invalid."""
    d = digits_only(value)
    if len(d) != 10 or len(set(d)) == 1:
        return False
    total = sum(int(d[i]) * (10 - i) for i in range(9)) % 11
    check = int(d[9])
    return check == total if total < 2 else check == 11 - total


def iran_postal_code_ok(value: str) -> bool:
    return len(digits_only(value)) == 10


def date_ok(year: int, month: int, day: int) -> dt.date | None:
    try:
        return dt.date(year, month, day)
    except ValueError:
        return None
