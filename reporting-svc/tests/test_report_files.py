"""Every report's Export RPC (report_files.py) in every format: csv, xlsx, pdf (chart and table),
png and svg (the chart), with the right content type and a non-empty file; a bad format names
the field; a report over an empty period still exports (an empty table, a chart saying no
data); Customer 360's export holds every page newest first; the gateway's download headers."""

from __future__ import annotations

import datetime as dt
import io
import xml.etree.ElementTree as ET

import grpc
import pytest

from crm.reporting.v1 import pipeline_report_pb2 as pr
from crm.reporting.v1 import reporting_service_pb2 as rs
from crm.reporting.v1 import reporting_service_pb2_grpc as rsg
from crm.reporting.v1 import sales_report_pb2 as sr
from crm.reporting.v1 import value_pb2 as vpb
from crm.reporting.v1 import value_pb2_grpc as vpbg
from crm.support.v1 import ticket_pb2
from crm.type.v1 import date_pb2
from crm_chassis import documents
from crm_chassis.errors import read_rpc_error
from reporting_svc import report_files
from tests.support.harness import channel, gateway_client, md, token

from .test_acquisition_report import customer
from .test_campaign_report import campaign, irt, response
from .test_loyalty import points, tier
from .test_value import invoice

UTC = dt.UTC
D = dt.datetime(2026, 11, 21, 6, 0, tzinfo=UTC)  # Tehran 1405-08-30
TYPES = {
    "csv": "text/csv; charset=utf-8",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "pdf": "application/pdf",
    "png": "image/png",
    "svg": "image/svg+xml",
}
EMPTY = {"start_date": date_pb2.Date(year=2020, month=1, day=1), "end_date": date_pb2.Date(year=2020, month=1, day=31)}


@pytest.fixture(scope="module")
def stubs(svc, feed, ev):
    web = ticket_pb2.Channel.Value("CHANNEL_WEB")
    feed.deliver(
        *ev.tickets(1, agent="agents/a", channel=web, created=D, first_response=60, closed=D + dt.timedelta(days=1)),
        *ev.tickets(2, agent="agents/b", channel=web, created=D + dt.timedelta(days=3)),
        customer(feed, 1, "website", D),
        customer(feed, 2, "referral", D + dt.timedelta(days=10)),
        ev.lead(1, "website", "new", D, 1),
        points(1, "programs/gold", "earned", 500, D),
        points(1, "programs/gold", "redeemed", -200, D + dt.timedelta(days=2)),
        tier(1, "programs/gold", "", "silver", D),
        campaign(1, 1, "launched", "revenue", irt(1_000_000), irt(200_000)),
        response(1, 1),
        *(
            invoice(feed, f"c{i}", dt.date(2026, 10, 1 + 3 * i + k), 100 * i)
            for i in range(1, 7)
            for k in range(i % 3 + 1)
        ),
    )
    # Customer 360: 2,600 ledger movements of customer c7 (three pages of 1,000 in the export)
    movements = [points(7, "programs/club", "earned", i + 1, D + dt.timedelta(minutes=i)) for i in range(2600)]
    feed.deliver_batch(*movements)
    with channel(svc) as ch:
        yield rsg.ReportingServiceStub(ch), vpbg.ValueServiceStub(ch)


