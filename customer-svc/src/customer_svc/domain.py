"""Customer rules: the writable fields, their normalisation and validation, the search key
and PII masking. No gRPC servicer and no SQL here; values are plain Python."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from dataclasses import dataclass

from crm_chassis import persian
from crm_chassis.errors import FieldViolation, InvalidArgument

from . import validation

PERSON, ORGANIZATION = 1, 2
MAX_TEXT = 200
MAX_LONG_TEXT = 2000
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_KEY = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
_TAG = re.compile(r"^[^\s,][^,]{0,49}$")
ENUM_RANGES = {"type": (1, 2), "gender": (0, 3), "education_degree": (0, 6), "kind": (0, 3), "lifecycle_stage": (0, 4)}

# Plain text fields and their maximum length.
TEXT_FIELDS = {
    "given_name": MAX_TEXT,
    "family_name": MAX_TEXT,
    "organization_name": MAX_TEXT,
    "title_prefix": 40,
    "province": 100,
    "city": 100,
    "address": 500,
    "po_box": 40,
    "birth_certificate_number": 20,
    "field_of_study": MAX_TEXT,
    "industry": MAX_TEXT,
    "referrer_staff": 100,
    "owner": 100,
}
PHONE_FIELDS = ("phone", "fax", "mobile")
DATE_FIELDS = ("birth_date", "marriage_date", "founding_date", "acquisition_date")
# Everything a caller may set; "type" only on create.
WRITABLE = (
    "type",
    *TEXT_FIELDS,
    "email",
    *PHONE_FIELDS,
    "website",
    "country",
    "postal_code",
    "national_id",
    *DATE_FIELDS,
    "gender",
    "education_degree",
    "kind",
    "lifecycle_stage",
    "contact_persons",
    "acquisition_source",
    "referrer_customer",
    "groups",
    "rank",
    "tags",
    "custom_fields",
)
PII_FIELDS = ("national_id", "birth_certificate_number", "birth_date")


@dataclass
class Context:
    """What validation needs to know about the rest of the data."""

    sources: dict[str, bool]  # acquisition source key -> retired
    custom_defs: dict  # key -> row(key, type, choices, required)
    default_region: str = "IR"
    old_source: str | None = None  # a retired source stays valid on a customer that has it


def parse_id(name: str, collection: str, field: str) -> str:
    prefix, _, rid = name.partition("/")
    if prefix != collection or not _UUID.match(rid):
        raise InvalidArgument.field(field, f"must be '{collection}/{{id}}' with a UUID id")
    return rid


def parse_name(name: str, field: str = "name") -> str:
    return parse_id(name, "customers", field)


def display_name(v: dict) -> str:
    if v.get("type") == ORGANIZATION:
        return v.get("organization_name", "")
    parts = (v.get("title_prefix", ""), v.get("given_name", ""), v.get("family_name", ""))
    return " ".join(p for p in parts if p)


def search_key(v: dict, code: str = "") -> str:
    """The normalised text every search looks in. No PII: a search must not confirm a masked
    national id (callers with PII rights filter on `national_id` instead)."""
    bits = [
        code,
        display_name(v),
        v.get("given_name", ""),
        v.get("family_name", ""),
        v.get("organization_name", ""),
        v.get("email", ""),
        v.get("website", ""),
        v.get("province", ""),
        v.get("city", ""),
        v.get("address", ""),
        v.get("postal_code", ""),
        v.get("industry", ""),
        v.get("field_of_study", ""),
    ]
    for f in PHONE_FIELDS:
        if v.get(f):
            bits += [v[f], v[f].lstrip("+"), "0" + v[f][3:] if v[f].startswith("+98") else ""]
    bits += v.get("tags", [])
    for c in v.get("contact_persons", []):
        bits += [
            c.get("given_name", ""),
            c.get("family_name", ""),
            c.get("email", ""),
            c.get("phone", ""),
            c.get("mobile", ""),
        ]
    return persian.normalize(" ".join(b for b in bits if b))


def validate(v: dict, ctx: Context, prefix: str = "customer") -> dict:
    """Normalise and check a whole customer (every writable field present in `v`); raise
    InvalidArgument listing every problem. Returns the normalised values."""
    out = dict(v)
    bad: list[FieldViolation] = []

    def err(field: str, why: str) -> None:
        bad.append(FieldViolation(f"{prefix}.{field}" if prefix else field, why))

    for f, limit in TEXT_FIELDS.items():
        out[f] = (out.get(f) or "").strip()
        if len(out[f]) > limit:
            err(f, f"must be at most {limit} characters")
    for f, (lo, hi) in ENUM_RANGES.items():
        if f in out and not lo <= int(out[f]) <= hi:
            err(f, f"is not a known value ({out[f]})")
    typ = out.get("type")
    if typ == PERSON and not (out["given_name"] or out["family_name"]):
        err("family_name", "a person needs a given name or a family name")
    if typ == ORGANIZATION and not out["organization_name"]:
        err("organization_name", "an organisation needs a name")

    out["email"] = (out.get("email") or "").strip()
    if out["email"] and not validation.email_ok(out["email"]):
        err("email", "is not a valid e-mail address")
    out["website"] = (out.get("website") or "").strip()
    if out["website"] and not validation.website_ok(out["website"]):
        err("website", "is not a valid web address")
    country = (out.get("country") or ctx.default_region).strip().upper()
    out["country"] = country
    if not re.fullmatch(r"[A-Z]{2}", country):
        err("country", "must be an ISO 3166-1 alpha-2 code such as IR")
    for f in PHONE_FIELDS:
        raw = (out.get(f) or "").strip()
        if raw:
            e164 = persian.phone_e164(raw, country if re.fullmatch(r"[A-Z]{2}", country) else ctx.default_region)
            if e164 is None:
                err(f, "is not a valid phone number")
            out[f] = e164 or raw
        else:
            out[f] = ""
    out["national_id"] = persian.digits_only(out.get("national_id")) if out.get("national_id") else ""
    if out["national_id"] and country == "IR" and not persian.iran_national_id_ok(out["national_id"]):
        err("national_id", "is not a valid Iranian national id (10 digits with a valid check digit)")
    out["postal_code"] = (out.get("postal_code") or "").strip()
    if out["postal_code"] and country == "IR":
        if not persian.iran_postal_code_ok(out["postal_code"]):
            err("postal_code", "an Iranian postal code has 10 digits")
        else:
            out["postal_code"] = persian.digits_only(out["postal_code"])
    today = dt.date.today()
    for f in ("birth_date", "marriage_date", "founding_date", "acquisition_date"):
        d = out.get(f)
        if d is not None and d > today:
            err(f, "must not be in the future")
    if out.get("birth_date") and out["birth_date"].year < 1900:
        err("birth_date", "must not be before 1900")

    src = (out.get("acquisition_source") or "").strip().lower()
    out["acquisition_source"] = src
    if src:
        if src not in ctx.sources:
            err("acquisition_source", f"'{src}' is not in the managed list of acquisition sources")
        elif ctx.sources[src] and src != ctx.old_source:
            err("acquisition_source", f"'{src}' is retired")

    tags = []
    for t in out.get("tags") or []:
        t = persian.normalize(t)
        if not _TAG.match(t):
            err("tags", f"tag {t!r} must be 1-50 characters without commas")
        elif t not in tags:
            tags.append(t)
    out["tags"] = tags

    contacts = []
    for i, c in enumerate(out.get("contact_persons") or []):
        c = {
            k: (c.get(k) or "").strip()
            for k in (
                "contact_id",
                "title_prefix",
                "given_name",
                "family_name",
                "role",
                "org_unit",
                "phone",
                "mobile",
                "email",
            )
        }
        if not (c["given_name"] or c["family_name"]):
            err(f"contact_persons[{i}].family_name", "a contact person needs a name")
        if c["email"] and not validation.email_ok(c["email"]):
            err(f"contact_persons[{i}].email", "is not a valid e-mail address")
        for f in ("phone", "mobile"):
            if c[f]:
                e164 = persian.phone_e164(c[f], ctx.default_region)
                if e164 is None:
                    err(f"contact_persons[{i}].{f}", "is not a valid phone number")
                c[f] = e164 or c[f]
        c["contact_id"] = c["contact_id"] or uuid.uuid4().hex[:12]
        contacts.append(c)
    if contacts and typ == PERSON:
        err("contact_persons", "only organisations have contact persons")
    out["contact_persons"] = contacts

    out["custom_fields"] = _custom_fields(out.get("custom_fields") or {}, ctx, err)
    if bad:
        raise InvalidArgument(bad)
    out["display_name"] = display_name(out)
    return out


def _custom_fields(values: dict, ctx: Context, err) -> dict:
    from crm.customer.v1 import resources_pb2 as r

    out = {}
    for key, value in values.items():
        d = ctx.custom_defs.get(key)
        if d is None:
            err(f"custom_fields.{key}", "no such custom field is defined")
            continue
        kind = {
            r.CUSTOM_FIELD_TYPE_TEXT: str,
            r.CUSTOM_FIELD_TYPE_NUMBER: float,
            r.CUSTOM_FIELD_TYPE_DATE: dt.date,
            r.CUSTOM_FIELD_TYPE_CHOICE: "choice",
        }[d.type]
        if kind == "choice":
            if value not in d.choices:
                err(f"custom_fields.{key}", f"must be one of {list(d.choices)}")
                continue
        elif kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            value = float(value)
        elif not isinstance(value, kind):
            err(
                f"custom_fields.{key}",
                f"must be a {d.type and r.CustomFieldType.Name(d.type).removeprefix('CUSTOM_FIELD_TYPE_').lower()} value",
            )
            continue
        if isinstance(value, str) and len(value) > MAX_LONG_TEXT:
            err(f"custom_fields.{key}", f"must be at most {MAX_LONG_TEXT} characters")
            continue
        out[key] = value.isoformat() if isinstance(value, dt.date) else value
    for key, d in ctx.custom_defs.items():
        if d.required and key not in out and key not in values:
            err(f"custom_fields.{key}", "is required")
    return out


def mask(value: str) -> str:
    """Keep the last two characters: enough to tell records apart, not enough to misuse."""
    return "*" * max(0, len(value) - 2) + value[-2:] if value else ""


def source_key_ok(key: str) -> bool:
    return bool(_KEY.match(key))
