"""Leads: the disqualification reasons' table, what a lead's fields may hold (validation naming
the field), its search key, and a row as the Lead message and the LeadEvent."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from typing import Any

import phonenumbers
import sqlalchemy as sa
from google.protobuf import timestamp_pb2

from crm.sales.v1 import leads_pb2, sales_events_pb2
from crm_chassis import persian
from crm_chassis.errors import FieldViolation, InvalidArgument
from crm_chassis.resources import UUID_PATTERN, ResourceName, etag

from .tables import leads, metadata

LEAD = ResourceName("leads/{id}")
REASON = ResourceName("disqualifyReasons/{key}", singular="disqualify reason", key=r"[a-z0-9][a-z0-9_-]{0,39}")

# The managed list of disqualification reasons (migration 0003 seeds six).
disqualify_reasons = sa.Table(
    "disqualify_reasons",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

# customer-svc's key rule for its managed lists (acquisition sources): sales checks a lead's
# source against this syntax, not against the list itself (customer-svc publishes no events
# about its sources).
KEY = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
_EMAIL = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)
_WEBSITE = re.compile(r"^(https?://)?[^\s/:?#]+\.[^\s/:?#]{2,}(:\d{1,5})?([/?#]\S*)?$", re.IGNORECASE)
_TEAM = re.compile(rf"teams/({UUID_PATTERN})")
_PRODUCT_LINE = re.compile(rf"productLines/({UUID_PATTERN})")

STATUS_TO_PROTO = {
    "new": leads_pb2.LEAD_STATUS_NEW,
    "contacted": leads_pb2.LEAD_STATUS_CONTACTED,
    "qualified": leads_pb2.LEAD_STATUS_QUALIFIED,
    "converted": leads_pb2.LEAD_STATUS_CONVERTED,
    "disqualified": leads_pb2.LEAD_STATUS_DISQUALIFIED,
}

# Lead field -> (column, limit) for plain text fields.
TEXT_FIELDS = {
    "given_name": 200,
    "family_name": 200,
    "organization_name": 300,
    "job_title": 200,
    "website": 500,
    "industry": 200,
    "province": 100,
    "city": 100,
    "address": 1000,
    "description": 10_000,
    "campaign_id": 200,
    "utm_source": 200,
    "utm_medium": 200,
    "utm_campaign": 200,
}
NAME_FIELDS = ("given_name", "family_name", "organization_name")
# What a caller may write (create, and update through update_mask), as Lead field names.
WRITABLE = [
    *NAME_FIELDS,
    "job_title",
    "email",
    "phone",
    "mobile",
    "national_id",
    "website",
    "industry",
    "province",
    "city",
    "address",
    "description",
    "tags",
    "product_line",
    "source",
    "campaign_id",
    "utm_source",
    "utm_medium",
    "utm_campaign",
    "owner",
    "team",
]
# Lead field -> column where they differ.
COLUMN = {"product_line": "product_line_id", "owner": "owner_id", "team": "team_id"}
OUTPUT_ONLY = {
    "status": "use MarkLeadContacted, QualifyLead, DisqualifyLead or ReopenLead",
    "score": "the scoring rules keep it",
    "disqualify_reason": "use DisqualifyLead",
    "customer": "set by ConvertLead",
    "opportunity": "set by ConvertLead",
    "name": "",
    "create_time": "",
    "update_time": "",
    "delete_time": "use DeleteLead or UndeleteLead",
    "convert_time": "",
    "assign_time": "",
    "etag": "",
    "possible_duplicates": "",
}
MAX_TAGS = 50

# What a lead read returns: every column but the internal ones.
LEAD_COLUMNS = [c for c in leads.c if c.name not in ("search_text", "request_id")]


def _tag_list(value: list[str], where: str) -> list[str]:
    out: list[str] = []
    for i, t in enumerate(value):
        t = t.strip()
        if not t:
            raise InvalidArgument.field(f"{where}[{i}]", "must not be empty")
        if len(t) > 50:
            raise InvalidArgument.field(f"{where}[{i}]", "must be at most 50 characters")
        if t not in out:
            out.append(t)
    if len(out) > MAX_TAGS:
        raise InvalidArgument.field(where, f"at most {MAX_TAGS} tags")
    return out


def convert(field: str, value: Any, where: str, region: str) -> Any:
    """One Lead field's value as its column stores it; InvalidArgument naming `where`."""
    if field in TEXT_FIELDS:
        v = value.strip()
        if len(v) > TEXT_FIELDS[field]:
            raise InvalidArgument.field(where, f"must be at most {TEXT_FIELDS[field]} characters")
        if field == "website" and v and not _WEBSITE.match(v):
            raise InvalidArgument.field(where, "is not a web address (example.ir or https://example.ir/...)")
        return v
    if field == "email":
        v = value.strip().lower()
        if v and not (len(v) <= 254 and _EMAIL.match(v)):
            raise InvalidArgument.field(where, "is not a valid e-mail address")
        return v
    if field in ("phone", "mobile"):
        v = value.strip()
        if not v:
            return ""
        e164 = persian.phone_e164(v, region)
        # phone_e164 answers any *possible* length: "0912" came back as +980912. A lead's number
        # must be one that can be dialled (a number of a known range of its country).
        if e164 is None or not phonenumbers.is_valid_number(phonenumbers.parse(e164)):
            raise InvalidArgument.field(where, f"{v!r} is not a valid phone number")
        return e164
    if field == "national_id":
        v = persian.to_ascii_digits(value.strip())
        if v and not persian.iran_national_id_ok(v):
            raise InvalidArgument.field(where, "is not a valid Iranian national id (ten digits, check digit)")
        return v
    if field == "tags":
        return _tag_list(list(value), where)
    if field == "source":
        v = value.strip().lower()
        if v and not KEY.match(v):
            raise InvalidArgument.field(
                where,
                "must be an acquisition source key: 1-40 of a-z, 0-9, '_' or '-', starting with a letter or digit",
            )
        return v
    if field == "owner":
        v = value.strip()
        if len(v) > 200:
            raise InvalidArgument.field(where, "must be at most 200 characters")
        return v
    if field == "team":
        v = value.strip()
        if not v:
            return None
        m = _TEAM.fullmatch(v)
        if m is None:
            raise InvalidArgument.field(where, "must be 'teams/{id}' with a UUID id, or empty")
        return m.group(1)
    if field == "product_line":
        v = value.strip()
        if not v:
            return None
        m = _PRODUCT_LINE.fullmatch(v)
        if m is None:
            raise InvalidArgument.field(where, "must be 'productLines/{id}' with a UUID id, or empty")
        return m.group(1)
    raise AssertionError(field)  # pragma: no cover


