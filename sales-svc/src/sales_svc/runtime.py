"""What every part of sales-svc shares, made once per process: the unit of work, the timer
worker (one per process; each part adds its handlers) and the settings.

A part of the service (leads, opportunities, invoices, ...) is a module listed in
`__main__.PARTS` that may define:

- `registration(sales: Sales) -> Registration`: its gRPC service;
- `timer_handlers(sales: Sales) -> None`: adds its handlers to `sales.timers` (called in every
  role that runs workers, so `python -m sales_svc work` fires them without serving gRPC);
- `subscriptions(sales: Sales) -> list[Subscription]`: the events it consumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from crm_chassis.config import phone_region
from crm_chassis.service import ServiceContext
from crm_chassis.timers import TimerWorker
from crm_chassis.uow import UnitOfWork


@dataclass
class Sales:
    ctx: ServiceContext
    uow: UnitOfWork
    timers: TimerWorker
    phone_region: str = "IR"  # of numbers written without a country code
    extra: dict = field(default_factory=dict)  # per-part objects (clients, caches)

    @property
    def engine(self):
        return self.ctx.engine

    def once(self, key: str, make):
        """The process' one object under `key` (a part's use cases, a client), made on first use
        and shared by its servicer and its timer handlers."""
        if key not in self.extra:
            self.extra[key] = make()
        return self.extra[key]


def sales(ctx: ServiceContext) -> Sales:
    if "sales" not in ctx.shared:
        ctx.shared["sales"] = Sales(
            ctx=ctx,
            uow=UnitOfWork(ctx.engine, ctx.relay, source_service=ctx.settings.service_name, event_domain="sales"),
            timers=TimerWorker(ctx.engine),
            phone_region=phone_region(),  # DEFAULT_PHONE_REGION
        )
    return ctx.shared["sales"]
