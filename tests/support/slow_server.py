"""customer-svc whose GetCustomer takes SLOW_SECONDS: lets a test hold calls in flight while
it sends SIGTERM. Run as `python -m tests.support.slow_server` with the usual settings."""

from __future__ import annotations

import dataclasses
import os
import time

from crm_chassis.logging import configure_logging
from crm_chassis.service import Service
from customer_svc.__main__ import SPEC, build


def slow_build(ctx):
    registrations = build(ctx)
    servicer = registrations[0].servicer
    fast_get = servicer.GetCustomer

    def slow_get(request, context):
        time.sleep(float(os.environ.get("SLOW_SECONDS", "1.5")))
        return fast_get(request, context)

    servicer.GetCustomer = slow_get
    return registrations


if __name__ == "__main__":
    configure_logging("slow-customer-svc", "INFO")
    Service(dataclasses.replace(SPEC, build=slow_build)).run_until_signal()
