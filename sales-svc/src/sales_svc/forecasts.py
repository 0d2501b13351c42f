"""ForecastService (proto/crm/sales/v1/forecasts.proto): the forecast per period and group in
the reporting currency, exchange rates, forecast snapshots (a manager's submission and the
weekly freeze), forecast against actual, and the time from lead to purchase. Every snapshot
stored publishes forecast_snapshot.created.v1 (ForecastSnapshotEvent) from the outbox, in the
transaction that stores it.

Settings (environment): REPORTING_CURRENCY (default IRR), FORECAST_FREEZE_CRON (default
"0 18 * * wed", Asia/Tehran), FORECAST_FREEZE_CALENDAR (jalali) and FORECAST_FREEZE_UNIT
(quarter): the weekly freeze snapshots the current and the next period of that calendar and unit.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from decimal import Decimal, InvalidOperation

import sqlalchemy as sa
from google.protobuf import timestamp_pb2
from sqlalchemy.dialects import postgresql as pg

from crm.sales.v1 import forecasts_pb2 as pb
from crm.sales.v1 import forecasts_pb2_grpc
from crm.sales.v1 import sales_events_pb2 as ev
from crm_chassis import audit, dates, timers
from crm_chassis.auth import Principal
from crm_chassis.errors import InvalidArgument, PermissionDenied
from crm_chassis.filtering import FieldType, FilterField, FilterSchema, keyset_page, newest_first, query_fingerprint
from crm_chassis.grpc_server import Registration
from crm_chassis.interceptors import current_principal
from crm_chassis.money import AmountOutOfRange, check_currency, to_decimal, to_money
from crm_chassis.pagination import PageTokens, page_size
from crm_chassis.resources import ResourceName

from .access import Scope, owner_of
from .forecast_periods import CALENDARS, UNITS, Period, parse_label, period_of, resolve
from .forecast_queries import (
    GROUP_BY,
    ZERO,
    Cell,
    actual_revenue,
    fixed_rate,
    forecast_cells,
    group_names,
    sales_cycle,
)
from .forecast_tables import AMOUNTS, COUNTS, exchange_rates, forecast_snapshots
from .runtime import Sales
from .tables import invoices, opportunities

log = logging.getLogger("sales.forecasts")
SNAPSHOT_AMOUNT_LIMIT = Decimal(10) ** 19  # forecast_snapshots' NUMERIC(28, 9) columns hold less

FREEZE_KIND = "forecast.freeze"
FREEZE_KEY = "weekly"
DEFAULT_FREEZE_CRON = "0 18 * * wed"
SYSTEM = "system"
SNAPSHOT = ResourceName("forecastSnapshots/{id}")
RATE = ResourceName("exchangeRates/{id}", id=r"[A-Z]{3}-\d{4}-\d{2}-\d{2}")
MAX_NOTE = 2000
MAX_RATE = Decimal("1e18")
RATE_DECIMALS = 18
s = forecast_snapshots.c
r = exchange_rates.c

RATE_FILTERS = FilterSchema(
    FilterField("currency_code", r.currency_code), FilterField("rate_date", r.rate_date, FieldType.DATE)
)
SNAPSHOT_FILTERS = FilterSchema(
    FilterField("owner", s.owner_id),
    FilterField("period", s.period),
    FilterField("calendar", s.calendar),
    FilterField("unit", s.unit),
    FilterField("kind", s.kind),
    FilterField("submitter", s.submitter),
    FilterField("create_time", s.create_time, FieldType.TIMESTAMP),
    FilterField("period_start", s.period_start, FieldType.DATE),
)


def reporting_currency() -> str:
    code = os.environ.get("REPORTING_CURRENCY", "IRR").strip().upper() or "IRR"
    if len(code) != 3 or not code.isalpha():
        raise ValueError(f"REPORTING_CURRENCY={code!r} is not a currency code")
    return code


# -- proto mapping ----------------------------------------------------------------------------


_date = dates.to_proto


def _ts(value: dt.datetime) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(value)
    return t


def _plain(d: Decimal) -> str:
    text = f"{d:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _period(p: Period) -> pb.ForecastPeriod:
    return pb.ForecastPeriod(label=p.label, start_date=_date(p.start), end_date=_date(p.end))


def figures_proto(amounts: dict, counts: dict, currency: str) -> pb.ForecastFigures:
    return pb.ForecastFigures(
        **{a: to_money(amounts.get(a, ZERO), currency) for a in AMOUNTS}, **{c: counts.get(c, 0) for c in COUNTS}
    )


def rate_proto(row) -> pb.ExchangeRate:
    return pb.ExchangeRate(
        name=f"exchangeRates/{row.currency_code}-{row.rate_date.isoformat()}",
        currency_code=row.currency_code,
        reporting_currency_code=row.to_currency,
        rate_date=_date(row.rate_date),
        rate=_plain(Decimal(row.rate)),
        set_by=row.set_by,
        update_time=_ts(row.update_time),
    )


def snapshot_proto(row) -> pb.ForecastSnapshot:
    m = row._mapping
    snap = pb.ForecastSnapshot(
        name=SNAPSHOT.format(row.id),
        period=_period(Period(row.period, row.period_start, row.period_end)),
        calendar=row.calendar,
        unit=row.unit,
        owner=row.owner_id,
        figures=figures_proto({a: Decimal(m[a]) for a in AMOUNTS}, {c: int(m[c]) for c in COUNTS}, row.currency_code),
        note=row.note,
        submitter=row.submitter,
        kind=row.kind,
        create_time=_ts(row.create_time),
        currency_code=row.currency_code,
    )
    if row.adjusted_commit is not None:
        snap.adjusted_commit.CopyFrom(to_money(Decimal(row.adjusted_commit), row.currency_code))
    return snap


SNAPSHOT_CREATED = "forecast_snapshot.created.v1"


def snapshot_event(row) -> ev.ForecastSnapshotEvent:
    """forecast_snapshot.created.v1's payload: the stored snapshot (no note: free text no
    consumer needs)."""
    m = row._mapping
    cur = row.currency_code
    out = ev.ForecastSnapshotEvent(
        forecast_snapshot=SNAPSHOT.format(row.id),
        period=row.period,
        calendar=row.calendar,
        unit=row.unit,
        period_start_date=_date(row.period_start),
        period_end_date=_date(row.period_end),
        owner=row.owner_id,
        currency_code=cur,
        kind=row.kind,
        submitter=row.submitter,
        create_time=_ts(row.create_time),
        **{a: to_money(Decimal(m[a]), cur) for a in AMOUNTS},
        **{c: int(m[c]) for c in COUNTS},
    )
    if row.adjusted_commit is not None:
        out.adjusted_commit.CopyFrom(to_money(Decimal(row.adjusted_commit), cur))
    return out


def _choice(value: str, allowed: tuple[str, ...], field: str, default: str) -> str:
    v = (value or "").strip().lower()
    if not v:
        return default
    if v not in allowed:
        raise InvalidArgument.field(field, f"{value!r} is not one of {', '.join(allowed)}")
    return v


def _percent(error: Decimal, forecast: Decimal) -> float:
    return 0.0 if forecast == 0 else float(round(error / forecast * 100, 2))


# -- use cases --------------------------------------------------------------------------------


class Forecasts:
    def __init__(self, sales: Sales):
        self.sales = sales
        self.reporting = reporting_currency()
        secret = sales.ctx.settings.jwt_secret
        self.rate_tokens = PageTokens(secret, "exchange-rates")
        self.snapshot_tokens = PageTokens(secret, "forecast-snapshots")
        self.freeze_cron = os.environ.get("FORECAST_FREEZE_CRON", DEFAULT_FREEZE_CRON)
        self.freeze_calendar = os.environ.get("FORECAST_FREEZE_CALENDAR", "jalali")
        self.freeze_unit = os.environ.get("FORECAST_FREEZE_UNIT", "quarter")
        if self.freeze_calendar not in CALENDARS or self.freeze_unit not in UNITS:
            raise ValueError("FORECAST_FREEZE_CALENDAR is gregorian|jalali, FORECAST_FREEZE_UNIT month|quarter|year")

    # exchange rates
    def set_rate(self, req: pb.SetExchangeRateRequest, principal: Principal) -> pb.ExchangeRate:
        rate = req.exchange_rate
        cur = check_currency(rate.currency_code, "exchange_rate.currency_code")
        if fixed_rate(cur, self.reporting) is not None:
            raise InvalidArgument.field(
                "exchange_rate.currency_code",
                f"{cur} to {self.reporting} needs no rate ({'the same currency' if cur == self.reporting else '1 IRT = 10 IRR'})",
            )
        d = rate.rate_date
        try:
            day = dt.date(d.year, d.month, d.day)
        except ValueError:
            raise InvalidArgument.field(
                "exchange_rate.rate_date", "is required: a valid day (year, month, day)"
            ) from None
        try:
            value = Decimal((rate.rate or "").strip())
        except InvalidOperation:
            value = None
        if value is None or not value.is_finite() or value <= 0 or value >= MAX_RATE:
            raise InvalidArgument.field(
                "exchange_rate.rate", f'{rate.rate!r} is not a positive decimal number below 1e18 (e.g. "1050000")'
            )
        if -value.as_tuple().exponent > RATE_DECIMALS:
            raise InvalidArgument.field("exchange_rate.rate", f"at most {RATE_DECIMALS} decimals")
        name = f"exchangeRates/{cur}-{day.isoformat()}"
        key = (r.currency_code == cur, r.to_currency == self.reporting, r.rate_date == day)
        with self.sales.uow.begin() as tx:
            old = tx.execute(sa.select(r.rate).where(*key).with_for_update()).scalar()
            stmt = pg.insert(exchange_rates).values(
                currency_code=cur, to_currency=self.reporting, rate_date=day, rate=value, set_by=principal.subject
            )
            row = tx.execute(
                stmt.on_conflict_do_update(
                    index_elements=["currency_code", "to_currency", "rate_date"],
                    set_={"rate": value, "set_by": principal.subject, "update_time": sa.func.now()},
                ).returning(exchange_rates)
            ).one()
            tx.audit(
                name,
                "exchange_rate.set",
                principal,
                [audit.change("rate", "null" if old is None else audit.value(_plain(old)), audit.value(_plain(value)))],
            )
        return rate_proto(row)

    def list_rates(self, req: pb.ListExchangeRatesRequest) -> pb.ListExchangeRatesResponse:
        limit = page_size(req.page_size)
        where = RATE_FILTERS.compile(req.filter)
        q = sa.select(exchange_rates).where(r.to_currency == self.reporting, where)
        order = [(r.currency_code, False), (r.rate_date, True)]
        with self.sales.uow.read() as conn:
            rows, token = keyset_page(
                conn, q, order, self.rate_tokens, query_fingerprint(req.filter), limit, req.page_token
            )
        return pb.ListExchangeRatesResponse(exchange_rates=[rate_proto(x) for x in rows], next_page_token=token)

    # the forecast
    def get_forecast(self, req: pb.GetForecastRequest, principal: Principal) -> pb.Forecast:
        group_by = _choice(req.group_by, GROUP_BY, "group_by", "none")
        calendar, unit, periods = resolve(req.period, req.calendar, req.unit, req.start, req.end)
        visible = Scope.of(principal).visible(opportunities.c.owner_id, opportunities.c.team_id)
        with self.sales.uow.read() as conn:
            cells = forecast_cells(conn, periods, group_by, visible, self.reporting)
            names = group_names(conn, group_by, {c.group for c in cells})
            # Product rows share opportunities (one with two products is in both): its totals
            # come from a query of their own, not from adding up the rows.
            totals = forecast_cells(conn, periods, "none", visible, self.reporting) if group_by == "product" else None
        out = pb.Forecast(
            currency_code=self.reporting,
            calendar=calendar,
            unit=unit,
            group_by=group_by,
            periods=[_period(p) for p in periods],
        )
        sums: dict[int, Cell] = {}
        for c in cells:
            group, display = names.get(c.group, ("", ""))
            out.rows.append(
                pb.ForecastRow(
                    period=periods[c.bucket - 1].label,
                    group=group,
                    group_display_name=display,
                    figures=figures_proto(c.amounts, c.counts, self.reporting),
                )
            )
            if totals is None:
                acc = sums.setdefault(
                    c.bucket, Cell(c.bucket, "", dict.fromkeys(AMOUNTS, ZERO), dict.fromkeys(COUNTS, 0))
                )
                for a in AMOUNTS:
                    acc.amounts[a] += c.amounts[a]
                for k in COUNTS:
                    acc.counts[k] += c.counts[k]
        if totals is not None:
            sums = {c.bucket: c for c in totals}
        for i, p in enumerate(periods, 1):
            c = sums.get(i)
            out.period_totals.append(
                pb.ForecastRow(
                    period=p.label,
                    figures=figures_proto(c.amounts if c else {}, c.counts if c else {}, self.reporting),
                )
            )
        return out

    # snapshots
    def submit(self, req: pb.SubmitForecastRequest, principal: Principal) -> pb.ForecastSnapshot:
        if not req.period.strip():
            raise InvalidArgument.field("period", "is required: a period label such as 1405-Q1 or 2026-05")
        calendar, unit, period = parse_label(req.period)
        owner = owner_of(req.owner, "owner") or principal.subject
        adjusted = (
            to_decimal(req.adjusted_commit, "adjusted_commit", currency=self.reporting)
            if req.HasField("adjusted_commit")
            else None
        )
        if len(req.note) > MAX_NOTE:
            raise InvalidArgument.field("note", f"must be at most {MAX_NOTE} characters")
        if len(req.request_id) > 200:
            raise InvalidArgument.field("request_id", "must be at most 200 characters")
        request_id = req.request_id or None
        with self.sales.uow.begin() as tx:
            if request_id:
                done = tx.execute(sa.select(forecast_snapshots).where(s.request_id == request_id)).one_or_none()
                if done is not None:
                    return snapshot_proto(done)
            if not Scope.of(principal).can_assign(tx.conn, owner):
                raise PermissionDenied(
                    f"owner: you may submit the forecast of yourself and of members of teams you manage, not {owner!r}",
                    reason="FORECAST_OWNER_NOT_ALLOWED",
                    metadata={"field": "owner", "owner": owner},
                )
            cells = forecast_cells(tx.conn, [period], "none", sa.true(), self.reporting, owner=owner)
            if cells and (big := _too_big(cells[0])):
                raise AmountOutOfRange(
                    f"the {big} of {owner!r} in {period.label} is beyond what a snapshot holds "
                    f"(less than {SNAPSHOT_AMOUNT_LIMIT:f} {self.reporting})",
                    metadata={"figure": big},
                )
            values = self._snapshot_values(period, calendar, unit, owner, cells[0] if cells else None)
            values.update(
                adjusted_commit=adjusted,
                note=req.note.strip(),
                submitter=principal.subject,
                kind="submitted",
                request_id=request_id,
            )
            row = tx.execute(
                pg.insert(forecast_snapshots)
                .values(values)
                .on_conflict_do_nothing(index_elements=["request_id"])
                .returning(forecast_snapshots)
            ).one_or_none()
            if row is None:  # the same request_id committed meanwhile
                row = tx.execute(sa.select(forecast_snapshots).where(s.request_id == request_id)).one()
                return snapshot_proto(row)
            tx.publish(SNAPSHOT_CREATED, snapshot_event(row), SNAPSHOT.format(row.id))
            tx.audit(
                SNAPSHOT.format(row.id),
                "forecast.submit",
                principal,
                [
                    audit.change("period", "null", audit.value(period.label)),
                    audit.change("owner", "null", audit.value(owner)),
                    audit.change(
                        "adjusted_commit", "null", "null" if adjusted is None else audit.value(_plain(adjusted))
                    ),
                ],
            )
        return snapshot_proto(row)

    def _snapshot_values(self, period: Period, calendar: str, unit: str, owner: str, cell: Cell | None) -> dict:
        return {
            "period": period.label,
            "calendar": calendar,
            "unit": unit,
            "period_start": period.start,
            "period_end": period.end,
            "owner_id": owner,
            "currency_code": self.reporting,
            **{a: cell.amounts[a] if cell else ZERO for a in AMOUNTS},
            **{c: cell.counts[c] if cell else 0 for c in COUNTS},
        }

    def freeze(self, conn: sa.Connection, timer: timers.Timer) -> None:
        """The weekly freeze: a snapshot of the current and the next period (as of the timer's due
        time, Asia/Tehran) for every owner with an opportunity in them, in the firing's
        transaction (so exactly once per occurrence), each with its forecast_snapshot.created.v1
        in the outbox of the same transaction."""
        day = timer.due_at.astimezone(dates.TEHRAN).date()
        cal, unit = self.freeze_calendar, self.freeze_unit
        first = period_of(day, cal, unit)
        periods = [first, period_of(first.end, cal, unit)]
        cells = forecast_cells(conn, periods, "owner", sa.true(), self.reporting)
        rows = [
            {
                **self._snapshot_values(periods[c.bucket - 1], cal, unit, c.group, c),
                "submitter": SYSTEM,
                "kind": "weekly",
                "note": f"weekly freeze of {timer.due_at.isoformat()}",
            }
            for c in cells
            if c.group and not _too_big(c, log_for=periods[c.bucket - 1].label)
        ]
        if not rows:
            return
        made = conn.execute(forecast_snapshots.insert().returning(forecast_snapshots), rows).all()  # one executemany
        with self.sales.uow.joined(conn) as tx:  # the events and audit rows commit with the snapshots
            tx.publish_many(SNAPSHOT_CREATED, [(SNAPSHOT.format(m.id), snapshot_event(m)) for m in made])
            tx.audit_many(
                [
                    (SNAPSHOT.format(m.id), "forecast.freeze", [audit.change("period", "null", audit.value(m.period))])
                    for m in made
                ],
                SYSTEM,
            )
        log.info("froze %d forecast snapshots for %s", len(made), ", ".join(p.label for p in periods))

    def get_snapshot(self, name: str, principal: Principal) -> pb.ForecastSnapshot:
        sid = SNAPSHOT.parse(name).id
        with self.sales.uow.read() as conn:
            row = conn.execute(
                sa.select(forecast_snapshots).where(s.id == sid, Scope.of(principal).visible(s.owner_id))
            ).one_or_none()
        if row is None:
            raise SNAPSHOT.not_found(name)
        return snapshot_proto(row)

    def list_snapshots(self, req: pb.ListForecastSnapshotsRequest, principal: Principal):
        limit = page_size(req.page_size)
        where = SNAPSHOT_FILTERS.compile(req.filter)
        q = sa.select(forecast_snapshots).where(where, Scope.of(principal).visible(s.owner_id))
        with self.sales.uow.read() as conn:
            rows, token = keyset_page(
                conn,
                q,
                newest_first(forecast_snapshots),
                self.snapshot_tokens,
                query_fingerprint(req.filter),
                limit,
                req.page_token,
            )
        return pb.ListForecastSnapshotsResponse(
            forecast_snapshots=[snapshot_proto(x) for x in rows], next_page_token=token
        )

    def compare(self, req: pb.CompareForecastRequest, principal: Principal) -> pb.CompareForecastResponse:
        calendar, unit, periods = resolve(req.period, req.calendar, req.unit, req.start, req.end)
        owner = req.owner.strip() or None
        scope = Scope.of(principal)
        bucket_of = {p.start: i for i, p in enumerate(periods, 1)}
        q = (
            sa.select(forecast_snapshots)
            .where(
                s.calendar == calendar,
                s.unit == unit,
                s.period_start.in_(list(bucket_of)),
                s.currency_code == self.reporting,
                scope.visible(s.owner_id),
            )
            .order_by(s.period_start, s.owner_id, s.create_time, s.id)
        )
        if owner:
            q = q.where(s.owner_id == owner)
        with self.sales.uow.read() as conn:
            snaps = conn.execute(q).all()
            actual = actual_revenue(
                conn,
                periods,
                scope.visible(opportunities.c.owner_id, opportunities.c.team_id),
                scope.visible(invoices.c.owner_id, invoices.c.team_id),
                self.reporting,
                owner,
            )
        by_key: dict[tuple[int, str], list] = {}
        for row in snaps:
            by_key.setdefault((bucket_of[row.period_start], row.owner_id), []).append(row)
        keys = sorted(set(by_key) | {k for k in actual if 1 <= k[0] <= len(periods)})
        cur = self.reporting
        out = pb.CompareForecastResponse(currency_code=cur, periods=[_period(p) for p in periods])
        for key in keys:
            won = actual.get(key, {}).get("won", ZERO)
            billed = actual.get(key, {}).get("invoiced", ZERO)
            comparison = pb.ForecastComparison(
                period=periods[key[0] - 1].label,
                owner=key[1],
                won_revenue=to_money(won, cur),
                invoiced_revenue=to_money(billed, cur),
            )
            for row in by_key.get(key, []):
                weighted = Decimal(row.closed_amount) + Decimal(row.weighted_amount)
                commit = (
                    Decimal(row.adjusted_commit)
                    if row.adjusted_commit is not None
                    else Decimal(row.closed_amount) + Decimal(row.commit_amount)
                )
                comparison.snapshots.append(
                    pb.SnapshotComparison(
                        snapshot=SNAPSHOT.format(row.id),
                        create_time=_ts(row.create_time),
                        kind=row.kind,
                        weighted_forecast=to_money(weighted, cur),
                        commit_forecast=to_money(commit, cur),
                        weighted_error=to_money(won - weighted, cur),
                        weighted_error_percent=_percent(won - weighted, weighted),
                        commit_error=to_money(won - commit, cur),
                        commit_error_percent=_percent(won - commit, commit),
                    )
                )
            out.comparisons.append(comparison)
        return out

    def sales_cycle(self, req: pb.GetSalesCycleRequest, principal: Principal) -> pb.GetSalesCycleResponse:
        group_by = _choice(req.group_by, ("source", "product_line"), "group_by", "source")
        _, _, periods = resolve(req.period, req.calendar, req.unit, req.start, req.end, default_unit="year")
        start, end = periods[0].start, periods[-1].end
        visible = Scope.of(principal).visible(opportunities.c.owner_id, opportunities.c.team_id)
        with self.sales.uow.read() as conn:
            rows, total = sales_cycle(conn, start, end, group_by, visible)
            names = group_names(conn, "product_line", {x.group for x in rows}) if group_by == "product_line" else {}

        def proto(x, named: bool = True) -> pb.SalesCycleRow:
            group, display = names.get(x.group, (x.group, x.group)) if named else ("", "")
            return pb.SalesCycleRow(
                group=group,
                group_display_name=display,
                count=x.count,
                mean_days=x.mean,
                median_days=x.median,
                p90_days=x.p90,
            )

        return pb.GetSalesCycleResponse(
            start_date=_date(start), end_date=_date(end), rows=[proto(x) for x in rows], total=proto(total, False)
        )


# -- gRPC ------------------------------------------------------------------------------------


class ForecastServicer(forecasts_pb2_grpc.ForecastServiceServicer):
    def __init__(self, forecasts: Forecasts):
        self.f = forecasts

    def SetExchangeRate(self, request, context):
        return self.f.set_rate(request, current_principal())

    def ListExchangeRates(self, request, context):
        return self.f.list_rates(request)

    def GetForecast(self, request, context):
        return self.f.get_forecast(request, current_principal())

    def SubmitForecast(self, request, context):
        return self.f.submit(request, current_principal())

    def GetForecastSnapshot(self, request, context):
        return self.f.get_snapshot(request.name, current_principal())

    def ListForecastSnapshots(self, request, context):
        return self.f.list_snapshots(request, current_principal())

    def CompareForecast(self, request, context):
        return self.f.compare(request, current_principal())

    def GetSalesCycle(self, request, context):
        return self.f.sales_cycle(request, current_principal())


def use_cases(sales: Sales) -> Forecasts:
    return sales.once("forecasts", lambda: Forecasts(sales))


def registration(sales: Sales) -> Registration:
    return Registration.of(ForecastServicer(use_cases(sales)))


def arm_weekly_freeze(conn: sa.Connection, cron: str = DEFAULT_FREEZE_CRON) -> None:
    """Arm the weekly freeze unless it is armed with this schedule already (migration 0010 and
    every start call it; a changed FORECAST_FREEZE_CRON re-arms it)."""
    current = timers.get(conn, FREEZE_KIND, FREEZE_KEY)
    if current is None or current.cron != cron:
        timers.schedule_recurring(conn, FREEZE_KIND, FREEZE_KEY, cron)


def timer_handlers(sales: Sales) -> None:
    f = use_cases(sales)
    sales.timers.register(FREEZE_KIND, f.freeze, max_attempts=3)
    try:
        with sales.uow.begin() as tx:
            arm_weekly_freeze(tx.conn, f.freeze_cron)
    except sa.exc.SQLAlchemyError as err:  # the database is down at start: the migration armed it
        log.warning("could not check the weekly forecast freeze timer: %s", err)


def _too_big(cell: Cell, log_for: str | None = None) -> str | None:
    """The first figure of `cell` a snapshot column cannot hold, if any (logged for the weekly
    freeze, which skips that owner rather than fail every owner's snapshot again and again)."""
    for a in AMOUNTS:
        if abs(cell.amounts[a]) >= SNAPSHOT_AMOUNT_LIMIT:
            if log_for is not None:
                log.warning("weekly freeze: %s of %r in %s is too large to store; skipped", a, cell.group, log_for)
            return a
    return None
