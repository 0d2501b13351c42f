"""Predictive customer value: BG/NBD + Gamma-Gamma (bgnbd.py) fitted on customer_value_daily,
results per customer in value_scores, cached per (currency, as-of day) in value_fits.

A fit is made on demand (GetCustomerValue, ListChurnRisks, the export) when there is none for
the currency and day, or when the sales projection applied events since it (projection_sources);
an advisory lock makes concurrent requests fit once. Time unit: days. A customer's purchases
are the Tehran days with a paid invoice; x = those days - 1, t_x = last - first, T = as-of - first.
Gamma-Gamma takes the mean net revenue per purchase day of customers with x > 0.
"""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import sqlalchemy as sa

from crm_chassis.errors import FailedPrecondition

from . import bgnbd
from .tables import projection_sources
from .value_tables import value_fits, value_scores

RECENT_DAYS = 90

SUMMARY_SQL = sa.text(
    f"""
    SELECT customer_id,
           count(*) FILTER (WHERE purchases > 0) AS n,
           min(day) FILTER (WHERE purchases > 0) AS first_day,
           max(day) FILTER (WHERE purchases > 0) AS last_day,
           sum(revenue) AS revenue,
           sum(revenue) FILTER (WHERE purchases > 0) AS purchase_revenue,
           count(*) FILTER (WHERE purchases > 0 AND day > CAST(:as_of AS date) - {RECENT_DAYS}) AS recent,
           coalesce(sum(credit_notes) FILTER (WHERE day > CAST(:as_of AS date) - {RECENT_DAYS}), 0) AS recent_credits
    FROM customer_value_daily
    WHERE currency = :currency AND day <= :as_of
    GROUP BY customer_id
    HAVING count(*) FILTER (WHERE purchases > 0) > 0
    ORDER BY customer_id
    """
)

TEXTS = {
    "no_recent_purchase": (
        "no purchase for {since} days, usually every {every}",
        "{since} روز بدون خرید، معمولاً هر {every} روز",
    ),
    "frequency_dropped": (
        "frequency dropped: {recent} purchases in the last {days} days, {usual} usually",
        "کاهش تکرار خرید: {recent} خرید در {days} روز گذشته، معمولاً {usual}",
    ),
    "single_purchase": ("one purchase only, {since} days ago", "تنها یک خرید، {since} روز پیش"),
    "credit_notes": ("credit notes {n} in the last {days} days", "{n} اعلامیه بستانکار در {days} روز گذشته"),
}


def reasons(since: int, x: int, t_x: int, T: int, recent: int, credits: int) -> list[dict]:
    """Why a customer may be lost, as codes with their figures (the text is made per language)."""
    out = []
    if x == 0:
        out.append({"code": "single_purchase", "since": since})
    else:
        every = t_x / x
        if since > 2 * every and since >= 14:
            out.append({"code": "no_recent_purchase", "since": since, "every": max(1, round(every))})
        window = min(RECENT_DAYS, T)
        before = T - window
        usual = (x + 1 - recent) / before * window if before > 0 else 0.0
        if usual >= 2 and recent < usual / 2:
            out.append({"code": "frequency_dropped", "recent": recent, "days": RECENT_DAYS, "usual": round(usual, 1)})
    if credits:
        out.append({"code": "credit_notes", "n": credits, "days": RECENT_DAYS})
    return out


def reason_text(reason: dict, lang: str) -> str:
    from crm_chassis.persian import to_persian_digits

    template = TEXTS[reason["code"]][1 if lang == "fa" else 0]
    text = template.format(**reason)
    return to_persian_digits(text) if lang == "fa" else text


def _stale(conn: sa.Connection, fit_time: dt.datetime) -> bool:
    last = conn.execute(
        sa.select(projection_sources.c.last_applied_at).where(projection_sources.c.domain == "sales")
    ).scalar()
    return last is not None and last > fit_time


def ensure_fit(conn: sa.Connection, currency: str, as_of: dt.date, horizon: int) -> dict | None:
    """The fit of (currency, as_of), made now if missing or stale (or of another horizon).
    None when there are no customers; FAILED_PRECONDITION when too few to fit."""
    cached = _cached(conn, currency, as_of, horizon)
    if cached is not None:
        return cached or None
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('reporting.value_fit'), hashtext(:k))"),
                 {"k": f"{currency}:{as_of}"})  # fmt: skip
    cached = _cached(conn, currency, as_of, horizon)  # made by the request we waited for
    if cached is not None:
        return cached or None
    return fit(conn, currency, as_of, horizon)


