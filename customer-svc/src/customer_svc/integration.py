"""Mapping between stored rows and the contract's messages (API responses and event bodies)."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from crm.customer.v1 import customer_pb2


def _ts(value) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def customer_to_proto(row) -> customer_pb2.Customer:
    return customer_pb2.Customer(
        name=f"customers/{row.id}",
        type=row.type,
        given_name=row.given_name,
        family_name=row.family_name,
        organization_name=row.organization_name,
        display_name=row.display_name,
        email=row.email,
        phone=row.phone,
        acquisition_source=row.acquisition_source,
        create_time=_ts(row.create_time),
        update_time=_ts(row.update_time),
        etag=f'"{row.version}"',
    )
