"""What every part of sales-svc shares, made once per process (crm_chassis.parts.Runtime: the
unit of work, the timer worker, the settings); the parts are listed in `__main__.PARTS`."""

from __future__ import annotations

from crm_chassis.parts import Runtime, runtime
from crm_chassis.service import ServiceContext

Sales = Runtime


def sales(ctx: ServiceContext) -> Sales:
    return runtime(ctx, "sales")
