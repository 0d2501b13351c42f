"""Mapping between stored rows, plain values and the contract's messages (API and events)."""

from __future__ import annotations

import datetime as dt
import functools

from google.protobuf import json_format, timestamp_pb2

from crm.customer.v1 import customer_pb2, resources_pb2
from crm_chassis import dates
from crm_chassis.errors import FieldViolation, InvalidArgument

from . import domain

_PLAIN = (
    *domain.TEXT_FIELDS,
    "email",
    *domain.PHONE_FIELDS,
    "website",
    "country",
    "postal_code",
    "national_id",
    "acquisition_source",
    "customer_code",
    "display_name",
)
_ENUMS = tuple(domain.ENUM_RANGES)


class MappingRow:
    """A row built in Python (a stored row plus computed columns), read like a result row."""

    def __init__(self, mapping: dict):
        self._mapping = mapping

    def __getattr__(self, name):
        try:
            return self._mapping[name]
        except KeyError:
            raise AttributeError(name) from None


def ts(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(value)
    return t


to_date = dates.to_proto


# (d, field, bad); no business-year bounds here (a birth date may be old)
from_date = functools.partial(dates.from_proto, business=False)


def customer_to_proto(row, defs: dict | None = None, pii: bool = True) -> customer_pb2.Customer:
    m = row._mapping
    c = customer_pb2.Customer(name=f"customers/{m['id']}", etag=f'"{m["version"]}"')
    for f in _PLAIN:
        if f in m and m[f]:
            setattr(c, f, m[f])
    for f in _ENUMS:
        if f in m:
            setattr(c, f, m[f])
    for f in domain.DATE_FIELDS:
        if m.get(f) is not None:
            getattr(c, f).CopyFrom(to_date(m[f]))
    for f in ("create_time", "update_time", "delete_time"):
        if m.get(f) is not None:
            getattr(c, f).CopyFrom(ts(m[f]))
    for p in m.get("contact_persons") or []:
        c.contact_persons.append(json_format.ParseDict(p, customer_pb2.ContactPerson(), ignore_unknown_fields=True))
    c.groups.extend(f"groups/{g}" for g in sorted(str(x) for x in (m.get("group_ids") or [])))
    if m.get("rank_id"):
        c.rank = f"ranks/{m['rank_id']}"
    if m.get("referrer_customer"):
        c.referrer_customer = f"customers/{m['referrer_customer']}"
    if m.get("merged_into"):
        c.merged_into = f"customers/{m['merged_into']}"
    c.tags.extend(m.get("tags") or [])
    c.erased = bool(m.get("erased"))
    for key, value in (m.get("custom_fields") or {}).items():
        v = c.custom_fields[key]
        kind = defs[key].type if defs and key in defs else None
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | float):
            v.number_value = float(value)
        elif kind == resources_pb2.CUSTOM_FIELD_TYPE_DATE:
            v.date_value.CopyFrom(to_date(dt.date.fromisoformat(value)))
        elif kind == resources_pb2.CUSTOM_FIELD_TYPE_CHOICE:
            v.choice_value = value
        else:
            v.text_value = value
    return c if pii else mask_pii(c)


def mask_pii(c: customer_pb2.Customer) -> customer_pb2.Customer:
    """The customer as a caller without PII rights sees it (changed in place)."""
    c.national_id = domain.mask(c.national_id)
    c.birth_certificate_number = domain.mask(c.birth_certificate_number)
    c.ClearField("birth_date")
    return c


def values_from_proto(c: customer_pb2.Customer, fields, prefix: str = "customer") -> dict:
    """Plain values for the named writable fields of a request's Customer."""
    bad: list[FieldViolation] = []
    out: dict = {}
    for f in fields:
        path = f"{prefix}.{f}"
        if f in domain.TEXT_FIELDS or f in (
            "email",
            "website",
            "country",
            "postal_code",
            "national_id",
            "acquisition_source",
            *domain.PHONE_FIELDS,
        ):
            out[f] = getattr(c, f)
        elif f in _ENUMS:
            out[f] = int(getattr(c, f))
        elif f in domain.DATE_FIELDS:
            out[f] = from_date(getattr(c, f), path, bad) if c.HasField(f) else None
        elif f == "contact_persons":
            out[f] = [json_format.MessageToDict(p, preserving_proto_field_name=True) for p in c.contact_persons]
        elif f == "groups":
            ids = []
            for i, g in enumerate(c.groups):
                try:
                    ids.append(domain.parse_id(g, "groups", f"{path}[{i}]"))
                except InvalidArgument as e:
                    bad += e.violations
            out["group_ids"] = sorted(set(ids))
        elif f == "rank":
            out["rank_id"] = None
            if c.rank:
                try:
                    out["rank_id"] = domain.parse_id(c.rank, "ranks", path)
                except InvalidArgument as e:
                    bad += e.violations
        elif f == "referrer_customer":
            out[f] = None
            if c.referrer_customer:
                try:
                    out[f] = domain.parse_id(c.referrer_customer, "customers", path)
                except InvalidArgument as e:
                    bad += e.violations
        elif f == "tags":
            out[f] = list(c.tags)
        elif f == "custom_fields":
            cf = {}
            for key, v in c.custom_fields.items():
                which = v.WhichOneof("value")
                if which == "date_value":
                    cf[key] = from_date(v.date_value, f"{path}.{key}", bad)
                elif which is not None:
                    cf[key] = getattr(v, which)
            out[f] = cf
        else:  # pragma: no cover - WRITABLE and this mapping are kept in step by the tests
            raise KeyError(f)
    if bad:
        raise InvalidArgument(bad)
    return out
