"""Report 7, Customer 360: one customer's timeline across every service, newest first.

Each event about a customer (customer-svc: created, updated, note added, merged; sales-svc:
leads, opportunities, orders, invoices; support-svc: tickets opened and resolved, calls,
surveys; campaign-svc: messages sent, opened and clicked, responses, points earned and
redeemed, tier changes) becomes one row of `timeline`: kind (the routing key without its
version), source (the producer), ref (the resource), a one-line title and the event's figures
(detail, JSON). The event id is unique, so a redelivered event adds nothing; events are facts
that happened, so their order of arrival does not matter.

Merges: customer.merged.v1 moves the merged customers' rows to the survivor and records an
alias (merged -> survivor), so later events naming a merged customer land on the survivor
too; a chain (A into B, B into C) ends at C. customer.unmerged.v1 drops the restored
customers' aliases and moves the rows they were written on back to them.

The projection is four Projection objects, one per producer (the domain of each queue); each
handler is an extractor (projection.per_event) whose change a `Timeline` sink applies, one by
one or many at once (a multi-row INSERT .. ON CONFLICT DO NOTHING), so the consumer's batches
and the rebuild take it set-based like the fact tables. The producers' lag rows are kept by
their own projections (customers, sales, support, loyalty).
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Mapping

import sqlalchemy as sa
from google.protobuf import descriptor, descriptor_pool, json_format
from sqlalchemy.dialects.postgresql import insert as pg_insert

from crm.campaign.v1 import campaign_events_pb2 as cev
from crm.customer.v1 import customer_events_pb2 as cust
from crm.reporting.v1 import reporting_service_pb2 as pb
from crm.sales.v1 import sales_events_pb2 as sev
from crm.support.v1 import support_events_pb2 as tev
from crm_chassis.errors import InvalidArgument
from crm_chassis.messaging.consumer import Requires
from crm_chassis.messaging.envelope import Event
from crm_chassis.pagination import PageTokens, page_size
from crm_chassis.persian import to_persian_digits
from crm_chassis.resources import ResourceName

from . import periods
from .projection import Projection, execute_rows, in_rowset, per_event, rowset
from .tables import customer_aliases, timeline

CUSTOMER = "customers/"
# the ids the events carry (customer-svc's UUIDs): letters, digits, - and _, at most 64
CUSTOMER_NAME = ResourceName("customers/{customer_id}", customer_id=r"[A-Za-z0-9_-]{1,64}")


class Timeline:
    """The sink of timeline rows: `apply` one, `apply_many` a batch (the interface of Facts)."""

    table = timeline

    def apply(self, conn: sa.Connection, key: Mapping, values: Mapping) -> None:
        self.apply_many(conn, [(key, values)])

    def apply_many(self, conn: sa.Connection, changes: list[tuple[Mapping, Mapping]], writes=None) -> None:
        if not changes:
            return
        origins = sorted({v["origin_customer_id"] for _, v in changes})
        alias = dict(execute_rows(conn, _ALIASES, [{"merged_id": o} for o in origins]).all())
        rows = [
            {**k, **v, "customer_id": alias.get(v["origin_customer_id"], v["origin_customer_id"])} for k, v in changes
        ]
        execute_rows(conn, _insert(tuple(rows[0])), rows)  # in the order given (a function scan)


_ALIASES = sa.select(customer_aliases.c.merged_id, customer_aliases.c.survivor_id).where(
    in_rowset(customer_aliases, ("merged_id",))
)


@functools.cache
def _insert(cols: tuple[str, ...]):
    """INSERT INTO timeline SELECT FROM the row set ON CONFLICT (event_id) DO NOTHING."""
    v = rowset(timeline, cols)
    return (
        pg_insert(timeline)
        .from_select(list(cols), sa.select(*(v.c[c] for c in cols)))
        .on_conflict_do_nothing(index_elements=["event_id"])
    )


TIMELINE = Timeline()


def _money(m) -> dict:
    if not m.currency_code:
        return {}
    return {"amount": str(m.units + m.nanos / 1e9) if m.nanos else str(m.units), "currency": m.currency_code}


def _fmt(m) -> str:
    d = _money(m)
    return f"{d['amount']} {d['currency']}" if d else ""


_FD = descriptor.FieldDescriptor
_INT64 = (_FD.CPPTYPE_INT64, _FD.CPPTYPE_UINT64)


def _enum_json(fd):
    values = fd.enum_type.values_by_number
    if fd.enum_type.full_name == "google.protobuf.NullValue" or fd.enum_type.is_closed:
        return None  # json_format's own rules for these

    def name(v):
        e = values.get(v)
        return v if e is None else e.name  # an unknown value of an open enum: its number

    return name


def _json_enum_names_custom() -> bool:
    """Whether any enum value may have a custom JSON name (the `pb.enumvalue.json` option)."""
    try:
        descriptor_pool.Default().FindExtensionByName("pb.enumvalue.json")
    except KeyError:
        return False
    return True


@functools.cache
def _scalar_json(fd) -> Callable | None:
    """The proto3 JSON value of a singular scalar field's value, as json_format.MessageToDict
    gives it (strings, bools, 32-bit integers as they are, 64-bit ones as strings, enums by
    name), or None for what is left to json_format (messages, lists, maps, floats, bytes)."""
    if fd.is_repeated or fd.cpp_type == _FD.CPPTYPE_MESSAGE:
        return None
    if fd.cpp_type == _FD.CPPTYPE_STRING:
        return None if fd.type == _FD.TYPE_BYTES else str
    if fd.cpp_type == _FD.CPPTYPE_BOOL:
        return bool
    if fd.cpp_type in _INT64:
        return str
    if fd.cpp_type in (_FD.CPPTYPE_INT32, _FD.CPPTYPE_UINT32):
        return int
    if fd.cpp_type == _FD.CPPTYPE_ENUM and not _json_enum_names_custom():
        return _enum_json(fd)
    return None


def _detail(msg, *fields: str) -> dict:
    """The named fields of the event's message (set ones only), as JSON: only those fields are
    copied and converted (json_format over the whole event was a sixth of a rebuild's time);
    scalars directly (_scalar_json: json_format's printer per call cost more than the rest of
    the entry), the others by json_format."""
    if not fields:
        return {}
    out, rest = {}, []
    for fd, v in msg.ListFields():
        if fd.name in fields:
            conv = _scalar_json(fd)
            if conv is None:
                rest.append((fd, v))
            else:
                out[fd.name] = conv(v)
    if rest:
        part = type(msg)()
        for fd, v in rest:
            if fd.is_repeated:  # lists and maps
                getattr(part, fd.name).MergeFrom(v)
            elif fd.message_type is not None:
                getattr(part, fd.name).CopyFrom(v)
            else:
                setattr(part, fd.name, v)
        out.update(json_format.MessageToDict(part, preserving_proto_field_name=True))
    return out


def entry(source: str, parse: type, customer: Callable, ref: Callable, title: Callable, fields: tuple = ()):
    """The extractor of one kind of event: None when the event names no customer."""

    def extract(event: Event):
        msg = event.parse(parse)
        who = customer(msg).removeprefix(CUSTOMER)
        if not who:
            return None
        values = {
            "origin_customer_id": who,
            "occurred_at": event.time,
            "kind": event.routing_key.rsplit(".", 1)[0],
            "source": source,
            "ref": ref(msg),
            "title": title(msg, event.routing_key.split(".")[1]),
            "detail": _detail(msg, *fields),
        }
        return TIMELINE, {"event_id": event.id}, values

    return per_event(extract)


# -- customer-svc ------------------------------------------------------------------------------
def _customer_entry(attr: str, title: str):
    return entry(
        "customer",
        getattr(cust, attr),
        lambda m: m.customer.name,
        lambda m: m.customer.name,
        lambda m, verb: title,
        ("changed_fields",),
    )


def _note_title(m, verb) -> str:
    text = m.note.text.strip().splitlines()[0] if m.note.text.strip() else ""
    return "Note: " + (text[:80] + "…" if len(text) > 80 else text)


def on_customer_merged(conn: sa.Connection, event: Event) -> None:
    msg = event.parse(cust.CustomerMerged)
    survivor = msg.survivor.name.removeprefix(CUSTOMER)
    merged = [n.removeprefix(CUSTOMER) for n in msg.merged]
    a, t = customer_aliases, timeline
    conn.execute(a.update().where(a.c.survivor_id.in_(merged)).values(survivor_id=survivor))  # chains end here
    stmt = pg_insert(a)
    conn.execute(
        stmt.on_conflict_do_update(index_elements=["merged_id"], set_={"survivor_id": stmt.excluded.survivor_id}),
        [{"merged_id": m, "survivor_id": survivor} for m in merged],
    )
    conn.execute(t.update().where(t.c.customer_id.in_(merged)).values(customer_id=survivor))
    TIMELINE.apply(
        conn,
        {"event_id": event.id},
        {
            "origin_customer_id": survivor, "occurred_at": event.time, "kind": "customer.merged", "source": "customer",
            "ref": msg.merge or msg.survivor.name, "title": f"{len(merged)} customer record(s) merged into this one",
            "detail": {"merged": list(msg.merged)},
        },
    )  # fmt: skip


def on_customer_unmerged(conn: sa.Connection, event: Event) -> None:
    msg = event.parse(cust.CustomerUnmerged)
    restored = [c.name.removeprefix(CUSTOMER) for c in msg.restored]
    a, t = customer_aliases, timeline
    conn.execute(a.delete().where(a.c.merged_id.in_(restored)))
    conn.execute(t.update().where(t.c.origin_customer_id.in_(restored)).values(customer_id=t.c.origin_customer_id))


CUSTOMER_HANDLERS = {
    "customer.created.v1": _customer_entry("CustomerCreated", "Customer record created"),
    "customer.updated.v1": _customer_entry("CustomerUpdated", "Customer record updated"),
    "note.added.v1": entry(
        "customer", cust.NoteAdded, lambda m: m.customer, lambda m: m.note.name or m.customer, _note_title, ()
    ),
    "customer.merged.v1": on_customer_merged,
    "customer.unmerged.v1": on_customer_unmerged,
}
CUSTOMER_REQUIRES = {
    "customer.created.v1": Requires(cust.CustomerCreated, ("customer.name",)),
    "customer.updated.v1": Requires(cust.CustomerUpdated, ("customer.name",)),
    "note.added.v1": Requires(cust.NoteAdded, ("customer",)),
    "customer.merged.v1": Requires(cust.CustomerMerged, ("survivor.name", "merged")),
    "customer.unmerged.v1": Requires(cust.CustomerUnmerged, ("survivor.name", "restored")),
}

# -- sales-svc ---------------------------------------------------------------------------------
SALES_HANDLERS = {
    **{
        f"lead.{verb}.v1": entry(
            "sales",
            sev.LeadEvent,
            lambda m: m.customer,
            lambda m: m.lead,
            lambda m, v: f"Lead {v}" + (f" ({m.source})" if m.source else ""),
            ("status", "source", "product_line", "owner", "disqualify_reason", "opportunity"),
        )  # fmt: skip
        for verb in ("created", "qualified", "disqualified", "converted")
    },
    **{
        f"opportunity.{verb}.v1": entry(
            "sales",
            sev.OpportunityEvent,
            lambda m: m.customer,
            lambda m: m.opportunity,
            lambda m, v: (
                f"Opportunity {m.name or m.opportunity} {v}" + (f": {_fmt(m.amount)}" if _fmt(m.amount) else "")
            ),
            ("name", "stage_name", "state", "amount", "owner", "close_reason"),
        )  # fmt: skip
        for verb in ("created", "won", "lost")
    },
    **{
        f"order.{verb}.v1": entry(
            "sales",
            sev.OrderEvent,
            lambda m: m.customer,
            lambda m: m.order,
            lambda m, v: f"Order {m.number or m.order} {v}" + (f": {_fmt(m.total)}" if _fmt(m.total) else ""),
            ("number", "state", "total", "owner", "cancel_reason"),
        )  # fmt: skip
        for verb in ("placed", "delivered", "cancelled")
    },
    **{
        f"invoice.{verb}.v1": entry(
            "sales",
            sev.InvoiceEvent,
            lambda m: m.customer,
            lambda m: m.invoice,
            lambda m, v: f"Invoice {m.number or m.invoice} {v}" + (f": {_fmt(m.total)}" if _fmt(m.total) else ""),
            ("number", "kind", "state", "total", "paid_total", "due_date", "credited_invoice"),
        )  # fmt: skip
        for verb in ("issued", "paid", "overdue", "credited")
    },
}
SALES_REQUIRES = {
    k: Requires(
        {"lead": sev.LeadEvent, "opportunity": sev.OpportunityEvent, "order": sev.OrderEvent}.get(
            k.split(".")[0], sev.InvoiceEvent
        ),
        (k.split(".")[0],),
    )
    for k in SALES_HANDLERS
}

# -- support-svc -------------------------------------------------------------------------------
SUPPORT_HANDLERS = {
    **{
        f"ticket.{verb}.v1": entry(
            "support",
            tev.TicketEvent,
            lambda m: m.customer,
            lambda m: m.ticket,
            lambda m, v: f"Ticket {m.number or m.ticket} {v}" + (" (complaint)" if m.complaint else ""),
            ("number", "channel", "category", "complaint", "priority", "team", "assignee", "state"),
        )  # fmt: skip
        for verb in ("opened", "resolved")
    },
    "call.logged.v1": entry(
        "support",
        tev.CallEvent,
        lambda m: m.customer,
        lambda m: m.call,
        lambda m, v: f"{(m.direction or 'phone').capitalize()} call, {m.outcome or 'logged'}",
        ("direction", "queue", "agent", "outcome", "disposition", "talk_seconds", "ticket"),
    ),  # fmt: skip
    "survey.answered.v1": entry(
        "support",
        tev.SurveyEvent,
        lambda m: m.customer,
        lambda m: m.survey,
        lambda m, v: "Survey answered" + (f": satisfaction {m.csat}/5" if m.kind == "csat" and m.csat else ""),
        ("kind", "csat", "ticket", "agent"),
    ),  # fmt: skip
}
SUPPORT_REQUIRES = {
    "ticket.opened.v1": Requires(tev.TicketEvent, ("ticket",)),
    "ticket.resolved.v1": Requires(tev.TicketEvent, ("ticket",)),
    "call.logged.v1": Requires(tev.CallEvent, ("call",)),
    "survey.answered.v1": Requires(tev.SurveyEvent, ("survey",)),
}

# -- campaign-svc ------------------------------------------------------------------------------
CAMPAIGN_HANDLERS = {
    **{
        f"message.{verb}.v1": entry(
            "campaign",
            cev.MessageEvent,
            lambda m: m.customer,
            lambda m: m.message,
            lambda m, v: f"Campaign {m.channel or 'message'} {v}" + (f": {m.url}" if v == "clicked" and m.url else ""),
            ("campaign", "variant", "channel", "state", "url"),
        )  # fmt: skip
        for verb in ("sent", "opened", "clicked")
    },
    "response.recorded.v1": entry(
        "campaign",
        cev.ResponseEvent,
        lambda m: m.customer,
        lambda m: m.response,
        lambda m, v: f"Responded to a campaign ({m.kind or 'response'})",
        ("campaign", "message", "kind", "channel", "utm_source", "utm_medium", "utm_campaign"),
    ),  # fmt: skip
    **{
        f"points.{verb}.v1": entry(
            "campaign",
            cev.PointsEvent,
            lambda m: m.customer,
            lambda m: m.entry or m.account,
            lambda m, v: f"{abs(m.points)} points {v}, balance {m.balance}",
            ("account", "programme", "kind", "points", "balance", "amount", "reference", "reason"),
        )  # fmt: skip
        for verb in ("earned", "redeemed")
    },
    "tier.changed.v1": entry(
        "campaign",
        cev.TierEvent,
        lambda m: m.customer,
        lambda m: m.account,
        lambda m, v: f"Tier {m.direction or 'changed'}: {m.previous_tier or '-'} → {m.tier}",
        ("programme", "previous_tier", "tier", "direction", "reason"),
    ),  # fmt: skip
}
CAMPAIGN_REQUIRES = {
    "message.sent.v1": Requires(cev.MessageEvent, ("message",)),
    "message.opened.v1": Requires(cev.MessageEvent, ("message",)),
    "message.clicked.v1": Requires(cev.MessageEvent, ("message",)),
    "response.recorded.v1": Requires(cev.ResponseEvent, ("response",)),
    "points.earned.v1": Requires(cev.PointsEvent, ("account",)),
    "points.redeemed.v1": Requires(cev.PointsEvent, ("account",)),
    "tier.changed.v1": Requires(cev.TierEvent, ("account",)),
}

TABLES = [timeline, customer_aliases]
PROJECTIONS = [
    Projection("timeline-customer", "customer", CUSTOMER_HANDLERS, CUSTOMER_REQUIRES, TABLES, tracks=False),
    Projection("timeline-sales", "sales", SALES_HANDLERS, SALES_REQUIRES, TABLES, tracks=False),
    Projection("timeline-support", "support", SUPPORT_HANDLERS, SUPPORT_REQUIRES, TABLES, tracks=False),
    Projection("timeline-campaign", "campaign", CAMPAIGN_HANDLERS, CAMPAIGN_REQUIRES, TABLES, tracks=False),
]
KINDS = sorted({k.rsplit(".", 1)[0] for p in PROJECTIONS for k in p.handlers})
SOURCES = ("customer", "sales", "support", "campaign")


def subscriptions(rt=None):
    return [p.subscription() for p in PROJECTIONS]


# -- the query ---------------------------------------------------------------------------------
def parse(req: pb.GetCustomerTimelineRequest) -> dict:
    customer_id = CUSTOMER_NAME.parse(req.customer, "customer").customer_id
    kinds, sources = set(), set()
    for i, k in enumerate(req.kinds):
        k = k.strip().lower().removesuffix(".v1")
        if k in SOURCES:
            sources.add(k)
        elif k in KINDS:
            kinds.add(k)
        else:
            raise InvalidArgument.field(
                f"kinds[{i}]", f"unknown kind {k!r}; use a source ({', '.join(SOURCES)}) or a kind"
            )
    return {
        "customer": customer_id,
        "size": page_size(req.page_size),
        "kinds": sorted(kinds),
        "sources": sorted(sources),
        "lang": "fa" if getattr(req, "language_code", "").lower().startswith("fa") else "en",
    }


# -- titles in Persian ----------------------------------------------------------------------------
# The stored title is English (made when the event was projected); a Persian one is made when
# read, from the entry's kind and figures (its detail), so both languages come from one row.
_VERBS_FA = {
    "lead": {"created": "ساخته شد", "qualified": "واجد شرایط شد", "disqualified": "رد شد", "converted": "تبدیل شد"},
    "opportunity": {"created": "ساخته شد", "won": "به فروش رسید", "lost": "از دست رفت"},
    "order": {"placed": "ثبت شد", "delivered": "تحویل شد", "cancelled": "لغو شد"},
    "invoice": {"issued": "صادر شد", "paid": "پرداخت شد", "overdue": "از سررسید گذشت", "credited": "برگشت خورد"},
    "ticket": {"opened": "باز شد", "resolved": "حل شد"},
    "message": {"sent": "ارسال شد", "opened": "باز شد", "clicked": "کلیک شد"},
    "points": {"earned": "کسب شد", "redeemed": "خرج شد"},
}
_NOUNS_FA = {"lead": "سرنخ", "opportunity": "فرصت", "order": "سفارش", "invoice": "فاکتور", "ticket": "درخواست"}
_WORDS_FA = {"inbound": "ورودی", "outbound": "خروجی", "up": "ارتقا", "down": "تنزل", "upgrade": "ارتقا",
             "downgrade": "تنزل", "email": "ایمیل",
             "sms": "پیامک", "telegram": "تلگرام", "bale": "بله", "reply": "پاسخ ایمیل", "form": "فرم",
             "click": "کلیک", "answered": "پاسخ داده شد", "missed": "بی‌پاسخ", "logged": "ثبت شد"}  # fmt: skip


def _money_fa(d) -> str:
    """` ۹۰٬۰۰۰٬۰۰۰ IRR` of a Money as json_format gives it ({currency_code, units, nanos}), or ""."""
    if not isinstance(d, dict) or not d.get("currency_code"):
        return ""
    amount = int(d.get("units") or 0) + int(d.get("nanos") or 0) / 1e9
    text = f"{amount:,.2f}".rstrip("0").rstrip(".") if amount != int(amount) else f"{int(amount):,}"
    return f": {to_persian_digits(text.replace(',', '٬'))} {d['currency_code']}"


def _title_fa(kind: str, ref: str, title: str, d: dict) -> str:
    noun, _, verb = kind.partition(".")
    fa = to_persian_digits
    if kind == "customer.created":
        return "پرونده مشتری ساخته شد"
    if kind == "customer.updated":
        return "پرونده مشتری به‌روز شد"
    if kind == "note.added":
        return "یادداشت: " + title.removeprefix("Note: ")
    if kind == "customer.merged":
        return f"{fa(str(len(d.get('merged') or [])))} پرونده مشتری در این پرونده ادغام شد"
    if noun == "lead":
        return f"سرنخ {_VERBS_FA[noun][verb]}" + (f" ({d['source']})" if d.get("source") else "")
    if noun in ("opportunity", "order", "invoice", "ticket"):
        name = d.get("name") or d.get("number") or ref
        text = f"{_NOUNS_FA[noun]} {fa(str(name))} {_VERBS_FA[noun][verb]}"
        if noun == "ticket":
            return text + (" (شکایت)" if d.get("complaint") else "")
        return text + _money_fa(d.get("amount") or d.get("total"))
    if kind == "call.logged":
        direction, outcome = d.get("direction") or "", d.get("outcome") or "logged"
        return f"تماس {_WORDS_FA.get(direction, direction)}".strip() + f"، {_WORDS_FA.get(outcome, outcome)}"
    if kind == "survey.answered":
        csat = d.get("csat")
        return "نظرسنجی پاسخ داده شد" + (f": رضایت {fa(str(csat))} از ۵" if d.get("kind") == "csat" and csat else "")
    if noun == "message":
        channel = d.get("channel") or ""
        text = f"پیام کمپین ({_WORDS_FA.get(channel, channel)}) {_VERBS_FA[noun][verb]}".replace(" ()", "")
        return text + (f": {d['url']}" if verb == "clicked" and d.get("url") else "")
    if kind == "response.recorded":
        k = d.get("kind") or ""
        return f"پاسخ به کمپین ({_WORDS_FA.get(k, k)})".replace(" ()", "")
    if noun == "points":
        points, balance = abs(int(d.get("points") or 0)), int(d.get("balance") or 0)
        return f"{fa(str(points))} امتیاز {_VERBS_FA[noun][verb]}، مانده {fa(str(balance))}"
    if kind == "tier.changed":
        direction = d.get("direction") or ""
        return f"سطح {_WORDS_FA.get(direction, 'تغییر کرد')}: {d.get('previous_tier') or '-'} ← {d.get('tier', '')}"
    return title


def title_in(row, lang: str) -> str:
    """The entry's title in `lang` ("en": as stored; "fa": made from its kind and figures)."""
    if lang != "fa":
        return row.title
    try:
        return _title_fa(row.kind, row.ref, row.title, row.detail or {})
    except (KeyError, ValueError, TypeError):  # a figure of an unexpected shape: the stored title
        return row.title


def _survivor(conn: sa.Connection, customer_id: str) -> str:
    a = customer_aliases
    return conn.execute(sa.select(a.c.survivor_id).where(a.c.merged_id == customer_id)).scalar() or customer_id


def _where(q: dict, who: str) -> list:
    t = timeline
    where = [t.c.customer_id == who]
    if q["kinds"] or q["sources"]:
        where.append(sa.or_(t.c.kind.in_(q["kinds"]), t.c.source.in_(q["sources"])))
    return where


def _select(q: dict, who: str, after: tuple[dt.datetime, int] | None, limit: int) -> sa.Select:
    """Newest first from the keyset position ``after`` (occurred_at, id)."""
    t = timeline
    stmt = sa.select(t).where(*_where(q, who))
    if after is not None:
        at, last_id = after
        stmt = stmt.where(sa.tuple_(t.c.occurred_at, t.c.id) < sa.tuple_(sa.literal(at, t.c.occurred_at.type), last_id))
    return stmt.order_by(t.c.occurred_at.desc(), t.c.id.desc()).limit(limit)


def page(conn: sa.Connection, tokens: PageTokens, q: dict, token: str) -> pb.GetCustomerTimelineResponse:
    who = _survivor(conn, q["customer"])
    fingerprint = tokens.fingerprint(customer=who, kinds=q["kinds"], sources=q["sources"])
    after = tokens.decode(token, fingerprint)
    position = None
    if after is not None:
        try:
            position = dt.datetime.fromisoformat(after[0]), int(after[1])
        except (ValueError, TypeError, IndexError):
            raise InvalidArgument.field("page_token", "is not a valid page token for this query") from None
    rows = conn.execute(_select(q, who, position, q["size"] + 1)).all()
    out = pb.GetCustomerTimelineResponse()
    for r in rows[: q["size"]]:
        e = out.entries.add(
            kind=r.kind,
            source=r.source,
            ref=r.ref,
            title=title_in(r, q["lang"]),
            origin_customer=CUSTOMER + r.origin_customer_id,
        )
        e.detail.update(r.detail)
        e.occur_time.FromDatetime(r.occurred_at)
    if len(rows) > q["size"]:
        last = rows[q["size"] - 1]
        out.next_page_token = tokens.encode([last.occurred_at.isoformat(), last.id], fingerprint)
    return out


# -- the export: every page, and the entries per period and source -----------------------------
def all_rows(engine: sa.Engine, q: dict, batch: int = 1000):
    """Every entry of the customer (the survivor's after a merge), newest first: one keyset page
    of ``batch`` rows per query, each on its own short connection, so a long timeline streams
    into the file without being held."""
    with engine.connect() as conn:
        who = _survivor(conn, q["customer"])
    after = None
    while True:
        with engine.connect() as conn:
            rows = conn.execute(_select(q, who, after, batch)).all()
        yield from rows
        if len(rows) < batch:
            return
        after = rows[-1].occurred_at, rows[-1].id


def counts(conn: sa.Connection, q: dict, period: str, calendar: str) -> list[tuple[str, str, int]]:
    """(period key, source, entries) of the customer's timeline, oldest period first."""
    t = timeline
    key = periods.key_expr(sa.func.tehran_day(t.c.occurred_at), period, calendar).label("period_key")
    stmt = (
        sa.select(key, t.c.source, sa.func.count().label("n"))
        .where(*_where(q, _survivor(conn, q["customer"])))
        .group_by(key, t.c.source)
        .order_by(key, t.c.source)
    )
    return [(r.period_key, r.source, r.n) for r in conn.execute(stmt)]
