"""A service made of parts: what sales-svc and support-svc (and the services after them) share
in their `__main__` and runtime, so that none keeps its own copy.

A part of a service (leads, tickets, routing, ...) is a module listed in the service's PARTS
that may define:

- `registration(rt: Runtime) -> Registration | list[Registration]`: its gRPC service(s);
- `timer_handlers(rt: Runtime) -> None`: adds its handlers to `rt.timers` (called in every role
  that runs workers, so `python -m <package> work` fires them without serving gRPC);
- `subscriptions(rt: Runtime) -> list[Subscription]`: the events it consumes (the parts'
  subscriptions to one producer become one queue: `merge_subscriptions`); a Subscription's
  `batch` handlers take a run of events of one routing key at once (the consumer's batches),
  its `batch_all` a run of events of any of its keys, in arrival order;
- `workers(rt: Runtime) -> list[BackgroundWorker]`: more background workers (started with
  `serve` and `work`);
- `roles(rt: Runtime) -> dict[str, list[BackgroundWorker]]`: commands of their own
  (`python -m support_svc mail-in` runs only the inbound SMTP endpoint); `serve` runs them too.

    PARTS = [tickets, routing, sla]
    SPEC = parts_spec("support-svc", 50053, __file__, "support", PARTS)
"""

from __future__ import annotations

import itertools
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType

from .config import phone_region
from .messaging.consumer import Requires, Subscription
from .service import ServiceContext, ServiceSpec
from .timers import TimerWorker
from .uow import UnitOfWork


@dataclass
class Runtime:
    """What every part of one service shares, made once per process: the unit of work, the
    timer worker (one per process; each part adds its handlers) and the settings."""

    ctx: ServiceContext
    uow: UnitOfWork
    timers: TimerWorker
    phone_region: str = "IR"  # of numbers written without a country code
    extra: dict = field(default_factory=dict)  # per-part objects (clients, caches)

    @property
    def engine(self):
        return self.ctx.engine

    @property
    def settings(self):
        return self.ctx.settings

    def once(self, key: str, make: Callable):
        """The process' one object under `key` (a part's use cases, a client), made on first use
        and shared by its servicer and its timer handlers."""
        if key not in self.extra:
            self.extra[key] = make()
        return self.extra[key]


def runtime(ctx: ServiceContext, domain: str, cls: type[Runtime] = Runtime) -> Runtime:
    """The process' one Runtime of this service (kept in ctx.shared)."""
    if "runtime" not in ctx.shared:
        ctx.shared["runtime"] = cls(
            ctx=ctx,
            uow=UnitOfWork(ctx.engine, ctx.relay, source_service=ctx.settings.service_name, event_domain=domain),
            timers=TimerWorker(ctx.engine),
            phone_region=phone_region(),  # DEFAULT_PHONE_REGION
        )
    return ctx.shared["runtime"]


def merge_subscriptions(subs: Sequence[Subscription]) -> list[Subscription]:
    """One subscription per producer domain (one queue each): where several parts handle the
    same routing key, its handlers run in part order in the one transaction of the delivery
    (so the inbox applies the event to all of them once), and a field any of them requires is
    required.

    Batches: where parts handle the same key and any has a `batch` handler for it, the merged
    `batch[key]` gives the run to each part in turn (its batch handler, or its handler event by
    event). Where any part of a domain sets `batch_all`, the merged subscription has a
    `batch_all` too: each part in turn, in part order, takes its own events of the run (those
    of the keys it handles, in arrival order): in one call if it set batch_all, else run of one
    key by run of one key as above. A single part with batch_all is kept as it is. So each part
    sees its events in arrival order, as with a subscription of its own; what is not kept is
    the interleaving of two parts' writes within one batch (parts keep tables of their own).
    """
    merged: dict[str, Subscription] = {}
    parts_of: dict[str, list[Subscription]] = {}
    pairs: dict[tuple[str, str], list[tuple[Callable, Callable | None]]] = {}
    for sub in subs:
        into = merged.setdefault(sub.domain, Subscription(domain=sub.domain))
        parts_of.setdefault(sub.domain, []).append(sub)
        for key, handler in sub.handlers.items():
            first = into.handlers.get(key)
            into.handlers[key] = handler if first is None else _both(first, handler)
            pairs.setdefault((sub.domain, key), []).append((handler, sub.batch.get(key)))
        for key, req in sub.requires.items():
            had = into.requires.get(key)
            if had is not None and had.message is not req.message:
                raise ValueError(f"{key}: parts parse it as {had.message.__name__} and {req.message.__name__}")
            fields = req.fields if had is None else tuple(dict.fromkeys((*had.fields, *req.fields)))
            into.requires[key] = Requires(req.message, fields)
    for (domain, key), handlers in pairs.items():
        if any(batch is not None for _, batch in handlers):
            merged[domain].batch[key] = _batch_of(handlers)
    for domain, parts in parts_of.items():
        if any(p.batch_all is not None for p in parts):
            merged[domain].batch_all = parts[0].batch_all if len(parts) == 1 else _batch_all_of(parts)
    return list(merged.values())


