"""What every part of campaign-svc shares, made once per process: crm_chassis.parts.Runtime (the
unit of work, the timer worker, the settings) plus the hooks and the channel senders.

    def install(campaign):
        campaign.hooks.audience_changed.append(lambda conn, customer_ids, cause: ...)  # segments
        campaign.senders["email"] = send_mail       # delivers one Outgoing message

`audience_changed(conn, customer_ids, cause)` runs in the transaction that changed the audience
rows of those customers (a customer event, a sales or support fact, a consent change, a merge
or erasure); `cause` is "customer", "sales", "support", "consent", "merge" or "erasure". The
segments part keeps dynamic segment membership current from it.

`renderer(conn, template_id, version, context) -> templates.Rendered` is the templates part's:
the subject, text and HTML of a template version for one recipient (`context`: "customer" the
audience row or None, "campaign" a dict, "unsubscribe_url"); it raises InvalidArgument naming
the variable that failed. The campaigns part renders each message through it.

A sender is `send(out: outgoing.Outgoing) -> str` (the provider's id of what it sent, e.g. the
SMTP Message-ID); it raises `outgoing.SendError` (retryable or not) on failure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from crm_chassis.parts import Runtime, runtime
from crm_chassis.service import ServiceContext


@dataclass
class Hooks:
    audience_changed: list[Callable] = field(default_factory=list)


@dataclass
class Campaign(Runtime):
    hooks: Hooks = field(default_factory=Hooks)
    senders: dict[str, Callable] = field(default_factory=dict)  # channel -> send(Outgoing) -> str
    renderer: Callable | None = None  # (conn, template_id, version, context) -> templates.Rendered
    installed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def audience_changed(self, conn, customer_ids, cause: str) -> None:
        ids = sorted({str(i) for i in customer_ids if i})
        if ids:
            for hook in self.hooks.audience_changed:
                hook(conn, ids, cause)


def campaign(ctx: ServiceContext, parts=()) -> Campaign:
    rt = runtime(ctx, "campaign", Campaign)
    if not rt.installed:
        rt.installed = True
        for p in parts:
            if hasattr(p, "install"):
                p.install(rt)
    return rt
