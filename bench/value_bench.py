"""Customer value at scale: BENCH_VALUE_CUSTOMERS customers (default 100,000), each with a few
paid-invoice days in customer_value_daily (set-based generate_series), on a fresh database.
Times GetParetoReport's SQL, the RFM segment counts, one keyset page of a segment, and the
BG/NBD + Gamma-Gamma fit with its scores written (value_model.fit).

`python -m bench.value_bench` (about a minute at the default size).
"""

from __future__ import annotations

import datetime as dt
import os
import statistics
import time

import sqlalchemy as sa

from reporting_svc import value, value_model
from reporting_svc.tables import metadata
from tests.support.harness import Databases

N = int(os.environ.get("BENCH_VALUE_CUSTOMERS", "100000"))
AS_OF = dt.date(2026, 12, 1)


def timed(fn, runs=5):
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out), max(out)


def main() -> None:
    url = Databases().fresh("rep_value_bench")
    engine = sa.create_engine(url)
    metadata.create_all(engine)
    with engine.begin() as c:
        # customer k: 1 + k % 7 purchase days, 37 days apart, the last (k % 400) days before AS_OF
        c.execute(sa.text("""
            INSERT INTO customer_value_daily (day, customer_id, currency, revenue, purchases)
            SELECT CAST(:as_of AS date) - (k % 400) - 37 * j, 'c' || k, 'IRR', 1000 + (k * 7919) % 90000, 1
            FROM generate_series(1, :n) k, generate_series(0, 6) j WHERE j <= k % 7
        """), {"as_of": AS_OF, "n": N})  # fmt: skip
        rows = c.execute(sa.text("SELECT count(*) FROM customer_value_daily")).scalar()
        c.execute(sa.text("ANALYZE customer_value_daily"))
    print(f"{N} customers, {rows} rollup rows")
    with engine.connect() as c:
        print("pareto (median, max s): {:.3f} {:.3f}".format(*timed(lambda: value.pareto(c, "IRR", None, AS_OF))))
        print("rfm counts: {:.3f} {:.3f}".format(*timed(lambda: value.rfm_counts(c, "IRR", None, AS_OF))))
        page = timed(lambda: value.rfm_page(c, "IRR", None, AS_OF, "champions", None, 50))
        print("rfm page of 50: {:.3f} {:.3f}".format(*page))
    with engine.begin() as c:
        t = time.perf_counter()
        params = value_model.fit(c, "IRR", AS_OF, 365)
        print(f"fit + scores: {time.perf_counter() - t:.2f} s", params["bgnbd"])


if __name__ == "__main__":
    main()
