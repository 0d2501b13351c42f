"""A forecast from sales-svc to reporting-svc over the real path: sales-svc and reporting-svc in
process (relay and consumer on, a RabbitMQ vhost of this module's own), the gateway's app in
front. A manager submits a rep's forecast over HTTP; forecast_snapshot.created.v1 leaves through
sales-svc's outbox and relay, reporting-svc's consumer projects it, and report 3 shows the
snapshot's figures against what the rep won."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from crm_chassis import dates
from reporting_svc.__main__ import SPEC as REPORTING
from sales_svc.__main__ import SPEC as SALES
from sales_svc.forecast_periods import period_of
from sales_svc.tables import opportunities, pipelines, stages, team_members, teams
from tests.support.harness import Broker, start_service, token, wait_for


@pytest.fixture(scope="module")
def stack(databases):
    from crm_gateway import create_app
    from crm_gateway.clients import Clients

    broker = Broker()
    reporting = start_service(REPORTING, databases.fresh("fj_reporting"), broker.url)
    assert reporting.consumer.ready.wait(15)
    sales = start_service(SALES, databases.fresh("fj_sales"), broker.url)
    clients = Clients({"sales": f"127.0.0.1:{sales.port}", "reporting": f"127.0.0.1:{reporting.port}"})
    yield sales, create_app(clients).test_client()
    clients.close()
    sales.stop(0)
    reporting.stop(0)
    broker.close()


def test_a_submitted_forecast_reaches_the_forecast_report(stack):
    sales, http = stack
    # a team (maryam manages reza) and reza's open opportunity of a Jalali year still to come,
    # straight in sales-svc's tables (the RPCs that make them are other journeys' business)
    close = dates.today() + dt.timedelta(days=400)
    year = period_of(close, "jalali", "year").label
    with sales.ctx.engine.begin() as conn:
        team = conn.execute(teams.insert().values(name="North", manager_id="maryam").returning(teams.c.id)).scalar()
        conn.execute(team_members.insert().values(team_id=team, member_id="reza"))
        pipe = conn.execute(pipelines.insert().values(name="Default").returning(pipelines.c.id)).scalar()
        stage = conn.execute(
            stages.insert().values(pipeline_id=pipe, position=0, name="Open", probability=10).returning(stages.c.id)
        ).scalar()
        conn.execute(
            opportunities.insert().values(
                name="deal", pipeline_id=pipe, stage_id=stage, amount=Decimal(4_000_000), currency_code="IRR",
                probability=25, forecast_category="commit", owner_id="reza", expected_close_date=close,
            )
        )  # fmt: skip
    manager = {"Authorization": f"Bearer {token('sales_manager', 'maryam')}"}
    resp = http.post(
        "/v1/forecastSnapshots",
        json={"period": year, "owner": "reza", "adjustedCommit": {"currencyCode": "IRR", "units": "3000000"}},
        headers=manager,
    )
    assert resp.status_code in (200, 201), resp.get_data(as_text=True)
    snapshot = resp.get_json()["name"]

    analyst = {"Authorization": f"Bearer {token('analyst')}"}

    def report():
        r = http.get("/v1/reports/forecast?period=year&calendar=jalali&owners=reza", headers=analyst)
        assert r.status_code == 200, r.get_data(as_text=True)
        return r.get_json().get("rows")

    (row,) = wait_for(report, 30, "the snapshot in reporting-svc's forecast report")
    assert (row["periodKey"], row["owner"], row["currencyCode"]) == (year, "reza", "IRR")
    latest = row["latest"]
    assert latest["snapshot"] == snapshot and latest["kind"] == "submitted"
    assert (latest["commit"]["units"], latest["bestCase"]["units"], latest["weighted"]["units"]) == (
        "3000000", "4000000", "1000000",
    )  # fmt: skip
    assert row.get("accuracy", 0) == 0 and row.get("wonOpportunities", "0") == "0"  # nothing won yet
