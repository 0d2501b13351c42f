"""Customer rules: validation and derived fields. No gRPC and no SQL here."""

from __future__ import annotations

import re
from dataclasses import dataclass

from crm_chassis.errors import FieldViolation, InvalidArgument

PERSON, ORGANIZATION = 1, 2
MAX_NAME = 200
_EMAIL = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)
_PHONE_CHARS = re.compile(r"^\+?[0-9 ()\-.]+$")
_SOURCE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass
class NewCustomer:
    type: int
    given_name: str = ""
    family_name: str = ""
    organization_name: str = ""
    email: str = ""
    phone: str = ""
    acquisition_source: str = ""

    @property
    def display_name(self) -> str:
        if self.type == ORGANIZATION:
            return self.organization_name
        return " ".join(p for p in (self.given_name, self.family_name) if p)


def validate_new(c: NewCustomer, prefix: str = "customer") -> NewCustomer:
    """Trim, normalise and check a new customer; raise InvalidArgument listing every problem."""
    c.given_name = c.given_name.strip()
    c.family_name = c.family_name.strip()
    c.organization_name = c.organization_name.strip()
    c.email = c.email.strip()
    c.phone = c.phone.strip()
    c.acquisition_source = c.acquisition_source.strip().lower()
    v: list[FieldViolation] = []
    if c.type not in (PERSON, ORGANIZATION):
        v.append(FieldViolation(f"{prefix}.type", "must be CUSTOMER_TYPE_PERSON or CUSTOMER_TYPE_ORGANIZATION"))
    elif c.type == PERSON and not (c.given_name or c.family_name):
        v.append(FieldViolation(f"{prefix}.family_name", "a person needs a given name or a family name"))
    elif c.type == ORGANIZATION and not c.organization_name:
        v.append(FieldViolation(f"{prefix}.organization_name", "an organisation needs a name"))
    for name in ("given_name", "family_name", "organization_name"):
        if len(getattr(c, name)) > MAX_NAME:
            v.append(FieldViolation(f"{prefix}.{name}", f"must be at most {MAX_NAME} characters"))
    if c.email and (len(c.email) > 254 or not _EMAIL.match(c.email)):
        v.append(FieldViolation(f"{prefix}.email", "is not a valid e-mail address"))
    if c.phone:
        digits = sum(ch.isdigit() for ch in c.phone)
        if not _PHONE_CHARS.match(c.phone) or not 5 <= digits <= 20:
            v.append(FieldViolation(f"{prefix}.phone", "is not a valid phone number"))
    if c.acquisition_source and not _SOURCE.match(c.acquisition_source):
        v.append(
            FieldViolation(f"{prefix}.acquisition_source", "must be a key of letters, digits, '_' or '-' (at most 40)")
        )
    if v:
        raise InvalidArgument(v)
    return c


def parse_name(name: str, field: str = "name") -> str:
    """customers/{uuid} -> uuid."""
    prefix, _, cid = name.partition("/")
    if prefix != "customers" or not _UUID.match(cid):
        raise InvalidArgument.field(field, "must be 'customers/{customer_id}' with a UUID id")
    return cid
