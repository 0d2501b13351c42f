"""The gRPC servicer for reports, projection status and rebuilds."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from crm.reporting.v1 import reporting_service_pb2 as pb
from crm.reporting.v1 import reporting_service_pb2_grpc
from crm_chassis import jobs
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
    rebuild,
    report_files,
    sales_report,
    status,
    support_report,
    timeline,
)

REBUILD = "projectionRebuilds/"
# The formats every Export RPC answers (report_files.py); scheduled reports check theirs here.
EXPORT_FORMATS = report_files.EXPORT_FORMATS


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
    def CountCustomersBySource(self, request, context):
        rows = report_files.by_source_load(self.engine, report_files.by_source_query(request))
        return pb.CountCustomersBySourceResponse(
            sources=[pb.SourceCount(acquisition_source=s, customer_count=n) for s, n in rows],
            total_customers=sum(n for _, n in rows),
        )

    def ExportCustomersBySource(self, request, context):
        yield from report_files.export(self.engine, "customers-by-source", request)

    def GetAcquisitionReport(self, request, context):
        q = acquisition_report.parse(request)
        with self.engine.connect() as conn:
            return acquisition_report.report(conn, q)

    def ExportAcquisitionReport(self, request, context):
        yield from report_files.export(self.engine, "acquisition", request)

    # -- report 3 ----------------------------------------------------------------------------
    def GetPipelineReport(self, request, context):
        q = pipeline_report.parse_pipeline(request)
        with self.engine.connect() as conn:
            return pipeline_report.pipeline(conn, q)

    def ExportPipelineReport(self, request, context):
        yield from report_files.export(self.engine, "pipeline", request)

    def GetForecastReport(self, request, context):
        q = pipeline_report.parse_forecast(request)
        with self.engine.connect() as conn:
            return pipeline_report.forecast(conn, q)

    def ExportForecastReport(self, request, context):
        yield from report_files.export(self.engine, "forecast", request)

    # -- report 2 ----------------------------------------------------------------------------
    def GetSalesReport(self, request, context):
        q = sales_report.parse(request)
        with self.engine.connect() as conn:
            return sales_report.report(conn, q)

    def ExportSalesReport(self, request, context):
        yield from report_files.export(self.engine, "sales", request)

    # -- report 4 ----------------------------------------------------------------------------
    def GetSupportReport(self, request, context):
        q = support_report.parse(request)
        with self.engine.connect() as conn:
            return support_report.report(conn, q)

    def ExportSupportReport(self, request, context):
        yield from report_files.export(self.engine, "support", request)

    # -- report 5 ----------------------------------------------------------------------------
    def GetLoyaltyReport(self, request, context):
        q = loyalty.parse(request)
        with self.engine.connect() as conn:
            return loyalty.report(conn, q)

    def GetCampaignReport(self, request, context):
        q = campaigns.parse(request)
        with self.engine.connect() as conn:
            return campaigns.report(conn, q)

    def ExportLoyaltyReport(self, request, context):
        yield from report_files.export(self.engine, "loyalty", request)

    def ExportCampaignReport(self, request, context):
        yield from report_files.export(self.engine, "campaigns", request)

    # -- report 7 ----------------------------------------------------------------------------
    def GetCustomerTimeline(self, request, context):
        q = timeline.parse(request)
        with self.engine.connect() as conn:
            return timeline.page(conn, self.timeline_tokens, q, request.page_token)

    def ExportCustomerTimeline(self, request, context):
        yield from report_files.export(self.engine, "customer-timeline", request)

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
