"""`python -m reporting_svc [serve|migrate|relay|consume|work]`"""

from __future__ import annotations

from crm_chassis.parts import parts_spec
from crm_chassis.service import main

from . import (
    api,
    campaigns,
    loyalty,
    projections,
    rebuild,
    sales,
    schedule_runs,
    schedules,
    segments,
    support,
    timeline,
    value,
    value_api,
)

# The parts of the service (crm_chassis.parts says what each may define). Each projection part
# has a PROJECTION (projection.py); reporting_svc.PROJECTIONS lists them for the rebuild.
PARTS = [
    projections,  # customers per acquisition source (customer-svc's events)
    sales,  # leads, conversions and won revenue per acquisition source (sales-svc's events)
    support,  # the support desk: ticket, survey, SLA and call facts; the support_daily rollup
    loyalty,  # report 5's loyalty: points ledger and tiers (campaign-svc's events)
    campaigns,  # report 5's campaigns: goal share, responses, attributed leads, orders, revenue, ROI
    segments,  # report 2, sales by segment: customer demographics, order lines, lead to first purchase
    timeline,  # Customer 360: every service's events per customer (after the projections of each producer)
    rebuild,  # RebuildProjections: the job that replays crm.events.log into fresh tables and swaps
    api,  # ReportingService: the reports, their exports, projection status and rebuilds
    value,  # customer value: invoice facts and the per-customer revenue rollup (sales-svc's events)
    value_api,  # ValueService: Pareto, RFM, CLV and churn risk (BG/NBD + Gamma-Gamma)
    schedules,  # ReportScheduleService: scheduled reports (reportSchedules/{id}) and their runs
    schedule_runs,  # the schedules' timers: make the report, mail it once per slot, re-arm
]

# reporting-svc publishes nothing: no event domain, no relay.
SPEC = parts_spec("reporting-svc", 50055, __file__, None, PARTS)


def run() -> int:
    return main(SPEC)


if __name__ == "__main__":
    raise SystemExit(run())