def _batch_all_of(parts: list[Subscription]) -> Callable:
    """The merged batch_all of a domain's parts (merge_subscriptions says the rule)."""

    def handle(conn, events):
        for part in parts:
            mine = [e for e in events if e.routing_key in part.handlers]
            if not mine:
                continue
            if part.batch_all is not None:
                part.batch_all(conn, mine)
                continue
            for key, run in itertools.groupby(mine, key=lambda e: e.routing_key):
                run = list(run)
                batch = part.batch.get(key)
                if batch is not None:
                    batch(conn, run)
                else:
                    for e in run:
                        part.handlers[key](conn, e)

    return handle


def _batch_of(handlers: list[tuple[Callable, Callable | None]]) -> Callable:
    """One batch handler of a routing key several parts handle: each part in turn takes the
    whole run of events, by its batch handler or its handler event by event."""

    def handle(conn, events):
        for single, batch in handlers:
            if batch is not None:
                batch(conn, events)
            else:
                for e in events:
                    single(conn, e)

    return handle


def _both(first: Callable, second: Callable) -> Callable:
    def handle(conn, event):
        first(conn, event)
        second(conn, event)

    return handle


def parts_spec(
    name: str,
    port: int,
    main_file: str,
    domain: str,
    parts: Sequence[ModuleType],
    *,
    make: Callable[[ServiceContext], Runtime] | None = None,
) -> ServiceSpec:
    """The ServiceSpec of a service made of `parts` (its migrations beside `main_file`)."""
    rt = make or (lambda ctx: runtime(ctx, domain))

    def build(ctx: ServiceContext):
        r = rt(ctx)
        found = []
        for p in parts:
            if hasattr(p, "registration"):
                reg = p.registration(r)
                found.extend(reg if isinstance(reg, list) else [reg])
        return found

    def workers(ctx: ServiceContext):
        r = rt(ctx)
        for p in parts:
            if hasattr(p, "timer_handlers"):
                p.timer_handlers(r)
        more = [w for p in parts if hasattr(p, "workers") for w in p.workers(r)]
        return [r.timers, *more]

    def subscriptions(ctx: ServiceContext):
        r = rt(ctx)
        return merge_subscriptions([sub for p in parts if hasattr(p, "subscriptions") for sub in p.subscriptions(r)])

    def roles(ctx: ServiceContext) -> dict:
        r = rt(ctx)
        found: dict = {}
        for p in parts:
            if hasattr(p, "roles"):
                for role, ws in p.roles(r).items():
                    found.setdefault(role, []).extend(ws)
        return found

    return ServiceSpec(
        name=name,
        default_port=port,
        migrations=pathlib.Path(main_file).parent / "migrations",
        producer_domain=domain,
        build=build,
        workers=workers,
        subscriptions=subscriptions,
        roles=roles,
        role_names=tuple(sorted({r for p in parts if hasattr(p, "ROLES") for r in p.ROLES})),
    )