def _calls(stubs):
    """(name, the Export call for keyword arguments) of every report."""
    reporting, value = stubs

    def call(method, request_cls, **fixed):
        def run(**kw):
            return list(method(request_cls(**fixed, **kw), metadata=md("analyst")))

        return run

    return {
        "customers-by-source": call(reporting.ExportCustomersBySource, rs.ExportCustomersBySourceRequest),
        "acquisition": call(reporting.ExportAcquisitionReport, rs.ExportAcquisitionReportRequest, period="month"),
        "pipeline": call(reporting.ExportPipelineReport, pr.ExportPipelineReportRequest, dimensions=["stage"]),
        "forecast": call(reporting.ExportForecastReport, pr.ExportForecastReportRequest),
        "support": call(reporting.ExportSupportReport, rs.ExportSupportReportRequest, period="day"),
        "loyalty": call(reporting.ExportLoyaltyReport, rs.ExportLoyaltyReportRequest, period="day"),
        "campaigns": call(reporting.ExportCampaignReport, rs.ExportCampaignReportRequest),
        "sales": call(reporting.ExportSalesReport, sr.ExportSalesReportRequest, period="month", dimensions=["city"]),
        "sales-lead-to-purchase": call(
            reporting.ExportSalesReport, sr.ExportSalesReportRequest, table="lead_to_purchase"
        ),
        "customer-timeline": call(
            reporting.ExportCustomerTimeline, rs.ExportCustomerTimelineRequest, customer="customers/c1"
        ),
        "value-pareto": call(value.ExportValueReport, vpb.ExportValueReportRequest, report="pareto"),
        "value-rfm": call(value.ExportValueReport, vpb.ExportValueReportRequest, report="rfm"),
        "value-churn-risks": call(value.ExportValueReport, vpb.ExportValueReportRequest, report="churn_risks"),
    }


REPORTS = (
    "customers-by-source", "acquisition", "pipeline", "forecast", "support", "loyalty", "campaigns", "customer-timeline",
    "value-pareto", "value-rfm", "value-churn-risks", "sales",
)  # fmt: skip


def test_every_report_is_registered():
    assert set(REPORTS) == set(report_files.REPORTS)


def _file(chunks) -> tuple[str, str, bytes]:
    head = chunks[0]
    return head.content_type, head.filename, b"".join(c.data for c in chunks[1:])


def _svg_texts(svg: bytes) -> set[str]:
    return {el.text or "" for el in ET.fromstring(svg).iter("{http://www.w3.org/2000/svg}text")}


@pytest.mark.parametrize("report", REPORTS)
@pytest.mark.parametrize("lang", ["en", "fa"])
def test_every_format(stubs, report, lang):
    from pypdf import PdfReader

    run = _calls(stubs)[report]
    for fmt, media in TYPES.items():
        kind, filename, data = _file(run(format=fmt, language_code=lang))
        assert kind == media and filename.startswith(report) and filename.endswith("." + fmt), (fmt, filename)
        assert data, fmt
        if fmt == "png":
            assert documents.png_size(data) == (960, 540)
        elif fmt == "svg":
            assert _svg_texts(data)  # parses, has text
        elif fmt == "pdf":
            page = PdfReader(io.BytesIO(data)).pages[0]
            assert len(page.images) == 1  # the chart, above the table
        elif fmt == "xlsx":
            from openpyxl import load_workbook

            assert len(load_workbook(io.BytesIO(data)).sheetnames) == 2  # the table, the chart