def values_from_proto(lead: leads_pb2.Lead, fields: list[str], region: str, prefix: str = "lead") -> dict[str, Any]:
    """The columns for `fields` of `lead`, every bad value reported at once."""
    out: dict[str, Any] = {}
    bad: list[FieldViolation] = []
    for f in fields:
        try:
            out[COLUMN.get(f, f)] = convert(f, getattr(lead, f), f"{prefix}.{f}", region)
        except InvalidArgument as e:
            bad += e.violations
    if bad:
        raise InvalidArgument(bad)
    return out


def require_name(v: Mapping[str, Any], prefix: str = "lead") -> None:
    if not any(v.get(f) for f in NAME_FIELDS):
        raise InvalidArgument(
            [
                FieldViolation(
                    f"{prefix}.family_name",
                    "a lead needs a name: give family_name, given_name or organization_name",
                )
            ]
        )


def search_key(v: Mapping[str, Any]) -> str:
    """The normalised words a search looks in: names, organisation, job title, e-mail, phones
    (E.164, without '+' and in the national 0-form), web site, industry, place and tags. No
    national id (a search must not confirm one)."""
    bits = [
        v.get("given_name", ""),
        v.get("family_name", ""),
        v.get("organization_name", ""),
        v.get("job_title", ""),
        v.get("email", ""),
        v.get("website", ""),
        v.get("industry", ""),
        v.get("province", ""),
        v.get("city", ""),
    ]
    for f in ("phone", "mobile"):
        p = v.get(f) or ""
        if p:
            bits += [p.lstrip("+"), "0" + p[3:] if p.startswith("+98") else ""]
    bits += v.get("tags") or []
    return persian.normalize(" ".join(b for b in bits if b))