def _cached(conn: sa.Connection, currency: str, as_of: dt.date, horizon: int) -> dict | None:
    """The fresh fit's parameters ({} for one without customers), or None."""
    t = value_fits
    row = conn.execute(sa.select(t).where(t.c.currency == currency, t.c.as_of == as_of)).first()
    if row is None or row.params.get("horizon_days") != horizon or _stale(conn, row.fit_time):
        return None
    return dict(row.params) if row.customers else {}


def fit(conn: sa.Connection, currency: str, as_of: dt.date, horizon: int) -> dict | None:
    rows = conn.execute(SUMMARY_SQL, {"currency": currency, "as_of": as_of}).all()
    conn.execute(value_scores.delete().where(value_scores.c.currency == currency, value_scores.c.as_of == as_of))
    conn.execute(value_fits.delete().where(value_fits.c.currency == currency, value_fits.c.as_of == as_of))
    now = dt.datetime.now(dt.UTC)
    if not rows:
        conn.execute(value_fits.insert().values(currency=currency, as_of=as_of, fit_time=now, customers=0,
                                                params={"horizon_days": horizon}))  # fmt: skip
        return None
    n = np.array([r.n for r in rows], dtype=float)
    x = n - 1
    t_x = np.array([(r.last_day - r.first_day).days for r in rows], dtype=float)
    T = np.array([(as_of - r.first_day).days for r in rows], dtype=float)
    spend = np.array([float(r.purchase_revenue) / r.n for r in rows])
    try:
        model = bgnbd.fit_bgnbd(x, t_x, T)
    except ValueError as e:
        raise FailedPrecondition(
            f"cannot fit the purchase model: {e} (need at least 3 customers, some repeat)"
        ) from None
    try:
        gg = bgnbd.fit_gamma_gamma(x, spend)
        expected_spend = gg.expected_spend(x, spend)
        gg_params = {"p": gg.p, "q": gg.q, "gamma": gg.gamma, "log_likelihood": gg.log_likelihood}
    except ValueError:
        gg, gg_params = None, None
        expected_spend = spend  # too few repeat customers: their own mean spend
    p_alive = model.p_alive(x, t_x, T)
    expected = model.expected_purchases(horizon, x, t_x, T)
    since = [(as_of - r.last_day).days for r in rows]
    why = [
        json.dumps(reasons(since[i], int(x[i]), int(t_x[i]), int(T[i]), r.recent, int(r.recent_credits)))
        for i, r in enumerate(rows)
    ]
    clean = np.nan_to_num
    conn.execute(  # one statement for every customer's score: INSERT ... SELECT FROM unnest(arrays)
        INSERT_SCORES,
        {
            "currency": currency, "as_of": as_of, "horizon": horizon,
            "ids": [r.customer_id for r in rows], "n": [r.n for r in rows],
            "first": [r.first_day for r in rows], "last": [r.last_day for r in rows],
            "clv": [r.revenue for r in rows], "alive": p_alive.tolist(),
            "expected": clean(expected, posinf=0.0).tolist(), "spend": clean(expected_spend, posinf=0.0).tolist(),
            "predicted": clean(expected * expected_spend, posinf=0.0).tolist(), "reasons": why,
        },
    )  # fmt: skip
    params = {
        "horizon_days": horizon,
        "bgnbd": {
            "r": model.r,
            "alpha": model.alpha,
            "a": model.a,
            "b": model.b,
            "log_likelihood": model.log_likelihood,
        },
        "gamma_gamma": gg_params,
    }
    conn.execute(
        value_fits.insert().values(currency=currency, as_of=as_of, fit_time=now, customers=len(rows), params=params)
    )
    return params


INSERT_SCORES = sa.text(
    """
    INSERT INTO value_scores (currency, as_of, customer_id, purchases, first_day, last_day, historic_clv,
                              p_alive, churn_risk, expected_purchases, expected_spend, predicted_clv,
                              horizon_days, reasons)
    SELECT :currency, :as_of, id, n, f, l, clv, alive, 1 - alive, e, s, p, :horizon, CAST(why AS jsonb)
    FROM unnest(CAST(:ids AS text[]), CAST(:n AS int[]), CAST(:first AS date[]), CAST(:last AS date[]),
                CAST(:clv AS numeric[]), CAST(:alive AS float8[]), CAST(:expected AS float8[]),
                CAST(:spend AS float8[]), CAST(:predicted AS float8[]), CAST(:reasons AS text[]))
         AS u(id, n, f, l, clv, alive, e, s, p, why)
    """
)
