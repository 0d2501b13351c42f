"""reporting_bench with the projections' batch_all removed: the consumer's per-routing-key
batches (the live path before Subscription.batch_all), for a before/after figure in one run's
conditions. `python -m bench.reporting_bench_per_key` (BENCH_REPORTING_EVENTS as the bench)."""

from __future__ import annotations

import dataclasses
import runpy

import reporting_svc.projection as projection

_subscription = projection.Projection.subscription
projection.Projection.subscription = lambda self: dataclasses.replace(_subscription(self), batch_all=None)

if __name__ == "__main__":
    runpy.run_module("bench.reporting_bench", run_name="__main__")
