"""ValueService (proto crm/reporting/v1/value.proto): Pareto, RFM, customer value, churn risks
and their exports."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import sqlalchemy as sa

from crm.reporting.v1 import value_pb2 as pb
from crm.reporting.v1 import value_pb2_grpc
from crm_chassis import dates, money
from crm_chassis.errors import FieldViolation, InvalidArgument, NotFound
from crm_chassis.grpc_server import Registration
from crm_chassis.pagination import PageTokens, page_size

from . import value, value_model
from .value_tables import value_scores

DEFAULT_HORIZON = 365
REPORTS = ("pareto", "rfm", "churn_risks")


def _lang(code: str) -> str:
    return "fa" if code.lower().startswith("fa") else "en"


def _as_of(req, field: str) -> dt.date:
    if not req.HasField(field):
        return dates.today()
    bad: list[FieldViolation] = []
    day = dates.from_proto(getattr(req, field), field, bad)
    if bad:
        raise InvalidArgument(bad)
    return dates.today() if day is None else day  # an all-zero Date is unset, as AIP's Date has it


def _horizon(value_: int) -> int:
    if value_ < 0 or value_ > 3650:
        raise InvalidArgument.field("horizon_days", "must be between 1 and 3650 (0: 365)")
    return value_ or DEFAULT_HORIZON


def _money(amount, currency: str):
    return money.to_money(money.round_minor(Decimal(str(amount)), currency), currency)


def amount_text(m) -> str:
    """A Money as a plain decimal string for exports ("400", "12.5")."""
    return format(money.to_decimal(m).normalize(), "f")


def _rfm(r, currency: str) -> pb.RfmCustomer:
    return pb.RfmCustomer(
        customer="customers/" + r.customer_id, recency_days=r.recency_days, frequency=r.frequency,
        monetary=_money(r.monetary, currency), recency_score=r.r, frequency_score=r.f, monetary_score=r.m,
        segment=r.segment,
    )  # fmt: skip


def _customer_value(s, currency: str, lang: str) -> pb.CustomerValue:
    out = pb.CustomerValue(
        name=f"customers/{s.customer_id}/value", historic_clv=_money(s.historic_clv, currency),
        purchases=s.purchases, first_purchase_date=dates.to_proto(s.first_day),
        last_purchase_date=dates.to_proto(s.last_day), p_alive=s.p_alive, churn_risk=s.churn_risk,
        expected_purchases=s.expected_purchases, horizon_days=s.horizon_days,
        expected_spend=_money(s.expected_spend, currency), predicted_clv=_money(s.predicted_clv, currency),
    )  # fmt: skip
    for reason in s.reasons:
        out.reasons.append(pb.ChurnReason(code=reason["code"], text=value_model.reason_text(reason, lang)))
    return out


def pareto_report(engine, request) -> pb.GetParetoReportResponse:
    """The Pareto report of a request with start_date, end_date and currency_code."""
    currency = value.currency_of(request.currency_code)
    start, end = value.period_of(request)
    with engine.connect() as conn:
        p = value.pareto(conn, currency, start, end)
    out = pb.GetParetoReportResponse(profit_basis=value.PROFIT_BASIS)
    if not p["customers"]:
        return out
    out.customers, out.top_customers = p["customers"], p["top_customers"]
    out.total_revenue.CopyFrom(_money(p["total"], currency))
    out.top_revenue_share = out.top_profit_share = p["top_share"]
    for c in p["curve"]:
        out.curve.append(pb.ParetoPoint(
            decile=c["decile"], customers=c["customers"], revenue=_money(c["revenue"], currency),
            cumulative_customer_share=c["customer_share"], cumulative_revenue_share=c["revenue_share"],
        ))  # fmt: skip
    return out


def rfm_report(engine, request) -> pb.GetRfmReportResponse:
    """Customers and revenue per RFM segment, for start_date, end_date and currency_code."""
    currency = value.currency_of(request.currency_code)
    start, end = value.period_of(request)
    with engine.connect() as conn:
        counts = value.rfm_counts(conn, currency, start, end)
    out = pb.GetRfmReportResponse(customers=sum(n for _, n, _ in counts))
    for s, n, rev in counts:
        out.segments.append(pb.RfmSegmentCount(segment=s, customers=n, revenue=_money(rev, currency)))
    return out


def risks(engine, request, limit: int, tokens: PageTokens | None = None):
    """value_scores rows by churn risk (highest first) of a ListChurnRisksRequest, from its page
    token if ``tokens`` is given; with the page fingerprint and the currency."""
    currency = value.currency_of(request.currency_code)
    as_of, horizon = _as_of(request, "as_of_date"), _horizon(request.horizon_days)
    if not 0 <= request.min_churn_risk <= 1:
        raise InvalidArgument.field("min_churn_risk", "must be between 0 and 1")
    fp = PageTokens.fingerprint(currency=currency, as_of=as_of, horizon=horizon, min=request.min_churn_risk)
    after = tokens.decode(request.page_token, fp) if tokens is not None else None
    t = value_scores
    with engine.begin() as conn:
        if value_model.ensure_fit(conn, currency, as_of, horizon) is None:
            return [], fp, currency
        q = sa.select(t).where(t.c.currency == currency, t.c.as_of == as_of, t.c.churn_risk >= request.min_churn_risk)
        if after:
            q = q.where(
                sa.or_(t.c.churn_risk < after[0], sa.and_(t.c.churn_risk == after[0], t.c.customer_id > after[1]))
            )
        rows = conn.execute(q.order_by(t.c.churn_risk.desc(), t.c.customer_id).limit(limit)).all()
    return rows, fp, currency


class ValueServicer(value_pb2_grpc.ValueServiceServicer):
    def __init__(self, rt):
        self.engine = rt.engine
        self.tokens = PageTokens(rt.settings.jwt_secret, "reporting-value")

    # -- Pareto and RFM -----------------------------------------------------------------------
    def GetParetoReport(self, request, context):
        return pareto_report(self.engine, request)

    def GetRfmReport(self, request, context):
        return rfm_report(self.engine, request)

    def ListRfmSegmentCustomers(self, request, context):
        segment = request.segment.strip().lower()
        if segment not in value.SEGMENT_IDS:
            raise InvalidArgument.field(
                "segment", f"unknown segment {segment!r}; use one of {', '.join(value.SEGMENT_IDS)}"
            )
        currency = value.currency_of(request.currency_code)
        start, end = value.period_of(request)
        limit = page_size(request.page_size)
        fp = PageTokens.fingerprint(segment=segment, currency=currency, start=start, end=end)
        after = self.tokens.decode(request.page_token, fp)
        with self.engine.connect() as conn:
            rows = value.rfm_page(conn, currency, start, end, segment, after, limit + 1)
        out = pb.ListRfmSegmentCustomersResponse(customers=[_rfm(r, currency) for r in rows[:limit]])
        if len(rows) > limit:
            last = rows[limit - 1]
            out.next_page_token = self.tokens.encode([str(last.monetary), last.customer_id], fp)
        return out

    # -- CLV and churn -----------------------------------------------------------------------
    def GetCustomerValue(self, request, context):
        if not request.name.startswith("customers/") or not request.name.removeprefix("customers/"):
            raise InvalidArgument.field("name", "must be customers/{id}")
        cid = request.name.removeprefix("customers/")
        currency = value.currency_of(request.currency_code)
        as_of, horizon = _as_of(request, "as_of_date"), _horizon(request.horizon_days)
        with self.engine.begin() as conn:
            score = None
            if value_model.ensure_fit(conn, currency, as_of, horizon) is not None:
                score = conn.execute(sa.select(value_scores).where(
                    value_scores.c.currency == currency, value_scores.c.as_of == as_of,
                    value_scores.c.customer_id == cid)).first()  # fmt: skip
            if score is None:
                raise NotFound(f"{request.name} has no paid invoice in {currency} up to {as_of}")
            rfm = value.rfm_page(conn, currency, None, as_of, None, None, 1, customer=cid)
        out = _customer_value(score, currency, _lang(request.language_code))
        if rfm:
            out.rfm.CopyFrom(_rfm(rfm[0], currency))
        return out

    def ListChurnRisks(self, request, context):
        limit = page_size(request.page_size)
        rows, fp, currency = risks(self.engine, request, limit + 1, self.tokens)
        lang = _lang(request.language_code)
        out = pb.ListChurnRisksResponse(customers=[_customer_value(r, currency, lang) for r in rows[:limit]])
        if len(rows) > limit:
            last = rows[limit - 1]
            out.next_page_token = self.tokens.encode([last.churn_risk, last.customer_id], fp)
        return out

    # -- exports -----------------------------------------------------------------------------
    def ExportValueReport(self, request, context):
        from . import report_files  # it reads the reports above

        report = request.report.strip().lower()
        if report not in REPORTS:
            raise InvalidArgument.field("report", "choose pareto, rfm or churn_risks")
        yield from report_files.export(self.engine, f"value-{report.replace('_', '-')}", request)


def registration(rt) -> Registration:
    return Registration.of(ValueServicer(rt))