def ts(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(value)
    return t


def to_proto(row) -> leads_pb2.Lead:
    m = row._mapping
    return leads_pb2.Lead(
        name=f"leads/{m['id']}",
        given_name=m["given_name"],
        family_name=m["family_name"],
        organization_name=m["organization_name"],
        job_title=m["job_title"],
        email=m["email"],
        phone=m["phone"],
        mobile=m["mobile"],
        national_id=m["national_id"],
        website=m["website"],
        industry=m["industry"],
        province=m["province"],
        city=m["city"],
        address=m["address"],
        description=m["description"],
        tags=m["tags"],
        product_line=f"productLines/{m['product_line_id']}" if m["product_line_id"] else "",
        source=m["source"],
        campaign_id=m["campaign_id"],
        utm_source=m["utm_source"],
        utm_medium=m["utm_medium"],
        utm_campaign=m["utm_campaign"],
        owner=m["owner_id"],
        team=f"teams/{m['team_id']}" if m["team_id"] else "",
        score=m["score"],
        status=STATUS_TO_PROTO[m["status"]],
        disqualify_reason=m["disqualify_reason"],
        customer=f"customers/{m['customer_id']}" if m["customer_id"] else "",
        opportunity=f"opportunities/{m['opportunity_id']}" if m["opportunity_id"] else "",
        create_time=ts(m["create_time"]),
        update_time=ts(m["update_time"]),
        delete_time=ts(m["delete_time"]),
        convert_time=ts(m["convert_time"]),
        assign_time=ts(m["assign_time"]),
        etag=etag(m["version"]),
    )


def to_event(row) -> sales_events_pb2.LeadEvent:
    """The LeadEvent of a lead as stored now (no personal data: names, e-mail, phones stay)."""
    m = row._mapping
    return sales_events_pb2.LeadEvent(
        lead=f"leads/{m['id']}",
        status=m["status"],
        owner=m["owner_id"],
        team=f"teams/{m['team_id']}" if m["team_id"] else "",
        source=m["source"],
        campaign_id=m["campaign_id"],
        utm_source=m["utm_source"],
        utm_medium=m["utm_medium"],
        utm_campaign=m["utm_campaign"],
        product_line=f"productLines/{m['product_line_id']}" if m["product_line_id"] else "",
        province=m["province"],
        city=m["city"],
        score=m["score"],
        disqualify_reason=m["disqualify_reason"],
        customer=f"customers/{m['customer_id']}" if m["customer_id"] else "",
        opportunity=f"opportunities/{m['opportunity_id']}" if m["opportunity_id"] else "",
        create_time=ts(m["create_time"]),
        event_time=ts(m["update_time"]),
        version=m["version"],
    )


def reason_to_proto(row) -> leads_pb2.DisqualifyReason:
    return leads_pb2.DisqualifyReason(
        name=f"disqualifyReasons/{row.key}", key=row.key, title=row.title, active=row.active
    )


def plain(row) -> dict[str, Any]:
    """A stored row as the values validation and the search key work on (column names)."""
    m = dict(row._mapping)
    m["tags"] = list(m.get("tags") or [])
    for k in ("team_id", "product_line_id"):
        if m.get(k) is not None:
            m[k] = str(m[k])
    return m


# The indexes migration 0003 adds to the core leads table (lists filtered and sorted by them).
sa.Index("leads_status_page", leads.c.status, leads.c.create_time.desc(), leads.c.id.desc())
sa.Index("leads_score_page", leads.c.score.desc(), leads.c.id.desc())
sa.Index("leads_owner_score", leads.c.owner_id, leads.c.score.desc(), leads.c.id.desc())
sa.Index("leads_source", leads.c.source, postgresql_where=leads.c.source != "")
sa.Index("leads_campaign", leads.c.campaign_id, postgresql_where=leads.c.campaign_id != "")
