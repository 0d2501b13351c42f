"""The gRPC servicer for reports, projection status and rebuilds."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from crm.reporting.v1 import reporting_service_pb2 as pb
from crm.reporting.v1 import reporting_service_pb2_grpc
from crm_chassis import documents, jobs
from crm_chassis.errors import InvalidArgument, NotFound
from crm_chassis.grpc_server import Registration
from crm_chassis.interceptors import current_principal
from crm_chassis.pagination import PageTokens
from crm_chassis.work_tables import jobs as job_table

from . import (
    PROJECTIONS,
    acquisition_report,
    campaigns,
    loyalty,
    pipeline_report,
    projections,
    rebuild,
    status,
    support_report,
    timeline,
)

EXPORT_FORMATS = ("csv", "xlsx")
REBUILD = "projectionRebuilds/"


def _time(request, field: str) -> dt.datetime | None:
    if not request.HasField(field):
        return None
    try:
        return getattr(request, field).ToDatetime(tzinfo=dt.UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument.field(field, "is not a valid timestamp") from None


def _format(value: str) -> str:
    fmt = value.strip().lower()
    if fmt not in EXPORT_FORMATS:
        raise InvalidArgument.field("format", "choose csv or xlsx")
    return fmt


def _stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")


def rebuild_message(job: jobs.Job) -> pb.ProjectionRebuild:
    m = pb.ProjectionRebuild(
        name=REBUILD + job.id,
        state=job.state,
        processed_events=job.processed,
        total_events=job.total or 0,
        error=job.error,
    )
    m.create_time.FromDatetime(job.create_time)
    if job.end_time:
        m.end_time.FromDatetime(job.end_time)
    return m


class ReportingServicer(reporting_service_pb2_grpc.ReportingServiceServicer):
    def __init__(self, rt):
        self.rt = rt
        self.engine = rt.engine
        self.timeline_tokens = PageTokens(rt.settings.jwt_secret, "customer-timeline")

    # -- report 1 ----------------------------------------------------------------------------
    def _by_source(self, request):
        start, end = _time(request, "start_time"), _time(request, "end_time")
        if start and end and end < start:
            raise InvalidArgument.field("end_time", "must not be before start_time")
        with self.engine.connect() as conn:
            return projections.customers_by_source(conn, start, end)

    def CountCustomersBySource(self, request, context):
        rows = self._by_source(request)
        return pb.CountCustomersBySourceResponse(
            sources=[pb.SourceCount(acquisition_source=s, customer_count=n) for s, n in rows],
            total_customers=sum(n for _, n in rows),
        )

    def ExportCustomersBySource(self, request, context):
        fmt = _format(request.format)
        rows = self._by_source(request)
        fa = request.language_code.lower().startswith("fa")
        columns = [
            documents.Column("acquisition_source", "منبع جذب" if fa else "Acquisition source", 2.0),
            documents.Column("customer_count", "مشتریان" if fa else "Customers"),
        ]
        yield from documents.stream_table(
            pb.ExportReportResponse,
            fmt,
            columns,
            ({"acquisition_source": s, "customer_count": n} for s, n in rows),
            filename=f"customers-by-source-{_stamp()}",
            title="Customers by source",
        )

    def GetAcquisitionReport(self, request, context):
        q = acquisition_report.parse(request)
        with self.engine.connect() as conn:
            return acquisition_report.report(conn, q)

    def ExportAcquisitionReport(self, request, context):
        fmt = _format(request.format)
        q = acquisition_report.parse(request)
        with self.engine.connect() as conn:
            resp = acquisition_report.report(conn, q)
        columns, rows = acquisition_report.export_rows(resp, q)
        yield from documents.stream_table(
            pb.ExportReportResponse, fmt, columns, rows, filename=f"acquisition-{_stamp()}", title="Acquisition sources"
        )

    # -- report 3 ----------------------------------------------------------------------------
    def GetPipelineReport(self, request, context):
        q = pipeline_report.parse_pipeline(request)
        with self.engine.connect() as conn:
            return pipeline_report.pipeline(conn, q)

    def ExportPipelineReport(self, request, context):
        fmt = _format(request.format)
        q = pipeline_report.parse_pipeline(request)
        with self.engine.connect() as conn:
            resp = pipeline_report.pipeline(conn, q)
        columns, rows = pipeline_report.pipeline_export(resp, q)
        yield from documents.stream_table(
            pb.ExportReportResponse, fmt, columns, rows, filename=f"pipeline-{_stamp()}", title="Pipeline"
        )

    def GetForecastReport(self, request, context):
        q = pipeline_report.parse_forecast(request)
        with self.engine.connect() as conn:
            return pipeline_report.forecast(conn, q)

    def ExportForecastReport(self, request, context):
        fmt = _format(request.format)
        q = pipeline_report.parse_forecast(request)
        with self.engine.connect() as conn:
            resp = pipeline_report.forecast(conn, q)
        columns, rows = pipeline_report.forecast_export(resp, q)
        yield from documents.stream_table(
            pb.ExportReportResponse, fmt, columns, rows, filename=f"forecast-{_stamp()}", title="Forecast vs actual"
        )

    # -- report 4 ----------------------------------------------------------------------------
    def GetSupportReport(self, request, context):
        q = support_report.parse(request)
        with self.engine.connect() as conn:
            return support_report.report(conn, q)

    def ExportSupportReport(self, request, context):
        fmt = _format(request.format)
        q = support_report.parse(request)
        with self.engine.connect() as conn:
            resp = support_report.report(conn, q)
        columns, rows = support_report.export_rows(resp, q)
        yield from documents.stream_table(
            pb.ExportReportResponse, fmt, columns, rows, filename=f"support-{_stamp()}", title="Support desk"
        )

    # -- report 5 ----------------------------------------------------------------------------
    def GetLoyaltyReport(self, request, context):
        q = loyalty.parse(request)
        with self.engine.connect() as conn:
            return loyalty.report(conn, q)

    def GetCampaignReport(self, request, context):
        q = campaigns.parse(request)
        with self.engine.connect() as conn:
            return campaigns.report(conn, q)

    # -- report 7 ----------------------------------------------------------------------------
    def GetCustomerTimeline(self, request, context):
        q = timeline.parse(request)
        with self.engine.connect() as conn:
            return timeline.page(conn, self.timeline_tokens, q, request.page_token)

    # -- projections -------------------------------------------------------------------------
    def GetProjectionStatus(self, request, context):
        domains = list(dict.fromkeys(p.domain for p in PROJECTIONS()))
        depths = status.queue_depths(self.rt.settings.amqp_url, self.rt.settings.service_name, domains)
        with self.engine.connect() as conn:
            out = pb.ProjectionStatus(producers=status.producers(conn, domains, depths, dt.datetime.now(dt.UTC)))
            running = _latest(conn)
        if running and not running.ended:
            out.rebuild.CopyFrom(rebuild_message(running))
        return out

    def RebuildProjections(self, request, context):
        with self.engine.begin() as conn:
            current = _latest(conn)
            if current and not current.ended:
                return rebuild_message(current)
            job = jobs.start(
                conn, rebuild.KIND, {}, creator=current_principal().subject, request_id=request.request_id or None
            )
        rebuild.worker(self.rt).wake()
        return rebuild_message(job)

    def GetProjectionRebuild(self, request, context):
        if not request.name.startswith(REBUILD):
            raise InvalidArgument.field("name", "must be projectionRebuilds/{id}")
        with self.engine.connect() as conn:
            job = jobs.get(conn, request.name.removeprefix(REBUILD))
        if job is None or job.kind != rebuild.KIND:
            raise NotFound(f"{request.name} not found")
        return rebuild_message(job)


def _latest(conn) -> jobs.Job | None:
    """The newest rebuild job."""
    jid = conn.execute(
        sa.select(job_table.c.id)
        .where(job_table.c.kind == rebuild.KIND)
        .order_by(job_table.c.create_time.desc())
        .limit(1)
    ).scalar()
    return None if jid is None else jobs.get(conn, str(jid))


def registration(rt) -> Registration:
    return Registration.of(ReportingServicer(rt))
