"""Field validators of a customer record: e-mail and web address. Phone numbers (E.164), the
Iranian national id and postal code: crm_chassis.persian."""

from __future__ import annotations

import re

_EMAIL = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)
_URL = re.compile(r"^(https?://)?[A-Za-z0-9.-]+\.[A-Za-z]{2,}(:\d+)?(/\S*)?$")


def email_ok(value: str) -> bool:
    return len(value) <= 254 and bool(_EMAIL.match(value))


def website_ok(value: str) -> bool:
    return len(value) <= 500 and bool(_URL.match(value))