@pytest.mark.parametrize("report", REPORTS)
def test_a_bad_format_names_the_field(stubs, report):
    with pytest.raises(grpc.RpcError) as info:
        _calls(stubs)[report](format="gif")
    err = read_rpc_error(info.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.field_violations[0].field == "format"


@pytest.mark.parametrize(
    "report",
    ["acquisition", "pipeline", "forecast", "support", "loyalty", "value-pareto", "value-rfm", "sales",
     "sales-lead-to-purchase"],
)  # fmt: skip
def test_an_empty_period_still_exports(stubs, report):
    run = _calls(stubs)[report]
    _, _, csv = _file(run(format="csv", **EMPTY))
    assert len(csv.decode("utf-8-sig").strip().splitlines()) == 1  # the header only
    _, _, svg = _file(run(format="svg", **EMPTY))
    assert "No data" in _svg_texts(svg)
    _, _, svg = _file(run(format="svg", language_code="fa", **EMPTY))
    assert "داده‌ای نیست" in _svg_texts(svg)
    _, _, pdf = _file(run(format="pdf", **EMPTY))
    assert pdf.startswith(b"%PDF")


def test_a_customer_without_entries_and_an_unknown_campaign_still_export(stubs):
    calls = _calls(stubs)
    reporting, _ = stubs
    chunks = list(
        reporting.ExportCustomerTimeline(
            rs.ExportCustomerTimelineRequest(customer="customers/nobody", format="svg"), metadata=md()
        )
    )
    assert "No data" in _svg_texts(_file(chunks)[2])
    _, _, csv = _file(calls["campaigns"](format="csv", campaigns=["campaigns/none"]))
    assert len(csv.decode("utf-8-sig").strip().splitlines()) == 1


def test_the_pdf_has_the_title_fields_and_table(stubs):
    from pypdf import PdfReader

    _, _, pdf = _file(_calls(stubs)["support"](format="pdf", dimensions=["agent"]))
    text = PdfReader(io.BytesIO(pdf)).pages[0].extract_text()
    for word in ("Support desk", "Grouping", "Requests", "agents/a", "agents/b"):
        assert word in text, word


def test_the_charts_show_the_figures(stubs):
    calls = _calls(stubs)
    _, _, svg = _file(calls["acquisition"](format="svg", language_code="fa", calendar="jalali"))
    texts = _svg_texts(svg)
    assert {"website", "referral", "آبان ۱۴۰۵", "آذر ۱۴۰۵"} <= texts
    assert "مشتریان جدید به تفکیک منبع جذب" in texts
    _, _, svg = _file(calls["value-pareto"](format="svg"))
    assert {"Decile 1", "80%"} <= _svg_texts(svg)
    _, _, svg = _file(calls["loyalty"](format="svg"))
    assert {"Earned", "Redeemed"} <= _svg_texts(svg)


def test_customer_360_exports_every_page_newest_first(stubs):
    reporting, _ = stubs
    req = rs.ExportCustomerTimelineRequest(customer="customers/c7", format="csv")
    chunks = list(reporting.ExportCustomerTimeline(req, metadata=md()))
    assert chunks[0].row_count == 2600
    lines = chunks and b"".join(c.data for c in chunks).decode("utf-8-sig").strip().splitlines()
    assert lines[0].startswith("Time (Tehran),Source,Kind,Title") and len(lines) == 2601
    times = [line.split(",")[0] for line in lines[1:]]
    assert times == sorted(times, reverse=True) and len(set(times)) == 2600
    assert "2600 points earned" in lines[1] and "1 points earned" in lines[-1]
    bad = rs.ExportCustomerTimelineRequest(customer="people/1", format="csv")
    with pytest.raises(grpc.RpcError) as info:
        list(reporting.ExportCustomerTimeline(bad, metadata=md()))
    assert read_rpc_error(info.value).field_violations[0].field == "customer"
    bad = rs.ExportCustomerTimelineRequest(customer="customers/c7", format="csv", calendar="lunar")
    with pytest.raises(grpc.RpcError) as info:
        list(reporting.ExportCustomerTimeline(bad, metadata=md()))
    assert read_rpc_error(info.value).field_violations[0].field == "calendar"


@pytest.fixture(scope="module")
def http(svc, stubs):
    client, clients = gateway_client(reporting=f"127.0.0.1:{svc.port}")
    yield client
    clients.close()


@pytest.mark.parametrize(
    "path",
    [
        "/v1/reports/support:export?period=month",
        "/v1/reports/loyalty:export?period=day",
        "/v1/reports/campaigns:export",
        "/v1/customers/c1/timeline:export",
        "/v1/reports/value:export?report=pareto",
    ],
)
def test_the_gateway_streams_every_format_with_its_type_and_name(http, path):
    auth = {"Authorization": f"Bearer {token('analyst')}"}
    for fmt, media in TYPES.items():
        r = http.get(f"{path}{'&' if '?' in path else '?'}format={fmt}&language_code=fa", headers=auth)
        assert r.status_code == 200, r.data
        assert r.headers["Content-Type"] == media
        disposition = r.headers["Content-Disposition"]
        assert disposition.startswith('attachment; filename="') and disposition.endswith(f'.{fmt}"')
        assert r.data
    r = http.get(f"{path}{'&' if '?' in path else '?'}format=gif", headers=auth)
    assert r.status_code == 400 and "format" in r.get_data(as_text=True)


def test_render_file_for_an_attachment(svc, stubs):
    kind, name, data = report_files.render_file(
        svc.ctx.engine, "support", rs.ExportSupportReportRequest(period="month", format="pdf", language_code="fa")
    )
    assert kind == "application/pdf" and name.startswith("support-") and name.endswith(".pdf")
    assert data.startswith(b"%PDF")


def test_money_charts_never_add_up_amounts_of_different_currencies():
    """The pipeline and forecast charts over rows in rials and euros: a group (or a pair of
    series) per currency, each with its own amounts; one currency keeps the plain names."""
    from crm.type.v1 import money_pb2

    def money(units: int, code: str):
        return money_pb2.Money(currency_code=code, units=units)

    q = {"lang": "en", "period": "month", "dims": []}
    rows = [
        pr.ForecastReportRow(period_label="Nov 2026", owner="ali", currency_code="IRR", actual_won=money(900, "IRR"),
                             latest=pr.ForecastSnapshotFigures(commit=money(1000, "IRR"))),
        pr.ForecastReportRow(period_label="Nov 2026", owner="sara", currency_code="EUR", actual_won=money(7, "EUR"),
                             latest=pr.ForecastSnapshotFigures(commit=money(5, "EUR"))),
        pr.ForecastReportRow(period_label="Nov 2026", owner="reza", currency_code="IRR", actual_won=money(100, "IRR")),
    ]  # fmt: skip
    chart = report_files._forecast_chart(pr.GetForecastReportResponse(rows=rows), q)
    got = {s.name: list(s.values) for s in chart.series}
    assert got == {
        "Actual won (IRR)": [1000.0],
        "Commit (IRR)": [1000.0],
        "Actual won (EUR)": [7.0],
        "Commit (EUR)": [5.0],
    }
    one = report_files._forecast_chart(pr.GetForecastReportResponse(rows=[rows[0]]), q)
    assert [s.name for s in one.series] == ["Actual won", "Commit"]
    pipe = [
        pr.PipelineRow(period_label="Nov 2026", amount=money(300, "IRR"), weighted_amount=money(30, "IRR")),
        pr.PipelineRow(period_label="Nov 2026", amount=money(4, "EUR"), weighted_amount=money(2, "EUR")),
    ]
    every = report_files._pipeline_chart(pr.GetPipelineReportResponse(rows=pipe), {**q, "period": "all"})
    assert list(every.categories) == ["Amount (IRR)", "Amount (EUR)"]  # a group per currency, side by side
    assert [list(s.values) for s in every.series] == [[300.0, 4.0], [30.0, 2.0]]
    chart = report_files._pipeline_chart(pr.GetPipelineReportResponse(rows=pipe), q)
    assert chart.title.endswith("(IRR)") and {s.name: list(s.values) for s in chart.series} == {"Amount": [300.0]}
    # per period the bars stack: only one currency's rows (the one most rows have), named in the title
    pipe.append(pr.PipelineRow(period_label="Dec 2026", amount=money(7, "EUR"), weighted_amount=money(1, "EUR")))
    chart = report_files._pipeline_chart(pr.GetPipelineReportResponse(rows=pipe), {**q, "period": "month", "dims": []})
    assert chart.title.endswith("(EUR)") and chart.kind == "stacked_bar"
    assert {s.name: list(s.values) for s in chart.series} == {"Amount": [4.0, 7.0]}
