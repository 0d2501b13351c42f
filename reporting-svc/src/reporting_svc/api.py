"""The gRPC servicer for reports."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from crm.reporting.v1 import reporting_service_pb2, reporting_service_pb2_grpc
from crm_chassis.errors import InvalidArgument
from crm_chassis.grpc_server import Registration

from . import projections


def _time(request, field: str) -> dt.datetime | None:
    if not request.HasField(field):
        return None
    try:
        return getattr(request, field).ToDatetime(tzinfo=dt.UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument.field(field, "is not a valid timestamp") from None


class ReportingServicer(reporting_service_pb2_grpc.ReportingServiceServicer):
    def __init__(self, engine: sa.Engine):
        self.engine = engine

    def CountCustomersBySource(self, request, context):
        start, end = _time(request, "start_time"), _time(request, "end_time")
        if start and end and end < start:
            raise InvalidArgument.field("end_time", "must not be before start_time")
        with self.engine.connect() as conn:
            rows = projections.customers_by_source(conn, start, end)
        return reporting_service_pb2.CountCustomersBySourceResponse(
            sources=[reporting_service_pb2.SourceCount(acquisition_source=s, customer_count=n) for s, n in rows],
            total_customers=sum(n for _, n in rows),
        )


def registration(engine: sa.Engine) -> Registration:
    return Registration.of(ReportingServicer(engine))
