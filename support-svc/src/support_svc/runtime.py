"""What every part of support-svc shares, made once per process: crm_chassis.parts.Runtime (the
unit of work, the timer worker, the settings) plus the ticket hooks and the channel senders.

Hooks let a part react to every ticket change in the same transaction, whoever made it (an
RPC, an inbound mail, a timer): routing offers a new ticket, SLA starts and stops its clocks.
A part adds its hooks in `install(support)` (`__main__.PARTS`); `ticketing` calls them.

    def install(support):
        support.hooks.opened.append(lambda tx, ticket: ...)            # a ticket was opened
        support.hooks.changed.append(lambda tx, before, after: ...)    # fields or state changed
        support.hooks.message.append(lambda tx, ticket, message: ...)  # a message was added
        support.senders["email"] = send_mail                            # delivers agent replies
        support.hooks.event_fields.append(lambda conn, ticket: {...})  # more TicketEvent fields

`ticket`, `before`, `after` are rows of `tables.tickets` (after = as committed with the change);
`message` a row of `tables.ticket_messages`. A sender is `send(conn, ticket, message) -> str`
(the channel's id of what it sent) and raises to be retried (durable timer, at least once).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from crm_chassis.parts import Runtime, runtime
from crm_chassis.service import ServiceContext


@dataclass
class Hooks:
    opened: list[Callable] = field(default_factory=list)
    changed: list[Callable] = field(default_factory=list)
    message: list[Callable] = field(default_factory=list)
    # (conn, ticket) -> {TicketEvent field: value}: what a part adds to every ticket event (SLA)
    event_fields: list[Callable] = field(default_factory=list)


@dataclass
class Support(Runtime):
    hooks: Hooks = field(default_factory=Hooks)
    senders: dict[str, Callable] = field(default_factory=dict)  # channel -> send(conn, ticket, message)
    tickets: Any = None  # ticketing.Tickets: open, add_message, change_state, update
    installed: bool = False


def support(ctx: ServiceContext, parts=()) -> Support:
    rt = runtime(ctx, "support", Support)
    if not rt.installed:
        rt.installed = True
        for p in parts:
            if hasattr(p, "install"):
                p.install(rt)
    return rt
